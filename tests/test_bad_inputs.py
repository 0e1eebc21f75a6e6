"""Bad inputs across the public entries: each raises a named Python exception before any kernel runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import attention_backends as ab
from transformer import MultiHeadAttention
from transformer.flash_attention import FlashAttention
from transformer.training import validate_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
B, HQ, HKV, NQ, NK, D = 2, 4, 2, 5, 7, 16


@pytest.fixture(autouse=True)
def built():
    ab.load_extension()


def qkv(dtype=torch.float32):
    return (
        torch.randn(B, HQ, NQ, D, dtype=dtype),
        torch.randn(B, HKV, NK, D, dtype=dtype),
        torch.randn(B, HKV, NK, D, dtype=dtype),
    )


ATTENTION_CASES = [
    ("int dtype", lambda q, k, v: ((q.int(), k.int(), v.int()), {}), TypeError, "floating-point"),
    ("mixed dtypes", lambda q, k, v: ((q, k.double(), v), {}), TypeError, "expected k to have q's dtype"),
    ("device mismatch", lambda q, k, v: ((q, k.to("meta"), v), {}), ValueError, "expected k on q's device"),
    ("rank", lambda q, k, v: ((q[0], k, v), {}), ValueError, "expected q to have 4 dims"),
    ("k/v shapes", lambda q, k, v: ((q, k, v[:, :, :3]), {}), ValueError, "k and v of the same shape"),
    ("Hq % Hkv", lambda q, k, v: ((q[:, :3], k, v), {}), ValueError, "multiple of the key/value heads"),
    ("head dims", lambda q, k, v: ((q[..., :8], k, v), {}), ValueError, "share B and D"),
    (
        "padding mask shape",
        lambda q, k, v: ((q, k, v), {"key_padding_mask": torch.zeros(B, NK + 1, dtype=torch.bool)}),
        ValueError,
        r"key_padding_mask of shape \(B, Nk\)",
    ),
    (
        "padding mask dtype",
        lambda q, k, v: ((q, k, v), {"key_padding_mask": torch.zeros(B, NK)}),
        TypeError,
        "key_padding_mask to be bool",
    ),
    (
        "attn_mask shape",
        lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(NQ, NK + 2, dtype=torch.bool)}),
        ValueError,
        "attn_mask broadcastable",
    ),
    (
        "attn_mask dtype",
        lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(NQ, NK, dtype=torch.int64)}),
        TypeError,
        "attn_mask to be bool or floating point",
    ),
    ("dropout", lambda q, k, v: ((q, k, v), {"dropout_p": 1.0}), ValueError, "dropout_p"),
]


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
@pytest.mark.parametrize(
    ("name", "change", "error", "match"), ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES]
)
def test_attention_rejects(backend, name, change, error, match):
    args, kwargs = change(*qkv())
    with pytest.raises(error, match=match):
        ab.attention(*args, backend=backend, **kwargs)


OP_CASES = [
    (
        "dtype",
        lambda q, k, v: (q.half(), k.half(), v.half(), None, None),
        TypeError,
        "float32, float64 or bfloat16",
    ),
    (
        "head dim",
        lambda q, k, v: (*(torch.randn(1, 1, 3, 300) for _ in range(3)), None, None),
        ValueError,
        "head dim",
    ),
    (
        "last dim stride",
        lambda q, k, v: (q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), None, None),
        ValueError,
        "contiguous last dim",
    ),
    (
        "mask dtype",
        lambda q, k, v: (q, k, v, torch.zeros(B, NK), None),
        TypeError,
        "key_padding_mask to be a bool tensor",
    ),
    (
        "seqlens dtype",
        lambda q, k, v: (q, k, v, None, torch.zeros(B, dtype=torch.int64)),
        TypeError,
        "seqlens_k to be int32",
    ),
    (
        "seqlens shape",
        lambda q, k, v: (q, k, v, None, torch.zeros(B + 1, dtype=torch.int32)),
        ValueError,
        "seqlens_k",
    ),
    ("GQA", lambda q, k, v: (q[:, :3], k, v, None, None), ValueError, "multiple of the key/value heads"),
]


@pytest.mark.parametrize(("name", "change", "error", "match"), OP_CASES, ids=[c[0] for c in OP_CASES])
def test_flash_ops_reject(name, change, error, match):
    with pytest.raises(error, match=match):
        torch.ops.flash_attn.fwd(*change(*qkv()), D**-0.5, False)


def test_flash_backward_op_rejects_a_wrong_lse():
    q, k, v = qkv()
    out, lse = torch.ops.flash_attn.fwd(q, k, v, None, None, 0.25, False)
    with pytest.raises(TypeError, match="lse to be float32"):
        torch.ops.flash_attn.bwd(out, q, k, v, out, lse.double(), None, None, 0.25, False)
    with pytest.raises(ValueError, match=r"lse of shape \(B, Hq, Nq\)"):
        torch.ops.flash_attn.bwd(out, q, k, v, out, lse[:, :, :2], None, None, 0.25, False)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
def test_empty_inputs_give_empty_or_zero_outputs(backend):
    q, k, v = qkv()
    out, _ = ab.attention(q[:, :, :0], k, v, backend=backend, strict=True)
    assert out.shape == (B, HQ, 0, D)
    out, _ = ab.attention(q, k[:, :, :0], v[:, :, :0], backend=backend, strict=True)
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))


def test_nan_in_one_query_row_stays_in_that_row():
    q, k, v = qkv()
    q[0, 0, 2, 0] = float("nan")
    for backend in ("naive", "sdpa", "flash"):
        out, _ = ab.attention(q, k, v, backend=backend, strict=True)
        finite = torch.isfinite(out).all(dim=-1)
        finite[0, 0, 2] = True  # that row's value differs by backend (NaN for naive, 0 for sdpa and flash)
        assert finite.all(), backend


def test_multihead_attention_rejects():
    with pytest.raises(ValueError, match=r"embed_dim \(16\) must be divisible by num_heads \(3\)"):
        MultiHeadAttention(16, 3)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MultiHeadAttention(16, 4, num_kv_heads=3)
    with pytest.raises(NotImplementedError):
        MultiHeadAttention(16, 4, add_bias_kv=True)
    mha = MultiHeadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="expected embed_dim=16"):
        mha(torch.randn(2, 5, 12), x, x)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(2, 5\)"):
        mha(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must have shape \(5, 5\)"):
        mha(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))


def test_flash_attention_module_rejects_bad_widths():
    module = FlashAttention(32, 4)
    x = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="expected embed_dim=32"):
        module(torch.randn(1, 3, 16), x, x)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["attention.name=nope"], "attention.name='nope' is not a registered attention backend"),
        (["model.d_model=30", "model.num_heads=4"], "d_model"),
    ],
)
def test_configs_fail_before_training(overrides, match):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", *overrides])
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)
