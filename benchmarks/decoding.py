"""Decoding benchmark: ``Transformer.generate`` with and without the KV cache, per attention backend.

Every run decodes exactly ``new_tokens`` tokens per sequence (the EOS id is one the model never emits),
greedily, with the backend forced in strict mode, so a backend that can't serve a call fails instead of
being timed under another's name. Reported per (backend, cache): wall time (median over ``repeats``),
generated tokens per second (batch × new tokens / time), the bytes held by the cache buffers, the peak
extra memory of a generate call on CUDA (max_memory_allocated delta; torch does not track CPU allocations),
and whether the tokens equal the uncached run's.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from attention_backends import BackendUnsupportedError, available_backends, use_backend
from transformer import KVCache, Transformer

__all__ = ["DecodingConfig", "DecodingResult", "format_table", "run"]


@dataclass(frozen=True)
class DecodingConfig:
    """What to decode: model size, batch, lengths, backends, repeats."""

    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    num_layers: int = 2
    dim_feedforward: int = 512
    vocab_size: int = 64
    batch_size: int = 8
    src_len: int = 32
    new_tokens: int = 128
    backends: tuple[str, ...] = ("naive", "sdpa", "flash")
    repeats: int = 3
    threads: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16: the model's parameters and activations


@dataclass(frozen=True)
class DecodingResult:
    """One (backend, cache) measurement; ``status`` is "ok" or why the point did not run."""

    backend: str
    use_cache: bool
    seconds: float
    tokens_per_second: float
    cache_bytes: int
    matches_uncached: bool | None
    status: str = "ok"
    peak_memory_bytes: int | None = None


def build_model(cfg: DecodingConfig) -> Transformer:
    """A randomly initialised model in eval mode (no training: decoding cost does not depend on it)."""
    torch.manual_seed(cfg.seed)
    model = Transformer(
        cfg.vocab_size,
        cfg.vocab_size,
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        num_encoder_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        dim_feedforward=cfg.dim_feedforward,
        dropout=0.0,
        max_len=max(cfg.src_len, cfg.new_tokens),
        num_kv_heads=cfg.num_kv_heads,
        tie_embeddings=False,
    )
    return model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)).eval()


def make_sources(cfg: DecodingConfig) -> tuple[Tensor, Tensor]:
    """Sources (B, S) of lengths spread over [S / 2, S], and their padding mask (B, S), True = pad."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    src = torch.randint(3, cfg.vocab_size, (cfg.batch_size, cfg.src_len), generator=gen)
    lengths = torch.randint(cfg.src_len // 2, cfg.src_len + 1, (cfg.batch_size,), generator=gen)
    mask = torch.arange(cfg.src_len)[None, :] >= lengths[:, None]  # (B, S)
    return src.masked_fill(mask, 0).to(cfg.device), mask.to(cfg.device)


def cache_bytes(model: Transformer, cfg: DecodingConfig, src: Tensor, mask: Tensor) -> int:
    """Bytes of the buffers a cached ``generate`` allocates (self-attention at capacity + cross keys)."""
    cache: KVCache = model.new_cache(cfg.batch_size, cfg.new_tokens)
    with torch.no_grad():
        memory = model.encode(src, mask)
        bos = torch.ones(cfg.batch_size, 1, dtype=torch.long, device=src.device)
        model.decode(bos, memory, None, mask, cache=cache)
    return cache.nbytes()


def run(cfg: DecodingConfig) -> list[DecodingResult]:
    """Time every backend with and without the cache."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model = build_model(cfg)
    src, mask = make_sources(cfg)
    usable = set(available_backends(torch.device(cfg.device)))
    results = []
    for backend in cfg.backends:
        if backend not in usable:
            results.append(DecodingResult(backend, True, 0.0, 0.0, 0, None, "unavailable"))
            continue
        outputs: dict[bool, Tensor] = {}
        for use_cache in (False, True):
            try:
                times, out, peak = _time_generate(model, cfg, src, mask, backend, use_cache)
            except BackendUnsupportedError as err:
                results.append(DecodingResult(backend, use_cache, 0.0, 0.0, 0, None, f"unsupported: {err}"))
                continue
            outputs[use_cache] = out
            seconds = statistics.median(times)
            with use_backend(backend, strict=True):
                nbytes = cache_bytes(model, cfg, src, mask) if use_cache else 0
            matches = torch.equal(out, outputs[False]) if use_cache and False in outputs else None
            tokens = cfg.batch_size * out.shape[1]
            results.append(
                DecodingResult(backend, use_cache, seconds, tokens / seconds, nbytes, matches, "ok", peak)
            )
    return results


def _time_generate(
    model: Transformer, cfg: DecodingConfig, src: Tensor, mask: Tensor, backend: str, use_cache: bool
) -> tuple[list[float], Tensor, int | None]:
    """Wall times of ``repeats`` generate calls (after one warm-up), the tokens of the last one, and
    on CUDA the peak memory a call allocates beyond what was allocated before it."""
    cuda = src.device.type == "cuda"
    times = []
    peak = None
    with use_backend(backend, strict=True), torch.no_grad():
        out = model.generate(src, cfg.new_tokens, 1, -1, mask, use_cache=use_cache)
        if cuda:
            torch.cuda.synchronize(src.device)
            before = torch.cuda.memory_allocated(src.device)
            torch.cuda.reset_peak_memory_stats(src.device)
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            out = model.generate(src, cfg.new_tokens, 1, -1, mask, use_cache=use_cache)
            if cuda:
                torch.cuda.synchronize(src.device)
            times.append(time.perf_counter() - start)
        if cuda:
            peak = torch.cuda.max_memory_allocated(src.device) - before
    return times, out, peak


def describe(cfg: DecodingConfig) -> str:
    """One line naming the machine and the workload."""
    kv = cfg.num_kv_heads or cfg.num_heads
    device = torch.device(cfg.device)
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    return (
        f"{machine}, torch {torch.__version__}; d_model {cfg.d_model}, {cfg.num_heads} heads "
        f"({kv} kv), {cfg.num_layers}+{cfg.num_layers} layers, batch {cfg.batch_size}, "
        f"source {cfg.src_len} (padded), {cfg.new_tokens} new tokens, {cfg.dtype}"
    )


def format_table(results: list[DecodingResult]) -> str:
    """A Markdown table, with each backend's cached speed-up over its uncached run."""
    uncached = {r.backend: r.seconds for r in results if not r.use_cache and r.status == "ok"}
    lines = [
        "| backend | KV cache | wall time (s) | tokens/s | cache bytes | peak MiB | speed-up | same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(f"| {r.backend} | {'yes' if r.use_cache else 'no'} | {r.status} | | | | | |")
            continue
        speedup = (
            f"{uncached[r.backend] / r.seconds:.1f}x" if r.use_cache and r.backend in uncached else "1.0x"
        )
        same = "-" if r.matches_uncached is None else ("yes" if r.matches_uncached else "no")
        peak = "n/a" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:,.1f}"
        lines.append(
            f"| {r.backend} | {'yes' if r.use_cache else 'no'} | {r.seconds:.3f} | "
            f"{r.tokens_per_second:,.0f} | {r.cache_bytes:,} | {peak} | {speedup} | {same} |"
        )
    return "\n".join(lines)
