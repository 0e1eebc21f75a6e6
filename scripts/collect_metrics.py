"""Collect a multirun's metrics.json files into one table: tokens/s and peak memory per backend and N.

python scripts/collect_metrics.py                                   # newest sweep under multirun/
python scripts/collect_metrics.py multirun/long_context/2026-11-29/12-00-00
python scripts/collect_metrics.py SWEEP_DIR --out docs/results/model_level   # also writes .md and .csv

The markdown table goes to stdout; --out PREFIX writes PREFIX.md (the same table) and PREFIX.csv (every
field, one line per run). See docs/model_benchmark.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ sits at the repo root, outside the installed packages
    sys.path.insert(0, str(ROOT))

from benchmarks.model_level import csv_rows, load_runs, markdown_table, write_csv


def newest_sweep(root: Path) -> Path:
    """The most recently modified Hydra sweep directory (one holding multirun.yaml) under ``root``."""
    sweeps = [p.parent for p in root.rglob("multirun.yaml")]
    if not sweeps:
        raise SystemExit(f"no multirun under {root}/; pass a directory")
    return max(sweeps, key=lambda p: p.stat().st_mtime)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sweep_dir", nargs="?", type=Path, help="the multirun directory (default: newest under multirun/)"
    )
    parser.add_argument(
        "--out", type=Path, help="write PREFIX.md and PREFIX.csv (a .md or .csv suffix is dropped)"
    )
    parser.add_argument(
        "--reference", default="sdpa", help="backend the tokens/s ratios are taken against (default: sdpa)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sweep_dir = args.sweep_dir or newest_sweep(ROOT / "multirun")
    if not sweep_dir.is_dir():
        raise SystemExit(f"{sweep_dir} is not a directory")
    try:
        results = load_runs(sweep_dir)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    table = markdown_table(results, args.reference)
    print(f"{sweep_dir}\n\n{table}")
    if args.out is not None:
        prefix = args.out.with_suffix("") if args.out.suffix in (".md", ".csv") else args.out
        prefix.parent.mkdir(parents=True, exist_ok=True)
        md_path, csv_path = Path(f"{prefix}.md"), Path(f"{prefix}.csv")
        md_path.write_text(f"Runs from `{sweep_dir}`.\n\n{table}\n")
        write_csv(csv_rows(results, args.reference), csv_path)
        print(f"\nwrote {md_path} and {csv_path}")


if __name__ == "__main__":
    main()
