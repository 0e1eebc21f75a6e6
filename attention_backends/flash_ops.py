"""The Python half of the ``flash_attn`` ops: fake (meta) kernels and autograd.

The C++ extension defines ``flash_attn::fwd`` and ``flash_attn::bwd`` with CPU and CUDA kernels. The fake
kernels let torch.compile trace through the ops without running them; ``register_autograd`` makes the
forward differentiable with the backward op.
"""

from __future__ import annotations

import torch
from torch import Tensor

_REGISTERED = [False]


def _check_fake_devices(op: str, q: Tensor, **tensors: Tensor | None) -> None:
    """The device check the real kernels make, for calls that reach the fake kernels.

    A call that mixes ``meta`` tensors with real ones dispatches to the fake kernel, so the compiled
    checks never run; without this, such a call would return meta outputs instead of raising.
    """
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"{op}: expected {name} on q's device {q.device}, got {t.device}")


def _fwd_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    seqlens_k: Tensor | None,
    scale: float,
    is_causal: bool,
) -> tuple[Tensor, Tensor]:
    _check_fake_devices("flash_attn.fwd", q, k=k, v=v, key_padding_mask=key_padding_mask, seqlens_k=seqlens_k)
    batch, heads_q, len_q, head_dim = q.shape
    out = q.new_empty((batch, heads_q, len_q, head_dim))
    lse = q.new_empty((batch, heads_q, len_q), dtype=torch.float32)
    return out, lse


def _bwd_fake(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    seqlens_k: Tensor | None,
    scale: float,
    is_causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_fake_devices(
        "flash_attn.bwd",
        q,
        dout=dout,
        k=k,
        v=v,
        out=out,
        lse=lse,
        key_padding_mask=key_padding_mask,
        seqlens_k=seqlens_k,
    )
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, seqlens_k, scale, is_causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, seqlens_k)
    ctx.scale = scale
    ctx.is_causal = is_causal


def _backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, key_padding_mask, seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    elif dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = torch.ops.flash_attn.bwd(
        dout, q, k, v, out, lse, key_padding_mask, seqlens_k, ctx.scale, ctx.is_causal
    )
    return dq, dk, dv, None, None, None, None


def register_python_parts() -> None:
    """Register the fake kernels and autograd once the extension has defined the ops."""
    if _REGISTERED[0]:
        return
    torch.library.register_fake("flash_attn::fwd")(_fwd_fake)
    torch.library.register_fake("flash_attn::bwd")(_bwd_fake)
    torch.library.register_autograd("flash_attn::fwd", _backward, setup_context=_setup_context)
    _REGISTERED[0] = True
