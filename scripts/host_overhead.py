"""Host time of one attention call per backend: what a call costs before any kernel runs.

Tiny inputs (B = 1, H = 1, N = 4, D = 64) so that the kernels take next to nothing; on CUDA the calls are
issued while the GPU sleeps (torch.cuda._sleep), so no launch waits for it. Prints the median over
``--repeats`` rounds of ``--calls`` calls, with autograd recording (inputs that require grad) and under
torch.no_grad(), through the registry (``attention(..., backend=name)``) and, for flash, the op alone; and the
fused residual add + LayerNorm (transformer.add_layernorm) on a (4, 64) input.

    python scripts/host_overhead.py                 # CPU
    python scripts/host_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from contextlib import nullcontext

import torch

import attention_backends as ab
from benchmarks.timing import host_us_per_call
from transformer.add_layernorm import add_layernorm


def calls_for(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backends: list[str]
) -> dict[str, Callable[[], object]]:
    """One call per backend through the registry, and flash's op alone."""
    calls: dict[str, Callable[[], object]] = {
        f"attention(backend={name!r})": (lambda name=name: ab.attention(q, k, v, backend=name, strict=True))
        for name in backends
    }
    if "flash" in backends:
        calls["torch.ops.flash_attn.fwd"] = lambda: torch.ops.flash_attn.fwd(
            q, k, v, None, None, 0.125, False
        )
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="flash,sdpa,naive", help="comma-separated")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    print(f"| call | grad mode | host µs per call ({args.device}, median of {args.repeats} x {args.calls}) |")
    print("|---|---|---|")
    for grad in (True, False):
        q, k, v = (
            torch.randn(1, 1, 4, 64, device=args.device, dtype=dtype, requires_grad=grad) for _ in range(3)
        )
        calls = calls_for(q, k, v, args.backends.split(","))
        x, residual = (
            torch.randn(4, 64, device=args.device, dtype=dtype, requires_grad=grad) for _ in range(2)
        )
        weight, bias = (torch.ones(64, device=args.device, dtype=dtype, requires_grad=grad) for _ in range(2))
        calls["add_layernorm"] = lambda x=x, residual=residual, weight=weight, bias=bias: add_layernorm(
            x, residual, weight, bias
        )
        for label, fn in calls.items():
            with nullcontext() if grad else torch.no_grad():
                for _ in range(20):
                    fn()
                times = [host_us_per_call(fn, args.device, args.calls) for _ in range(args.repeats)]
            print(f"| `{label}` | {'grad' if grad else 'no_grad'} | {statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
