"""Fused residual add + LayerNorm against the unfused torch ops, forward and forward + backward.

For every (dtype, rows x width, direction) both implementations are timed on the same inputs:

- ``fused``: ``transformer.add_layernorm`` (the compiled ``flash_attn::add_layernorm_fwd`` / ``_bwd``),
- ``unfused``: ``s = x + r; y = F.layer_norm(s, (N,), weight, bias)``.

``fwd_bwd`` runs the forward and ``torch.autograd.grad`` of (y, s) with fixed gradients dy and ds (the
pre-norm pattern, where the sum is the next residual; ``grad_s=False``: dy only, the post-norm pattern) for
x, r, weight and bias. Timing: triton's ``do_bench`` (median) on CUDA when triton imports, else
``torch.utils.benchmark`` (median of ``blocked_autorange``). With ``rounds`` > 1 the two implementations
are timed alternately that many times and each keeps its fastest round, so a slow phase of a shared
machine does not land on one of them only. GB/s counts the bytes the fused op must move
(x, r read and y, s written in the forward; dy, ds, s read and dx written in the backward), the same count
for both implementations, so it is an effective bandwidth and the speed-up is the time ratio.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer.add_layernorm import add_layernorm, fused_kernels_available

from .attention import device_name
from .report import markdown
from .timing import time_ms, timer_name

__all__ = [
    "CPU_SHAPES",
    "CUDA_SHAPES",
    "AddLnConfig",
    "AddLnRow",
    "default_config",
    "describe",
    "format_table",
    "run",
    "write_outputs",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CUDA_SHAPES: tuple[tuple[int, int], ...] = (
    (16384, 512),
    (16384, 1024),
    (16384, 2048),
    (65536, 1024),
    (4096, 8192),
)
CPU_SHAPES: tuple[tuple[int, int], ...] = ((4096, 512), (4096, 1024))
DIRECTIONS = ("fwd", "fwd_bwd")
IMPLS = ("unfused", "fused")


@dataclass(frozen=True)
class AddLnConfig:
    """What to time: device, dtypes, (rows, width) shapes, directions, timing budget."""

    device: str = "cpu"
    dtypes: tuple[str, ...] = ("fp32",)
    shapes: tuple[tuple[int, int], ...] = CPU_SHAPES
    directions: tuple[str, ...] = DIRECTIONS
    grad_s: bool = True
    eps: float = 1e-5
    warmup_ms: float = 100.0
    rep_ms: float = 500.0
    rounds: int = 1
    threads: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class AddLnRow:
    """One timed point; ``status`` is "ok" or why it was not timed (then the numbers are 0)."""

    device: str
    dtype: str
    rows: int
    width: int
    direction: str
    impl: str
    us: float
    gbps: float
    status: str = "ok"


def default_config(device: str, **overrides: object) -> AddLnConfig:
    """The sizes for ``device``: on CUDA bf16 and fp32 over CUDA_SHAPES, on the CPU fp32 over CPU_SHAPES
    (with 5 alternating rounds: CPU timings on shared machines drift)."""
    if device == "cuda":
        base = AddLnConfig(device="cuda", dtypes=("bf16", "fp32"), shapes=CUDA_SHAPES)
    else:
        base = AddLnConfig(device=device, rounds=5)
    return AddLnConfig(**{**asdict(base), **overrides})


def bytes_moved(rows: int, width: int, dtype: torch.dtype, direction: str, grad_s: bool) -> int:
    """Bytes the fused op must read and write (row statistics and the (N,) parameters left out)."""
    tensor = rows * width * torch.empty((), dtype=dtype).element_size()
    forward = 4 * tensor  # read x, r; write y, s
    backward = (4 if grad_s else 3) * tensor  # read dy, (ds,) s; write dx
    return forward if direction == "fwd" else forward + backward


# ---------------------------------------------------------------------------------------- timing


def time_us(step: Callable[[], object], device: str, warmup_ms: float, rep_ms: float) -> float:
    """Median microseconds of one ``step``."""
    return 1e3 * time_ms(step, device, warmup_ms, rep_ms)


# ---------------------------------------------------------------------------------------- the sweep


def _unfused(x: Tensor, r: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + r
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def make_step(
    impl: str, direction: str, leaves: Sequence[Tensor], grads: Sequence[Tensor], eps: float
) -> Callable[[], object]:
    """One timed iteration: the forward, or the forward and torch.autograd.grad of its outputs."""
    fn = add_layernorm if impl == "fused" else _unfused
    x, r, weight, bias = leaves

    if direction == "fwd":

        def forward() -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                return fn(x, r, weight, bias, eps)

        return forward

    def forward_backward() -> tuple[Tensor, ...]:
        y, s = fn(x, r, weight, bias, eps)
        outputs = (y, s)[: len(grads)]
        return torch.autograd.grad(outputs, leaves, grads)

    return forward_backward


def make_inputs(
    rows: int, width: int, dtype: torch.dtype, cfg: AddLnConfig
) -> tuple[list[Tensor], list[Tensor]]:
    """Leaves x, r (rows, width), weight, bias (width,) requiring grad, and the gradients dy (and ds)."""
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed + rows * 7919 + width)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=cfg.device).to(dtype)

    leaves = [rand(rows, width), rand(rows, width), 1.0 + 0.1 * rand(width), rand(width)]
    for t in leaves:
        t.requires_grad_(True)
    grads = [rand(rows, width)] + ([rand(rows, width)] if cfg.grad_s else [])
    return leaves, grads


def run(cfg: AddLnConfig) -> list[AddLnRow]:
    """Time both implementations at every point; the fused rows say "no kernels" where it would fall back."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    fused_ok = fused_kernels_available(cfg.device)
    results = []
    for dtype_name in cfg.dtypes:
        dtype = DTYPES[dtype_name]
        for rows, width in cfg.shapes:
            leaves, grads = make_inputs(rows, width, dtype, cfg)
            for direction in cfg.directions:
                nbytes = bytes_moved(rows, width, dtype, direction, cfg.grad_s)
                impls = [impl for impl in IMPLS if impl != "fused" or fused_ok]
                times: dict[str, list[float]] = {impl: [] for impl in impls}
                for _ in range(max(cfg.rounds, 1)):
                    for impl in impls:
                        step = make_step(impl, direction, leaves, grads, cfg.eps)
                        times[impl].append(time_us(step, cfg.device, cfg.warmup_ms, cfg.rep_ms))
                for impl in IMPLS:
                    point = (cfg.device, dtype_name, rows, width, direction, impl)
                    if impl not in times:
                        results.append(AddLnRow(*point, 0.0, 0.0, "no kernels"))
                        continue
                    us = min(times[impl])
                    results.append(AddLnRow(*point, us, nbytes / (us * 1e3)))
            del leaves, grads
            if cfg.device == "cuda":
                torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------- output


def describe(cfg: AddLnConfig) -> str:
    """One line naming the machine and the settings."""
    grads = "dy and ds" if cfg.grad_s else "dy only"
    timer = timer_name(cfg.device)
    rounds = f", fastest of {cfg.rounds} alternating rounds" if cfg.rounds > 1 else ""
    return (
        f"{device_name(cfg.device)}, torch {torch.__version__}; fwd_bwd gradients: {grads}; "
        f"timing: {timer} median{rounds}"
    )


def format_table(results: Sequence[AddLnRow]) -> str:
    """A markdown table: per point the unfused and fused µs and GB/s, and the fused speed-up."""
    points: dict[tuple[object, ...], dict[str, AddLnRow]] = {}
    for r in results:
        points.setdefault((r.dtype, r.rows, r.width, r.direction), {})[r.impl] = r
    headers = [
        "dtype",
        "rows",
        "width",
        "dir",
        "unfused µs",
        "fused µs",
        "unfused GB/s",
        "fused GB/s",
        "speed-up",
    ]
    lines = []
    for (dtype, rows, width, direction), by_impl in points.items():
        base, fused = by_impl.get("unfused"), by_impl.get("fused")

        def cells(r: AddLnRow | None) -> tuple[str, str]:
            if r is None:
                return "", ""
            if r.status != "ok":
                return r.status, ""
            return f"{r.us:.1f}", f"{r.gbps:.1f}"

        (base_us, base_gbps), (fused_us, fused_gbps) = cells(base), cells(fused)
        ok = base is not None and fused is not None and base.status == fused.status == "ok"
        speedup = f"{base.us / fused.us:.2f}x" if ok else ""
        lines.append(
            [dtype, str(rows), str(width), direction, base_us, fused_us, base_gbps, fused_gbps, speedup]
        )
    return markdown(headers, lines)


def write_outputs(results: Sequence[AddLnRow], header: str, out_dir: str | Path) -> list[Path]:
    """``results.csv`` (one line per row) and ``summary.md`` (the header line and the table) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "results.csv", out / "summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(AddLnRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    md_path.write_text(f"# Fused residual add + LayerNorm\n\n{header}\n\n{format_table(results)}\n")
    return [csv_path, md_path]
