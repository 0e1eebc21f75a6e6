"""Every backend against the float64 reference, forward and backward, through the registry (strict)."""

from __future__ import annotations

import pytest
import torch

from attention_backends import attention, extension_error, reference_attention, relative_error

BACKENDS = ["naive", "sdpa", "flash"]

# (B, Hq, Hkv, Nq, Nk, D): odd lengths incl. 1 and 129, Nq != Nk both ways, GQA and MQA.
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 4, 2, 7, 129, 16),
    (1, 2, 1, 129, 7, 32),
    (2, 3, 3, 33, 33, 64),
    (3, 4, 1, 17, 64, 24),
]
MASKS = ["none", "padding", "causal", "padding+causal", "bool", "float"]


def make_inputs(shape, dtype, mask_kind, seed):
    batch, heads_q, heads_kv, len_q, len_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_q, len_q, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(batch, heads_kv, len_k, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(batch, heads_kv, len_k, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    kwargs = {}
    if "padding" in mask_kind:
        pad = torch.rand(batch, len_k, generator=gen) < 0.3
        pad[0] = True  # a fully padded sequence: every row of it is fully masked
        kwargs["key_padding_mask"] = pad
    if "causal" in mask_kind:
        kwargs["is_causal"] = True
    if mask_kind == "bool":
        mask = torch.rand(len_q, len_k, generator=gen) < 0.3
        mask[0] = True  # a fully masked row
        kwargs["attn_mask"] = mask
    if mask_kind == "float":
        mask = torch.randn(batch, 1, len_q, len_k, generator=gen, dtype=torch.float64).to(dtype)
        mask[..., -1, :] = float("-inf")
        kwargs["attn_mask"] = mask
    return q, k, v, kwargs


def supports(backend: str, mask_kind: str) -> bool:
    if backend == "flash":
        if extension_error() is not None:
            pytest.fail(f"the flash extension must be built for the CPU tests: {extension_error()}")
        return mask_kind not in ("bool", "float")
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_float64_reference(backend, mask_kind, shape):
    if not supports(backend, mask_kind):
        pytest.skip(f"{backend} takes no arbitrary attn_mask: the registry falls back (tested elsewhere)")
    seed = hash((backend, mask_kind, shape)) % 2**31
    q, k, v, kwargs = make_inputs(shape, torch.float32, mask_kind, seed)
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = attention(q, k, v, backend=backend, strict=True, **kwargs)
    ref, _ = reference_attention(q, k, v, **kwargs)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) <= 1e-5

    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out.double())
    for name, g, w in zip("qkv", got, want, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has non-finite entries"
        assert relative_error(g, w) <= 1e-5, f"d{name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_and_finite_gradients(backend):
    q, k, v, kwargs = make_inputs((2, 2, 2, 5, 6, 16), torch.float32, "padding", seed=3)
    kwargs["key_padding_mask"][1] = False
    kwargs["key_padding_mask"][1, :3] = True
    kwargs["is_causal"] = True  # with Nq < Nk and keys 0..2 padded, row 0 of batch 1 sees nothing
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = attention(q, k, v, backend=backend, strict=True, **kwargs)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["none", "padding+causal"])
def test_bfloat16_error_within_twice_sdpa(backend, mask_kind):
    shape = (2, 4, 2, 65, 129, 32)
    q, k, v, kwargs = make_inputs(shape, torch.bfloat16, mask_kind, seed=11)
    ref, _ = reference_attention(q, k, v, **kwargs)
    out, _ = attention(q, k, v, backend=backend, strict=True, **kwargs)
    sdpa_out, _ = attention(q, k, v, backend="sdpa", strict=True, **kwargs)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) <= 2 * relative_error(sdpa_out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_weights(backend):
    q, k, v, kwargs = make_inputs((2, 4, 2, 9, 13, 16), torch.float32, "padding+causal", seed=5)
    ref, ref_weights = reference_attention(q, k, v, scale=0.3, **kwargs)
    out, weights = attention(q, k, v, backend=backend, scale=0.3, need_weights=True, **kwargs)
    assert relative_error(out, ref) <= 1e-5
    assert weights is not None and weights.shape == (2, 4, 9, 13)
    assert relative_error(weights, ref_weights) <= 1e-5


def test_float64_inputs_stay_float64_and_exact():
    q, k, v, kwargs = make_inputs((1, 2, 2, 7, 9, 8), torch.float64, "padding+causal", seed=9)
    for backend in BACKENDS:
        out, _ = attention(q, k, v, backend=backend, **kwargs)
        ref, _ = reference_attention(q, k, v, **kwargs)
        assert out.dtype == torch.float64
        assert relative_error(out, ref) <= 1e-12, backend


def test_non_contiguous_inputs():
    # (B, N, H, D) projections viewed as (B, H, N, D): the common layout inside a model.
    x = torch.randn(2, 11, 4, 16)
    q = x.transpose(1, 2)
    k = torch.randn(2, 13, 2, 16).transpose(1, 2)
    v = torch.randn(2, 13, 2, 16).transpose(1, 2)
    ref, _ = reference_attention(q, k, v, is_causal=True)
    for backend in BACKENDS:
        out, _ = attention(q, k, v, backend=backend, is_causal=True, strict=True)
        assert relative_error(out, ref) <= 1e-5, backend
