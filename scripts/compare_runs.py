"""Print a table of the runs under a (multirun) directory, one row per metrics.json.

python scripts/compare_runs.py                      # newest directory under multirun/
python scripts/compare_runs.py multirun/2026-01-01/12-00-00
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [
    ("run", lambda run, m: run),
    ("backend", lambda run, m: m.get("backend_requested", "?")),
    ("ran", lambda run, m: m.get("backend_used") or "?"),
    ("task", lambda run, m: m.get("task", "?")),
    ("device", lambda run, m: m.get("device", "?")),
    ("tokens/s", lambda run, m: f"{m.get('tokens_per_second', 0):,.0f}"),
    ("peak MB", lambda run, m: f"{m.get('peak_memory_mb', 0):,.0f}"),
    ("tok acc", lambda run, m: f"{m.get('eval_token_accuracy', float('nan')):.4f}"),
    ("seq acc", lambda run, m: f"{m.get('eval_sequence_accuracy', float('nan')):.4f}"),
    ("time s", lambda run, m: f"{m.get('train_time_s', 0):.1f}"),
]


def newest_sweep(root: Path) -> Path:
    """The most recently modified directory two levels under ``root`` (``multirun/<date>/<time>``)."""
    candidates = [p for p in root.glob("*/*") if p.is_dir()]
    if not candidates:
        raise SystemExit(f"no runs under {root}/; pass a directory")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def table(sweep_dir: Path) -> str:
    rows = []
    for path in sorted(sweep_dir.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        run = str(path.parent.relative_to(sweep_dir)) or "."
        rows.append([fmt(run, metrics) for _, fmt in COLUMNS])
    if not rows:
        raise SystemExit(f"no metrics.json under {sweep_dir}")
    header = [name for name, _ in COLUMNS]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep_dir", nargs="?", type=Path, help="directory holding the runs' metrics.json files"
    )
    args = parser.parse_args()
    sweep_dir = args.sweep_dir or newest_sweep(Path("multirun"))
    print(f"{sweep_dir}\n{table(sweep_dir)}")


if __name__ == "__main__":
    main()
