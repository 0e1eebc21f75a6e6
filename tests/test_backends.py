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
def test_forward_and_backward_match_float64_reference(backend, mask_kind, shape, seed):
    if not supports(backend, mask_kind):
        pytest.skip(f"{backend} takes no arbitrary attn_mask: the registry falls back (tested elsewhere)")
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


@pytest.mark.parametrize("with_padding", [False, True], ids=["lengths", "lengths+padding"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_seqlens_k_matches_per_sequence_slices(backend, causal, with_padding):
    """Sequence b sees keys 0 .. seqlens_k[b] - 1, causal aligned to its own length; 0 keys gives 0.

    The reference runs each sequence alone on its sliced keys; forward, gradients and (naive, flash)
    the returned weights. flash takes the lengths natively, naive and sdpa as masks.
    """
    if backend == "flash" and extension_error() is not None:
        pytest.skip("the flash extension is not built")
    gen = torch.Generator().manual_seed(7 + causal + 2 * with_padding)
    batch, heads_q, heads_kv, len_q, len_k, head_dim = 4, 4, 2, 5, 33, 16
    q, k, v = (
        torch.randn(batch, h, n, head_dim, generator=gen, dtype=torch.float64).requires_grad_(True)
        for h, n in ((heads_q, len_q), (heads_kv, len_k), (heads_kv, len_k))
    )
    lengths = torch.tensor([0, 3, 20, len_k], dtype=torch.int32)  # 3 < Nq: causal rows without keys
    pad = (torch.rand(batch, len_k, generator=gen) < 0.2) if with_padding else None
    weights_wanted = backend != "sdpa"
    out, weights = attention(
        q,
        k,
        v,
        key_padding_mask=pad,
        seqlens_k=lengths,
        is_causal=causal,
        need_weights=weights_wanted,
        backend=backend,
        strict=True,
    )
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for b in range(1, batch):
        n = int(lengths[b])
        sliced = [t.detach()[b : b + 1].clone().requires_grad_(True) for t in (q, k, v)]
        sliced[1], sliced[2] = (t[:, :, :n].detach().clone().requires_grad_(True) for t in sliced[1:])
        pad_b = None if pad is None else pad[b : b + 1, :n]
        ref, ref_weights = reference_attention(*sliced, key_padding_mask=pad_b, is_causal=causal)
        ref_grads = torch.autograd.grad(ref, sliced, grad_out[b : b + 1])
        assert relative_error(out[b : b + 1], ref) < 1e-10
        assert relative_error(grads[0][b : b + 1], ref_grads[0]) < 1e-10
        for got, want in zip(grads[1:], ref_grads[1:], strict=True):
            assert relative_error(got[b : b + 1, :, :n], want) < 1e-10
            assert torch.equal(got[b, :, n:], torch.zeros_like(got[b, :, n:]))  # keys past the length
        if weights_wanted:
            # flash recomputes the weights from its float32 log-sum-exp: float32 accuracy.
            assert relative_error(weights[b : b + 1, :, :, :n], ref_weights) < 1e-6
            assert torch.equal(weights[b, :, :, n:], torch.zeros_like(weights[b, :, :, n:]))


@pytest.mark.parametrize(
    ("lengths", "error", "match"),
    [
        (torch.tensor([1.0, 2.0]), TypeError, "seqlens_k to be int32 or int64"),
        (torch.tensor([1, 2, 3]), ValueError, r"seqlens_k of shape \(B,\)"),
        (torch.tensor([[1, 2]]), ValueError, r"seqlens_k of shape \(B,\)"),
        (torch.tensor([1, 2], device="meta"), ValueError, "seqlens_k on q's device"),
        ([1, 2], TypeError, "seqlens_k to be a Tensor"),
    ],
)
def test_seqlens_k_bad_inputs(lengths, error, match):
    q = torch.randn(2, 2, 3, 8)
    with pytest.raises(error, match=match):
        attention(q, q, q, seqlens_k=lengths)
