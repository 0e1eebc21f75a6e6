"""Bad inputs across the public entries: each raises a named Python exception before any kernel runs.

Defined behaviour for the inputs that are not errors: empty tensors (B = 0, Nq = 0, Nk = 0) give empty
outputs, or zeros for Nk = 0 (every row fully masked); a NaN/inf in q, k or v never raises and changes only
the (batch, key/value head group) slice it sits in.
"""

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
    ("head dim 0", lambda q, k, v: ((q[..., :0], k[..., :0], v[..., :0]), {}), ValueError, "head dim D >= 1"),
    ("not a tensor", lambda q, k, v: ((q.tolist(), k, v), {}), TypeError, "expected q to be a Tensor"),
    (
        "padding mask device",
        lambda q, k, v: (
            (q, k, v),
            {"key_padding_mask": torch.zeros(B, NK, dtype=torch.bool, device="meta")},
        ),
        ValueError,
        "key_padding_mask on q's device",
    ),
    (
        "attn_mask device",
        lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(NQ, NK, device="meta")}),
        ValueError,
        "attn_mask on q's device",
    ),
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
        "int dtype",
        lambda q, k, v: (q.int(), k.int(), v.int(), None, None),
        TypeError,
        "expected q to be float32",
    ),
    (
        "mixed dtypes",
        lambda q, k, v: (q, k.double(), v, None, None),
        TypeError,
        "expected k to have q's dtype",
    ),
    (
        "device mismatch",
        lambda q, k, v: (q, k.to("meta"), v, None, None),
        ValueError,
        "expected k on q's device",
    ),
    ("rank", lambda q, k, v: (q, k[0], v, None, None), ValueError, "expected k to have 4 dims"),
    (
        "k/v shapes",
        lambda q, k, v: (q, k, v[:, :, :3], None, None),
        ValueError,
        "expected v to have k's shape",
    ),
    ("batch", lambda q, k, v: (q[:1], k, v, None, None), ValueError, "share the batch size B"),
    ("head dims", lambda q, k, v: (q[..., :8], k, v, None, None), ValueError, "share the head dim D"),
    (
        "head dim 257",
        lambda q, k, v: (*(torch.randn(1, 1, 3, 257) for _ in range(3)), None, None),
        ValueError,
        "head dim D to be in 1..256",
    ),
    (
        "mask shape",
        lambda q, k, v: (q, k, v, torch.zeros(B, NK - 1, dtype=torch.bool), None),
        ValueError,
        r"key_padding_mask of shape \(B, Nk\)",
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


BWD_CASES = [
    ("lse dtype", {"lse": lambda t: t.double()}, TypeError, "lse to be float32"),
    ("lse shape", {"lse": lambda t: t[:, :, :2]}, ValueError, r"lse of shape \(B, Hq, Nq\)"),
    ("lse device", {"lse": lambda t: t.to("meta")}, ValueError, "expected lse on q's device"),
    ("dout shape", {"dout": lambda t: t[:, :, :2]}, ValueError, "expected dout of q's shape"),
    ("dout dtype", {"dout": lambda t: t.double()}, TypeError, "expected dout to have q's dtype"),
    (
        "out last dim",
        {"out": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)},
        ValueError,
        "expected out to have a contiguous last dim",
    ),
    ("k device", {"k": lambda t: t.to("meta")}, ValueError, "expected k on q's device"),
]


@pytest.mark.parametrize(("name", "changes", "error", "match"), BWD_CASES, ids=[c[0] for c in BWD_CASES])
def test_flash_backward_op_rejects(name, changes, error, match):
    q, k, v = qkv()
    out, lse = torch.ops.flash_attn.fwd(q, k, v, None, None, 0.25, False)
    args = {"dout": out.clone(), "q": q, "k": k, "v": v, "out": out, "lse": lse}
    for key, change in changes.items():
        args[key] = change(args[key])
    with pytest.raises(error, match=match):
        torch.ops.flash_attn.bwd(*args.values(), None, None, 0.25, False)


def test_flash_ops_on_empty_tensors():
    q, k, v = qkv()
    for sl in (lambda t: t[:0], lambda t: t[:, :, :0]):  # B = 0, then Nq = 0 (and Nk = 0 for k, v)
        out, lse = torch.ops.flash_attn.fwd(
            sl(q), k if sl(q).shape[0] else sl(k), v if sl(q).shape[0] else sl(v), None, None, 0.25, False
        )
        assert out.numel() == 0 and lse.numel() == 0
    out, lse = torch.ops.flash_attn.fwd(q, k[:, :, :0], v[:, :, :0], None, None, 0.25, False)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isposinf(lse).all()
    dq, dk, dv = torch.ops.flash_attn.bwd(
        torch.ones_like(q), q, k[:, :, :0], v[:, :, :0], out, lse, None, None, 0.25, False
    )
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == dv.shape == (B, HKV, 0, D)


@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
def test_empty_inputs_give_empty_or_zero_outputs(backend):
    q, k, v = (t.requires_grad_(True) for t in qkv())
    out, _ = ab.attention(q[:0], k[:0], v[:0], backend=backend, strict=True)  # B = 0
    assert out.shape == (0, HQ, NQ, D)
    out, _ = ab.attention(q[:, :, :0], k, v, backend=backend, strict=True)  # Nq = 0
    assert out.shape == (B, HQ, 0, D)
    out, _ = ab.attention(q, k[:, :, :0], v[:, :, :0], is_causal=True, backend=backend, strict=True)  # Nk = 0
    assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out))
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert torch.equal(dq, torch.zeros_like(q))


# A NaN/inf at q[0, 0, 2, 0], k[0, 0, 2, 0] or v[0, 0, 2, 0]: batch 0, key/value head 0, i.e. query heads 0-1.
AFFECTED = (0, slice(0, HQ // HKV))


def poisoned(which: str, value: float) -> tuple[torch.Tensor, ...]:
    tensors = dict(zip("qkv", qkv(), strict=True))
    tensors[which][0, 0, 2, 0] = value
    return tensors["q"], tensors["k"], tensors["v"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
def test_non_finite_input_stays_in_its_slice(backend, which, value):
    torch.manual_seed(0)
    clean, _ = ab.attention(*qkv(), backend=backend, strict=True)
    torch.manual_seed(0)
    out, _ = ab.attention(*poisoned(which, value), backend=backend, strict=True)
    outside = torch.ones_like(out, dtype=torch.bool)
    outside[AFFECTED] = False
    assert torch.equal(out[outside], clean[outside])


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["naive", "sdpa", "flash"])
def test_non_finite_value_reaches_every_row_that_reads_it(backend, value):
    torch.manual_seed(0)
    out, _ = ab.attention(*poisoned("v", value), backend=backend, strict=True)
    bad = ~torch.isfinite(out)
    assert bad[AFFECTED][..., 0].all() and bad.sum() == bad[AFFECTED][..., 0].numel()


# NaN in a score: naive propagates it to the rows that read it; sdpa returns 0 for a NaN query row and our
# flash kernels skip a NaN score (finite output). The strict xfails record that and flip once it changes.
NAN_PROPAGATES = {
    ("naive", "q"): True,
    ("naive", "k"): True,
    ("sdpa", "q"): False,
    ("sdpa", "k"): True,
    ("flash", "q"): False,
    ("flash", "k"): False,
}


@pytest.mark.parametrize(
    ("backend", "which"),
    [
        pytest.param(*key, marks=[] if ok else pytest.mark.xfail(strict=True, reason="NaN score dropped"))
        for key, ok in NAN_PROPAGATES.items()
    ],
)
def test_nan_score_propagates_to_its_rows(backend, which):
    torch.manual_seed(0)
    out, _ = ab.attention(*poisoned(which, float("nan")), backend=backend, strict=True)
    rows = torch.isnan(out).any(dim=-1)
    affected = rows[AFFECTED] if which == "k" else rows[0, 0, 2]
    assert affected.all()


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


X = torch.randn(1, 3, 32)
FLASH_MODULE_CASES = [
    ("width", lambda: (torch.randn(1, 3, 16), X, X), {}, ValueError, "expected embed_dim=32"),
    ("int dtype", lambda: (X.long(), X, X), {}, TypeError, "expected query to be floating point"),
    ("mixed dtype", lambda: (X, X.double(), X), {}, TypeError, "expected key to have the module's dtype"),
    ("device", lambda: (X, X, X.to("meta")), {}, ValueError, "expected value on the module's device"),
    (
        "padding mask shape",
        lambda: (X, X, X),
        {"key_padding_mask": torch.zeros(1, 4, dtype=torch.bool)},
        ValueError,
        "key_padding_mask must have shape",
    ),
]


@pytest.mark.parametrize(
    ("name", "inputs", "kwargs", "error", "match"), FLASH_MODULE_CASES, ids=[c[0] for c in FLASH_MODULE_CASES]
)
def test_flash_attention_module_rejects(name, inputs, kwargs, error, match):
    with pytest.raises(error, match=match):
        FlashAttention(32, 4)(*inputs(), **kwargs)


def test_flash_attention_module_constructor_rejects():
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        FlashAttention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        FlashAttention(32, 4, num_kv_heads=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for a cpu/cuda device mismatch")
def test_cuda_and_cpu_tensors_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="expected k on q's device"):
        ab.attention(q.cuda(), k, v.cuda())


CONFIG_CASES = [
    (["attention.name=nope"], "attention.name='nope' is not a registered attention backend"),
    (["model.d_model=30", "model.num_heads=4"], r"model.d_model \(30\) must be divisible by model.num_heads"),
    (["model.num_kv_heads=3"], "model.num_kv_heads"),
    (["model.max_len=8"], "model.max_len"),
    (["model.src_vocab_size=8"], "must cover task.vocab_size"),
    (["precision=fp8"], "precision='fp8'"),
    (["trainer.schedule=step"], "trainer.schedule='step'"),
    (["trainer.steps=0"], "trainer.steps must be at least 1"),
    (["trainer.batch_size=0"], "trainer.batch_size must be at least 1"),
    (["trainer.warmup_steps=-1"], "trainer.warmup_steps must be >= 0"),
    (["trainer.profile_steps=-1"], "trainer.profile_steps must be >= 0"),
    (
        ["trainer.compile=true", "trainer.compile_backend=nope"],
        "trainer.compile_backend='nope' is not a torch",
    ),
    (["trainer.steps=4", "trainer.profile_steps=2"], r"trainer.profile_steps=2 needs at least 3 \+ 2"),
    (["trainer.eval_seed=0"], "trainer.eval_seed"),
    (["device=gpu7"], "device='gpu7' is not a valid torch device"),
    (["attention=flash", "attention.strict=true", "model.dropout=0.1"], "model.dropout"),
    (["model.backend=nope"], "model.backend='nope'"),
    (["attention.plugins=[no_such_module]"], "attention.plugins"),
]


@pytest.mark.parametrize(("overrides", "match"), CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_configs_fail_before_training(overrides, match):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", *overrides])
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)


def test_global_batch_must_split_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", "trainer.batch_size=16"])
    with pytest.raises(ValueError, match=r"trainer.batch_size \(16\) is the global batch"):
        validate_config(cfg)


def test_unknown_config_group_option_lists_the_choices():
    with (
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"),
        pytest.raises(Exception, match="Available options") as info,
    ):
        compose(config_name="config", overrides=["attention=nope"])
    assert "naive" in str(info.value) and "flash" in str(info.value)
