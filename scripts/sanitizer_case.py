"""Small flash calls (forward and backward, every head dim, masks, GQA, odd sizes) for compute-sanitizer."""

import torch

import attention_backends as ab

for dtype in (torch.float16, torch.bfloat16):
    for head_dim in (32, 64, 96, 128, 256):
        for batch, heads_q, heads_kv, len_q, len_k, causal in (
            (1, 2, 1, 37, 70, True),
            (2, 2, 2, 65, 33, False),
        ):
            q = torch.randn(batch, heads_q, len_q, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(batch, heads_kv, len_k, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(batch, heads_kv, len_k, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            pad = torch.rand(batch, len_k, device="cuda") < 0.2
            out, _ = ab.attention(
                q, k, v, backend="flash", strict=True, is_causal=causal, key_padding_mask=pad
            )
            out.float().sum().backward()
torch.cuda.synchronize()
print("sanitizer case done")
