"""benchmarks/gpu_check.sh cannot rot: its --dry-run walks every step on the CPU
(device parts skipped), writes the JSON the device run writes, and its time
budget skips what would not fit instead of running past the device call."""

import json
import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STEPS = ["device and tools", "build", "smoke benchmark", "CUDA tests", "memcheck", "racecheck",
         "replay at 1024 visual tokens", "GPU placement tests", "replay at 4096", "16,384 visual tokens", "done"]


def run(tmp_path, **env):
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, **env}
    environment.pop("PYTHONPATH", None)
    return subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=600)


def test_the_dry_run_walks_every_step_and_writes_the_json(tmp_path):
    out = run(tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    log = out.stdout
    headers = [line for line in log.splitlines() if line.startswith("=== ")]
    positions = [next((i for i, h in enumerate(headers) if step in h), -1) for step in STEPS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), (positions, headers)
    assert "FAILED" not in log and "SKIPPED" not in log
    assert log.count("dry run: skipped (device only)") >= 5
    assert "shapes: 0 mismatches" in log
    # every operator on every tail shape (a shadowed name once skipped all but the first)
    for V in (2049, 4097):
        for N in (1, 5):
            assert f"topk_kl/topk_logp V={V} N={N} ok" in log
            assert f"lens_entropy V={V} N={N} topk={V} ok" in log
    smoke = json.load(open(tmp_path / "smoke.json"))
    assert [r["op"] for r in smoke["rows"]] == ["lens_entropy", "lens_entropy", "topk_kl", "topk_kl_recompute",
                                                "topk_kl_logq_vs_recompute", "spot_check"]
    assert smoke["rows"][4]["grads_equal"] is True
    assert smoke["rows"][-1]["topk_index_agreement"] == 1.0
    replay = json.load(open(tmp_path / "bench_replay_1024.json"))
    assert len(replay["rows"]) == 1 and replay["rows"][0]["ours_seconds"] > 0
    assert open(tmp_path / "gpu_check.log").read().strip().endswith(log.strip().splitlines()[-1])


def test_steps_that_do_not_fit_the_budget_are_skipped(tmp_path):
    out = run(tmp_path, BUDGET="10")
    assert out.returncode == 0, out.stdout[-3000:]
    assert out.stdout.count("SKIPPED (only") >= 4
    assert "=== done (status 0" in out.stdout
