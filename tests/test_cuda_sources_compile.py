"""The CUDA kernel sources (csrc/cuda/*.cu and csrc/cuda/instantiations/*.cu) compile with nvcc alone (no
torch headers), with the flags of the real build, so a CUDA build break fails CI even on machines without
a GPU. Skipped where nvcc is missing, unless FLASH_ATTN_REQUIRE_NVCC=1."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from attention_backends import _build

KERNEL_SOURCES = _build.cuda_kernel_sources()
# What torch's CUDAExtension adds to every nvcc command (torch.utils.cpp_extension.COMMON_NVCC_FLAGS): no
# implicit half / bfloat16 conversions or operators, so the kernels must use the explicit intrinsics.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )
    if nvcc is None:
        if os.environ.get("FLASH_ATTN_REQUIRE_NVCC") == "1":
            pytest.fail("nvcc not found but FLASH_ATTN_REQUIRE_NVCC=1")
        pytest.skip("nvcc not found")
    return nvcc


def test_every_kernel_file_is_compiled():
    sources = set(_build.sources(with_cuda=True))
    for path in (_build.CSRC / "cuda").rglob("*.cu"):
        assert str(path) in sources, f"{path} is not in the CUDA build (attention_backends/_build.py)"
    assert _build.CSRC / "cuda" / "add_layernorm_cuda.cu" in KERNEL_SOURCES


def test_every_head_dim_and_dtype_has_kernels():
    names = {p.stem for p in KERNEL_SOURCES}
    for direction in ("fwd", "bwd"):
        for head_dim in (32, 64, 96, 128, 256):
            for dtype in ("fp16", "bf16"):
                assert f"flash_{direction}_hdim{head_dim}_{dtype}" in names


def test_kernel_sources_compile_with_nvcc(tmp_path):
    nvcc = _nvcc()
    flags = [f for f in _build.nvcc_flags() if not f.startswith("-lineinfo")] + TORCH_NVCC_DEFINES
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        flags += _build.DEFAULT_CUDA_ARCH_FLAGS

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        cmd = [
            nvcc,
            *flags,
            *(f"-I{d}" for d in _build.include_dirs()),
            "-c",
            str(source),
            "-o",
            str(tmp_path / f"{source.stem}.o"),
        ]
        return source, subprocess.run(cmd, capture_output=True, text=True, check=False)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, KERNEL_SOURCES))
    failures = [f"{src.name}:\n{res.stderr[-3000:]}" for src, res in results if res.returncode != 0]
    assert not failures, "\n\n".join(failures)


# The kernel candidates (kernel_traits.h, flash_bwd_sm90_kernel.cuh), which `bash scripts/gpu_check.sh
# fwdtiles` builds one at a time: every non-default one compiles for sm_90a (the defaults are in the build
# above).
SM90_DEFAULT_VARIANT = {64: 8, 128: 30}  # FLASH_FWD_SM90_VARIANT_HDIM64 / _HDIM128
BWD_SM90_DEFAULT_VARIANT = {64: 21, 128: 20}  # FLASH_BWD_SM90_VARIANT_HDIM64 / _HDIM128
KERNEL_CANDIDATES = (
    [("flash_fwd_hdim64_bf16", "FLASH_FWD_VARIANT_HDIM64", v) for v in (1, 2)]
    + [
        (f"flash_fwd_sm90_hdim{d}_bf16", f"FLASH_FWD_SM90_VARIANT_HDIM{d}", v)
        for d, default in SM90_DEFAULT_VARIANT.items()
        for v in range(31)
        if v != default
    ]
    + [  # the wgmma backward's candidates (flash_bwd_sm90_kernel.cuh; `FWD_TILE_KERNEL=sm90bwd ... fwdtiles`)
        (f"flash_bwd_sm90_hdim{d}_bf16", f"FLASH_BWD_SM90_VARIANT_HDIM{d}", v)
        for d, default in BWD_SM90_DEFAULT_VARIANT.items()
        for v in range(22)
        if v != default
    ]
)


def test_sm90_default_variants_are_the_ones_named_here():
    traits = (_build.CSRC / "cuda" / "kernel_traits.h").read_text()
    for d, default in SM90_DEFAULT_VARIANT.items():
        assert f"#define FLASH_FWD_SM90_VARIANT_HDIM{d} {default}\n" in traits
    backward = (_build.CSRC / "cuda" / "flash_bwd_sm90_kernel.cuh").read_text()
    for d, default in BWD_SM90_DEFAULT_VARIANT.items():
        assert f"#define FLASH_BWD_SM90_VARIANT_HDIM{d} {default}\n" in backward


def test_kernel_candidates_compile_with_nvcc(tmp_path):
    nvcc = _nvcc()
    flags = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-DFLASH_WITH_SM90A", *TORCH_NVCC_DEFINES]
    flags += ["-gencode=arch=compute_90a,code=sm_90a"]

    def compile_one(case: tuple[str, str, int]) -> tuple[str, subprocess.CompletedProcess]:
        stem, macro, variant = case
        source = _build.CSRC / "cuda" / "instantiations" / f"{stem}.cu"
        cmd = [nvcc, *flags, f"-D{macro}={variant}", *(f"-I{d}" for d in _build.include_dirs())]
        cmd += ["-c", str(source), "-o", str(tmp_path / f"{stem}_{variant}.o")]
        return f"{stem} {macro}={variant}", subprocess.run(cmd, capture_output=True, text=True, check=False)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(compile_one, KERNEL_CANDIDATES))
    failures = [f"{name}:\n{res.stderr[-3000:]}" for name, res in results if res.returncode != 0]
    assert not failures, "\n\n".join(failures)


# Host-only program: the one-pass forward's launcher picks the instantiation that matches the runtime
# flags, for each of the four (causal, key padding mask) pairs, when compiled by nvcc the way the real
# launchers are (the kernel chosen through a generic lambda inside a function template). Nested
# BOOL_SWITCHes failed this: non-causal with a mask got the kernel without it.
SELECT_KERNEL_PROGRAM = r"""
#include <cstdio>
#include "flash_fwd_common.cuh"
template <int D, bool kIsCausal, bool kHasKpm> __global__ void probe_kernel(flash::FwdParams) {}
template <int D> int check(bool causal, bool kpm) {
  flash::FwdParams params{};
  params.is_causal = causal;
  static bool mask_byte = true;
  params.key_padding_mask = kpm ? &mask_byte : nullptr;
  auto kernel = flash::select_one_pass_kernel(params, [](auto c, auto k) {
    return &probe_kernel<D, decltype(c)::value, decltype(k)::value>;
  });
  void* want = causal ? (kpm ? (void*)&probe_kernel<D, true, true> : (void*)&probe_kernel<D, true, false>)
                      : (kpm ? (void*)&probe_kernel<D, false, true> : (void*)&probe_kernel<D, false, false>);
  std::printf("causal=%d kpm=%d %s\n", causal, kpm, (void*)kernel == want ? "ok" : "WRONG");
  return (void*)kernel == want ? 0 : 1;
}
int main() {
  int bad = 0;
  for (int c = 0; c < 2; ++c)
    for (int k = 0; k < 2; ++k) bad += check<64>(c, k);
  return bad;
}
"""


def test_one_pass_launcher_picks_the_kernel_of_the_flags(tmp_path):
    nvcc = _nvcc()
    source = tmp_path / "select_kernel.cu"
    source.write_text(SELECT_KERNEL_PROGRAM)
    exe = tmp_path / "select_kernel"
    cmd = [nvcc, "-std=c++17", *TORCH_NVCC_DEFINES, *(f"-I{d}" for d in _build.include_dirs())]
    built = subprocess.run([*cmd, str(source), "-o", str(exe)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([str(exe)], capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.count("ok") == 4, ran.stdout
