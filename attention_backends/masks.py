"""Mask handling shared by the backends.

The backend contract uses torch.nn.MultiheadAttention's conventions: ``key_padding_mask`` (B, Nk) bool,
True = ignore the key; ``attn_mask`` bool (True = not allowed) or float (added to the scores),
broadcastable to (B, Hq, Nq, Nk); ``is_causal`` aligned bottom-right (query i sees key j iff
j <= i + Nk - Nq).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def causal_allowed(len_q: int, len_k: int, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right causal mask, True = allowed.

    Shape:
        returns (Nq, Nk): entry (i, j) is True iff j <= i + (Nk - Nq).
    """
    rows = torch.arange(len_q, device=device).unsqueeze(1)  # (Nq, 1)
    cols = torch.arange(len_k, device=device).unsqueeze(0)  # (1, Nk)
    return cols <= rows + (len_k - len_q)


def lengths_to_masks(
    seqlens_k: Tensor, len_q: int, len_k: int, *, is_causal: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-sequence key lengths as masks, for backends without native ``seqlens_k``.

    Sequence b has the keys ``0 .. seqlens_k[b] - 1`` (lengths clamped into [0, Nk]); with ``is_causal`` its
    queries align bottom-right to its own length: query i sees key j iff j <= i + seqlens_k[b] - Nq.

    Shape:
        seqlens_k: (B,) integer.
        returns key padding (B, Nk) bool (True = ignore) and, with ``is_causal``, the per-sequence causal
        mask (B, 1, Nq, Nk) bool (True = not allowed), else None.
    """
    lengths = seqlens_k.long().clamp(0, len_k)  # (B,)
    keys = torch.arange(len_k, device=seqlens_k.device)  # (Nk,)
    padding = keys[None, :] >= lengths[:, None]  # (B, Nk)
    if not is_causal:
        return padding, None
    rows = torch.arange(len_q, device=seqlens_k.device)  # (Nq,)
    limit = rows[None, :, None] + (lengths[:, None, None] - len_q)  # (B, Nq, 1)
    hidden = keys[None, None, :] > limit  # (B, Nq, Nk)
    return padding, hidden[:, None]


@dataclass(frozen=True)
class MergedMask:
    """Every mask of a call folded into at most one bool and one float tensor.

    ``allowed`` is bool (True = the query may see the key) and ``bias`` float (added to the scores);
    either may be None, and both broadcast to (B, Hq, Nq, Nk).
    """

    allowed: Tensor | None
    bias: Tensor | None

    @property
    def empty(self) -> bool:
        return self.allowed is None and self.bias is None

    def fully_masked_rows(self) -> Tensor | None:
        """Bool (..., Nq, 1), True where a query row has no visible key; None if there can't be one."""
        hidden = None
        if self.allowed is not None:
            hidden = ~self.allowed.any(dim=-1, keepdim=True)
        if self.bias is not None:
            bias_hidden = torch.isneginf(self.bias)
            if self.allowed is not None:
                bias_hidden = bias_hidden | ~self.allowed
            bias_rows = bias_hidden.all(dim=-1, keepdim=True)
            hidden = bias_rows if hidden is None else hidden | bias_rows
        return hidden


def merge_masks(
    len_q: int,
    len_k: int,
    *,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    device: torch.device,
) -> MergedMask:
    """Fold key padding, attn_mask and bottom-right causal masking into a ``MergedMask``.

    Shape:
        key_padding_mask: (B, Nk) bool, True = ignore.
        attn_mask: bool (True = not allowed) or float, broadcastable to (B, Hq, Nq, Nk).
    """
    allowed: Tensor | None = None
    bias: Tensor | None = None
    if key_padding_mask is not None:
        allowed = (~key_padding_mask)[:, None, None, :]  # (B, 1, 1, Nk)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            extra = ~attn_mask
            allowed = extra if allowed is None else allowed & extra
        else:
            bias = attn_mask
    if is_causal:
        causal = causal_allowed(len_q, len_k, device)  # (Nq, Nk)
        allowed = causal if allowed is None else allowed & causal
    return MergedMask(allowed=allowed, bias=bias)
