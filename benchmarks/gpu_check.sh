#!/usr/bin/env bash
# The one device call (DEVELOPERS.md), sized for one `run` with timeout_s ~ 540:
#     bash benchmarks/gpu_check.sh            # on the GPU machine; logs and JSON in $OUT
#     bash benchmarks/gpu_check.sh --dry-run  # on a CPU: every step, the device parts skipped (CI runs this)
# Most valuable first, each step under its own limit and all of them under
# BUDGET seconds (a step that would not fit says SKIPPED); every line is flushed
# as it is printed and every benchmark rewrites its JSON after each row, so a
# cut-off run still returns what it measured. At most 8 files come back from
# $OUT: gpu_check.log, build.log, smoke.json, sanitizer_memcheck.log,
# sanitizer_racecheck.log and three bench_replay_*.json.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-520}
status=0
SECONDS=0

left() { echo $((BUDGET - SECONDS)); }
step() { echo; echo "=== $* ($(date +%T), $(left) s left)"; }
# limited LIMIT CMD...: CMD under min(LIMIT, what is left); SKIPPED when under 15 s are left.
limited() {
  local limit=$1 l
  shift
  l=$(left)
  [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 15 ]; then echo "SKIPPED (only $l s left)"; return 0; fi
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then echo "FAILED (exit $rc)"; status=1; fi
  return 0
}
device_only() { if [ $DRY -eq 1 ]; then echo "dry run: skipped (device only): $*"; return 1; fi; return 0; }
dev() { [ $DRY -eq 1 ] && echo cpu || echo cuda; }
dry() { [ $DRY -eq 1 ] && echo --dry-run; }

step "device and tools (nothing is installed)"
if device_only "nvidia-smi"; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
for tool in ninja nvcc compute-sanitizer; do
  if command -v $tool > /dev/null; then echo "$tool: $($tool --version 2>&1 | tail -1)"; else echo "$tool: not found"; fi
done
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

step "build (sm_90 only, MAX_JOBS=$MAX_JOBS)"
if device_only "build; the installed package is used"; then
  limited 240 env FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1
  if [ $status -ne 0 ]; then tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; fi
fi
# Import the installed package, not the source tree.
(cd "$OUT" && $PY -c "import actreplay_ext as a; print(a.build_info())")

step "smoke benchmark: lens_entropy vs the bare GEMM (N = 1024/4096/16384), topk_kl forward/backward, spot check"
limited 90 $PY -P benchmarks/gpu_smoke.py bench $(dry) --out "$OUT/smoke.json"

step "CUDA tests (all of them, no -x)"
limited 120 $PY -P -m pytest -q -p no:cacheprovider -rfE --durations=10 tests/ops tests/core tests/hooks -k cuda

step "memcheck on the tail shapes (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
if device_only "compute-sanitizer --tool memcheck"; then
  limited 70 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
    $PY -P benchmarks/gpu_smoke.py shapes > "$OUT/sanitizer_memcheck.log" 2>&1
  tail -5 "$OUT/sanitizer_memcheck.log"
else
  limited 60 $PY -P benchmarks/gpu_smoke.py shapes --dry-run
fi

step "racecheck on lens_entropy"
if device_only "compute-sanitizer --tool racecheck"; then
  limited 60 compute-sanitizer --tool racecheck --error-exitcode 99 \
    $PY -P benchmarks/gpu_smoke.py shapes --only lens_entropy > "$OUT/sanitizer_racecheck.log" 2>&1
  tail -5 "$OUT/sanitizer_racecheck.log"
fi

step "replay at 1024 visual tokens (ours, the published loop, the floor)"
if [ $DRY -eq 1 ]; then
  limited 90 $PY -P benchmarks/bench_replay.py --device cpu --visual 64 --steps 2 --skip-published \
    --out "$OUT/bench_replay_1024.json"
else
  limited 90 $PY -P benchmarks/bench_replay.py --device cuda --visual 1024 --out "$OUT/bench_replay_1024.json"
fi

step "if time remains: GPU placement tests"
limited 60 $PY -P -m pytest -q -p no:cacheprovider tests/core/test_placement.py

step "if time remains: replay at 4096 visual tokens"
if device_only "bench_replay --visual 4096"; then
  limited 120 $PY -P benchmarks/bench_replay.py --device cuda --visual 4096 --out "$OUT/bench_replay_4096.json"
fi

step "if time remains: 16,384 visual tokens (ours and the floor)"
if device_only "bench_replay --visual 16384"; then
  limited 120 $PY -P benchmarks/bench_replay.py --device cuda --visual 16384 --skip-published \
    --out "$OUT/bench_replay_16k.json"
fi

step "done (status $status, $SECONDS s)"
exit $status
