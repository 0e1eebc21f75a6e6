"""Loading the compiled flash extension, and building it just in time for users who installed without it."""

from __future__ import annotations

import fcntl
import importlib
import os
import time
from pathlib import Path

import torch

from . import _build

_STATE: dict[str, object] = {"loaded": False, "error": None}
# Which dispatch keys have kernels, read once at load so that torch.compile sees a plain dict lookup.
_KERNELS: dict[str, bool] = {"cpu": False, "cuda": False}
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` or call attention_backends.compile_cuda_extension()"


class ExtensionNotBuiltError(ImportError):
    """The compiled flash extension is missing or failed to load."""


def _finish_load() -> None:
    from . import flash_ops

    flash_ops.register_python_parts()
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        _KERNELS[device] = torch._C._dispatch_has_kernel_for_dispatch_key("flash_attn::fwd", key)
    _STATE["loaded"] = True
    _STATE["error"] = None


def load_extension() -> None:
    """Import the compiled ops (``attention_backends._C``); ExtensionNotBuiltError says why not."""
    if _STATE["loaded"]:
        return
    try:
        if os.environ.get("FLASH_ATTN_DISABLE_PREBUILT") == "1":
            raise ImportError("FLASH_ATTN_DISABLE_PREBUILT=1 skips the installed build")
        importlib.import_module("attention_backends._C")
    except ImportError as exc:
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
        raise ExtensionNotBuiltError(f"the flash extension is not built ({exc}); {BUILD_HINT}") from exc
    _finish_load()


def extension_error() -> str | None:
    """Why the extension is not loaded (after a load attempt), or None when it is."""
    if _STATE["loaded"]:
        return None
    if _STATE["error"] is None:
        try:
            load_extension()
        except ExtensionNotBuiltError:
            pass
    return None if _STATE["loaded"] else f"the flash extension is not built ({_STATE['error']}); {BUILD_HINT}"


def has_kernels_for(device: str) -> bool:
    """Whether the loaded extension registered kernels for ``device`` ("cpu" or "cuda")."""
    return extension_error() is None and _KERNELS.get(device, False)


def _cuda_toolkit_present() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _acquire(lock_path: Path, timeout: float) -> int:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise TimeoutError(
                    f"compile_cuda_extension: another process has held {lock_path} for over {timeout:.0f} s"
                ) from None
            time.sleep(0.5)


def compile_cuda_extension(
    *,
    with_cuda: bool | None = None,
    build_dir: str | os.PathLike | None = None,
    timeout: float = 1800.0,
    verbose: bool = False,
) -> None:
    """Build the flash extension just in time (CUDA kernels when a toolkit and CUDA torch are present) and load it.

    Concurrent callers serialise on an OS file lock (released by the kernel if a holder dies, so a killed
    build never blocks the next one); a caller that waits longer than ``timeout`` seconds gets TimeoutError.
    A second call, or a call after a successful import of the installed extension, does nothing.
    """
    if _STATE["loaded"] or extension_error() is None:
        return
    from torch.utils import cpp_extension

    cuda = _cuda_toolkit_present() if with_cuda is None else with_cuda
    name = "flash_attn_jit_cuda" if cuda else "flash_attn_jit_cpu"
    root = (
        Path(build_dir) if build_dir is not None else Path(cpp_extension._get_build_directory(name, verbose))
    )
    root.mkdir(parents=True, exist_ok=True)
    fd = _acquire(root / "flash_attn_build.lock", timeout)
    try:
        stale_baton = root / "lock"  # torch's own build lock; nobody else can be inside while we hold ours
        if stale_baton.exists():
            stale_baton.unlink()
        cpp_extension.load(
            name=name,
            sources=_build.sources(cuda),
            extra_cflags=_build.cxx_flags(),
            extra_cuda_cflags=_build.nvcc_flags() if cuda else None,
            extra_ldflags=_build.link_flags(),
            extra_include_paths=_build.include_dirs(),
            build_directory=str(root),
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _finish_load()
