"""Time ``Transformer.generate`` with and without the KV cache on every backend and print a table.

python scripts/bench_decoding.py                          # d_model 128, batch 8, 128 new tokens, CPU
python scripts/bench_decoding.py --num-kv-heads 2 --new-tokens 64 --backends sdpa flash
python scripts/bench_decoding.py --device cuda --dtype bfloat16 --d-model 1024 --num-heads 16 --batch-size 32
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ sits at the repo root, outside the installed packages
    sys.path.insert(0, str(ROOT))

from benchmarks.decoding import DecodingConfig, describe, format_table, run


def parse_args(argv: list[str] | None = None) -> DecodingConfig:
    defaults = DecodingConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--d-model", type=int, default=defaults.d_model)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=defaults.num_kv_heads)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--dim-feedforward", type=int, default=defaults.dim_feedforward)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--src-len", type=int, default=defaults.src_len)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    parser.add_argument("--backends", nargs="+", default=list(defaults.backends))
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    fields = vars(args)
    fields["backends"] = tuple(fields["backends"])
    return DecodingConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    results = run(cfg)
    print(f"{datetime.now():%Y-%m-%d %H:%M}: {describe(cfg)}")
    print(format_table(results))


if __name__ == "__main__":
    main()
