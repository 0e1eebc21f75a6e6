"""The flash backend: our FlashAttention kernels (csrc/) behind the backend contract."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .extension import extension_error, has_kernels_for
from .masks import lengths_to_masks, merge_masks
from .naive import grouped_scores
from .registry import register_backend
from .support import BackendSupport

CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)  # compiled kernels; other D <= 256 are zero-padded up to one of these
MAX_HEAD_DIM = 256


def _device_reason(device: str) -> str | None:
    if has_kernels_for(device):
        return None
    if device == "cuda":
        return "the flash extension was built without CUDA kernels; rebuild it where nvcc and a CUDA torch are present"
    return f"the flash extension has no {device} kernels"


FLASH_SUPPORT = BackendSupport(
    devices=frozenset({"cpu", "cuda"}),
    dtypes={
        "cpu": frozenset({torch.float32, torch.float64, torch.bfloat16}),
        "cuda": frozenset({torch.float16, torch.bfloat16}),
    },
    head_dims={
        "cpu": (lambda d: 1 <= d <= MAX_HEAD_DIM, f"1..{MAX_HEAD_DIM}"),
        "cuda": (lambda d: 1 <= d <= MAX_HEAD_DIM, f"1..{MAX_HEAD_DIM}"),
    },
    attn_mask=False,
    dropout=False,
    seqlens_k=True,
    available=extension_error,
    device_available=_device_reason,
)


def weights_from_lse(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    *,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    scale: float,
    seqlens_k: Tensor | None = None,
) -> Tensor:
    """Exact attention weights recomputed from the saved log-sum-exp: exp(Q Kᵀ · scale − lse).

    Shape:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); lse: (B, Hq, Nq) float32 (+inf for rows with no key);
        seqlens_k: (B,) integer or None.
        returns (B, Hq, Nq, Nk) in q's dtype; rows with no visible key are 0.
    The weights are computed without autograd: gradients flow through the attention output.
    """
    len_q, len_k = q.shape[2], k.shape[2]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        scores = grouped_scores(q, k, scale, compute_dtype)  # (B, Hq, Nq, Nk)
        hidden = None
        if seqlens_k is not None:
            padding, hidden = lengths_to_masks(seqlens_k, len_q, len_k, is_causal=is_causal)
            key_padding_mask = padding if key_padding_mask is None else key_padding_mask | padding
            is_causal = False  # per sequence, in ``hidden``
        allowed = merge_masks(
            len_q,
            len_k,
            key_padding_mask=key_padding_mask,
            attn_mask=None,
            is_causal=is_causal,
            device=q.device,
        ).allowed
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        if hidden is not None:
            scores = scores.masked_fill(hidden, float("-inf"))
        weights = torch.exp(scores - lse.to(compute_dtype).unsqueeze(-1))
    return weights.to(q.dtype)


extension_error()  # try the import once now, not inside a traced call


@register_backend("flash", support=FLASH_SUPPORT, fallback="sdpa")
def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float,
    need_weights: bool = False,
    seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Tiled attention with online softmax: no N×N tensor is written (unless weights are asked for).

    Shape:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); key_padding_mask (B, Nk) bool; seqlens_k (B,) integer.
        returns out (B, Hq, Nq, D) and weights (B, Hq, Nq, Nk) or None.
    """
    if attn_mask is not None or dropout_p > 0.0:
        raise ValueError(
            "flash attention takes no attn_mask and no dropout (the registry falls back for those)"
        )
    lengths = None if seqlens_k is None else seqlens_k.to(torch.int32)
    head_dim = q.shape[-1]
    if q.is_cuda and head_dim not in CUDA_HEAD_DIMS:
        # Zero columns add nothing to Q Kᵀ, and the output's extra columns are P·0 = 0: pad, run, slice.
        padded = next(d for d in CUDA_HEAD_DIMS if d > head_dim)
        q_p, k_p, v_p = (F.pad(t, (0, padded - head_dim)) for t in (q, k, v))
        out, lse = torch.ops.flash_attn.fwd(q_p, k_p, v_p, key_padding_mask, lengths, scale, is_causal)
        out = out[..., :head_dim]
    else:
        out, lse = torch.ops.flash_attn.fwd(q, k, v, key_padding_mask, lengths, scale, is_causal)
    weights = None
    if need_weights:
        weights = weights_from_lse(
            q, k, lse, key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale, seqlens_k=lengths
        )
    return out, weights
