"""Building the backward tile variants: one JIT extension per variant, and an nvcc compile-only check.

A variant extension recompiles only its bf16 backward instantiation (with ``-DFLASH_BWD_VARIANT_HDIM<D>=<v>``,
sm_90a) and links it with the objects of every other source of the extension, taken from the in-place build
(``python3 setup.py build_ext --inplace`` leaves them under build/temp.*) or, without one, from a single JIT
build of the whole extension for sm_90a. Every op and head dim is then the one the tree builds, and only the
swept kernel differs. ``python -m benchmarks.bwd_sweep_build SPEC.json`` builds one variant (one process per
variant: loading a build registers the ``flash_attn`` op library, which a process can do once).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from attention_backends import _build

from .bwd_sweep import ROOT, Variant, parse_ptxas

SM90_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a"]
SM80_FLAGS = ["-gencode=arch=compute_80,code=sm_80"]


def variant_nvcc_flags(variant: Variant | None) -> list[str]:
    """The extension's nvcc flags for sm_90a only, plus the variant's define."""
    flags = [f for f in _build.nvcc_flags() if not f.startswith("-gencode")] + SM90_FLAGS
    return flags + (variant.defines if variant is not None else [])


def extension_sources() -> list[Path]:
    return [Path(s) for s in _build.sources(with_cuda=True)]


def find_prebuilt_objects(root: Path = ROOT) -> dict[Path, Path] | None:
    """Source -> object of the newest complete in-place build under root/build, or None."""
    sources = extension_sources()
    candidates = []
    for temp in sorted((root / "build").glob("temp.*")):
        objects = {}
        for src in sources:
            obj = temp / src.relative_to(root).with_suffix(".o")
            if not obj.is_file():
                break
            objects[src] = obj
        else:
            candidates.append((max(o.stat().st_mtime for o in objects.values()), objects))
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def jit_objects(build_dir: Path) -> dict[Path, Path] | None:
    """Source -> object in a torch JIT build directory (``stem.o`` or ``stem.cuda.o``), or None if incomplete."""
    objects = {}
    for src in extension_sources():
        for name in (f"{src.stem}.cuda.o", f"{src.stem}.o"):
            if (build_dir / name).is_file():
                objects[src] = build_dir / name
                break
        else:
            return None
    return objects


def link_inputs(objects: dict[Path, Path], variant: Variant) -> list[str]:
    """The objects a variant links with: all but the one of the source it recompiles."""
    if variant.source not in objects:
        raise ValueError(f"{variant.source} is not a source of the extension")
    return [str(o) for s, o in objects.items() if s != variant.source]


def build_base(build_dir: Path, *, verbose: bool = False) -> Path:
    """JIT-build the whole extension for sm_90a (the default variants); returns the library path."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    return Path(
        cpp_extension.load(
            name="flash_bwd_sweep_base",
            sources=[str(s) for s in extension_sources()],
            extra_cflags=_build.cxx_flags(),
            extra_cuda_cflags=variant_nvcc_flags(None),
            extra_ldflags=_build.link_flags(),
            extra_include_paths=_build.include_dirs(),
            build_directory=str(build_dir),
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
    )


def build_variant(variant: Variant, link_with: list[str], build_dir: Path, *, verbose: bool = False) -> Path:
    """JIT-build one variant's extension; returns the library path (loaded into this process)."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    return Path(
        cpp_extension.load(
            name=f"flash_bwd_sweep_{variant.name}",
            sources=[str(variant.source)],
            extra_cflags=_build.cxx_flags(),
            extra_cuda_cflags=variant_nvcc_flags(variant),
            extra_ldflags=[*link_with, *_build.link_flags()],
            extra_include_paths=_build.include_dirs(),
            build_directory=str(build_dir),
            with_cuda=True,
            is_python_module=False,
            verbose=verbose,
        )
    )


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None and Path("/usr/local/cuda/bin/nvcc").exists():
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


def compile_only(variant: Variant, out_dir: Path, nvcc: str, archs: tuple[str, ...] = ("sm_90a", "sm_80")):
    """nvcc -c of the variant's instantiation with ptxas -v; returns (ok, {arch: KernelResources}, log)."""
    gencode = {"sm_90a": SM90_FLAGS[0], "sm_80": SM80_FLAGS[0]}
    flags = [f for f in _build.nvcc_flags() if not f.startswith(("-gencode", "-lineinfo"))]
    cmd = [
        nvcc,
        *flags,
        *(gencode[a] for a in archs),
        *variant.defines,
        "-Xptxas",
        "-v",
        *(f"-I{d}" for d in _build.include_dirs()),
        "-c",
        str(variant.source),
        "-o",
        str(out_dir / f"{variant.name}.o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    return proc.returncode == 0, parse_ptxas(log), log


def main(argv: list[str]) -> int:
    """``SPEC.json``: build one variant from {variant: {head_dim, index, label}, objects: [...], build_dir},
    or the whole extension from {base: dir}; print one JSON line {"lib": path}."""
    spec = json.loads(Path(argv[0]).read_text())
    if "base" in spec:
        print(json.dumps({"lib": str(build_base(Path(spec["base"])))}), flush=True)
        return 0
    variant = Variant(**spec["variant"])
    lib = build_variant(variant, spec["objects"], Path(spec["build_dir"]), verbose=spec.get("verbose", False))
    print(json.dumps({"lib": str(lib)}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("MAX_JOBS", "1")
    sys.exit(main(sys.argv[1:]))
