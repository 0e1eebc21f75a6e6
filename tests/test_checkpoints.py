"""Crash safety: a run killed with SIGKILL resumes to the same result; damaged checkpoints are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from transformer.training import load_checkpoint, save_checkpoint, train

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "device=cpu",
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_encoder_layers=1",
    "model.num_decoder_layers=1",
    "model.dim_feedforward=64",
    "task.vocab_size=12",
    "task.max_len=6",
    "trainer.steps=120",
    "trainer.batch_size=16",
    "trainer.warmup_steps=5",
    "trainer.eval_every=0",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=16",
    "trainer.checkpoint_every=10",
]


def train_process(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", *TINY, *extra, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def final_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_kill_9_then_resume_reaches_the_uninterrupted_result(tmp_path):
    full = train_process(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()

    killed_dir = tmp_path / "killed"
    victim = train_process(killed_dir)
    checkpoint = killed_dir / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        if checkpoint.exists() and load_checkpoint(checkpoint)["step"] >= 30:
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    step = load_checkpoint(checkpoint)["step"]  # the last atomically written checkpoint is intact
    assert 30 <= step < 120

    resumed = train_process(tmp_path / "resumed", f"trainer.resume={checkpoint}")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    want, got = final_metrics(tmp_path / "full"), final_metrics(tmp_path / "resumed")
    assert got["steps"] == want["steps"] == 120 and got["steps_this_run"] == 120 - step
    assert got["final_loss"] == pytest.approx(want["final_loss"], abs=1e-6)
    assert got["eval_sequence_accuracy"] == want["eval_sequence_accuracy"]


def test_truncated_checkpoint_is_refused_by_name(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(
        path, {"model": {"w": torch.ones(64)}, "optimizer": {}, "scheduler": {}, "step": 3, "config": {}}
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"checkpoint\.pt is not a readable checkpoint \(truncated or corrupt"
    ):
        load_checkpoint(path)


def test_resume_from_a_corrupt_file_raises_before_training(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, f"trainer.resume={bad}"])
    with pytest.raises(
        ValueError, match=r"checkpoint\.pt is not a readable checkpoint \(truncated or corrupt"
    ):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(path)


def test_a_failed_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"model": {}, "optimizer": {}, "scheduler": {}, "step": 1, "config": {}}
    save_checkpoint(path, good)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**good, "step": 2})
    assert load_checkpoint(path)["step"] == 1
