"""The Python half of the ``flash_attn`` ops: fake (meta) kernels.

The C++ extension defines ``flash_attn::fwd`` and ``flash_attn::bwd`` with CPU and CUDA kernels, and the
forward's autograd (csrc/flash_autograd.cpp: the backward op as its gradient; in C++ for the host time of a
call). The fake kernels let torch.compile trace through the ops without running them.
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


def register_python_parts() -> None:
    """Register the fake kernels once the extension has defined the ops."""
    if _REGISTERED[0]:
        return
    torch.library.register_fake("flash_attn::fwd")(_fwd_fake)
    torch.library.register_fake("flash_attn::bwd")(_bwd_fake)
    _REGISTERED[0] = True
