"""Fused residual add + LayerNorm: ``s = x + residual`` and ``y = layer_norm(s)`` in one op.

Pre-norm layers need the sum ``s`` (the next residual) as well as ``y``, so both are returned. The op
``torch.ops.flash_attn.add_layernorm_fwd`` (C++ on the CPU, CUDA kernels on GPUs; csrc/add_layernorm_api.cpp)
reads ``x`` and ``residual`` once and writes ``y`` and ``s`` once; its backward
(``add_layernorm_bwd``) takes the gradients of both outputs and returns the gradient of the sum (the
gradient of ``x`` and of ``residual``) with ``dweight`` and ``dbias``; the extension registers the autograd
that joins them (csrc/add_layernorm_autograd.cpp). This module registers the fake (meta) kernels, and
``add_layernorm`` falls back to the unfused torch ops wherever the op can't serve a call.

Shapes::

    x, residual     (..., N)   one shape
    weight, bias    (N,)
    y, s            (..., N)
    mean, rstd      (...)      float32, saved for the backward
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from attention_backends.extension import extension_error

__all__ = ["add_layernorm", "fused_kernels_available"]

FWD_OP = "flash_attn::add_layernorm_fwd"
BWD_OP = "flash_attn::add_layernorm_bwd"
FUSED_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})

_STATE = {"registered": False}
# Which devices have kernels, read once at registration so that torch.compile sees a plain dict lookup.
_KERNELS: dict[str, bool] = {"cpu": False, "cuda": False}


# ------------------------------------------------------------------------------------- fake kernels


def _check_fake_devices(op: str, ref_name: str, ref: Tensor, **tensors: Tensor | None) -> None:
    """The device check the compiled ops make, for calls that reach the fake kernels (e.g. meta + cpu)."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: expected {name} on {ref_name}'s device {ref.device}, got {t.device}")


def _fwd_fake(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_fake_devices("flash_attn.add_layernorm_fwd", "x", x, residual=residual, weight=weight, bias=bias)
    stats = x.shape[:-1]
    return (
        x.new_empty(x.shape),
        x.new_empty(x.shape),
        x.new_empty(stats, dtype=torch.float32),
        x.new_empty(stats, dtype=torch.float32),
    )


def _bwd_fake(
    dy: Tensor, ds: Tensor | None, s: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    _check_fake_devices(
        "flash_attn.add_layernorm_bwd", "s", s, dy=dy, ds=ds, mean=mean, rstd=rstd, weight=weight
    )
    return s.new_empty(s.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _register() -> bool:
    """Register the fake kernels once the extension has defined the ops; False if it hasn't."""
    if _STATE["registered"]:
        return True
    if extension_error() is not None or not hasattr(torch.ops.flash_attn, "add_layernorm_fwd"):
        return False
    torch.library.register_fake(FWD_OP)(_fwd_fake)
    torch.library.register_fake(BWD_OP)(_bwd_fake)
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        _KERNELS[device] = torch._C._dispatch_has_kernel_for_dispatch_key(FWD_OP, key)
    _STATE["registered"] = True
    return True


_register()  # try once now, not inside a traced call


def fused_kernels_available(device: str | torch.device) -> bool:
    """Whether the compiled add + LayerNorm kernels exist for ``device`` ("cpu", "cuda" or a device)."""
    device_type = torch.device(device).type
    return _register() and _KERNELS.get(device_type, False)


# ----------------------------------------------------------------------------------------- the API


def _check_args(x: object, residual: object, weight: object, bias: object, eps: object) -> None:
    for name, value in (("x", x), ("residual", residual), ("weight", weight)):
        if not isinstance(value, Tensor):
            raise TypeError(f"add_layernorm: expected {name} to be a Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"add_layernorm: expected bias to be a Tensor or None, got {type(bias).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(f"add_layernorm: expected eps to be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"add_layernorm: expected eps to be finite and >= 0, got {eps}")
    for name, t in (("x", x), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"add_layernorm: expected {name} to be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError("add_layernorm: expected x to have at least 1 dim (..., N), got a 0-dim tensor")
    if residual.shape != x.shape:
        raise ValueError(
            f"add_layernorm: expected residual of x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    width = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (width,):
            raise ValueError(
                f"add_layernorm: expected {name} of shape (N,) = ({width},) (the last dim of x), "
                f"got {tuple(t.shape)}"
            )
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"add_layernorm: expected {name} on x's device {x.device}, got {t.device}")


def _fusable(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the compiled op serves this call (inputs already checked; ``dtype`` the sum's dtype)."""
    device_type = x.device.type
    if not _KERNELS.get(device_type, False) or dtype not in FUSED_DTYPES or x.shape[-1] < 1:
        return False
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        return False
    # Under autocast, layer_norm runs in float32 with a float32 output: fuse only when that's the dtype.
    if dtype != torch.float32 and torch.is_autocast_enabled(device_type):
        return False
    return all(t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 for t in (x, residual, weight, bias))


def add_layernorm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """``s = x + residual`` and ``y = layer_norm(s, (N,), weight, bias, eps)``, fused where possible.

    Uses the compiled op when the extension has kernels for the device, the dtypes are float32, float16
    or bfloat16 (``x`` and ``residual`` may differ: the lower one is cast up, as ``x + residual``
    promotes), ``weight`` and ``bias`` have the sum's dtype (float32 only under autocast), and the last
    dims are contiguous. Anything else runs ``x + residual`` and ``F.layer_norm`` (same results up to
    rounding). Differentiable in ``x``, ``residual``, ``weight`` and ``bias``, through both outputs.

    Shape:
        x, residual: (..., N), one shape
        weight, bias: (N,); bias may be None
        returns y (..., N), the normalised sum, and s (..., N), the sum (the next residual)

    Raises:
        TypeError: a non-tensor argument, a non-floating-point tensor or a non-numeric eps.
        ValueError: mismatched shapes or devices, or eps negative or not finite.
    """
    _check_args(x, residual, weight, bias, eps)
    dtype = torch.promote_types(x.dtype, residual.dtype)
    if (_STATE["registered"] or _register()) and _fusable(x, residual, weight, bias, dtype):
        y, s, _, _ = torch.ops.flash_attn.add_layernorm_fwd(
            x.to(dtype), residual.to(dtype), weight, bias, float(eps)
        )
        return y, s
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s
