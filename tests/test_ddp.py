"""torchrun + DDP on the CPU (gloo): two processes match one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    "trainer.steps=25",
    "trainer.batch_size=16",
    "trainer.warmup_steps=5",
    "trainer.eval_every=0",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=16",
    "trainer.checkpoint_every=0",
]


def run(command: list[str], run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*command, *TINY, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "metrics.json").read_text())


def test_two_gloo_processes_match_one_process(tmp_path):
    single = run([sys.executable, "train.py"], tmp_path / "single")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "train.py",
    ]
    double = run(torchrun, tmp_path / "ddp")
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert double["steps"] == single["steps"] == 25
    assert double["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
    assert double["eval_token_accuracy"] == pytest.approx(single["eval_token_accuracy"], abs=0.02)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len([line for line in lines if '"kind": "train"' in line]) == 25  # rank 0 alone writes
