"""The readable reference backend: explicit softmax(Q Kᵀ · scale + mask) V with the softmax in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .masks import merge_masks


def grouped_scores(q: Tensor, k: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """Q Kᵀ · scale in ``dtype`` for grouped-query attention, without copying k.

    Shape:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); returns (B, Hq, Nq, Nk).
    """
    batch, heads_q, len_q, _ = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    # Fold the query heads of each group into the rows: one matmul per kv head.
    q_grouped = rearrange(q, "b (h g) n d -> b h (g n) d", g=heads_q // heads_kv).to(dtype)
    scores = torch.matmul(q_grouped, k.to(dtype).transpose(-1, -2)) * scale  # (B, Hkv, G*Nq, Nk)
    return scores.view(batch, heads_q, len_q, len_k)


def naive_attention(
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
) -> tuple[Tensor, Tensor | None]:
    """Attention written out, the reference every other backend is tested against.

    Shape:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv.
        returns out (B, Hq, Nq, D) and weights (B, Hq, Nq, Nk) or None.

    The scores and softmax run in fp32 (fp64 for fp64 inputs). A query row with no visible key gets
    all-zero weights, so its output is 0 and its gradients are finite.
    """
    batch, heads_q, len_q, _ = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = grouped_scores(q, k, scale, compute_dtype)  # (B, Hq, Nq, Nk)

    masks = merge_masks(
        len_q,
        len_k,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        is_causal=is_causal,
        device=q.device,
    )
    if masks.bias is not None:
        scores = scores + masks.bias.to(compute_dtype)
    if masks.allowed is not None:
        scores = scores.masked_fill(~masks.allowed, float("-inf"))

    # Softmax that leaves fully masked rows at 0 instead of NaN (with no keys at all, every row is).
    row_max = (
        scores.detach().amax(dim=-1, keepdim=True)
        if len_k > 0
        else scores.new_zeros(scores.shape[:-1] + (1,))
    )
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp_scores = torch.exp(scores - row_max)
    row_sum = exp_scores.sum(dim=-1, keepdim=True)
    weights = exp_scores / torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))

    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)

    weights_grouped = weights.view(batch, heads_kv, group * len_q, len_k)
    out = torch.matmul(weights_grouped, v.to(compute_dtype))  # (B, Hkv, G*Nq, D)
    out = rearrange(out, "b h (g n) d -> b (h g) n d", g=group).to(q.dtype)
    return out, (weights.to(q.dtype) if need_weights else None)
