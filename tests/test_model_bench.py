"""Model-level benchmark: OOM handling in train(), the long_context experiment, the metrics collector."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import attention_backends
from transformer import training
from transformer.model import Transformer
from transformer.training import train, validate_config

pytestmark = [
    pytest.mark.usefixtures("restore_default_backend"),
    pytest.mark.filterwarnings("ignore:attention backend .* falling back"),
]

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ sits at the repo root, outside the installed packages
    sys.path.insert(0, str(ROOT))
model_level = importlib.import_module("benchmarks.model_level")

CONFIG_DIR = str(ROOT / "configs")
TINY = [
    "device=cpu",
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "model.dim_feedforward=64",
    "task.vocab_size=12",
    "task.max_len=7",
    "trainer.steps=5",
    "trainer.batch_size=3",
    "trainer.warmup_steps=1",
    "trainer.eval_every=0",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=4",
    "trainer.checkpoint_every=0",
]
# The long_context experiment shrunk to CPU size (the experiment's own N and model are for a GPU).
TINY_LONG = [
    "+experiment=long_context",
    "device=cpu",
    "precision=fp32",
    "model.d_model=32",
    "model.num_heads=2",
    "model.dim_feedforward=64",
    "model.max_len=64",
    "trainer.steps=2",
    "trainer.untimed_steps=1",
]
SIMULATED_OOM = "CUDA out of memory. Tried to allocate 32.00 GiB (simulated)"


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def raise_oom_on_call(number: int, original):
    """A replacement for ``original`` that raises torch.OutOfMemoryError on its ``number``-th call."""
    calls = {"n": 0}

    def replacement(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == number:
            raise torch.OutOfMemoryError(SIMULATED_OOM)
        return original(*args, **kwargs)

    return replacement


# ------------------------------------------------------------------------------------ train() and OOM


def test_successful_run_reports_status_sizes_and_memory_kind(tmp_path):
    metrics = train(config("+trainer.untimed_steps=2", "attention=naive"), output_dir=tmp_path)
    assert metrics["status"] == "ok"
    assert metrics["seq_len"] == 7 and metrics["batch_size"] == 3 and metrics["min_seq_len"] == 1
    assert metrics["steps"] == 5 and metrics["timed_steps"] == 3
    assert metrics["tokens_per_second"] > 0
    assert metrics["peak_memory_mb"] > 0
    assert metrics["peak_memory_kind"] in ("process_peak_rss", "process_peak_rss_lifetime")
    assert 0 < metrics["start_memory_mb"] <= metrics["peak_memory_mb"]
    assert "oom_step" not in metrics
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    train_records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step_time_s"] > 0 for r in train_records if r["kind"] == "train")


def test_all_untimed_steps_fall_back_to_timing_every_step(tmp_path):
    metrics = train(config("trainer.steps=2", "+trainer.untimed_steps=5"), output_dir=tmp_path)
    assert metrics["timed_steps"] == 2 and metrics["tokens_per_second"] > 0


def test_eval_batches_zero_turns_evaluation_off(tmp_path):
    metrics = train(config("trainer.eval_batches=0"), output_dir=tmp_path)
    assert metrics["status"] == "ok"
    assert "eval_token_accuracy" not in metrics and "eval_sequence_accuracy" not in metrics
    kinds = {json.loads(line)["kind"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert kinds == {"train"}


def test_negative_untimed_steps_is_rejected():
    with pytest.raises(ValueError, match="trainer.untimed_steps"):
        validate_config(config("+trainer.untimed_steps=-1"))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_oom_during_training_is_reported_not_raised(where, monkeypatch, tmp_path):
    if where == "forward":
        monkeypatch.setattr(Transformer, "forward", raise_oom_on_call(3, Transformer.forward))
    else:
        monkeypatch.setattr(torch.Tensor, "backward", raise_oom_on_call(3, torch.Tensor.backward))
    metrics = train(config("attention=naive"), output_dir=tmp_path)
    assert metrics["status"] == "oom"
    assert metrics["oom_step"] == 3 and metrics["oom_phase"] == "train"
    assert metrics["steps"] == 2 and metrics["steps_this_run"] == 2
    assert metrics["oom_message"] == SIMULATED_OOM
    assert metrics["backend_requested"] == "naive"
    assert metrics["seq_len"] == 7 and metrics["batch_size"] == 3
    assert metrics["peak_memory_mb"] > 0
    assert "eval_token_accuracy" not in metrics
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    steps_logged = [
        json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == [1, 2]


def test_oom_in_the_first_step_has_no_tokens_per_second(monkeypatch, tmp_path):
    monkeypatch.setattr(Transformer, "forward", raise_oom_on_call(1, Transformer.forward))
    metrics = train(config(), output_dir=tmp_path)
    assert metrics["status"] == "oom" and metrics["oom_step"] == 1 and metrics["steps"] == 0
    assert "tokens_per_second" not in metrics and metrics["timed_steps"] == 0


def test_oom_during_evaluation_is_reported(monkeypatch, tmp_path):
    def evaluate_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(SIMULATED_OOM)

    monkeypatch.setattr(training, "evaluate", evaluate_out_of_memory)
    metrics = train(config(), output_dir=tmp_path)
    assert metrics["status"] == "oom" and metrics["oom_phase"] == "eval"
    assert metrics["oom_step"] == 5 and metrics["steps"] == 5
    assert metrics["tokens_per_second"] > 0


def test_other_errors_still_raise(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("not a memory problem")

    monkeypatch.setattr(Transformer, "forward", broken)
    with pytest.raises(RuntimeError, match="not a memory problem"):
        train(config(), output_dir=tmp_path)


# ------------------------------------------------------------------------------- experiment config


@pytest.mark.parametrize("attention", ["naive", "sdpa", "flash"])
@pytest.mark.parametrize("seq_len", [1024, 8192, 32768])
def test_long_context_experiment_composes(attention, seq_len):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["+experiment=long_context", f"attention={attention}", f"task.max_len={seq_len}"],
        )
    assert cfg.task.min_len == cfg.task.max_len == seq_len
    assert cfg.model.max_len >= seq_len + 1
    assert cfg.model.d_model == 256 and cfg.model.num_heads == 8
    assert cfg.model.num_encoder_layers == cfg.model.num_decoder_layers == 2
    assert cfg.precision == "bf16" and cfg.attention.strict is True and cfg.model.dropout == 0.0
    assert cfg.trainer.steps == 30 and cfg.trainer.batch_size == 2 and cfg.trainer.untimed_steps == 3
    assert cfg.trainer.eval_batches == 0
    cfg.device = "cpu"
    if attention in attention_backends.available_backends("cpu"):
        validate_config(cfg)


# ---------------------------------------------------------------------------------------- collector


def write_run(sweep: Path, name: str, overrides: list[str], metrics: dict | None) -> None:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))


def fake_metrics(backend: str, seq_len: int, tokens_per_second: float | None, **extra) -> dict:
    metrics = {
        "status": "ok",
        "backend_requested": backend,
        "backend_used": backend,
        "backend_calls": {backend: 12},
        "seq_len": seq_len,
        "batch_size": 2,
        "peak_memory_mb": 1000.0 + seq_len,
        "peak_memory_kind": "cuda_max_allocated",
        "device": "cuda:0",
        "precision": "bf16",
        "steps": 30,
    }
    if tokens_per_second is not None:
        metrics["tokens_per_second"] = tokens_per_second
    return {**metrics, **extra}


@pytest.fixture
def fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    runs = [
        ("0_naive_n64", "naive", 64, fake_metrics("naive", 64, 50.0)),
        ("1_naive_n128", "naive", 128, fake_metrics("naive", 128, None, status="oom", oom_step=1)),
        ("2_sdpa_n64", "sdpa", 64, fake_metrics("sdpa", 64, 100.0)),
        ("3_sdpa_n128", "sdpa", 128, fake_metrics("sdpa", 128, 80.0)),
        ("4_flash_n64", "flash", 64, fake_metrics("flash", 64, 150.0)),
        ("5_flash_n128", "flash", 128, None),  # crashed: overrides but no metrics.json
    ]
    for name, backend, seq_len, metrics in runs:
        write_run(
            sweep,
            name,
            ["+experiment=long_context", f"attention={backend}", f"task.max_len={seq_len}"],
            metrics,
        )
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


def test_parse_overrides():
    parsed = model_level.parse_overrides(["+experiment=x", "task.max_len=8", "~trainer.resume=1", "bad"])
    assert parsed == {"experiment": "x", "task.max_len": "8", "trainer.resume": "1"}


def test_collector_rows_order_status_and_ratios(fake_sweep):
    results = model_level.load_runs(fake_sweep)
    assert [(r.backend, r.seq_len) for r in results] == [
        ("naive", 64),
        ("sdpa", 64),
        ("flash", 64),
        ("naive", 128),
        ("sdpa", 128),
        ("flash", 128),
    ]
    assert [r.status for r in results] == ["ok", "ok", "ok", "oom", "ok", "missing"]
    assert results[-1].batch_size is None and results[-1].seq_len == 128  # N from the overrides
    assert model_level.speedups(results) == [0.5, 1.0, 1.5, None, 1.0, None]

    table = model_level.markdown_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + 6
    assert lines[0].startswith("| backend | N | batch | status | tokens/s | peak MiB")
    assert "| naive | 128 | 2 | OOM (step 1) | - |" in table
    assert "| flash | 64 | 2 | ok | 150 | 1,064 | CUDA max allocated | 1.50x | flash |" in table
    assert "| flash | 128 | - | missing | - | - | - | - | - |" in table


def test_collector_csv_has_every_run(fake_sweep, tmp_path):
    results = model_level.load_runs(fake_sweep)
    path = tmp_path / "table.csv"
    model_level.write_csv(model_level.csv_rows(results), path)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and list(rows[0]) == list(model_level.CSV_COLUMNS)
    assert rows[0]["speedup_vs_reference"] == "0.5" and rows[3]["speedup_vs_reference"] == ""
    assert rows[0]["overrides"] == "+experiment=long_context attention=naive task.max_len=64"


def test_collector_without_runs_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs"):
        model_level.load_runs(tmp_path)


# ----------------------------------------------------------------------- CPU multirun, end to end


PLUGIN = """
import torch

import attention_backends as ab


@ab.register_backend("oom_above_24", support=ab.BackendSupport(devices=frozenset({"cpu"})))
def oom_above_24(q, k, v, **kwargs):
    if k.shape[2] > 24:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
    return ab.naive_attention(q, k, v, **kwargs)
"""


def test_cpu_multirun_goes_on_after_an_oom_and_collects_one_row_per_run(tmp_path):
    (tmp_path / "oom_plugin_for_tests.py").write_text(textwrap.dedent(PLUGIN))
    backends = [
        "oom_above_24",
        *(b for b in ("naive", "sdpa", "flash") if b in attention_backends.available_backends("cpu")),
    ]
    sweep = tmp_path / "sweep"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",  # tiny ops: threads only add start-up and contention
    }
    command = [
        sys.executable,
        "train.py",
        "-m",
        *TINY_LONG,
        "attention.plugins=[oom_plugin_for_tests]",
        f"attention.name={','.join(backends)}",
        "task.max_len=16,32",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(
        command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 2 * len(backends)

    out = tmp_path / "tables" / "model_level"
    printed = subprocess.run(
        [sys.executable, "scripts/collect_metrics.py", str(sweep), "--out", f"{out}.md"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    with open(f"{out}.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * len(backends)
    status = {(row["backend"], int(row["seq_len"])): row["status"] for row in rows}
    assert status.pop(("oom_above_24", 32)) == "oom"
    assert set(status.values()) == {"ok"}
    assert all(
        row["batch_size"] == "2" and row["peak_memory_kind"].startswith("process_peak_rss") for row in rows
    )
    table = Path(f"{out}.md").read_text()
    assert table.count("\n| ") == 2 + 2 * len(backends)  # header, align line, one line per run
    assert "OOM (step 1)" in table and "OOM (step 1)" in printed
    for backend in backends:
        assert f"| {backend} | 16 | 2 | ok |" in table


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_naive_runs_out_of_cuda_memory_at_32k_where_flash_fits(tmp_path):
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total_gib > 300:
        pytest.skip(f"naive needs ~420 GiB at N = 32768; this GPU has {total_gib:.0f} GiB")
    if "flash" not in attention_backends.available_backends("cuda"):
        pytest.skip("the flash extension has no CUDA kernels")
    results = {}
    for backend in ("naive", "flash"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[
                    "+experiment=long_context",
                    f"attention={backend}",
                    "task.max_len=32768",
                    "trainer.steps=2",
                    "trainer.untimed_steps=0",
                ],
            )
        results[backend] = train(cfg, output_dir=tmp_path / backend)
    naive, flash = results["naive"], results["flash"]
    assert naive["status"] == "oom" and naive["oom_step"] == 1, naive
    assert "Tried to allocate" in naive["oom_message"], naive["oom_message"]  # the allocator's own error
    assert flash["status"] == "ok" and flash["backend_calls"] == {"flash": 2 * 6}, flash
    assert flash["peak_memory_mb"] < 16 * 1024  # naive would need about 420 GiB
