"""Training loop for the toy tasks, driven by a Hydra config (see ``configs/``).

``train(cfg, output_dir)`` validates the config, selects the attention backend from ``cfg.attention``,
builds the model and task with ``hydra.utils.instantiate``, trains with AdamW + warmup/decay schedule and
gradient clipping, evaluates with greedy decoding on a held-out set, and writes into ``output_dir``:

- ``metrics.jsonl``: one JSON record per training step (``"kind": "train"``) and per evaluation
  (``"kind": "eval"``);
- ``metrics.json``: the final summary (also returned): ``status`` (``"ok"``, or ``"oom"`` below), backend
  requested / that served the last call, task, ``seq_len`` (``task.max_len``) and ``batch_size``, held-out
  token and exact-sequence accuracy (absent with ``trainer.eval_batches=0``, which turns evaluation off),
  ``tokens_per_second`` (non-padding source + target tokens per second of training-step time, evaluation
  excluded, the first ``trainer.untimed_steps`` steps of the run (default 0) excluded too),
  ``peak_memory_mb`` with ``peak_memory_kind`` (``"cuda_max_allocated"``: torch.cuda.max_memory_allocated;
  on CPU ``"process_peak_rss"``: the process's peak resident set size during this run, or
  ``"process_peak_rss_lifetime"`` where Linux's peak counter can't be reset) and ``start_memory_mb`` (the
  same measure at the start), ``train_time_s`` (the whole loop, evaluation included), final loss;
- with ``trainer.compile=true`` the training forward runs through ``torch.compile`` (backend
  ``trainer.compile_backend``, default inductor); evaluation and checkpoints use the plain model;
- ``profile.txt`` and ``profile_trace.json`` with ``trainer.profile_steps=N``: torch.profiler over N
  training steps after a 3-step warm-up (operator tables by CPU and device time; a Chrome/Perfetto trace);
- ``checkpoint.pt``: model, optimizer, scheduler, grad scaler, step, config and RNG states, written
  atomically; ``trainer.resume=PATH`` continues from one.

Running out of memory (``torch.OutOfMemoryError``, e.g. a CUDA allocation failing) during training or
evaluation does not raise in a single process: the run stops, frees what it holds, and writes
``metrics.json`` with ``"status": "oom"``, the step it failed in (``oom_step``), the phase (``oom_phase``:
train / eval / checkpoint) and the error's first line (``oom_message``), then returns normally, so that a
Hydra multirun goes on with its next job. Under torchrun (several processes) the error is raised: the other
ranks would otherwise wait for it forever in a collective.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import logging
import math
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import attention_backends

from .distributed import global_sum, init_distributed, local_slice, shutdown_distributed
from .model import Transformer
from .tasks import Batch, ToyTask

__all__ = [
    "build_model",
    "build_task",
    "evaluate",
    "load_checkpoint",
    "lr_factor",
    "resolve_device",
    "save_checkpoint",
    "setup_attention",
    "train",
    "validate_config",
]

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("cosine", "linear", "constant")
PROFILE_WARMUP_STEPS = 3  # training steps before torch.profiler records (trainer.profile_steps)


# ----------------------------------------------------------------------------------------------- config


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else is parsed by torch (ValueError if bad)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device={name!r} is not a valid torch device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} was requested but CUDA is not available")
    return device


def setup_attention(attention_cfg: DictConfig, device: torch.device) -> None:
    """Import ``plugins``, check the backend name (and, when strict, the device), set it as default.

    Raises ValueError for an unknown name (listing the registered backends) or, with ``strict: true``,
    for a backend that cannot run on ``device``.
    """
    for module in attention_cfg.get("plugins") or []:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"attention.plugins: cannot import {module!r}: {err}") from err
    name = attention_cfg.name
    strict = bool(attention_cfg.get("strict", False))
    backend = _lookup_backend(name, "attention.name")
    if strict and not backend.support.runs_on(device.type):
        raise ValueError(
            f"attention backend '{name}' cannot run on device '{device}' (attention.strict=true): "
            f"{_why_not_runs_on(backend, device)}"
        )
    if not backend.support.runs_on(device.type):
        log.warning(
            "attention backend '%s' cannot run on device '%s' (%s); calls will fall back",
            name,
            device,
            _why_not_runs_on(backend, device),
        )
    attention_backends.set_default_backend(name, strict=strict)


def _lookup_backend(name: Any, key: str) -> attention_backends.Backend:
    registered = attention_backends.registered_backends()
    if not isinstance(name, str) or name not in registered:
        raise ValueError(
            f"{key}={name!r} is not a registered attention backend; registered backends: {registered}"
        )
    return attention_backends.get_backend(name)


def _why_not_runs_on(backend: attention_backends.Backend, device: torch.device) -> str:
    support = backend.support
    if device.type not in support.devices:
        return f"it supports devices {sorted(support.devices)}"
    reason = support.unavailable_reason()
    if reason is None and support.device_available is not None:
        reason = support.device_available(device.type)
    return reason or "unavailable"


def validate_config(cfg: DictConfig) -> torch.device:
    """Check the composed config before anything is built; returns the resolved device.

    Raises ValueError with a message naming the offending keys.
    """
    model, task, trainer = cfg.model, cfg.task, cfg.trainer
    if model.d_model % model.num_heads != 0:
        raise ValueError(
            f"model.d_model ({model.d_model}) must be divisible by model.num_heads ({model.num_heads})"
        )
    kv_heads = model.get("num_kv_heads")
    if kv_heads is not None and (kv_heads < 1 or model.num_heads % kv_heads != 0):
        raise ValueError(
            f"model.num_heads ({model.num_heads}) must be a multiple of model.num_kv_heads ({kv_heads})"
        )
    if task.max_len + 1 > model.max_len:
        raise ValueError(
            f"model.max_len ({model.max_len}) must be at least task.max_len + 1 ({task.max_len + 1})"
        )
    if model.src_vocab_size < task.vocab_size or model.tgt_vocab_size < task.vocab_size:
        raise ValueError(
            f"model vocab sizes ({model.src_vocab_size}, {model.tgt_vocab_size}) must cover "
            f"task.vocab_size ({task.vocab_size})"
        )
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r} must be one of {sorted(PRECISIONS)}")
    if trainer.schedule not in SCHEDULES:
        raise ValueError(f"trainer.schedule={trainer.schedule!r} must be one of {list(SCHEDULES)}")
    for key in ("steps", "batch_size", "eval_batch_size"):
        if trainer[key] < 1:
            raise ValueError(f"trainer.{key} must be at least 1, got {trainer[key]}")
    for key in ("warmup_steps", "eval_every", "log_every", "checkpoint_every", "eval_batches"):
        if trainer[key] < 0:
            raise ValueError(f"trainer.{key} must be >= 0, got {trainer[key]}")
    for key in ("untimed_steps", "profile_steps"):
        if (trainer.get(key) or 0) < 0:
            raise ValueError(f"trainer.{key} must be >= 0, got {trainer[key]}")
    if trainer.get("compile"):
        backends = torch._dynamo.list_backends(exclude_tags=())
        if (trainer.get("compile_backend") or "inductor") not in backends:
            raise ValueError(
                f"trainer.compile_backend={trainer.compile_backend!r} is not a torch.compile backend; "
                f"one of: {', '.join(b for b in backends if 'TESTING' not in b)}"
            )
    profile_steps = trainer.get("profile_steps") or 0
    if profile_steps and trainer.steps < PROFILE_WARMUP_STEPS + profile_steps:
        raise ValueError(
            f"trainer.profile_steps={profile_steps} needs at least {PROFILE_WARMUP_STEPS} + {profile_steps} "
            f"training steps (warm-up + profiled), got trainer.steps={trainer.steps}"
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.batch_size % world_size != 0:
        raise ValueError(
            f"trainer.batch_size ({trainer.batch_size}) is the global batch and must be divisible by "
            f"the number of processes (WORLD_SIZE={world_size})"
        )
    if trainer.eval_seed == cfg.seed:
        raise ValueError(f"trainer.eval_seed ({trainer.eval_seed}) must differ from seed ({cfg.seed})")
    device = resolve_device(cfg.device)
    setup_attention(cfg.attention, device)
    if model.get("backend") is not None:
        _lookup_backend(model.backend, "model.backend")
    backend = attention_backends.get_backend(model.get("backend") or cfg.attention.name)
    if cfg.attention.get("strict", False) and model.dropout > 0 and not backend.support.dropout:
        raise ValueError(
            f"attention backend '{backend.name}' has no dropout but model.dropout={model.dropout} "
            f"(attention.strict=true): set model.dropout=0.0 or attention.strict=false"
        )
    if cfg.precision == "fp16" and device.type == "cpu":
        log.warning("precision=fp16 on CPU is slow; bf16 is the usual CPU choice")
    return device


def build_model(cfg: DictConfig) -> Transformer:
    """Instantiate ``cfg.model`` (a ``_target_`` config)."""
    return instantiate(cfg.model)


def build_task(cfg: DictConfig) -> ToyTask:
    """Instantiate ``cfg.task`` (a ``_target_`` config)."""
    return instantiate(cfg.task)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine / linear decay to ``min_ratio`` or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then atomically rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "config")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``train`` (tensors, numbers, strings and containers only)."""
    path = Path(to_absolute_path(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged archive
        raise ValueError(
            f"trainer.resume: {path} is not a readable checkpoint (truncated or corrupt: {type(err).__name__}: {err})"
        ) from err
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"trainer.resume: {path} is not a training checkpoint (missing {missing})")
    return state


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: Transformer,
    eval_set: list[Batch],
    task: ToyTask,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Greedy-decode every eval batch; token accuracy (target + EOS positions) and exact-sequence accuracy."""
    was_training = model.training
    model.eval()
    correct_tokens = total_tokens = correct_sequences = total_sequences = 0
    for cpu_batch in eval_set:
        batch = cpu_batch.to(device)
        target = batch.tgt_out  # (B, T)
        with autocast if autocast is not None else contextlib.nullcontext():
            generated = model.generate(
                batch.src, target.shape[1], task.bos_id, task.eos_id, batch.src_key_padding_mask
            )  # (B, <= T)
        generated = F.pad(generated, (0, target.shape[1] - generated.shape[1]), value=task.pad_id)
        valid = ~batch.tgt_key_padding_mask  # (B, T)
        hits = generated == target
        correct_tokens += int((hits & valid).sum())
        total_tokens += int(valid.sum())
        correct_sequences += int((hits | ~valid).all(dim=1).sum())
        total_sequences += target.shape[0]
    model.train(was_training)
    return {
        "eval_token_accuracy": correct_tokens / max(1, total_tokens),
        "eval_sequence_accuracy": correct_sequences / max(1, total_sequences),
    }


# ---------------------------------------------------------------------------------------------- helpers


def _output_dir(output_dir: str | Path | None) -> Path:
    if output_dir is None:
        if not HydraConfig.initialized():
            raise ValueError("train(cfg, output_dir): output_dir is required when not running under Hydra")
        output_dir = HydraConfig.get().runtime.output_dir
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


_CLEAR_REFS = Path("/proc/self/clear_refs")
_PROC_STATUS = Path("/proc/self/status")


def _release_free_heap() -> None:
    """Give freed C heap memory back to the OS (glibc ``malloc_trim``), so that RSS counts what is in use."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _current_memory_mb(device: torch.device) -> float:
    """What is in use now: CUDA memory allocated by torch, or the process's resident set size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # the value is in KiB
    return float("nan")


def _reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak: CUDA's allocator statistics, or Linux's peak-RSS counter (False if it can't).

    On CPU the memory freed by earlier work (an earlier run of a multirun) is first handed back to the OS,
    so that it does not count in this run's peak.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    gc.collect()
    _release_free_heap()
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the process's peak resident set size (VmHWM)
    except OSError:
        return False
    return True


def _peak_memory_mb(device: torch.device, reset_worked: bool) -> tuple[float, str]:
    """Peak memory in MiB since ``_reset_peak_memory`` and what it measures (``peak_memory_kind``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    if reset_worked:
        with contextlib.suppress(OSError):
            for line in _PROC_STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "process_peak_rss"  # the value is in KiB
    # Linux reports KiB; this peak covers the whole process (earlier runs in a multirun included).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss_lifetime"


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _track_backends() -> Iterator[dict[str, int]]:
    """Counts of the backends that served attention calls, when the registry can report them."""
    tracker = getattr(attention_backends, "track_backends", None)
    if tracker is None:
        yield {}
        return
    with tracker() as counter:
        yield counter


@contextlib.contextmanager
def _step_profiler(steps: int, device: torch.device, out_dir: Path, enabled: bool) -> Iterator[Any]:
    """torch.profiler over ``steps`` training steps after a short warm-up; yields its ``step()``.

    On exit it writes ``profile.txt`` (operators by self CPU time and, on CUDA, by device time) and
    ``profile_trace.json`` (Chrome / Perfetto trace) into ``out_dir``. Off (``steps == 0`` or not rank 0):
    a no-op ``step()``.
    """
    if not enabled or steps == 0:
        yield lambda: None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=PROFILE_WARMUP_STEPS, active=steps, repeat=1)
    taken = 0

    def step() -> None:
        nonlocal taken
        taken += 1
        prof.step()

    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        yield step
    if taken < PROFILE_WARMUP_STEPS + steps:  # e.g. a resumed run or stop_at_step ended it first
        log.warning("the run ended after %d steps, before the %d profiled steps were done", taken, steps)
        return
    tables = [("self CPU time", "self_cpu_time_total")]
    if device.type == "cuda":
        tables.append(("device time", "self_device_time_total"))
    averages = prof.key_averages()
    with open(out_dir / "profile.txt", "w") as f:
        for title, key in tables:
            f.write(f"# {steps} steps after {PROFILE_WARMUP_STEPS} warm-up steps, by {title}\n")
            f.write(averages.table(sort_by=key, row_limit=30) + "\n\n")
    prof.export_chrome_trace(str(out_dir / "profile_trace.json"))
    log.info("profile of %d steps: %s", steps, out_dir / "profile.txt")


# ------------------------------------------------------------------------------------------------ train


def train(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.task``; returns (and writes) the final metrics.

    ``output_dir`` defaults to Hydra's run directory when called under ``@hydra.main``.
    """
    device = validate_config(cfg)
    ctx, device = init_distributed(device)
    out_dir = _output_dir(output_dir)
    if not ctx.is_main:
        log.setLevel(logging.WARNING)
    trainer = cfg.trainer
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    model = build_model(cfg).to(device)
    optimizer = instantiate(trainer.optimizer)(model.parameters())  # the config is `_partial_: true`
    # DDP averages gradients over ranks; the loss below is scaled so the average is the global mean.
    ddp_model = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if ctx.enabled
        else model
    )
    # The training forward, optionally through torch.compile (fewer kernel launches per step); `model`
    # itself stays uncompiled for evaluation and checkpoints.
    step_model = (
        torch.compile(ddp_model, backend=trainer.get("compile_backend") or "inductor")
        if trainer.get("compile")
        else ddp_model
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, trainer.steps, trainer.warmup_steps, trainer.schedule, trainer.min_lr_ratio
        ),
    )
    dtype = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed)
    eval_set = task.eval_set(trainer.eval_batches, trainer.eval_batch_size, trainer.eval_seed)

    step = 0
    if trainer.resume:
        state = load_checkpoint(trainer.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng"], generator, device)
        step = int(state["step"])
        log.info("resumed from %s at step %d", trainer.resume, step)
    stop_at = (
        trainer.steps if trainer.get("stop_at_step") is None else min(trainer.steps, trainer.stop_at_step)
    )
    peak_reset = _reset_peak_memory(device)
    start_memory_mb = _current_memory_mb(device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype, enabled=cfg.precision != "fp32")

    def checkpoint() -> None:
        if not ctx.is_main:
            return
        save_checkpoint(
            out_dir / "checkpoint.pt",
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "config": OmegaConf.to_container(cfg, resolve=True),
                "rng": _rng_state(generator, device),
            },
        )

    model.train()
    start_step = step
    untimed_steps = trainer.get("untimed_steps") or 0
    tokens_seen = timed_tokens = timed_steps = 0
    step_time = timed_time = 0.0
    loss_value = accuracy = float("nan")
    eval_metrics: dict[str, float] = {}
    evaluating = trainer.eval_batches > 0
    phase, in_progress = "train", step  # what runs now, and which step it belongs to (for an OOM report)
    oom: dict[str, Any] | None = None
    backend_calls: dict[str, int] = {}
    started = time.perf_counter()
    try:
        with (
            open(out_dir / "metrics.jsonl", "a") if ctx.is_main else open(os.devnull, "w") as jsonl,
            logging_redirect_tqdm(),
            _track_backends() as backend_calls,
            _step_profiler(trainer.get("profile_steps") or 0, device, out_dir, ctx.is_main) as profile_step,
            tqdm(
                total=trainer.steps,
                initial=step,
                desc=f"{task.name}",
                dynamic_ncols=True,
                disable=None if ctx.is_main else True,
            ) as bar,
        ):
            while step < stop_at:
                phase, in_progress = "train", step + 1
                t0 = time.perf_counter()
                global_batch = task.sample(trainer.batch_size, generator)
                batch = local_slice(global_batch, ctx).to(device)
                with autocast():
                    logits = step_model(
                        batch.src, batch.tgt_in, batch.src_key_padding_mask, batch.tgt_key_padding_mask
                    )
                valid = ~batch.tgt_key_padding_mask
                loss_sum = F.cross_entropy(
                    logits.float().flatten(0, 1),
                    batch.tgt_out.flatten(),
                    ignore_index=task.pad_id,
                    reduction="sum",
                )
                counts = global_sum(torch.stack([valid.sum().float(), loss_sum.detach()]), ctx)
                loss = loss_sum * ctx.world_size / counts[0]  # DDP's average over ranks: the global mean
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), trainer.grad_clip or float("inf")
                )
                scaler.step(optimizer)
                scaler.update()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1

                with torch.no_grad():
                    hits = global_sum(((logits.argmax(-1) == batch.tgt_out) & valid).sum().float(), ctx)
                    accuracy = float(hits / counts[0])  # also waits for the GPU: the step time is complete
                loss_value = float(counts[1] / counts[0])
                this_step_time = time.perf_counter() - t0
                step_time += this_step_time
                tokens_seen += global_batch.num_tokens
                if step - start_step > untimed_steps:
                    timed_time += this_step_time
                    timed_tokens += global_batch.num_tokens
                    timed_steps += 1
                tokens_per_second = tokens_seen / max(step_time, 1e-9)
                record = {
                    "kind": "train",
                    "step": step,
                    "loss": loss_value,
                    "accuracy": accuracy,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_second": tokens_per_second,
                    "step_time_s": this_step_time,
                }
                jsonl.write(json.dumps(record) + "\n")
                profile_step()
                bar.update(1)
                if trainer.log_every and (step % trainer.log_every == 0 or step == stop_at):
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}", acc=f"{accuracy:.3f}", tok_s=f"{tokens_per_second:,.0f}"
                    )
                    jsonl.flush()

                if evaluating and (
                    (trainer.eval_every and step % trainer.eval_every == 0) or step == trainer.steps
                ):
                    phase, in_progress = "eval", step
                    eval_metrics = evaluate(model, eval_set, task, device, autocast())
                    jsonl.write(json.dumps({"kind": "eval", "step": step, **eval_metrics}) + "\n")
                    jsonl.flush()
                    log.info(
                        "step %d: loss %.4f, eval token acc %.4f, eval sequence acc %.4f",
                        step,
                        loss_value,
                        eval_metrics["eval_token_accuracy"],
                        eval_metrics["eval_sequence_accuracy"],
                    )
                if (trainer.checkpoint_every and step % trainer.checkpoint_every == 0) or step == stop_at:
                    phase, in_progress = "checkpoint", step
                    checkpoint()
            if evaluating and not eval_metrics:
                phase, in_progress = "eval", step
                eval_metrics = evaluate(model, eval_set, task, device, autocast())
    except torch.OutOfMemoryError as err:
        if ctx.enabled:
            raise  # the other ranks would wait for this one in their next collective
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        oom = {"oom_step": in_progress, "oom_phase": phase, "oom_message": message}
        log.warning("out of memory in %s at step %d: %s", phase, in_progress, message)
    backend_calls = dict(backend_calls)
    if oom is not None:
        # The traceback (and the tensors its frames held) is gone once the except block ends; drop this
        # frame's references too, so that the next run of a multirun starts with the memory free.
        global_batch = batch = logits = valid = loss_sum = counts = loss = grad_norm = hits = None
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    train_time = time.perf_counter() - started
    if timed_steps == 0:  # every step was untimed (or none ran): time them all
        timed_time, timed_tokens, timed_steps = step_time, tokens_seen, step - start_step
    peak_mb, peak_kind = _peak_memory_mb(device, peak_reset)
    metrics: dict[str, Any] = {
        "status": "ok" if oom is None else "oom",
        "backend_requested": cfg.model.get("backend") or cfg.attention.name,
        "backend_used": attention_backends.last_backend_used(),
        "backend_calls": backend_calls,
        "task": task.name,
        "seq_len": task.max_len,
        "min_seq_len": task.min_len,
        "batch_size": trainer.batch_size,
        "steps": step,
        "steps_this_run": step - start_step,
        **eval_metrics,
        **({"tokens_per_second": timed_tokens / timed_time} if timed_time > 0 else {}),
        "timed_steps": timed_steps,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "start_memory_mb": start_memory_mb,
        "train_time_s": train_time,
        "final_loss": loss_value,
        "final_train_accuracy": accuracy,
        "device": str(device),
        "precision": cfg.precision,
        "seed": cfg.seed,
        "output_dir": str(out_dir),
        **(oom or {}),
    }
    if oom is None and "tokens_per_second" not in metrics:
        metrics["tokens_per_second"] = 0.0  # no step ran (resumed at the end): nothing was timed
    metrics["world_size"] = ctx.world_size
    if ctx.is_main:
        _write_json(out_dir / "metrics.json", metrics)
        log.info("metrics: %s", json.dumps(metrics))
    shutdown_distributed(ctx)
    return metrics
