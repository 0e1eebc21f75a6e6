"""Transformer encoder and decoder layers built on ``MultiHeadAttention``.

The layers call their attention modules with ``torch.nn.MultiheadAttention``'s signature, so a subclass
may replace ``self_attn`` / ``multihead_attn`` with torch's module (``batch_first`` must match the
layer's). Residual connections and normalisation live in ``_add_norm`` / ``_add_then_norm`` / ``_add``.
With ``fused_add_norm`` (the default) each residual add and the LayerNorm that follows it run as one
fused op (``transformer.add_layernorm``): post-norm ``norm(x + sublayer(x))``, and in pre-norm layers
the add after a sublayer together with the next sublayer's norm (the layer's last add stays plain).
The norms stay ``nn.LayerNorm`` modules (same state_dict); a norm that is not an affine ``nn.LayerNorm``
is applied unfused.

Shapes (batch_first=True; swap the first two dims otherwise)::

    src / tgt              (B, S, E) / (B, T, E)
    memory                 (B, S, E)
    *_key_padding_mask     (B, S) or (B, T), bool (True = ignore) or float (added)
    *_mask                 (T, S) or (B * H, T, S), bool (True = not allowed) or float (added)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .add_layernorm import add_layernorm
from .attention import MultiHeadAttention
from .kv_cache import CrossAttentionCache, LayerKVCache, SelfAttentionCache

__all__ = ["DecoderLayer", "EncoderLayer", "causal_mask", "resolve_activation"]

Activation = str | Callable[[Tensor], Tensor]


def resolve_activation(activation: Activation) -> Callable[[Tensor], Tensor]:
    """Map ``"relu"`` / ``"gelu"`` to the function; callables pass through; anything else: ValueError."""
    if callable(activation):
        return activation
    if activation == "relu":
        return F.relu
    if activation == "gelu":
        return F.gelu
    raise ValueError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")


def causal_mask(tgt_len: int, src_len: int | None = None, device: torch.device | None = None) -> Tensor:
    """Bool causal mask, True = not allowed, bottom-right aligned (query i sees key j iff j <= i + S - T).

    Shape:
        returns (T, S)
    """
    src_len = tgt_len if src_len is None else src_len
    offset = src_len - tgt_len
    return torch.ones(tgt_len, src_len, dtype=torch.bool, device=device).triu(diagonal=offset + 1)


def _check_layer_args(d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
    if d_model <= 0 or num_heads <= 0 or d_model % num_heads != 0:
        raise ValueError(f"d_model ({d_model}) must be a positive multiple of num_heads ({num_heads})")
    if dim_feedforward <= 0:
        raise ValueError(f"dim_feedforward must be positive, got {dim_feedforward}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class _SublayerMixin:
    """Residual plumbing shared by both layers."""

    norm_first: bool
    batch_first: bool
    fused_add_norm: bool

    def _seq_dim(self, x: Tensor) -> int:
        """Index of the sequence dim of ``x``: 1 for batched batch-first input, else 0."""
        return 1 if self.batch_first and x.dim() == 3 else 0

    def _fuses(self, norm: nn.Module) -> bool:
        """Whether an add followed by ``norm`` runs as the fused op: the flag is on and ``norm`` is an
        ``nn.LayerNorm`` over the last dim with a weight."""
        return (
            getattr(self, "fused_add_norm", False)
            and isinstance(norm, nn.LayerNorm)
            and norm.elementwise_affine
            and len(norm.normalized_shape) == 1
        )

    def _add_norm(self, x: Tensor, sublayer_out: Tensor, norm: nn.Module) -> Tensor:
        """Post-norm step: ``norm(x + sublayer_out)``."""
        if self._fuses(norm):
            return add_layernorm(x, sublayer_out, norm.weight, norm.bias, norm.eps)[0]
        return norm(x + sublayer_out)

    def _add_then_norm(self, x: Tensor, sublayer_out: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
        """Pre-norm step between two sublayers: the new residual ``s = x + sublayer_out`` and ``norm(s)``,
        the next sublayer's input."""
        if self._fuses(norm):
            y, s = add_layernorm(x, sublayer_out, norm.weight, norm.bias, norm.eps)
            return s, y
        s = self._add(x, sublayer_out)
        return s, norm(s)

    def _add(self, x: Tensor, sublayer_out: Tensor) -> Tensor:
        """Pre-norm step: ``x + sublayer_out`` (the input was normalised before the sublayer)."""
        return x + sublayer_out

    def _self_attention_kwargs(
        self, attn: nn.Module, x: Tensor, attn_mask: Tensor | None, is_causal: bool
    ) -> dict[str, Tensor | bool | None]:
        """Mask arguments for a self-attention call.

        This package's ``MultiHeadAttention`` gets ``is_causal=True`` without a mask (the backend's
        fast causal path). Any other module (e.g. ``torch.nn.MultiheadAttention``, which needs a mask whenever
        ``is_causal`` is set) gets an explicit bool causal mask.
        """
        if is_causal and attn_mask is None and not isinstance(attn, MultiHeadAttention):
            seq_len = x.shape[self._seq_dim(x)]
            attn_mask = causal_mask(seq_len, device=x.device)
        return {"attn_mask": attn_mask, "is_causal": is_causal}


class EncoderLayer(_SublayerMixin, nn.Module):
    """Self-attention + feed-forward block, post-norm (default) or pre-norm.

    Args:
        d_model: model width ``E``.
        num_heads: attention heads; ``d_model`` must be divisible by it.
        dim_feedforward: hidden width of the feed-forward block.
        dropout: dropout on the attention weights, after each sublayer and inside the feed-forward block.
        activation: ``"relu"``, ``"gelu"`` or a callable.
        norm_first: pre-norm (LayerNorm before each sublayer) instead of post-norm.
        layer_norm_eps: LayerNorm epsilon.
        batch_first: inputs are (B, S, E) instead of (S, B, E).
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        backend: attention backend name; None uses the registry default at call time.
        bias: biases in the linear layers and LayerNorms.
        fused_add_norm: run each residual add and the LayerNorm after it as one fused op
            (``transformer.add_layernorm``; unfused torch ops where it can't serve the call).

    Shape:
        src: (B, S, E) (or (S, B, E)); src_mask: (S, S) or (B * H, S, S); src_key_padding_mask: (B, S).
        returns (B, S, E) (or (S, B, E)).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        num_kv_heads: int | None = None,
        backend: str | None = None,
        bias: bool = True,
        fused_add_norm: bool = True,
    ) -> None:
        super().__init__()
        _check_layer_args(d_model, num_heads, dim_feedforward, dropout)
        self.self_attn = MultiHeadAttention(
            d_model,
            num_heads,
            dropout=dropout,
            bias=bias,
            batch_first=batch_first,
            num_kv_heads=num_kv_heads,
            backend=backend,
        )
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = resolve_activation(activation)
        self.norm_first = norm_first
        self.batch_first = batch_first
        self.fused_add_norm = fused_add_norm

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Encode ``src``; ``is_causal`` makes the self-attention causal."""
        x = src
        if self.norm_first:
            x, h = self._add_then_norm(
                x, self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal), self.norm2
            )
            x = self._add(x, self._ff_block(h))
        else:
            x = self._add_norm(x, self._sa_block(x, src_mask, src_key_padding_mask, is_causal), self.norm1)
            x = self._add_norm(x, self._ff_block(x), self.norm2)
        return x

    def _sa_block(
        self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """Self-attention sublayer output (before the residual add)."""
        masks = self._self_attention_kwargs(self.self_attn, x, attn_mask, is_causal)
        x = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False, **masks)[0]
        return self.dropout1(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        """Feed-forward sublayer output (before the residual add)."""
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout2(x)


class DecoderLayer(_SublayerMixin, nn.Module):
    """Causal self-attention + cross-attention + feed-forward block, post-norm (default) or pre-norm.

    Args: as ``EncoderLayer``. The cross-attention module is ``multihead_attn``.

    Shape:
        tgt: (B, T, E); memory: (B, S, E); tgt_mask: (T, T) or (B * H, T, T);
        memory_mask: (T, S) or (B * H, T, S); tgt_key_padding_mask: (B, T);
        memory_key_padding_mask: (B, S). returns (B, T, E). (Sequence-first when batch_first=False.)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = True,
        num_kv_heads: int | None = None,
        backend: str | None = None,
        bias: bool = True,
        fused_add_norm: bool = True,
    ) -> None:
        super().__init__()
        _check_layer_args(d_model, num_heads, dim_feedforward, dropout)
        attn_kwargs = {
            "dropout": dropout,
            "bias": bias,
            "batch_first": batch_first,
            "num_kv_heads": num_kv_heads,
            "backend": backend,
        }
        self.self_attn = MultiHeadAttention(d_model, num_heads, **attn_kwargs)
        self.multihead_attn = MultiHeadAttention(d_model, num_heads, **attn_kwargs)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = resolve_activation(activation)
        self.norm_first = norm_first
        self.batch_first = batch_first
        self.fused_add_norm = fused_add_norm

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = True,
        memory_is_causal: bool = False,
        *,
        layer_cache: LayerKVCache | None = None,
    ) -> Tensor:
        """Decode ``tgt`` attending to ``memory``; self-attention is causal unless ``tgt_is_causal=False``.

        With ``layer_cache`` (incremental decoding), ``tgt`` (B, n, E) holds only the new positions:
        their keys/values are appended to the self-attention cache and the queries attend to every
        cached position (bottom-right causal); the memory's keys/values are projected on the first
        call and reused afterwards. ``tgt_key_padding_mask`` then covers the cached keys (B, Nk).
        """
        sa_cache = ca_cache = None
        if layer_cache is not None:
            if not (
                isinstance(self.self_attn, MultiHeadAttention)
                and isinstance(self.multihead_attn, MultiHeadAttention)
            ):
                raise TypeError("layer_cache needs MultiHeadAttention self- and cross-attention modules")
            sa_cache, ca_cache = layer_cache.self_attn, layer_cache.cross_attn
        x = tgt
        if self.norm_first:
            x, h = self._add_then_norm(
                x,
                self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal, sa_cache),
                self.norm2,
            )
            x, h = self._add_then_norm(
                x,
                self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal, ca_cache),
                self.norm3,
            )
            x = self._add(x, self._ff_block(h))
        else:
            x = self._add_norm(
                x, self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal, sa_cache), self.norm1
            )
            x = self._add_norm(
                x,
                self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal, ca_cache),
                self.norm2,
            )
            x = self._add_norm(x, self._ff_block(x), self.norm3)
        return x

    def _sa_block(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        kv_cache: SelfAttentionCache | None = None,
    ) -> Tensor:
        """Self-attention sublayer output (before the residual add)."""
        if kv_cache is not None:  # our MultiHeadAttention (checked by forward): masks as given
            masks = {"attn_mask": attn_mask, "is_causal": is_causal, "kv_cache": kv_cache}
        else:
            masks = self._self_attention_kwargs(self.self_attn, x, attn_mask, is_causal)
        x = self.self_attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False, **masks)[0]
        return self.dropout1(x)

    def _mha_block(
        self,
        x: Tensor,
        memory: Tensor,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        kv_cache: CrossAttentionCache | None = None,
    ) -> Tensor:
        """Cross-attention sublayer output (before the residual add)."""
        if is_causal and attn_mask is None and not isinstance(self.multihead_attn, MultiHeadAttention):
            seq_dim = self._seq_dim(x)
            attn_mask = causal_mask(x.shape[seq_dim], memory.shape[seq_dim], device=x.device)
        cache_kwargs = {} if kv_cache is None else {"kv_cache": kv_cache}
        x = self.multihead_attn(
            x,
            memory,
            memory,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=False,
            is_causal=is_causal,
            **cache_kwargs,
        )[0]
        return self.dropout2(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        """Feed-forward sublayer output (before the residual add)."""
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.dropout3(x)
