"""One forward point timed several ways in one process, to explain differences between timing scripts.

bench_flash_cuda.py times the forward under torch.no_grad() and as the first thing the process does;
bench.py times it with autograd recording, after other points have run. This script times one point
(default: D = 64, 1k keys, no mask, bf16, B·N = 16k tokens, H·D = 2048) for ours, SDPA flash and SDPA cuDNN, with
and without no_grad and replayed from a CUDA graph (the kernels alone), first on the fresh GPU, then after ``--heat-s`` seconds of back-to-back forwards, and prints
the GPU's SM clock, temperature and power beside each reading (nvidia-smi), and the host's time to issue one call
(measured while the GPU is held busy, so that the queue never waits): do_bench's events bracket each call, so a
call whose host side takes longer than its kernels is timed at its host time.
"""

import argparse
import subprocess
from collections.abc import Callable
from contextlib import nullcontext

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_backends as ab
from benchmarks.timing import host_us_per_call, run_for


def gpu_state() -> str:
    query = "--query-gpu=clocks.sm,temperature.gpu,power.draw"
    out = subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader"], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().replace(", ", " / ")


def host_us(fn: Callable[[], torch.Tensor], mode: str, calls: int = 50) -> float:
    """Microseconds of host time per call of ``fn``, issued while the GPU sleeps (so no launch waits on it)."""
    with torch.no_grad() if mode == "no_grad" else nullcontext():
        fn()
        return host_us_per_call(fn, "cuda", calls, sleep_cycles=2_000_000_000)  # about a second of GPU cycles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--passes", default="fresh,after heat,again", help="which passes to run, in order")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument(
        "--heat-s", type=float, default=20.0, help="seconds of forwards between the two passes"
    )
    args = parser.parse_args()
    batch, heads = 16384 // args.seqlen, 2048 // args.head_dim
    q, k, v = (
        torch.randn(
            batch, heads, args.seqlen, args.head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )
        for _ in range(3)
    )
    flops = 4 * batch * heads * args.seqlen**2 * args.head_dim

    def ours() -> torch.Tensor:
        return ab.attention(q, k, v, backend="flash", strict=True)[0]

    def theirs() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def cudnn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    fns: dict[str, Callable[[], torch.Tensor]] = {"flash": ours, "sdpa_flash": theirs, "sdpa_cudnn": cudnn}
    print("| pass | backend | mode | TF/s | SM MHz / temp C / power before | host µs per call |")
    print("|---|---|---|---|---|---|")
    for label in args.passes.split(","):
        if label == "after heat":
            run_for(ours, args.heat_s, calls_between_syncs=50)
        for name, fn in fns.items():
            for mode in ("no_grad", "grad", "graph"):
                state = gpu_state()
                with torch.no_grad() if mode != "grad" else nullcontext():
                    if mode == "graph":  # replayed from a CUDA graph: the kernels alone
                        ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
                    else:
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                host = host_us(fn, mode)
                print(
                    f"| {label} | {name} | {mode} | {flops / ms / 1e9:.0f} | {state} | {host:.0f} (kernels {ms * 1e3:.0f}) |"
                )


if __name__ == "__main__":
    main()
