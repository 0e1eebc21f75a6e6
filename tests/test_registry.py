"""The registry: registration, lookup, defaults, fallback warnings, strict mode, tracking."""

from __future__ import annotations

import warnings

import pytest
import torch

import attention_backends as ab
from attention_backends import registry


@pytest.fixture
def qkv():
    return torch.randn(2, 4, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(registry, "_WARNED", set())


@pytest.fixture
def doubled_backend():
    @ab.register_backend("doubled", support=ab.BackendSupport(need_weights=False), fallback="naive")
    def doubled(q, k, v, **kwargs):
        out, _ = ab.naive_attention(q, k, v, **kwargs)
        return 2 * out, None

    yield "doubled"
    ab.unregister_backend("doubled")


def test_builtin_backends_are_registered():
    assert {"naive", "sdpa", "flash"} <= set(ab.registered_backends())
    assert {"naive", "sdpa"} <= set(ab.available_backends())
    assert ab.get_backend("flash").fallback == "sdpa"
    assert ab.get_backend("sdpa").fallback == "naive"


def test_unknown_name_lists_registered_backends(qkv):
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'.*'naive'.*'sdpa'"):
        ab.get_backend("nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        ab.attention(*qkv, backend="nope")
    with pytest.raises(ValueError, match="unknown attention backend"), ab.use_backend("nope"):
        pass


def test_custom_backend_selected_by_name_everywhere(qkv, doubled_backend):
    expected, _ = ab.naive_attention(*qkv, scale=8**-0.5)
    out, _ = ab.attention(*qkv, backend=doubled_backend)
    assert torch.allclose(out, 2 * expected)
    with ab.use_backend(doubled_backend):
        assert ab.get_default_backend() == doubled_backend
        out, _ = ab.attention(*qkv)
        assert ab.last_backend_used() == doubled_backend
    assert torch.allclose(out, 2 * expected)
    assert ab.get_default_backend() == "sdpa"
    assert doubled_backend in ab.available_backends()


def test_use_backend_restores_on_error(qkv):
    with pytest.raises(RuntimeError), ab.use_backend("naive", strict=True):
        raise RuntimeError("boom")
    assert ab.get_default_backend() == "sdpa" and not ab.is_strict()


def test_fallback_warns_once_per_reason_and_names_it(qkv, fresh_warnings):
    with pytest.warns(
        UserWarning, match=r"'sdpa' cannot serve this call \(need_weights=True is not supported\)"
    ):
        _, weights = ab.attention(*qkv, backend="sdpa", need_weights=True)
    assert weights is not None and ab.last_backend_used() == "naive"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ab.attention(*qkv, backend="sdpa", need_weights=True)  # same reason: no second warning


def test_strict_raises_with_the_reason(qkv):
    with pytest.raises(ab.BackendUnsupportedError, match="need_weights=True is not supported"):
        ab.attention(*qkv, backend="sdpa", need_weights=True, strict=True)
    with ab.use_backend("sdpa", strict=True), pytest.raises(ab.BackendUnsupportedError, match="need_weights"):
        ab.attention(*qkv, need_weights=True)


def test_flash_falls_back_for_arbitrary_masks(qkv, fresh_warnings):
    q, k, v = qkv
    mask = torch.rand(5, 6) < 0.2
    with pytest.warns(UserWarning, match="'flash' cannot serve this call"):
        out, _ = ab.attention(q, k, v, backend="flash", attn_mask=mask)
    assert ab.last_backend_used() == "sdpa"
    ref, _ = ab.reference_attention(q, k, v, attn_mask=mask)
    assert ab.relative_error(out, ref) < 1e-5


def test_track_backends_counts_what_ran(qkv):
    with ab.track_backends() as used:
        ab.attention(*qkv, backend="naive")
        ab.attention(*qkv, backend="sdpa")
        ab.attention(*qkv, backend="sdpa")
    assert used == {"naive": 1, "sdpa": 2}


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "expected q to have 4 dims"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "expected k to have q's dtype"),
        (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "expected k and v of the same shape"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of the key/value heads"),
        (lambda q, k, v: (q[..., :4], k, v), ValueError, "share B and D"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "floating-point"),
    ],
)
def test_bad_inputs_are_named(qkv, change, error, match):
    with pytest.raises(error, match=match):
        ab.attention(*change(*qkv))


def test_bad_masks_are_named(qkv):
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(B, Nk\)"):
        ab.attention(*qkv, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask to be bool"):
        ab.attention(*qkv, key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="attn_mask broadcastable"):
        ab.attention(*qkv, attn_mask=torch.zeros(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        ab.attention(*qkv, dropout_p=1.5)


def test_dropout_is_applied_in_naive_and_sdpa(qkv):
    for backend in ("naive", "sdpa"):
        torch.manual_seed(0)
        out, _ = ab.attention(*qkv, backend=backend, dropout_p=0.5)
        plain, _ = ab.attention(*qkv, backend=backend)
        assert not torch.allclose(out, plain)
