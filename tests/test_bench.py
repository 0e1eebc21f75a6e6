"""The attention benchmark: config composition, a tiny CPU sweep, its files, rows and failure statuses."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import attention_backends as ab

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ sits at the repo root, outside the installed packages
    sys.path.insert(0, str(ROOT))
bench = importlib.import_module("benchmarks.attention")
report = importlib.import_module("benchmarks.report")

CONFIG_DIR = str(ROOT / "configs")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = [
    "bench_preset=cpu",
    "device=cpu",
    "tokens=64",
    "hidden=32",
    "seqlens=[16,32]",
    "head_dims=[16]",
    "causal=[false,true]",
    "warmup_ms=0",
    "rep_ms=1",
    "plots=true",
]


def compose_bench(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="bench", overrides=overrides)


@pytest.fixture
def test_backends():
    """A backend that only runs on CUDA (unsupported here) and one that always runs out of memory."""
    ab.register_backend("cuda_only", support=ab.BackendSupport(devices=frozenset({"cuda"})), fallback=None)(
        ab.naive_attention
    )

    @ab.register_backend("always_oom", fallback=None)
    def always_oom(q, k, v, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")

    yield ["cuda_only", "always_oom"]
    ab.unregister_backend("cuda_only")
    ab.unregister_backend("always_oom")


def test_presets_fill_unset_sizes():
    cfg = compose_bench(["bench_preset=cpu"])
    settings = bench.resolve_settings(cfg)
    assert settings.device == "cpu" and settings.dtypes == ("fp32",)
    assert settings.seqlens == (128, 256, 512, 1024)
    auto = bench.resolve_settings(compose_bench(["device=cpu", "seqlens=[8]"]))
    assert auto.seqlens == (8,) and auto.tokens == settings.tokens  # cpu preset picked for the cpu device
    assert auto.backends == ("naive", "sdpa", "flash")  # SDPA's forced kernels are timed on CUDA only


def test_flops_follow_flash_attn():
    shape = bench.Shape(dtype="bf16", head_dim=64, seqlen=1024, batch=2, heads=8)
    forward = 4 * 2 * 8 * 1024**2 * 64
    assert bench.attention_flops(shape, False, "fwd") == forward
    assert bench.attention_flops(shape, True, "fwd") == forward / 2
    assert bench.attention_flops(shape, False, "fwd_bwd") == 3.5 * forward
    assert bench.attention_flops(shape, True, "bwd") == 2.5 * forward / 2


def test_tiny_sweep_writes_results(tmp_path, test_backends):
    cfg = compose_bench([*TINY, f"backends=[naive,sdpa,flash,{','.join(test_backends)}]"])
    records = bench.run(cfg, output_dir=tmp_path)

    written = ["results.csv", "results.json", "summary.md"]
    if HAVE_MATPLOTLIB:
        written += ["tflops_fp32_fwd.png", "tflops_fp32_bwd.png", "tflops_fp32_fwd_bwd.png"]
    for name in written:
        assert (tmp_path / name).is_file(), name
    with (tmp_path / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == set(bench.ROW_FIELDS)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["seqlens"] == [16, 32] and len(data["rows"]) == len(rows) == len(records)

    measured = [r for r in records if r["direction"] != "bwd"]
    assert len(measured) == 2 * 2 * 2 * 5  # seqlens × causal × directions × backends
    for record in measured:
        assert record["batch"] == 64 // record["seqlen"] and record["heads"] == 2
        assert record["peak_mib"] is None  # not measured on CPU
        if record["backend"] in ("naive", "sdpa"):
            assert record["status"] == "ok" and record["tflops"] > 0 and record["ms"] > 0
        elif record["backend"] == "flash":  # ours: timed only if its CPU kernels are built
            assert record["status"] in ("ok", "unsupported")
        elif record["backend"] == "cuda_only":
            assert record["status"] == "unsupported" and record["tflops"] is None
        else:
            assert record["status"] == "OOM" and record["ms"] is None
    assert {r["backend"] for r in records if r["direction"] == "bwd"} >= {"naive", "sdpa"}
    header = next(line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("|"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[7:] == ["naive", "sdpa", "flash", *test_backends, "flash vs sdpa"]
    assert report.read_csv(tmp_path / "results.csv") == records  # what scripts/plot_results.py redraws from


def test_table_ratio_and_statuses():
    base = {
        "dtype": "bf16",
        "head_dim": 64,
        "causal": False,
        "direction": "fwd",
        "seqlen": 512,
        "batch": 32,
        "heads": 16,
        "ms": 1.0,
        "peak_mib": None,
    }
    records = [
        {**base, "backend": "sdpa_flash", "tflops": 200.0, "status": "ok"},
        {**base, "backend": "flash", "tflops": 300.0, "status": "ok"},
        {**base, "backend": "naive", "tflops": None, "status": "OOM"},
    ]
    table = report.tflops_table(records, ours="flash", reference="sdpa_flash")
    assert "flash vs sdpa_flash" in table and "1.50x" in table and "OOM" in table


def test_rounds_time_the_backends_round_robin_and_keep_medians(monkeypatch):
    settings = bench.resolve_settings(compose_bench([*TINY, "rounds=3", "warmup_ms=30", "rep_ms=300"]))
    samples = {"a": [3.0, 1.0, 2.0], "b": [5.0, 4.0, 6.0]}
    calls: list[tuple[str, float, float]] = []

    def fake_time_ms(step, device, warmup_ms, rep_ms):
        label = step()
        calls.append((label, warmup_ms, rep_ms))
        if label == "c" and len([c for c in calls if c[0] == "c"]) == 2:
            raise RuntimeError("boom in round 2")
        return samples.get(label, [7.0] * 3)[len([c for c in calls if c[0] == label]) - 1]

    monkeypatch.setattr(bench, "time_ms", fake_time_ms)
    measured = {label: bench.Measurement(bench.OK, peak_mib=1.5) for label in "abc"}
    steps = {label: (lambda label=label: label) for label in "abc"}
    out = bench.time_in_rounds(steps, measured, settings)
    assert [c[0] for c in calls] == ["a", "b", "c", "a", "b", "c", "a", "b"]  # c stops after failing
    assert {c[1:] for c in calls} == {(10.0, 100.0)}  # warm-up and measuring time split among rounds
    assert out["a"] == bench.Measurement(bench.OK, ms=2.0, peak_mib=1.5)
    assert out["b"].ms == 5.0
    assert out["c"].status == bench.ERROR and "boom" in out["c"].note


def test_tiny_sweep_in_rounds(tmp_path):
    cfg = compose_bench([*TINY, "backends=[naive,sdpa]", "rounds=2", "plots=false", "causal=[true]"])
    records = bench.run(cfg, output_dir=tmp_path)
    assert {r["direction"] for r in records} == {"fwd", "fwd_bwd", "bwd"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in records if r["direction"] != "bwd")
    with pytest.raises(ValueError, match="rounds"):
        bench.resolve_settings(compose_bench([*TINY, "rounds=0"]))


def test_compare_fwd_variants_lines_up_candidates(tmp_path, monkeypatch, capsys, load_script):
    header = (
        "| D | N | causal | flash fwd TF/s | sdpa_flash fwd | ratio | x |\n|---|---|---|---|---|---|---|\n"
    )
    (tmp_path / "fwd_variant_8.log").write_text(header + "| 64 | 1024 | 0 | 400 | 300 | 1.33 | - |\n")
    (tmp_path / "fwd_variant_9.log").write_text(
        "build noise\n"
        + header
        + "| 64 | 1024 | 0 | 440 | 310 | 1.42 | - |\n| 128 | 1024 | 1 | 300 | 250 | 1.20 | - |\n"
    )
    monkeypatch.setattr(sys, "argv", ["compare_fwd_variants.py", str(tmp_path), "--base", "8"])
    load_script("compare_fwd_variants").main()
    out = capsys.readouterr().out
    assert "| 64 | 1024 | 0 | 400 (1.33x, 1.00) | 440 (1.42x, 1.10) |" in out
    assert "| 128 | 1024 | 1 | - | 300 (1.20x, -) |" in out
    assert "v9 / v8, D = 64: 1.10-1.10" in out
    assert "D = 128:" not in out


def test_compare_fwd_variants_reads_the_fwd_bwd_column(tmp_path, monkeypatch, capsys, load_script):
    row = "| 128 | 4096 | 0 | {fwd} | 338 | 1.66 | {fb} | 306 | {ratio} | 387/514 | 1e-3 |\n"
    (tmp_path / "fwd_variant_0.log").write_text(row.format(fwd=561, fb=352, ratio=1.15))
    (tmp_path / "fwd_variant_1.log").write_text(row.format(fwd=556, fb=393, ratio=1.28))
    monkeypatch.setattr(
        sys, "argv", ["compare_fwd_variants.py", str(tmp_path), "--base", "0", "--column", "fwd_bwd"]
    )
    load_script("compare_fwd_variants").main()
    out = capsys.readouterr().out
    assert "| 128 | 4096 | 0 | 352 (1.15x, 1.00) | 393 (1.28x, 1.12) |" in out
    assert "v1 / v0, D = 128: 1.12-1.12" in out
