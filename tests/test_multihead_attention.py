"""MultiHeadAttention against torch.nn.MultiheadAttention, on every backend usable on the CPU."""

from __future__ import annotations

import pytest
import torch
from einops import repeat

import attention_backends
from attention_backends import available_backends, use_backend
from transformer import MultiHeadAttention

pytestmark = [
    pytest.mark.usefixtures("restore_default_backend"),
    pytest.mark.filterwarnings("ignore:attention backend .* falling back"),
    pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask"),
]

BACKENDS = available_backends("cpu")
E, H, L, S, N = 16, 4, 5, 7, 3
ATOL = 1e-5


def make_pair(seed: int = 0, **kwargs) -> tuple[torch.nn.MultiheadAttention, MultiHeadAttention]:
    """A torch module with random biases, and ours loaded from its state dict."""
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.normal_()
    ours = MultiHeadAttention(E, H, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def inputs(batch_first: bool, kdim: int = E, vdim: int = E, tgt_len: int = L, src_len: int = S):
    torch.manual_seed(1)
    shape = (lambda n: (N, n)) if batch_first else (lambda n: (n, N))
    return (
        torch.randn(*shape(tgt_len), E),
        torch.randn(*shape(src_len), kdim),
        torch.randn(*shape(src_len), vdim),
    )


def assert_close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def bool_padding() -> torch.Tensor:
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[0, -2:] = True
    mask[2, -1] = True
    return mask  # (N, S), no row fully masked


def bool_attn_mask(*lead: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(*lead, L, S, generator=gen) < 0.3
    mask[..., 0] = False  # every query keeps one key
    return mask


def as_float(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


# --------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bias": False}, {"kdim": 6, "vdim": 10}, {"batch_first": True}],
    ids=["packed", "no-bias", "kdim-vdim", "batch-first"],
)
def test_state_dict_round_trips_both_ways(kwargs):
    ref = torch.nn.MultiheadAttention(E, H, **kwargs)
    ours = MultiHeadAttention(E, H, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert a.shape == b.shape, name
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.MultiheadAttention(E, H, **kwargs)
    back.load_state_dict(ours.state_dict())
    for name, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[name], value)
    assert isinstance(ours.out_proj, torch.nn.Linear)


def test_parameter_names_follow_torch():
    packed = MultiHeadAttention(E, H)
    assert packed.in_proj_weight.shape == (3 * E, E) and packed.q_proj_weight is None
    separate = MultiHeadAttention(E, H, kdim=6, vdim=10)
    assert separate.in_proj_weight is None
    assert separate.k_proj_weight.shape == (E, 6) and separate.v_proj_weight.shape == (E, 10)
    gqa = MultiHeadAttention(E, H, num_kv_heads=2)
    assert gqa.in_proj_weight is None
    assert gqa.k_proj_weight.shape == (2 * E // H, E)
    assert gqa.in_proj_bias.shape == (E + 2 * 2 * E // H,)


def test_unsupported_options_raise_not_implemented():
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        MultiHeadAttention(E, H, add_bias_kv=True)
    with pytest.raises(NotImplementedError, match="add_zero_attn"):
        MultiHeadAttention(E, H, add_zero_attn=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embed_dim": 10, "num_heads": 4}, "divisible"),
        ({"embed_dim": 16, "num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"embed_dim": 16, "num_heads": 0}, "positive"),
        ({"embed_dim": 16, "num_heads": 4, "dropout": 1.5}, "dropout"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_bad_inputs_raise_value_error():
    mha = MultiHeadAttention(E, H, batch_first=True)
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match="embed_dim"):
        mha(torch.randn(N, L, E + 1), x, x)
    with pytest.raises(ValueError, match="attn_mask"):
        mha(x, x, x, attn_mask=torch.zeros(L + 1, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(x, x, x, key_padding_mask=torch.zeros(N, L + 1, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_self_and_cross_attention_match_torch(backend, batch_first, average):
    ref, ours = make_pair(batch_first=batch_first)
    ours.backend = backend
    q, k, v = inputs(batch_first)
    for args in ((q, q, q), (q, k, v)):
        expected, expected_w = ref(*args, average_attn_weights=average)
        got, got_w = ours(*args, average_attn_weights=average)
        assert_close(got, expected)
        assert_close(got_w, expected_w)
        got, got_w = ours(*args, need_weights=False)
        assert got_w is None
        assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kdim_vdim_match_torch(backend):
    ref, ours = make_pair(kdim=6, vdim=10, batch_first=True)
    ours.backend = backend
    q, k, v = inputs(True, kdim=6, vdim=10)
    expected, expected_w = ref(q, k, v, average_attn_weights=False)
    got, got_w = ours(q, k, v, average_attn_weights=False)
    assert_close(got, expected)
    assert_close(got_w, expected_w)


MASK_CASES = {
    "kpm-bool": lambda: {"key_padding_mask": bool_padding()},
    "kpm-float": lambda: {"key_padding_mask": as_float(bool_padding())},
    "kpm-float-soft": lambda: {"key_padding_mask": torch.randn(N, S)},
    "2d-bool": lambda: {"attn_mask": bool_attn_mask()},
    "2d-float": lambda: {"attn_mask": torch.randn(L, S)},
    "3d-bool": lambda: {"attn_mask": bool_attn_mask(N * H)},
    "3d-float": lambda: {"attn_mask": torch.randn(N * H, L, S)},
    "kpm-bool+2d-bool": lambda: {"key_padding_mask": bool_padding(), "attn_mask": bool_attn_mask()},
    "kpm-bool+3d-float": lambda: {"key_padding_mask": bool_padding(), "attn_mask": torch.randn(N * H, L, S)},
    "kpm-float+2d-float": lambda: {"key_padding_mask": torch.randn(N, S), "attn_mask": torch.randn(L, S)},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_masks_match_torch(backend, case, batch_first):
    ref, ours = make_pair(batch_first=batch_first)
    ours.backend = backend
    q, k, v = inputs(batch_first)
    masks = MASK_CASES[case]()
    expected, expected_w = ref(q, k, v, average_attn_weights=False, **masks)
    got, got_w = ours(q, k, v, average_attn_weights=False, **masks)
    assert_close(got, expected)
    assert_close(got_w, expected_w)
    got, _ = ours(q, k, v, need_weights=False, **masks)
    assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [True, False])
def test_unbatched_input_matches_torch(backend, average):
    ref, ours = make_pair()
    ours.backend = backend
    torch.manual_seed(2)
    q, k, v = torch.randn(L, E), torch.randn(S, E), torch.randn(S, E)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-1] = True
    for masks in (
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": bool_attn_mask()},
        {"attn_mask": torch.randn(H, L, S)},
    ):
        expected, expected_w = ref(q, k, v, average_attn_weights=average, **masks)
        got, got_w = ours(q, k, v, average_attn_weights=average, **masks)
        assert got.shape == (L, E)
        assert_close(got, expected)
        assert_close(got_w, expected_w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_is_causal_without_mask_matches_torch_with_causal_mask(backend):
    ref, ours = make_pair(batch_first=True)
    ours.backend = backend
    x = torch.randn(N, L, E)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    expected, _ = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    got, _ = ours(x, x, x, is_causal=True, need_weights=False)
    assert_close(got, expected)
    # With an explicit mask, is_causal is only a hint: the mask is used.
    soft = torch.randn(L, L)
    expected, _ = ref(x, x, x, attn_mask=soft, need_weights=False)
    got, _ = ours(x, x, x, attn_mask=soft, is_causal=True, need_weights=False)
    assert_close(got, expected)


def test_is_causal_is_bottom_right_aligned_for_cross_attention():
    _, ours = make_pair(batch_first=True)
    q, k, v = inputs(True)  # L=5 queries, S=7 keys
    got, weights = ours(q, k, v, is_causal=True, average_attn_weights=False)
    allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    assert torch.all(weights[..., ~allowed] == 0)
    expected, _ = ours(q, k, v, attn_mask=~allowed)
    assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_torch(backend):
    ref, ours = make_pair(batch_first=True)
    ours.backend = backend
    q, k, v = inputs(True)
    masks = {"key_padding_mask": bool_padding()}
    ref(q, k, v, need_weights=False, **masks)[0].square().sum().backward()
    ours(q, k, v, need_weights=False, **masks)[0].square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_grads[name].grad, atol=1e-4)


# -------------------------------------------------------------------------------- backends, dropout


def test_backend_is_resolved_at_call_time():
    _, ours = make_pair(batch_first=True)
    x = torch.randn(N, L, E)
    results = {}
    for name in BACKENDS:
        with use_backend(name), attention_backends.track_backends() as used:
            results[name] = ours(x, x, x, need_weights=False)[0]
        assert set(used) == {name}
    for out in results.values():
        assert_close(out, results["naive"])
    ours.backend = "naive"
    with use_backend("sdpa"), attention_backends.track_backends() as used:
        ours(x, x, x, need_weights=False)
    assert set(used) == {"naive"}


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, dropout=0.5, batch_first=True, backend="naive")
    x = torch.randn(N, L, E)
    mha.train()
    a, _ = mha(x, x, x)
    b, _ = mha(x, x, x)
    assert not torch.allclose(a, b)
    mha.eval()
    c, _ = mha(x, x, x)
    d, _ = mha(x, x, x)
    assert torch.equal(c, d)
    mha.dropout = 0.0
    assert_close(mha(x, x, x)[0], c)


# ------------------------------------------------------------------------------------------------ GQA


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_query_attention_equals_mha_with_repeated_kv_heads(backend):
    torch.manual_seed(0)
    kv_heads, dh = 2, E // H
    gqa = MultiHeadAttention(E, H, num_kv_heads=kv_heads, batch_first=True, backend=backend)
    with torch.no_grad():
        gqa.in_proj_bias.normal_()
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    bq, bk, bv = gqa.in_proj_bias.split([E, kv_heads * dh, kv_heads * dh])

    def expand(t):  # (Hkv * Dh, ...) -> (H * Dh, ...), each kv head repeated for its query group
        return repeat(t, "(h d) ... -> (h g d) ...", h=kv_heads, g=H // kv_heads)

    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([gqa.q_proj_weight, expand(gqa.k_proj_weight), expand(gqa.v_proj_weight)])
        )
        ref.in_proj_bias.copy_(torch.cat([bq, expand(bk), expand(bv)]))
        ref.out_proj.load_state_dict(gqa.out_proj.state_dict())
    x = torch.randn(N, L, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, -2:] = True
    expected, expected_w = ref(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    got, got_w = gqa(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    assert_close(got, expected)
    assert_close(got_w, expected_w)
    got.sum().backward()
    assert gqa.k_proj_weight.grad is not None


# ------------------------------------------------------------------------- torch.nn.TransformerEncoderLayer


def encoder_layer_pair(batch_first: bool):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    layer.self_attn = MultiHeadAttention(E, H, dropout=0.0, batch_first=batch_first)
    layer.load_state_dict(ref.state_dict())
    return ref, layer


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_drop_in_inside_torch_transformer_encoder_layer(batch_first, mode):
    ref, layer = encoder_layer_pair(batch_first)
    ref.train(mode == "train")
    layer.train(mode == "train")
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    for kwargs in ({}, {"src_key_padding_mask": kpm}, {"src_mask": causal, "is_causal": True}):
        with torch.no_grad(), attention_backends.track_backends() as used:
            got = layer(x, **kwargs)
        # The fused fast path of torch's layer must not bypass our module (and so the backend).
        assert sum(used.values()) == 1
        with torch.no_grad():
            expected = ref(x, **kwargs)
        if "src_key_padding_mask" in kwargs and mode == "eval" and batch_first:
            # torch's fast path returns 0 at padded positions; compare the real ones.
            keep = ~kpm
            assert_close(got[keep], expected[keep])
        else:
            assert_close(got, expected)


def test_drop_in_trains_inside_torch_transformer_encoder_layer():
    _, layer = encoder_layer_pair(True)
    x = torch.randn(N, L, E)
    layer(x, is_causal=True).sum().backward()
    assert layer.self_attn.in_proj_weight.grad is not None


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", available_backends("cuda") if torch.cuda.is_available() else [])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_on_cuda(backend, dtype):
    ref, ours = make_pair(batch_first=True)
    ref, ours = ref.cuda().to(dtype), ours.cuda().to(dtype)
    ours.backend = backend
    q, k, v = (t.cuda().to(dtype) for t in inputs(True))
    kpm = bool_padding().cuda()
    atol = 1e-4 if dtype == torch.float32 else 3e-2
    for kwargs in ({"key_padding_mask": kpm}, {"is_causal": False}):
        expected, _ = ref(q, k, v, need_weights=False, **kwargs)
        got, _ = ours(q, k, v, need_weights=False, **kwargs)
        assert_close(got.float(), expected.float(), atol=atol)
    x = q
    expected, _ = ref(
        x, x, x, attn_mask=torch.ones(L, L, dtype=torch.bool, device="cuda").triu(1), need_weights=False
    )
    got, _ = ours(x, x, x, is_causal=True, need_weights=False)
    assert_close(got.float(), expected.float(), atol=atol)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda x: x.long(), TypeError, "query to be floating point"),
        (lambda x: x.double(), TypeError, "module's dtype"),
        (lambda x: x.to("meta"), ValueError, "module's device"),
        (lambda x: x.tolist(), TypeError, "query to be a Tensor"),
    ],
)
def test_input_type_dtype_and_device_are_named(change, error, match):
    from transformer import MultiHeadAttention

    mha = MultiHeadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with pytest.raises(error, match=match):
        mha(change(x), x, x)
