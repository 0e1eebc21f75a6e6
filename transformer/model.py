"""Encoder and decoder stacks and a sequence-to-sequence ``Transformer`` with greedy decoding.

All tensors are batch-first. Positions are fixed sinusoidal encodings (not learned), added to the token
embeddings scaled by ``sqrt(d_model)``.

Shapes::

    src                    (B, S) token ids
    tgt_in                 (B, T) token ids (BOS + target, padded)
    src_key_padding_mask   (B, S) bool, True = padding
    tgt_key_padding_mask   (B, T) bool, True = padding
    logits                 (B, T, V)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .kv_cache import KVCache
from .layers import Activation, DecoderLayer, EncoderLayer

__all__ = ["Decoder", "Encoder", "SinusoidalPositionalEncoding", "Transformer"]


def _layer_stack(
    layer_class: type[EncoderLayer | DecoderLayer],
    num_layers: int,
    d_model: int,
    num_heads: int,
    dim_feedforward: int,
    dropout: float,
    activation: Activation,
    norm_first: bool,
    layer_norm_eps: float,
    num_kv_heads: int | None,
    backend: str | None,
    bias: bool,
    fused_add_norm: bool,
) -> tuple[nn.ModuleList, nn.LayerNorm | None]:
    """``num_layers`` batch-first layers of one class, and the final LayerNorm that pre-norm stacks need."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    layers = nn.ModuleList(
        layer_class(
            d_model,
            num_heads,
            dim_feedforward,
            dropout,
            activation,
            norm_first,
            layer_norm_eps,
            batch_first=True,
            num_kv_heads=num_kv_heads,
            backend=backend,
            bias=bias,
            fused_add_norm=fused_add_norm,
        )
        for _ in range(num_layers)
    )
    norm = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias) if norm_first else None
    return layers, norm


class Encoder(nn.Module):
    """A stack of ``EncoderLayer`` with a final LayerNorm when ``norm_first`` (pre-norm).

    Args: ``num_layers`` plus the ``EncoderLayer`` arguments (batch-first).

    Shape:
        src: (B, S, E); src_key_padding_mask: (B, S) bool. returns (B, S, E).
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        num_kv_heads: int | None = None,
        backend: str | None = None,
        bias: bool = True,
        fused_add_norm: bool = True,
    ) -> None:
        super().__init__()
        self.layers, self.norm = _layer_stack(
            EncoderLayer,
            num_layers,
            d_model,
            num_heads,
            dim_feedforward,
            dropout,
            activation,
            norm_first,
            layer_norm_eps,
            num_kv_heads,
            backend,
            bias,
            fused_add_norm,
        )

    def forward(self, src: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        x = src  # (B, S, E)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=src_key_padding_mask)
        return self.norm(x) if self.norm is not None else x


class Decoder(nn.Module):
    """A stack of ``DecoderLayer`` (causal self-attention) with a final LayerNorm when pre-norm.

    Args: ``num_layers`` plus the ``DecoderLayer`` arguments (batch-first).

    Shape:
        tgt: (B, T, E); memory: (B, S, E); tgt_key_padding_mask: (B, T) bool;
        memory_key_padding_mask: (B, S) bool. returns (B, T, E).
        With ``cache``: tgt (B, n, E) holds only the new positions; returns (B, n, E).
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        num_heads: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: Activation = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        num_kv_heads: int | None = None,
        backend: str | None = None,
        bias: bool = True,
        fused_add_norm: bool = True,
    ) -> None:
        super().__init__()
        self.layers, self.norm = _layer_stack(
            DecoderLayer,
            num_layers,
            d_model,
            num_heads,
            dim_feedforward,
            dropout,
            activation,
            norm_first,
            layer_norm_eps,
            num_kv_heads,
            backend,
            bias,
            fused_add_norm,
        )

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Run the stack; with ``cache``, append the new positions to it (and advance its lengths)."""
        if cache is not None and cache.num_layers != len(self.layers):
            raise ValueError(f"cache has {cache.num_layers} layers, the decoder {len(self.layers)}")
        x = tgt  # (B, T, E)
        for index, layer in enumerate(self.layers):
            x = layer(
                x,
                memory,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=True,
                **({} if cache is None else {"layer_cache": cache.layer(index)}),
            )
        if cache is not None:
            cache.advance(tgt.shape[1])
        return self.norm(x) if self.norm is not None else x


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sine/cosine position encodings, added to the input.

    Shape:
        x: (B, N, E) with offset + N <= max_len. returns (B, N, E).
    """

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        position = torch.arange(max_len, dtype=torch.float32)[:, None]  # (N, 1)
        inv_freq = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
        )
        table = torch.zeros(max_len, d_model)  # (N, E)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq)
        self.register_buffer("table", table, persistent=False)
        self.max_len = max_len

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Add the encodings of positions ``offset .. offset + N - 1``."""
        n = x.shape[1]
        if offset + n > self.max_len:
            raise ValueError(f"sequence length {offset + n} exceeds max_len {self.max_len}")
        return x + self.table[offset : offset + n].to(x.dtype)  # (B, N, E)


class Transformer(nn.Module):
    """Encoder-decoder Transformer for token sequences.

    Args:
        src_vocab_size: source vocabulary size.
        tgt_vocab_size: target vocabulary size ``V``.
        d_model: model width ``E`` (even: sinusoidal positions).
        num_heads: attention heads; ``d_model`` must be divisible by it.
        num_encoder_layers: encoder depth.
        num_decoder_layers: decoder depth.
        dim_feedforward: feed-forward hidden width.
        dropout: dropout probability (attention weights, sublayers, embeddings).
        max_len: longest source or target sequence (size of the position table).
        norm_first: pre-norm layers (with final norms) instead of post-norm.
        activation: ``"relu"``, ``"gelu"`` or a callable.
        tie_embeddings: share the output projection with the target embedding.
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        pad_id: padding token id (emitted by ``generate`` after EOS).
        backend: attention backend for every layer; None uses the registry default at call time.
        fused_add_norm: fused residual add + LayerNorm in every layer (``transformer.add_layernorm``).

    Shape:
        see the module docstring.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        max_len: int = 512,
        norm_first: bool = False,
        activation: Activation = "relu",
        tie_embeddings: bool = True,
        num_kv_heads: int | None = None,
        pad_id: int = 0,
        backend: str | None = None,
        fused_add_norm: bool = True,
    ) -> None:
        super().__init__()
        if src_vocab_size < 1 or tgt_vocab_size < 1:
            raise ValueError(
                f"vocab sizes must be positive, got src_vocab_size={src_vocab_size}, "
                f"tgt_vocab_size={tgt_vocab_size}"
            )
        if d_model <= 0 or num_heads <= 0 or d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if not 0 <= pad_id < tgt_vocab_size:
            raise ValueError(f"pad_id ({pad_id}) must be a target token id in [0, {tgt_vocab_size})")
        self.d_model = d_model
        self.pad_id = pad_id
        self.max_len = max_len
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model)
        self.positions = SinusoidalPositionalEncoding(d_model, max_len)
        self.embed_dropout = nn.Dropout(dropout)
        layer_kwargs = {
            "d_model": d_model,
            "num_heads": num_heads,
            "dim_feedforward": dim_feedforward,
            "dropout": dropout,
            "activation": activation,
            "norm_first": norm_first,
            "num_kv_heads": num_kv_heads,
            "backend": backend,
            "fused_add_norm": fused_add_norm,
        }
        self.encoder = Encoder(num_encoder_layers, **layer_kwargs)
        self.decoder = Decoder(num_decoder_layers, **layer_kwargs)
        self.output = nn.Linear(d_model, tgt_vocab_size, bias=False)
        self._reset_embeddings()
        if tie_embeddings:
            self.output.weight = self.tgt_embed.weight
        self.tie_embeddings = tie_embeddings

    def _reset_embeddings(self) -> None:
        """Embeddings with std 1/sqrt(E): unit scale after the sqrt(E) factor, and sane tied logits."""
        for embed in (self.src_embed, self.tgt_embed):
            nn.init.normal_(embed.weight, std=self.d_model**-0.5)

    def _embed(self, embed: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        x = embed(tokens) * math.sqrt(self.d_model)  # (B, N, E)
        return self.embed_dropout(self.positions(x, offset))

    def encode(self, src: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """Encoder output ``memory`` (B, S, E) for ``src`` (B, S)."""
        return self.encoder(self._embed(self.src_embed, src), src_key_padding_mask)

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for ``tgt_in`` (B, T) given ``memory`` (B, S, E).

        With ``cache`` (every sequence at the same cached length ``L``), ``tgt_in`` is the whole prefix
        and only its positions ``L .. T - 1`` run through the decoder, attending to the cached ones;
        they are appended to the cache and their logits (B, T - L, V) returned.
        ``tgt_key_padding_mask`` must then be None (the cache masks its own keys).
        """
        if cache is None:
            x = self.decoder(
                self._embed(self.tgt_embed, tgt_in), memory, tgt_key_padding_mask, memory_key_padding_mask
            )
            return self.output(x)  # (B, T, V)
        start = cache.uniform_length
        if start is None:
            raise ValueError("decode with a cache needs every sequence at the same cached length")
        if tgt_key_padding_mask is not None:
            raise ValueError("decode with a cache takes no tgt_key_padding_mask")
        if tgt_in.shape[1] <= start:
            raise ValueError(f"tgt_in has {tgt_in.shape[1]} positions, the cache already holds {start}")
        x = self._embed(self.tgt_embed, tgt_in[:, start:], offset=start)  # (B, T - L, E)
        x = self.decoder(x, memory, None, memory_key_padding_mask, cache=cache)
        return self.output(x)  # (B, T - L, V)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty ``KVCache`` for this decoder: ``batch_size`` sequences of up to ``max_len`` positions."""
        return KVCache(len(self.decoder.layers), batch_size, max_len)

    def forward(
        self,
        src: Tensor,
        tgt_in: Tensor,
        src_key_padding_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits (B, T, V)."""
        if src.dim() != 2 or tgt_in.dim() != 2 or src.shape[0] != tgt_in.shape[0]:
            raise ValueError(
                f"src and tgt_in must be (B, S) and (B, T) token ids, got {tuple(src.shape)} and "
                f"{tuple(tgt_in.shape)}"
            )
        memory = self.encode(src, src_key_padding_mask)  # (B, S, E)
        return self.decode(tgt_in, memory, tgt_key_padding_mask, src_key_padding_mask)

    @torch.no_grad()
    def generate(
        self,
        src: Tensor,
        max_new_tokens: int,
        bos_id: int,
        eos_id: int,
        src_key_padding_mask: Tensor | None = None,
        *,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Autoregressive decoding, greedy (``temperature == 0``) or sampled.

        All sequences advance in lock-step. With ``use_cache`` each step feeds only the newest token:
        the decoder self-attention appends it to a ``KVCache`` and attends to the cached prefix, and the
        cross-attention keys/values of the memory are computed once; without it the decoder re-runs on
        the whole prefix each step. Both give the same tokens (up to floating-point rounding).
        Each sequence stops at its own EOS (which is emitted); after that it emits ``pad_id``. Decoding
        ends early once every sequence has finished. Call ``eval()`` first to disable dropout.

        Args:
            src: source token ids; ``src_key_padding_mask`` marks its padding (True = pad).
            max_new_tokens: most tokens generated per sequence.
            bos_id, eos_id: start and end tokens.
            use_cache: incremental decoding with a KV cache.
            temperature: 0 picks the most likely token; > 0 samples from softmax(logits / temperature).
            top_k: when sampling, only the ``top_k`` most likely tokens are candidates.
            generator: random generator for sampling (reproducible draws).

        Shape:
            src: (B, S); src_key_padding_mask: (B, S) bool.
            returns (B, T) generated tokens without the BOS, T <= max_new_tokens.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if max_new_tokens > self.max_len:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) needs a prefix of up to {max_new_tokens} positions, "
                f"more than max_len ({self.max_len})"
            )
        if temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        batch = src.shape[0]
        memory = self.encode(src, src_key_padding_mask)  # (B, S, E)
        cache = self.new_cache(batch, max_new_tokens) if use_cache else None
        ys = torch.full((batch, 1), bos_id, dtype=torch.long, device=src.device)  # (B, 1)
        finished = torch.zeros(batch, dtype=torch.bool, device=src.device)  # (B,)
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self.decode(ys, memory, memory_key_padding_mask=src_key_padding_mask)  # (B, t, V)
            else:
                logits = self.decode(ys, memory, None, src_key_padding_mask, cache=cache)  # (B, 1, V)
            next_token = self._pick(logits[:, -1], temperature, top_k, generator)  # (B,)
            next_token = next_token.masked_fill(finished, self.pad_id)
            ys = torch.cat([ys, next_token[:, None]], dim=1)
            finished |= next_token == eos_id
            if bool(finished.all()):
                break
        return ys[:, 1:]

    @staticmethod
    def _pick(
        logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> Tensor:
        """Next token per sequence from ``logits`` (B, V): argmax, or a temperature / top-k sample (B,)."""
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        scores = logits.float() / temperature  # (B, V)
        if top_k is not None and top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
