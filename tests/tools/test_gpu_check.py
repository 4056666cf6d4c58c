"""benchmarks/gpu_check.sh, the GPU gate, cannot rot: its --dry-run walks every
step on the CPU (device parts skipped), writes the files the device run writes
and ends with the table; a crash in one test file is reported as such without
hiding the others; a step that does not fit the time budget fails the gate."""

import json
import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = ["device and tools", "build", "CUDA tests", "smoke benchmark", "replay at 1024", "replay at 4096",
         "summary", "done"]
ROWS = ["build", "CUDA tests", "memcheck_shapes", "memcheck_replay_step", "racecheck_every_kernel",
        "smoke benchmark", "replay 1024", "replay 4096"]


def run(tmp_path, **env):
    out_dir = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out_dir), "PYTHON": sys.executable, "TMPDIR": str(tmp_path), **env}
    environment.pop("PYTHONPATH", None)
    return subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=900)


def table(log):
    """{step: (status, detail)} from the summary table."""
    lines = log.split("=== summary", 1)[1].splitlines()[2:]
    rows = {}
    for line in lines:
        for name in ROWS:
            if line.startswith(name + " "):
                status, _, detail = line[len(name):].strip().partition(" ")
                rows[name] = (status, detail.strip())
    return rows


def test_the_dry_run_walks_every_step_and_ends_with_the_table(tmp_path):
    out = run(tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    log = out.stdout
    headers = [line for line in log.splitlines() if line.startswith("=== ")]
    positions = [next((i for i, h in enumerate(headers) if step in h), -1) for step in STEPS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (positions, headers)
    rows = table(log)
    assert sorted(rows) == sorted(ROWS) and all(s == "pass" for s, _ in rows.values()), rows
    assert "=== done (status 0" in log
    out_dir = tmp_path / "out"
    files = sorted(os.listdir(out_dir))
    assert files == sorted(["gpu_check.log", "tests.log", "sanitizer.log", "smoke.json", "bench_replay_1024.json",
                            "bench_replay_4096.json"]), files
    # every operator on every tail shape (a shadowed name once skipped all but the first), and the replay step
    sanitizer = (out_dir / "sanitizer.log").read_text()
    assert sanitizer.count("shapes: 0 mismatches") == 2 and "replay step: selected" in sanitizer
    for V in (2049, 4097):
        for N in (1, 5):
            assert f"topk_kl/topk_logp V={V} N={N} ok" in sanitizer
            assert f"lens_entropy V={V} N={N} topk={V} ok" in sanitizer
    assert "##### tests_ops_test_ops_edges.py.log" in (out_dir / "tests.log").read_text()
    smoke = json.load(open(out_dir / "smoke.json"))
    assert [r["op"] for r in smoke["rows"]] == ["lens_entropy", "lens_entropy", "topk_kl", "topk_kl_recompute",
                                                "topk_kl_logq_vs_recompute", "spot_check"]
    assert smoke["rows"][4]["grads_equal"] is True
    assert smoke["rows"][-1]["topk_index_agreement"] == 1.0
    for n in (1024, 4096):
        replay = json.load(open(out_dir / f"bench_replay_{n}.json"))
        assert len(replay["rows"]) == 1 and replay["rows"][0]["ours_seconds"] > 0
        assert "published_seconds" in replay["rows"][0]
        assert "ours/floor" in rows[f"replay {n}"][1] and "speedup" in rows[f"replay {n}"][1]
    assert (out_dir / "gpu_check.log").read_text().strip().endswith(log.strip().splitlines()[-1])


def test_a_crash_in_one_test_file_is_reported_and_hides_nothing(tmp_path):
    crash = tmp_path / "test_crash_here.py"
    crash.write_text("import os, signal\n\ndef test_cuda_crashes():\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    fine = tmp_path / "test_fine_here.py"
    fine.write_text("def test_cuda_one():\n    assert True\n\ndef test_cuda_two():\n    assert True\n")
    failing = tmp_path / "test_fails_here.py"
    failing.write_text("def test_cuda_fails():\n    assert 1 == 2\n")
    out = run(tmp_path, GPU_CHECK_FILES=f"{crash} {fine} {failing}", BUDGET="120")
    assert out.returncode != 0
    status, detail = table(out.stdout)["CUDA tests"]
    assert status == "CRASH", detail
    assert "2 passed, 1 failed, 1 files crashed" in detail
    assert f"{crash}:CRASH" in detail and f"{failing}:FAIL" in detail and str(fine) not in detail
    assert "=== done (status 1" in out.stdout


def test_steps_that_do_not_fit_the_budget_are_skipped_and_fail_the_gate(tmp_path):
    out = run(tmp_path, BUDGET="10")
    assert out.returncode != 0, out.stdout[-3000:]
    rows = table(out.stdout)
    assert sum(s == "SKIPPED" for s, _ in rows.values()) >= 6, rows
    assert "=== done (status 1" in out.stdout
