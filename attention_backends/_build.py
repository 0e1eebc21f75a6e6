"""Sources and compiler flags of the flash extension, shared by setup.py and the JIT build.

Kept free of package imports so setup.py can load it by path.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
]


def cuda_kernel_sources() -> list[Path]:
    """The CUDA kernel files (free of torch headers): csrc/cuda/*.cu and csrc/cuda/instantiations/*.cu."""
    return sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda" / "instantiations").glob("*.cu"))


def sources(with_cuda: bool) -> list[str]:
    """The C++ sources (always) and, with CUDA, the CUDA API layer and the kernel files."""
    files = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((CSRC / "cuda").glob("*.cpp")) + cuda_kernel_sources()
    return [str(f) for f in files]


def include_dirs() -> list[str]:
    return [str(CSRC), str(CSRC / "cuda")]


def builds_sm90a() -> bool:
    """Whether the CUDA build includes sm_90a code (the default archs, or a TORCH_CUDA_ARCH_LIST naming 9.0a)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    return not archs or "9.0a" in archs.replace(" ", ";").split(";")


def arch_defines() -> list[str]:
    """FLASH_WITH_SM90A where the wgmma forward kernel is compiled for real (else it is a trap)."""
    return ["-DFLASH_WITH_SM90A"] if builds_sm90a() else []


def cxx_flags() -> list[str]:
    """-march defaults to native: the extension is built on the machine that runs it (FLASH_ATTN_CPU_ARCH overrides)."""
    arch = os.environ.get("FLASH_ATTN_CPU_ARCH", "native")
    return ["-O3", "-fopenmp", f"-march={arch}", *arch_defines()]  # the C++ standard is torch's own choice


def nvcc_flags() -> list[str]:
    """sm_80 and sm_90a unless TORCH_CUDA_ARCH_LIST names the archs (then torch adds the -gencode flags)."""
    flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", *arch_defines()]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        flags += DEFAULT_CUDA_ARCH_FLAGS
    return flags


def link_flags() -> list[str]:
    return ["-fopenmp"]
