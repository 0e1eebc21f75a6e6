"""Benchmark output: results.csv, results.json, markdown tables (summary.md) and PNG plots.

Everything here works on rows as plain dicts with the keys of ``benchmarks.attention.Row``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Record = Mapping[str, Any]
POINT_KEYS = ("dtype", "head_dim", "causal", "direction", "seqlen")
DIRECTION_ORDER = {"fwd": 0, "bwd": 1, "fwd_bwd": 2}
STATUS_CELL = {"unsupported": "unsup.", "OOM": "OOM", "error": "error"}


# ------------------------------------------------------------------------------------------- files


def write_csv(records: Sequence[Record], path: Path) -> None:
    """One line per row, columns in the rows' key order; missing values are empty."""
    with path.open("w", newline="") as handle:
        if not records:
            return
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a results.csv written by write_csv, with numbers, booleans and missing values restored."""
    ints, floats = {"head_dim", "seqlen", "batch", "heads"}, {"ms", "tflops", "peak_mib"}

    def convert(key: str, value: str) -> Any:
        if key in ints:
            return int(value)
        if key in floats:
            return float(value) if value != "" else None
        if key == "causal":
            return value == "True"
        return value

    with path.open(newline="") as handle:
        return [{k: convert(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def write_json(records: Sequence[Record], config: Mapping[str, Any], path: Path) -> None:
    """``{"config": <resolved settings>, "rows": [<row>, ...]}``; missing values are null."""
    path.write_text(json.dumps({"config": dict(config), "rows": list(records)}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ tables


def backends_in(records: Sequence[Record]) -> list[str]:
    """The backend labels in order of first appearance."""
    return list(dict.fromkeys(r["backend"] for r in records))


def by_point(records: Sequence[Record]) -> dict[tuple[Any, ...], dict[str, Record]]:
    """Rows grouped by grid point (dtype, D, causal, direction, N), keyed by backend, in table order."""
    grouped: dict[tuple[Any, ...], dict[str, Record]] = defaultdict(dict)
    for record in records:
        grouped[tuple(record[k] for k in POINT_KEYS)][record["backend"]] = record
    order = sorted(grouped, key=lambda p: (p[0], p[1], p[2], DIRECTION_ORDER.get(p[3], 9), p[4]))
    return {point: grouped[point] for point in order}


def format_number(value: float, digits: int = 1) -> str:
    """Fixed decimals for values of 1 and above, three significant digits below."""
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.3g}"


def cell(record: Record | None, key: str) -> str:
    """A table cell: the value of ``key`` for a good row, else the row's status (blank when absent)."""
    if record is None:
        return ""
    if record["status"] != "ok":
        return STATUS_CELL.get(record["status"], record["status"])
    return "-" if record[key] is None else format_number(record[key])


def ratio_cell(row: Mapping[str, Record], ours: str, reference: str) -> str:
    """``ours`` TFLOP/s over ``reference`` TFLOP/s at one point, as ``1.23x`` (blank if either is missing)."""
    mine, theirs = row.get(ours), row.get(reference)
    if mine is None or theirs is None or not mine.get("tflops") or not theirs.get("tflops"):
        return ""
    return f"{mine['tflops'] / theirs['tflops']:.2f}x"


def markdown(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns (readable as printed text too); numbers right-aligned."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *lines, strict=True)]

    def render(values: Sequence[str]) -> str:
        return "| " + " | ".join(str(v).rjust(w) for v, w in zip(values, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([render(headers), rule, *(render(line) for line in lines)])


def point_columns(point: tuple[Any, ...], row: Mapping[str, Record]) -> list[str]:
    """The leading columns of a table line: dtype, D, causal, direction, N, batch, heads."""
    dtype, head_dim, causal, direction, seqlen = point
    first = next(iter(row.values()))
    return [
        dtype,
        str(head_dim),
        "yes" if causal else "no",
        direction,
        str(seqlen),
        str(first["batch"]),
        str(first["heads"]),
    ]


LEADING = ["dtype", "D", "causal", "dir", "N", "B", "H"]


def tflops_table(records: Sequence[Record], ours: str, reference: str) -> str:
    """TFLOP/s per backend at every grid point, plus ``ours`` / ``reference`` when both were run."""
    backends = backends_in(records)
    with_ratio = ours in backends and reference in backends and ours != reference
    headers = LEADING + backends + ([f"{ours} vs {reference}"] if with_ratio else [])
    lines = []
    for point, row in by_point(records).items():
        line = point_columns(point, row) + [cell(row.get(b), "tflops") for b in backends]
        if with_ratio:
            line.append(ratio_cell(row, ours, reference))
        lines.append(line)
    return markdown(headers, lines)


def memory_table(records: Sequence[Record]) -> str | None:
    """Peak MiB per backend for the measured directions, or None when no memory was measured (CPU)."""
    measured = [r for r in records if r["direction"] in ("fwd", "fwd_bwd")]
    if not any(r["peak_mib"] is not None for r in measured):
        return None
    backends = backends_in(measured)
    lines = [
        point_columns(point, row) + [cell(row.get(b), "peak_mib") for b in backends]
        for point, row in by_point(measured).items()
    ]
    return markdown(LEADING + backends, lines)


def summary_text(records: Sequence[Record], ours: str, reference: str) -> str:
    """The markdown summary: device, torch, date, the TFLOP/s table and (on CUDA) the memory table."""
    first = records[0] if records else {"device": "?", "torch": "?", "date": "?"}
    parts = [
        "# Attention benchmark",
        "",
        f"{first['device']}, torch {first['torch']}, {first['date']}.",
        "",
        "## TFLOP/s (bwd = fwd_bwd - fwd)",
        "",
        tflops_table(records, ours, reference),
    ]
    memory = memory_table(records)
    if memory is not None:
        parts += ["", "## Peak memory of one call (MiB above what was allocated before it)", "", memory]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric(records: Sequence[Record], key: str, ylabel: str, out_dir: Path) -> list[Path]:
    """``key`` against N, one line per backend: a figure per (dtype, direction), a panel per (D, causal).

    Figures with nothing to draw are skipped. Returns the written PNG paths (``<key>_<dtype>_<dir>.png``).
    """
    plt = _pyplot()
    figures: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for record in records:
        figures[(record["dtype"], record["direction"])].append(record)
    written = []
    for (dtype, direction), group in sorted(figures.items()):
        good = [r for r in group if r["status"] == "ok" and r[key] is not None]
        if not good:
            continue
        head_dims = sorted({r["head_dim"] for r in group})
        causals = sorted({r["causal"] for r in group})
        fig, axes = plt.subplots(
            len(head_dims), len(causals), figsize=(5.5 * len(causals), 4 * len(head_dims)), squeeze=False
        )
        for (i, head_dim), (j, causal) in ((a, b) for a in enumerate(head_dims) for b in enumerate(causals)):
            _draw_panel(
                axes[i][j],
                [r for r in good if r["head_dim"] == head_dim and r["causal"] == causal],
                backends_in(group),
                key,
                ylabel,
            )
            axes[i][j].set_title(f"{dtype} {direction}, D={head_dim}, {'causal' if causal else 'non-causal'}")
        fig.tight_layout()
        path = out_dir / f"{key}_{dtype}_{direction}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_plots(records: Sequence[Record], out_dir: Path) -> list[Path]:
    """The benchmark's plots: TFLOP/s and peak memory against N. Returns the written PNG paths."""
    return plot_metric(records, "tflops", "TFLOP/s", out_dir) + plot_metric(
        records, "peak_mib", "peak memory (MiB)", out_dir
    )


def _draw_panel(axis: Any, records: Sequence[Record], backends: Sequence[str], key: str, ylabel: str) -> None:
    for backend in backends:
        points = sorted((r["seqlen"], r[key]) for r in records if r["backend"] == backend)
        if points:
            xs, ys = zip(*points, strict=True)
            axis.plot(xs, ys, marker="o", label=backend)
    seqlens = sorted({r["seqlen"] for r in records})
    axis.set_xscale("log", base=2)
    if seqlens:
        axis.set_xticks(seqlens, [str(n) for n in seqlens])
    axis.set_xlabel("sequence length N")
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="small")


# ------------------------------------------------------------------------------------------- all


def write_report(
    records: Sequence[Record],
    config: Mapping[str, Any],
    out_dir: Path,
    *,
    ours: str,
    reference: str,
    plots: bool = True,
) -> str:
    """Write results.csv, results.json, summary.md and the plots into ``out_dir``; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(records, out_dir / "results.csv")
    write_json(records, config, out_dir / "results.json")
    text = summary_text(records, ours, reference)
    (out_dir / "summary.md").write_text(text)
    if plots and importlib.util.find_spec("matplotlib") is None:
        warnings.warn("matplotlib is not installed: no plots (pip install matplotlib)", stacklevel=2)
    elif plots:
        write_plots(records, out_dir)
    return text
