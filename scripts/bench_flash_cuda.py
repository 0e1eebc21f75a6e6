"""Quick CUDA check of the flash kernels against SDPA's flash backend (bf16), in one process.

Grid: B·N = 16k tokens, H·D = 2048; TFLOP/s as flash-attn counts them (fwd 4·B·H·N²·D, halved when causal;
fwd+bwd 3.5x). Timing: triton.testing.do_bench median. The full benchmark is bench.py.
"""

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention_backends as ab


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def run(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    rows = []
    for head_dim in (64, 128):
        for seqlen in (1024, 4096, 16384):
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

                result = {"D": head_dim, "N": seqlen, "causal": int(causal)}
                for name, fn in (("flash", ours), ("sdpa_flash", theirs)):
                    with torch.no_grad():
                        fwd_ms = run(fn)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn().backward(grad)
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                    fb_ms = run(
                        lambda fn=fn, q=q, k=k, v=v, grad=grad: torch.autograd.grad(fn(), (q, k, v), grad)
                    )
                    result[f"{name}_fwd"] = tflops(flops, fwd_ms)
                    result[f"{name}_fb"] = tflops(3.5 * flops, fb_ms)
                    result[f"{name}_mib"] = peak
                rows.append(result)
    print(
        "| D | N | causal | flash fwd TF/s | sdpa_flash fwd | ratio | flash fwd+bwd | sdpa_flash fwd+bwd | ratio"
        " | peak MiB ours/sdpa |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['D']} | {r['N']} | {r['causal']} | {r['flash_fwd']:.0f} | {r['sdpa_flash_fwd']:.0f} | "
            f"{r['flash_fwd'] / r['sdpa_flash_fwd']:.2f} | {r['flash_fb']:.0f} | {r['sdpa_flash_fb']:.0f} | "
            f"{r['flash_fb'] / r['sdpa_flash_fb']:.2f} | {r['flash_mib']:.0f}/{r['sdpa_flash_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
