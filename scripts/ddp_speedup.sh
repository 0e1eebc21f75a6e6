#!/usr/bin/env bash
# Data-parallel speed-up: the same training run (same global batch, same steps) on 1 GPU and, under
# torchrun + DDP, on 2 GPUs; prints tokens/s, final loss and the speed-up. Needs 2 CUDA GPUs and Hydra.
# Usage: bash scripts/ddp_speedup.sh [extra train.py overrides...]   (logs and metrics under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/ddp_out}
mkdir -p "$OUT"
# NVLink multicast stays off (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
args=(attention=flash attention.strict=true precision=bf16 model=small task=copy task.max_len=64
      trainer.batch_size=512 trainer.steps=300 trainer.warmup_steps=30 trainer.eval_every=0
      trainer.eval_batches=1 trainer.checkpoint_every=0 "$@")
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 train.py "${args[@]}" hydra.run.dir=/tmp/ddp_1gpu > "$OUT/ddp_1gpu.log" 2>&1
echo "1 GPU: rc=$?"
timeout 300 torchrun --standalone --nproc_per_node=2 train.py "${args[@]}" hydra.run.dir=/tmp/ddp_2gpu \
  > "$OUT/ddp_2gpu.log" 2>&1
echo "2 GPUs: rc=$?"
python3 - <<'PY'
import json

rows = {}
for name, path in (("1 GPU", "/tmp/ddp_1gpu/metrics.json"), ("2 GPUs (DDP)", "/tmp/ddp_2gpu/metrics.json")):
    try:
        rows[name] = json.load(open(path))
    except OSError as err:
        print(f"{name}: no metrics ({err})")
print("| run | world_size | tokens/s | final loss | eval seq acc | peak MiB/GPU |")
print("|---|---:|---:|---:|---:|---:|")
for name, m in rows.items():
    print(
        f"| {name} | {m.get('world_size')} | {m['tokens_per_second']:,.0f} | {m['final_loss']:.4f} | "
        f"{m.get('eval_sequence_accuracy', float('nan')):.3f} | {m.get('peak_memory_mb', float('nan')):.0f} |"
    )
if len(rows) == 2:
    one, two = rows["1 GPU"], rows["2 GPUs (DDP)"]
    print(f"speed-up: {two['tokens_per_second'] / one['tokens_per_second']:.2f}x")
PY
