"""Attention backends behind one contract, chosen by name from a registry.

Backends: ``naive`` (explicit softmax, the reference), ``sdpa`` (torch's scaled_dot_product_attention)
and ``flash`` (our FlashAttention kernels, CPU and CUDA). ``flash`` falls back to ``sdpa``, and ``sdpa``
to ``naive``, for calls they can't serve.
"""

from .extension import ExtensionNotBuiltError, compile_cuda_extension, extension_error, load_extension
from .flash import flash_attention, weights_from_lse
from .masks import causal_allowed, merge_masks
from .naive import naive_attention
from .reference import reference_attention, relative_error
from .registry import (
    Backend,
    BackendUnsupportedError,
    attention,
    available_backends,
    get_backend,
    get_default_backend,
    is_strict,
    last_backend_used,
    register_backend,
    registered_backends,
    resolve_backend,
    set_default_backend,
    track_backends,
    unregister_backend,
    use_backend,
)
from .sdpa import sdpa_attention
from .support import AttentionCall, BackendSupport

register_backend("naive", support=BackendSupport(), fallback=None)(naive_attention)
register_backend("sdpa", support=BackendSupport(need_weights=False), fallback="naive")(sdpa_attention)

__all__ = [
    "AttentionCall",
    "Backend",
    "BackendSupport",
    "BackendUnsupportedError",
    "ExtensionNotBuiltError",
    "attention",
    "available_backends",
    "causal_allowed",
    "compile_cuda_extension",
    "extension_error",
    "flash_attention",
    "get_backend",
    "get_default_backend",
    "is_strict",
    "last_backend_used",
    "load_extension",
    "merge_masks",
    "naive_attention",
    "reference_attention",
    "register_backend",
    "registered_backends",
    "relative_error",
    "resolve_backend",
    "sdpa_attention",
    "set_default_backend",
    "track_backends",
    "unregister_backend",
    "use_backend",
    "weights_from_lse",
]
