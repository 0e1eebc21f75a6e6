"""Sweep the backward kernel's tile variants on one GPU box in one call: build, check and time each.

Run from the repo root after the in-place build (its objects are reused, only the swept kernel recompiles):

    MAX_JOBS=16 python3 setup.py build_ext --inplace
    python3 scripts/sweep_bwd.py --out $OUT/bwd_sweep.csv

Steps, with timestamps: (1) every variant of csrc/cuda/flash_bwd_traits.h for the chosen head dims is built as
its own extension, in parallel processes (sm_90a); (2) one process per variant, one after another, checks
dq/dk/dv against float64 (at most 2x SDPA's error) and times the backward against SDPA's FLASH_ATTENTION
backward at B·N = --tokens, H·D = --hidden; (3) a table (variant x point: TFLOP/s and ratio to SDPA flash)
is printed last, the rows go to --out (CSV), the raw results to --out with .json and the per-variant build
and run logs to <out stem>_logs/. A variant that fails to build or to pass the check is reported and
skipped. Past --budget-s no new work starts.

``--compile-only`` needs no GPU: nvcc compiles every variant for sm_90a and sm_80 and prints registers and
spills (exit 1 if a compile fails or a variant spills more than variant 0 of its head dim).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import bwd_sweep as sw


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=_int_list, default=list(sw.SWEPT_HEAD_DIMS), help="e.g. 64,128")
    p.add_argument("--variants", type=_name_list, default=None, help="only these, e.g. d64v0,d128v2")
    p.add_argument("--seqlens", type=_int_list, default=[1024, 4096, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="B·N of every point")
    p.add_argument("--hidden", type=int, default=2048, help="H·D of every point")
    p.add_argument("--out", type=Path, default=Path("bwd_sweep.csv"))
    p.add_argument("--build-root", type=Path, default=Path(tempfile.gettempdir()) / "flash_bwd_sweep")
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel builds")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new work starts after this")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--no-check", action="store_true", help="time without the float64 check")
    p.add_argument("--compile-only", action="store_true", help="nvcc + ptxas -v for sm_90a and sm_80, no GPU")
    args = p.parse_args(argv)
    bad = [d for d in args.head_dims if d not in sw.SWEPT_HEAD_DIMS]
    if bad:
        p.error(f"--head-dims: {bad} have no variants; choose from {list(sw.SWEPT_HEAD_DIMS)}")
    if args.jobs < 1 or args.budget_s <= 0 or args.rep_ms <= 0 or args.warmup_ms < 0:
        p.error("--jobs >= 1, --budget-s > 0, --rep-ms > 0 and --warmup-ms >= 0")
    for d in args.head_dims:
        try:
            sw.grid(d, args.seqlens, args.tokens, args.hidden)
        except ValueError as exc:
            p.error(str(exc))
    return args


class Clock:
    """Elapsed time, the budget left, and timestamped progress lines."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["FLASH_ATTN_DISABLE_PREBUILT"] = "1"  # a child loads its variant's library, never the installed one
    env["FLASH_ATTN_BWD_WGMMA"] = "0"  # the swept kernel is the mma.sync backward, also on sm_90
    return env


def _run_child(
    module: str, spec: dict, workdir: Path, timeout: float, env: dict[str, str]
) -> tuple[int, str]:
    """python -m module spec.json in ROOT; returns (exit code, combined output). Timeout -> code 124."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{module.rsplit('.', 1)[-1]}_spec.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, str(spec_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=max(timeout, 1.0),
            check=False,
        )
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return 124, (out.decode(errors="replace") if isinstance(out, bytes) else out) + "\n[timed out]"


# ------------------------------------------------------------------------------------------------
# --compile-only
# ------------------------------------------------------------------------------------------------
def compile_only(variants: Sequence[sw.Variant], jobs: int, log: Callable[[str], None] = print) -> int:
    """nvcc every variant for sm_90a and sm_80; print registers / spills; 1 on a failure or extra spills."""
    from benchmarks import bwd_sweep_build as builder

    nvcc = builder.find_nvcc()
    if nvcc is None:
        log("nvcc not found")
        return 1
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda v: builder.compile_only(v, Path(tmp), nvcc), variants))
    rows, failed = compile_report(variants, results)
    for line in rows:
        log(line)
    for variant, (ok, _, text) in zip(variants, results, strict=True):
        if not ok:
            log(f"{variant.name} failed to compile:\n{text[-3000:]}")
    return 1 if failed else 0


def compile_report(variants: Sequence[sw.Variant], results: Sequence[tuple]) -> tuple[list[str], bool]:
    """Table lines (registers / spill bytes per arch) and whether any variant failed or spills more than
    variant 0 of its head dim on the same arch."""
    base = {
        (v.head_dim, arch): res.spill_stores + res.spill_loads
        for v, (ok, found, _) in zip(variants, results, strict=True)
        if v.index == 0 and ok
        for arch, res in found.items()
    }
    lines = [f"{'variant':<8} {'sm_90a regs/spill':>18} {'sm_80 regs/spill':>17}  label"]
    failed = False
    for v, (ok, found, _) in zip(variants, results, strict=True):
        cells, verdict = [], ""
        for arch in ("sm_90a", "sm_80"):
            res = found.get(arch)
            if res is None:
                cells.append("-")
                continue
            cells.append(f"{res.registers}/{res.spill_stores}+{res.spill_loads}")
            if res.spill_stores + res.spill_loads > base.get((v.head_dim, arch), math.inf):
                verdict = "  MORE SPILLS THAN v0"
                failed = True
        if not ok:
            verdict, failed = "  COMPILE FAILED", True
        lines.append(f"{v.name:<8} {cells[0]:>18} {cells[1]:>17}  {v.label}{verdict}")
    return lines, failed


# ------------------------------------------------------------------------------------------------
# Build, check, time
# ------------------------------------------------------------------------------------------------
def prepare_objects(args: argparse.Namespace, clock: Clock) -> dict[Path, Path] | None:
    """The objects the variants link with: the in-place build's, else one JIT build of the whole extension."""
    from benchmarks import bwd_sweep_build as builder

    objects = builder.find_prebuilt_objects()
    if objects is not None:
        clock.log(
            f"linking with the in-place build's {len(objects)} objects ({next(iter(objects.values())).parent})"
        )
        return objects
    base_dir = args.build_root / "base"
    clock.log(f"no complete in-place build under {ROOT / 'build'}: JIT-building the extension for sm_90a")
    env = _child_env()
    env["MAX_JOBS"] = str(args.jobs)
    spec = {"base": str(base_dir)}
    code, text = _run_child("benchmarks.bwd_sweep_build", spec, args.build_root, clock.remaining(), env)
    objects = builder.jit_objects(base_dir)
    if code != 0 or objects is None:
        clock.log(f"base build failed (exit {code}):\n{text[-3000:]}")
        return None
    clock.log(f"base build done: {len(objects)} objects")
    return objects


def build_one(variant: sw.Variant, objects: dict[Path, Path], args: argparse.Namespace, clock: Clock) -> dict:
    """Build one variant in its own process; {'lib': path} or {'error': text}."""
    from benchmarks import bwd_sweep_build as builder

    build_dir = args.build_root / variant.name
    shutil.rmtree(build_dir, ignore_errors=True)  # the link inputs are not ninja dependencies: start clean
    spec = {
        "variant": asdict(variant),
        "objects": builder.link_inputs(objects, variant),
        "build_dir": str(build_dir / "ext"),
    }
    env = _child_env()
    env["MAX_JOBS"] = "1"
    code, text = _run_child("benchmarks.bwd_sweep_build", spec, build_dir, min(300.0, clock.remaining()), env)
    (build_dir / "build.log").write_text(text)
    for line in reversed(text.splitlines()):
        if line.startswith('{"lib"'):
            return json.loads(line)
    return {"error": f"exit {code}: {text[-2500:]}"}


def evaluate_one(
    variant: sw.Variant, lib: str, points: Sequence[sw.Point], args: argparse.Namespace, clock: Clock
) -> dict:
    """Check and time one variant in its own process; the worker's JSON result (or {'error': ...})."""
    workdir = args.build_root / variant.name
    out = workdir / "result.json"
    out.unlink(missing_ok=True)
    spec = {
        "lib": lib,
        "head_dim": variant.head_dim,
        "points": [asdict(p) for p in points],
        "warmup_ms": args.warmup_ms,
        "rep_ms": args.rep_ms,
        "with_fwd": variant.index == 0,
        "check": not args.no_check,
        "out": str(out),
    }
    code, text = _run_child(
        "benchmarks.bwd_sweep_gpu", spec, workdir, min(90.0, clock.remaining()), _child_env()
    )
    (workdir / "run.log").write_text(text)
    if out.is_file():
        result = json.loads(out.read_text())
        if code != 0:
            result.setdefault("error", f"exit {code}: {text[-1500:]}")
        return result
    return {"error": f"exit {code}: {text[-2500:]}", "points": []}


def rows_for(
    variant: sw.Variant, points: Sequence[sw.Point], build: dict, result: dict | None
) -> list[sw.Row]:
    """The CSV rows of one variant from its build and GPU results."""
    if "error" in build:
        return [sw.make_row(variant, p, "build_failed", note=_short(build["error"])) for p in points]
    if result is None:
        return [sw.make_row(variant, p, "skipped", note="time budget spent") for p in points]
    checks = result.get("check", [])
    worst = max((c["worst_ratio"] for c in checks), default=math.nan)
    if checks and not result.get("check_ok", False):
        bad = [c["case"] for c in checks if not c["ok"]]
        return [
            sw.make_row(
                variant, p, "check_failed", worst_error_ratio=worst, note=_short(f"failing cases {bad}")
            )
            for p in points
        ]
    rows = []
    timed = result.get("points", [])
    for i, point in enumerate(points):
        measured = timed[i] if i < len(timed) else {"error": result.get("error", "not run")}
        if "error" in measured:
            rows.append(
                sw.make_row(
                    variant, point, "run_failed", worst_error_ratio=worst, note=_short(measured["error"])
                )
            )
            continue
        row = sw.make_row(
            variant,
            point,
            "ok",
            bwd_ms=measured["bwd_ms"],
            sdpa_bwd_ms=measured.get("sdpa_bwd_ms", math.nan),
            fwd_ms=measured.get("fwd_ms", math.nan),
            sdpa_fwd_ms=measured.get("sdpa_fwd_ms", math.nan),
            worst_error_ratio=worst,
            note=_short(measured.get("sdpa_error", "")),
        )
        rows.append(sw.fill_rates(row, point))
    return rows


def share_forward_times(rows: list[sw.Row], points_of: dict[int, list[sw.Point]]) -> None:
    """Every variant's fwd+bwd ratio from the forward times measured by variant 0 of its head dim."""
    fwd = {
        (r.head_dim, r.seqlen, r.causal): (r.fwd_ms, r.sdpa_fwd_ms)
        for r in rows
        if r.status == "ok" and not math.isnan(r.fwd_ms)
    }
    point_of = {(p.head_dim, p.seqlen, p.causal): p for ps in points_of.values() for p in ps}
    for r in rows:
        key = (r.head_dim, r.seqlen, r.causal)
        if r.status == "ok" and key in fwd:
            r.fwd_ms, r.sdpa_fwd_ms = fwd[key]
            sw.fill_rates(r, point_of[key])


def _short(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[-limit:]


def run_sweep(
    args: argparse.Namespace,
    variants: Sequence[sw.Variant],
    clock: Clock,
    *,
    build: Callable[[sw.Variant], dict],
    evaluate: Callable[[sw.Variant, str, Sequence[sw.Point]], dict],
) -> tuple[list[sw.Row], dict]:
    """Build all (in parallel), then check and time one by one within the budget; rows and raw results."""
    points_of = {
        d: sw.grid(d, args.seqlens, args.tokens, args.hidden) for d in {v.head_dim for v in variants}
    }
    clock.log(f"building {len(variants)} variants, {args.jobs} at a time")

    def timed_build(v: sw.Variant) -> dict:
        try:
            out = build(v)
        except Exception as exc:  # noqa: BLE001 - one broken build must not stop the sweep
            out = {"error": f"{type(exc).__name__}: {exc}"}
        clock.log(f"built {v.name}: {'ok' if 'lib' in out else 'FAILED ' + _short(out['error'], 200)}")
        return out

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        builds = dict(zip([v.name for v in variants], pool.map(timed_build, variants), strict=True))
    raw: dict = {"builds": builds, "results": {}}
    rows: list[sw.Row] = []
    for v in sw.sweep_order(variants):
        result = None
        if "lib" in builds[v.name] and clock.remaining() > 15:
            clock.log(f"checking and timing {v.name} ({v.label})")
            try:
                result = evaluate(v, builds[v.name]["lib"], points_of[v.head_dim])
            except Exception as exc:  # noqa: BLE001
                result = {"error": f"{type(exc).__name__}: {exc}", "points": []}
            raw["results"][v.name] = result
            clock.log(f"{v.name}: {_summary(result)}")
        elif "lib" in builds[v.name]:
            clock.log(f"skipping {v.name}: time budget spent")
        rows += rows_for(v, points_of[v.head_dim], builds[v.name], result)
    share_forward_times(rows, points_of)
    return rows, raw


def _summary(result: dict) -> str:
    parts = []
    if "check_ok" in result:
        worst = max((c["worst_ratio"] for c in result.get("check", [])), default=math.nan)
        parts.append(f"check {'ok' if result['check_ok'] else 'FAILED'} (worst error / SDPA's = {worst:.2f})")
    done = [p for p in result.get("points", []) if "bwd_ms" in p]
    if done:
        parts.append(f"timed {len(done)}/{len(result['points'])} points")
    if "error" in result:
        parts.append("error: " + _short(result["error"], 300))
    parts.append(f"{result.get('seconds', math.nan):.1f} s")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    variants = sw.select_variants(sw.read_variants(), args.head_dims, args.variants)
    if not variants:
        print("no variants selected", file=sys.stderr)
        return 2
    if args.compile_only:
        return compile_only(variants, args.jobs, clock.log)

    import torch
    from torch.utils import cpp_extension

    clock.log(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(variants)} variants: "
        + " ".join(v.name for v in variants)
    )
    if not torch.cuda.is_available():
        clock.log("no CUDA device: use --compile-only here")
        return 2
    cpp_extension.verify_ninja_availability()
    clock.log(f"device: {torch.cuda.get_device_name()}")
    args.build_root.mkdir(parents=True, exist_ok=True)
    objects = prepare_objects(args, clock)
    if objects is None:
        return 1
    rows, raw = run_sweep(
        args,
        variants,
        clock,
        build=lambda v: build_one(v, objects, args, clock),
        evaluate=lambda v, lib, points: evaluate_one(v, lib, points, args, clock),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sw.write_csv(rows, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    logs = args.out.parent / f"{args.out.stem}_logs"
    logs.mkdir(exist_ok=True)
    for v in variants:
        for name in ("build.log", "run.log"):
            if (args.build_root / v.name / name).is_file():
                shutil.copyfile(args.build_root / v.name / name, logs / f"{v.name}_{name}")
    clock.log(f"wrote {args.out}, {args.out.with_suffix('.json')} and {logs}/")
    print()
    print(sw.format_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
