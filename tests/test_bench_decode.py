"""The decode kernel benchmark's shapes, bytes, speed-ups, markdown table and CSV, on fake timings (no GPU)."""

from __future__ import annotations

import csv
import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ sits at the repo root, outside the installed packages
    sys.path.insert(0, str(ROOT))
bench = importlib.import_module("benchmarks.decode_kernel")
DecodeShape, Measurement = bench.DecodeShape, bench.Measurement

GQA = DecodeShape(1, 32, 8, 1, 4096)
MHA = DecodeShape(8, 32, 32, 1, 4096)


def fake_measurements() -> list:
    return [
        Measurement(GQA, "flash", 10.0),
        Measurement(GQA, "flash_1split", 40.0),
        Measurement(GQA, "sdpa", 20.0, "enable_gqa"),
        Measurement(GQA, "sdpa_flash", 25.0, "enable_gqa"),
        Measurement(GQA, "sdpa_cudnn", None, "n/a: No available kernel"),
        Measurement(MHA, "flash", 50.0),
        Measurement(MHA, "sdpa", 60.0),
    ]


def test_default_shapes_cover_both_configurations_and_one_nq4_case():
    shapes = bench.default_shapes()
    assert len(shapes) == 2 * len(bench.DEFAULT_LEN_KS) + 1
    assert {(s.batch, s.heads_q, s.heads_kv) for s in shapes if s.len_q == 1} == {(1, 32, 8), (8, 32, 32)}
    assert sorted({s.len_k for s in shapes}) == list(bench.DEFAULT_LEN_KS)
    assert [s.len_q for s in shapes].count(4) == 1
    assert all(s.head_dim == 128 for s in shapes)


def test_bytes_count_q_k_v_and_out_once():
    shape = DecodeShape(2, 8, 2, 3, 100, 64)
    assert shape.bytes_moved() == 2 * (2 * 2 * 8 * 3 * 64 + 2 * 2 * 2 * 100 * 64)
    assert shape.bytes_moved(element_size=4) == 2 * shape.bytes_moved()


def test_records_speedups_and_bandwidth():
    rows = {(r["Nk"], r["B"], r["method"]): r for r in bench.records(fake_measurements())}
    flash = rows[(4096, 1, "flash")]
    assert flash["vs sdpa"] == 2.0 and flash["vs sdpa_flash"] == 2.5
    assert abs(flash["GB/s"] - GQA.bytes_moved() / 10e-6 / 1e9) < 1e-9
    assert rows[(4096, 1, "flash_1split")]["vs sdpa"] == 0.5
    missing = rows[(4096, 1, "sdpa_cudnn")]
    assert missing["us"] is None and missing["GB/s"] is None and missing["vs sdpa"] is None
    mha = rows[(4096, 8, "flash")]
    assert mha["vs sdpa"] == 60.0 / 50.0 and mha["vs sdpa_flash"] is None  # sdpa_flash not run there


def test_markdown_table_has_every_row_and_marks_missing_values():
    table = bench.format_markdown(bench.records(fake_measurements()))
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()]
    header, rows = cells[0], cells[2:]
    assert header == [
        "B",
        "Hq",
        "Hkv",
        "Nq",
        "Nk",
        "D",
        "method",
        "µs",
        "GB/s",
        "vs sdpa",
        "vs sdpa_flash",
        "note",
    ]
    assert len(rows) == len(fake_measurements())
    flash = rows[0]
    assert flash[:7] == ["1", "32", "8", "1", "4096", "128", "flash"]
    assert flash[7] == "10.0" and flash[9] == "2.00x" and flash[10] == "2.50x"
    cudnn = rows[4]
    assert cudnn[6] == "sdpa_cudnn" and cudnn[7:11] == ["n/a"] * 4 and "No available kernel" in cudnn[11]


def test_write_outputs_writes_csv_and_markdown(tmp_path):
    rows = bench.records(fake_measurements())
    csv_path, md_path = bench.write_outputs(rows, tmp_path / "out", header="H200, bf16")
    with csv_path.open() as handle:
        read = list(csv.DictReader(handle))
    assert list(read[0]) == list(bench.CSV_COLUMNS)
    assert len(read) == len(rows)
    assert read[0]["method"] == "flash" and float(read[0]["us"]) == 10.0
    assert read[4]["us"] == "" and read[4]["note"].startswith("n/a")
    text = md_path.read_text()
    assert text.startswith("H200, bf16\n\n|") and text.count("\n") == len(rows) + 4


def test_forced_splits_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", "5")
    with bench.forced_splits(1):
        assert os.environ["FLASH_ATTN_NUM_SPLITS"] == "1"
    assert os.environ["FLASH_ATTN_NUM_SPLITS"] == "5"
    with bench.forced_splits(None):
        assert "FLASH_ATTN_NUM_SPLITS" not in os.environ
    assert os.environ["FLASH_ATTN_NUM_SPLITS"] == "5"


def test_time_us_measures_a_cpu_function():
    assert bench.time_us(lambda: sum(range(100)), warmup_ms=1, rep_ms=5) > 0


def test_script_parses_its_arguments(load_script):
    script = load_script("bench_decode_cuda")
    args = script.parse_args(["--len-k", "512", "4096", "--methods", "flash", "sdpa", "--out", "x"])
    assert args.len_k == [512, 4096] and args.methods == ["flash", "sdpa"] and args.out == Path("x")
    assert script.parse_args([]).dtype == "bf16" and script.parse_args([]).shapes is None
    args = script.parse_args(["--shapes", "1,27,27,256,4096", "--methods", "flash_2split"])
    assert args.shapes == ["1,27,27,256,4096"] and args.methods == ["flash_2split"]


def test_parse_shape_reads_b_hq_hkv_nq_nk_and_names_bad_input():
    assert bench.parse_shape("2,32,8,4,8192", head_dim=64) == bench.DecodeShape(2, 32, 8, 4, 8192, 64)
    for bad in ("1,2,3", "1,2,0,4,5", "1,a,1,1,1", "1,6,4,1,16"):
        with pytest.raises(ValueError, match="shape: expected"):
            bench.parse_shape(bad)
