"""One table of the kernel candidates that `gpu_check.sh fwdtiles` timed, point by point.

    python scripts/compare_fwd_variants.py OUT_DIR [--base V] [--column fwd|fwd_bwd]

Reads OUT_DIR/fwd_variant_<v>.log (the markdown tables of scripts/bench_flash_cuda.py) and prints, for each
(D, N, causal), every candidate's TF/s in the chosen column (forward, or forward + backward for backward
candidates), its ratio to SDPA flash in its own run, and its speed relative to candidate V (default: the
lowest-numbered one found), then per head dim the range of that relative speed.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

Point = tuple[int, int, int]  # (D, N, causal)


# Cells of (our TF/s, ratio to SDPA flash) in a row of bench_flash_cuda.py's table.
COLUMNS = {"fwd": (3, 5), "fwd_bwd": (6, 8)}


def read_log(path: Path, column: str = "fwd") -> dict[Point, tuple[float, float]]:
    """(D, N, causal) -> (our TF/s, ratio to SDPA flash) in `column` from one candidate's log."""
    ours, ratio = COLUMNS[column]
    rows: dict[Point, tuple[float, float]] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) <= ratio or not cells[0].isdigit() or cells[ours] == "-":
            continue
        rows[(int(cells[0]), int(cells[1]), int(cells[2]))] = (float(cells[ours]), float(cells[ratio]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base", type=int, help="candidate the others are compared with")
    parser.add_argument(
        "--column", choices=sorted(COLUMNS), default="fwd", help="forward or forward + backward"
    )
    args = parser.parse_args()
    logs = {
        int(m.group(1)): p
        for p in args.out_dir.glob("fwd_variant_*.log")
        if (m := re.fullmatch(r"fwd_variant_(\d+)\.log", p.name))
    }
    if not logs:
        raise SystemExit(f"no fwd_variant_<v>.log in {args.out_dir}")
    variants = sorted(logs)
    base = args.base if args.base is not None else variants[0]
    if base not in logs:
        raise SystemExit(f"--base {base}: no fwd_variant_{base}.log in {args.out_dir}")
    data = {v: read_log(logs[v], args.column) for v in variants}
    points = sorted(set().union(*(d.keys() for d in data.values())))
    header = ["D", "N", "causal"] + [f"v{v} TF/s (x SDPA flash, x v{base})" for v in variants]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    relative: dict[tuple[int, int], list[float]] = defaultdict(list)
    for point in points:
        cells = [str(x) for x in point]
        reference = data[base].get(point)
        for v in variants:
            if point not in data[v]:
                cells.append("-")
                continue
            tflops, ratio = data[v][point]
            if reference is None:
                cells.append(f"{tflops:.0f} ({ratio:.2f}x, -)")
                continue
            rel = tflops / reference[0]
            relative[(v, point[0])].append(rel)
            cells.append(f"{tflops:.0f} ({ratio:.2f}x, {rel:.2f})")
        print("| " + " | ".join(cells) + " |")
    print()
    for (v, head_dim), values in sorted(relative.items()):
        if v != base:
            print(f"v{v} / v{base}, D = {head_dim}: {min(values):.2f}-{max(values):.2f}")


if __name__ == "__main__":
    main()
