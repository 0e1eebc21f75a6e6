#!/usr/bin/env bash
# One device call: build the extension, run the CUDA tests, the sanitizers and the benchmark.
# Usage: bash scripts/gpu_check.sh [build] [tests] [sanitize] [bench] [train]   (default: these five)
#        also: benchfull (bench.py grid), ddp (1 vs 2 GPUs)
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
  # The kernels' test matrix (scripts/sanitizer_case.py) under memcheck, racecheck and synccheck, the three
  # tools at once (spread over the GPUs when there are several).
  gpus=$(nvidia-smi -L | wc -l)
  i=0
  for tool in memcheck racecheck synccheck; do
    ( CUDA_VISIBLE_DEVICES=$(( i % gpus )) timeout 420 compute-sanitizer --tool $tool --error-exitcode 9 \
        python3 scripts/sanitizer_case.py > "/tmp/sanitize_$tool.log" 2>&1
      echo "compute-sanitizer $tool (scripts/sanitizer_case.py): rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "/tmp/sanitize_$tool.log" | tail -1) $(grep -E '^sanitizer case [a-z]' "/tmp/sanitize_$tool.log" | tr '\n' ' ')" > "/tmp/sanitize_$tool.note" ) &
    i=$(( i + 1 ))
  done
  wait
  for tool in memcheck racecheck synccheck; do
    note "$(cat /tmp/sanitize_$tool.note)"
    { echo "== $tool"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|Barrier|Error" "/tmp/sanitize_$tool.log" | head -20; tail -4 "/tmp/sanitize_$tool.log"; } >> "$OUT/sanitize.log"
  done
fi
if [[ " $stages " == *" ddp "* ]]; then
  bash scripts/ddp_speedup.sh > "$OUT/ddp.md" 2>&1
  note "ddp (scripts/ddp_speedup.sh):"; cat "$OUT/ddp.md" >> "$summary"
fi
echo "==== summary"
cat "$summary"
