"""What a backend declares it can serve, and the check of one call against it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


@dataclass(frozen=True)
class AttentionCall:
    """The facts about one attention call that decide which backend can serve it."""

    device: str
    dtype: torch.dtype
    head_dim: int
    grouped: bool
    has_attn_mask: bool
    has_key_padding_mask: bool
    is_causal: bool
    dropout: bool
    need_weights: bool
    has_seqlens_k: bool = False


@dataclass(frozen=True)
class BackendSupport:
    """What a backend can serve.

    Args:
        devices: device types it runs on, e.g. ``{"cpu", "cuda"}``.
        dtypes: per device type, the dtypes it takes; a device missing here takes every float dtype.
        head_dims: per device type, a predicate on the head dim D and a description of it for messages.
        attn_mask: arbitrary bool/float ``attn_mask``.
        key_padding_mask: ``key_padding_mask``.
        causal: ``is_causal`` (bottom-right aligned).
        dropout: ``dropout_p > 0``.
        need_weights: returns the attention weights.
        grouped_query: Hq a multiple of Hkv > 1.
        seqlens_k: takes per-sequence key lengths natively; without it the registry turns ``seqlens_k``
            into a key padding mask (and, with ``is_causal``, a per-sequence causal ``attn_mask``).
        available: returns why the backend can't run on this machine now, or None when it can.
    """

    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: Mapping[str, frozenset[torch.dtype]] = field(default_factory=dict)
    head_dims: Mapping[str, tuple[Callable[[int], bool], str]] = field(default_factory=dict)
    attn_mask: bool = True
    key_padding_mask: bool = True
    causal: bool = True
    dropout: bool = True
    need_weights: bool = True
    grouped_query: bool = True
    seqlens_k: bool = False
    available: Callable[[], str | None] | None = None
    device_available: Callable[[str], str | None] | None = None

    def unavailable_reason(self) -> str | None:
        """Why the backend can't run on this machine at all, or None."""
        return self.available() if self.available is not None else None

    def runs_on(self, device: str) -> bool:
        """Whether the backend can run on ``device`` (a device type) on this machine now."""
        if device not in self.devices or self.unavailable_reason() is not None:
            return False
        return self.device_available is None or self.device_available(device) is None

    def reason_against(self, call: AttentionCall) -> str | None:
        """Why this backend can't serve ``call``, or None when it can."""
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if call.device not in self.devices:
            return f"device '{call.device}' is not supported (supported: {sorted(self.devices)})"
        if self.device_available is not None:
            reason = self.device_available(call.device)
            if reason is not None:
                return reason
        dtypes = self.dtypes.get(call.device, FLOAT_DTYPES)
        if call.dtype not in dtypes:
            names = sorted(str(d).removeprefix("torch.") for d in dtypes)
            return (
                f"dtype {str(call.dtype).removeprefix('torch.')} on {call.device} is not supported ({names})"
            )
        if call.device in self.head_dims:
            accepts, described = self.head_dims[call.device]
            if not accepts(call.head_dim):
                return f"head dim {call.head_dim} on {call.device} is not supported ({described})"
        for wanted, supported, what in (
            (call.has_attn_mask, self.attn_mask, "attn_mask"),
            (call.has_key_padding_mask, self.key_padding_mask, "key_padding_mask"),
            (call.is_causal, self.causal, "is_causal"),
            (call.dropout, self.dropout, "dropout_p > 0"),
            (call.need_weights, self.need_weights, "need_weights=True"),
            (call.grouped, self.grouped_query, "grouped-query attention (Hkv < Hq)"),
        ):
            if wanted and not supported:
                return f"{what} is not supported"
        if call.has_seqlens_k and not self.seqlens_k:
            if not self.key_padding_mask:
                return "seqlens_k is not supported (as a mask it needs key_padding_mask)"
            if call.is_causal and not self.attn_mask:
                return "seqlens_k with is_causal is not supported (as a mask it needs attn_mask)"
        return None
