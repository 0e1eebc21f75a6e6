"""Property-based differential tests: random shapes, masks and dtypes on every backend against float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from attention_backends import attention, reference_attention, relative_error

BACKENDS = ["naive", "sdpa", "flash"]
MASKS = ["none", "padding", "causal", "padding+causal", "bool", "float"]
PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    heads_kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    len_q = draw(st.integers(1, 70))
    len_k = draw(st.integers(1, 70))
    head_dim = draw(st.integers(1, 64))
    mask = draw(st.sampled_from(MASKS))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, heads_kv * group, heads_kv, len_q, len_k, head_dim, mask, seed


def make(case, dtype):
    batch, heads_q, heads_kv, len_q, len_k, head_dim, mask, seed = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, len_q, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, heads_kv, len_k, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, heads_kv, len_k, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    kwargs = {"is_causal": "causal" in mask}
    if "padding" in mask:
        kwargs["key_padding_mask"] = torch.rand(batch, len_k, generator=gen) < 0.4
    if mask == "bool":
        kwargs["attn_mask"] = torch.rand(len_q, len_k, generator=gen) < 0.4
    if mask == "float":
        bias = torch.randn(1, heads_q, len_q, len_k, generator=gen, dtype=torch.float64)
        kwargs["attn_mask"] = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.3, float("-inf")).to(
            dtype
        )
    return q, k, v, kwargs


def servable(backend: str, kwargs: dict) -> bool:
    return not (backend == "flash" and "attn_mask" in kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@PROPERTY_SETTINGS
@given(case=cases(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_forward_and_backward_match_float64(backend, case, dtype):
    q, k, v, kwargs = make(case, dtype)
    assume(servable(backend, kwargs))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out, _ = attention(*leaves, backend=backend, strict=True, **kwargs)
    ref, _ = reference_attention(*leaves, **kwargs)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) <= tol
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref, leaves, grad_out.double())
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all()
        if w.abs().max().item() == 0.0:
            # An exactly zero gradient (e.g. dq with one visible key): the error is rounding noise, bounded
            # relative to the incoming gradient instead.
            assert (g.double() - w).norm().item() <= tol * grad_out.double().norm().item()
        else:
            assert relative_error(g, w) <= tol + 1e-12 * w.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much]
)
@given(case=cases())
def test_bfloat16_within_twice_sdpa(backend, case):
    q, k, v, kwargs = make(case, torch.bfloat16)
    assume(servable(backend, kwargs))
    ref, _ = reference_attention(q, k, v, **kwargs)
    out, _ = attention(q, k, v, backend=backend, strict=True, **kwargs)
    sdpa_out, _ = attention(q, k, v, backend="sdpa", strict=True, **kwargs)
    # Both round the output to bfloat16; 1e-3 absorbs cases where that rounding alone dominates.
    assert relative_error(out, ref) <= 2 * relative_error(sdpa_out, ref) + 1e-3
