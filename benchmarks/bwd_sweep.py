"""The backward tile-variant sweep: which variants exist, the timing grid, and the results (table and CSV).

The variants are the ``BwdVariant<D, v>`` specialisations in csrc/cuda/flash_bwd_traits.h; a build picks one
per head dim with ``-DFLASH_BWD_VARIANT_HDIM<D>=<v>`` (the defaults are in the header). ``scripts/sweep_bwd.py`` builds each
variant as its own extension (benchmarks/bwd_sweep_build.py), then checks and times it on the GPU in its own
process (benchmarks/bwd_sweep_gpu.py). This module holds the parts that need neither a compiler nor a GPU.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAITS_HEADER = ROOT / "csrc" / "cuda" / "flash_bwd_traits.h"
INSTANTIATIONS = ROOT / "csrc" / "cuda" / "instantiations"
SWEPT_HEAD_DIMS = (64, 128, 256)
# FLOPs of the backward relative to the forward (flash-attn's count: 2.5 matmuls' worth of the forward's 1).
BWD_FLOP_FACTOR = 2.5

_VARIANT_LINE = re.compile(r"^struct BwdVariant<(\d+), (\d+)> \{\s*//\s*(.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Variant:
    """One tile configuration of the backward kernel for one head dim."""

    head_dim: int
    index: int
    label: str

    @property
    def name(self) -> str:
        return f"d{self.head_dim}v{self.index}"

    @property
    def define(self) -> str:
        """The nvcc flag that selects this variant."""
        return f"-DFLASH_BWD_VARIANT_HDIM{self.head_dim}={self.index}"

    @property
    def defines(self) -> list[str]:
        """The nvcc flags of a sweep build: this variant, and no fallback kernel beside it."""
        return [self.define, "-DFLASH_BWD_ONE_VARIANT"]

    @property
    def source(self) -> Path:
        """The bf16 instantiation file that this variant recompiles."""
        return INSTANTIATIONS / f"flash_bwd_hdim{self.head_dim}_bf16.cu"

    @property
    def sm90_only(self) -> bool:
        return "(sm_90)" in self.label


def read_variants(text: str | None = None) -> list[Variant]:
    """The variants declared in flash_bwd_traits.h (or in ``text``), sorted by head dim and index."""
    if text is None:
        text = TRAITS_HEADER.read_text()
    found = [Variant(int(d), int(v), label) for d, v, label in _VARIANT_LINE.findall(text)]
    return sorted(found, key=lambda v: (v.head_dim, v.index))


def select_variants(
    variants: Sequence[Variant], head_dims: Iterable[int], names: Iterable[str] | None = None
) -> list[Variant]:
    """The variants of ``head_dims``, further limited to ``names`` (e.g. ``d64v3``) when given.

    Raises ValueError naming any requested variant that does not exist.
    """
    dims = set(head_dims)
    chosen = [v for v in variants if v.head_dim in dims]
    if names:
        wanted = list(dict.fromkeys(names))
        known = {v.name for v in chosen}
        missing = [n for n in wanted if n not in known]
        if missing:
            raise ValueError(f"--variants: unknown {missing}; known: {sorted(known)}")
        chosen = [v for v in chosen if v.name in wanted]
    return chosen


def sweep_order(variants: Sequence[Variant]) -> list[Variant]:
    """GPU order: variant 0 of every head dim first (the baselines), then by index, D = 256 last."""
    rank = {128: 0, 64: 1}
    return sorted(variants, key=lambda v: (v.head_dim == 256, v.index, rank.get(v.head_dim, 2)))


@dataclass(frozen=True)
class Point:
    """One timed shape: (batch, heads, seqlen, head_dim), self-attention, bf16."""

    head_dim: int
    seqlen: int
    causal: bool
    batch: int
    heads: int

    @property
    def label(self) -> str:
        return f"N={self.seqlen}{' causal' if self.causal else ''}"

    def fwd_flops(self) -> float:
        """flash-attn's count: 4·B·H·N²·D, halved when causal."""
        flops = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        return flops / 2 if self.causal else flops

    def bwd_flops(self) -> float:
        return BWD_FLOP_FACTOR * self.fwd_flops()


def grid(head_dim: int, seqlens: Sequence[int], tokens: int, hidden: int) -> list[Point]:
    """The points of one head dim: B = tokens // N and H = hidden // D, non-causal then causal."""
    if hidden % head_dim:
        raise ValueError(f"hidden {hidden} is not a multiple of the head dim {head_dim}")
    points = []
    for causal in (False, True):
        for n in seqlens:
            if n <= 0 or tokens % n:
                raise ValueError(f"tokens {tokens} is not a multiple of the sequence length {n}")
            points.append(Point(head_dim, n, causal, tokens // n, hidden // head_dim))
    return points


# ------------------------------------------------------------------------------------------------
# ptxas -v output
# ------------------------------------------------------------------------------------------------
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class KernelResources:
    registers: int
    spill_stores: int
    spill_loads: int


def parse_ptxas(text: str, kernel: str = "bwd_kernel") -> dict[str, KernelResources]:
    """Registers and spills per arch of the entry functions whose mangled name contains ``kernel``."""
    found: dict[str, KernelResources] = {}
    arch = None
    spills = (0, 0)
    for line in text.splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            arch = entry.group(2) if kernel in entry.group(1) else None
            spills = (0, 0)
            continue
        if arch is None:
            continue
        spill = _PTXAS_SPILL.search(line)
        if spill:
            spills = (int(spill.group(2)), int(spill.group(3)))
        regs = _PTXAS_REGS.search(line)
        if regs:
            found[arch] = KernelResources(int(regs.group(1)), *spills)
            arch = None
    return found


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One (variant, point) result. Times in ms; NaN where not measured."""

    variant: str
    head_dim: int
    label: str
    seqlen: int
    causal: bool
    batch: int
    heads: int
    status: str  # ok | build_failed | check_failed | run_failed | skipped
    bwd_ms: float = math.nan
    sdpa_bwd_ms: float = math.nan
    bwd_tflops: float = math.nan
    sdpa_bwd_tflops: float = math.nan
    bwd_ratio: float = math.nan  # ours / SDPA flash, in TFLOP/s (> 1 is faster)
    fwd_ms: float = math.nan  # our forward (same for every variant), from the variant-0 process
    sdpa_fwd_ms: float = math.nan
    fwd_bwd_ratio: float = math.nan  # (sdpa fwd + sdpa bwd) / (our fwd + our bwd)
    worst_error_ratio: float = math.nan  # max over the checks of our error / SDPA's error (vs float64)
    note: str = ""


def make_row(variant: Variant, point: Point, status: str, **values) -> Row:
    return Row(
        variant=variant.name,
        head_dim=point.head_dim,
        label=variant.label,
        seqlen=point.seqlen,
        causal=point.causal,
        batch=point.batch,
        heads=point.heads,
        status=status,
        **values,
    )


def fill_rates(row: Row, point: Point) -> Row:
    """TFLOP/s and ratios from the times already in ``row``."""
    flops = point.bwd_flops()
    row.bwd_tflops = flops / row.bwd_ms / 1e9 if row.bwd_ms > 0 else math.nan
    row.sdpa_bwd_tflops = flops / row.sdpa_bwd_ms / 1e9 if row.sdpa_bwd_ms > 0 else math.nan
    row.bwd_ratio = row.bwd_tflops / row.sdpa_bwd_tflops if row.sdpa_bwd_tflops > 0 else math.nan
    ours, theirs = row.fwd_ms + row.bwd_ms, row.sdpa_fwd_ms + row.sdpa_bwd_ms
    row.fwd_bwd_ratio = theirs / ours if ours > 0 else math.nan
    return row


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    names = [f.name for f in fields(Row)]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in rows:
            writer.writerow([_csv_value(getattr(row, n)) for n in names])


def read_csv(path: str | Path) -> list[Row]:
    kinds = {f.name: f.type for f in fields(Row)}
    rows = []
    with open(path, newline="") as fh:
        for record in csv.DictReader(fh):
            values = {}
            for name, text in record.items():
                kind = kinds[name]
                if kind in ("int", int):
                    values[name] = int(text)
                elif kind in ("float", float):
                    values[name] = float(text) if text else math.nan
                elif kind in ("bool", bool):
                    values[name] = text == "1"
                else:
                    values[name] = text
            rows.append(Row(**values))
    return rows


def _csv_value(value: object) -> object:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def format_table(rows: Sequence[Row]) -> str:
    """One block per head dim: a line per variant, a column per point, cells 'TFLOP/s ratio' (bwd vs SDPA
    flash), then the fwd+bwd ratio line of the best variant per point."""
    out: list[str] = []
    for head_dim in sorted({r.head_dim for r in rows}):
        mine = [r for r in rows if r.head_dim == head_dim]
        points = list(dict.fromkeys((r.seqlen, r.causal) for r in mine))
        points.sort(key=lambda p: (p[1], p[0]))
        variants = list(dict.fromkeys(r.variant for r in mine))
        by_key = {(r.variant, r.seqlen, r.causal): r for r in mine}
        width = 13
        head = [f"{'D=' + str(head_dim):<8}"] + [
            f"{('c' if causal else '') + str(n):>{width}}" for n, causal in points
        ]
        out.append(" ".join(head) + "  status / label")
        for name in variants:
            cells = [f"{name:<8}"]
            status, label = "", ""
            for n, causal in points:
                row = by_key.get((name, n, causal))
                if row is None or math.isnan(row.bwd_tflops):
                    cells.append(f"{'-':>{width}}")
                else:
                    cells.append(f"{row.bwd_tflops:>6.0f} {row.bwd_ratio:>5.2f}x")
                if row is not None:
                    status, label = row.status, row.label
            out.append(" ".join(cells) + f"  {status} / {label}")
        best = [f"{'best':<8}"]
        best_fb = [f"{'best f+b':<8}"]
        for n, causal in points:
            ok = [
                by_key[(v, n, causal)]
                for v in variants
                if (v, n, causal) in by_key and not math.isnan(by_key[(v, n, causal)].bwd_ratio)
            ]
            if ok:
                top = max(ok, key=lambda r: r.bwd_ratio)
                best.append(f"{top.variant + ' ' + format(top.bwd_ratio, '.2f'):>{width}}")
                fb = top.fwd_bwd_ratio
                best_fb.append(f"{('-' if math.isnan(fb) else format(fb, '.2f') + 'x'):>{width}}")
            else:
                best.append(f"{'-':>{width}}")
                best_fb.append(f"{'-':>{width}}")
        out.append(" ".join(best))
        out.append(" ".join(best_fb))
        out.append("")
    out.append("cells: our backward TFLOP/s and its ratio to SDPA FLASH_ATTENTION's backward (same process);")
    out.append("column cN = causal; 'best f+b' = (SDPA fwd + bwd) / (our fwd + bwd) for the best variant.")
    return "\n".join(out)
