"""python/eval_passk.py: two gloo processes under torchrun on the embedded pair
and the 6-row synthetic dataset, the gathered table, and resuming."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PYTHON_DIR

from actreplay_ext import verify

pytest.importorskip("torchvision", reason="the Qwen processors' video processor needs torchvision")

SCRIPT = Path(PYTHON_DIR) / "eval_passk.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, nproc=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    proc = subprocess.run(launcher + [str(SCRIPT), "--demo", "--quiet", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def records(out, rank):
    with open(out / f"records.rank{rank}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("passk")
    return out, run(["--out", str(out)], nproc=2)


def test_two_processes_shard_rows_and_rank0_writes_the_table(two_ranks):
    out, stdout = two_ranks
    assert "| mode | Pass@1 | Pass@4 |" in stdout and "| baseline |" in stdout and "| replay |" in stdout
    r0, r1 = records(out, 0), records(out, 1)
    assert sorted({r["id"] for r in r0}) == ["synthetic-0", "synthetic-2", "synthetic-4"]
    assert sorted({r["id"] for r in r1}) == ["synthetic-1", "synthetic-3", "synthetic-5"]
    assert len(r0) == len(r1) == 6 and all(len(r["correct"]) == 4 for r in r0 + r1)
    replayed = [r for r in r0 + r1 if r["mode"] == "replay"]
    assert all(r["note"] == "" for r in replayed)  # every row had visual tokens, so every row was replayed

    result = json.loads((out / "results.json").read_text())
    assert result["rows"] == 6 and result["n"] == 4 and result["k"] == [1, 4]
    for mode in ("baseline", "replay"):
        counts = [sum(r["correct"]) for r in r0 + r1 if r["mode"] == mode]
        for k in (1, 4):
            expected = sum(verify.pass_at_k(4, c, k) for c in counts) / 6
            assert result[mode][f"pass@{k}"] == pytest.approx(expected)
    assert (out / "results.md").read_text().strip() in stdout


def test_resume_skips_finished_rows_and_redoes_the_rest(two_ranks, tmp_path):
    out, _ = two_ranks
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for rank in (0, 1):
        lines = (out / f"records.rank{rank}.jsonl").read_text().splitlines(keepends=True)
        keep = lines if rank == 0 else lines[:-2]  # as if rank 1 had been stopped one row early
        (resumed / f"records.rank{rank}.jsonl").write_text("".join(keep))
    run(["--out", str(resumed)])  # one process now
    redone = records(resumed, 0)[6:]
    assert [(r["id"], r["mode"]) for r in redone] == [("synthetic-5", "baseline"), ("synthetic-5", "replay")]
    # the same seeds per row: the redone row samples what it sampled the first time
    assert [r["answers"] for r in redone] == [r["answers"] for r in records(out, 1)[-2:]]
    assert json.loads((resumed / "results.json").read_text()) == json.loads((out / "results.json").read_text())

    before = (resumed / "records.rank0.jsonl").read_text()
    run(["--out", str(resumed)])
    assert (resumed / "records.rank0.jsonl").read_text() == before  # nothing left to do


def test_checkpoints_and_a_jsonl_in_one_process(tmp_path):
    """The non-demo path: checkpoints loaded from disk, rows from a JSONL file,
    an explicit verifier and k."""
    from PIL import Image

    from actreplay_ext import tiny

    base, rlvr = tiny.save_pair(str(tmp_path / "ckpt"))
    Image.new("RGB", (56, 84), (200, 30, 30)).save(tmp_path / "red.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "question": "what is 2 + 2 ?", "image": "red.png", "answer": "4"},
        {"id": "b", "question": "which option ?", "image": "red.png", "choices": ["1", "2"], "answer": "A"},
    ]) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--base", base, "--rlvr", rlvr, "--data", str(rows),
                           "--out", str(out), "--n", "3", "--k", "1", "2", "--max-new-tokens", "4",
                           "--layers", "3", "--lr", "0.005", "--steps", "3", "--dtype", "float32", "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["rows"] == 2 and result["k"] == [1, 2] and set(result["per_row"]) == {"a", "b"}
    assert "| mode | Pass@1 | Pass@2 |" in proc.stdout
