#!/usr/bin/env bash
# The GPU gate: one device call (DEVELOPERS.md), sized for a `run` with timeout_s ~ 560.
#     bash benchmarks/gpu_check.sh            # on the GPU machine; logs and JSON in $OUT
#     bash benchmarks/gpu_check.sh --dry-run  # on a CPU: every step, the device parts skipped (CI runs this)
# Steps, most valuable first, each under its own limit and all under BUDGET seconds
# (a step that would not fit is SKIPPED, which fails the gate):
#   build; then side by side, each in processes of its own so that a crash ends
#   one piece and never hides the rest: the CUDA tests (one pytest process per
#   file, the bad-input tests spawn a child per operator), compute-sanitizer
#   memcheck on the tail shapes and on one replay step of a small model,
#   racecheck on every kernel; then, alone for clean timings: gpu_smoke's
#   benchmark and bench_replay at 1024 and 4096 visual tokens (ours, the
#   published loop, the floor). It ends with one table (each step: pass, FAIL,
#   CRASH, TIMEOUT or SKIPPED, and its headline numbers) and exits non-zero if any
#   step did not pass. What comes back from $OUT (at most 8 files): gpu_check.log,
#   build.log, tests.log, sanitizer.log, smoke.json, bench_replay_1024.json,
#   bench_replay_4096.json.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONSAFEPATH=1  # every python here imports the installed package, never the source tree
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-520}
SECONDS=0
: > "$WORK/summary.tsv"

left() { echo $((BUDGET - SECONDS)); }
step() { echo; echo "=== $* ($(date +%T), $(left) s left)"; }
# record NAME STATUS DETAIL: one row of the final table
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$WORK/summary.tsv"; echo "--> $1: $2 $3"; }
# status_of RC LOG: pass / FAIL / CRASH / TIMEOUT from an exit code and its log
status_of() {
  local rc=$1 log=${2:-/dev/null}
  if [ "$rc" -eq 124 ]; then echo TIMEOUT
  elif [ "$rc" -ge 128 ] || grep -qE "Fatal Python error|Segmentation fault|core dumped" "$log" 2>/dev/null; then echo CRASH
  elif [ "$rc" -eq 0 ]; then echo pass
  else echo FAIL; fi
}
# limit L: min(L, what is left), or 0 when under 15 s are left
limit() { local l; l=$(left); [ "$l" -lt "$1" ] && echo $((l < 15 ? 0 : l)) || echo "$1"; }
dev() { [ $DRY -eq 1 ] && echo cpu || echo cuda; }
dry() { [ $DRY -eq 1 ] && echo --dry-run; }

step "device and tools (nothing is installed)"
if [ $DRY -eq 0 ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
for tool in ninja nvcc compute-sanitizer "${CXX:-g++}"; do
  if command -v "$tool" > /dev/null; then echo "$tool: $("$tool" --version 2>&1 | grep -m1 -v '^$')"; else echo "$tool: not found"; fi
done
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

step "build (sm_90 only, MAX_JOBS=$MAX_JOBS)"
if [ $DRY -eq 1 ]; then
  echo "dry run: skipped (device only): the build; the installed package is used"
  record build pass "dry run: the installed package"
else
  l=$(limit 200)
  timeout "$l" env FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1
  rc=$?
  s=$(status_of $rc "$OUT/build.log")
  record build "$s" "$SECONDS s"
  if [ "$s" != pass ]; then tail -40 "$OUT/build.log"; fi
fi
(cd "$WORK" && $PY -c "import actreplay_ext as a; print(a.build_info())") || record import FAIL "actreplay_ext does not import"

# ---------------------------------------------------------------- side by side
step "CUDA tests (a pytest process per file), memcheck (tail shapes, one replay step), racecheck (every kernel)"
mkdir -p "$WORK/tests"
if [ -n "${GPU_CHECK_FILES:-}" ]; then
  FILES=$GPU_CHECK_FILES
elif [ $DRY -eq 1 ]; then
  FILES="tests/ops/test_ops_edges.py tests/core/test_placement.py"  # the machinery, on two files
else
  FILES=$(ls tests/ops/test_*.py tests/core/test_*.py tests/hooks/test_*.py)
fi
L_TESTS=$(limit 200)
if [ "$L_TESTS" -eq 0 ]; then
  for name in "CUDA tests" memcheck_shapes memcheck_replay_step racecheck_every_kernel; do record "$name" SKIPPED budget; done
else
# run_tests FILE: its CUDA tests, faulthandler on; "FILE RC" on stdout
run_tests() {
  local f=$1 log="$WORK/tests/$(echo "$1" | tr / _).log"
  timeout "$L_TESTS" $PY -X faulthandler -m pytest -q -p no:cacheprovider -rfE "$f" -k cuda > "$log" 2>&1
  echo "$f $?"
}
export -f run_tests
export WORK PY L_TESTS
(printf '%s\n' $FILES | xargs -P 4 -I{} bash -c 'run_tests {}' > "$WORK/tests.rc") &
TESTS_PID=$!

SAN="$WORK/san"
mkdir -p "$SAN"
# sanitize NAME TOOL LIMIT ARGS...: compute-sanitizer (the plain script in a dry run); rc in $SAN/NAME.rc
sanitize() {
  local name=$1 tool=$2 l=$3
  shift 3
  if [ $DRY -eq 1 ]; then
    timeout "$l" $PY benchmarks/gpu_smoke.py "$@" --dry-run > "$SAN/$name.log" 2>&1
  else
    timeout "$l" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 99 \
      $PY benchmarks/gpu_smoke.py "$@" > "$SAN/$name.log" 2>&1
  fi
  echo $? > "$SAN/$name.rc"
}
L_SAN=$(limit 200)
sanitize memcheck_shapes memcheck "$L_SAN" shapes &
P1=$!
sanitize memcheck_replay_step memcheck "$L_SAN" replay-step &
P2=$!
sanitize racecheck_every_kernel racecheck "$L_SAN" shapes &
P3=$!
wait $TESTS_PID $P1 $P2 $P3

# The tests' table: a file passes with exit 0, or 5 when it holds no CUDA test.
passed=0 failed=0 crashed=0 bad_files=""
while read -r f rc; do
  log="$WORK/tests/$(echo "$f" | tr / _).log"
  n_pass=$(grep -oE "[0-9]+ passed" "$log" | tail -1 | grep -oE "[0-9]+" || true)
  n_fail=$(grep -oE "[0-9]+ (failed|errors?)" "$log" | awk '{s += $1} END {print s + 0}')
  passed=$((passed + ${n_pass:-0}))
  failed=$((failed + ${n_fail:-0}))
  if [ "$rc" -eq 5 ]; then continue; fi
  s=$(status_of "$rc" "$log")
  if [ "$s" != pass ]; then
    bad_files="$bad_files $f:$s"
    [ "$s" = CRASH ] && crashed=$((crashed + 1))
  fi
done < "$WORK/tests.rc"
for f in $FILES; do grep -q "^$f " "$WORK/tests.rc" || bad_files="$bad_files $f:SKIPPED"; done
for log in "$WORK"/tests/*.log; do echo "##### $(basename "$log")"; cat "$log"; done > "$OUT/tests.log"
grep -hE "^(FAILED|ERROR) |Fatal Python error" "$WORK"/tests/*.log | head -40
if [ -z "$bad_files" ]; then s=pass; elif [ $crashed -gt 0 ]; then s=CRASH; else s=FAIL; fi
record "CUDA tests" "$s" "$passed passed, $failed failed, $crashed files crashed, $(echo $FILES | wc -w) files${bad_files:+;$bad_files}"

for name in memcheck_shapes memcheck_replay_step racecheck_every_kernel; do
  rc=$(cat "$SAN/$name.rc" 2>/dev/null || echo 124)
  s=$(status_of "$rc" "$SAN/$name.log")
  summary=$(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|shapes: [0-9]+ mismatches|replay step:" "$SAN/$name.log" | tr '\n' ' ')
  record "$name" "$s" "${summary:-no summary line}"
done
for f in "$SAN"/*.log; do echo "##### $(basename "$f")"; cat "$f"; done > "$OUT/sanitizer.log"
fi

# ---------------------------------------------------------------- alone, timed
step "smoke benchmark: lens_entropy vs the bare GEMM (N = 1024/4096/16384), topk_kl forward/backward, spot check"
l=$(limit 100)
if [ "$l" -eq 0 ]; then record "smoke benchmark" SKIPPED "budget"; else
  timeout "$l" $PY benchmarks/gpu_smoke.py bench $(dry) --out "$OUT/smoke.json"
  rc=$?
  record "smoke benchmark" "$(status_of $rc)" "$($PY - "$OUT/smoke.json" <<'PY' 2>/dev/null
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
le = [f"N={r['N']}: {r['ratio_to_gemm']:.2f}x GEMM" for r in rows if r["op"] == "lens_entropy"]
kl = [f"{r['op']} fwd {r['forward_seconds'] * 1e3:.2f} ms bwd {r['backward_seconds'] * 1e3:.2f} ms"
      for r in rows if r["op"] in ("topk_kl", "topk_kl_recompute")]
spot = [f"spot top-k agreement {r['topk_index_agreement']:.3f}" for r in rows if r["op"] == "spot_check"]
print("; ".join(le + kl + spot))
PY
)"
fi

for n in 1024 4096; do
  step "replay at $n visual tokens (ours, the published loop, the floor)"
  l=$(limit $([ "$n" = 1024 ] && echo 100 || echo 150))
  if [ "$l" -eq 0 ]; then record "replay $n" SKIPPED "budget"; continue; fi
  if [ $DRY -eq 1 ]; then
    timeout "$l" $PY benchmarks/bench_replay.py --device cpu --visual $((n / 16)) --steps 2 \
      --out "$OUT/bench_replay_$n.json"
  else
    timeout "$l" $PY benchmarks/bench_replay.py --device cuda --visual "$n" --out "$OUT/bench_replay_$n.json"
  fi
  rc=$?
  record "replay $n" "$(status_of $rc)" "$($PY - "$OUT/bench_replay_$n.json" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))["rows"][0]
pub = r.get("published_seconds")
parts = [f"{r['visual_tokens']} visual: ours {r['ours_seconds']:.2f} s", f"floor {r['floor_seconds']:.2f} s",
         f"ours/floor {r['ours_seconds'] / r['floor_seconds']:.2f}"]
if pub == pub and pub:
    parts += [f"published {pub:.2f} s", f"speedup {r['speedup']:.2f}x", f"offsets rel diff {r['offsets_rel_diff']:.1e}"]
parts.append(f"peak {r['ours_peak_bytes'] / 2**30:.2f} GiB")
print(", ".join(parts))
PY
)"
done

step "summary ($SECONDS s)"
status=0
printf '%-24s %-8s %s\n' step status "headline numbers"
while IFS=$'\t' read -r name s detail; do
  printf '%-24s %-8s %s\n' "$name" "$s" "$detail"
  [ "$s" = pass ] || status=1
done < "$WORK/summary.tsv"
rm -rf "$WORK"
echo "=== done (status $status, $SECONDS s)"
exit $status
