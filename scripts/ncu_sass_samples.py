"""Where a kernel's warp samples fall: before its first MMA, between, after its last, and the hottest instructions.

    python scripts/ncu_sass_samples.py OUT/fwd_ours_sass.csv [--top 20]

The input is the per-instruction source page of an Nsight Compute report as CSV (the profile stage of
scripts/gpu_check.sh writes it: ``ncu --import R.ncu-rep --page source --csv --print-source sass``). Prints the
samples by stall reason, the share of samples before the first warpgroup MMA (HGMMA) and after the last one (a
block's prologue and epilogue, where its tensor cores have nothing to do), and the instructions with the most
samples (docs/perf.md, v24).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def load(path: Path) -> tuple[list[str], list[list[str]]]:
    """The header and the instruction rows of a source-page CSV (its first line names the kernel)."""
    rows = list(csv.reader(path.open()))
    return rows[1], rows[2:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", type=Path)
    p.add_argument("--top", type=int, default=20, help="hottest instructions to list")
    args = p.parse_args(argv)
    header, rows = load(args.csv)
    col = {name: i for i, name in enumerate(header)}
    samples = [int(r[col["# Samples"]]) for r in rows]
    total = sum(samples)
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    by_reason = {h[len("stall_") :]: sum(int(r[col[h]]) for r in rows) for h in reasons}
    print(f"{args.csv.name}: {len(rows)} instructions, {total} samples")
    print(
        "by stall reason:",
        ", ".join(f"{k} {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]) if v),
    )
    mma = [i for i, r in enumerate(rows) if "HGMMA" in r[col["Source"]]]
    if mma:
        before, after = sum(samples[: mma[0]]), sum(samples[mma[-1] + 1 :])
        print(
            f"before the first HGMMA: {before} ({before / total:.1%}); after the last: {after} ({after / total:.1%})"
        )
    print(f"top {args.top} instructions (index, samples, executions, source, main reasons):")
    for i in sorted(range(len(rows)), key=lambda i: -samples[i])[: args.top]:
        r = rows[i]
        top = sorted(((int(r[col[h]]), h[len("stall_") :]) for h in reasons if int(r[col[h]])), reverse=True)[
            :3
        ]
        reasons_text = ", ".join(f"{name} {n}" for n, name in top)
        print(
            f"{i:6d} {samples[i]:7d} {r[col['Instructions Executed']]:>10} {r[col['Source']].strip()[:60]:60s} {reasons_text}"
        )


if __name__ == "__main__":
    main()
