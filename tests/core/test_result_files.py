"""Learned offsets saved with `ReplayResult.save` come back equal and replay
the same generation through `apply`; a tampered or foreign file is a
ValueError naming the file and the field. And a replay that cannot have
changed anything, or whose loss rose, says so on the package's logger."""

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import actreplay_ext as ar
from actreplay_ext import tiny

LR = 1e-3


@pytest.fixture(scope="module")
def pair():
    return tiny.make_pair("qwen2_5_vl")


@pytest.fixture(scope="module")
def learned(pair, tmp_path_factory):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=3)
    result = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    path = str(tmp_path_factory.mktemp("result") / "r.safetensors")
    result.save(path)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    return path, tensors, meta, result, inputs


def test_roundtrip_keeps_every_field_and_replays_the_same(pair, learned):
    _, rlvr = pair
    path, _, _, result, inputs = learned
    loaded = ar.ReplayResult.load(path)
    assert torch.equal(loaded.deltas, result.deltas) and torch.equal(loaded.input_ids, result.input_ids)
    assert loaded.losses == result.losses and loaded.selected == result.selected
    assert loaded.n_visual == result.n_visual and loaded.inject_layer == result.inject_layer
    assert loaded.config == result.config and loaded.config["lr"] == LR and loaded.config["layers"] == 3
    assert ar.ReplayConfig(**loaded.config) == ar.ReplayConfig(layers=3, lr=LR, steps=3)
    assert bool(result.deltas.abs().max() > 0)  # the replay changed something the comparison can see
    outs = []
    for r in (result, loaded):
        with ar.apply(rlvr, r):
            outs.append(rlvr.generate(**inputs, max_new_tokens=5, do_sample=False))
    with ar.apply(rlvr, loaded):  # the offsets reach the model: logits differ from the plain model's
        replayed = rlvr(**inputs).logits
    plain = rlvr(**inputs).logits
    assert torch.equal(outs[0], outs[1]) and not torch.equal(replayed, plain)


def test_a_batch_of_repeated_rows_roundtrips(pair, tmp_path):
    base, rlvr = pair
    one = tiny.make_inputs(rlvr)
    two = {k: torch.cat([v] * 2) if k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                          "image_grid_thw") else v for k, v in one.items()}
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=2)
    result = ar.optimize(rlvr, two, ar.compute_targets(base, two, cfg), cfg)
    assert isinstance(result.deltas, list) and len(result.deltas) == 2
    result.save(str(tmp_path / "b.safetensors"))
    loaded = ar.ReplayResult.load(str(tmp_path / "b.safetensors"))
    assert isinstance(loaded.deltas, list) and all(torch.equal(a, b) for a, b in zip(loaded.deltas, result.deltas))
    assert loaded.optimized_rows == 1 and loaded.n_visual == result.n_visual


def test_a_prompt_without_visual_tokens_roundtrips(pair, tmp_path):
    base, rlvr = pair
    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=2)
    result = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    result.save(str(tmp_path / "t.safetensors"))
    loaded = ar.ReplayResult.load(str(tmp_path / "t.safetensors"))
    assert not loaded.replayed and loaded.note == result.note and "no visual tokens" in loaded.note


def _every_kind_of_last(pair):
    """handle.last of each way a patched forward ends: replayed, a batch,
    direct substitution, placeholders without images, visual tokens over a
    KV cache (not replayed)."""
    import copy
    import warnings

    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=2)
    greedy = dict(max_new_tokens=2, do_sample=False)
    lasts = {}
    with ar.patch(rlvr, base=base, config=cfg) as handle:
        rlvr.generate(**inputs, **greedy)
        lasts["replayed"] = handle.last
        rlvr.generate(**tiny.make_inputs(rlvr, batch=2, seed=3), **greedy)
        lasts["batch"] = handle.last
        with torch.no_grad():
            rlvr(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        lasts["placeholders"] = handle.last
        head = {k: v[:, :8] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cache = rlvr(**head, use_cache=True).past_key_values
            rlvr.generate(**inputs, past_key_values=copy.deepcopy(cache), **greedy)
        lasts["over-a-cache"] = handle.last
    direct = ar.ReplayConfig(mode="direct", layers=3, thresholds=[9.0, 9.0, 9.0])
    with ar.patch(rlvr, base=base, config=direct) as handle:
        rlvr.generate(**inputs, **greedy)
        lasts["direct"] = handle.last
    return lasts, inputs


def test_every_result_the_hooks_make_saves_and_loads(pair, tmp_path):
    """A class of bug: save() wrote files load() refused (a direct
    substitution's empty offsets, a skipped forward's empty n_visual). Every
    handle.last saves and loads with the same fields; apply() takes the ones
    with offsets and refuses the others by name."""
    _, rlvr = pair
    lasts, inputs = _every_kind_of_last(pair)
    assert "over a KV cache" in lasts["over-a-cache"].note and "without images" in lasts["placeholders"].note
    for kind, last in lasts.items():
        path = str(tmp_path / f"{kind}.safetensors")
        last.save(path)
        loaded = ar.ReplayResult.load(path)
        assert (loaded.n_visual, loaded.selected, loaded.note, loaded.config) == \
            (list(last.n_visual), list(last.selected), last.note, last.config), kind
        assert torch.equal(loaded.flat_deltas(), last.flat_deltas().cpu()), kind
    assert ar.ReplayResult.load(str(tmp_path / "direct.safetensors")).direct
    with pytest.raises(ValueError, match="apply: the result is a direct substitution"):
        ar.apply(rlvr, lasts["direct"]).__enter__()
    text_only = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    for kind in ("placeholders", "over-a-cache"):  # no offsets: refused where there are visual tokens
        with ar.apply(rlvr, ar.ReplayResult.load(str(tmp_path / f"{kind}.safetensors"))):
            with pytest.raises(ValueError, match=r"apply: the result holds no offsets \(.*nothing replayed\) and "
                                                 "this prompt has visual tokens"):
                rlvr.generate(**inputs, max_new_tokens=2, do_sample=False)
            rlvr.generate(**text_only, max_new_tokens=2, do_sample=False)  # and nothing to add where there are none
    skipped = ar.ReplayResult(torch.zeros(0, 0), [], [0, 0, 0], [], {}, note="no input_ids: nothing replayed")
    skipped.save(str(tmp_path / "no-rows.safetensors"))  # n_visual [] (a forward without input_ids)
    assert ar.ReplayResult.load(str(tmp_path / "no-rows.safetensors")).n_visual == []
    with ar.apply(rlvr, ar.ReplayResult.load(str(tmp_path / "replayed.safetensors"))):
        rlvr.generate(**inputs, max_new_tokens=2, do_sample=False)


def tampered(tmp_path, learned, tensors=None, meta=None):
    _, t0, m0, _, _ = learned
    t = {k: v for k, v in {**t0, **(tensors or {})}.items() if v is not None}
    path = str(tmp_path / "bad.safetensors")
    save_file(t, path, metadata={**m0, **(meta or {})})
    return path


@pytest.mark.parametrize("change,field", [
    (dict(tensors={"deltas": None}), "tensor"),
    (dict(tensors={"deltas": "half"}), "'deltas'"),
    (dict(tensors={"deltas": "short"}), "'deltas'"),
    (dict(tensors={"deltas": "nan"}), "'deltas'"),
    (dict(tensors={"input_ids": "float"}), "'input_ids'"),
    (dict(meta={"losses": "not json"}), "metadata 'losses'"),
    (dict(meta={"losses": "[1.0, NaN]"}), "metadata 'losses'"),
    (dict(meta={"n_visual": "[]"}), "metadata 'n_visual'"),
    (dict(meta={"rows": "2"}), "tensor"),
    (dict(meta={"inject_layer": "-1"}), "metadata 'inject_layer'"),
    (dict(meta={"config": "[1]"}), "metadata 'config'"),
    (dict(meta={"selected": '["a"]'}), "metadata 'selected'"),
])
def test_tampered_files_name_the_file_and_the_field(learned, tmp_path, change, field):
    _, t0, _, _, _ = learned
    tensors = dict(change.get("tensors", {}))
    for key, how in list(tensors.items()):
        if how == "half":
            tensors[key] = t0[key].half()
        elif how == "short":
            tensors[key] = t0[key][1:].contiguous()  # one row fewer than n_visual
        elif how == "nan":
            bad = t0[key].clone()
            bad[0, 0] = float("nan")
            tensors[key] = bad
        elif how == "float":
            tensors[key] = t0[key].float()
    path = tampered(tmp_path, learned, tensors, change.get("meta"))
    with pytest.raises(ValueError, match=f"ReplayResult.load: '.*bad.safetensors': {field}"):
        ar.ReplayResult.load(path)


def test_foreign_files_are_clear_errors(pair, tmp_path):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    targets = str(tmp_path / "targets.safetensors")
    ar.compute_targets(base, inputs, ar.ReplayConfig(layers=3)).save(targets)
    with pytest.raises(ValueError, match="is not a ReplayResult file .*ReplayTargets/1"):
        ar.ReplayResult.load(targets)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        ar.ReplayResult.load(str(junk))


@pytest.mark.parametrize("kind", [ar.ReplayResult, ar.ReplayTargets])
def test_a_directory_or_a_missing_file_is_named_as_such(kind, tmp_path):
    """Not safetensors' "No such device" for a directory."""
    with pytest.raises(IsADirectoryError, match=rf"^{kind.__name__}.load: argument 'path' is a directory .*"
                                                rf"expected a file written by {kind.__name__}.save$"):
        kind.load(str(tmp_path))
    with pytest.raises(IsADirectoryError, match="argument 'path' is a directory"):
        kind.load(tmp_path)  # a pathlib.Path alike
    with pytest.raises(FileNotFoundError):
        kind.load(str(tmp_path / "missing.safetensors"))


def test_offsets_for_another_prompt_are_refused_by_apply(pair, learned):
    _, rlvr = pair
    path = learned[0]
    other = tiny.make_inputs(rlvr, images=[(8, 16)])
    with ar.apply(rlvr, ar.ReplayResult.load(path)), pytest.raises(ValueError, match="not a prompt the result"):
        rlvr(**other)


def test_nothing_selected_warns(pair, caplog):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=2, entropy_threshold=0.0)
    with caplog.at_level(logging.WARNING, logger="actreplay_ext"):
        result = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    assert result.replayed and not any(result.selected)
    assert any("no visual token was selected" in r.getMessage() for r in caplog.records)


def test_a_rising_loss_warns_and_a_falling_one_does_not(pair, caplog):
    base, rlvr = pair
    inputs = tiny.make_inputs(rlvr)
    for lr, rises in ((LR, False), (RISING_LR, True)):
        cfg = ar.ReplayConfig(layers=3, lr=lr, steps=6)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="actreplay_ext"):
            result = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
        assert (result.losses[-1] > result.losses[0]) == rises, result.losses
        warned = [r.getMessage() for r in caplog.records if "loss rose" in r.getMessage()]
        assert bool(warned) == rises and (not rises or f"lr={lr:g}" in warned[0])


def test_a_prompt_without_visual_tokens_warns(pair, caplog):
    base, rlvr = pair
    inputs = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    cfg = ar.ReplayConfig(layers=3, lr=LR, steps=2)
    with caplog.at_level(logging.WARNING, logger="actreplay_ext"):
        result = ar.optimize(rlvr, inputs, ar.compute_targets(base, inputs, cfg), cfg)
    assert not result.replayed
    assert [r.getMessage() for r in caplog.records] == [
        "actreplay_ext: the prompt has no visual tokens, so there is nothing to replay: the offsets are empty "
        "and generation is unchanged"]


RISING_LR = 1.0  # far above what the tiny model takes (its loss jumps at the first update)
