"""Draw the benchmark plots (TFLOP/s and peak memory against N) again from a results.csv of bench.py.

    python scripts/plot_results.py path/to/results.csv [OUT_DIR]     # OUT_DIR: beside the CSV

Writes tflops_<dtype>_<direction>.png and peak_mib_<dtype>_<direction>.png, as bench.py does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import read_csv, write_plots


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("csv", type=Path, help="results.csv of a bench.py run")
    parser.add_argument("out_dir", type=Path, nargs="?", help="where the PNGs go (default: the CSV's folder)")
    args = parser.parse_args()
    records = read_csv(args.csv)
    out_dir = args.out_dir or args.csv.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in write_plots(records, out_dir):
        print(path)


if __name__ == "__main__":
    main()
