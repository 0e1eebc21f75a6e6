"""The backend registry: registration, lookup, the default backend, fallback and the functional entry."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .masks import lengths_to_masks
from .support import AttentionCall, BackendSupport


class BackendFn(Protocol):
    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        attn_mask: Tensor | None,
        is_causal: bool,
        dropout_p: float,
        scale: float,
        need_weights: bool,
    ) -> tuple[Tensor, Tensor | None]: ...


class BackendUnsupportedError(RuntimeError):
    """Raised in strict mode when the chosen backend can't serve a call."""


@dataclass(frozen=True)
class Backend:
    """A registered backend: its function, what it supports, and where it falls back to."""

    name: str
    fn: BackendFn
    support: BackendSupport
    fallback: str | None


_REGISTRY: dict[str, Backend] = {}
_DEFAULT = {"name": "sdpa", "strict": False}
_WARNED: set[tuple[str, str]] = set()
_LAST_USED: list[str | None] = [None]
_TRACKERS: list[Counter[str]] = []


def register_backend(
    name: str, *, support: BackendSupport | None = None, fallback: str | None = "naive"
) -> Callable[[BackendFn], BackendFn]:
    """Decorator that registers an attention function under ``name``.

    The function follows the backend contract (see ``attention``); once registered it can be chosen by
    name everywhere: ``attention(..., backend=name)``, ``use_backend(name)``, layers and Hydra configs.
    ``fallback`` names the backend that serves calls this one declares it can't (None: raise).
    """

    def decorator(fn: BackendFn) -> BackendFn:
        if fallback == name:
            raise ValueError(f"backend '{name}' cannot fall back to itself")
        _REGISTRY[name] = Backend(name=name, fn=fn, support=support or BackendSupport(), fallback=fallback)
        return fn

    return decorator


def unregister_backend(name: str) -> None:
    """Remove a registered backend (the default returns to 'sdpa' if it was the default)."""
    get_backend(name)
    del _REGISTRY[name]
    if _DEFAULT["name"] == name:
        _DEFAULT["name"] = "sdpa"


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ValueError listing the registered names if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend '{name}'; registered backends: {sorted(_REGISTRY)}"
        ) from None


def registered_backends() -> list[str]:
    """Every registered name, usable here or not."""
    return sorted(_REGISTRY)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """The names usable on this machine now (on ``device``'s type, if given)."""
    devices = [torch.device(device).type] if device is not None else _present_devices()
    return sorted(
        name for name, backend in _REGISTRY.items() if any(backend.support.runs_on(d) for d in devices)
    )


def _present_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def set_default_backend(name: str, *, strict: bool | None = None) -> None:
    """Make ``name`` the backend that calls without ``backend=`` use; ``strict`` raises instead of falling back."""
    get_backend(name)
    _DEFAULT["name"] = name
    if strict is not None:
        _DEFAULT["strict"] = strict


def get_default_backend() -> str:
    return str(_DEFAULT["name"])


def is_strict() -> bool:
    return bool(_DEFAULT["strict"])


@contextmanager
def use_backend(name: str, *, strict: bool | None = None) -> Iterator[None]:
    """Change the default backend (and optionally strictness) inside a ``with`` block, like sdpa_kernel."""
    saved = dict(_DEFAULT)
    set_default_backend(name, strict=strict)
    try:
        yield
    finally:
        _DEFAULT.update(saved)


def last_backend_used() -> str | None:
    """Name of the backend that served the most recent attention call (after any fallback)."""
    return _LAST_USED[0]


@contextmanager
def track_backends() -> Iterator[Counter[str]]:
    """Count which backends served the attention calls made inside the block (after fallback)."""
    counter: Counter[str] = Counter()
    _TRACKERS.append(counter)
    try:
        yield counter
    finally:
        _TRACKERS.remove(counter)


def resolve_backend(call: AttentionCall, name: str | None = None, strict: bool | None = None) -> Backend:
    """The backend that will serve ``call``: ``name`` (or the default), then its fallback chain."""
    backend = get_backend(name if name is not None else get_default_backend())
    strict = is_strict() if strict is None else strict
    seen = []
    while True:
        reason = backend.support.reason_against(call)
        if reason is None:
            return backend
        seen.append(backend.name)
        if strict or backend.fallback is None:
            raise BackendUnsupportedError(
                f"attention backend '{backend.name}' cannot serve this call: {reason}"
            )
        key = (backend.name, reason)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"attention backend '{backend.name}' cannot serve this call ({reason}); "
                f"falling back to '{backend.fallback}'",
                stacklevel=3,
            )
        backend = get_backend(backend.fallback)
        if backend.name in seen:
            raise BackendUnsupportedError(f"attention fallback chain loops at '{backend.name}'")


def _check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    dropout_p: float,
    seqlens_k: Tensor | None = None,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: expected {name} to be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: expected {name} to have 4 dims (B, H, N, D), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"attention: expected {name} to be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"attention: expected {name} to have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: expected {name} on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:
        raise ValueError(
            f"attention: expected k and v of the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"attention: expected q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) to share B and D, "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.shape[3] == 0:
        raise ValueError(f"attention: expected q, k and v to have a head dim D >= 1, got {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"attention: expected the query heads Hq to be a multiple of the key/value heads Hkv, "
            f"got Hq = {q.shape[1]}, Hkv = {k.shape[1]}"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"attention: expected key_padding_mask to be bool (True = ignore), got {key_padding_mask.dtype}"
            )
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"attention: expected key_padding_mask of shape (B, Nk) = {(k.shape[0], k.shape[2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"attention: expected key_padding_mask on q's device {q.device}, got {key_padding_mask.device}"
            )
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"attention: expected attn_mask to be bool or floating point, got {attn_mask.dtype}"
            )
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            shape = torch.broadcast_shapes(attn_mask.shape, full)
        except RuntimeError:
            shape = None
        if shape != full:
            raise ValueError(
                f"attention: expected attn_mask broadcastable to (B, Hq, Nq, Nk) = {full}, "
                f"got {tuple(attn_mask.shape)}"
            )
        if attn_mask.device != q.device:
            raise ValueError(
                f"attention: expected attn_mask on q's device {q.device}, got {attn_mask.device}"
            )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: expected dropout_p in [0, 1), got {dropout_p}")
    if seqlens_k is not None:
        if not isinstance(seqlens_k, Tensor):
            raise TypeError(f"attention: expected seqlens_k to be a Tensor, got {type(seqlens_k).__name__}")
        if seqlens_k.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"attention: expected seqlens_k to be int32 or int64, got {seqlens_k.dtype}")
        if seqlens_k.shape != (q.shape[0],):
            raise ValueError(
                f"attention: expected seqlens_k of shape (B,) = ({q.shape[0]},), got {tuple(seqlens_k.shape)}"
            )
        if seqlens_k.device != q.device:
            raise ValueError(
                f"attention: expected seqlens_k on q's device {q.device}, got {seqlens_k.device}"
            )


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
    seqlens_k: Tensor | None = None,
    backend: str | None = None,
    strict: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention through the backend registry.

    Shape:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), Hq a multiple of Hkv (grouped-query attention).
        key_padding_mask: (B, Nk) bool, True = ignore that key.
        attn_mask: bool (True = not allowed) or float (added to the scores), broadcastable to (B, Hq, Nq, Nk).
        returns out (B, Hq, Nq, D) and, when ``need_weights``, weights (B, Hq, Nq, Nk), else None.

    ``is_causal`` is bottom-right aligned (query i sees key j iff j <= i + Nk - Nq), as KV-cache decoding
    needs. ``seqlens_k`` (B,) int32/int64 gives each sequence its own number of keys (a KV cache filled to
    different lengths; values are clamped into [0, Nk]): sequence b sees keys ``0 .. seqlens_k[b] - 1`` and
    ``is_causal`` aligns to its own length (j <= i + seqlens_k[b] - Nq). Backends declaring it take it
    natively (flash); for the others it becomes a key padding mask and a per-sequence causal mask. ``scale`` defaults to D ** -0.5. ``backend`` defaults to the current default (``use_backend``);
    a call the backend can't serve falls back along its chain with a warning, or raises
    ``BackendUnsupportedError`` when strict. A query row whose keys are all masked gives 0.
    """
    _check_inputs(q, k, v, key_padding_mask, attn_mask, dropout_p, seqlens_k)
    call = AttentionCall(
        device=q.device.type,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        grouped=q.shape[1] != k.shape[1],
        has_attn_mask=attn_mask is not None,
        has_key_padding_mask=key_padding_mask is not None,
        is_causal=is_causal,
        dropout=dropout_p > 0.0,
        need_weights=need_weights,
        has_seqlens_k=seqlens_k is not None,
    )
    chosen = resolve_backend(call, backend, strict)
    _LAST_USED[0] = chosen.name
    for counter in _TRACKERS:
        counter[chosen.name] += 1
    extra = {}
    if seqlens_k is not None:
        if chosen.support.seqlens_k:
            extra["seqlens_k"] = seqlens_k
        else:
            key_padding_mask, attn_mask, is_causal = _lengths_as_masks(
                seqlens_k, q.shape[2], k.shape[2], key_padding_mask, attn_mask, is_causal
            )
    return chosen.fn(
        q,
        k,
        v,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        is_causal=is_causal,
        dropout_p=dropout_p,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        need_weights=need_weights,
        **extra,
    )


def _lengths_as_masks(
    seqlens_k: Tensor,
    len_q: int,
    len_k: int,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
) -> tuple[Tensor, Tensor | None, bool]:
    """``seqlens_k`` folded into the key padding mask and, when causal, into ``attn_mask`` (then no is_causal)."""
    padding, hidden = lengths_to_masks(seqlens_k, len_q, len_k, is_causal=is_causal)
    key_padding_mask = padding if key_padding_mask is None else key_padding_mask | padding
    if hidden is None:
        return key_padding_mask, attn_mask, is_causal
    if attn_mask is None:
        attn_mask = hidden  # (B, 1, Nq, Nk)
    elif attn_mask.dtype == torch.bool:
        attn_mask = attn_mask | hidden
    else:
        attn_mask = torch.where(hidden, float("-inf"), attn_mask)
    return key_padding_mask, attn_mask, False
