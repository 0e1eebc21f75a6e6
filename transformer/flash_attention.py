"""Flash-backed attention modules and the functional entry, under the names the seed API uses.

``FlashAttention`` and ``CUDAMultiHeadAttention`` are ``MultiHeadAttention`` pinned to the ``flash``
backend (batch-first); ``flash_attention_cuda`` is the functional form. Where the flash kernels can't serve
a call (no extension, an unsupported dtype or mask, dropout in training) the registry falls back to sdpa
with a one-time warning, or raises when ``strict``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attention_backends import attention

from .attention import MultiHeadAttention

__all__ = ["CUDAMultiHeadAttention", "FlashAttention", "flash_attention_cuda"]


def flash_attention_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    need_weights: bool = False,
    strict: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Flash attention on (B, H, N, D) tensors: ``attention(..., backend="flash")``.

    Shape:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D); key_padding_mask: (B, Nk) bool, True = ignore.
        returns out (B, Hq, Nq, D) and weights (B, Hq, Nq, Nk) when ``need_weights``, else None.
    """
    return attention(
        q,
        k,
        v,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        scale=scale,
        need_weights=need_weights,
        backend="flash",
        strict=strict,
    )


class CUDAMultiHeadAttention(MultiHeadAttention):
    """``torch.nn.MultiheadAttention`` drop-in on the flash kernels, batch-first.

    Made to replace ``self_attn`` in an ``EncoderLayer`` subclass:
    ``self.self_attn = CUDAMultiHeadAttention(d_model, num_heads, dropout)``.

    Shape:
        query (B, Nq, E), key and value (B, Nk, E); returns (B, Nq, E) and the weights like nn.MultiheadAttention.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        num_kv_heads: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            batch_first=True,
            device=device,
            dtype=dtype,
            backend="flash",
            num_kv_heads=num_kv_heads,
        )


class FlashAttention(CUDAMultiHeadAttention):
    """Multi-head attention module on the flash kernels with a batch-first, weights-off-by-default forward.

    Args:
        d_model: model width E.
        num_heads: query heads H (E divisible by H).
        num_kv_heads: key/value heads for grouped-query attention (default H).
        bias: biases in the projections.

    Shape:
        q: (B, Nq, E); k, v: (B, Nk, E); key_padding_mask: (B, Nk) bool, True = ignore.
        returns output (B, Nq, E) and attn_weights (B, H, Nq, Nk) when ``need_weights`` (exact, recomputed
        from the kernel's log-sum-exp), else None.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(d_model, num_heads, bias=bias, num_kv_heads=num_kv_heads, device=device, dtype=dtype)

    def forward(  # type: ignore[override]
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        return super().forward(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            average_attn_weights=False,
            is_causal=is_causal,
        )
