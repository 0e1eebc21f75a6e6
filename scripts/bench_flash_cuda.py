"""Quick CUDA check of the flash kernels against SDPA's flash backend (bf16), in one process.

Grid: B·N = 16k tokens, H·D = 2048; TFLOP/s as flash-attn counts them (fwd 4·B·H·N²·D, halved when causal;
fwd+bwd 3.5x). Timing: triton.testing.do_bench median, after --settle-s seconds of forwards (a GPU fresh from
idle runs faster for a moment than at its sustained, power-limited rate:
docs/results/timing_modes_h200_2026-11-30.md). The full benchmark is bench.py.
"""

import argparse

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_backends as ab
from benchmarks.timing import run_for


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def run(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head-dims", type=_ints, default=[64, 128], help="e.g. 64,128")
    parser.add_argument("--seqlens", type=_ints, default=[1024, 4096, 16384], help="e.g. 1024,4096")
    parser.add_argument("--fwd-only", action="store_true", help="time the forward alone")
    parser.add_argument(
        "--settle-s", type=float, default=2.0, help="seconds of forwards before the first timing"
    )
    args = parser.parse_args()
    settled = False
    rows = []
    for head_dim in args.head_dims:
        for seqlen in args.seqlens:
            for causal in (False, True):
                batch, heads = 16384 // seqlen, 2048 // head_dim
                q, k, v = (
                    torch.randn(
                        batch,
                        heads,
                        seqlen,
                        head_dim,
                        device="cuda",
                        dtype=torch.bfloat16,
                        requires_grad=True,
                    )
                    for _ in range(3)
                )
                grad = torch.randn_like(q)
                flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)

                def ours(q=q, k=k, v=v, causal=causal):
                    return ab.attention(q, k, v, backend="flash", strict=True, is_causal=causal)[0]

                def theirs(q=q, k=k, v=v, causal=causal):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                if not settled:
                    run_for(ours, args.settle_s)
                    settled = True
                result = {"D": head_dim, "N": seqlen, "causal": int(causal)}
                with torch.no_grad():  # a gross-error guard; the accuracy tests are tests/test_flash_cuda.py
                    ref = theirs()
                    result["diff"] = ((ours() - ref).float().norm() / ref.float().norm()).item()
                for name, fn in (("flash", ours), ("sdpa_flash", theirs)):
                    with torch.no_grad():
                        fwd_ms = run(fn)
                    result[f"{name}_fwd"] = tflops(flops, fwd_ms)
                    if args.fwd_only:
                        continue
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn().backward(grad)
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    fb_ms = run(
                        lambda fn=fn, q=q, k=k, v=v, grad=grad: torch.autograd.grad(fn(), (q, k, v), grad)
                    )
                    result[f"{name}_fb"] = tflops(3.5 * flops, fb_ms)
                    result[f"{name}_mib"] = peak
                rows.append(result)
    print(
        "| D | N | causal | flash fwd TF/s | sdpa_flash fwd | ratio | flash fwd+bwd | sdpa_flash fwd+bwd | ratio"
        " | peak MiB ours/sdpa | out vs sdpa_flash |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fwd = f"{r['flash_fwd']:.0f} | {r['sdpa_flash_fwd']:.0f} | {r['flash_fwd'] / r['sdpa_flash_fwd']:.2f}"
        if args.fwd_only:
            rest = "- | - | - | -"
        else:
            rest = (
                f"{r['flash_fb']:.0f} | {r['sdpa_flash_fb']:.0f} | {r['flash_fb'] / r['sdpa_flash_fb']:.2f} | "
                f"{r['flash_mib']:.0f}/{r['sdpa_flash_mib']:.0f}"
            )
        print(f"| {r['D']} | {r['N']} | {r['causal']} | {fwd} | {rest} | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
