#!/usr/bin/env bash
# One device call: build the extension, run the CUDA tests, the sanitizers and the benchmark.
# Usage: bash scripts/gpu_check.sh [build] [tests] [sanitize] [bench] [train]   (default: these five)
#        also: benchfull (bench.py grid), ddp (1 vs 2 GPUs), decode, model, sweep, fwdtiles, wgmma, bwdwgmma, longkeys, profile (ncu),
#        errsweep (error ratios over many draws of one test case)
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
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_flash_cuda.py -k "bad_inputs" > /tmp/tests_errors.log 2>&1
  note "tests (bad inputs): rc=$? $(tail -1 /tmp/tests_errors.log)"
  timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/ -k "not bad_inputs" \
    > "$OUT/tests.log" 2>&1
  note "tests: $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
fi
if [[ " $stages " == *" wgmma "* ]]; then
  # The Hopper (wgmma) forward: its tests (both one-pass kernels of D = 64 / 128), then the forward of
  # each kernel against SDPA flash (=1: wgmma for D = 64 and 128; =0: mma.sync).
  if [[ " $stages " != *" tests "* ]]; then  # the tests stage runs these too
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_flash_cuda.py -k "hopper" > "$OUT/wgmma_tests.log" 2>&1
    note "wgmma forward tests: $(tail -1 "$OUT/wgmma_tests.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/wgmma_tests.log" | head -20
  fi
  for w in 1 0; do
    FLASH_ATTN_FWD_WGMMA=$w timeout 150 python3 scripts/bench_flash_cuda.py --fwd-only > "$OUT/fwd_wgmma_$w.log" 2>&1
    note "forward, FLASH_ATTN_FWD_WGMMA=$w: rc=$?"; grep -E "^\|" "$OUT/fwd_wgmma_$w.log" >> "$summary"
  done
fi
if [[ " $stages " == *" bwdwgmma "* ]]; then
  # The Hopper (wgmma) backward (FLASH_ATTN_BWD_WGMMA=1): its tests, then fwd+bwd against SDPA flash with the
  # mma.sync backward (=0) and the wgmma one (=1); the forward is the same in both.
  if [[ " $stages " != *" tests "* ]]; then  # the tests stage runs these too
    timeout ${BWD_TESTS_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_flash_cuda.py -k "hopper_backward or backward_switch" \
      > "$OUT/bwd_wgmma_tests.log" 2>&1
    note "wgmma backward tests: $(tail -1 "$OUT/bwd_wgmma_tests.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/bwd_wgmma_tests.log" | head -20 | tee -a "$summary"
  fi
  for w in 0 1; do
    FLASH_ATTN_BWD_WGMMA=$w timeout ${BWD_BENCH_TIMEOUT:-150} python3 scripts/bench_flash_cuda.py --head-dims 64,128 \
      --seqlens ${BWD_SEQLENS:-1024,4096,16384} > "$OUT/bwd_wgmma_$w.log" 2>&1
    note "fwd+bwd, FLASH_ATTN_BWD_WGMMA=$w: rc=$?"; grep -E "^\|" "$OUT/bwd_wgmma_$w.log" >> "$summary"
  done
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
  # SANITIZE_GPUS="1" keeps them off GPU 0 (e.g. while GPU 0 runs the tests).
  read -r -a gpu_list <<< "${SANITIZE_GPUS:-$(seq -s ' ' 0 $(( $(nvidia-smi -L | wc -l) - 1 )))}"
  # racecheck's host memory grows with every launch (55 GB over the attention part, 68 GB over one split
  # count of the decode part): it runs the parts one process at a time; memcheck and synccheck (1 GB) run
  # them all in one process.
  # SANITIZE_PARTS="sm90tiles attention" sanitizes those parts only.
  racecheck_parts=${SANITIZE_PARTS:-"attention sm90tiles sm90bwd decode:3:float16 decode:3:bfloat16 decode:64:float16 decode:64:bfloat16 layernorm"}
  i=0
  for tool in memcheck racecheck synccheck; do
    ( export CUDA_VISIBLE_DEVICES=${gpu_list[$(( i % ${#gpu_list[@]} ))]}
      : > "/tmp/sanitize_$tool.log"; : > "/tmp/sanitize_$tool.note"
      if [ $tool = racecheck ]; then groups=$racecheck_parts; else groups=all; fi
      for group in $groups; do
        parts=$group; [ "$group" = all ] && parts="${SANITIZE_PARTS:-}"
        timeout "${SANITIZE_TIMEOUT:-420}" compute-sanitizer --tool $tool --error-exitcode 9 \
          python3 scripts/sanitizer_case.py $parts > "/tmp/sanitize_${tool}_part.log" 2>&1
        rc=$?
        cat "/tmp/sanitize_${tool}_part.log" >> "/tmp/sanitize_$tool.log"
        echo "compute-sanitizer $tool (scripts/sanitizer_case.py $parts): rc=$rc $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "/tmp/sanitize_${tool}_part.log" | tail -1) $(grep -E '^sanitizer case [a-z]' "/tmp/sanitize_${tool}_part.log" | tr '\n' ' ')" >> "/tmp/sanitize_$tool.note"
      done ) &
    i=$(( i + 1 ))
  done
  wait
  for tool in memcheck racecheck synccheck; do
    note "$(cat /tmp/sanitize_$tool.note)"
    { echo "== $tool"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|Barrier|Error" "/tmp/sanitize_$tool.log" | head -20; tail -4 "/tmp/sanitize_$tool.log"; } >> "$OUT/sanitize.log"
  done
fi
if [[ " $stages " == *" decode "* ]]; then
  # Decode-shaped kernels (Nq = 1 and 4 against Nk = 512..64k) and generate() with and without the KV cache.
  python3 scripts/bench_decode_cuda.py --out "$OUT" > /tmp/decode_kernels.log 2>&1
  note "decode kernels (scripts/bench_decode_cuda.py): rc=$?"; tail -40 /tmp/decode_kernels.log >> "$summary"
  for kv in 16 4; do
    python3 scripts/bench_decoding.py --device cuda --dtype bfloat16 --d-model 1024 --num-heads 16 \
      --num-kv-heads $kv --num-layers 4 --dim-feedforward 4096 --batch-size 32 --src-len 256 \
      --new-tokens 256 --repeats 3 > /tmp/decoding_$kv.log 2>&1
    note "generate (scripts/bench_decoding.py, $kv kv heads): rc=$?"; tail -9 /tmp/decoding_$kv.log >> "$summary"
  done
fi
if [[ " $stages " == *" model "* ]]; then
  # Model-level tokens/s and peak memory per backend (Hydra multirun), naive running out of memory at 32k.
  timeout "${MODEL_TIMEOUT:-420}" python3 train.py -m +experiment=long_context attention=naive,sdpa,flash \
    task.max_len=1024,8192,32768 hydra.sweep.dir=/tmp/model_level > /tmp/model_level.log 2>&1
  note "model level (train.py -m +experiment=long_context): rc=$?"
  python3 scripts/collect_metrics.py /tmp/model_level --out "$OUT/model_level" >> "$summary" 2>&1
fi
if [[ " $stages " == *" fwdtiles "* ]]; then
  # Kernel candidates, each built for sm_90a in its own copy of the tree (in parallel), then timed against
  # SDPA flash one after another. FWD_TILE_KERNEL=sm80 (default): the mma.sync forward's D = 64 candidates
  # (FwdVariant<64, v> in csrc/cuda/kernel_traits.h); sm90: the wgmma forward's candidates for D = 64 and 128
  # (FwdSm90Variant<D, v>; candidate v for both head dims); sm90bwd: the wgmma backward's (BwdSm90Traits<D, v>
  # in csrc/cuda/flash_bwd_sm90_kernel.cuh, timed fwd+bwd with FLASH_ATTN_BWD_WGMMA=1). FWD_VARIANTS="..."
  # picks them; FWD_TILE_TESTS=1 runs each tree's tests of that kernel too. sm90bwd also times both backward
  # kernels alone in each tree (FWD_TILE_BWD_ALONE=0 skips it; BWD_ALONE_SHAPES="B,H,N ..."), and
  # FWD_TILE_SANITIZE_PARTS="sm90bwd" runs the sanitizers over those parts in the first candidate's tree.
  kind=${FWD_TILE_KERNEL:-sm80}; header=csrc/cuda/kernel_traits.h; env="FLASH_ATTN_FWD_WGMMA=0"
  bench_args="--seqlens 1024,4096,8192,16384 --fwd-only"; column=fwd
  tests="one_pass_forward_kernels or hopper_forward or small_grids"
  if [ "$kind" = sm90 ]; then
    macros="FLASH_FWD_SM90_VARIANT_HDIM64 FLASH_FWD_SM90_VARIANT_HDIM128"; dims=64,128
    env="FLASH_ATTN_FWD_WGMMA=1 FLASH_ATTN_FWD_SM90_LONG_KEYS=0"  # the candidate at every N, not D = 64's long-key tiles
    default_variants="24 30"
  elif [ "$kind" = sm90bwd ]; then
    macros="FLASH_BWD_SM90_VARIANT_HDIM64 FLASH_BWD_SM90_VARIANT_HDIM128"; header=csrc/cuda/flash_bwd_sm90_kernel.cuh
    env="FLASH_ATTN_BWD_WGMMA=1"; dims=64,128; default_variants="21 20 12"
    bench_args="--seqlens 1024,4096,16384"; column=fwd_bwd; tests="hopper_backward or backward_switch"
  else
    macros="FLASH_FWD_VARIANT_HDIM64"; dims=64; default_variants="0 1 2"
  fi
  for v in ${FWD_VARIANTS:-$default_variants}; do
    dir=/tmp/fwd_variant_$v; rm -rf "$dir"; mkdir -p "$dir"
    tar --exclude=./build --exclude='*.so' --exclude=./.whl -cf - . | tar -xf - -C "$dir"
    for m in $macros; do sed -i "s/#define $m [0-9]*$/#define $m $v/" "$dir/$header"; done
    ( cd "$dir" && TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=6 python3 setup.py build_ext --inplace > build.log 2>&1 \
        || { echo "build failed"; grep -E "error" build.log | head -20; } ) &
  done
  wait
  for v in ${FWD_VARIANTS:-$default_variants}; do
    dir=/tmp/fwd_variant_$v
    ( cd "$dir" && env $env PYTHONPATH=$dir:$PYTHONPATH timeout 120 python3 scripts/bench_flash_cuda.py \
        --head-dims $dims $bench_args ) > "$OUT/fwd_variant_$v.log" 2>&1
    note "$kind variant $v: rc=$?"; grep -E "^\|" "$OUT/fwd_variant_$v.log" >> "$summary"
    if [ "${FWD_TILE_TESTS:-0}" = 1 ]; then
      ( cd "$dir" && PYTHONPATH=$dir:$PYTHONPATH timeout 200 python3 -m pytest -q -p no:cacheprovider \
          tests/test_flash_cuda.py -k "$tests" ) > "$OUT/fwd_variant_${v}_tests.log" 2>&1
      note "  tests of variant $v: $(tail -1 "$OUT/fwd_variant_${v}_tests.log")"
    fi
  done
  # All candidates side by side, relative to the last one named (the default comes last in the lists above).
  last_variant=$(echo ${FWD_VARIANTS:-$default_variants} | awk '{print $NF}')
  if [ "$kind" = sm90bwd ]; then
    # The mma.sync backward (FLASH_ATTN_BWD_WGMMA=0, the same in every tree) against SDPA flash in this call too.
    ( cd /tmp/fwd_variant_$last_variant && FLASH_ATTN_BWD_WGMMA=0 PYTHONPATH=/tmp/fwd_variant_$last_variant:$PYTHONPATH \
        timeout 120 python3 scripts/bench_flash_cuda.py --head-dims 64 $bench_args ) > "$OUT/bwd_mma_sync.log" 2>&1
    note "mma.sync backward (tree of variant $last_variant): rc=$?"; grep -E "^\|" "$OUT/bwd_mma_sync.log" >> "$summary"
  fi
  python3 scripts/compare_fwd_variants.py "$OUT" --base "$last_variant" --column $column >> "$summary" 2>&1
  if [ "$kind" = sm90bwd ] && [ "${FWD_TILE_BWD_ALONE:-1}" = 1 ]; then
    # Both backward kernels alone in each tree, replayed from a CUDA graph, then the candidates side by side.
    for v in ${FWD_VARIANTS:-$default_variants}; do
      for d in ${dims//,/ }; do
        ( cd /tmp/fwd_variant_$v && PYTHONPATH=/tmp/fwd_variant_$v:$PYTHONPATH timeout 90 python3 \
            scripts/bench_bwd_kernels.py --head-dim $d --shapes ${BWD_ALONE_SHAPES:-16,16,1024 4,16,4096 1,16,16384} \
            --causal 0,1 ) > "$OUT/bwd_alone_${v}_$d.log" 2>&1
        note "backward alone, variant $v, D = $d (scripts/bench_bwd_kernels.py): rc=$?"
      done
    done
    python3 scripts/compare_bwd_alone.py "$OUT" --base "$last_variant" >> "$summary" 2>&1
  fi
  if [ -n "${FWD_TILE_SANITIZE_PARTS:-}" ]; then
    # memcheck, racecheck and synccheck over those parts (scripts/sanitizer_case.py) in the first candidate's tree.
    first_variant=$(echo ${FWD_VARIANTS:-$default_variants} | awk '{print $1}')
    ( cd /tmp/fwd_variant_$first_variant && SANITIZE_PARTS="$FWD_TILE_SANITIZE_PARTS" \
        OUT="$OUT/sanitize_$first_variant" bash scripts/gpu_check.sh sanitize ) > /dev/null 2>&1
    note "sanitizers in the tree of variant $first_variant ($FWD_TILE_SANITIZE_PARTS):"
    tail -n +2 "$OUT/sanitize_$first_variant/summary.txt" >> "$summary"
  fi
  tail -4 "$summary"
fi
if [[ " $stages " == *" errsweep "* ]]; then
  # Our error / SDPA's over many input draws of one test case (ERRSWEEP_SHAPE etc.), with both forward
  # kernels: a ratio near 2 in a few draws is a tail, one above 1 in most draws a systematic error.
  for wgmma in 0 1; do
    timeout 200 python3 scripts/error_ratio_sweep.py --shape "${ERRSWEEP_SHAPE:-1,2,1,129,7}" \
      --mask "${ERRSWEEP_MASK:-padding+causal}" --head-dim "${ERRSWEEP_HEAD_DIM:-128}" --wgmma $wgmma \
      --seeds "${ERRSWEEP_SEEDS:-300}" > "/tmp/errsweep_$wgmma.log" 2>&1
    note "error ratio sweep, FLASH_ATTN_FWD_WGMMA=$wgmma: rc=$?"; tail -8 "/tmp/errsweep_$wgmma.log" >> "$summary"
  done
fi
if [[ " $stages " == *" sweep "* ]]; then
  mkdir -p /tmp/sweep
  timeout 480 python3 scripts/sweep_bwd.py --head-dims ${SWEEP_HEAD_DIMS:-64,128} ${SWEEP_VARIANTS:+--variants $SWEEP_VARIANTS} --out /tmp/sweep/bwd_sweep.csv > /tmp/bwd_sweep.log 2>&1
  note "backward variants (scripts/sweep_bwd.py): rc=$?"; tail -45 /tmp/bwd_sweep.log >> "$summary"
  cp /tmp/sweep/bwd_sweep.csv "$OUT/" 2>/dev/null
fi
if [[ " $stages " == *" longkeys "* ]]; then
  # D = 64's forward with and without its long-key tiles (FLASH_ATTN_FWD_SM90_LONG_KEYS=1 / 0) around the
  # rule's threshold (kLongKeysMinLen in flash_fwd_api.cpp).
  for w in 0 1; do
    FLASH_ATTN_FWD_SM90_LONG_KEYS=$w timeout 150 python3 scripts/bench_flash_cuda.py --fwd-only --head-dims 64 \
      --seqlens ${LONG_KEYS_SEQLENS:-4096,5120,6144,7168,8192} > "$OUT/long_keys_$w.log" 2>&1
    note "forward, FLASH_ATTN_FWD_SM90_LONG_KEYS=$w: rc=$?"; grep -E "^\|" "$OUT/long_keys_$w.log" >> "$summary"
  done
fi
if [[ " $stages " == *" profile "* ]]; then
  # Nsight Compute on the backward (PROFILE_DIRECTION=fwd: the forward) at N = PROFILE_SEQLEN (4096) and D = 128
  # (PROFILE_HEAD_DIM=64: D = 64), ours (the kernel the defaults pick: the wgmma one on sm_90), SDPA's flash
  # kernel and (PROFILE_IMPLS="ours sdpa cudnn") SDPA's cuDNN kernel; PROFILE_IMPLS="ours" profiles ours only. The
  # summary sections as text and the full reports (with source lines: the build has -lineinfo) to open in ncu-ui.
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  pdir=${PROFILE_DIRECTION:-bwd}
  for impl in ${PROFILE_IMPLS:-ours sdpa}; do
    case "$impl:$pdir" in
      ours:bwd) kernel="regex:bwd_kernel|flash_bwd_sm90_kernel" ;;
      ours:fwd) kernel="regex:flash_fwd_sm90_kernel|flash_fwd_kernel" ;;
      sdpa:bwd) kernel=regex:flash_bwd_dq_dk_dv ;;
      sdpa:fwd) kernel=regex:flash_fwd_kernel ;;
      cudnn:bwd) kernel="regex:sdpa.*bprop|bprop" ;;
      cudnn:fwd) kernel="regex:sdpa.*fprop|fprop" ;;
    esac
    flag=""; [ $impl != ours ] && flag=--$impl
    name=${pdir}_$impl
    timeout 200 "$NCU" --kernel-name "$kernel" --launch-skip 1 --launch-count 1 --set full --import-source yes \
      -f -o "$OUT/$name" python3 scripts/profile_bwd.py --head-dim ${PROFILE_HEAD_DIM:-128} \
      --seqlen ${PROFILE_SEQLEN:-4096} $flag > "/tmp/ncu_$name.log" 2>&1
    note "ncu $impl $pdir: rc=$?"
    "$NCU" --import "$OUT/$name.ncu-rep" --print-summary per-kernel > "$OUT/${name}_summary.txt" 2>&1
    # Text to read without ncu-ui: every metric, and per-SASS-instruction samples and counts.
    "$NCU" --import "$OUT/$name.ncu-rep" --page raw --csv > "$OUT/${name}_raw.csv" 2>&1
    "$NCU" --import "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/${name}_sass.csv" 2>&1
    "$NCU" --import "$OUT/$name.ncu-rep" --page details > "$OUT/${name}_details.txt" 2>&1
  done
fi
if [[ " $stages " == *" ddp "* ]]; then
  OUT=/tmp/ddp_logs bash scripts/ddp_speedup.sh > "$OUT/ddp.md" 2>&1
  grep -q "rc=[1-9]" "$OUT/ddp.md" && tail -n 15 /tmp/ddp_logs/*.log >> "$OUT/ddp.md"
  note "ddp (scripts/ddp_speedup.sh):"; cat "$OUT/ddp.md" >> "$summary"
  # Where one step's time goes at the smallest batch (torch.profiler, CPU and device time per operator).
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 train.py attention=flash precision=bf16 model=small task=copy \
    task.max_len=64 trainer.batch_size=512 trainer.steps=20 trainer.eval_batches=0 trainer.checkpoint_every=0 \
    trainer.profile_steps=10 hydra.run.dir=/tmp/step_profile > /tmp/step_profile.log 2>&1
  note "step profile (batch 512, 1 GPU): rc=$?"; cp /tmp/step_profile/profile.txt "$OUT/step_profile.txt" 2>/dev/null
fi
echo "==== summary"
cat "$summary"
