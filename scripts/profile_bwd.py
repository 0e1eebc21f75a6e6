"""One forward and one backward of the flash kernels on one benchmark point, for Nsight Compute.

    ncu --kernel-name regex:bwd_kernel --launch-skip 1 --launch-count 1 --set full \\
        python3 scripts/profile_bwd.py --head-dim 128 --seqlen 4096

B·N = 16k tokens and H·D = 2048 as in the benchmark grid; bf16. Runs twice so that --launch-skip 1 profiles a
warm launch. ``--sdpa``: PyTorch's FLASH_ATTENTION kernels instead (``--kernel-name regex:flash_bwd``);
``--cudnn``: its CUDNN_ATTENTION kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attention_backends as ab


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--sdpa", action="store_true", help="PyTorch's FLASH_ATTENTION kernels instead of ours")
    p.add_argument("--cudnn", action="store_true", help="PyTorch's CUDNN_ATTENTION kernels instead of ours")
    args = p.parse_args(argv)
    ab.load_extension()
    n, d = args.seqlen, args.head_dim
    b, h = 16384 // n, 2048 // d
    q, k, v, dout = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = d**-0.5
    for _ in range(2):
        if args.sdpa or args.cudnn:
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if args.cudnn else SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(*leaves, is_causal=args.causal, scale=scale)
            out.backward(dout)
        else:
            out, lse = torch.ops.flash_attn.fwd(q, k, v, None, None, scale, args.causal)
            torch.ops.flash_attn.bwd(dout, q, k, v, out, lse, None, None, scale, args.causal)
    torch.cuda.synchronize()
    print(f"profiled point: B={b} H={h} N={n} D={d} causal={args.causal}")


if __name__ == "__main__":
    main()
