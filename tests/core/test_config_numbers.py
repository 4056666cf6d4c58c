"""ReplayConfig takes numbers of any numeric type (numpy scalars and arrays,
Fraction, Decimal) as the Python int or float they stand for: a config made
of them equals the plain one, and what records it (results, targets and their
files) is plain JSON. Bools where a number is wanted, and NaN or infinity,
are refused naming the field."""

import json
from decimal import Decimal
from fractions import Fraction

import pytest
import torch

import actreplay_ext as ar
from actreplay_ext import tiny

np = pytest.importorskip("numpy")

#: (given, the plain config it stands for)
EQUIVALENT = [
    (dict(layers=np.int64(3), steps=np.int32(3), topv=np.int16(50), inject_layer=np.int64(1)),
     dict(layers=3, steps=3, topv=50, inject_layer=1)),
    (dict(lr=np.float64(0.05), entropy_threshold=np.float32(0.5), tol=np.float64(1e-3)),
     dict(lr=0.05, entropy_threshold=0.5, tol=1e-3)),
    (dict(lr=Fraction(1, 20), entropy_threshold=Decimal("0.25"), tol=1),
     dict(lr=0.05, entropy_threshold=0.25, tol=1.0)),
    (dict(layers=[np.int64(0), np.int64(4)]), dict(layers=[0, 4])),
    (dict(layers=np.arange(5)), dict(layers=5)),
    (dict(rule="absolute", layers=2, thresholds=np.array([1.5, 2.5])),
     dict(rule="absolute", layers=2, thresholds=[1.5, 2.5])),
    (dict(mode="direct", layers=2, thresholds=torch.tensor([4.5, 3.5])),
     dict(mode="direct", layers=2, thresholds=[4.5, 3.5])),
    (dict(rule="topk", topk_tokens=np.int64(4)), dict(rule="topk", topk_tokens=4)),
    (dict(rule="topk", topk_tokens=Fraction(1, 2)), dict(rule="topk", topk_tokens=0.5)),
    (dict(rule="topk", topk_tokens=np.float32(0.25)), dict(rule="topk", topk_tokens=0.25)),
]


@pytest.mark.parametrize("given, plain", EQUIVALENT)
def test_other_numeric_types_make_the_plain_config(given, plain):
    cfg, ref = ar.ReplayConfig(**given), ar.ReplayConfig(**plain)
    assert cfg == ref
    assert json.dumps(cfg.as_dict()) == json.dumps(ref.as_dict())  # the very JSON files record
    for name in (n for n in given if n not in ("rule", "mode")):
        value = getattr(cfg, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        assert all(type(v) in (int, float) for v in values), (name, value)


@pytest.mark.parametrize("field, value", [
    ("steps", True), ("steps", np.bool_(True)), ("layers", np.bool_(True)), ("lr", np.bool_(False)),
    ("entropy_threshold", True), ("lr", np.float64("nan")), ("lr", np.float32("inf")), ("tol", Decimal("NaN")),
    ("entropy_threshold", Decimal("-Infinity")), ("lr", Fraction(10 ** 400)), ("steps", np.float64(3.0)),
    ("layers", np.array([0.5, 1.5])), ("topv", Fraction(50)),
])
def test_bools_and_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"ReplayConfig: '{field}' must"):
        ar.ReplayConfig(**{field: value})


def test_a_config_of_numpy_numbers_saves_and_loads_like_the_plain_one(tmp_path):
    base, rlvr = tiny.make_pair(noise=0.5)
    x = tiny.make_inputs(rlvr)
    numbers = ar.ReplayConfig(layers=np.int64(3), steps=np.int64(3), lr=np.float64(0.05),
                              entropy_threshold=Fraction(1, 2), topv=np.int32(20))
    plain = ar.ReplayConfig(layers=3, steps=3, lr=0.05, entropy_threshold=0.5, topv=20)
    targets = ar.compute_targets(base, x, numbers)
    targets.save(str(tmp_path / "targets.safetensors"))
    loaded = ar.ReplayTargets.load(str(tmp_path / "targets.safetensors"))
    assert loaded.config == ar.compute_targets(base, x, plain).config
    result = ar.optimize(rlvr, x, loaded, numbers)  # saved targets fit the numpy config and the plain one
    result.save(str(tmp_path / "result.safetensors"))
    back = ar.ReplayResult.load(str(tmp_path / "result.safetensors"))
    assert back.config == plain.as_dict() and ar.ReplayConfig(**back.config) == plain
    assert torch.equal(back.deltas, ar.optimize(rlvr, x, targets, plain).deltas)


@pytest.mark.parametrize("fields, message, fixed", [
    (dict(thresholds=[0.1, 0.1, 0.1], layers=3), "'thresholds' is read by rule='absolute' and mode='direct' only",
     dict(rule="absolute")),
    (dict(topk_tokens=2), "'topk_tokens' is read by rule='topk' only", dict(rule="topk")),
    (dict(rule="absolute", thresholds=[0.1, 0.1, 0.1], layers=3, topk_tokens=0.5), "'topk_tokens' is read by",
     dict(topk_tokens=None)),
])
def test_a_field_of_another_rule_is_refused_not_ignored(fields, message, fixed):
    """With the default rule='ratio' these ran the ratio rule in silence."""
    with pytest.raises(ValueError, match=message):
        ar.ReplayConfig(**fields)
    ar.ReplayConfig(**{**fields, **fixed})


@pytest.mark.parametrize("fields, field", [(dict(layers=2**70), "layers"), (dict(steps=2**40), "steps"),
                                           (dict(lr=Decimal("sNaN")), "lr")])
def test_numbers_beyond_what_the_run_can_take_name_their_field(fields, field):
    """A bare OverflowError from deep inside, or "cannot convert signaling NaN", once named no field."""
    with pytest.raises(ValueError, match=f"ReplayConfig: '{field}' must be"):
        ar.ReplayConfig(**fields)
