"""The backward tile-variant sweep (scripts/sweep_bwd.py): its non-GPU parts, every variant compiling with nvcc
for sm_90a and sm_80 without more spills than variant 0 (skipped without nvcc unless FLASH_ATTN_REQUIRE_NVCC=1),
and a cuda-marked run of the check and timing code on the installed extension."""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from benchmarks import bwd_sweep as sw
from benchmarks import bwd_sweep_build as builder


@pytest.fixture(scope="module")
def script(load_script):
    return load_script("sweep_bwd")


def test_header_declares_variants_per_head_dim():
    variants = sw.read_variants()
    for head_dim, at_least in ((64, 4), (128, 4), (256, 2)):
        mine = [v for v in variants if v.head_dim == head_dim]
        assert len(mine) >= at_least, head_dim
        # Numbers are stable names (result files cite them): ascending from 0, a removed one stays unused.
        indices = [v.index for v in mine]
        assert indices[0] == 0 and indices == sorted(set(indices)), "indices ascend from 0"
        assert "fallback" in mine[0].label and all(v.label for v in mine)
        assert sum("default" in v.label for v in mine) == 1
        assert mine[0].source.is_file()
    assert len({v.name for v in variants}) == len(variants)


def test_variant_zero_is_the_fallback_and_the_sweep_winners_are_the_defaults():
    text = sw.TRAITS_HEADER.read_text()
    for head_dim, traits in (
        (64, "BwdTraits<64, 64, 128, 8, 2>"),
        (128, "BwdTraits<128, 64, 128, 8, 2, 2>"),
        (256, "BwdTraits<256, 32, 64, 8, 1>"),
    ):
        block = re.search(rf"struct BwdVariant<{head_dim}, 0> {{[^\n]*\n\s*using Traits = ([^;]+);", text)
        assert block is not None and block.group(1) == traits
        assert f"BwdVariant<{head_dim}, 0>::Traits> {{}};" in text  # the fallback of BwdConfig<head_dim>
    variants = {v.name: v for v in sw.read_variants(text)}
    for head_dim, default in ((64, 7), (128, 8), (256, 3)):
        assert f"#define FLASH_BWD_VARIANT_HDIM{head_dim} {default}" in text
        assert "(default" in variants[f"d{head_dim}v{default}"].label
    # Variant 0 fits sm_80's shared memory, so every sm_80 / sm_90 device can run the backward.
    assert not any(variants[f"d{d}v0"].sm90_only for d in (64, 128, 256))


def test_read_variants_from_text():
    text = (
        "template <>\nstruct BwdVariant<64, 1> {  // second (sm_90)\n  using Traits = X;\n};\n"
        "template <>\nstruct BwdVariant<64, 0> {  // first (default)\n  using Traits = Y;\n};\n"
    )
    first, second = sw.read_variants(text)
    assert (first.name, first.label, first.define) == (
        "d64v0",
        "first (default)",
        "-DFLASH_BWD_VARIANT_HDIM64=0",
    )
    assert second.sm90_only and not first.sm90_only
    assert second.source.name == "flash_bwd_hdim64_bf16.cu"


def test_select_and_order_variants():
    variants = [sw.Variant(d, i, "x") for d in (64, 128, 256) for i in range(3)]
    assert [v.name for v in sw.select_variants(variants, [128])] == ["d128v0", "d128v1", "d128v2"]
    assert [v.name for v in sw.select_variants(variants, [64, 128], ["d128v2", "d64v0"])] == [
        "d64v0",
        "d128v2",
    ]
    with pytest.raises(ValueError, match="d64v9"):
        sw.select_variants(variants, [64], ["d64v9"])
    order = [v.name for v in sw.sweep_order(variants)]
    assert order[:2] == ["d128v0", "d64v0"] and order[-3:] == ["d256v0", "d256v1", "d256v2"]


def test_grid_keeps_tokens_and_hidden():
    points = sw.grid(128, [1024, 4096, 16384], tokens=16384, hidden=2048)
    assert len(points) == 6 and [p.causal for p in points] == [False] * 3 + [True] * 3
    for p in points:
        assert p.batch * p.seqlen == 16384 and p.heads * p.head_dim == 2048
    p = points[1]
    assert p.fwd_flops() == 4 * 4 * 16 * 4096**2 * 128
    assert points[4].fwd_flops() == p.fwd_flops() / 2
    assert p.bwd_flops() == 2.5 * p.fwd_flops()
    with pytest.raises(ValueError, match="multiple of the sequence length"):
        sw.grid(64, [1000], tokens=16384, hidden=2048)
    with pytest.raises(ValueError, match="head dim"):
        sw.grid(96, [1024], tokens=16384, hidden=2000)


def test_parse_args(script):
    args = script.parse_args([])
    assert args.head_dims == [64, 128, 256] and args.seqlens == [1024, 4096, 16384]
    assert (args.tokens, args.hidden, args.budget_s) == (16384, 2048, 420.0) and not args.compile_only
    args = script.parse_args(["--head-dims", "64", "--variants", "d64v1,d64v0", "--seqlens", "512,2048"])
    assert args.head_dims == [64] and args.variants == ["d64v1", "d64v0"] and args.seqlens == [512, 2048]
    for bad in (["--head-dims", "96"], ["--jobs", "0"], ["--seqlens", "1000"], ["--budget-s", "-1"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


PTXAS = """\
ptxas info    : Compiling entry function '_ZN5flash21bwd_convert_dq_kernelI13__nv_bfloat16EEvNS_9BwdParamsEl' for 'sm_90a'
ptxas info    : Function properties for _ZN5flash21bwd_convert_dq_kernelI13__nv_bfloat16EEvNS_9BwdParamsEl
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 0 barriers
ptxas info    : Compiling entry function '_ZN5flash10bwd_kernelI13__nv_bfloat16NS_9BwdTraitsEEEvNS_9BwdParamsE' for 'sm_90a'
ptxas info    : Function properties for _ZN5flash10bwd_kernelI13__nv_bfloat16NS_9BwdTraitsEEEvNS_9BwdParamsE
    24 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : Compiling entry function '_ZN5flash10bwd_kernelI13__nv_bfloat16NS_9BwdTraitsEEEvNS_9BwdParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN5flash10bwd_kernelI13__nv_bfloat16NS_9BwdTraitsEEEvNS_9BwdParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 226 registers, used 1 barriers, 640 bytes cmem[0]
"""


def test_parse_ptxas():
    found = sw.parse_ptxas(PTXAS)
    assert found == {
        "sm_90a": sw.KernelResources(255, 24, 32),
        "sm_80": sw.KernelResources(226, 0, 0),
    }


def test_compile_report_flags_failures_and_extra_spills(script):
    variants = [sw.Variant(64, 0, "a (default)"), sw.Variant(64, 1, "b"), sw.Variant(64, 2, "c")]
    clean = {"sm_90a": sw.KernelResources(240, 0, 0), "sm_80": sw.KernelResources(226, 0, 0)}
    lines, failed = script.compile_report(variants, [(True, clean, ""), (True, clean, ""), (True, clean, "")])
    assert not failed and len(lines) == 4 and "240/0+0" in lines[1]
    spilled = {"sm_90a": sw.KernelResources(255, 8, 8), "sm_80": clean["sm_80"]}
    lines, failed = script.compile_report(
        variants, [(True, clean, ""), (True, spilled, ""), (False, {}, "err")]
    )
    assert failed and "MORE SPILLS" in lines[2] and "COMPILE FAILED" in lines[3]


def _row(
    variant: str, seqlen: int, causal: bool, ours_ms: float, sdpa_ms: float, status: str = "ok"
) -> sw.Row:
    point = sw.Point(64, seqlen, causal, 16384 // seqlen, 32)
    row = sw.make_row(
        sw.Variant(64, int(variant[-1]), "lbl"), point, status, bwd_ms=ours_ms, sdpa_bwd_ms=sdpa_ms
    )
    return sw.fill_rates(row, point)


def test_rates_table_and_csv(tmp_path):
    rows = [
        _row("d64v0", 1024, False, 1.0, 0.9),
        _row("d64v0", 1024, True, 0.6, 0.5),
        _row("d64v1", 1024, False, 0.8, 0.9),
        _row("d64v1", 1024, True, math.nan, math.nan, status="check_failed"),
    ]
    flops = sw.Point(64, 1024, False, 16, 32).bwd_flops()
    assert rows[0].bwd_tflops == pytest.approx(flops / 1.0 / 1e9)
    assert rows[0].bwd_ratio == pytest.approx(0.9) and rows[2].bwd_ratio == pytest.approx(1.125)
    assert math.isnan(rows[0].fwd_bwd_ratio)
    table = sw.format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("D=64") and "1024" in lines[0] and "c1024" in lines[0]
    assert "1.12x" in lines[2] and "-" in lines[2] and "check_failed" in lines[2]
    assert lines[3].split()[1] == "d64v1"  # best at N=1024 non-causal
    path = tmp_path / "sweep.csv"
    sw.write_csv(rows, path)
    back = sw.read_csv(path)
    assert [(r.variant, r.seqlen, r.causal, r.status) for r in back] == [
        (r.variant, r.seqlen, r.causal, r.status) for r in rows
    ]
    assert back[2].bwd_ratio == pytest.approx(rows[2].bwd_ratio, rel=1e-5) and math.isnan(back[3].bwd_ms)


def test_object_discovery(tmp_path, monkeypatch):
    sources = [tmp_path / "csrc" / "flash_api.cpp", tmp_path / "csrc" / "cuda" / "k.cu"]
    monkeypatch.setattr(builder, "extension_sources", lambda: sources)
    assert builder.find_prebuilt_objects(tmp_path) is None
    for temp in ("temp.old", "temp.new"):
        for src in sources:
            obj = tmp_path / "build" / temp / src.relative_to(tmp_path).with_suffix(".o")
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_text(temp)
    os.utime(tmp_path / "build" / "temp.old" / "csrc" / "flash_api.o", (1, 1))
    os.utime(tmp_path / "build" / "temp.old" / "csrc" / "cuda" / "k.o", (1, 1))
    found = builder.find_prebuilt_objects(tmp_path)
    assert found is not None and all("temp.new" in str(o) for o in found.values())
    (tmp_path / "build" / "temp.new" / "csrc" / "cuda" / "k.o").unlink()
    assert all("temp.old" in str(o) for o in builder.find_prebuilt_objects(tmp_path).values())

    jit = tmp_path / "jit"
    jit.mkdir()
    (jit / "flash_api.o").write_text("")
    assert builder.jit_objects(jit) is None
    (jit / "k.cuda.o").write_text("")
    assert builder.jit_objects(jit) == {sources[0]: jit / "flash_api.o", sources[1]: jit / "k.cuda.o"}


def test_link_inputs_leave_out_the_recompiled_source():
    variant = sw.Variant(128, 2, "x")
    objects = {variant.source: Path("/b/default.o"), Path("/s/other.cpp"): Path("/b/other.o")}
    assert builder.link_inputs(objects, variant) == ["/b/other.o"]
    with pytest.raises(ValueError, match="not a source"):
        builder.link_inputs({Path("/s/other.cpp"): Path("/b/other.o")}, variant)


def test_variant_flags_are_sm90_only():
    flags = builder.variant_nvcc_flags(sw.Variant(64, 3, "x"))
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "-DFLASH_BWD_VARIANT_HDIM64=3" in flags
    assert not any("compute_80" in f for f in flags)


def _fake_results(variant: sw.Variant, points) -> dict:
    if variant.name == "d64v2":
        return {"check": [{"case": [1], "ok": False, "worst_ratio": 3.0}], "check_ok": False, "points": []}
    times = [{"bwd_ms": 1.0 + variant.index, "sdpa_bwd_ms": 1.5} for _ in points]
    if variant.index == 0:
        for t in times:
            t.update(fwd_ms=0.5, sdpa_fwd_ms=0.5)
    times[-1] = {"error": "RuntimeError: out of memory"}
    return {"check": [{"case": [1], "ok": True, "worst_ratio": 1.1}], "check_ok": True, "points": times}


def test_run_sweep_reports_failures_and_carries_on(script, capsys):
    args = script.parse_args(["--head-dims", "64,128", "--seqlens", "1024,2048", "--jobs", "2"])
    variants = [sw.Variant(64, i, "lbl") for i in range(4)] + [sw.Variant(128, 0, "lbl")]

    def build(v: sw.Variant) -> dict:
        if v.name == "d64v1":
            raise RuntimeError("nvcc exploded")
        return {"lib": f"/tmp/{v.name}.so"}

    def evaluate(v: sw.Variant, lib: str, points) -> dict:
        if v.name == "d64v3":
            raise RuntimeError("worker died")
        return _fake_results(v, points)

    rows, raw = script.run_sweep(args, variants, script.Clock(1000.0), build=build, evaluate=evaluate)
    status = {(r.variant, r.seqlen, r.causal): r.status for r in rows}
    assert {s for (v, *_), s in status.items() if v == "d64v1"} == {"build_failed"}
    assert {s for (v, *_), s in status.items() if v == "d64v2"} == {"check_failed"}
    assert {s for (v, *_), s in status.items() if v == "d64v3"} == {"run_failed"}
    assert status[("d64v0", 2048, True)] == "run_failed" and status[("d64v0", 1024, False)] == "ok"
    ok = [r for r in rows if r.variant == "d64v0" and r.status == "ok"]
    assert all(r.fwd_bwd_ratio == pytest.approx((0.5 + 1.5) / (0.5 + 1.0)) for r in ok)
    assert set(raw["results"]) == {"d64v0", "d64v2", "d64v3", "d128v0"}
    out = capsys.readouterr().out
    assert "built d64v1: FAILED" in out and "d64v2: check FAILED" in out
    assert "D=64" in sw.format_table(rows)

    rows, _ = script.run_sweep(args, variants[:1], script.Clock(5.0), build=build, evaluate=evaluate)
    assert {r.status for r in rows} == {"skipped"}


@pytest.fixture
def cpu_kernels():
    from attention_backends.extension import has_kernels_for

    if not has_kernels_for("cpu"):
        pytest.skip("the flash extension is not built")


CPU_CASES = [(1, 2, 2, 129, 129, True, False), (2, 4, 2, 33, 70, True, True)]


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_check_rule_on_the_cpu_kernels(cpu_kernels, case):
    from benchmarks import bwd_sweep_gpu as gpu

    result = gpu.check_case(case, 64, seed=7, device="cpu")
    assert result["ok"], result
    assert set(result["errors"]) == {"out", "dq", "dk", "dv"} and 0 < result["worst_ratio"] <= 2


def test_check_rule_catches_a_wrong_gradient(cpu_kernels, monkeypatch):
    from benchmarks import bwd_sweep_gpu as gpu

    real = gpu._run_ours

    def off_by_a_bit(*args):
        out, (dq, dk, dv) = real(*args)
        return out, (dq, dk * 1.02, dv)

    monkeypatch.setattr(gpu, "_run_ours", off_by_a_bit)
    result = gpu.check_case(CPU_CASES[0], 64, seed=7, device="cpu")
    assert not result["ok"] and result["worst_ratio"] > 2


@pytest.fixture(scope="module")
def nvcc() -> str:
    found = builder.find_nvcc()
    if found is None:
        if os.environ.get("FLASH_ATTN_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc not found but FLASH_ATTN_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found")
    return found


def test_every_variant_compiles_without_more_spills_than_variant_zero(script, nvcc, tmp_path):
    variants = sw.read_variants()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda v: builder.compile_only(v, tmp_path, nvcc), variants))
    lines, failed = script.compile_report(variants, results)
    logs = [text[-2000:] for ok, _, text in results if not ok]
    assert not failed, "\n".join(lines + logs)
    for v, (_, found, _) in zip(variants, results, strict=True):
        assert set(found) == {"sm_90a", "sm_80"}, v.name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check_and_timing_on_the_installed_extension():
    import attention_backends as ab
    from benchmarks import bwd_sweep_gpu as gpu

    ab.load_extension()
    checks = gpu.run_checks(64)
    assert all(c["ok"] for c in checks), checks
    times = gpu.time_point(asdict(sw.Point(64, 256, True, 2, 4)), warmup_ms=1, rep_ms=5, with_fwd=True)
    assert all(times[k] > 0 for k in ("bwd_ms", "sdpa_bwd_ms", "fwd_ms", "sdpa_fwd_ms"))
