"""`actreplay passk`: two gloo processes under torchrun (`-m actreplay_ext
passk`, every documented option), the gathered table with bootstrap
intervals and provenance, resuming, and refusing to mix runs."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from actreplay_ext.tools import data, passk, verify

pytest.importorskip("torchvision", reason="the Qwen processors' video processor needs torchvision")

# PYTHONSAFEPATH: `python -m actreplay_ext` (and torchrun's workers) import the installed
# package, not the source tree in the working directory, which has no compiled _C in CI.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONSAFEPATH": "1"}
DEMO = ["--demo", "--quiet", "--samples", "4"]


def launch(args, nproc=None, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    proc = subprocess.run(launcher + ["-m", "actreplay_ext", "passk", *args], env=ENV, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def records(out, rank):
    with open(out / f"records.rank{rank}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("passk")
    return out, launch([*DEMO, "--out", str(out), "--k", "1", "2", "4", "--temperature", "1.0", "--top-p", "0.95",
                        "--max-new-tokens", "6", "--seed", "3", "--verifier", "auto"], nproc=2).stdout


def test_two_processes_shard_rows_and_rank0_writes_the_table(two_ranks):
    out, stdout = two_ranks
    assert "| mode | Pass@1 | Pass@2 | Pass@4 |" in stdout and "| replay - baseline |" in stdout
    r0, r1 = records(out, 0), records(out, 1)
    assert sorted({r["id"] for r in r0}) == ["synthetic-0", "synthetic-2", "synthetic-4"]
    assert sorted({r["id"] for r in r1}) == ["synthetic-1", "synthetic-3", "synthetic-5"]
    assert len(r0) == len(r1) == 6 and all(len(r["correct"]) == 4 for r in r0 + r1)
    assert all(r["note"] == "" for r in r0 + r1 if r["mode"] == "replay")  # every row had visual tokens

    result = json.loads((out / "results.json").read_text())
    assert result["rows"] == 6 and result["samples"] == 4 and result["k"] == [1, 2, 4] and result["world_size"] == 2
    for mode in ("baseline", "replay"):
        counts = [sum(r["correct"]) for r in r0 + r1 if r["mode"] == mode]
        for k in (1, 2, 4):
            expected = sum(verify.pass_at_k(4, c, k) for c in counts) / 6
            assert result[mode][f"pass@{k}"] == pytest.approx(expected)
            lo, hi = result["ci95"][mode][f"pass@{k}"]
            assert lo <= expected + 1e-12 and expected <= hi + 1e-12
    assert (out / "results.md").read_text().strip() in stdout


def test_results_record_how_they_were_made(two_ranks):
    out, _ = two_ranks
    result = json.loads((out / "results.json").read_text())
    settings = result["settings"]
    assert settings["sampling"] == {"samples": 4, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 6,
                                    "verifier": "auto"}
    assert settings["seed"] == 3 and settings["replay"]["layers"] == 3 and settings["replay"]["lr"] == 0.005
    assert settings["load"]["dtype"] == "float32" and "demo" in settings["models"]
    versions = result["versions"]
    assert versions["torch"] == torch.__version__ and versions["actreplay_ext"] and versions["transformers"]
    assert set(result["timings"]) >= {"load_s", "total_s", "sampling_s"} and result["timings"]["total_s"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"] == settings and run["fingerprint"] == result["fingerprint"]
    assert all(r["run"] == run["fingerprint"] for r in records(out, 0) + records(out, 1))


def test_resume_skips_finished_rows_and_redoes_the_rest(two_ranks, tmp_path):
    out, _ = two_ranks
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "run.json").write_text((out / "run.json").read_text())
    for rank in (0, 1):
        lines = (out / f"records.rank{rank}.jsonl").read_text().splitlines(keepends=True)
        keep = lines if rank == 0 else lines[:-2]  # as if rank 1 had been stopped one row early
        (resumed / f"records.rank{rank}.jsonl").write_text("".join(keep) + ('{"torn' if rank else ""))
    same = ["--out", str(resumed), "--k", "1", "2", "4", "--top-p", "0.95", "--max-new-tokens", "6", "--seed", "3"]
    launch([*DEMO, *same])  # one process now
    redone = records(resumed, 0)[6:]
    assert [(r["id"], r["mode"]) for r in redone] == [("synthetic-5", "baseline"), ("synthetic-5", "replay")]
    # the same seed per row on any rank: the redone row samples what it sampled the first time
    assert [r["answers"] for r in redone] == [r["answers"] for r in records(out, 1)[-2:]]
    a, b = (json.loads((d / "results.json").read_text()) for d in (resumed, out))
    for key in ("rows", "baseline", "replay", "ci95", "difference", "per_row", "fingerprint"):
        assert a[key] == b[key], key

    before = (resumed / "records.rank0.jsonl").read_text()
    launch([*DEMO, *same])
    assert (resumed / "records.rank0.jsonl").read_text() == before  # nothing left to do


def test_an_older_versions_run_resumes_when_its_settings_agree(two_ranks, tmp_path):
    """A run.json from before optimizer/tol/compile were recorded (its
    fingerprint over fewer fields) is the same run at those fields' defaults: it
    resumes, keeps its fingerprint and redoes nothing; with another lr it refuses."""
    out, _ = two_ranks
    old = tmp_path / "old"
    old.mkdir()
    run = json.loads((out / "run.json").read_text())
    for field in ("optimizer", "tol", "compile"):
        del run["settings"]["replay"][field]
    run["fingerprint"] = passk.fingerprint(run["settings"])
    (old / "run.json").write_text(json.dumps(run))
    for rank in (0, 1):
        lines = [json.loads(line) for line in (out / f"records.rank{rank}.jsonl").read_text().splitlines()]
        (old / f"records.rank{rank}.jsonl").write_text("".join(json.dumps({**r, "run": run["fingerprint"]}) + "\n"
                                                               for r in lines))
    before = [(old / f"records.rank{rank}.jsonl").read_text() for rank in (0, 1)]
    flat = [x for k, v in FIRST_RUN.items() for x in [k, *v]]
    launch(["--demo", "--quiet", "--out", str(old), *flat])
    assert [(old / f"records.rank{rank}.jsonl").read_text() for rank in (0, 1)] == before  # nothing redone
    a, b = (json.loads((d / "results.json").read_text()) for d in (old, out))
    assert a["fingerprint"] == run["fingerprint"] and a["replay"] == b["replay"] and a["baseline"] == b["baseline"]
    proc = launch(["--demo", "--quiet", "--out", str(old), *flat, "--lr", "0.01"], check=False)
    assert proc.returncode == 2 and "replay.lr: 0.005 there, 0.01 now" in proc.stderr


FIRST_RUN = {"--samples": ["4"], "--k": ["1", "2", "4"], "--top-p": ["0.95"], "--max-new-tokens": ["6"],
             "--seed": ["3"]}


@pytest.mark.parametrize("change, named", [
    ({"--samples": ["2"], "--k": ["1", "2"]}, "sampling.samples: 4 there, 2 now"),
    ({"--seed": ["4"]}, "seed: 3 there, 4 now"),
    ({"--top-p": ["0.9"]}, "sampling.top_p: 0.95 there, 0.9 now"),
    ({"--optimizer": ["lbfgs"]}, 'replay.optimizer: "sgd" there, "lbfgs" now'),
])
def test_a_resume_with_other_settings_refuses_and_names_them(two_ranks, tmp_path, change, named):
    """An --out holding another run's records is never mixed into this run's numbers."""
    out, _ = two_ranks
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("run.json", "records.rank0.jsonl", "records.rank1.jsonl"):
        (copy / name).write_text((out / name).read_text())
    flat = [x for k, v in {**FIRST_RUN, **change}.items() for x in [k, *v]]
    proc = launch(["--demo", "--quiet", "--out", str(copy), *flat], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert named in proc.stderr and "give another --out" in proc.stderr
    assert not (copy / "results.json").exists()


def test_records_of_another_run_are_refused(tmp_path):
    rec = {"run": "0123", "id": "synthetic-0", "mode": "baseline", "correct": [True], "answers": ["1"]}
    (tmp_path / "records.rank0.jsonl").write_text(json.dumps(rec) + "\n")
    proc = launch(["--demo", "--quiet", "--out", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "records without a run.json" in proc.stderr


def test_bootstrap_interval_brackets_the_mean_and_pairs_the_difference():
    values = torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.75, 0.5])
    lo, hi = passk.bootstrap(values)
    assert lo < float(values.mean()) < hi and 0 <= lo and hi <= 1
    assert passk.bootstrap(torch.full((5,), 0.4)) == pytest.approx([0.4, 0.4])  # no spread, no interval
    recs = [{"id": str(i), "mode": m, "correct": [True, bool(i % 2)] if m == "replay" else [bool(i % 2), False]}
            for i in range(8) for m in passk.MODES]
    s = passk.summarise(recs, [str(i) for i in range(8)], [1], 2)
    # replay is better by exactly 0.5 on every row: the paired difference has no spread
    assert s["difference"]["pass@1"]["mean"] == pytest.approx(0.5)
    assert s["difference"]["pass@1"]["ci95"] == pytest.approx([0.5, 0.5])
    assert s["ci95"]["baseline"]["pass@1"][0] < s["ci95"]["baseline"]["pass@1"][1]  # the modes alone do spread


def test_row_seed_and_hash_depend_on_the_row_not_its_position(tmp_path):
    assert passk.row_seed(0, "a") == passk.row_seed(0, "a") != passk.row_seed(1, "a") != passk.row_seed(0, "b")
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "x.png")
    row = data.Row(id="a", question="q", images=[str(tmp_path / "x.png")], answer="1")
    h = passk.row_hash(row)
    Image.new("RGB", (8, 8), (1, 2, 4)).save(tmp_path / "x.png")  # the same path, other pixels
    assert passk.row_hash(row) != h
    assert passk.row_hash(data.Row(id="a", question="q", images=[str(tmp_path / "x.png")], answer="2")) != \
        passk.row_hash(row)


@pytest.fixture(scope="module")
def checkpoint_rows(tmp_path_factory):
    from PIL import Image

    from actreplay_ext import tiny

    root = tmp_path_factory.mktemp("passk_ckpt")
    base, rlvr = tiny.save_pair(str(root / "ckpt"))
    rng = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(56, 84, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(root / "noise.png")
    rows = root / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a/1", "question": "what is 2 + 2 ?", "image": "noise.png", "answer": "4", "source": "kept"},
        {"id": "b", "question": "which option ?", "image": "noise.png", "choices": ["1", "2"], "answer": "A"},
    ]) + "\n")
    return base, rlvr, rows


def test_checkpoints_and_a_jsonl_saving_each_rows_offsets(checkpoint_rows, tmp_path):
    """The non-demo path: checkpoints from disk, rows from a JSONL file, and
    --save-offsets writing one ReplayResult file per row, like the authors' code."""
    import actreplay_ext as ar

    base, rlvr, rows = checkpoint_rows
    out, offsets = tmp_path / "out", tmp_path / "offsets"
    proc = launch(["--base", base, "--rlvr", rlvr, "--data", str(rows), "--out", str(out), "--samples", "3",
                   "--k", "1", "2", "--max-new-tokens", "4", "--layers", "3", "--lr", "0.005", "--steps", "3",
                   "--dtype", "float32", "--save-offsets", str(offsets), "--quiet"])
    result = json.loads((out / "results.json").read_text())
    assert result["rows"] == 2 and result["k"] == [1, 2] and set(result["per_row"]) == {"a/1", "b"}
    assert "| mode | Pass@1 | Pass@2 |" in proc.stdout
    models = result["settings"]["models"]
    assert result["checkpoints"]["base"]["path"] == base and len(models["rlvr"]["config_sha256"]) == 64
    assert sorted(os.listdir(offsets)) == ["a%2F1.safetensors", "b.safetensors"]
    saved = ar.ReplayResult.load(str(offsets / "b.safetensors"))
    assert len(saved.losses) == 3 and saved.config["layers"] == 3


def test_a_changed_row_is_refused_on_resume(checkpoint_rows, tmp_path):
    base, rlvr, rows = checkpoint_rows
    common = ["--base", base, "--rlvr", rlvr, "--out", str(tmp_path / "out"), "--samples", "1", "--max-new-tokens",
              "2", "--layers", "3", "--steps", "1", "--dtype", "float32", "--quiet"]
    launch(["--data", str(rows), *common])
    changed = tmp_path / "rows.jsonl"
    lines = rows.read_text().splitlines()
    changed.write_text(lines[0].replace('"answer": "4"', '"answer": "5"').replace("noise.png", str(rows.parent /
                                                                                                  "noise.png")) + "\n")
    proc = launch(["--data", str(changed), *common], check=False)
    assert proc.returncode == 2 and "row 'a/1' changed since its records" in proc.stderr


def test_the_demo_takes_the_replay_options_instead_of_ignoring_them(tmp_path):
    def cfg_of(*argv):
        p = argparse.ArgumentParser()
        passk.add_arguments(p)
        return passk.validate(p.parse_args(["--demo", "--out", str(tmp_path), *argv]))[1]

    assert (cfg_of().layers, cfg_of().lr, cfg_of().steps) == (3, 0.005, 5)  # the tiny model's defaults
    cfg = cfg_of("--lr", "0.01", "--steps", "2", "--layers", "0,2", "--tol", "0.5")
    assert (cfg.lr, cfg.steps, cfg.layers, cfg.tol) == (0.01, 2, (0, 2), 0.5)
    assert cfg_of("--optimizer", "lbfgs").step_size == 0.05  # the default's lr is sgd's
    with pytest.raises(SystemExit):  # a count's type refuses it (tests/tools/test_options.py)
        cfg_of("--steps", "0")
    with pytest.raises(passk.UsageError, match="--preset deepeyes-7b: --demo replays its tiny pair with its own"):
        cfg_of("--preset", "deepeyes-7b")  # once ignored silently
    with pytest.raises(passk.UsageError, match=r"--tol -1.0: ReplayConfig: 'tol' must be >= 0"):
        cfg_of("--tol", "-1")  # the option as given, not a dict
    with pytest.raises(ValueError, match=r"config.layers = 9 exceeds the 4 decoder layers"):
        cfg_of("--layers", "9")  # before the tiny pair is built, not after the run starts


def test_ids_that_once_shared_a_file_name_get_their_own_offsets_files(checkpoint_rows, tmp_path):
    """'q/1' and 'q_1' were both saved as q_1.safetensors, the second over the
    first; every id now has its own file, holding its own row's offsets."""
    import actreplay_ext as ar
    from actreplay_ext.tools import cli, provenance
    base, rlvr, rows = checkpoint_rows
    image = str(rows.parent / "noise.png")
    mine = tmp_path / "rows.jsonl"
    questions = {"q/1": "what is 2 + 2 ?", "q_1": "what is 3 + 3 ?"}
    mine.write_text("".join(json.dumps({"id": i, "question": q, "image": image, "answer": "4"}) + "\n"
                            for i, q in questions.items()))
    offsets = tmp_path / "offsets"
    assert cli.main(["--quiet", "passk", "--base", base, "--rlvr", rlvr, "--data", str(mine), "--out",
                     str(tmp_path / "out"), "--samples", "1", "--max-new-tokens", "2", "--layers", "3", "--steps", "1",
                     "--dtype", "float32", "--save-offsets", str(offsets)]) == 0
    assert sorted(os.listdir(offsets)) == ["q%2F1.safetensors", "q_1.safetensors"]
    processor = data.load_processor(rlvr)
    for row in data.read_jsonl(str(mine)):
        saved = ar.ReplayResult.load(str(offsets / (provenance.file_name(row.id) + ".safetensors")))
        assert torch.equal(saved.input_ids, data.encode(processor, row)["input_ids"]), row.id


def test_file_names_of_ids_are_one_to_one():
    from actreplay_ext.tools.provenance import file_name

    ids = ["q/1", "q_1", "q%2F1", "q 1", "q:1", ".q", "%2Eq", "q", "..", "", "%", "题目/1", "题目_1", "a\\b"]
    names = [file_name(i) for i in ids]
    assert len(set(names)) == len(ids), dict(zip(ids, names))
    assert all(n and "/" not in n and not n.startswith(".") for n in names)
    assert file_name("q_1") == "q_1" and file_name("题目_1") == "题目_1"  # a name that was safe stays as it was


def test_an_offsets_file_name_too_long_for_the_file_system_is_refused_before_sampling(checkpoint_rows, tmp_path):
    base, rlvr, rows = checkpoint_rows
    mine = tmp_path / "rows.jsonl"
    mine.write_text(json.dumps({"id": "/" * 100, "question": "q", "image": str(rows.parent / "noise.png"),
                                "answer": "1"}) + "\n")
    p = argparse.ArgumentParser()
    passk.add_arguments(p)
    args = p.parse_args(["--base", base, "--rlvr", rlvr, "--data", str(mine), "--out", str(tmp_path / "o"),
                         "--layers", "3", "--save-offsets", str(tmp_path / "s")])
    with pytest.raises(passk.UsageError, match=r"--save-offsets: row '/{100}' makes a file name of 312 bytes"):
        passk.validate(args)
