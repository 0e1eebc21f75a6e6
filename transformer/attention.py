"""Multi-head attention that mirrors ``torch.nn.MultiheadAttention`` and runs on a registry backend.

The module keeps torch's constructor arguments, parameter names, forward signature and return
values, so ``load_state_dict(torch_mha.state_dict())`` works both ways and it can replace the
``self_attn`` of ``torch.nn.TransformerEncoderLayer``. The attention itself is computed by
``attention_backends.attention``; the backend is looked up at call time, so ``use_backend(...)``
or ``set_default_backend(...)`` switches a built model without rebuilding it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from attention_backends import attention

from .kv_cache import CachedKeys, CrossAttentionCache, SelfAttentionCache

__all__ = ["MultiHeadAttention"]


def check_input_tensors(module: torch.nn.Module, **inputs: Tensor | None) -> None:
    """Named errors for inputs the projections would reject with an anonymous matmul error.

    Each input must be a floating-point tensor on the parameters' device and, outside autocast, of the
    parameters' dtype (TypeError for a dtype, ValueError for a device).
    """
    param = next(module.parameters())
    for name, t in inputs.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(
                f"{type(module).__name__}: expected {name} to be a Tensor, got {type(t).__name__}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{type(module).__name__}: expected {name} to be floating point, got {t.dtype}")
        if t.device != param.device:
            raise ValueError(
                f"{type(module).__name__}: expected {name} on the module's device {param.device}, got {t.device}"
            )
        if t.dtype != param.dtype and not torch.is_autocast_enabled(t.device.type):
            raise TypeError(
                f"{type(module).__name__}: expected {name} to have the module's dtype {param.dtype}, "
                f"got {t.dtype}"
            )


class MultiHeadAttention(nn.Module):
    """Drop-in replacement for ``torch.nn.MultiheadAttention`` with pluggable attention backends.

    Args:
        embed_dim: model width ``E``.
        num_heads: number of query heads ``H``; ``E`` must be divisible by it.
        dropout: dropout probability on the attention weights (only applied in training mode).
        bias: add biases to the input and output projections.
        add_bias_kv: not supported (must be False).
        add_zero_attn: not supported (must be False).
        kdim: feature size of ``key`` (default ``E``).
        vdim: feature size of ``value`` (default ``E``).
        batch_first: inputs and outputs are (N, L, E) instead of (L, N, E).
        device: device of the parameters.
        dtype: dtype of the parameters.
        backend: attention backend name; None uses the registry default at call time.
        num_kv_heads: number of key/value heads for grouped-query attention (default ``H``);
            ``H`` must be divisible by it.

    Parameters follow torch's names: ``in_proj_weight`` (3E, E) when ``kdim == vdim == E`` and
    ``num_kv_heads == num_heads``, otherwise ``q_proj_weight`` (E, E), ``k_proj_weight``
    (Hkv * Dh, kdim), ``v_proj_weight`` (Hkv * Dh, vdim); ``in_proj_bias`` (E + 2 * Hkv * Dh);
    ``out_proj`` a Linear (E, E).

    Shape (``E`` = embed_dim, ``H`` = num_heads, ``Hkv`` = num_kv_heads, ``Dh = E // H``)::

        query        (L, N, E), or (N, L, E) when batch_first, or (L, E) unbatched
        key          (S, N, kdim) / (N, S, kdim) / (S, kdim)
        value        (S, N, vdim) / (N, S, vdim) / (S, vdim)
        key_padding_mask  (N, S) or (S,): bool (True = ignore) or float (added to the scores)
        attn_mask    (L, S) or (N * H, L, S): bool (True = not allowed) or float (added)
        attn_output  like query, with E features
        attn_weights (N, L, S) averaged over heads, or (N, H, L, S); (L, S) / (H, L, S) unbatched

    Inside ``torch.nn.TransformerEncoderLayer`` the layer's fused inference fast path is never taken
    (see ``_qkv_same_embed_dim``), so the backend always runs. Swap the module into the layer before
    wrapping the layer in ``torch.nn.TransformerEncoder`` (whose nested-tensor path is then disabled).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        num_kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be positive, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        if kdim <= 0 or vdim <= 0:
            raise ValueError(f"kdim and vdim must be positive, got kdim={kdim}, vdim={vdim}")
        if add_bias_kv:
            raise NotImplementedError("MultiHeadAttention does not support add_bias_kv=True")
        if add_zero_attn:
            raise NotImplementedError("MultiHeadAttention does not support add_zero_attn=True")

        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim
        self.vdim = vdim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.dropout = dropout
        self.batch_first = batch_first
        self.backend = backend
        # Attributes torch's module exposes; kept for code that inspects them.
        self.bias_k = None
        self.bias_v = None
        self.add_zero_attn = False
        self._packed_in_proj = kdim == embed_dim and vdim == embed_dim and num_kv_heads == num_heads

        if self._packed_in_proj:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(self.kv_dim, kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(self.kv_dim, vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * self.kv_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """Always False, so torch's fused encoder-layer fast path never bypasses ``forward``.

        ``torch.nn.TransformerEncoderLayer`` (in eval mode without grad) reads this flag and, when it
        is True, runs its own fused kernel on ``in_proj_weight`` instead of calling this module; the
        attention backend would then be skipped. Whether the projection is packed is
        ``self._packed_in_proj``.
        """
        return False

    def _reset_parameters(self) -> None:
        """Initialise like torch: Xavier-uniform input projections, zero biases."""
        if self._packed_in_proj:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}, backend={self.backend!r}"
        )

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Input projections on batch-first tensors: (N, L, E), (N, S, kdim), (N, S, vdim)."""
        e, kv = self.embed_dim, self.kv_dim
        b = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if b is None else b.split([e, kv, kv])
        if self._packed_in_proj:
            w = self.in_proj_weight
            if query is key and key is value:
                # Self-attention: one matmul for q, k and v.
                return F.linear(query, w, b).split([e, kv, kv], dim=-1)
            w_q, w_k, w_v = w.split([e, kv, kv])
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_cache: SelfAttentionCache | CrossAttentionCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query, key, value: see the shape block in the class docstring.
            key_padding_mask: (N, S) bool (True = ignore the key) or float (added to the scores).
            need_weights: also return the attention weights.
            attn_mask: (L, S) or (N * H, L, S), bool (True = not allowed) or float (added).
            average_attn_weights: average the returned weights over heads.
            is_causal: causal (bottom-right aligned) masking when ``attn_mask`` is None; when an
                ``attn_mask`` is given it is used as is (``is_causal`` is then only a hint, as in torch).
            kv_cache: incremental decoding (batch-first, batched input only; see ``_forward_cached``).
                A ``SelfAttentionCache`` appends the new keys/values and attends to all cached ones;
                a ``CrossAttentionCache`` projects ``key``/``value`` on the first call only.

        Returns:
            ``(attn_output, attn_weights)``; ``attn_weights`` is None unless ``need_weights``. A query
            whose keys are all masked gets zero output and weights (torch's module gives NaN there).
        """
        check_input_tensors(self, query=query, key=key, value=value)
        is_batched = query.dim() == 3
        self._check_inputs(query, key, value, is_batched)
        if kv_cache is not None:
            if attn_mask is not None:
                raise ValueError("MultiHeadAttention with a kv_cache takes no attn_mask")
            out, weights = self._forward_cached(
                query, key, value, kv_cache, key_padding_mask, need_weights, is_causal
            )
            if need_weights and weights is not None and average_attn_weights:
                weights = weights.mean(dim=1)  # (N, L, Nk)
            return out, weights
        if not is_batched:
            # (L, E) -> (1, L, E)
            query, key, value = _map_keeping_identity(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            # (L, N, E) -> (N, L, E)
            query, key, value = _map_keeping_identity(
                lambda t: rearrange(t, "l n e -> n l e"), query, key, value
            )
        n, tgt_len, src_len = query.shape[0], query.shape[1], key.shape[1]

        q, k, v = self._project(query, key, value)
        q = rearrange(q, "n l (h d) -> n h l d", h=self.num_heads)  # (N, H, L, Dh)
        k = rearrange(k, "n s (h d) -> n h s d", h=self.num_kv_heads)  # (N, Hkv, S, Dh)
        v = rearrange(v, "n s (h d) -> n h s d", h=self.num_kv_heads)  # (N, Hkv, S, Dh)

        key_padding_mask, attn_mask = self._merge_masks(key_padding_mask, attn_mask, n, tgt_len, src_len, q)
        causal = bool(is_causal) and attn_mask is None

        out, weights = attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            backend=self.backend,
        )
        out = self.out_proj(rearrange(out, "n h l d -> n l (h d)"))  # (N, L, E)

        if need_weights and weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (N, L, S)
        if not need_weights:
            weights = None
        if not is_batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = rearrange(out, "n l e -> l n e")
        return out, weights

    def _forward_cached(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        kv_cache: SelfAttentionCache | CrossAttentionCache,
        key_padding_mask: Tensor | None,
        need_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention against cached keys/values.

        The self-attention cache receives the keys/values of the new positions and returns all the
        filled ones; the query positions are the last ``L`` of each sequence's keys, so bottom-right causal
        masking is exact; when the per-sequence lengths differ the cache supplies them as ``seqlens_k``
        (served natively by flash, as masks by the other backends). For
        cross-attention ``key``/``value`` are projected on the first call only.

        Shape::

            query             (N, L, E)
            key, value        (N, S, kdim) / (N, S, vdim): the new positions (self-attention) or the
                              memory (cross-attention; ignored once cached)
            key_padding_mask  (N, Nk) bool or None, combined with the cache's own mask
            returns           (N, L, E) and weights (N, H, L, Nk) or None
        """
        if query.dim() != 3 or not self.batch_first:
            raise ValueError("MultiHeadAttention with a kv_cache needs batched, batch-first input")
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            raise TypeError(f"with a kv_cache, key_padding_mask must be bool, got {key_padding_mask.dtype}")
        if kv_cache.needs_projection:
            q, k, v = self._project(query, key, value)
            k = rearrange(k, "n s (h d) -> n h s d", h=self.num_kv_heads)  # (N, Hkv, S, Dh)
            v = rearrange(v, "n s (h d) -> n h s d", h=self.num_kv_heads)  # (N, Hkv, S, Dh)
            cached: CachedKeys = kv_cache.update(k, v)
        else:
            e = self.embed_dim
            w_q = self.in_proj_weight[:e] if self._packed_in_proj else self.q_proj_weight
            b_q = None if self.in_proj_bias is None else self.in_proj_bias[:e]
            q = F.linear(query, w_q, b_q)
            cached = kv_cache.update(None, None)
        q = rearrange(q, "n l (h d) -> n h l d", h=self.num_heads)  # (N, H, L, Dh)

        out, weights = attention(
            q,
            cached.k,
            cached.v,
            key_padding_mask=key_padding_mask,
            seqlens_k=cached.seqlens_k,  # sequences filled to different lengths: each sees its own
            is_causal=bool(is_causal),
            dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights,
            backend=self.backend,
        )
        out = self.out_proj(rearrange(out, "n h l d -> n l (h d)"))  # (N, L, E)
        return out, weights if need_weights else None

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor, is_batched: bool) -> None:
        """Raise ValueError on inputs of the wrong rank or width (types, dtypes, devices: ``check_input_tensors``)."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must have the same number of dims, got {query.dim()}, "
                f"{key.dim()} and {value.dim()}"
            )
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query has {query.shape[-1]} features, expected embed_dim={self.embed_dim}")
        if key.shape[-1] != self.kdim:
            raise ValueError(f"key has {key.shape[-1]} features, expected kdim={self.kdim}")
        if value.shape[-1] != self.vdim:
            raise ValueError(f"value has {value.shape[-1]} features, expected vdim={self.vdim}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes do not match")
        if is_batched:
            batch_dim = 0 if self.batch_first else 1
            if query.shape[batch_dim] != key.shape[batch_dim]:
                raise ValueError(
                    f"query and key batch sizes differ: {query.shape[batch_dim]} vs {key.shape[batch_dim]}"
                )

    def _merge_masks(
        self,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        n: int,
        tgt_len: int,
        src_len: int,
        q: Tensor,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Convert torch-MHA masks to the backend contract.

        Returns ``(key_padding_mask (N, S) bool or None, attn_mask or None)`` where the attention
        mask is bool or float and broadcastable to (N, H, L, S). A float key padding mask is added to
        the attention mask, because the backends take key padding as bool only.
        """
        if attn_mask is not None:
            if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
                raise ValueError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise ValueError(
                        f"2-D attn_mask must have shape {(tgt_len, src_len)}, got {tuple(attn_mask.shape)}"
                    )
                attn_mask = rearrange(attn_mask, "l s -> 1 1 l s")
            elif attn_mask.dim() == 3:
                expected = (n * self.num_heads, tgt_len, src_len)
                if attn_mask.shape != expected:
                    raise ValueError(
                        f"3-D attn_mask must have shape {expected}, got {tuple(attn_mask.shape)}"
                    )
                attn_mask = rearrange(attn_mask, "(n h) l s -> n h l s", h=self.num_heads)
            else:
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        if key_padding_mask is None:
            return None, attn_mask
        if key_padding_mask.shape != (n, src_len):
            raise ValueError(
                f"key_padding_mask must have shape {(n, src_len)}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.dtype == torch.bool:
            return key_padding_mask, attn_mask
        if not key_padding_mask.is_floating_point():
            raise ValueError(f"key_padding_mask must be bool or floating point, got {key_padding_mask.dtype}")
        additive = rearrange(key_padding_mask, "n s -> n 1 1 s")
        if attn_mask is None:
            return None, additive
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=additive.dtype, device=q.device).masked_fill(
                attn_mask, float("-inf")
            )
        return None, attn_mask + additive


def _map_keeping_identity(fn: Callable[[Tensor], Tensor], *tensors: Tensor) -> list[Tensor]:
    """Apply ``fn`` to each tensor once, so that inputs that were the same object stay the same object."""
    done: dict[int, Tensor] = {}
    out = []
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = fn(t)
        out.append(done[id(t)])
    return out
