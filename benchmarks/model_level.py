"""Model-level benchmark tables: one row per training run of a (Hydra multi)run directory.

A run directory holds ``metrics.json`` (written by ``transformer.training.train``) and, under Hydra,
``.hydra/overrides.yaml`` (the command-line overrides of that job). ``load_runs`` reads every run under a
sweep directory, ``markdown_table`` / ``csv_rows`` lay them out with tokens/s relative to a reference
backend (sdpa) at the same sequence length, batch, device and precision.

Statuses: ``ok``; ``oom`` (the run ran out of memory and stopped, see ``oom_step``); ``missing`` (a run
directory with overrides but no metrics.json: the job crashed or is still running).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CSV_COLUMNS",
    "RunResult",
    "csv_rows",
    "load_run",
    "load_runs",
    "markdown_table",
    "parse_overrides",
    "speedups",
    "write_csv",
]

BACKEND_ORDER = {"naive": 0, "sdpa": 1, "flash": 2}
MEMORY_KINDS = {
    "cuda_max_allocated": "CUDA max allocated",
    "process_peak_rss": "peak RSS",
    "process_peak_rss_lifetime": "peak RSS (whole process)",
}
CSV_COLUMNS = (
    "run",
    "backend",
    "seq_len",
    "batch_size",
    "status",
    "tokens_per_second",
    "peak_memory_mib",
    "peak_memory_kind",
    "start_memory_mib",
    "speedup_vs_reference",
    "reference",
    "backends_served",
    "device",
    "precision",
    "steps",
    "oom_step",
    "oom_phase",
    "oom_message",
    "overrides",
)


@dataclass(frozen=True)
class RunResult:
    """What one run reports, from its metrics.json with its Hydra overrides filling any gaps."""

    run: str
    backend: str
    seq_len: int | None
    batch_size: int | None
    status: str
    tokens_per_second: float | None
    peak_memory_mib: float | None
    peak_memory_kind: str | None
    start_memory_mib: float | None
    backends_served: str | None
    device: str | None
    precision: str | None
    steps: int | None
    oom_step: int | None
    oom_phase: str | None
    oom_message: str | None
    overrides: tuple[str, ...]

    @property
    def group(self) -> tuple[Any, ...]:
        """Runs in one group differ only by backend: their tokens/s compare directly."""
        return (self.seq_len, self.batch_size, self.device, self.precision)


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["+experiment=x", "task.max_len=8"]`` -> ``{"experiment": "x", "task.max_len": "8"}``."""
    parsed = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if sep:
            parsed[key.lstrip("+~")] = value
    return parsed


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def load_run(run_dir: Path, sweep_dir: Path | None = None) -> RunResult:
    """Read one run directory (``metrics.json``, ``.hydra/overrides.yaml``; either may be absent)."""
    metrics_path = run_dir / "metrics.json"
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    overrides = tuple(yaml.safe_load(overrides_path.read_text()) or []) if overrides_path.is_file() else ()
    given = parse_overrides(overrides)
    backend = (
        metrics.get("backend_requested")
        or given.get("model.backend")
        or given.get("attention.name")
        or given.get("attention")
        or "?"
    )
    calls = metrics.get("backend_calls") or {}
    served = "+".join(sorted(calls)) if calls else metrics.get("backend_used")
    status = metrics.get("status", "ok") if metrics else "missing"
    kind = metrics.get("peak_memory_kind")
    if kind is None and metrics.get("peak_memory_mb") is not None:  # written before the kind was recorded
        on_cuda = str(metrics.get("device", "")).startswith("cuda")
        kind = "cuda_max_allocated" if on_cuda else "process_peak_rss_lifetime"
    relative = run_dir.relative_to(sweep_dir) if sweep_dir is not None else Path(run_dir.name)
    return RunResult(
        run=str(relative) if str(relative) != "." else run_dir.name,
        backend=backend,
        seq_len=_int_or_none(metrics.get("seq_len", given.get("task.max_len"))),
        batch_size=_int_or_none(metrics.get("batch_size", given.get("trainer.batch_size"))),
        status=status,
        tokens_per_second=metrics.get("tokens_per_second"),
        peak_memory_mib=metrics.get("peak_memory_mb"),
        peak_memory_kind=kind,
        start_memory_mib=metrics.get("start_memory_mb"),
        backends_served=served,
        device=metrics.get("device", given.get("device")),
        precision=metrics.get("precision", given.get("precision")),
        steps=metrics.get("steps"),
        oom_step=metrics.get("oom_step"),
        oom_phase=metrics.get("oom_phase"),
        oom_message=metrics.get("oom_message"),
        overrides=overrides,
    )


def _sort_key(result: RunResult) -> tuple[Any, ...]:
    """By N, batch, device, precision (unknown ones after the known), then backend (naive, sdpa, flash)."""
    known_last = [(value is None, value if value is not None else 0) for value in result.group]
    return (
        *known_last,
        BACKEND_ORDER.get(result.backend, len(BACKEND_ORDER)),
        result.backend,
        result.run,
    )


def load_runs(sweep_dir: Path) -> list[RunResult]:
    """Every run under ``sweep_dir`` (or ``sweep_dir`` itself), sorted by N, batch, then backend.

    Raises FileNotFoundError when there is no run at all.
    """
    sweep_dir = Path(sweep_dir)
    run_dirs = {p.parent for p in sweep_dir.rglob("metrics.json")}
    run_dirs |= {p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    if not run_dirs:
        raise FileNotFoundError(f"no runs (metrics.json or .hydra/overrides.yaml) under {sweep_dir}")
    return sorted((load_run(d, sweep_dir) for d in run_dirs), key=_sort_key)


def speedups(results: Sequence[RunResult], reference: str = "sdpa") -> list[float | None]:
    """tokens/s of each run over the ``reference`` backend's in its group (None if either didn't finish)."""
    base = {
        r.group: r.tokens_per_second
        for r in results
        if r.backend == reference and r.status == "ok" and r.tokens_per_second
    }
    out: list[float | None] = []
    for r in results:
        ref = base.get(r.group)
        ok = r.status == "ok" and r.tokens_per_second is not None and ref
        out.append(r.tokens_per_second / ref if ok else None)
    return out


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _status_cell(result: RunResult) -> str:
    if result.status == "oom":
        where = "" if result.oom_phase in (None, "train") else f" {result.oom_phase}"
        return f"OOM (step {result.oom_step}{where})" if result.oom_step is not None else "OOM"
    return result.status


def markdown_table(results: Sequence[RunResult], reference: str = "sdpa") -> str:
    """A markdown table, one line per run: backend, N, batch, status, tokens/s, peak MiB, vs reference.

    For an OOM run the peak is the memory reached before the allocation that failed.
    """
    headers = [
        "backend",
        "N",
        "batch",
        "status",
        "tokens/s",
        "peak MiB",
        "memory measured",
        f"vs {reference}",
        "served by",
    ]
    lines = []
    for result, ratio in zip(results, speedups(results, reference), strict=True):
        lines.append(
            [
                result.backend,
                "-" if result.seq_len is None else str(result.seq_len),
                "-" if result.batch_size is None else str(result.batch_size),
                _status_cell(result),
                _number(result.tokens_per_second) if result.status == "ok" else "-",
                _number(result.peak_memory_mib),
                MEMORY_KINDS.get(result.peak_memory_kind or "", result.peak_memory_kind or "-"),
                "-" if ratio is None else f"{ratio:.2f}x",
                result.backends_served or "-",
            ]
        )
    numeric = {1, 2, 4, 5, 7}
    align = ["---:" if i in numeric else "---" for i in range(len(headers))]
    rows = [headers, align, *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def csv_rows(results: Sequence[RunResult], reference: str = "sdpa") -> list[dict[str, Any]]:
    """One dict per run with the keys of ``CSV_COLUMNS`` (None for what a run doesn't report)."""
    rows = []
    for result, ratio in zip(results, speedups(results, reference), strict=True):
        row = asdict(result)
        row["overrides"] = " ".join(result.overrides)
        row["speedup_vs_reference"] = ratio
        row["reference"] = reference
        rows.append({key: row[key] for key in CSV_COLUMNS})
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write ``csv_rows`` output with a header line (empty cells for None)."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
