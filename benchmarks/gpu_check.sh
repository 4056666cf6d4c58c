#!/usr/bin/env bash
# The one device call (DEVELOPERS.md): build against the device's own torch,
# run the CUDA tests, a compute-sanitizer pass (memcheck + racecheck on small
# shapes), and the GPU benchmarks. Logs and JSON go to $OUT. Sized for < 8 min
# on one H100/H200:  run with timeout_s ~ 540, command `bash benchmarks/gpu_check.sh`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
# At most 8 files come back from $OUT: everything printed goes to one log;
# besides it, build.log, the two sanitizer logs and three JSON files.
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

step "build (sm_90, --no-build-isolation --no-deps)"
if ! FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
# Import the installed package, not the source tree.
(cd "$OUT" && $PY -c "import actreplay_ext as a; print(a.build_info())")

step "CUDA operator tests"
# -P: do not put the source tree on sys.path, so the installed build is tested.
timeout 240 $PY -P -m pytest -q -p no:cacheprovider tests/ops -k cuda -x 2>&1 | tail -40 || status=1

step "GPU placement (base/RLVR on different devices, device_map=auto)"
timeout 120 $PY -P -m pytest -q -p no:cacheprovider tests/core/test_placement.py 2>&1 | tail -20 || status=1

step "compute-sanitizer (small shapes)"
SMALL='cuda and (N7-V1000 or N1-V5 or ties or all_negative or topk_kl_gradcheck or replay_scatter_gradcheck or select_tokens_rules or M7-V1000 or T50-M17)'
for tool in memcheck racecheck; do
  timeout 150 compute-sanitizer --tool $tool --error-exitcode 99 $PY -P -m pytest -q -p no:cacheprovider \
    tests/ops/test_ops.py -k "$SMALL" > "$OUT/sanitizer_$tool.log" 2>&1
  rc=$?; echo "$tool exit $rc"; tail -4 "$OUT/sanitizer_$tool.log"
  [ $rc -eq 0 ] || status=1
done

step "operator benchmark"
timeout 150 $PY benchmarks/bench_ops.py --device cuda --quick --repeats 5 --out "$OUT/bench_ops_cuda.json" \
  2>&1 | tail -30 || status=1

step "replay benchmark"
timeout 200 $PY benchmarks/bench_replay.py --device cuda --visual 1024 4096 --out "$OUT/bench_replay_cuda.json" \
  2>&1 | tail -12 || status=1

step "replay at 16,384 visual tokens (ours and the floor: peak memory vs visual tokens)"
timeout 150 $PY benchmarks/bench_replay.py --device cuda --visual 16384 --skip-published \
  --out "$OUT/bench_replay_cuda_16k.json" 2>&1 | tail -6 || status=1

step "done (status $status)"
exit $status
