"""The two CUDA backward kernels on sm_90 (mma.sync and wgmma) on shapes of your choice, bf16, in one process.

    python3 scripts/bench_bwd_kernels.py --head-dim 64 --shapes 1,4,1024 4,2,2048 --causal 0,1

Each point times `torch.ops.flash_attn.bwd` alone (the forward's output and log-sum-exp computed once before),
with FLASH_ATTN_BWD_WGMMA=0 and =1, by triton.testing.do_bench_cudagraph: the calls are replayed from a CUDA
graph, so small grids measure the kernels, not the host's launch overhead. Prints microseconds, TFLOP/s (2.5x
the forward's 4·B·H·N²·D, halved when causal) and the ratio mma.sync time / wgmma time.
"""

from __future__ import annotations

import argparse
import os

import torch

import attention_backends as ab

KERNELS = {"mma.sync": "0", "wgmma": "1"}


def _shape(text: str) -> tuple[int, int, int]:
    batch, heads, seqlen = (int(x) for x in text.split(","))
    return batch, heads, seqlen


def time_backward(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool) -> dict[str, float]:
    """Microseconds of one backward call per kernel, for (B, H, N, N, D) inputs."""
    import triton  # on the GPU machine only

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (
        torch.randn(batch, heads, seqlen, head_dim, generator=gen, device="cuda").to(torch.bfloat16)
        for _ in range(4)
    )
    scale = head_dim**-0.5
    out, lse = torch.ops.flash_attn.fwd(q, k, v, None, None, scale, causal)
    times = {}
    for name, flag in KERNELS.items():
        os.environ["FLASH_ATTN_BWD_WGMMA"] = flag
        ms = triton.testing.do_bench_cudagraph(
            lambda: torch.ops.flash_attn.bwd(dout, q, k, v, out, lse, None, None, scale, causal),
            rep=50,
            return_mode="median",
        )
        times[name] = ms * 1e3
    os.environ.pop("FLASH_ATTN_BWD_WGMMA")
    return times


HEADER = (
    "| B | H | N | causal | 128-key blocks | mma.sync us | wgmma us | mma.sync TF/s | wgmma TF/s"
    " | mma.sync / wgmma |\n|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
)


def format_row(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool, us: dict[str, float]) -> str:
    """One table row from the microseconds of each kernel (time_backward)."""
    flops = 2.5 * 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)
    tf = {name: flops / t / 1e6 for name, t in us.items()}
    blocks = batch * heads * -(-seqlen // 128)
    return (
        f"| {batch} | {heads} | {seqlen} | {int(causal)} | {blocks} | {us['mma.sync']:.1f} | "
        f"{us['wgmma']:.1f} | {tf['mma.sync']:.0f} | {tf['wgmma']:.0f} | {us['mma.sync'] / us['wgmma']:.2f} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--shapes", type=_shape, nargs="+", required=True, help="B,H,N each")
    parser.add_argument("--causal", default="0,1", help="0, 1 or 0,1")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    ab.load_extension()
    print(HEADER)
    for batch, heads, seqlen in args.shapes:
        for causal in (bool(int(c)) for c in args.causal.split(",")):
            us = time_backward(batch, heads, seqlen, args.head_dim, causal)
            print(format_row(batch, heads, seqlen, args.head_dim, causal, us))


if __name__ == "__main__":
    main()
