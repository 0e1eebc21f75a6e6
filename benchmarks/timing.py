"""Median time of one call: triton's ``do_bench`` on CUDA when triton imports, else ``torch.utils.benchmark``;
and the helpers of the timing checks (``run_for``: load before timing; ``host_us_per_call``: a call's host time).

Shared by every benchmark here (attention grid, fused add + LayerNorm, split-KV decode, backward sweep) and the
scripts that check timings; it needs only torch (and triton when present).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import benchmark


def triton_do_bench() -> Callable[..., Any] | None:
    """``triton.testing.do_bench``, or None without triton."""
    try:
        from triton.testing import do_bench
    except ImportError:  # no triton: torch.utils.benchmark instead
        return None
    return do_bench


def timer_name(device: str) -> str:
    """What ``time_ms`` uses on ``device`` (for report headers)."""
    return "triton do_bench" if device == "cuda" and triton_do_bench() else "torch.utils.benchmark"


def _warm_up(step: Callable[[], object], device: str, warmup_ms: float) -> None:
    """Call ``step`` until ``warmup_ms`` have passed (at least once)."""
    deadline = time.perf_counter() + warmup_ms / 1e3
    while True:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if time.perf_counter() >= deadline:
            return


def time_ms(step: Callable[[], object], device: str, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of one ``step``: triton's do_bench on CUDA if it imports, else torch's Timer."""
    do_bench = triton_do_bench() if device == "cuda" else None
    if do_bench is not None:
        try:
            return float(do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except TypeError:  # older triton without return_mode
            return float(do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5]))
    _warm_up(step, device, warmup_ms)
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=rep_ms / 1e3).median * 1e3


def run_for(
    fn: Callable[[], object], seconds: float, device: str = "cuda", calls_between_syncs: int = 20
) -> None:
    """Call ``fn`` back to back under no_grad for ``seconds`` (a GPU fresh from idle runs faster for a moment
    than at its sustained, power-limited rate: docs/results/timing_modes_h200_2026-11-30.md)."""
    end = time.perf_counter() + seconds
    with torch.no_grad():
        while time.perf_counter() < end:
            for _ in range(calls_between_syncs):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()


def host_us_per_call(
    fn: Callable[[], object], device: str, calls: int, sleep_cycles: int = 200_000_000
) -> float:
    """Microseconds of host time per call of ``fn``: on CUDA issued while the GPU runs ``torch.cuda._sleep`` for
    ``sleep_cycles`` (2e8: about 0.1 s), so that no launch waits on it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda._sleep(sleep_cycles)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6
