"""Saved targets are checked field by field when loaded: a tampered or
inconsistent file is a ValueError naming the file and the field, never an
IndexError or a size mismatch from deep inside the loop. Plus a fuzz of
ReplayConfig fields and of target files."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import actreplay_ext as ar
from actreplay_ext import tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base, rlvr = tiny.make_pair("qwen2_5_vl")
    inputs = tiny.make_inputs(rlvr)
    cfg = ar.ReplayConfig(layers=3, lr=1e-3, steps=2)
    path = str(tmp_path_factory.mktemp("targets") / "t.safetensors")
    ar.compute_targets(base, inputs, cfg).save(path)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    return path, tensors, meta, (rlvr, inputs, cfg)


def tampered(tmp_path, saved, tensors=None, meta=None):
    _, t0, m0, _ = saved
    t = {**t0, **(tensors or {})}
    t = {k: v for k, v in t.items() if v is not None}
    path = str(tmp_path / "bad.safetensors")
    save_file(t, path, metadata={**m0, **(meta or {})})
    return path


def test_a_valid_file_loads_and_replays(saved):
    path, _, _, (rlvr, inputs, cfg) = saved
    result = ar.optimize(rlvr, inputs, ar.ReplayTargets.load(path), cfg)
    assert result.replayed and len(result.losses) == 2


@pytest.mark.parametrize("change,field", [
    (dict(meta={"layers": "4"}), "tensor"),
    (dict(meta={"layers": "true"}), "metadata 'layers'"),
    (dict(meta={"n_visual": "[3]"}), "'entropy'"),
    (dict(meta={"n_visual": "not json"}), "metadata 'n_visual'"),
    (dict(meta={"config": json.dumps({"layers": 3, "topv": 0})}), "metadata 'config'"),
    (dict(meta={"row_map": "[5]"}), "metadata 'row_map'"),
    (dict(tensors={"selected.1": torch.tensor([0, 999])}), "'selected.1'"),
    (dict(tensors={"selected.0": torch.tensor([2, 1])}), "'selected.0'"),
    (dict(tensors={"target_idx.0": "cut"}), "'target_idx.0'"),
    (dict(tensors={"target_idx.2": "vocab"}), "'target_idx.2'"),
    (dict(tensors={"target_logp.1": "shift"}), "'target_logp.1'"),
    (dict(tensors={"target_logp.0": None}), "tensor"),
    (dict(tensors={"input_ids": "float"}), "'input_ids'"),
])
def test_tampered_files_name_the_file_and_the_field(saved, tmp_path, change, field):
    _, t0, _, _ = saved
    tensors = dict(change.get("tensors", {}))
    for key, how in list(tensors.items()):
        if how == "cut":
            tensors[key] = t0[key][:, :10].contiguous()  # fewer columns than topv
        elif how == "vocab":
            tensors[key] = t0[key] + 1000  # beyond the model's vocabulary
        elif how == "shift":
            tensors[key] = t0[key] + 0.5  # not a log-distribution
        elif how == "float":
            tensors[key] = t0[key].float()
    path = tampered(tmp_path, saved, tensors, change.get("meta"))
    with pytest.raises(ValueError, match=f"ReplayTargets.load: '.*bad.safetensors': {field}"):
        ar.ReplayTargets.load(path)


def test_a_file_that_is_not_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        ar.ReplayTargets.load(str(path))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(
    st.sampled_from(["layers", "entropy_threshold", "topv", "lr", "steps", "normalize", "alignment", "mode",
                     "select", "rule", "inject_layer", "topk_tokens", "thresholds", "checkpoint"]),
    st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=8), st.lists(st.floats(allow_nan=True), max_size=4)),
    max_size=4))
def test_config_fuzz_accepts_valid_values_or_names_the_field(kwargs):
    """Any mix of field values: a config that validates, or a ValueError naming a field."""
    try:
        cfg = ar.ReplayConfig(**kwargs)
    except ValueError as e:
        assert "ReplayConfig: '" in str(e) or "ReplayConfig: rule=" in str(e)
        return
    import math
    assert isinstance(cfg.layers, int) and not isinstance(cfg.layers, bool) and cfg.layers >= 1
    assert math.isfinite(cfg.step_size) and math.isfinite(cfg.entropy_threshold)
    assert 0 <= cfg.inject_layer < cfg.layers and isinstance(cfg.normalize, bool)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["entropy", "selected.0", "selected.2", "target_idx.1", "target_logp.2", "input_ids"]),
       mode=st.sampled_from(["drop_row", "dtype", "scale", "negate"]))
def test_target_file_fuzz_loads_consistently_or_names_the_field(saved, tmp_path, key, mode):
    _, t0, _, (rlvr, inputs, cfg) = saved
    x = t0[key]
    if mode == "drop_row":
        x = x[1:].contiguous() if x.dim() and x.shape[0] > 1 else x[:0].contiguous()
    elif mode == "dtype":
        x = x.double() if x.is_floating_point() else x.int()
    elif mode == "scale":
        x = x * 3
    else:
        x = -x
    path = tampered(tmp_path, saved, {key: x})
    try:
        targets = ar.ReplayTargets.load(path)
    except ValueError as e:
        assert "ReplayTargets.load:" in str(e) and "bad.safetensors" in str(e)
        return
    # What loads is consistent: the loop runs on it or refuses it with a clear error.
    try:
        ar.optimize(rlvr, inputs, targets, cfg)
    except ValueError as e:
        assert "actreplay_ext:" in str(e)
