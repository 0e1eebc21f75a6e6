"""A float64 reference for testing backends, written independently of the backends' own mask code."""

from __future__ import annotations

import torch
from torch import Tensor


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention in float64 with every mask applied explicitly; differentiable.

    Shape:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D).
        returns out (B, Hq, Nq, D) float64 and weights (B, Hq, Nq, Nk) float64.
    Rows with no visible key have zero weights and zero output.
    """
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = heads_q // heads_kv
    q64, k64, v64 = (
        q.double(),
        k.double().repeat_interleave(group, dim=1),
        v.double().repeat_interleave(group, dim=1),
    )
    scores = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale

    visible = torch.ones(batch, heads_q, len_q, len_k, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.view(batch, 1, 1, len_k)
    if is_causal:
        i = torch.arange(len_q, device=q.device).view(len_q, 1)
        j = torch.arange(len_k, device=q.device).view(1, len_k)
        visible = visible & (j - (len_k - len_q) <= i)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & ~attn_mask
        else:
            scores = scores + attn_mask.double()
            visible = visible & ~torch.isneginf(attn_mask)
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(dim=-1, keepdim=True)
    safe_scores = torch.where(any_visible, scores, torch.zeros_like(scores))
    weights = torch.softmax(safe_scores, dim=-1) * any_visible
    out = torch.einsum("bhij,bhjd->bhid", weights, v64)
    return out, weights


def relative_error(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (absolute error when ref is 0)."""
    diff = (out.double() - ref.double()).norm().item()
    norm = ref.double().norm().item()
    return diff / norm if norm > 0 else diff
