"""scripts/bench_bwd_kernels.py without a GPU: its shape arguments and its table rows."""

from __future__ import annotations


def test_bench_bwd_kernels_parses_shapes_and_formats_rows(load_script):
    bench = load_script("bench_bwd_kernels")
    args = bench.parse_args(["--head-dim", "128", "--shapes", "1,4,1024", "2,3,129", "--causal", "1"])
    assert args.shapes == [(1, 4, 1024), (2, 3, 129)] and args.head_dim == 128 and args.causal == "1"
    # 2.5 * 4 * 1 * 4 * 1024^2 * 64 FLOPs = 2.68 GFLOP: 100 us -> 26.8 TF/s, 50 us -> 53.7 TF/s; 32 key blocks.
    row = bench.format_row(1, 4, 1024, 64, False, {"mma.sync": 100.0, "wgmma": 50.0})
    assert row == "| 1 | 4 | 1024 | 0 | 32 | 100.0 | 50.0 | 27 | 54 | 2.00 |"
    # Causal halves the FLOPs; 129 keys are two blocks of 128 per (batch, head).
    row = bench.format_row(2, 3, 129, 64, True, {"mma.sync": 1.0, "wgmma": 2.0})
    assert row.startswith("| 2 | 3 | 129 | 1 | 12 | 1.0 | 2.0 |") and row.endswith("| 0.50 |")
    assert bench.HEADER.count("\n") == 1 and row.count("|") == bench.HEADER.split("\n")[0].count("|")
