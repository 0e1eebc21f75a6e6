"""The SDPA backend: torch.nn.functional.scaled_dot_product_attention behind the backend contract."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .masks import merge_masks


def sdpa_attention(
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
) -> tuple[Tensor, None]:
    """Attention through torch's fused kernels.

    Shape:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D) with Hq a multiple of Hkv.
        returns out (B, Hq, Nq, D) and None (SDPA has no weights to return).

    SDPA's ``is_causal`` is top-left aligned and its bool masks mean True = allowed; here causal
    masking is bottom-right and masks follow nn.MultiheadAttention. Rows without any visible key are
    given a harmless mask for the kernel and zeroed afterwards, so they come out 0 with finite gradients.
    """
    len_q, len_k = q.shape[2], k.shape[2]
    grouped = q.shape[1] != k.shape[1]
    plain_causal = is_causal and len_q == len_k
    if key_padding_mask is None and attn_mask is None and (not is_causal or plain_causal):
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=plain_causal, scale=scale, enable_gqa=grouped
        )
        return out, None

    masks = merge_masks(
        len_q,
        len_k,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        is_causal=is_causal,
        device=q.device,
    )
    hidden_rows = masks.fully_masked_rows()  # (..., Nq, 1) or None
    if masks.bias is None:
        sdpa_mask = masks.allowed  # SDPA: True = allowed
        if hidden_rows is not None:
            sdpa_mask = sdpa_mask | hidden_rows
    else:
        sdpa_mask = masks.bias.to(q.dtype)
        if masks.allowed is not None:
            sdpa_mask = sdpa_mask.masked_fill(~masks.allowed, float("-inf"))
        if hidden_rows is not None:
            sdpa_mask = sdpa_mask.masked_fill(hidden_rows, 0.0)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, scale=scale, enable_gqa=grouped
    )
    if hidden_rows is not None:
        out = out.masked_fill(hidden_rows, 0.0)
    return out, None
