"""KV-cache decoding: same tokens as full re-decoding on every CPU backend, padding, GQA, EOS, sampling."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from attention_backends import available_backends, use_backend
from transformer import KVCache, MultiHeadAttention, Transformer

pytestmark = pytest.mark.usefixtures("restore_default_backend")

BACKENDS = [name for name in ("naive", "sdpa", "flash") if name in available_backends("cpu")]
VOCAB, B, S, NEW = 17, 4, 9, 12
BOS, EOS = 1, 2


def make_model(num_kv_heads: int | None = None, norm_first: bool = True, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(
        VOCAB,
        VOCAB,
        d_model=32,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        max_len=32,
        norm_first=norm_first,
        num_kv_heads=num_kv_heads,
        tie_embeddings=False,
    ).eval()
    # Wider random weights than the default init: the default model mostly repeats one token, a weak test.
    gen = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 2.0 / param.shape[1] ** 0.5)
    return model


def padded_sources(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) sources of lengths S, S - 3, 2, S - 1 and their padding mask (True = pad)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (B, S), generator=gen)
    lengths = torch.tensor([S, S - 3, 2, S - 1])
    mask = torch.arange(S)[None, :] >= lengths[:, None]  # (B, S)
    return src.masked_fill(mask, 0), mask


@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("norm_first", [True, False], ids=["prenorm", "postnorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_gives_the_same_tokens_as_full_decoding(backend, norm_first, num_kv_heads):
    model = make_model(num_kv_heads, norm_first)
    src, mask = padded_sources()
    with use_backend(backend, strict=True):
        cached = model.generate(src, NEW, BOS, EOS, mask, use_cache=True)
        full = model.generate(src, NEW, BOS, EOS, mask, use_cache=False)
    assert cached.shape == full.shape and cached.shape[1] >= 1
    assert torch.equal(cached, full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_step_equals_the_row_of_a_full_causal_forward(backend):
    """Nq = 1 against Nk = t cached keys (bottom-right causal) matches row t - 1 of the full pass."""
    model = make_model(num_kv_heads=2)
    src, mask = padded_sources()
    tgt = torch.randint(3, VOCAB, (B, 7), generator=torch.Generator().manual_seed(2))
    with use_backend(backend, strict=True):
        memory = model.encode(src, mask)
        full = model.decode(tgt, memory, memory_key_padding_mask=mask)  # (B, 7, V)
        cache = model.new_cache(B, 7)
        # A 3-position prefill (Nq = 3 = Nk), then one position per step (Nq = 1, Nk = t).
        prefill = model.decode(tgt[:, :3], memory, None, mask, cache=cache)
        torch.testing.assert_close(prefill, full[:, :3], atol=1e-5, rtol=0)
        for t in range(4, 8):
            step = model.decode(tgt[:, :t], memory, None, mask, cache=cache)  # (B, 1, V)
            assert step.shape == (B, 1, VOCAB)
            torch.testing.assert_close(step[:, 0], full[:, t - 1], atol=1e-5, rtol=0)
    assert cache.uniform_length == 7 and cache.lengths.tolist() == [7] * B


def test_gqa_cache_stores_only_the_kv_heads():
    model = make_model(num_kv_heads=2)
    src, mask = padded_sources()
    cache = model.new_cache(B, NEW)
    memory = model.encode(src, mask)
    model.decode(torch.full((B, 1), BOS), memory, None, mask, cache=cache)
    head_dim = 32 // 4
    for layer in range(2):
        assert cache.k[layer].shape == (B, 2, NEW, head_dim)
        assert cache.v[layer].shape == (B, 2, NEW, head_dim)
        assert cache.cross_k[layer].shape == (B, 2, S, head_dim)
    full_heads = make_model(num_kv_heads=None).new_cache(B, NEW)
    full_heads_bytes = 2 * 2 * (B * 4 * NEW * head_dim + B * 4 * S * head_dim) * 4
    assert cache.nbytes() == full_heads_bytes // 2
    assert full_heads.nbytes() == 0  # nothing allocated before the first append


def test_cross_attention_keys_are_computed_once(monkeypatch):
    model = make_model()
    src, mask = padded_sources()
    calls = []
    cross = model.decoder.layers[0].multihead_attn
    original = cross._project
    monkeypatch.setattr(cross, "_project", lambda *a: calls.append(1) or original(*a))
    model.generate(src, 6, BOS, eos_id=-1, src_key_padding_mask=mask)
    assert len(calls) == 1


def test_eos_stops_each_sequence_and_pads():
    model = make_model(num_kv_heads=2)
    src, mask = padded_sources()
    reference = model.generate(src, NEW, BOS, eos_id=-1, src_key_padding_mask=mask)  # never stops
    assert reference.shape == (B, NEW)
    # The EOS: a token whose first appearance in some sequence is after the first step.
    first = {}
    for b, row in enumerate(reference.tolist()):
        for t, token in enumerate(row):
            first.setdefault((b, token), t)
    eos = next(token for (b, token), t in sorted(first.items(), key=lambda kv: -kv[1]) if 0 < t < NEW - 1)
    for use_cache in (True, False):
        out = model.generate(src, NEW, BOS, eos, mask, use_cache=use_cache)
        stops = []
        for b in range(B):
            row, ref = out[b].tolist(), reference[b].tolist()
            stop = ref.index(eos) if eos in ref else NEW
            stops.append(stop)
            assert row[: stop + 1] == ref[: stop + 1]
            assert all(token == model.pad_id for token in row[stop + 1 :])
        assert out.shape[1] == min(max(stops) + 1, NEW)
        assert min(stops) < out.shape[1] - 1  # some sequence finished while another went on


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = make_model(num_kv_heads=2)
    src, mask = padded_sources()

    def sample(seed: int, use_cache: bool = True, **kwargs) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(src, NEW, BOS, -1, mask, use_cache=use_cache, generator=gen, **kwargs)

    a = sample(0, temperature=1.5)
    assert torch.equal(a, sample(0, temperature=1.5))
    assert torch.equal(a, sample(0, use_cache=False, temperature=1.5))
    assert not torch.equal(a, sample(1, temperature=1.5))
    greedy = model.generate(src, NEW, BOS, -1, mask)
    assert not torch.equal(a, greedy)
    assert torch.equal(sample(3, temperature=0.7, top_k=1), greedy)
    top3 = sample(4, temperature=5.0, top_k=3)
    assert top3.shape == (B, NEW) and int(top3.min()) >= 0 and int(top3.max()) < VOCAB


def test_generate_rejects_bad_sampling_arguments():
    model = make_model()
    src, mask = padded_sources()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(src, 3, BOS, EOS, mask, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(src, 3, BOS, EOS, mask, temperature=1.0, top_k=0)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sequence_lengths_in_the_cache(backend, n):
    """Sequences at different cached lengths: each attends to exactly its own filled prefix.

    The cache hands attention the filled lengths as ``seqlens_k``: flash takes them natively, the other
    backends as a key padding mask plus a per-sequence causal mask; every backend serves it in strict mode.
    """
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, batch_first=True, num_kv_heads=2).eval()
    lengths = torch.tensor([3, 1, 4])
    x = torch.randn(3, 7, 16)
    ragged = KVCache(1, 3, max_len=8, lengths=lengths)
    assert ragged.uniform_length is None
    # Write each sequence's prefix keys/values straight into the buffers.
    with use_backend(backend, strict=True), torch.no_grad():
        _, k, v = mha._project(x, x, x)
        k = rearrange(k, "n s (h d) -> n h s d", h=2)  # (3, 2, 7, 4)
        v = rearrange(v, "n s (h d) -> n h s d", h=2)
        ragged.k[0] = torch.full((3, 2, 8, 4), 1e3)  # garbage in the unfilled slots
        ragged.v[0] = torch.full((3, 2, 8, 4), 1e3)
        for b, m in enumerate(lengths.tolist()):
            ragged.k[0][b, :, :m] = k[b, :, :m]
            ragged.v[0][b, :, :m] = v[b, :, :m]
        new = torch.stack([x[b, m : m + n] for b, m in enumerate(lengths.tolist())])  # (3, n, 16)
        out, _ = mha(new, new, new, need_weights=False, is_causal=True, kv_cache=ragged.layer(0).self_attn)
        for b, m in enumerate(lengths.tolist()):
            prefix = x[b : b + 1, : m + n]
            full, _ = mha(prefix, prefix, prefix, need_weights=False, is_causal=True)
            torch.testing.assert_close(out[b], full[0, m : m + n], atol=1e-5, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_kv_heads", [None, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
def test_cache_gives_the_same_tokens_on_cuda(backend, num_kv_heads):
    """float16 on the GPU (the flash CUDA kernels take fp16/bf16): cached and uncached tokens agree."""
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} is not available on CUDA")
    model = make_model(num_kv_heads).to(device="cuda", dtype=torch.float16)
    src, mask = padded_sources()
    src, mask = src.cuda(), mask.cuda()
    with use_backend(backend, strict=True):
        cached = model.generate(src, NEW, BOS, EOS, mask, use_cache=True)
        full = model.generate(src, NEW, BOS, EOS, mask, use_cache=False)
    assert cached.shape == full.shape and cached.shape[1] >= 1
    assert torch.equal(cached, full)
