"""Decode-shaped attention kernels on CUDA: our flash forward (split-KV heuristic, and forced to one pass)
against torch SDPA, its default choice and each of its CUDA sub-backends.

A shape is Nq query rows (1 when decoding one token) of B sequences and Hq query heads against Nk cached
keys of Hkv key/value heads, head dim D, no mask. Decoding is memory-bound: the figure of merit is the
achieved bandwidth, bytes of q, k and v read once plus out written once over the median time.

Timing: ``triton.testing.do_bench`` median (``torch.utils.benchmark`` when triton is missing). Each method is
run once before timing; a method that raises is recorded as "n/a" with the reason, the others go on. SDPA
sub-backends get grouped-query heads with ``enable_gqa=True``; one that rejects it gets k and v expanded with
``repeat_interleave`` outside the timed region, and its note says so (its bandwidth is still counted on the
unexpanded bytes, so the numbers compare the same work).

The table and CSV code (``records``, ``format_markdown``, ``write_outputs``) needs no GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.report import markdown, write_csv
from benchmarks.timing import time_ms

__all__ = [
    "DEFAULT_LEN_KS",
    "METHODS",
    "DecodeShape",
    "Measurement",
    "default_shapes",
    "format_markdown",
    "measure_shape",
    "parse_shape",
    "records",
    "run",
    "time_us",
    "write_outputs",
]

DEFAULT_LEN_KS = (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
METHODS: dict[str, str] = {
    "flash": "our flash forward, split count from the heuristic",
    "flash_1split": "our flash forward with FLASH_ATTN_NUM_SPLITS=1 (the one-pass kernel)",
    "flash_2split": "our flash forward with FLASH_ATTN_NUM_SPLITS=2 (the split kernel, fewest splits)",
    "sdpa": "torch SDPA, its default backend choice",
    "sdpa_flash": "SDPA restricted to FLASH_ATTENTION",
    "sdpa_efficient": "SDPA restricted to EFFICIENT_ATTENTION",
    "sdpa_cudnn": "SDPA restricted to CUDNN_ATTENTION",
}
SDPA_BACKENDS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
}
FORCED_SPLITS = {"flash_1split": 1, "flash_2split": 2}  # methods that fix FLASH_ATTN_NUM_SPLITS
CSV_COLUMNS = ("B", "Hq", "Hkv", "Nq", "Nk", "D", "method", "us", "GB/s", "vs sdpa", "vs sdpa_flash", "note")


@dataclass(frozen=True)
class DecodeShape:
    """q (B, Hq, Nq, D) against k, v (B, Hkv, Nk, D)."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int = 128

    def bytes_moved(self, element_size: int = 2) -> int:
        """Bytes of q, k, v read once and out written once."""
        q_or_out = self.batch * self.heads_q * self.len_q * self.head_dim
        k_or_v = self.batch * self.heads_kv * self.len_k * self.head_dim
        return element_size * (2 * q_or_out + 2 * k_or_v)


@dataclass(frozen=True)
class Measurement:
    """One method at one shape: the median in microseconds, or None with the reason in ``note``."""

    shape: DecodeShape
    method: str
    us: float | None
    note: str = ""


def parse_shape(text: str, head_dim: int = 128) -> DecodeShape:
    """A shape from "B,Hq,Hkv,Nq,Nk" (e.g. "1,27,27,256,4096"); ValueError names what is wrong."""
    parts = text.split(",")
    if len(parts) != 5 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"shape: expected five positive integers B,Hq,Hkv,Nq,Nk, got {text!r}")
    batch, heads_q, heads_kv, len_q, len_k = (int(p) for p in parts)
    if heads_q % heads_kv:
        raise ValueError(f"shape: expected Hq ({heads_q}) to be a multiple of Hkv ({heads_kv}) in {text!r}")
    return DecodeShape(batch, heads_q, heads_kv, len_q, len_k, head_dim)


def default_shapes(len_ks: Sequence[int] = DEFAULT_LEN_KS, head_dim: int = 128) -> list[DecodeShape]:
    """Nq = 1 for B=1 Hq=32 Hkv=8 (GQA) and B=8 Hq=32 Hkv=32 (MHA) at every Nk, then one Nq = 4 GQA case."""
    shapes = [DecodeShape(1, 32, 8, 1, n, head_dim) for n in len_ks]
    shapes += [DecodeShape(8, 32, 32, 1, n, head_dim) for n in len_ks]
    shapes.append(DecodeShape(1, 32, 8, 4, 8192 if 8192 in len_ks else max(len_ks), head_dim))
    return shapes


# ------------------------------------------------------------------------------------------ tables


def records(measurements: Sequence[Measurement], element_size: int = 2) -> list[dict[str, Any]]:
    """One dict per measurement with the CSV columns; speed-ups are reference time / this method's time.

    ``vs sdpa`` > 1 means the method is faster than SDPA's default; None where either side is missing.
    """
    times = {(m.shape, m.method): m.us for m in measurements}

    def speedup(m: Measurement, reference: str) -> float | None:
        ref = times.get((m.shape, reference))
        return ref / m.us if ref and m.us else None

    rows = []
    for m in measurements:
        s = m.shape
        gbps = s.bytes_moved(element_size) / (m.us * 1e-6) / 1e9 if m.us else None
        rows.append(
            {
                "B": s.batch,
                "Hq": s.heads_q,
                "Hkv": s.heads_kv,
                "Nq": s.len_q,
                "Nk": s.len_k,
                "D": s.head_dim,
                "method": m.method,
                "us": m.us,
                "GB/s": gbps,
                "vs sdpa": speedup(m, "sdpa"),
                "vs sdpa_flash": speedup(m, "sdpa_flash"),
                "note": m.note,
            }
        )
    return rows


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    return format(value, fmt) if isinstance(value, float) else str(value)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table: µs, GB/s, speed-ups as ``1.23x``; missing values as n/a."""
    headers = ["B", "Hq", "Hkv", "Nq", "Nk", "D", "method", "µs", "GB/s", "vs sdpa", "vs sdpa_flash", "note"]
    lines = []
    for r in rows:
        lines.append(
            [
                *(str(r[k]) for k in ("B", "Hq", "Hkv", "Nq", "Nk", "D")),
                r["method"],
                _cell(r["us"], ".1f"),
                _cell(r["GB/s"], ".0f"),
                "n/a" if r["vs sdpa"] is None else f"{r['vs sdpa']:.2f}x",
                "n/a" if r["vs sdpa_flash"] is None else f"{r['vs sdpa_flash']:.2f}x",
                r["note"] or "",
            ]
        )
    return markdown(headers, lines)


def write_outputs(rows: Sequence[dict[str, Any]], out_dir: Path, header: str = "") -> tuple[Path, Path]:
    """``decode_kernels.csv`` (one line per row) and ``decode_kernels.md`` (``header`` and the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "decode_kernels.csv", out_dir / "decode_kernels.md"
    write_csv([{k: r[k] for k in CSV_COLUMNS} for r in rows], csv_path)
    md_path.write_text((header + "\n\n" if header else "") + format_markdown(rows) + "\n")
    return csv_path, md_path


# ------------------------------------------------------------------------------------------ timing


def time_us(
    fn: Callable[[], Any], warmup_ms: int = 25, rep_ms: int = 100, device: str | None = None
) -> float:
    """Median time of ``fn`` in microseconds (``device``: where it runs, default CUDA when present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 1e3 * time_ms(fn, device, warmup_ms, rep_ms)


@contextlib.contextmanager
def forced_splits(splits: int | None) -> Iterator[None]:
    """FLASH_ATTN_NUM_SPLITS=splits inside the block (None: unset, the heuristic); restored after."""
    saved = os.environ.pop("FLASH_ATTN_NUM_SPLITS", None)
    if splits is not None:
        os.environ["FLASH_ATTN_NUM_SPLITS"] = str(splits)
    try:
        yield
    finally:
        os.environ.pop("FLASH_ATTN_NUM_SPLITS", None)
        if saved is not None:
            os.environ["FLASH_ATTN_NUM_SPLITS"] = saved


def make_inputs(shape: DecodeShape, dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) on the current CUDA device."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(heads: int, length: int) -> Tensor:
        return torch.randn(
            shape.batch, heads, length, shape.head_dim, device="cuda", dtype=dtype, generator=gen
        )

    return (
        rand(shape.heads_q, shape.len_q),
        rand(shape.heads_kv, shape.len_k),
        rand(shape.heads_kv, shape.len_k),
    )


def _sdpa_runner(q: Tensor, k: Tensor, v: Tensor, backend: str | None) -> tuple[Callable[[], Tensor], str]:
    """A callable running SDPA (restricted to ``backend`` unless None) and a note on how GQA was fed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    grouped = q.shape[1] != k.shape[1]
    context = (lambda: sdpa_kernel(getattr(SDPBackend, backend))) if backend else contextlib.nullcontext

    def runner(k_in: Tensor, v_in: Tensor, enable_gqa: bool) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with context():
                return sdpa(q, k_in, v_in, enable_gqa=enable_gqa)

        return run

    if not grouped:
        run = runner(k, v, False)
        run()
        return run, ""
    try:
        run = runner(k, v, True)
        run()
        return run, "enable_gqa"
    except RuntimeError:
        if backend is None:
            raise
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = (t.repeat_interleave(group, dim=1) for t in (k, v))
    run = runner(k_rep, v_rep, False)
    run()
    return run, "k/v repeat_interleave (enable_gqa rejected)"


def _runner(method: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Callable[[], Tensor], str]:
    scale = q.shape[-1] ** -0.5
    if method == "flash" or method in FORCED_SPLITS:
        import attention_backends as ab

        ab.load_extension()
        return (lambda: torch.ops.flash_attn.fwd(q, k, v, None, None, scale, False)[0]), ""
    if method == "sdpa":
        return _sdpa_runner(q, k, v, None)
    return _sdpa_runner(q, k, v, SDPA_BACKENDS[method])


def measure_shape(
    shape: DecodeShape,
    methods: Sequence[str],
    dtype: torch.dtype = torch.bfloat16,
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> list[Measurement]:
    """Every method at one shape; our flash output is also checked against SDPA's (noted if it differs)."""
    q, k, v = make_inputs(shape, dtype)
    results = []
    reference: Tensor | None = None
    for method in methods:
        splits = FORCED_SPLITS.get(method)
        try:
            with forced_splits(splits), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn, note = _runner(method, q, k, v)
                out = fn()
                if method == "sdpa":
                    reference = out
                us = time_us(fn, warmup_ms, rep_ms)
        except (RuntimeError, ValueError, ImportError) as err:
            reason = str(err).strip().splitlines()[0][:80] if str(err).strip() else type(err).__name__
            results.append(Measurement(shape, method, None, f"n/a: {reason}"))
            continue
        if method.startswith("flash") and reference is not None:
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            if not math.isfinite(err) or err > 2e-2:
                note = f"differs from sdpa: rel. error {err:.2g}"
        results.append(Measurement(shape, method, us, note))
    del q, k, v, reference
    torch.cuda.empty_cache()
    return results


def run(
    shapes: Sequence[DecodeShape],
    methods: Sequence[str] = tuple(METHODS),
    dtype: torch.dtype = torch.bfloat16,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    progress: Callable[[str], None] | None = None,
) -> list[Measurement]:
    """Every shape with every method (SDPA's default first, so our outputs can be checked against it)."""
    ordered = sorted(methods, key=lambda m: m != "sdpa")
    out: list[Measurement] = []
    for shape in shapes:
        measured = measure_shape(shape, ordered, dtype, warmup_ms, rep_ms)
        by_method = {m.method: m for m in measured}
        out += [by_method[m] for m in methods]
        if progress is not None:
            progress(f"{shape}: " + ", ".join(f"{m.method} {m.us or float('nan'):.1f} us" for m in measured))
    return out
