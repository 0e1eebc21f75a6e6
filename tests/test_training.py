"""Short training runs: output files, resume equivalence, backends side by side, Hydra multirun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import attention_backends
from transformer.tasks import CopyTask
from transformer.training import load_checkpoint, lr_factor, train

pytestmark = [
    pytest.mark.usefixtures("restore_default_backend"),
    pytest.mark.filterwarnings("ignore:attention backend .* falling back"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
TINY = [
    "device=cpu",
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "model.dim_feedforward=64",
    "task.vocab_size=12",
    "task.max_len=6",
    "trainer.steps=30",
    "trainer.batch_size=16",
    "trainer.warmup_steps=5",
    "trainer.eval_every=10",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=16",
    "trainer.checkpoint_every=10",
    "trainer.log_every=5",
]


def tiny_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_short_run_writes_metrics_and_checkpoint(task, tmp_path):
    metrics = train(tiny_config(f"task={task}"), output_dir=tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in (
        "backend_requested",
        "backend_used",
        "task",
        "steps",
        "eval_token_accuracy",
        "eval_sequence_accuracy",
        "tokens_per_second",
        "peak_memory_mb",
        "train_time_s",
        "final_loss",
        "device",
        "precision",
    ):
        assert key in metrics, key
    assert metrics["task"] == task and metrics["steps"] == 30 and metrics["device"] == "cpu"
    assert metrics["backend_requested"] == "sdpa"
    assert metrics["backend_used"] in attention_backends.registered_backends()
    assert 0.0 <= metrics["eval_sequence_accuracy"] <= metrics["eval_token_accuracy"] <= 1.0
    assert metrics["tokens_per_second"] > 0 and metrics["peak_memory_mb"] > 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert [r["step"] for r in eval_records] == [10, 20, 30]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 30
    assert state["config"]["task"]["_target_"].endswith(task.capitalize() + "Task")
    assert {"model", "optimizer", "scheduler", "scaler", "rng"} <= set(state)
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full = train(tiny_config("trainer.steps=20"), output_dir=tmp_path / "full")
    first = train(tiny_config("trainer.steps=20", "trainer.stop_at_step=12"), output_dir=tmp_path / "first")
    assert first["steps"] == 12
    assert load_checkpoint(tmp_path / "first" / "checkpoint.pt")["step"] == 12
    resumed = train(
        tiny_config("trainer.steps=20", f"trainer.resume={tmp_path / 'first' / 'checkpoint.pt'}"),
        output_dir=tmp_path / "resumed",
    )
    assert resumed["steps"] == 20 and resumed["steps_this_run"] == 8
    assert resumed["final_loss"] == full["final_loss"]
    assert resumed["eval_token_accuracy"] == full["eval_token_accuracy"]
    full_state = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    resumed_state = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["model"]
    for name, value in full_state.items():
        assert torch.equal(resumed_state[name], value), name
    full_losses = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "train"]
    resumed_losses = [
        r["loss"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if r["kind"] == "train"
    ]
    assert resumed_losses == full_losses[12:]


def test_backends_give_comparable_runs_and_checkpoints_transfer(tmp_path):
    results = {}
    for name in attention_backends.available_backends("cpu"):
        results[name] = train(tiny_config(f"attention={name}"), output_dir=tmp_path / name)
        assert results[name]["backend_requested"] == name
        assert results[name]["backend_used"] == name
    for metrics in results.values():
        assert metrics["final_loss"] == pytest.approx(results["naive"]["final_loss"], abs=1e-3)
    # A model trained with sdpa evaluates the same with every backend.
    cfg = tiny_config()
    model = instantiate(cfg.model).eval()
    model.load_state_dict(load_checkpoint(tmp_path / "sdpa" / "checkpoint.pt")["model"])
    batch = CopyTask(12, 1, 6).sample(8, torch.Generator().manual_seed(9))
    logits = {}
    for name in results:
        with attention_backends.use_backend(name), torch.no_grad():
            logits[name] = model(
                batch.src, batch.tgt_in, batch.src_key_padding_mask, batch.tgt_key_padding_mask
            )
    for value in logits.values():
        torch.testing.assert_close(value, logits["sdpa"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(precision, tmp_path):
    metrics = train(tiny_config(f"precision={precision}", "trainer.steps=4"), output_dir=tmp_path)
    assert metrics["precision"] == precision
    assert metrics["final_loss"] == metrics["final_loss"]  # not NaN


def test_profile_steps_write_operator_tables_and_a_trace(tmp_path):
    train(tiny_config("trainer.steps=6", "trainer.profile_steps=2", "attention=naive"), output_dir=tmp_path)
    table = (tmp_path / "profile.txt").read_text()
    assert "2 steps after 3 warm-up steps, by self CPU time" in table
    assert "aten::mm" in table or "aten::bmm" in table  # the model's matmuls were recorded
    trace = json.loads((tmp_path / "profile_trace.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2


def test_profile_window_cut_short_by_stop_at_step_writes_no_table(tmp_path):
    train(
        tiny_config("trainer.steps=8", "trainer.profile_steps=5", "trainer.stop_at_step=4"),
        output_dir=tmp_path,
    )
    assert not (tmp_path / "profile.txt").exists()


def test_profile_is_off_by_default(tmp_path):
    train(tiny_config("trainer.steps=2"), output_dir=tmp_path)
    assert not (tmp_path / "profile.txt").exists()


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_compiled_training_matches_eager(backend, tmp_path):
    # aot_eager: torch.compile's tracing (dynamo + AOT autograd, through the flash ops' fake kernels)
    # without code generation, so the losses agree to rounding.
    common = (f"attention={backend}", "trainer.steps=4", "trainer.eval_batches=0")
    eager = train(tiny_config(*common), output_dir=tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(
        tiny_config(*common, "trainer.compile=true", "trainer.compile_backend=aot_eager"),
        output_dir=tmp_path / "compiled",
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward went through dynamo
    assert compiled["backend_used"] == eager["backend_used"]
    losses = [[r["loss"] for r in read_jsonl(tmp_path / d / "metrics.jsonl")] for d in ("eager", "compiled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    plain_keys = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"].keys()
    assert not any(key.startswith("_orig_mod.") for key in plain_keys)  # checkpoints hold the plain model


@pytest.mark.slow
def test_compiled_training_with_inductor(tmp_path):
    # Fixed-length sequences: one graph, no recompiles for new lengths.
    metrics = train(
        tiny_config("trainer.steps=2", "trainer.eval_batches=0", "trainer.compile=true", "task.min_len=6"),
        output_dir=tmp_path,
    )
    assert metrics["status"] == "ok" and metrics["final_loss"] == metrics["final_loss"]


def test_output_dir_is_required_outside_hydra():
    with pytest.raises(ValueError, match="output_dir"):
        train(tiny_config("trainer.steps=1"))


def test_missing_resume_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume"):
        train(tiny_config(f"trainer.resume={tmp_path / 'nope.pt'}"), output_dir=tmp_path)


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(90, 100, 10, "constant", 0.0) == 1.0


def test_hydra_multirun_over_backends_and_compare_script(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith("trainer.steps")]
    command = [
        sys.executable,
        "train.py",
        "-m",
        "attention=naive,sdpa",
        "trainer.steps=6",
        *overrides,
        f"hydra.sweep.dir={sweep}",
    ]
    subprocess.run(command, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=300)
    runs = sorted(sweep.glob("*/metrics.json"))
    assert len(runs) == 2
    backends = sorted(json.loads(p.read_text())["backend_requested"] for p in runs)
    assert backends == ["naive", "sdpa"]
    table = subprocess.run(
        [sys.executable, "scripts/compare_runs.py", str(sweep)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "naive" in table and "sdpa" in table and "tokens/s" in table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "backend", attention_backends.available_backends("cuda") if torch.cuda.is_available() else []
)
def test_short_cuda_run_in_bf16(backend, tmp_path):
    overrides = [o for o in TINY if o != "device=cpu"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[*overrides, "device=auto", "precision=bf16", f"attention.name={backend}"],
        )
    metrics = train(cfg, output_dir=tmp_path)
    assert metrics["device"].startswith("cuda") and metrics["precision"] == "bf16"
    assert metrics["peak_memory_mb"] > 0 and metrics["final_loss"] == metrics["final_loss"]
