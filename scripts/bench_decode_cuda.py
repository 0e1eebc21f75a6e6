"""Time decode-shaped attention on CUDA: our flash forward (split-KV heuristic and one pass) against torch SDPA.

python scripts/bench_decode_cuda.py                       # Nq = 1, Nk 512..65536, GQA and MHA, plus Nq = 4; bf16, D = 128
python scripts/bench_decode_cuda.py --len-k 4096 65536 --out results/decode
python scripts/bench_decode_cuda.py --methods flash flash_1split sdpa_flash
python scripts/bench_decode_cuda.py --shapes 1,27,27,256,4096 --methods flash flash_1split flash_2split

Columns: median µs, GB/s over the bytes of q, k, v and out, and speed-ups (reference time / this method's
time) against SDPA's default and SDPA's FLASH_ATTENTION backend. The markdown table is printed last; with
--out DIR it is also written to DIR/decode_kernels.md and DIR/decode_kernels.csv. The code lives in
benchmarks/decode_kernel.py.
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

from benchmarks.decode_kernel import (
    DEFAULT_LEN_KS,
    METHODS,
    default_shapes,
    format_markdown,
    parse_shape,
    records,
    run,
    write_outputs,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--len-k", type=int, nargs="+", default=list(DEFAULT_LEN_KS), help="cache lengths Nk")
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="B,Hq,Hkv,Nq,Nk each, instead of the decode shapes (--len-k)",
    )
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write decode_kernels.{csv,md} here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_cuda.py needs a CUDA GPU")
    header = (
        f"{datetime.now():%Y-%m-%d %H:%M}: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"{args.dtype}, D = {args.head_dim}; speed-up = reference time / this time"
    )
    if args.shapes:
        shapes = [parse_shape(text, args.head_dim) for text in args.shapes]
    else:
        shapes = default_shapes(args.len_k, args.head_dim)
    measurements = run(
        shapes,
        args.methods,
        DTYPES[args.dtype],
        args.warmup_ms,
        args.rep_ms,
        progress=lambda s: print(s, flush=True),
    )
    rows = records(measurements)
    if args.out is not None:
        csv_path, md_path = write_outputs(rows, args.out, header)
        print(f"wrote {csv_path} and {md_path}")
    print(header)
    print(format_markdown(rows))


if __name__ == "__main__":
    main()
