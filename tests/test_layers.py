"""EncoderLayer / DecoderLayer / Transformer: torch parity, swapped attention modules, backends, generate."""

from __future__ import annotations

import pytest
import torch

from attention_backends import available_backends, use_backend
from transformer import (
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    MultiHeadAttention,
    Transformer,
    causal_mask,
)

pytestmark = [
    pytest.mark.usefixtures("restore_default_backend"),
    pytest.mark.filterwarnings("ignore:attention backend .* falling back"),
]

BACKENDS = available_backends("cpu")
D, H, FF, B, S, T = 16, 4, 32, 3, 6, 5
ATOL = 1e-5


def assert_close(a, b, atol=ATOL, msg=None):
    torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=msg)


def padding(n: int, length: int) -> torch.Tensor:
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[0, -2:] = True
    mask[-1, -1] = True
    return mask


class TorchAttentionEncoderLayer(EncoderLayer):
    """An EncoderLayer whose self-attention is torch's own module."""

    def __init__(self, d_model, num_heads, dim_feedforward, dropout, **kwargs):
        super().__init__(d_model, num_heads, dim_feedforward, dropout, **kwargs)
        self.self_attn = torch.nn.MultiheadAttention(d_model, num_heads, dropout, batch_first=True)


class TorchAttentionDecoderLayer(DecoderLayer):
    """A DecoderLayer whose self- and cross-attention are torch's own modules."""

    def __init__(self, d_model, num_heads, dim_feedforward, dropout, **kwargs):
        super().__init__(d_model, num_heads, dim_feedforward, dropout, **kwargs)
        self.self_attn = torch.nn.MultiheadAttention(d_model, num_heads, dropout, batch_first=True)
        self.multihead_attn = torch.nn.MultiheadAttention(d_model, num_heads, dropout, batch_first=True)


# --------------------------------------------------------------------------------------- torch parity


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(
        D, H, FF, dropout=0.0, activation=activation, norm_first=norm_first, batch_first=True
    )
    ours = EncoderLayer(D, H, FF, dropout=0.0, activation=activation, norm_first=norm_first)
    ours.load_state_dict(ref.state_dict())
    x, kpm = torch.randn(B, S, D), padding(B, S)
    assert_close(ours(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm))
    assert_close(ours(x, is_causal=True), ref(x, src_mask=causal_mask(S), is_causal=True))


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ref = torch.nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first, batch_first=True)
    ours = DecoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first)
    ours.load_state_dict(ref.state_dict())
    tgt, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    tgt_kpm, mem_kpm = padding(B, T), padding(B, S)
    expected = ref(
        tgt,
        memory,
        tgt_mask=causal_mask(T),
        tgt_key_padding_mask=tgt_kpm,
        memory_key_padding_mask=mem_kpm,
        tgt_is_causal=True,
    )
    got = ours(tgt, memory, tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=mem_kpm)
    assert_close(got, expected)


def test_sequence_first_layers():
    torch.manual_seed(0)
    bf = EncoderLayer(D, H, FF, dropout=0.0)
    sf = EncoderLayer(D, H, FF, dropout=0.0, batch_first=False)
    sf.load_state_dict(bf.state_dict())
    x = torch.randn(B, S, D)
    assert_close(sf(x.transpose(0, 1), is_causal=True).transpose(0, 1), bf(x, is_causal=True))


# ------------------------------------------------------------------------------ swapped attention modules


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_with_torch_attention(norm_first):
    torch.manual_seed(0)
    ours = EncoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first)
    swapped = TorchAttentionEncoderLayer(D, H, FF, 0.0, norm_first=norm_first)
    assert isinstance(swapped.self_attn, torch.nn.MultiheadAttention)
    swapped.load_state_dict(ours.state_dict())
    x, kpm = torch.randn(B, S, D), padding(B, S)
    assert_close(swapped(x, src_key_padding_mask=kpm), ours(x, src_key_padding_mask=kpm))
    # Causal self-attention without a mask: the layer builds one for torch's module.
    assert_close(swapped(x, is_causal=True), ours(x, is_causal=True))
    swapped(x, is_causal=True).sum().backward()


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_with_torch_attention_is_causal(norm_first):
    torch.manual_seed(0)
    ours = DecoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first)
    swapped = TorchAttentionDecoderLayer(D, H, FF, 0.0, norm_first=norm_first)
    swapped.load_state_dict(ours.state_dict())
    tgt, memory = torch.randn(B, T, D), torch.randn(B, S, D)
    kwargs = {"tgt_key_padding_mask": padding(B, T), "memory_key_padding_mask": padding(B, S)}
    expected = ours(tgt, memory, **kwargs)
    assert_close(swapped(tgt, memory, **kwargs), expected)
    # Causality: changing a later target position leaves earlier outputs unchanged.
    changed = tgt.clone()
    changed[:, -1] += 1.0
    assert_close(swapped(changed, memory)[:, :-1], swapped(tgt, memory)[:, :-1])


def test_layer_options_and_errors():
    layer = EncoderLayer(D, H, FF, activation=torch.tanh, num_kv_heads=2, bias=False)
    assert layer.activation is torch.tanh
    assert layer.self_attn.num_kv_heads == 2 and layer.linear1.bias is None
    layer(torch.randn(B, S, D)).sum().backward()
    with pytest.raises(ValueError, match="activation"):
        EncoderLayer(D, H, FF, activation="swish")
    with pytest.raises(ValueError, match="d_model"):
        DecoderLayer(18, H, FF)
    with pytest.raises(ValueError, match="dim_feedforward"):
        EncoderLayer(D, H, 0)


def test_stacks_have_final_norm_only_when_pre_norm():
    assert Encoder(2, D, H, FF, norm_first=True).norm is not None
    assert Encoder(2, D, H, FF, norm_first=False).norm is None
    assert Decoder(2, D, H, FF, norm_first=True).norm is not None
    with pytest.raises(ValueError, match="num_layers"):
        Decoder(0, D, H, FF)


# --------------------------------------------------------------------------------------- the model


def small_model(**kwargs) -> Transformer:
    torch.manual_seed(0)
    defaults = {
        "src_vocab_size": 11,
        "tgt_vocab_size": 13,
        "d_model": D,
        "num_heads": H,
        "num_encoder_layers": 2,
        "num_decoder_layers": 2,
        "dim_feedforward": FF,
        "dropout": 0.0,
        "max_len": 32,
    }
    return Transformer(**{**defaults, **kwargs})


def tokens(vocab: int, n: int, length: int) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_forward_shapes_and_backward(norm_first):
    model = small_model(norm_first=norm_first, num_kv_heads=2)
    src, tgt = tokens(11, B, S), tokens(13, B, T)
    logits = model(src, tgt, padding(B, S), padding(B, T))
    assert logits.shape == (B, T, 13)
    logits.sum().backward()
    assert model.tgt_embed.weight.grad is not None


def test_tied_and_untied_embeddings():
    tied = small_model(tie_embeddings=True)
    assert tied.output.weight is tied.tgt_embed.weight
    untied = small_model(tie_embeddings=False)
    assert untied.output.weight is not untied.tgt_embed.weight


def test_transformer_argument_errors():
    with pytest.raises(ValueError, match="divisible"):
        small_model(d_model=18)
    with pytest.raises(ValueError, match="pad_id"):
        small_model(pad_id=99)
    with pytest.raises(ValueError, match="max_len"):
        small_model(max_len=4)(tokens(11, 1, 6), tokens(13, 1, 3))


def test_decoder_is_causal():
    model = small_model()
    src, tgt = tokens(11, B, S), tokens(13, B, T)
    changed = tgt.clone()
    changed[:, -1] = 3
    assert_close(model(src, changed)[:, :-1], model(src, tgt)[:, :-1])


def test_switching_backend_changes_nothing_beyond_tolerance():
    model = small_model(num_kv_heads=2)
    src, tgt = tokens(11, B, S), tokens(13, B, T)
    masks = (padding(B, S), padding(B, T))
    results = {}
    for name in BACKENDS:
        with use_backend(name):
            results[name] = model(src, tgt, *masks)
    for name, logits in results.items():
        assert_close(logits, results["naive"], atol=1e-4, msg=name)
    # An explicit per-model backend overrides the default for every layer.
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.backend = "naive"
    with use_backend("sdpa"):
        assert_close(model(src, tgt, *masks), results["naive"], atol=1e-4)


# ------------------------------------------------------------------------------------------ generate


def test_generate_shapes_and_tokens():
    model = small_model().eval()
    src = tokens(11, B, S)
    out = model.generate(src, max_new_tokens=7, bos_id=1, eos_id=2, src_key_padding_mask=padding(B, S))
    assert out.shape[0] == B and 1 <= out.shape[1] <= 7
    assert out.dtype == torch.long and int(out.max()) < 13
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(src, max_new_tokens=0, bos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="max_len"):
        model.generate(src, max_new_tokens=40, bos_id=1, eos_id=2)


def scripted_decode(model: Transformer, scripts: list[list[int]], vocab: int = 13):
    """Replace ``model.decode`` with one whose greedy choice at step t is ``scripts[b][t]``."""

    def decode(tgt_in, memory, tgt_key_padding_mask=None, memory_key_padding_mask=None, cache=None):
        step = tgt_in.shape[1] - 1
        logits = torch.zeros(tgt_in.shape[0], tgt_in.shape[1], vocab)
        for b, script in enumerate(scripts):
            logits[b, -1, script[min(step, len(script) - 1)]] = 1.0
        return logits

    model.decode = decode
    return model


def test_generate_stops_each_sequence_at_eos_and_pads():
    model = scripted_decode(small_model(pad_id=0).eval(), [[5, 2, 7, 7, 7], [6, 6, 6, 6, 6], [2, 9, 9, 9, 9]])
    out = model.generate(tokens(11, 3, S), max_new_tokens=5, bos_id=1, eos_id=2)
    assert out.tolist() == [[5, 2, 0, 0, 0], [6, 6, 6, 6, 6], [2, 0, 0, 0, 0]]


def test_generate_ends_early_when_all_finished():
    model = scripted_decode(small_model().eval(), [[4, 2], [2, 8]])
    out = model.generate(tokens(11, 2, S), max_new_tokens=10, bos_id=1, eos_id=2)
    assert out.tolist() == [[4, 2], [2, 0]]
