"""Time the fused residual add + LayerNorm against the unfused torch ops and print a markdown table.

python scripts/bench_add_layernorm.py                        # CPU: fp32, 4096 x 512 and 4096 x 1024
python scripts/bench_add_layernorm.py --device cuda          # bf16 and fp32 over the CUDA shapes
python scripts/bench_add_layernorm.py --device cuda --dtypes bf16 --shapes 16384x1024 --out results/addln
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ sits at the repo root, outside the installed packages
    sys.path.insert(0, str(ROOT))

from benchmarks.add_layernorm import (
    DIRECTIONS,
    DTYPES,
    default_config,
    describe,
    format_table,
    run,
    write_outputs,
)


def shape(text: str) -> tuple[int, int]:
    """``ROWSxWIDTH`` (e.g. 16384x1024) as (rows, width)."""
    try:
        rows, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxWIDTH such as 16384x1024, got {text!r}") from None
    if rows < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"rows and width must be positive, got {text!r}")
    return rows, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if present"
    )
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), help="default: bf16 fp32 (CUDA), fp32 (CPU)"
    )
    parser.add_argument("--shapes", nargs="+", type=shape, help="ROWSxWIDTH ...; default: per device")
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    parser.add_argument(
        "--no-grad-s", action="store_true", help="fwd_bwd with dy only (the post-norm pattern)"
    )
    parser.add_argument("--warmup-ms", type=float, default=100.0)
    parser.add_argument("--rep-ms", type=float, default=500.0)
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternating rounds (default: 5 CPU, 1 CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write results.csv and summary.md here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    overrides = {
        "directions": tuple(args.directions),
        "grad_s": not args.no_grad_s,
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "threads": args.threads,
        "seed": args.seed,
    }
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.dtypes:
        overrides["dtypes"] = tuple(args.dtypes)
    if args.shapes:
        overrides["shapes"] = tuple(args.shapes)
    cfg = default_config(device, **overrides)
    results = run(cfg)
    header = f"{datetime.now():%Y-%m-%d %H:%M}: {describe(cfg)}"
    if args.out is not None:
        for path in write_outputs(results, header, args.out):
            print(f"wrote {path}")
    print(header)
    print(format_table(results))


if __name__ == "__main__":
    main()
