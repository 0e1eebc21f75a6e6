"""The attention benchmark: every backend over a grid of shapes, timed, with its peak memory and TFLOP/s.

The grid is dtypes × head dims × sequence lengths × causal × directions × backends. For a sequence length
N the batch is ``tokens // N`` and the heads ``hidden // head_dim``, so every point does the same number
of token-projections' worth of work (flash-attn's benchmark convention). Backends are called through
``attention_backends.attention(..., strict=True)``: a backend that can't serve a point is recorded as
``unsupported`` instead of being timed under another backend's name. On CUDA, SDPA is also timed with
each of its kernels forced (``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``).
"""

from __future__ import annotations

import gc
import itertools
import platform
import statistics
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from attention_backends import BackendUnsupportedError, attention, get_backend, track_backends

from . import report
from .timing import time_ms

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp64": torch.float64,
}
SDPA_KERNELS: dict[str, SDPBackend] = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
DIRECTIONS = ("fwd", "fwd_bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
PRESET_KEYS = (
    "tokens",
    "hidden",
    "seqlens",
    "head_dims",
    "dtypes",
    "causal",
    "directions",
    "warmup_ms",
    "rep_ms",
)
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "bench_preset"
OURS = "flash"

OK, OOM, UNSUPPORTED, ERROR, NOISY = "ok", "OOM", "unsupported", "error", "noisy"


@dataclass(frozen=True)
class Settings:
    """The resolved benchmark configuration (preset filled in, device and backend labels decided)."""

    device: str
    preset: str
    backends: tuple[str, ...]
    tokens: int
    hidden: int
    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    dtypes: tuple[str, ...]
    causal: tuple[bool, ...]
    directions: tuple[str, ...]
    warmup_ms: float
    rep_ms: float
    seed: int
    plots: bool
    rounds: int = 1  # > 1: the backends of a point are timed round-robin (see time_in_rounds)


@dataclass(frozen=True)
class Shape:
    """One input shape of the grid: q, k, v are (batch, heads, seqlen, head_dim) in ``dtype``."""

    dtype: str
    head_dim: int
    seqlen: int
    batch: int
    heads: int


@dataclass
class Row:
    """One measured (or derived) point; the columns of results.csv and results.json."""

    device: str
    torch: str
    date: str
    backend: str
    dtype: str
    head_dim: int
    seqlen: int
    batch: int
    heads: int
    causal: bool
    direction: str
    ms: float | None
    tflops: float | None
    peak_mib: float | None
    status: str
    note: str = ""


ROW_FIELDS = tuple(f.name for f in fields(Row))


@dataclass(frozen=True)
class Measurement:
    """What measuring one point gave: its status, median ms and peak MiB (None when not measured)."""

    status: str
    note: str = ""
    ms: float | None = None
    peak_mib: float | None = None


@dataclass(frozen=True)
class Inputs:
    """Leaf inputs requiring grad, and the fixed output gradient used by the backward."""

    q: Tensor
    k: Tensor
    v: Tensor
    dout: Tensor


# ----------------------------------------------------------------------------------------------- config


def resolve_device(name: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is present, else ``cpu``; an explicit cuda must exist."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("bench: device=cuda was asked for but torch.cuda.is_available() is False")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"bench: expected device auto, cpu or cuda, got '{name}'")
    return name


def preset_values(cfg: DictConfig, device: str) -> dict[str, Any]:
    """The size keys of ``cfg`` with nulls filled from the preset file (gpu or cpu for ``preset=auto``)."""
    given = OmegaConf.to_container(cfg, resolve=True)
    values = {key: given.get(key) for key in PRESET_KEYS}
    missing = [key for key, value in values.items() if value is None]
    if not missing:
        return values
    name = str(cfg.get("preset", "auto"))
    if name == "auto":
        name = "gpu" if device == "cuda" else "cpu"
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"bench: keys {missing} are unset and there is no preset file {path}")
    preset = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for key in missing:
        if preset.get(key) is None:
            raise ValueError(f"bench: key '{key}' is unset and preset '{name}' does not set it")
        values[key] = preset[key]
    return values


def backend_labels(backends: list[str], subbackends: list[str], device: str) -> tuple[str, ...]:
    """The backend labels to time: ``backends`` plus, on CUDA, ``sdpa_<kernel>`` right after ``sdpa``."""
    for name in backends:
        get_backend(name)  # unknown names fail here, before the sweep starts
    extra = []
    if device == "cuda":
        for kernel in subbackends:
            if kernel not in SDPA_KERNELS:
                known = sorted(SDPA_KERNELS)
                raise ValueError(f"bench: unknown SDPA kernel '{kernel}'; expected one of {known}")
            extra.append(f"sdpa_{kernel}")
    labels = list(backends)
    at = labels.index("sdpa") + 1 if "sdpa" in labels else len(labels)
    return tuple(labels[:at] + extra + labels[at:])


def resolve_settings(cfg: DictConfig) -> Settings:
    """Check ``cfg`` and turn it into Settings: device, preset sizes, backend labels."""
    device = resolve_device(str(cfg.device))
    values = preset_values(cfg, device)
    bad = [d for d in values["dtypes"] if d not in DTYPES]
    if bad:
        raise ValueError(f"bench: unknown dtypes {bad}; expected some of {sorted(DTYPES)}")
    bad = [d for d in values["directions"] if d not in DIRECTIONS]
    if bad:
        raise ValueError(f"bench: unknown directions {bad}; expected some of {list(DIRECTIONS)}")
    rounds = int(cfg.get("rounds", 1))
    if rounds < 1:
        raise ValueError(f"bench: rounds must be at least 1, got {rounds}")
    return Settings(
        device=device,
        preset=str(cfg.get("preset", "auto")),
        backends=backend_labels(list(cfg.backends), list(cfg.get("sdpa_subbackends") or []), device),
        tokens=int(values["tokens"]),
        hidden=int(values["hidden"]),
        seqlens=tuple(int(n) for n in values["seqlens"]),
        head_dims=tuple(int(d) for d in values["head_dims"]),
        dtypes=tuple(str(d) for d in values["dtypes"]),
        causal=tuple(bool(c) for c in values["causal"]),
        directions=tuple(str(d) for d in values["directions"]),
        warmup_ms=float(values["warmup_ms"]),
        rep_ms=float(values["rep_ms"]),
        seed=int(cfg.get("seed", 0)),
        plots=bool(cfg.get("plots", True)),
        rounds=rounds,
    )


# -------------------------------------------------------------------------------------------- the grid


def attention_flops(shape: Shape, causal: bool, direction: str) -> float:
    """FLOPs as flash-attn counts them: forward 4·B·H·N²·D (halved if causal); bwd 2.5x, fwd+bwd 3.5x."""
    forward = 4.0 * shape.batch * shape.heads * shape.seqlen**2 * shape.head_dim
    if causal:
        forward /= 2
    return forward * FLOP_FACTOR[direction]


def shapes(settings: Settings) -> Iterator[Shape]:
    """The input shapes of the grid: batch = tokens // N and heads = hidden // D, each at least 1."""
    for dtype, head_dim, seqlen in itertools.product(settings.dtypes, settings.head_dims, settings.seqlens):
        yield Shape(
            dtype=dtype,
            head_dim=head_dim,
            seqlen=seqlen,
            batch=max(1, settings.tokens // seqlen),
            heads=max(1, settings.hidden // head_dim),
        )


def make_inputs(shape: Shape, device: str, generator: torch.Generator) -> Inputs:
    """Fresh standard-normal q, k, v (leaves requiring grad) and output gradient, (B, H, N, D) each."""
    size = (shape.batch, shape.heads, shape.seqlen, shape.head_dim)

    def normal(requires_grad: bool) -> Tensor:
        return torch.randn(
            size, generator=generator, device=device, dtype=DTYPES[shape.dtype], requires_grad=requires_grad
        )

    return Inputs(q=normal(True), k=normal(True), v=normal(True), dout=normal(False))


def split_label(label: str) -> tuple[str, SDPBackend | None]:
    """``sdpa_flash`` -> (``sdpa``, FLASH_ATTENTION); a registry name -> (name, None)."""
    prefix, _, kernel = label.partition("_")
    if prefix == "sdpa" and kernel in SDPA_KERNELS:
        return "sdpa", SDPA_KERNELS[kernel]
    return label, None


def forward_fn(label: str, inputs: Inputs, causal: bool) -> Callable[[], Tensor]:
    """The forward call of backend ``label`` (strict: no fallback), SDPA's kernel forced for sdpa_*."""
    name, kernel = split_label(label)

    def context() -> AbstractContextManager[Any]:
        return sdpa_kernel(kernel) if kernel is not None else nullcontext()

    def forward() -> Tensor:
        with context():
            out, _ = attention(inputs.q, inputs.k, inputs.v, is_causal=causal, backend=name, strict=True)
        return out

    return forward


def make_step(forward: Callable[[], Tensor], direction: str, inputs: Inputs) -> Callable[[], object]:
    """What one timed iteration does: the forward alone, or forward + backward with the fixed dout.

    The backward uses torch.autograd.grad, so no .grad accumulates between iterations.
    """
    if direction == "fwd":
        return forward

    def forward_backward() -> tuple[Tensor, ...]:
        out = forward()
        return torch.autograd.grad(out, (inputs.q, inputs.k, inputs.v), inputs.dout)

    return forward_backward


# ------------------------------------------------------------------------------------ timing and memory


def peak_mib(step: Callable[[], object], device: str) -> float | None:
    """MiB allocated on top of what was live before one ``step`` (CUDA only; None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before) / 2**20


def classify_failure(exc: BaseException) -> tuple[str, str]:
    """The status (unsupported, OOM or error) and a one-line note for an exception raised by a point."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    lowered = str(exc).lower()
    if isinstance(exc, BackendUnsupportedError) or "no available kernel" in lowered:
        return UNSUPPORTED, message
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in lowered:
        return OOM, message
    return ERROR, f"{type(exc).__name__}: {message}"


def free_memory(device: str, collect: bool = False) -> None:
    """Return cached device memory; ``collect`` also runs the garbage collector (after an OOM)."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure(label: str, step: Callable[[], object], settings: Settings, timed: bool = True) -> Measurement:
    """Run one point: first call, peak memory, then timing (unless ``timed`` is False: ms stays None).
    Failures are recorded, never raised."""
    expected, _ = split_label(label)
    try:
        with warnings.catch_warnings(), track_backends() as served:
            warnings.simplefilter("ignore")  # SDPA's "kernel not used because ..." notes for forced kernels
            step()  # the first call checks support and compiles/warms caches
        if set(served) - {expected}:
            return Measurement(ERROR, note=f"served by {dict(served)} instead of '{expected}'")
        memory = peak_mib(step, settings.device)
        ms = time_ms(step, settings.device, settings.warmup_ms, settings.rep_ms) if timed else None
    except Exception as exc:  # noqa: BLE001 - every failure becomes a status; the sweep goes on
        return Measurement(*classify_failure(exc))
    return Measurement(OK, ms=ms, peak_mib=memory)


def time_in_rounds(
    steps: dict[str, Callable[[], object]], measured: dict[str, Measurement], settings: Settings
) -> dict[str, Measurement]:
    """Time the backends of one point in ``settings.rounds`` round-robin rounds, each with 1 / rounds of the
    warm-up and measuring time, and keep each backend's median over the rounds: a drift in the machine's
    speed (frequency, neighbours on a shared host) then reaches every backend alike instead of whichever
    was timed during it. ``measured`` holds the untimed measurements (status, memory) that get the ms."""
    times: dict[str, list[float]] = {label: [] for label in steps}
    failed: dict[str, Measurement] = {}
    warmup_ms, rep_ms = settings.warmup_ms / settings.rounds, settings.rep_ms / settings.rounds
    for _ in range(settings.rounds):
        for label, step in steps.items():
            if label in failed:
                continue
            try:
                times[label].append(time_ms(step, settings.device, warmup_ms, rep_ms))
            except Exception as exc:  # noqa: BLE001 - as in measure
                failed[label] = Measurement(*classify_failure(exc))
    return {
        label: failed.get(label) or replace(measured[label], ms=statistics.median(times[label]))
        for label in steps
    }


def try_inputs(shape: Shape, device: str, generator: torch.Generator) -> Inputs | Measurement:
    """The inputs of ``shape``, or the failure (e.g. OOM) that every point of the shape then records."""
    try:
        return make_inputs(shape, device, generator)
    except Exception as exc:  # noqa: BLE001 - recorded for each point of this shape
        return Measurement(*classify_failure(exc))


# ------------------------------------------------------------------------------------------- the sweep


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model and the number of threads torch uses."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({torch.get_num_threads()} threads)"


def grid_size(settings: Settings) -> int:
    """The number of measured points."""
    return (
        len(settings.dtypes)
        * len(settings.head_dims)
        * len(settings.seqlens)
        * len(settings.causal)
        * len(settings.directions)
        * len(settings.backends)
    )


def make_row(
    common: dict[str, str], shape: Shape, label: str, causal: bool, direction: str, result: Measurement
) -> Row:
    """The row of one measured point, with its TFLOP/s."""
    tflops = attention_flops(shape, causal, direction) / (result.ms * 1e9) if result.ms else None
    return Row(
        **common,
        backend=label,
        dtype=shape.dtype,
        head_dim=shape.head_dim,
        seqlen=shape.seqlen,
        batch=shape.batch,
        heads=shape.heads,
        causal=causal,
        direction=direction,
        ms=result.ms,
        tflops=tflops,
        peak_mib=result.peak_mib,
        status=result.status,
        note=result.note,
    )


def sweep(settings: Settings) -> list[Row]:
    """Measure every point of the grid, one tqdm step each; failures become rows with their status.

    Each distinct failure (backend, status, message) is written once above the bar.
    """
    generator = torch.Generator(device=settings.device).manual_seed(settings.seed)
    common = {
        "device": device_name(settings.device),
        "torch": torch.__version__,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    rows: list[Row] = []
    reported: set[tuple[str, str, str]] = set()

    def note_failure(label: str, where: str, result: Measurement) -> None:
        """Free what a failed point left (all of it after an OOM) and report each distinct failure once."""
        if result.status == OK:
            return
        free_memory(settings.device, collect=result.status == OOM)
        if (label, result.status, result.note) not in reported:
            reported.add((label, result.status, result.note))
            tqdm.write(f"{label} {where}: {result.status} ({result.note})")

    with tqdm(total=grid_size(settings), desc="attention bench", dynamic_ncols=True) as bar:
        for shape in shapes(settings):
            inputs = try_inputs(shape, settings.device, generator)
            for causal, direction in itertools.product(settings.causal, settings.directions):
                where = f"{shape.dtype} D={shape.head_dim} N={shape.seqlen} causal={causal} {direction}"
                results: dict[str, Measurement] = {}
                to_time: dict[str, Callable[[], object]] = {}  # rounds > 1: timed after the loop
                for label in settings.backends:
                    bar.set_postfix_str(f"{label} {where}")
                    if isinstance(inputs, Measurement):
                        result = inputs
                    else:
                        step = make_step(forward_fn(label, inputs, causal), direction, inputs)
                        result = measure(label, step, settings, timed=settings.rounds == 1)
                        if result.status == OK and settings.rounds > 1:
                            to_time[label] = step
                    note_failure(label, where, result)
                    results[label] = result
                    bar.update()
                if to_time:
                    bar.set_postfix_str(f"{settings.rounds} rounds of {', '.join(to_time)} {where}")
                    timed = time_in_rounds(to_time, results, settings)
                    for label, result in timed.items():
                        note_failure(label, where, result)
                    results.update(timed)
                rows += [make_row(common, shape, label, causal, direction, r) for label, r in results.items()]
            del inputs
            free_memory(settings.device)
    return rows


def derive_backward(rows: list[Row]) -> list[Row]:
    """``bwd`` rows: time fwd_bwd − fwd of each point where both were measured, TFLOP/s at 2.5x forward."""
    forward = {_point(r): r for r in rows if r.direction == "fwd" and r.status == OK}
    derived = []
    for row in rows:
        fwd = forward.get(_point(row))
        if row.direction != "fwd_bwd" or row.status != OK or fwd is None:
            continue
        ms = row.ms - fwd.ms
        shape = Shape(row.dtype, row.head_dim, row.seqlen, row.batch, row.heads)
        good = ms > 0
        derived.append(
            Row(
                **{
                    **asdict(row),
                    "direction": "bwd",
                    "ms": ms if good else None,
                    "tflops": attention_flops(shape, row.causal, "bwd") / (ms * 1e9) if good else None,
                    "peak_mib": None,
                    "status": OK if good else NOISY,
                    "note": "fwd_bwd - fwd" if good else "fwd_bwd not slower than fwd (timing noise)",
                }
            )
        )
    return derived


def _point(row: Row) -> tuple[object, ...]:
    return (row.backend, row.dtype, row.head_dim, row.seqlen, row.causal)


def reference_backend(settings: Settings) -> str:
    """What our flash is compared with: SDPA's own flash kernel on CUDA, plain SDPA elsewhere."""
    return "sdpa_flash" if "sdpa_flash" in settings.backends else "sdpa"


def hydra_output_dir() -> Path:
    """Hydra's run directory, or outputs/bench/<timestamp> when Hydra is not running."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path("outputs") / "bench" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Run the benchmark described by ``cfg`` and write results.csv/json, plots and summary.md.

    ``output_dir`` defaults to Hydra's run directory. Returns the rows (measured and derived) as dicts.
    """
    settings = resolve_settings(cfg)
    out = Path(output_dir) if output_dir is not None else hydra_output_dir()
    rows = sweep(settings)
    records = [asdict(r) for r in rows + derive_backward(rows)]
    text = report.write_report(
        records, asdict(settings), out, ours=OURS, reference=reference_backend(settings), plots=settings.plots
    )
    print(text)
    print(f"results written to {out.resolve()}")
    return records
