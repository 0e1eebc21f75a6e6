#!/usr/bin/env bash
# Data-parallel speed-up: the same training run (same global batch, same steps) on 1 GPU and, under
# torchrun + DDP, on 2 GPUs, for each global batch in DDP_BATCHES; prints tokens/s, final loss and the
# speed-up per batch. Needs 2 CUDA GPUs and Hydra.
# Usage: DDP_BATCHES="512 4096" bash scripts/ddp_speedup.sh [extra train.py overrides...]
#        (logs and metrics under $OUT; DDP_STEPS steps per run, default 200)
set -uo pipefail
OUT=${OUT:-/tmp/ddp_out}
mkdir -p "$OUT"
# NVLink multicast stays off (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=${DDP_STEPS:-200}
for batch in ${DDP_BATCHES:-512 4096 16384}; do
  args=(attention=flash attention.strict=true precision=bf16 model=small task=copy task.max_len=64
        trainer.batch_size="$batch" trainer.steps="$steps" trainer.warmup_steps=20 trainer.eval_every=0
        trainer.eval_batches=1 trainer.checkpoint_every=0 +trainer.untimed_steps=5 "$@")
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 train.py "${args[@]}" hydra.run.dir="$OUT/b${batch}_1gpu" \
    > "$OUT/b${batch}_1gpu.log" 2>&1
  echo "batch $batch, 1 GPU: rc=$?"
  timeout 300 torchrun --standalone --nproc_per_node=2 train.py "${args[@]}" hydra.run.dir="$OUT/b${batch}_2gpu" \
    > "$OUT/b${batch}_2gpu.log" 2>&1
  echo "batch $batch, 2 GPUs: rc=$?"
done
python3 - "$OUT" <<'PY'
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
print("| global batch | GPUs | tokens/s | step ms | final loss | peak MiB/GPU | speed-up |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for one_dir in sorted(out.glob("b*_1gpu"), key=lambda p: int(p.name[1:].split("_")[0])):
    runs = []
    for run_dir in (one_dir, one_dir.with_name(one_dir.name.replace("_1gpu", "_2gpu"))):
        try:
            runs.append(json.loads((run_dir / "metrics.json").read_text()))
        except OSError as err:
            print(f"{run_dir.name}: no metrics ({err})")
    for m in runs:
        steps = [json.loads(line) for line in (pathlib.Path(m["output_dir"]) / "metrics.jsonl").open()]
        times = sorted(r["step_time_s"] for r in steps if r.get("kind") == "train")
        step_ms = 1000 * times[len(times) // 2]
        speedup = m["tokens_per_second"] / runs[0]["tokens_per_second"]
        print(
            f"| {m['batch_size']} | {m['world_size']} | {m['tokens_per_second']:,.0f} | {step_ms:.1f} | "
            f"{m['final_loss']:.4f} | {m['peak_memory_mb']:.0f} | {speedup:.2f}x |"
        )
PY
