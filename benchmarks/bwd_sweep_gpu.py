"""The GPU half of the backward sweep: check one variant's build against float64 and time its backward.

``python -m benchmarks.bwd_sweep_gpu SPEC.json`` loads one variant's extension library (each in its own
process: the libraries all define the ``flash_attn`` op namespace), then

- checks dq, dk, dv (and out) on small shapes (causal, odd N, GQA with Nq != Nk, a key padding mask, many
  query tiles) against the float64 reference: our error must be at most 2x SDPA's on the same inputs (the
  rule of tests/test_flash_cuda.py), with outputs poisoned by NaN first (FLASH_ATTN_POISON=1);
- times ``torch.ops.flash_attn.bwd`` and SDPA's FLASH_ATTENTION backward op (same inputs, same process) with
  triton.testing.do_bench (median), and the two forwards when the spec asks.

It writes a JSON result to the spec's ``out`` path.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from attention_backends.reference import reference_attention, relative_error
from attention_backends.sdpa import sdpa_attention
from benchmarks.timing import time_ms

# (B, Hq, Hkv, Nq, Nk, causal, key padding)
CHECK_CASES = [
    (2, 4, 4, 256, 256, False, False),
    (2, 4, 4, 256, 256, True, False),
    (1, 2, 2, 129, 129, True, False),
    (2, 4, 2, 129, 300, False, False),
    (2, 4, 2, 129, 300, True, False),
    (2, 2, 1, 7, 129, True, True),
    (1, 2, 2, 1000, 1000, True, False),
]
SLACK = 1e-5  # with one visible key dq is 0 in exact arithmetic and both errors are rounding noise


def _run_ours(q, k, v, dout, kpm, causal, scale):
    out, lse = torch.ops.flash_attn.fwd(q, k, v, kpm, None, scale, causal)
    dq, dk, dv = torch.ops.flash_attn.bwd(dout, q, k, v, out, lse, kpm, None, scale, causal)
    return out, (dq, dk, dv)


def _run_sdpa(q, k, v, dout, kpm, causal, scale):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = sdpa_attention(*leaves, key_padding_mask=kpm, is_causal=causal, scale=scale)
    return out, torch.autograd.grad(out, leaves, dout)


def check_case(case: tuple, head_dim: int, seed: int, device: str = "cuda") -> dict:
    """Errors of ours and SDPA against float64 on one case; ``ok`` by the 2x-SDPA rule."""
    batch, heads_q, heads_kv, len_q, len_k, causal, padding = case
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(torch.bfloat16)

    q = rand(batch, heads_q, len_q, head_dim)
    k, v = rand(batch, heads_kv, len_k, head_dim), rand(batch, heads_kv, len_k, head_dim)
    dout = rand(batch, heads_q, len_q, head_dim)
    kpm = None
    if padding:
        kpm = torch.rand(batch, len_k, device=device, generator=gen) < 0.25
        kpm[0, : len_k // 2] = True
    scale = head_dim**-0.5
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference_attention(*leaves, key_padding_mask=kpm, is_causal=causal, scale=scale)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    ours = _run_ours(q, k, v, dout, kpm, causal, scale)
    theirs = _run_sdpa(q, k, v, dout, kpm, causal, scale)
    result = {"case": list(case), "ok": True, "worst_ratio": 0.0, "errors": {}}
    for name, mine, sdpa, r in zip(
        ("out", "dq", "dk", "dv"),
        (ours[0], *ours[1]),
        (theirs[0], *theirs[1]),
        (ref, *ref_grads),
        strict=True,
    ):
        finite = bool(torch.isfinite(mine).all())
        err, base = relative_error(mine, r), relative_error(sdpa, r)
        ok = finite and err <= 2 * base + SLACK
        result["errors"][name] = {"ours": err, "sdpa": base, "finite": finite}
        result["ok"] = result["ok"] and ok
        ratio = err / base if base > 0 else (0.0 if err == 0 else math.inf)
        result["worst_ratio"] = max(result["worst_ratio"], ratio if finite else math.inf)
    return result


def run_checks(head_dim: int, device: str = "cuda") -> list[dict]:
    """Every CHECK_CASES entry with outputs poisoned (NaN) before the kernels write them."""
    previous = os.environ.get("FLASH_ATTN_POISON")
    os.environ["FLASH_ATTN_POISON"] = "1"
    try:
        return [
            check_case(case, head_dim, seed=1000 + i, device=device) for i, case in enumerate(CHECK_CASES)
        ]
    finally:
        if previous is None:
            del os.environ["FLASH_ATTN_POISON"]
        else:
            os.environ["FLASH_ATTN_POISON"] = previous


def _bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    """Median ms per call."""
    return time_ms(fn, "cuda", warmup_ms, rep_ms)


def time_point(point: dict, warmup_ms: float, rep_ms: float, with_fwd: bool) -> dict:
    """Backward times (ms) of ours and SDPA flash at one point; forwards too when ``with_fwd``."""
    batch, heads, seqlen, head_dim, causal = (
        point["batch"],
        point["heads"],
        point["seqlen"],
        point["head_dim"],
        point["causal"],
    )
    q, k, v, dout = (
        torch.randn(batch, heads, seqlen, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    scale = head_dim**-0.5
    out, lse = torch.ops.flash_attn.fwd(q, k, v, None, None, scale, causal)
    result: dict = {}
    result["bwd_ms"] = _bench(
        lambda: torch.ops.flash_attn.bwd(dout, q, k, v, out, lse, None, None, scale, causal),
        warmup_ms,
        rep_ms,
    )
    try:  # SDPA failing here (e.g. a head dim its flash kernel lacks) leaves our time standing
        fa = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        s_out, s_lse, cum_q, cum_k, max_q, max_k, seed, offset = fa[:8]
        result["sdpa_bwd_ms"] = _bench(
            lambda: torch.ops.aten._scaled_dot_product_flash_attention_backward(
                dout,
                q,
                k,
                v,
                s_out,
                s_lse,
                cum_q,
                cum_k,
                max_q,
                max_k,
                0.0,
                causal,
                seed,
                offset,
                scale=scale,
            ),
            warmup_ms,
            rep_ms,
        )
        if with_fwd:
            result["sdpa_fwd_ms"] = _bench(
                lambda: torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, 0.0, causal, False, scale=scale
                ),
                warmup_ms,
                rep_ms,
            )
    except RuntimeError as exc:
        result["sdpa_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if with_fwd:
        result["fwd_ms"] = _bench(
            lambda: torch.ops.flash_attn.fwd(q, k, v, None, None, scale, causal), warmup_ms, rep_ms
        )
    return result


def main(argv: list[str]) -> int:
    """Spec: {lib, head_dim, points: [{batch, heads, seqlen, head_dim, causal}], warmup_ms, rep_ms,
    with_fwd, check, out}. Result: {check: [...], check_ok, points: [{...times} | {error}], error?}."""
    spec = json.loads(Path(argv[0]).read_text())
    os.environ["FLASH_ATTN_DISABLE_PREBUILT"] = "1"  # never import the installed build next to this one
    result: dict = {"lib": spec["lib"], "points": []}
    start = time.monotonic()
    try:
        torch.ops.load_library(spec["lib"])
        if spec.get("check", True):
            result["check"] = run_checks(spec["head_dim"])
            result["check_ok"] = all(c["ok"] for c in result["check"])
            result["check_s"] = time.monotonic() - start
        if result.get("check_ok", True):
            for point in spec["points"]:
                try:
                    result["points"].append(
                        time_point(point, spec["warmup_ms"], spec["rep_ms"], spec.get("with_fwd", False))
                    )
                except Exception as exc:  # noqa: BLE001 - a failing point is reported, the rest still run
                    result["points"].append({"error": f"{type(exc).__name__}: {exc}"[:500]})
                torch.cuda.empty_cache()
    except Exception as exc:  # noqa: BLE001 - reported to the sweep, which carries on
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    result["seconds"] = time.monotonic() - start
    Path(spec["out"]).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
