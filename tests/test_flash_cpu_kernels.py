"""The CPU flash kernels (torch.ops.flash_attn.fwd / bwd) against an explicit float64 softmax.

Every case runs with FLASH_ATTN_POISON=1 (outputs pre-filled with NaN), so an element the kernels never
write shows up as a NaN. float32 must match the float64 reference to 1e-5 (relative, ‖x − ref‖ / ‖ref‖)
in the output and in every gradient; float64 passes torch.autograd.gradcheck.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (B, Hq, Hkv, Nq, Nk, D): odd sizes, tile boundaries (query tiles of 64 rows, key tiles of 64/128),
# Nq != Nk both ways, grouped-query heads.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 4, 2, 7, 129, 64),
    (1, 2, 1, 129, 7, 7),
    (2, 3, 3, 129, 129, 33),
    (1, 8, 1, 65, 200, 80),
    (1, 2, 2, 70, 130, 256),
]
MASKS = ["none", "causal", "padding", "seqlens", "padding+seqlens+causal"]


@pytest.fixture(scope="module")
def flash_ops():
    from attention_backends import extension

    extension.load_extension()
    return torch.ops.flash_attn


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_POISON", "1")


def reference(q, k, v, key_padding_mask=None, seqlens_k=None, scale=None, is_causal=False):
    """(out, lse) in float64 with the op's masking rules; lse = +inf on rows with no visible key."""
    batch, heads_q, len_q, head_dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = heads_q // heads_kv
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k) * scale
    limit = torch.full((batch,), len_k) if seqlens_k is None else seqlens_k.long().clamp(0, len_k)
    i = torch.arange(len_q).view(1, len_q, 1)
    j = torch.arange(len_k).view(1, 1, len_k)
    limit = limit.view(batch, 1, 1)
    visible = j < limit
    if is_causal:
        visible = visible & (j <= i + limit - len_q)
    visible = (
        visible.expand(batch, len_q, len_k).view(batch, 1, len_q, len_k).expand(batch, heads_q, len_q, len_k)
    )
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.view(batch, 1, 1, len_k)
    # Masked scores get a huge finite negative value (not -inf) so that fully masked rows stay NaN-free in
    # autograd; their weights are then zeroed explicitly.
    safe = scores.masked_fill(~visible, -1e300)
    lse = torch.logsumexp(safe, dim=-1)
    weights = torch.exp(safe - lse.unsqueeze(-1)) * visible
    out = weights @ v
    any_visible = visible.any(dim=-1)
    lse = torch.where(any_visible, lse, torch.full_like(lse, float("inf")))
    return out, lse


def rel(x, ref):
    diff = (x.double() - ref.double()).norm().item()
    norm = ref.double().norm().item()
    return diff / norm if norm > 0 else diff


def make_inputs(shape, dtype, mask_kind, seed, non_contiguous=False):
    batch, heads_q, heads_kv, len_q, len_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, length):
        if non_contiguous:  # (B, N, H, D) storage seen as (B, H, N, D)
            return torch.randn(batch, length, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(batch, heads, length, head_dim, generator=gen).to(dtype)

    q, k, v = rand(heads_q, len_q), rand(heads_kv, len_k), rand(heads_kv, len_k)
    kpm = seqlens = None
    if "padding" in mask_kind:
        kpm = torch.rand(batch, len_k, generator=gen) < 0.3
        if batch > 1:
            kpm[1] = True  # a sequence whose keys are all padding
    if "seqlens" in mask_kind:
        seqlens = torch.randint(-2, len_k + 3, (batch,), generator=gen, dtype=torch.int32)
        seqlens[0] = max(1, len_k // 2)
    return q, k, v, kpm, seqlens, "causal" in mask_kind


def run(ops, q, k, v, kpm, seqlens, causal, dout, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = ops.fwd(q, k, v, kpm, seqlens, scale, causal)
    dq, dk, dv = ops.bwd(dout, q, k, v, out, lse, kpm, seqlens, scale, causal)
    return out, lse, dq, dk, dv


def reference_with_grads(q, k, v, kpm, seqlens, causal, dout, scale=None):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference(*leaves, kpm, seqlens, scale, causal)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), lse, grads


def check_case(ops, q, k, v, kpm, seqlens, causal, tol, scale=None, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=gen).to(q.dtype)
    out, lse, dq, dk, dv = run(ops, q, k, v, kpm, seqlens, causal, dout, scale)
    ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, kpm, seqlens, causal, dout, scale)

    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.is_contiguous()
    assert dq.shape == q.shape and dq.dtype == q.dtype
    assert dk.shape == k.shape and dk.dtype == k.dtype and dk.is_contiguous()
    assert dv.shape == v.shape and dv.dtype == v.dtype and dv.is_contiguous()
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == float("inf")).all()
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max().item() <= max(tol, 1e-6)
    errors = {"out": rel(out, ref_out)}
    errors.update({name: rel(g, r) for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads)})
    assert all(e <= tol for e in errors.values()), errors
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_float32_against_float64_reference(flash_ops, shape, mask_kind):
    q, k, v, kpm, seqlens, causal = make_inputs(shape, torch.float32, mask_kind, seed=sum(shape))
    check_case(flash_ops, q, k, v, kpm, seqlens, causal, tol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none", "padding+seqlens+causal"])
def test_non_contiguous_inputs(flash_ops, mask_kind):
    shape = (2, 4, 2, 67, 93, 40)
    q, k, v, kpm, seqlens, causal = make_inputs(shape, torch.float32, mask_kind, seed=3, non_contiguous=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    out_c, lse_c, *_ = check_case(flash_ops, q, k, v, kpm, seqlens, causal, tol=1e-5)
    # Strided dout and out in the backward give the same gradients.
    dout = torch.randn(shape[0], shape[3], shape[1], shape[5]).transpose(1, 2)
    scale = shape[5] ** -0.5
    grads_strided = flash_ops.bwd(
        dout, q, k, v, out_c.transpose(1, 2).contiguous().transpose(1, 2), lse_c, kpm, seqlens, scale, causal
    )
    grads_dense = flash_ops.bwd(
        dout.contiguous(),
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        out_c,
        lse_c,
        kpm,
        seqlens,
        scale,
        causal,
    )
    for a, b in zip(grads_strided, grads_dense):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_float64_matches_reference_closely(flash_ops, causal):
    shape = (2, 4, 2, 70, 131, 24)
    q, k, v, kpm, seqlens, _ = make_inputs(shape, torch.float64, "padding+seqlens", seed=5)
    check_case(flash_ops, q, k, v, kpm, seqlens, causal, tol=1e-12)


@pytest.mark.parametrize("mask_kind", ["none", "padding+seqlens+causal"])
def test_gradcheck_float64(flash_ops, mask_kind):
    q, k, v, kpm, seqlens, causal = make_inputs((2, 2, 1, 5, 6, 3), torch.float64, mask_kind, seed=7)
    if kpm is not None:
        kpm[1] = False
        kpm[1, 2] = True

    def fn(q, k, v):
        return torch.ops.flash_attn.fwd(q, k, v, kpm, seqlens, 0.7, causal)[0]

    inputs = [t.detach().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_bfloat16_against_float64_reference(flash_ops):
    shape = (2, 4, 2, 70, 130, 64)
    q, k, v, kpm, seqlens, causal = make_inputs(shape, torch.bfloat16, "padding+seqlens+causal", seed=9)
    check_case(flash_ops, q, k, v, kpm, seqlens, causal, tol=1e-2)


def test_fully_masked_rows_give_zero_output_and_gradients(flash_ops):
    # Batch 0: every key is padding. Batch 1: seqlens_k = 0. Batch 2: causal with Nq > L, so the first
    # Nq - L rows see no key.
    batch, heads, len_q, len_k, head_dim = 3, 2, 9, 5, 8
    q = torch.randn(batch, heads, len_q, head_dim)
    k = torch.randn(batch, heads, len_k, head_dim)
    v = torch.randn(batch, heads, len_k, head_dim)
    kpm = torch.zeros(batch, len_k, dtype=torch.bool)
    kpm[0] = True
    seqlens = torch.tensor([len_k, 0, 3], dtype=torch.int32)
    dout = torch.randn(q.shape)
    out, lse, dq, dk, dv = check_case(flash_ops, q, k, v, kpm, seqlens, True, tol=1e-5)
    masked_rows = torch.zeros(batch, heads, len_q, dtype=torch.bool)
    masked_rows[0] = masked_rows[1] = True
    masked_rows[2, :, : len_q - 3] = True
    assert (lse[masked_rows] == float("inf")).all() and torch.isfinite(lse[~masked_rows]).all()
    assert (out[masked_rows] == 0).all()
    _, _, dq, dk, dv = run(flash_ops, q, k, v, kpm, seqlens, True, dout)
    assert (dq[masked_rows] == 0).all()
    assert (dk[:2] == 0).all() and (dv[:2] == 0).all()
    assert (dk[2, :, 3:] == 0).all() and (dv[2, :, 3:] == 0).all()


@pytest.mark.parametrize(
    "dims", [(0, 2, 2, 5, 5), (2, 0, 0, 5, 5), (2, 0, 2, 5, 5), (2, 2, 1, 0, 5), (2, 2, 1, 5, 0)]
)
def test_empty_inputs(flash_ops, dims):
    batch, heads_q, heads_kv, len_q, len_k = dims
    q = torch.randn(batch, heads_q, len_q, 4)
    k = torch.randn(batch, heads_kv, len_k, 4)
    v = torch.randn(batch, heads_kv, len_k, 4)
    out, lse = flash_ops.fwd(q, k, v, None, None, 0.5, True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert (out == 0).all() and (lse == float("inf")).all()
    dq, dk, dv = flash_ops.bwd(torch.randn(q.shape), q, k, v, out, lse, None, None, 0.5, True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for t in (dq, dk, dv):
        assert (t == 0).all()


@pytest.mark.parametrize("scale", [0.0, 0.3, 2.5])
def test_explicit_scale(flash_ops, scale):
    q, k, v, kpm, seqlens, _ = make_inputs((1, 2, 1, 33, 47, 16), torch.float32, "padding", seed=11)
    check_case(flash_ops, q, k, v, kpm, seqlens, True, tol=1e-5, scale=scale)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("scheme", ["grouped", "split"])
def test_instruction_sets_and_backward_schemes(flash_ops, monkeypatch, isa, scheme):
    monkeypatch.setenv("FLASH_ATTN_CPU_ISA", isa)
    monkeypatch.setenv("FLASH_ATTN_CPU_BWD", scheme)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)):
        q, k, v, kpm, seqlens, causal = make_inputs(
            (2, 4, 2, 67, 150, 72), dtype, "padding+seqlens+causal", 13
        )
        check_case(flash_ops, q, k, v, kpm, seqlens, causal, tol=tol)


def test_sequence_lengths_longer_than_one_tile(flash_ops):
    # Several query and key tiles, causal skipping of whole key tiles, both Nq < Nk and Nq > Nk.
    for len_q, len_k in ((300, 520), (520, 300)):
        q, k, v, kpm, seqlens, _ = make_inputs((1, 2, 1, len_q, len_k, 64), torch.float32, "padding", 17)
        check_case(flash_ops, q, k, v, kpm, seqlens, True, tol=1e-5)


def test_dtype_and_head_dim_errors(flash_ops):
    q = torch.randn(1, 2, 4, 8, dtype=torch.float16)
    with pytest.raises(
        TypeError, match=r"flash_attn.fwd: expected q to be float32, float64 or bfloat16 on CPU"
    ):
        flash_ops.fwd(q, q, q, None, None, 1.0, False)
    with pytest.raises(
        TypeError, match=r"flash_attn.bwd: expected q to be float32, float64 or bfloat16 on CPU"
    ):
        flash_ops.bwd(q, q, q, q, q, torch.zeros(1, 2, 4), None, None, 1.0, False)
    q = torch.randn(1, 2, 4, 257)
    with pytest.raises(ValueError, match=r"flash_attn.fwd: .*head dim D .* got D = 257"):
        flash_ops.fwd(q, q, q, None, None, 1.0, False)


def test_opcheck(flash_ops):
    q, k, v, kpm, seqlens, causal = make_inputs(
        (2, 4, 2, 9, 11, 8), torch.float32, "padding+seqlens+causal", 19
    )
    torch.library.opcheck(flash_ops.fwd.default, (q, k, v, kpm, seqlens, 0.35, causal))
    out, lse = flash_ops.fwd(q, k, v, kpm, seqlens, 0.35, causal)
    dout = torch.randn(q.shape)
    torch.library.opcheck(flash_ops.bwd.default, (dout, q, k, v, out, lse, kpm, seqlens, 0.35, causal))
