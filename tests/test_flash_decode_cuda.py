"""The split-KV forward ("flash-decoding") of the CUDA flash kernel against the float64 reference.

FLASH_ATTN_NUM_SPLITS forces the number of key splits (1 = the one-pass kernel; unset = the heuristic), so the
split path runs on small shapes too. Pass rules as in test_flash_cuda.py: the output's error ‖out − ref‖ / ‖ref‖
is at most 2x SDPA's on the same inputs; lse is the natural-log log-sum-exp of the scaled, masked scores, +inf
exactly on rows without a visible key, and within 1e-3 (relative to the largest |lse|) elsewhere. Every output
starts as NaN (FLASH_ATTN_POISON=1, which also poisons the split path's partial buffers). Skipped without a GPU
or without the compiled CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from einops import repeat
from torch import Tensor

import attention_backends as ab
from attention_backends import reference_attention, relative_error
from attention_backends.extension import has_kernels_for
from tests.test_flash_cuda import check_against_sdpa, make

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and has_kernels_for("cuda")),
        reason="needs a CUDA GPU and the compiled CUDA kernels",
    ),
]

SPLITS = [1, 2, 3, 7, 64, None]  # None: the heuristic
MASKS = ["none", "causal", "padding", "padding+causal"]
LSE_TOLERANCE = 1e-3


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    ab.load_extension()
    monkeypatch.setenv("FLASH_ATTN_POISON", "1")
    monkeypatch.delenv("FLASH_ATTN_NUM_SPLITS", raising=False)


def use_splits(monkeypatch, splits: int | None) -> None:
    """Force ``splits`` key splits for the following calls (None: let the heuristic choose)."""
    if splits is None:
        monkeypatch.delenv("FLASH_ATTN_NUM_SPLITS", raising=False)
    else:
        monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", str(splits))


def reference_lse(
    q: Tensor, k: Tensor, *, key_padding_mask: Tensor | None = None, is_causal: bool = False, scale: float
) -> Tensor:
    """Float64 log-sum-exp of the scaled, masked scores; +inf on rows with no visible key.

    Shape:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); key_padding_mask: (B, Nk) bool, True = ignore.
        returns (B, Hq, Nq) float64.
    """
    len_q, len_k = q.shape[2], k.shape[2]
    k64 = repeat(k.double(), "b h n d -> b (h g) n d", g=q.shape[1] // k.shape[1])
    scores = torch.einsum("bhid,bhjd->bhij", q.double(), k64) * scale
    visible = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
    if is_causal:
        i = torch.arange(len_q, device=q.device).view(len_q, 1)
        j = torch.arange(len_k, device=q.device).view(1, len_k)
        visible = j <= i + (len_k - len_q)
    visible = visible.view(1, 1, len_q, len_k)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask.view(q.shape[0], 1, 1, len_k)
    lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def assert_lse_close(lse: Tensor, ref: Tensor) -> None:
    """+inf exactly where the reference has no visible key; close to it everywhere else."""
    assert lse.dtype == torch.float32
    empty = torch.isposinf(ref)
    assert torch.equal(torch.isposinf(lse), empty), "rows without a visible key must have lse = +inf"
    if (~empty).any():
        err = (lse.double()[~empty] - ref[~empty]).abs().max().item()
        bound = LSE_TOLERANCE * (1.0 + ref[~empty].abs().max().item())
        assert err <= bound, (err, bound)  # a NaN error fails too


def check_forward(
    q: Tensor, k: Tensor, v: Tensor, kwargs: dict, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Run flash_attn.fwd; check out (2x SDPA's error) and lse against float64. Returns (out, lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    pad, causal = kwargs.get("key_padding_mask"), kwargs.get("is_causal", False)
    out, lse = torch.ops.flash_attn.fwd(q, k, v, pad, None, scale, causal)
    ref, _ = reference_attention(q, k, v, key_padding_mask=pad, is_causal=causal, scale=scale)
    with torch.no_grad():
        sdpa_out, _ = ab.attention(q, k, v, backend="sdpa", strict=True, scale=scale, **kwargs)
    assert torch.isfinite(out).all(), "out has NaN/inf (unwritten or poisoned elements)"
    err, sdpa_err = relative_error(out, ref), relative_error(sdpa_out, ref)
    assert err <= 2 * sdpa_err + 1e-5, (err, sdpa_err)
    assert_lse_close(lse, reference_lse(q, k, key_padding_mask=pad, is_causal=causal, scale=scale))
    return out, lse


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("len_k", [1, 7, 129, 1000, 4097])
@pytest.mark.parametrize("len_q", [1, 3, 16, 65])
@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s or '-auto'}")
def test_split_forward_matches_reference(monkeypatch, splits, len_q, len_k, mask_kind):
    use_splits(monkeypatch, splits)
    q, k, v, kwargs = make((2, 8, 2, len_q, len_k), 128, torch.bfloat16, mask_kind, seed=len_q * 7919 + len_k)
    check_forward(q, k, v, kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("splits", [1, 3, 64, None], ids=lambda s: f"splits{s or '-auto'}")
@pytest.mark.parametrize(
    ("len_q", "len_k", "mask_kind"), [(1, 1000, "padding+causal"), (16, 4097, "causal"), (3, 129, "none")]
)
def test_every_head_dim_and_dtype(monkeypatch, len_q, len_k, mask_kind, splits, head_dim, dtype):
    use_splits(monkeypatch, splits)
    q, k, v, kwargs = make((2, 8, 2, len_q, len_k), head_dim, dtype, mask_kind, seed=head_dim + len_k)
    check_forward(q, k, v, kwargs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("len_q", [1, 16])
@pytest.mark.parametrize("splits", [2, 7, None], ids=lambda s: f"splits{s or '-auto'}")
@pytest.mark.parametrize(("heads_q", "heads_kv"), [(8, 2), (8, 1), (8, 8)])
def test_grouped_query_heads(monkeypatch, heads_q, heads_kv, splits, len_q, causal):
    use_splits(monkeypatch, splits)
    shape = (3, heads_q, heads_kv, len_q, 2000)
    q, k, v, kwargs = make(shape, 64, torch.bfloat16, "causal" if causal else "none", seed=heads_kv)
    check_forward(q, k, v, kwargs)


@pytest.mark.parametrize("scale", [0.05, 1.0])
@pytest.mark.parametrize("splits", [1, 7], ids=lambda s: f"splits{s}")
def test_custom_scale(monkeypatch, splits, scale):
    use_splits(monkeypatch, splits)
    q, k, v, kwargs = make((1, 4, 2, 2, 777), 64, torch.float16, "padding", seed=3)
    check_forward(q, k, v, kwargs, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits", [3, 64], ids=lambda s: f"splits{s}")
def test_non_contiguous_inputs(monkeypatch, splits, dtype):
    use_splits(monkeypatch, splits)
    q, k, v, kwargs = make((2, 4, 2, 5, 1031), 64, dtype, "padding+causal", seed=11, non_contiguous=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    check_forward(q, k, v, kwargs)


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("len_q", [1, 5])
@pytest.mark.parametrize("splits", [1, 2, 7, 64, None], ids=lambda s: f"splits{s or '-auto'}")
def test_seqlens_k_with_empty_sequences(monkeypatch, splits, len_q, causal, with_padding):
    """Per-sequence key lengths, 0 included (every row of that sequence fully masked: out 0, lse +inf)."""
    use_splits(monkeypatch, splits)
    batch, heads_q, heads_kv, len_k, head_dim = 4, 8, 2, 1000, 128
    gen = torch.Generator(device="cuda").manual_seed(len_q + 10 * causal)
    q = torch.randn(batch, heads_q, len_q, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(batch, heads_kv, len_k, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(batch, heads_kv, len_k, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    lengths = torch.tensor([0, 1, 700, len_k], device="cuda", dtype=torch.int32)
    pad = (torch.rand(batch, len_k, device="cuda", generator=gen) < 0.3) if with_padding else None
    scale = head_dim**-0.5
    out, lse = torch.ops.flash_attn.fwd(q, k, v, pad, lengths, scale, causal)
    assert torch.isfinite(out).all()
    for b, length in enumerate(lengths.tolist()):
        sl = slice(b, b + 1)
        pad_b = None if pad is None else pad[sl, :length]
        keys = {"key_padding_mask": pad_b, "is_causal": causal, "scale": scale}
        ref, _ = reference_attention(q[sl], k[sl, :, :length], v[sl, :, :length], **keys)
        assert relative_error(out[sl], ref) < 2e-2
        assert_lse_close(lse[sl], reference_lse(q[sl], k[sl, :, :length], **keys))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isposinf(lse[0]).all()


@pytest.mark.parametrize("splits", [2, 64], ids=lambda s: f"splits{s}")
def test_no_keys_at_all(monkeypatch, splits):
    use_splits(monkeypatch, splits)
    q = torch.randn(2, 4, 3, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 0, 64, device="cuda", dtype=torch.float16)
    out, lse = torch.ops.flash_attn.fwd(q, k, k, None, None, 0.125, True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isposinf(lse).all()


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(("len_q", "len_k"), [(1, 4097), (16, 1000), (65, 129)])
def test_backward_through_split_lse_equals_one_pass(monkeypatch, len_q, len_k, mask_kind):
    """flash_attn.bwd fed the split path's lse gives the gradients it gives with the one-pass kernel's lse."""
    q, k, v, kwargs = make((2, 8, 2, len_q, len_k), 128, torch.bfloat16, mask_kind, seed=len_k)
    pad, causal, scale = kwargs.get("key_padding_mask"), kwargs["is_causal"], 128**-0.5
    dout = torch.randn_like(q)
    use_splits(monkeypatch, 1)
    out_1, lse_1 = torch.ops.flash_attn.fwd(q, k, v, pad, None, scale, causal)
    use_splits(monkeypatch, 7)
    out_7, lse_7 = torch.ops.flash_attn.fwd(q, k, v, pad, None, scale, causal)
    assert torch.equal(torch.isposinf(lse_1), torch.isposinf(lse_7))
    finite = torch.isfinite(lse_1)
    assert (lse_7[finite] - lse_1[finite]).abs().max().item() <= 1e-4 * (1 + lse_1[finite].abs().max().item())
    assert relative_error(out_7, out_1) < 1e-2
    grads_1 = torch.ops.flash_attn.bwd(dout, q, k, v, out_1, lse_1, pad, None, scale, causal)
    grads_7 = torch.ops.flash_attn.bwd(dout, q, k, v, out_1, lse_7, pad, None, scale, causal)
    for name, g7, g1 in zip("qkv", grads_7, grads_1, strict=True):
        assert torch.isfinite(g7).all(), f"d{name} has NaN/inf"
        assert relative_error(g7, g1) <= 2e-3, (name, relative_error(g7, g1))


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("splits", [3, None], ids=lambda s: f"splits{s or '-auto'}")
def test_gradients_through_the_split_path(monkeypatch, splits, mask_kind):
    """Autograd (forward on the split path, backward on its out and lse) within 2x SDPA's error."""
    use_splits(monkeypatch, splits)
    q, k, v, kwargs = make((2, 8, 2, 4, 3000), 64, torch.bfloat16, mask_kind, seed=5)
    check_against_sdpa(q, k, v, kwargs)


def split_kernel_ran(fn) -> bool:
    """Whether running ``fn`` launched the split-KV kernel (CUDA kernel names from the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    assert any("flash_fwd" in name for name in names), names  # the profiler saw our kernels at all
    return any("flash_fwd_split_kernel" in name for name in names)


def test_decoding_with_a_long_cache_takes_the_split_path_and_matches_sdpa():
    """The flash backend, Nq = 1 against 16k cached keys (GQA, padded cache), heuristic splits."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, heads_q, heads_kv, len_k, head_dim = 2, 8, 2, 16384, 128
    q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(batch, heads_kv, len_k, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(batch, heads_kv, len_k, head_dim, device="cuda", generator=gen).to(torch.bfloat16)
    pad = torch.zeros(batch, len_k, dtype=torch.bool, device="cuda")
    pad[1, 9000:] = True  # a shorter sequence in the batch
    kwargs = {"key_padding_mask": pad, "is_causal": True}

    result = {}

    def run():
        with torch.no_grad():
            result["out"], _ = ab.attention(q, k, v, backend="flash", strict=True, **kwargs)

    assert split_kernel_ran(run)
    with torch.no_grad():
        sdpa_out, _ = ab.attention(q, k, v, backend="sdpa", strict=True, **kwargs)
    ref, _ = reference_attention(q, k, v, **kwargs)
    out = result["out"]
    assert relative_error(out, ref) <= 2 * relative_error(sdpa_out, ref) + 1e-5
    assert relative_error(out, sdpa_out) < 1e-2


def test_heuristic_keeps_the_one_pass_kernel_where_it_fills_the_gpu(monkeypatch):
    q = torch.randn(2, 64, 1024, 64, device="cuda", dtype=torch.bfloat16)
    assert not split_kernel_ran(lambda: torch.ops.flash_attn.fwd(q, q, q, None, None, 0.125, True))
    small = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.bfloat16)  # Nk = 1: nothing to split
    assert not split_kernel_ran(
        lambda: torch.ops.flash_attn.fwd(small, small, small, None, None, 0.125, False)
    )
    use_splits(monkeypatch, 1)
    cache = torch.randn(1, 2, 8192, 64, device="cuda", dtype=torch.bfloat16)
    assert not split_kernel_ran(
        lambda: torch.ops.flash_attn.fwd(small, cache, cache, None, None, 0.125, False)
    )


def test_heuristic_counts_the_blocks_of_the_kernel_that_would_run(monkeypatch):
    """The wgmma forward (sm_90) takes 64-row blocks where its default's grid would be small, the mma.sync
    one runs 128-row blocks: Nq = 256 with ceil(0.2 * SMs) heads fills the GPU with the first (4 blocks per
    head, >= 80 % of the SMs) and not with the second (2 per head), so the one-pass kernel is kept on wgmma
    and the keys are split without it."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma forward runs on sm_90 devices")
    monkeypatch.delenv("FLASH_ATTN_NUM_SPLITS", raising=False)
    heads = -(-torch.cuda.get_device_properties(0).multi_processor_count // 5)
    q = torch.randn(1, heads, 256, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, heads, 4096, 128, device="cuda", dtype=torch.bfloat16)

    def forward():
        return torch.ops.flash_attn.fwd(q, kv, kv, None, None, 0.125, False)

    monkeypatch.setenv("FLASH_ATTN_FWD_WGMMA", "1")
    assert not split_kernel_ran(forward)
    monkeypatch.setenv("FLASH_ATTN_FWD_WGMMA", "0")
    assert split_kernel_ran(forward)


def test_opcheck_on_the_split_path(monkeypatch):
    use_splits(monkeypatch, 3)
    q = torch.randn(2, 4, 3, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 700, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 700, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pad = torch.rand(2, 700, device="cuda") < 0.2
    torch.library.opcheck(torch.ops.flash_attn.fwd.default, (q, k, v, pad, None, 0.125, True))


@pytest.mark.parametrize("value", ["0", "-2", "129", "two", "3.5"])
def test_bad_num_splits_raises_before_launch(monkeypatch, value):
    monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", value)
    q = torch.randn(1, 2, 1, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="FLASH_ATTN_NUM_SPLITS"):
        torch.ops.flash_attn.fwd(q, q, q, None, None, 0.125, False)
    torch.cuda.synchronize()
