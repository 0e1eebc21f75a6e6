#!/usr/bin/env bash
# One device call: build the extension, run the CUDA tests, the sanitizers and the benchmark.
# Usage: bash scripts/gpu_check.sh [build] [tests] [sanitize] [bench] [train]   (default: these five)
#        also: benchfull (bench.py grid), sanitize_full (every cuda-marked test under each tool), ddp (2 GPUs)
# Logs go to $OUT (or /tmp/gpu_out); a short table is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
stages=${*:-build tests bench train sanitize}  # also: benchfull
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
summary="$OUT/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

note "date: $(date -u +%F) device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader) torch: $(python3 -c 'import torch; print(torch.__version__)')"
if [[ " $stages " == *" build "* ]]; then
  start=$(date +%s)
  MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1
  rc=$?
  note "build: rc=$rc in $(( $(date +%s) - start )) s"; [ $rc -eq 0 ] || tail -30 /tmp/build.log
  if [ $rc -ne 0 ]; then grep -E "error|Error" /tmp/build.log | head -40; exit 1; fi
fi
if [[ " $stages " == *" tests "* ]]; then
  # Error-path tests first and apart: a crash there must not hide the rest.
  python3 -m pytest -q -p no:cacheprovider tests/test_flash_cuda.py -k "bad_inputs" > /tmp/tests_errors.log 2>&1
  note "tests (bad inputs): rc=$? $(tail -1 /tmp/tests_errors.log)"
  python3 -m pytest -q -p no:cacheprovider -m cuda tests/ -k "not bad_inputs" \
    > "$OUT/tests.log" 2>&1
  note "tests: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
fi
if [[ " $stages " == *" train "* ]]; then
  for backend in flash sdpa; do
    timeout 200 python3 train.py attention=$backend attention.strict=true precision=bf16 \
      hydra.run.dir="/tmp/train_$backend" >> "$OUT/train.log" 2>&1
    note "train attention=$backend (bf16, strict): rc=$? $(python3 -c "import json;m=json.load(open('/tmp/train_$backend/metrics.json'));print({k:m[k] for k in ('backend_used','eval_sequence_accuracy','tokens_per_second','train_time_s','peak_memory_mb') if k in m})" 2>&1 | tail -1)"
  done
fi
if [[ " $stages " == *" bench "* ]]; then
  python3 scripts/bench_flash_cuda.py > "$OUT/bench.log" 2>&1
  note "bench: rc=$?"
  cat "$OUT/bench.log" | tail -40 >> "$summary"
fi
if [[ " $stages " == *" benchfull "* ]]; then
  # The full benchmark grid (bench.py, gpu preset); its table, CSV and plots come back under $OUT.
  python3 bench.py bench_preset=gpu hydra.run.dir=/tmp/bench > /tmp/bench_full.log 2>&1
  note "bench.py (gpu preset): rc=$?"
  cp /tmp/bench/summary.md /tmp/bench/results.csv "$OUT/" 2>/dev/null
  cp /tmp/bench/tflops_bf16_fwd.png /tmp/bench/tflops_bf16_fwd_bwd.png /tmp/bench/peak_mib_bf16_fwd_bwd.png "$OUT/" 2>/dev/null
  tail -5 /tmp/bench_full.log
fi
if [[ " $stages " == *" sanitize "* ]]; then
  for tool in memcheck racecheck synccheck; do
    timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitizer_case.py > "/tmp/sanitize_$tool.log" 2>&1
    note "compute-sanitizer $tool: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "/tmp/sanitize_$tool.log" | tail -1)"; tail -30 /tmp/sanitize_$tool.log >> "$OUT/sanitize.log"
  done
fi
if [[ " $stages " == *" sanitize_full "* ]]; then
  # Every cuda-marked test under memcheck, racecheck and synccheck, instrumenting our kernels (namespace
  # flash) only. With two GPUs, two tools run at once, one per GPU.
  filter=()
  compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name " && filter=(--kernel-name kns=flash)
  sanitize_tests() {  # tool gpu
    CUDA_VISIBLE_DEVICES=$2 timeout 540 compute-sanitizer --tool "$1" "${filter[@]}" --error-exitcode 9 \
      python3 -m pytest -q -p no:cacheprovider -m cuda tests/ > "/tmp/sanitize_full_$1.log" 2>&1
    echo "compute-sanitizer $1 over the cuda tests: rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "/tmp/sanitize_full_$1.log" | tail -1) | $(grep -E '(passed|failed)' "/tmp/sanitize_full_$1.log" | tail -1)" >> "/tmp/sanitize_full_$1.note"
  }
  gpus=$(nvidia-smi -L | wc -l)
  if [ "$gpus" -ge 2 ]; then
    sanitize_tests memcheck 0 & sanitize_tests racecheck 1 & wait
    sanitize_tests synccheck 0
  else
    for tool in memcheck racecheck synccheck; do sanitize_tests $tool 0; done
  fi
  for tool in memcheck racecheck synccheck; do
    note "$(cat /tmp/sanitize_full_$tool.note)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|Barrier" "/tmp/sanitize_full_$tool.log" | head -20 >> "$OUT/sanitize_full.log"
    tail -5 "/tmp/sanitize_full_$tool.log" >> "$OUT/sanitize_full.log"
  done
fi
if [[ " $stages " == *" ddp "* ]]; then
  bash scripts/ddp_speedup.sh > "$OUT/ddp.md" 2>&1
  note "ddp (scripts/ddp_speedup.sh):"; cat "$OUT/ddp.md" >> "$summary"
fi
echo "==== summary"
cat "$summary"
