"""One table of the backward kernel candidates timed alone (`gpu_check.sh fwdtiles`, FWD_TILE_KERNEL=sm90bwd).

    python scripts/compare_bwd_alone.py OUT_DIR --base V

Reads OUT_DIR/bwd_alone_<v>_<D>.log (the tables of scripts/bench_bwd_kernels.py, one per candidate tree and
head dim) and prints, for each (D, B, H, N, causal), every candidate's wgmma backward time in microseconds and
its speed relative to candidate V (V's time over its own), then per candidate and head dim the range of that
speed.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

Shape = tuple[int, int, int, int, int]  # (D, B, H, N, causal)
WGMMA_US = 6  # cell of the wgmma time in a row of bench_bwd_kernels.py's table


def read_log(path: Path, head_dim: int) -> dict[Shape, float]:
    """(D, B, H, N, causal) -> the wgmma backward's microseconds in one bench_bwd_kernels.py log."""
    rows: dict[Shape, float] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) <= WGMMA_US or not cells[0].isdigit():
            continue
        batch, heads, seqlen, causal = (int(c) for c in cells[:4])
        rows[(head_dim, batch, heads, seqlen, causal)] = float(cells[WGMMA_US])
    return rows


def read_dir(out_dir: Path) -> dict[int, dict[Shape, float]]:
    """Candidate -> its timings, from every bwd_alone_<v>_<D>.log in out_dir."""
    data: dict[int, dict[Shape, float]] = defaultdict(dict)
    for path in sorted(out_dir.glob("bwd_alone_*_*.log")):
        if m := re.fullmatch(r"bwd_alone_(\d+)_(\d+)\.log", path.name):
            data[int(m.group(1))].update(read_log(path, int(m.group(2))))
    return dict(data)


def compare(data: dict[int, dict[Shape, float]], base: int) -> list[str]:
    """The table's lines and then each candidate's range of speed relative to `base` per head dim."""
    variants = sorted(data)
    header = ["D", "B", "H", "N", "causal"] + [f"v{v} us (x v{base})" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "--:|" * len(header)]
    relative: dict[tuple[int, int], list[float]] = defaultdict(list)
    for shape in sorted(set().union(*(d.keys() for d in data.values()))):
        cells = [str(x) for x in shape]
        reference = data[base].get(shape)
        for v in variants:
            us = data[v].get(shape)
            if us is None:
                cells.append("-")
            elif reference is None:
                cells.append(f"{us:.1f} (-)")
            else:
                relative[(v, shape[0])].append(reference / us)
                cells.append(f"{us:.1f} ({reference / us:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for (v, head_dim), values in sorted(relative.items()):
        if v != base:
            lines.append(
                f"v{v} / v{base} (backward alone), D = {head_dim}: {min(values):.2f}-{max(values):.2f}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base", type=int, required=True, help="candidate the others are compared with")
    args = parser.parse_args()
    data = read_dir(args.out_dir)
    if args.base not in data:
        raise SystemExit(f"--base {args.base}: no bwd_alone_{args.base}_<D>.log in {args.out_dir}")
    print("\n".join(compare(data, args.base)))


if __name__ == "__main__":
    main()
