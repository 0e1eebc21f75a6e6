"""Key/value caches for incremental decoding.

A ``KVCache`` holds, for every decoder layer, preallocated self-attention buffers ``k``, ``v`` of shape
(B, Hkv, max_len, D) and the per-sequence number of filled positions ``lengths`` (B,), plus the
cross-attention keys and values of the encoder memory, computed once per source and reused every step.
With grouped-query attention the buffers hold only the Hkv key/value heads.

Buffers are allocated at full size on a layer's first append, with the dtype, device, head count and
head dim of the keys it receives (so that ``torch.autocast`` decides the cache dtype, as it does for the
projections).

Shapes::

    k, v (per layer)       (B, Hkv, max_len, D)
    lengths                (B,) int64, filled positions per sequence (shared by all layers)
    cross k, v (per layer) (B, Hkv, S, D)
    filled views           (B, Hkv, Nk, D), Nk = the longest filled length after the append
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import repeat
from torch import Tensor

__all__ = ["CachedKeys", "CrossAttentionCache", "KVCache", "LayerKVCache", "SelfAttentionCache"]


@dataclass(frozen=True)
class CachedKeys:
    """Keys and values to attend to after a cache update, with the masks they need.

    Shape::

        k, v       (B, Hkv, Nk, D)
        seqlens_k  (B,) int32, the filled length of each sequence after the append; None when every
                   sequence has all Nk keys (then bottom-right ``is_causal`` is already right for each)
    """

    k: Tensor
    v: Tensor
    seqlens_k: Tensor | None = None


class KVCache:
    """Per-layer self-attention buffers plus cross-attention keys/values for one batch of sequences.

    Args:
        num_layers: decoder layers.
        batch_size: sequences ``B``.
        max_len: capacity in positions of every self-attention buffer.
        lengths: initial filled positions per sequence (B,); default all 0.

    Appends write each sequence's new keys at its own position ``lengths[b]``; ``advance`` moves the
    lengths on once every layer has appended. While all sequences share one length (lock-step decoding)
    the writes are plain slices and no key padding mask is needed.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, lengths: Tensor | None = None) -> None:
        if num_layers < 1 or batch_size < 0 or max_len < 1:
            raise ValueError(
                f"need num_layers >= 1, batch_size >= 0 and max_len >= 1, got {num_layers}, "
                f"{batch_size} and {max_len}"
            )
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.max_len = max_len
        self.k: list[Tensor | None] = [None] * num_layers
        self.v: list[Tensor | None] = [None] * num_layers
        self.cross_k: list[Tensor | None] = [None] * num_layers
        self.cross_v: list[Tensor | None] = [None] * num_layers
        if lengths is None:
            self.lengths = torch.zeros(batch_size, dtype=torch.long)
            self._uniform: int | None = 0
        else:
            if lengths.shape != (batch_size,):
                raise ValueError(f"lengths must have shape ({batch_size},), got {tuple(lengths.shape)}")
            self.lengths = lengths.to(torch.long).clone()
            if batch_size and (int(self.lengths.min()) < 0 or int(self.lengths.max()) > max_len):
                raise ValueError(f"lengths must lie in [0, {max_len}], got {self.lengths.tolist()}")
            if batch_size == 0:
                self._uniform = 0
            elif bool((self.lengths == self.lengths[0]).all()):
                self._uniform = int(self.lengths[0])
            else:
                self._uniform = None

    @property
    def uniform_length(self) -> int | None:
        """The filled length when every sequence has the same one, else None."""
        return self._uniform

    def layer(self, index: int) -> LayerKVCache:
        """The view of layer ``index``: its self-attention and cross-attention caches."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer index {index} out of range for {self.num_layers} layers")
        return LayerKVCache(SelfAttentionCache(self, index), CrossAttentionCache(self, index))

    def advance(self, n: int) -> None:
        """Count ``n`` more filled positions for every sequence (after all layers appended them)."""
        if self._uniform is not None and self._uniform + n > self.max_len:
            raise ValueError(f"cache overflow: {self._uniform} + {n} positions > max_len {self.max_len}")
        self.lengths = self.lengths + n
        if self._uniform is not None:
            self._uniform += n

    def nbytes(self) -> int:
        """Bytes held by the allocated buffers (self- and cross-attention, all layers)."""
        buffers = (*self.k, *self.v, *self.cross_k, *self.cross_v)
        return sum(t.numel() * t.element_size() for t in buffers if t is not None)

    def _append(self, index: int, k_new: Tensor, v_new: Tensor) -> CachedKeys:
        """Write ``k_new``/``v_new`` (B, Hkv, n, D) at each sequence's position; return the filled views."""
        batch, heads, n, dim = k_new.shape
        if batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} sequences, got keys for {batch}")
        if self.k[index] is None:
            shape = (batch, heads, self.max_len, dim)
            self.k[index] = torch.zeros(shape, dtype=k_new.dtype, device=k_new.device)
            self.v[index] = torch.zeros(shape, dtype=v_new.dtype, device=v_new.device)
        k_buf, v_buf = self.k[index], self.v[index]
        assert k_buf is not None and v_buf is not None
        if k_buf.shape[1] != heads or k_buf.shape[3] != dim:
            raise ValueError(
                f"cache layer {index} holds (Hkv, D) = {(k_buf.shape[1], k_buf.shape[3])}, got {(heads, dim)}"
            )
        if self._uniform is not None:
            start = self._uniform
            if start + n > self.max_len:
                raise ValueError(f"cache overflow: {start} + {n} positions > max_len {self.max_len}")
            k_buf[:, :, start : start + n] = k_new
            v_buf[:, :, start : start + n] = v_new
            return CachedKeys(k_buf[:, :, : start + n], v_buf[:, :, : start + n])

        lengths = self.lengths.to(k_new.device)  # (B,)
        new_lengths = lengths + n
        total = int(new_lengths.max())
        if total > self.max_len:
            raise ValueError(f"cache overflow: {total} positions > max_len {self.max_len}")
        steps = torch.arange(n, device=k_new.device)
        positions = lengths[:, None] + steps  # (B, n)
        index_4d = repeat(positions, "b n -> b h n d", h=heads, d=dim)
        k_buf.scatter_(2, index_4d, k_new)
        v_buf.scatter_(2, index_4d, v_new)
        # Sequence b holds new_lengths[b] keys; its query i sits at position lengths[b] + i, which is
        # attention's per-sequence bottom-right causal alignment (j <= i + seqlens_k[b] - n).
        return CachedKeys(k_buf[:, :, :total], v_buf[:, :, :total], new_lengths.to(torch.int32))


class SelfAttentionCache:
    """One layer's self-attention cache: new keys/values are appended, the filled views returned."""

    needs_projection = True

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache = cache
        self.index = index

    def update(self, k: Tensor, v: Tensor) -> CachedKeys:
        """Append ``k``, ``v`` (B, Hkv, n, D); return everything filled so far (B, Hkv, Nk, D)."""
        return self.cache._append(self.index, k, v)


class CrossAttentionCache:
    """One layer's cross-attention cache: the memory's keys/values, stored on the first call."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache = cache
        self.index = index

    @property
    def needs_projection(self) -> bool:
        """Whether the memory still has to be projected to keys/values (first step only)."""
        return self.cache.cross_k[self.index] is None

    def update(self, k: Tensor | None, v: Tensor | None) -> CachedKeys:
        """Store ``k``, ``v`` (B, Hkv, S, D) when given; return the stored keys/values."""
        if k is not None and v is not None:
            self.cache.cross_k[self.index] = k
            self.cache.cross_v[self.index] = v
        k_stored, v_stored = self.cache.cross_k[self.index], self.cache.cross_v[self.index]
        if k_stored is None or v_stored is None:
            raise RuntimeError(f"cross-attention cache of layer {self.index} is empty")
        return CachedKeys(k_stored, v_stored)


@dataclass(frozen=True)
class LayerKVCache:
    """The caches a ``DecoderLayer`` uses: ``self_attn`` (appended) and ``cross_attn`` (computed once)."""

    self_attn: SelfAttentionCache
    cross_attn: CrossAttentionCache
