"""scripts/compare_bwd_alone.py without a GPU: logs written with bench_bwd_kernels.py's own rows."""

from __future__ import annotations


def test_compare_bwd_alone_reads_the_bench_rows_and_ranges_speeds(load_script, tmp_path):
    bench = load_script("bench_bwd_kernels")
    compare = load_script("compare_bwd_alone")
    # (N, causal) -> wgmma microseconds, the same at both head dims
    times = {11: {(64, False): 100.0, (128, True): 40.0}, 17: {(64, False): 80.0, (128, True): 50.0}}
    for variant, by_shape in times.items():
        for head_dim in (64, 128):
            rows = [bench.HEADER]
            for (seqlen, causal), us in by_shape.items():
                rows.append(bench.format_row(2, 4, seqlen, head_dim, causal, {"mma.sync": 1.0, "wgmma": us}))
            (tmp_path / f"bwd_alone_{variant}_{head_dim}.log").write_text("\n".join(rows) + "\n")
    (tmp_path / "bwd_alone_notes.log").write_text("not a candidate's log\n")

    data = compare.read_dir(tmp_path)
    assert sorted(data) == [11, 17]
    assert data[17][(128, 2, 4, 64, 0)] == 80.0 and data[11][(64, 2, 4, 128, 1)] == 40.0
    lines = compare.compare(data, base=11)
    assert lines[0] == "| D | B | H | N | causal | v11 us (x v11) | v17 us (x v11) |"
    assert "| 64 | 2 | 4 | 64 | 0 | 100.0 (1.00) | 80.0 (1.25) |" in lines
    assert "| 128 | 2 | 4 | 128 | 1 | 40.0 (1.00) | 50.0 (0.80) |" in lines
    assert lines[-2:] == [
        "v17 / v11 (backward alone), D = 64: 0.80-1.25",
        "v17 / v11 (backward alone), D = 128: 0.80-1.25",
    ]
