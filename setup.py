"""Builds the package and the flash extension (attention_backends._C).

CUDAExtension when a CUDA toolkit and a CUDA build of torch are both present, CppExtension otherwise
(FLASH_ATTN_FORCE_CPU=1 forces the CPU-only build). MAX_JOBS sets the parallel compile jobs and
TORCH_CUDA_ARCH_LIST the CUDA archs (default: sm_80 and sm_90a). Install without build isolation so the
torch already installed is the one compiled against:

    pip install --no-build-isolation -e .
"""

import os
import runpy
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

build = runpy.run_path(str(Path(__file__).parent / "attention_backends" / "_build.py"))
with_cuda = (
    torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("FLASH_ATTN_FORCE_CPU") != "1"
)
extension_class = CUDAExtension if with_cuda else CppExtension
extra_compile_args = {"cxx": build["cxx_flags"]()}
if with_cuda:
    extra_compile_args["nvcc"] = build["nvcc_flags"]()

setup(
    name="flash-transformer",
    version="0.1.0",
    description="An encoder/decoder Transformer with pluggable attention backends and FlashAttention kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["attention_backends", "transformer", "benchmarks"]),
    install_requires=["torch>=2.5", "einops>=0.7", "hydra-core>=1.3", "tqdm>=4.60"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.7"], "bench": ["matplotlib>=3.7"]},
    ext_modules=[
        extension_class(
            name="attention_backends._C",
            sources=[os.path.relpath(s, Path(__file__).parent) for s in build["sources"](with_cuda)],
            include_dirs=build["include_dirs"](),
            extra_compile_args=extra_compile_args,
            extra_link_args=build["link_flags"](),
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
