"""Pass@K runs on a cluster: a checkpoint is what its bytes are, not where it
lies or when it was touched. The same run from another working directory, after
`touch`, or from a byte-identical copy resumes; other weights are refused by
name; --resume-anyway keeps the records and records itself; --report prints the
table from the records without loading a model."""

import json
import os
import shutil

import pytest
import torch

from actreplay_ext import tiny
from actreplay_ext.tools import checks, cli, data

pytest.importorskip("torchvision", reason="the Qwen processors' video processor needs torchvision")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("identity")
    base, rlvr = tiny.save_pair(str(root / "pair"))
    rng = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(56, 84, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(root / "noise.png")
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": "what is 2 + 2 ?", "image": "noise.png", "answer": "4"},
        {"id": "b", "question": "which option ?", "image": "noise.png", "choices": ["1", "2"], "answer": "A"},
    ]) + "\n")
    return root


FAST = ["--samples", "1", "--max-new-tokens", "2", "--layers", "3", "--steps", "1", "--dtype", "float32", "--quiet"]


def passk_main(*argv):
    return cli.main(["--quiet", "passk", *argv])


def start(pair, cwd, out, base="pair/base", rlvr="pair/rlvr", *extra):
    """One run in `cwd`, with the checkpoints' paths as a user in that directory types them."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return passk_main("--base", base, "--rlvr", rlvr, "--data", str(pair / "rows.jsonl"), "--out", str(out),
                          *FAST, *extra)
    finally:
        os.chdir(here)


def records(out):
    return "".join(p.read_text() for p in sorted(out.glob("records.rank*.jsonl")))


@pytest.fixture(scope="module")
def first(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "out"
    assert start(pair, pair, out) == 0
    return out


def fresh_copy(first, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first, out)
    return out


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(data, "load_model", refuse)
    monkeypatch.setattr(tiny, "make_pair", refuse)


def test_another_working_directory_resumes_without_redoing(pair, first, tmp_path, capsys):
    out = fresh_copy(first, tmp_path)
    before = records(out)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert start(pair, elsewhere, out, str(pair / "pair/base"), str(pair / "pair/rlvr")) == 0
    assert records(out) == before


def test_a_touched_weight_file_resumes(pair, first, tmp_path):
    out = fresh_copy(first, tmp_path)
    before = records(out)
    weights = next((pair / "pair/rlvr").glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))
    assert start(pair, pair, out) == 0
    assert records(out) == before


def test_a_byte_identical_copy_resumes_and_its_hash_is_kept(pair, first, tmp_path):
    out = fresh_copy(first, tmp_path)
    before = records(out)
    shutil.copytree(pair / "pair/rlvr", tmp_path / "copy")  # copytree keeps the mtimes; the path is new
    assert start(pair, tmp_path, out, str(pair / "pair/base"), "copy") == 0
    assert records(out) == before
    run = json.loads((out / "run.json").read_text())
    assert str(tmp_path / "copy") in {os.path.dirname(p) for p in run["weight_hashes"]}
    assert run["checkpoints"]["rlvr"]["path"] == "copy" and run["overrides"] == []


def other_weights(pair, tmp_path):
    """The RLVR checkpoint with one weight changed: same names, same sizes, other bytes."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "changed"
    shutil.copytree(pair / "pair/rlvr", copy)
    path = next(copy.glob("*.safetensors"))
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(path), metadata={"format": "pt"})
    return copy


def test_other_weights_are_refused_by_name(pair, first, tmp_path, capsys):
    out = fresh_copy(first, tmp_path)
    other_weights(pair, tmp_path)
    assert start(pair, tmp_path, out, str(pair / "pair/base"), "changed") == 2
    err = capsys.readouterr().err
    assert "other settings (models.rlvr.weights:" in err and "--resume-anyway" in err
    assert (out / "results.json").read_text() == (first / "results.json").read_text()  # untouched


def test_resume_anyway_keeps_the_records_and_records_itself(pair, first, tmp_path, capsys):
    out = fresh_copy(first, tmp_path)
    before = records(out)
    other_weights(pair, tmp_path)
    assert start(pair, tmp_path, out, str(pair / "pair/base"), "changed", "--resume-anyway") == 0
    assert records(out) == before
    run = json.loads((out / "run.json").read_text())
    result = json.loads((out / "results.json").read_text())
    assert run["fingerprint"] == json.loads((first / "run.json").read_text())["fingerprint"]
    assert len(run["overrides"]) == 1 and run["overrides"][0]["differences"][0].startswith("models.rlvr.weights")
    assert result["overrides"] == run["overrides"]
    assert "Resumed with --resume-anyway 1 time(s) despite: models.rlvr.weights" in (out / "results.md").read_text()
    # without the flag the next start is refused again: the override is not a new baseline
    assert start(pair, tmp_path, out, str(pair / "pair/base"), "changed") == 2


def test_report_prints_the_table_without_a_model(first, tmp_path, monkeypatch, capsys):
    out = fresh_copy(first, tmp_path)
    (out / "results.json").unlink()
    (out / "results.md").unlink()
    no_model_loads(monkeypatch)
    capsys.readouterr()
    assert passk_main("--report", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| mode | Pass@1 |" in printed and "Pass@k over 2 of 2 rows" in printed
    a, b = (json.loads((d / "results.json").read_text()) for d in (out, first))
    assert (a["baseline"], a["replay"], a["per_row"]) == (b["baseline"], b["replay"], b["per_row"])


def test_report_of_an_interrupted_run_counts_the_complete_rows(first, tmp_path, monkeypatch, capsys):
    out = fresh_copy(first, tmp_path)
    for path in out.glob("records.rank*.jsonl"):  # the run stopped before row b's replay
        lines = [line for line in path.read_text().splitlines() if not ('"b"' in line and '"replay"' in line)]
        path.write_text("".join(line + "\n" for line in lines))
    no_model_loads(monkeypatch)
    assert passk_main("--report", "--out", str(out)) == 0
    assert "Pass@k over 1 of 2 rows" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["--report", "--out", "o", "--base", "b"], "it takes --out and --k, not --base"),
    (["--report", "--out", "o", "--demo"], "not --demo"),
    (["--report", "--out", "nowhere"], "--out nowhere holds no run.json"),
])
def test_report_refuses_what_it_cannot_use(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    no_model_loads(monkeypatch)
    assert passk_main(*argv) == 2
    assert named in capsys.readouterr().err


def test_an_unreadable_run_json_is_one_line(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{not json")
    assert passk_main("--demo", "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its run.json cannot be read" in err


def test_identity_is_content_not_place_or_time(pair, tmp_path):
    a = checks.checkpoint_identity(str(pair / "pair/rlvr"))
    shutil.copytree(pair / "pair/rlvr", tmp_path / "c")
    for p in (tmp_path / "c").iterdir():
        os.utime(p, ns=(7, 7))
    assert checks.checkpoint_identity(str(tmp_path / "c")) == a
    assert "path" not in a and all(len(w) == 3 and len(w[2]) == 64 for w in a["weights"])
    assert checks.checkpoint_identity(str(other_weights(pair, tmp_path)))["weights"] != a["weights"]


def test_hashes_are_reused_only_while_size_and_mtime_hold(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 10)
    known = {}
    h = checks.file_sha256(str(f), known)
    assert known[str(f)][2] == h
    known[str(f)][2] = "stale"  # a cached hash is used while the file's size and mtime are what they were
    assert checks.file_sha256(str(f), known) == "stale"
    f.write_bytes(b"y" * 10)
    os.utime(f, ns=(5, 5))
    fresh = checks.file_sha256(str(f), known)
    assert fresh not in ("stale", h) and known[str(f)] == [10, 5, fresh]
