"""The CUDA flash kernels (fp16, bf16) against the float64 reference; skipped without a GPU.

Pass rule: the kernel's error (‖out − ref‖ / ‖ref‖, forward and each gradient) is at most 2x the error of
PyTorch SDPA on the same inputs (SDPA fed through the sdpa backend, which applies the same masks).
Outputs are poisoned with NaN (FLASH_ATTN_POISON=1) so an unwritten element fails the test.
"""

from __future__ import annotations

import re

import pytest
import torch

import attention_backends as ab
from attention_backends import _build, reference_attention, relative_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 96, 128, 256]
# (B, Hq, Hkv, Nq, Nk)
SHAPES = [(1, 1, 1, 1, 1), (2, 4, 2, 7, 129), (1, 2, 1, 129, 7), (2, 3, 3, 200, 200), (1, 8, 1, 65, 300)]
MASKS = ["none", "causal", "padding", "padding+causal"]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    ab.load_extension()
    monkeypatch.setenv("FLASH_ATTN_POISON", "1")


def make(shape, head_dim, dtype, mask_kind, seed, non_contiguous=False):
    batch, heads_q, heads_kv, len_q, len_k = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rand(heads, length):
        if non_contiguous:  # (B, N, H, D) storage viewed as (B, H, N, D)
            return (
                torch.randn(batch, length, heads, head_dim, device="cuda", generator=gen)
                .transpose(1, 2)
                .to(dtype)
            )
        return torch.randn(batch, heads, length, head_dim, device="cuda", generator=gen).to(dtype)

    q, k, v = rand(heads_q, len_q), rand(heads_kv, len_k), rand(heads_kv, len_k)
    kwargs = {"is_causal": "causal" in mask_kind}
    if "padding" in mask_kind:
        pad = torch.rand(batch, len_k, device="cuda", generator=gen) < 0.25
        pad[0, : len_k // 2] = True
        if batch > 1:
            pad[1] = True  # a fully padded sequence
        kwargs["key_padding_mask"] = pad
    return q, k, v, kwargs


def errors(backend, q, k, v, kwargs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = ab.attention(*leaves, backend=backend, strict=True, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out, grads


def reference_grads(q, k, v, kwargs, grad_out):
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = reference_attention(*leaves, **kwargs)
    return ref, torch.autograd.grad(ref, leaves, grad_out.double())


def check_against_sdpa(q, k, v, kwargs, sdpa_grad_kwargs=None):
    """Our output and gradients within 2x SDPA's error against the float64 reference.

    sdpa_grad_kwargs: the arguments of the SDPA run whose gradient errors bound ours (default: kwargs).
    """
    grad_out = torch.randn_like(q)
    ref, ref_grads = reference_grads(q, k, v, kwargs, grad_out)
    out, grads = errors("flash", q, k, v, kwargs, grad_out)
    sdpa_out, sdpa_grads = errors("sdpa", q, k, v, kwargs, grad_out)
    sdpa_grad_refs = ref_grads
    if sdpa_grad_kwargs is not None:
        _, sdpa_grad_refs = reference_grads(q, k, v, sdpa_grad_kwargs, grad_out)
        _, sdpa_grads = errors("sdpa", q, k, v, sdpa_grad_kwargs, grad_out)
    assert torch.isfinite(out).all(), "forward has NaN/inf (unwritten or poisoned elements)"
    # 1e-5 of slack: with one visible key dq is 0 in exact arithmetic and both errors are rounding noise.
    assert relative_error(out, ref) <= 2 * relative_error(sdpa_out, ref) + 1e-5, (
        relative_error(out, ref),
        relative_error(sdpa_out, ref),
    )
    for name, g, r, s, sr in zip("qkv", grads, ref_grads, sdpa_grads, sdpa_grad_refs, strict=True):
        assert torch.isfinite(g).all(), f"d{name} has NaN/inf"
        assert relative_error(g, r) <= 2 * relative_error(s, sr) + 1e-5, (
            name,
            relative_error(g, r),
            relative_error(s, sr),
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_within_twice_sdpa(shape, mask_kind, head_dim, dtype, seed):
    q, k, v, kwargs = make(shape, head_dim, dtype, mask_kind, seed=seed)
    check_against_sdpa(q, k, v, kwargs)


def set_switch(monkeypatch, name: str, value: str | None) -> None:
    """Sets the environment switch `name` to `value`, or unsets it for None (the default)."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def needs_hopper():
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma forward runs on sm_90 devices")


# The one-pass forward kernels of head dims 64 and 128 on an sm_90 device: mma.sync (FLASH_ATTN_FWD_WGMMA=0),
# wgmma with the head dim's default tiles, its small-grid tiles (FLASH_ATTN_FWD_SM90_SMALL_GRID=1; the same
# kernel at D = 64) and its long-key tiles (FLASH_ATTN_FWD_SM90_LONG_KEYS=1; the same kernel at D = 128), with
# partial tiles and several key tiles.
ONE_PASS_KERNELS = {
    "mma.sync": {"FLASH_ATTN_FWD_WGMMA": "0"},
    "wgmma": {
        "FLASH_ATTN_FWD_WGMMA": "1",
        "FLASH_ATTN_FWD_SM90_SMALL_GRID": "0",
        "FLASH_ATTN_FWD_SM90_LONG_KEYS": "0",
    },
    "wgmma-small-grid": {"FLASH_ATTN_FWD_WGMMA": "1", "FLASH_ATTN_FWD_SM90_SMALL_GRID": "1"},
    "wgmma-long-keys": {
        "FLASH_ATTN_FWD_WGMMA": "1",
        "FLASH_ATTN_FWD_SM90_SMALL_GRID": "0",
        "FLASH_ATTN_FWD_SM90_LONG_KEYS": "1",
    },
}
WGMMA_KERNELS = [name for name in ONE_PASS_KERNELS if name.startswith("wgmma")]


def use_kernel(monkeypatch, kernel: str) -> None:
    for name, value in ONE_PASS_KERNELS[kernel].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", "1")  # the one-pass kernels, not the split-KV path


@pytest.mark.parametrize("kernel", list(ONE_PASS_KERNELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(
    "shape", [*SHAPES, (2, 2, 1, 257, 385), (1, 2, 2, 300, 129)], ids=lambda s: "x".join(map(str, s))
)
def test_one_pass_forward_kernels_on_hopper(monkeypatch, kernel, shape, mask_kind, head_dim, dtype, seed):
    needs_hopper()
    use_kernel(monkeypatch, kernel)
    q, k, v, kwargs = make(shape, head_dim, dtype, mask_kind, seed=seed)
    check_against_sdpa(q, k, v, kwargs)


# Grids of many more blocks' worth of query tiles than the GPU has SMs (a persistent forward walks several
# tiles per block, and carries its barriers and copies from one to the next): an odd number of query tiles
# per head, grouped heads, and (second shape) causal rows that see no key, so that tiles without work fall
# between tiles with work.
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize(
    "shape", [(3, 48, 16, 520, 777), (2, 70, 70, 777, 300)], ids=lambda s: "x".join(map(str, s))
)
def test_hopper_forward_many_tiles_per_sm(monkeypatch, shape, mask_kind, head_dim):
    needs_hopper()
    use_kernel(monkeypatch, "wgmma")
    q, k, v, kwargs = make(shape, head_dim, torch.bfloat16, mask_kind, seed=13)
    check_against_sdpa(q, k, v, kwargs)


# Layouts of K and V through the Hopper forward: strided views (bulk tensor copies address them), heads
# or batches broadcast with stride 0 and odd strides of extent-1 dims (copied with cp.async instead).
LAYOUTS = ["bnhd", "heads_broadcast", "batch_broadcast", "one_head_odd_stride"]


def kv_in_layout(layout: str, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype):
    def rand(*size):
        return torch.randn(*size, device="cuda").to(dtype)

    if layout == "bnhd":
        return [rand(batch, length, heads, head_dim).transpose(1, 2) for _ in "kv"]
    if layout == "heads_broadcast":
        return [rand(batch, 1, length, head_dim).expand(batch, heads, length, head_dim) for _ in "kv"]
    if layout == "batch_broadcast":
        return [rand(1, heads, length, head_dim).expand(batch, heads, length, head_dim) for _ in "kv"]
    # one head whose (unused) head stride is 3 elements
    size, stride = (batch, 1, length, head_dim), (length * head_dim, 3, head_dim, 1)
    return [rand(batch * length * head_dim).as_strided(size, stride) for _ in "kv"]


@pytest.mark.parametrize("kernel", WGMMA_KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask_kind", ["none", "padding+causal"])
def test_hopper_forward_layouts(monkeypatch, kernel, layout, head_dim, mask_kind):
    needs_hopper()
    use_kernel(monkeypatch, kernel)
    heads = 1 if layout == "one_head_odd_stride" else 3
    batch, len_q, len_k = 2, 150, 333
    k, v = kv_in_layout(layout, batch, heads, len_k, head_dim, torch.bfloat16)
    q, _, _, kwargs = make((batch, heads, heads, len_q, len_k), head_dim, torch.bfloat16, mask_kind, seed=7)
    check_against_sdpa(q, k, v, kwargs)


# Custom scales through the Hopper forward (candidates 10 and up fold the scale into the exponential and hands a
# scale that is not positive to the mma.sync kernel). torch's CUDA SDPA backward returns NaN gradients for
# a scale <= 0 with a mask (torch 2.11, H200, 2026-11-29; its outputs are fine): there our gradients are
# held to twice SDPA's gradient error at scale 0.3 on the same inputs.
@pytest.mark.parametrize("kernel", WGMMA_KERNELS)
@pytest.mark.parametrize("scale", [0.3, 0.0, -0.2])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_forward_scales(monkeypatch, kernel, scale, head_dim):
    needs_hopper()
    use_kernel(monkeypatch, kernel)
    q, k, v, kwargs = make((2, 3, 3, 150, 333), head_dim, torch.bfloat16, "padding+causal", seed=11)
    grad_baseline = None if scale > 0 else {**kwargs, "scale": 0.3}
    check_against_sdpa(q, k, v, {**kwargs, "scale": scale}, sdpa_grad_kwargs=grad_baseline)


# Both backward kernels of head dims 64 and 128 on an sm_90 device, the Hopper (wgmma) one
# (FLASH_ATTN_BWD_WGMMA=1; the default) and the mma.sync one (=0): gradients within 2x SDPA's error, with
# partial key blocks (128 keys) and query tiles (64 at D = 128, 128 at D = 64), several of each.
HOPPER_BWD_SHAPES = [*SHAPES, (2, 2, 1, 257, 385), (1, 2, 2, 300, 129)]
BACKWARD_KERNELS = {"wgmma": "1", "mma.sync": "0"}


@pytest.mark.parametrize("kernel", list(BACKWARD_KERNELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("shape", HOPPER_BWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hopper_backward(monkeypatch, shape, mask_kind, head_dim, dtype, kernel, seed):
    needs_hopper()
    monkeypatch.setenv("FLASH_ATTN_BWD_WGMMA", BACKWARD_KERNELS[kernel])
    q, k, v, kwargs = make(shape, head_dim, dtype, mask_kind, seed=seed)
    check_against_sdpa(q, k, v, kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_backward_layouts(monkeypatch, layout, head_dim):
    needs_hopper()
    monkeypatch.setenv("FLASH_ATTN_BWD_WGMMA", "1")
    heads = 1 if layout == "one_head_odd_stride" else 3
    k, v = kv_in_layout(layout, 2, heads, 333, head_dim, torch.bfloat16)
    _, _, _, kwargs = make((2, heads, heads, 150, 333), head_dim, torch.bfloat16, "padding+causal", seed=5)
    # Q (and so dO, drawn like it) in the layout too: the bulk tensor copies of Q and dO take its strides.
    q = kv_in_layout(layout, 2, heads, 150, head_dim, torch.bfloat16)[0]
    check_against_sdpa(q, k, v, kwargs)


# Per-sequence key lengths (a full one, a partial one across key blocks, an empty one) through the Hopper
# backward, against the mma.sync backward on the same forward.
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_backward_with_seqlens_k_matches_the_mma_sync_backward(monkeypatch, causal, head_dim):
    needs_hopper()
    gen = torch.Generator(device="cuda").manual_seed(3)

    def rand(*size):
        return torch.randn(*size, generator=gen, device="cuda").to(torch.bfloat16)

    q, dout = rand(3, 4, 70, head_dim), rand(3, 4, 70, head_dim)
    k, v = rand(3, 2, 300, head_dim), rand(3, 2, 300, head_dim)
    lengths = torch.tensor([300, 129, 0], device="cuda", dtype=torch.int32)
    scale = head_dim**-0.5
    out, lse = torch.ops.flash_attn.fwd(q, k, v, None, lengths, scale, causal)
    grads = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FLASH_ATTN_BWD_WGMMA", flag)
        grads[flag] = torch.ops.flash_attn.bwd(dout, q, k, v, out, lse, None, lengths, scale, causal)
    for name, ours, mma in zip("qkv", grads["1"], grads["0"], strict=True):
        assert torch.isfinite(ours).all(), f"d{name} has NaN/inf"
        assert relative_error(ours, mma) < 1e-2, (name, relative_error(ours, mma))


@pytest.mark.parametrize(
    ("flag", "head_dim", "expected"),
    [
        (None, 128, True),
        (None, 64, True),
        ("0", 128, False),
        ("0", 64, False),
        ("1", 128, True),
        ("1", 64, True),
    ],
)
def test_hopper_backward_runs_where_switched_on(monkeypatch, flag, head_dim, expected):
    needs_hopper()
    set_switch(monkeypatch, "FLASH_ATTN_BWD_WGMMA", flag)
    q = torch.randn(1, 2, 200, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = ab.attention(q, q, q, backend="flash", strict=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out.float().sum().backward()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "bwd" in e.name]
    assert names, "no backward kernel was recorded"
    assert any("flash_bwd_sm90_kernel" in n for n in names) == expected, names


def test_bad_backward_switch_raises_before_launch(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_BWD_WGMMA", "yes")
    q = torch.randn(1, 2, 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = ab.attention(q, q, q, backend="flash", strict=True)
    with pytest.raises(ValueError, match="FLASH_ATTN_BWD_WGMMA"):
        out.float().sum().backward()
    torch.cuda.synchronize()


def sm90_default_variant(head_dim: int) -> int:
    traits = (_build.CSRC / "cuda" / "kernel_traits.h").read_text()
    return int(re.search(rf"#define FLASH_FWD_SM90_VARIANT_HDIM{head_dim} (\d+)", traits).group(1))


def forward_kernel_names(q, k, v) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ab.attention(q, k, v, backend="flash", strict=True)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "flash_fwd_sm90_kernel" in e.name]


def sm90_block_rows(q, k, v) -> set[int]:
    """Query rows per block (FwdSm90Traits' 2nd argument) of the Hopper forward kernels that ran."""
    names = forward_kernel_names(q, k, v)
    assert names, "the Hopper forward did not run"
    return {int(re.search(r"FwdSm90Traits<([^>]*)>", n).group(1).split(",")[1]) for n in names}


# A grid of the default tiles' blocks that would cover at most half of the SMs takes the small-grid tiles
# (64-row blocks, twice as many); FLASH_ATTN_FWD_SM90_SMALL_GRID=0 / 1 forces either.
@pytest.mark.parametrize("head_dim", [64, 128])
def test_small_grids_take_the_64_row_tiles(monkeypatch, head_dim):
    needs_hopper()
    monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", "1")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    small = torch.randn(1, 2, 128, head_dim, device="cuda", dtype=torch.bfloat16)  # 1-2 blocks per head
    large = torch.randn(1, sms // 2 + 1, 128, head_dim, device="cuda", dtype=torch.bfloat16)  # > half the SMs
    monkeypatch.setenv("FLASH_ATTN_FWD_SM90_SMALL_GRID", "0")
    default_rows = sm90_block_rows(small, small, small)
    monkeypatch.setenv("FLASH_ATTN_FWD_SM90_SMALL_GRID", "1")
    assert sm90_block_rows(large, large, large) == {64}
    monkeypatch.delenv("FLASH_ATTN_FWD_SM90_SMALL_GRID")
    assert sm90_block_rows(small, small, small) == {64}
    assert sm90_block_rows(large, large, large) == default_rows


# Long key sequences (LONG_KEYS_MIN_LEN keys and up: kLongKeysMinLen in flash_fwd_api.cpp) take the long-key
# tiles (192-row blocks at D = 64, the default tiles at D = 128) where their blocks still fill the SMs;
# FLASH_ATTN_FWD_SM90_LONG_KEYS=0 / 1 forces either.
LONG_KEYS_MIN_LEN = 6144


@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_keys_take_the_long_key_tiles(monkeypatch, head_dim):
    needs_hopper()
    monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", "1")
    monkeypatch.delenv("FLASH_ATTN_FWD_SM90_SMALL_GRID", raising=False)
    monkeypatch.delenv("FLASH_ATTN_FWD_SM90_LONG_KEYS", raising=False)
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def rand(heads, length):
        return torch.randn(1, heads, length, head_dim, device="cuda", dtype=torch.bfloat16)

    q, q_fewer = rand(sms, 192), rand(sms - 1, 192)  # one 192-row block per head
    long_kv = [rand(sms, LONG_KEYS_MIN_LEN) for _ in "kv"]
    short_kv = [rand(sms, LONG_KEYS_MIN_LEN - 1) for _ in "kv"]
    default_rows = sm90_block_rows(q, *short_kv)
    long_rows = {192} if head_dim == 64 else default_rows
    assert default_rows == ({64} if head_dim == 64 else {128})
    assert sm90_block_rows(q, *long_kv) == long_rows
    assert sm90_block_rows(q_fewer, *[x[:, 1:] for x in long_kv]) == default_rows  # fewer blocks than SMs
    monkeypatch.setenv("FLASH_ATTN_FWD_SM90_LONG_KEYS", "0")
    assert sm90_block_rows(q, *long_kv) == default_rows
    monkeypatch.setenv("FLASH_ATTN_FWD_SM90_LONG_KEYS", "1")
    assert sm90_block_rows(q, *short_kv) == long_rows


# Candidates 8 and up copy K and V by TMA (FwdSm90Traits' 7th argument, kTma) where the driver maps the
# tensors, and fall back to the same tiles with cp.async where it cannot (a head broadcast with stride 0).
@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_forward_uses_tma_where_the_tensors_allow(monkeypatch, head_dim):
    needs_hopper()
    monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", "1")
    tma_default = sm90_default_variant(head_dim) >= 8

    def tma_flags(names: list[str]) -> set[str]:
        assert names, "the Hopper forward did not run"
        return {re.search(r"FwdSm90Traits<([^>]*)>", n).group(1).split(",")[6].strip() for n in names}

    q = torch.randn(2, 4, 300, head_dim, device="cuda", dtype=torch.bfloat16)
    assert tma_flags(forward_kernel_names(q, q, q)) == {"true" if tma_default else "false"}
    kv = torch.randn(2, 1, 300, head_dim, device="cuda", dtype=torch.bfloat16).expand(2, 4, 300, head_dim)
    assert tma_flags(forward_kernel_names(q, kv, kv)) == {"false"}


@pytest.mark.parametrize(
    ("wgmma", "head_dim", "expected"),
    [(None, 128, True), ("0", 128, False), (None, 64, True), ("0", 64, False), ("1", 64, True)],
)
def test_wgmma_forward_is_the_kernel_that_runs_on_hopper(monkeypatch, wgmma, head_dim, expected):
    needs_hopper()
    set_switch(monkeypatch, "FLASH_ATTN_FWD_WGMMA", wgmma)
    monkeypatch.setenv("FLASH_ATTN_NUM_SPLITS", "1")
    q = torch.randn(2, 4, 512, head_dim, device="cuda", dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ab.attention(q, q, q, backend="flash", strict=True)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "flash_fwd" in e.name]
    assert names, "no forward kernel was recorded"
    assert any("sm90" in n for n in names) == expected, names


@pytest.mark.parametrize("variable", ["FLASH_ATTN_FWD_WGMMA", "FLASH_ATTN_FWD_SM90_SMALL_GRID"])
def test_bad_wgmma_switch_raises_before_launch(monkeypatch, variable):
    monkeypatch.setenv(variable, "yes")
    q = torch.randn(1, 2, 16, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=variable):
        torch.ops.flash_attn.fwd(q, q, q, None, None, 0.125, False)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [8, 16, 48, 80, 200])
def test_other_head_dims_are_padded_to_a_kernel(head_dim, dtype):
    q, k, v, kwargs = make((2, 4, 2, 33, 70), head_dim, dtype, "padding+causal", seed=head_dim)
    check_against_sdpa(q, k, v, kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    q, k, v, kwargs = make((2, 4, 2, 77, 131), 64, dtype, "padding+causal", seed=1, non_contiguous=True)
    assert not q.is_contiguous()
    check_against_sdpa(q, k, v, kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_sequence(dtype):
    q, k, v, kwargs = make((1, 2, 2, 1000, 2049), 128, dtype, "causal", seed=2)
    check_against_sdpa(q, k, v, kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_seqlens_k_masks_and_aligns_causal(causal):
    batch, heads, len_q, len_k, head_dim = 3, 2, 5, 40, 64
    q = torch.randn(batch, heads, len_q, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads, len_k, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lengths = torch.tensor([40, 17, 3], device="cuda", dtype=torch.int32)
    out, _ = torch.ops.flash_attn.fwd(q, k, v, None, lengths, head_dim**-0.5, causal)
    for b, length in enumerate(lengths.tolist()):
        ref, _ = reference_attention(
            q[b : b + 1, :, :, :], k[b : b + 1, :, :length], v[b : b + 1, :, :length], is_causal=causal
        )
        assert relative_error(out[b : b + 1], ref) < 2e-2


def test_fully_masked_rows_are_zero_with_finite_gradients():
    q = torch.randn(2, 2, 9, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(2, 2, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(2, 2, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    pad = torch.zeros(2, 4, dtype=torch.bool, device="cuda")
    pad[1] = True
    out, _ = ab.attention(q, k, v, backend="flash", strict=True, is_causal=True, key_padding_mask=pad)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(out[0, :, :5], torch.zeros_like(out[0, :, :5]))  # Nq > Nk: rows 0..4 see no key
    out.float().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_opcheck_cuda():
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 47, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 47, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pad = torch.rand(2, 47, device="cuda") < 0.2
    torch.library.opcheck(torch.ops.flash_attn.fwd.default, (q, k, v, pad, None, 0.125, True))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda q, k, v: (q.float(), k.float(), v.float()), TypeError, "float16 or bfloat16"),
        (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), ValueError, "head dim"),
        (lambda q, k, v: (q, k.cpu(), v), ValueError, "device"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of the key/value heads"),
        (lambda q, k, v: (q.transpose(2, 3), k, v), ValueError, "contiguous last dim|head dim|share"),
    ],
)
def test_bad_inputs_raise_before_launch(change, error, match):
    q = torch.randn(2, 4, 16, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 16, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(2, 2, 16, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(error, match=match):
        torch.ops.flash_attn.fwd(*change(q, k, v), None, None, 0.125, False)
    torch.cuda.synchronize()


def test_float32_on_cuda_falls_back_to_sdpa():
    q = torch.randn(1, 2, 8, 64, device="cuda")
    with ab.track_backends() as used:
        ab.attention(q, q, q, backend="flash")
    assert used == {"sdpa": 1}
