"""The fused residual add + LayerNorm op (flash_attn::add_layernorm_fwd / _bwd) and its use in the layers.

Every case compares with a float64 reference of the unfused ops (``s = x + residual``,
``F.layer_norm(s)``) by ‖out − ref‖ / ‖ref‖, forward and backward (x, residual, weight, bias, with
gradients flowing into both y and s). float32 must be within 1e-5; float16 / bfloat16 within 2x the error
of the unfused torch ops in the same dtype. Outputs are poisoned with NaN (FLASH_ATTN_POISON=1), so an
element a kernel fails to write shows up as a non-finite value.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import transformer.add_layernorm as addln_module
import transformer.layers as layers_module
from attention_backends import relative_error
from transformer import DecoderLayer, EncoderLayer, Transformer
from transformer.add_layernorm import add_layernorm, fused_kernels_available

pytestmark = pytest.mark.filterwarnings("ignore:attention backend .* falling back")

WIDTHS = [1, 7, 64, 129, 1000]
ROWS = [1, 3, 257]
EPS = 1e-5
HALF_SLACK = 1e-7  # rounding noise where both errors are (nearly) zero, e.g. width 1
needs_cpu_kernels = pytest.mark.skipif(not fused_kernels_available("cpu"), reason="extension not built")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setenv("FLASH_ATTN_POISON", "1")


def seed_of(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def make_case(shape, dtype, device, seed, bias=True, grad_s=True):
    """x, residual (shape), weight, bias (N,), dy, ds (shape), drawn from one seeded generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    width = shape[-1]

    def rand(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen, device=device) * scale + shift).to(dtype)

    x = rand(*shape, scale=2.0, shift=0.5)  # a non-zero mean: the subtraction matters
    residual = rand(*shape)
    weight = rand(width, scale=0.5, shift=1.0)
    b = rand(width) if bias else None
    dy = rand(*shape)
    ds = rand(*shape) if grad_s else None
    return x, residual, weight, b, dy, ds


def run(fn, x, residual, weight, bias, dy, ds, compute_dtype=None):
    """Outputs (y, s) and gradients (x, residual, weight[, bias]) of ``fn`` with dy into y and ds into s."""
    # detach() keeps the storage (and so the alignment the test chose); requires_grad_ is on the new view.
    leaves = [t.detach() for t in (x, residual, weight, bias) if t is not None]
    if compute_dtype is not None:
        leaves = [t.to(compute_dtype) for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    b = leaves[3] if bias is not None else None
    y, s = fn(leaves[0], leaves[1], leaves[2], b)
    outputs, grads_out = [y], [dy.to(y.dtype)]
    if ds is not None:
        outputs.append(s)
        grads_out.append(ds.to(s.dtype))
    grads = torch.autograd.grad(outputs, leaves, grads_out)
    return (y, s), grads


def fused_op(x, residual, weight, bias):
    y, s, _, _ = torch.ops.flash_attn.add_layernorm_fwd(x, residual, weight, bias, EPS)
    return y, s


def fused_node(y):
    """Whether ``y`` came out of the fused op (its autograd node, csrc/add_layernorm_autograd.cpp)."""
    return y.grad_fn is not None and "AddLayerNormFunction" in y.grad_fn.name()


def unfused(x, residual, weight, bias):
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, EPS), s


def reference(x, residual, weight, bias):
    """The unfused formula step by step (run in float64): exact zeros stay exact, e.g. for width 1."""
    s = x + residual
    centred = s - s.mean(dim=-1, keepdim=True)
    var = (centred * centred).mean(dim=-1, keepdim=True)
    y = centred / torch.sqrt(var + EPS) * weight
    return (y if bias is None else y + bias), s


def check_case(x, residual, weight, bias, dy, ds):
    """The fused op against the float64 reference, bounded by the unfused ops' error in the same dtype."""
    ref_out, ref_grads = run(reference, x, residual, weight, bias, dy, ds, compute_dtype=torch.float64)
    out, grads = run(fused_op, x, residual, weight, bias, dy, ds)
    base_out, base_grads = run(unfused, x, residual, weight, bias, dy, ds)
    names = ["y", "s", "dx", "dresidual", "dweight"] + (["dbias"] if bias is not None else [])
    pairs = list(zip(out, base_out, ref_out, strict=True)) + list(
        zip(grads, base_grads, ref_grads, strict=True)
    )
    for name, (got, base, ref) in zip(names, pairs, strict=True):
        assert got.dtype == x.dtype and got.shape == ref.shape, name
        assert torch.isfinite(got).all(), f"{name} has NaN/inf (unwritten or poisoned elements)"
        err, base_err = relative_error(got, ref), relative_error(base, ref)
        if x.dtype == torch.float32:
            assert err <= 1e-5, (name, err, base_err)
        else:
            assert err <= 2 * base_err + HALF_SLACK, (name, err, base_err)


# ------------------------------------------------------------------------------------- CPU op


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", WIDTHS)
def test_cpu_forward_backward_match_reference(width, rows, dtype):
    check_case(*make_case((rows, width), dtype, "cpu", seed_of(width, rows, dtype)))


@needs_cpu_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad_s", [True, False])
def test_cpu_without_bias_or_gradient_into_s(bias, grad_s):
    for dtype in (torch.float32, torch.bfloat16):
        case = make_case((2, 5, 129), dtype, "cpu", seed_of(bias, grad_s, dtype), bias=bias, grad_s=grad_s)
        check_case(*case)


@needs_cpu_kernels
def test_cpu_strided_rows_and_empty_input():
    x = torch.randn(6, 4, 33).transpose(0, 1)  # last dim contiguous, the others not
    residual, weight, bias = torch.randn(4, 6, 33), torch.randn(33), torch.randn(33)
    y, s, mean, rstd = torch.ops.flash_attn.add_layernorm_fwd(x, residual, weight, bias, EPS)
    ref_y, ref_s = unfused(x.double(), residual.double(), weight.double(), bias.double())
    assert relative_error(y, ref_y) < 1e-6 and relative_error(s, ref_s) < 1e-6
    assert mean.shape == rstd.shape == (4, 6) and mean.dtype == torch.float32
    y, s, mean, _ = torch.ops.flash_attn.add_layernorm_fwd(
        torch.empty(0, 8), torch.empty(0, 8), weight[:8], None, EPS
    )
    assert y.shape == s.shape == (0, 8) and mean.shape == (0,)
    dx, dw, db = torch.ops.flash_attn.add_layernorm_bwd(
        torch.empty(0, 8), None, s, mean, torch.empty(0), weight[:8]
    )
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x, residual, weight, bias, dy, ds = make_case((3, 5, 24), dtype, "cpu", seed_of("opcheck", dtype))
    fwd, bwd = torch.ops.flash_attn.add_layernorm_fwd.default, torch.ops.flash_attn.add_layernorm_bwd.default
    leaves = [t.clone().requires_grad_(True) for t in (x, residual, weight, bias)]
    opcheck(fwd, (*leaves, EPS))
    opcheck(fwd, (*leaves[:3], None, EPS))
    _, s, mean, rstd = fwd(x, residual, weight, bias, EPS)
    opcheck(bwd, (dy, ds, s, mean, rstd, weight))
    opcheck(bwd, (dy, None, s, mean, rstd, weight))


# -------------------------------------------------------------------------------------- bad inputs


def op_args(**overrides):
    args = {
        "x": torch.randn(3, 8),
        "residual": torch.randn(3, 8),
        "weight": torch.randn(8),
        "bias": torch.randn(8),
        "eps": EPS,
    }
    return {**args, **overrides}


@needs_cpu_kernels
@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"weight": torch.randn(9)}, ValueError, r"expected weight of shape \(N,\) with N = 8"),
        ({"bias": torch.randn(7)}, ValueError, r"expected bias of shape \(N,\) with N = 8"),
        ({"residual": torch.randn(3, 9)}, ValueError, r"expected residual of x's shape \[3, 8\]"),
        ({"residual": torch.randn(3, 8, dtype=torch.bfloat16)}, TypeError, "residual to have x's dtype"),
        ({"weight": torch.randn(8, dtype=torch.float16)}, TypeError, "weight to have x's dtype"),
        ({"residual": torch.randn(3, 8, device="meta")}, ValueError, "expected residual on x's device cpu"),
        ({"weight": torch.randn(8, device="meta")}, ValueError, "expected weight on x's device cpu"),
        ({"x": torch.randn(8, 3).t()}, ValueError, "expected x to have a contiguous last dim"),
        (
            {"residual": torch.randn(3, 16)[:, ::2]},
            ValueError,
            "expected residual to have a contiguous last dim",
        ),
        ({"x": torch.randn(3, 0), "residual": torch.randn(3, 0)}, ValueError, "last dim of at least 1"),
        ({"x": torch.tensor(1.0), "residual": torch.tensor(1.0)}, ValueError, "at least 1 dim"),
        ({"eps": -1.0}, ValueError, "eps to be finite and >= 0"),
        (
            {
                "x": torch.randn(3, 8).double(),
                "residual": torch.randn(3, 8).double(),
                "bias": None,
                "weight": torch.randn(8).double(),
            },
            TypeError,
            "expected x to be float32, float16 or bfloat16, got Double",
        ),
    ],
)
def test_forward_op_rejects_bad_inputs(overrides, error, match):
    args = op_args(**overrides)
    with pytest.raises(error, match=match):
        torch.ops.flash_attn.add_layernorm_fwd(**args)


@needs_cpu_kernels
def test_backward_op_rejects_bad_inputs():
    _, s, mean, rstd = torch.ops.flash_attn.add_layernorm_fwd(**op_args())
    weight, dy = torch.randn(8), torch.randn(3, 8)
    bwd = torch.ops.flash_attn.add_layernorm_bwd
    with pytest.raises(ValueError, match="expected dy of s's shape"):
        bwd(torch.randn(3, 9), None, s, mean, rstd, weight)
    with pytest.raises(TypeError, match="expected ds to have s's dtype"):
        bwd(dy, dy.bfloat16(), s, mean, rstd, weight)
    with pytest.raises(TypeError, match="expected mean to be float32"):
        bwd(dy, None, s, mean.double(), rstd, weight)
    with pytest.raises(ValueError, match=r"expected rstd of shape s.shape\[:-1\]"):
        bwd(dy, None, s, mean, rstd[:2], weight)
    with pytest.raises(ValueError, match="expected weight of shape"):
        bwd(dy, None, s, mean, rstd, torch.randn(4))
    with pytest.raises(ValueError, match="expected dy on s's device cpu, got meta"):
        bwd(dy.to("meta"), None, s, mean, rstd, weight)


def test_function_rejects_bad_arguments():
    x, r, w = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4)
    with pytest.raises(TypeError, match="expected x to be a Tensor"):
        add_layernorm([1.0, 2.0], r, w)
    with pytest.raises(TypeError, match="bias to be a Tensor or None"):
        add_layernorm(x, r, w, 1.0)
    with pytest.raises(TypeError, match="eps to be a float"):
        add_layernorm(x, r, w, None, "1e-5")
    with pytest.raises(ValueError, match="eps to be finite"):
        add_layernorm(x, r, w, None, float("nan"))
    with pytest.raises(TypeError, match="floating-point"):
        add_layernorm(x.long(), r, w)
    with pytest.raises(ValueError, match=r"residual of x's shape \(2, 4\)"):
        add_layernorm(x, torch.randn(4), w)
    with pytest.raises(ValueError, match=r"weight of shape \(N,\) = \(4,\)"):
        add_layernorm(x, r, torch.randn(5))
    with pytest.raises(ValueError, match="expected residual on x's device cpu, got meta"):
        add_layernorm(x, r.to("meta"), w)


# ------------------------------------------------------------------------ the function: fused or not


def test_function_uses_the_op_and_matches_unfused():
    x, r, w, b, dy, ds = make_case((4, 3, 40), torch.float32, "cpu", seed_of("function"))
    out, grads = run(add_layernorm, x, r, w, b, dy, ds)
    if fused_kernels_available("cpu"):
        assert fused_node(out[0])
    base_out, base_grads = run(unfused, x, r, w, b, dy, ds)
    for got, ref in zip(out + grads, base_out + base_grads, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["float64", "no kernels", "strided last dim", "weight dtype", "autocast bf16 inputs"],
)
def test_function_falls_back_to_unfused_ops(case, monkeypatch):
    x, r, w, b, _, _ = make_case((3, 16), torch.float32, "cpu", seed_of("fallback", case))
    if case == "float64":
        x, r, w, b = x.double(), r.double(), w.double(), b.double()
    elif case == "no kernels":
        monkeypatch.setitem(addln_module._KERNELS, "cpu", False)
    elif case == "strided last dim":
        x = torch.stack([x, x], dim=-1)[..., 0]
    elif case == "weight dtype":
        x, r = x.bfloat16(), r.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast bf16 inputs"):
        if case == "autocast bf16 inputs":
            x, r, w, b = x.bfloat16(), r.bfloat16(), w.bfloat16(), b.bfloat16()
        x.requires_grad_(True)
        y, s = add_layernorm(x, r, w, b, EPS)
        ref_y, ref_s = unfused(x, r, w, b)
    assert not fused_node(y)  # the unfused ops ran
    assert y.dtype == ref_y.dtype and torch.equal(y, ref_y) and torch.equal(s, ref_s)


@needs_cpu_kernels
def test_function_promotes_mixed_dtypes_like_add():
    x = torch.randn(5, 32)
    r = torch.randn(5, 32).bfloat16()
    w, b = torch.randn(32), torch.randn(32)
    y, s = add_layernorm(x, r, w, b, EPS)
    ref_y, ref_s = unfused(x, r, w, b)
    assert s.dtype == torch.float32 and torch.equal(s, ref_s)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 everywhere: fused under autocast too
        y_ac, _ = add_layernorm(x.requires_grad_(), r, w, b, EPS)
    assert y_ac.dtype == torch.float32 and fused_node(y_ac)


@needs_cpu_kernels
def test_gradient_only_through_the_sum():
    x, r, w, b, _, ds = make_case((3, 10), torch.float32, "cpu", seed_of("sum only"))
    leaves = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    _, s = add_layernorm(*leaves, EPS)
    dx, dr, dw, db = torch.autograd.grad(s, leaves, ds, allow_unused=True)
    assert torch.equal(dx, ds) and torch.equal(dr, ds) and dw is None and db is None


# ------------------------------------------------------------------------------------------ layers

D, H, FF, B, S, T = 16, 4, 32, 3, 6, 5


def padding(n: int, length: int) -> torch.Tensor:
    mask = torch.zeros(n, length, dtype=torch.bool)
    mask[0, -2:] = True
    return mask


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the layers' add_layernorm calls that ran the compiled op."""
    calls = {"fused": 0, "total": 0}

    def spy(*args, **kwargs):
        y, s = add_layernorm(*args, **kwargs)
        calls["total"] += 1
        calls["fused"] += fused_node(y)
        return y, s

    monkeypatch.setattr(layers_module, "add_layernorm", spy)
    return calls


def pair(layer_class, **kwargs):
    torch.manual_seed(0)
    fused = layer_class(D, H, FF, **kwargs)
    plain = layer_class(D, H, FF, fused_add_norm=False, **kwargs)
    assert fused.fused_add_norm and not plain.fused_add_norm
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def assert_same_outputs_and_grads(fused, plain, call):
    torch.manual_seed(1)
    out_f = call(fused)
    torch.manual_seed(1)
    out_p = call(plain)
    torch.testing.assert_close(out_f, out_p, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out_f)
    params_f = [p for _, p in sorted(fused.named_parameters())]
    params_p = [p for _, p in sorted(plain.named_parameters())]
    grads_f = torch.autograd.grad(out_f, params_f, grad_out, allow_unused=True)
    grads_p = torch.autograd.grad(out_p, params_p, grad_out, allow_unused=True)
    for (name, _), gf, gp in zip(sorted(fused.named_parameters()), grads_f, grads_p, strict=True):
        assert (gf is None) == (gp is None), name
        if gf is not None:
            torch.testing.assert_close(gf, gp, atol=1e-5, rtol=1e-5, msg=name)


@needs_cpu_kernels
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_encoder_layer_fused_matches_unfused(norm_first, bias, fused_calls):
    fused, plain = pair(EncoderLayer, dropout=0.1, norm_first=norm_first, bias=bias)  # train mode: dropout on
    x, kpm = torch.randn(B, S, D, requires_grad=True), padding(B, S)
    assert_same_outputs_and_grads(fused, plain, lambda m: m(x, src_key_padding_mask=kpm, is_causal=True))
    # post-norm: both add + norm pairs; pre-norm: the add after attention with norm2 (the last add is plain)
    assert fused_calls == {"fused": 1 if norm_first else 2, "total": 1 if norm_first else 2}


@needs_cpu_kernels
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_fused_matches_unfused(norm_first, fused_calls):
    fused, plain = pair(DecoderLayer, dropout=0.1, norm_first=norm_first)
    tgt, memory = torch.randn(B, T, D, requires_grad=True), torch.randn(B, S, D, requires_grad=True)
    kwargs = {"tgt_key_padding_mask": padding(B, T), "memory_key_padding_mask": padding(B, S)}
    assert_same_outputs_and_grads(fused, plain, lambda m: m(tgt, memory, **kwargs))
    assert fused_calls == {"fused": 2 if norm_first else 3, "total": 2 if norm_first else 3}


@needs_cpu_kernels
@pytest.mark.parametrize("norm_first", [False, True])
def test_model_fused_matches_unfused_with_cache(norm_first):
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        models.append(
            Transformer(
                11, 13, D, H, 2, 2, FF, dropout=0.0, max_len=16, norm_first=norm_first, fused_add_norm=fused
            )
        )
    fused, plain = (m.eval() for m in models)
    assert not any(layer.fused_add_norm for layer in plain.decoder.layers)
    src = torch.randint(3, 11, (B, S), generator=torch.Generator().manual_seed(3))
    tgt = torch.randint(3, 13, (B, T), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fused(src, tgt), plain(src, tgt), atol=1e-5, rtol=1e-5)
    for use_cache in (True, False):
        got = fused.generate(src, 6, bos_id=1, eos_id=2, use_cache=use_cache)
        assert torch.equal(got, plain.generate(src, 6, bos_id=1, eos_id=2, use_cache=use_cache))


class GatedFeedForwardLayer(EncoderLayer):
    """A subclass with its own feed-forward block."""

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(F.silu(self.linear1(x)) * torch.sigmoid(self.linear1(x))))


@pytest.mark.parametrize("norm_first", [False, True])
def test_subclass_and_non_layernorm_norms(norm_first, fused_calls):
    fused, plain = pair(GatedFeedForwardLayer, dropout=0.0, norm_first=norm_first)
    x = torch.randn(B, S, D, requires_grad=True)
    assert_same_outputs_and_grads(fused, plain, lambda m: m(x))
    # A norm that is not an affine LayerNorm runs unfused.
    for layer in (fused, plain):
        layer.norm2 = nn.RMSNorm(D)
        layer.norm1 = nn.LayerNorm(D, elementwise_affine=False)
    calls_before = dict(fused_calls)
    assert_same_outputs_and_grads(fused, plain, lambda m: m(x))
    assert fused_calls == calls_before


# -------------------------------------------------------------------------------------------- CUDA

CUDA_WIDTHS = [1, 7, 64, 129, 512, 1000, 1024, 2048, 4096, 8192, 12288]
CUDA_ROWS = [1, 3, 257, 2049]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _require_cuda_kernels():
    assert fused_kernels_available("cuda"), "the extension was built without the CUDA add_layernorm kernels"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows", CUDA_ROWS)
@pytest.mark.parametrize("width", CUDA_WIDTHS)
def test_cuda_forward_backward_match_reference(width, rows, dtype):
    _require_cuda_kernels()
    check_case(*make_case((rows, width), dtype, "cuda", seed_of("cuda", width, rows, dtype)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("variant", ["no bias", "no ds", "misaligned", "many rows", "3-d"])
def test_cuda_variants(dtype, variant):
    """Bias / ds absent, inputs off 16-byte alignment (the scalar kernels), grid-stride over many rows."""
    _require_cuda_kernels()
    shape = {"many rows": (70001, 64), "3-d": (4, 33, 1024)}.get(variant, (257, 1024))
    case = list(
        make_case(
            shape,
            dtype,
            "cuda",
            seed_of("cuda variant", variant, dtype),
            bias=variant != "no bias",
            grad_s=variant != "no ds",
        )
    )
    if variant == "misaligned":
        for i in (0, 1, 4):  # x, residual, dy: views one element into a larger buffer
            buffer = torch.empty(case[i].numel() + 1, dtype=dtype, device="cuda")
            buffer[1:].copy_(case[i].flatten())
            case[i] = buffer[1:].view(shape)
            assert case[i].data_ptr() % 16 != 0
    check_case(*case)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_opcheck_and_determinism(dtype):
    _require_cuda_kernels()
    x, residual, weight, bias, dy, ds = make_case((67, 1024), dtype, "cuda", seed_of("cuda opcheck", dtype))
    fwd, bwd = torch.ops.flash_attn.add_layernorm_fwd.default, torch.ops.flash_attn.add_layernorm_bwd.default
    opcheck(fwd, (*[t.clone().requires_grad_(True) for t in (x, residual, weight, bias)], EPS))
    _, s, mean, rstd = fwd(x, residual, weight, bias, EPS)
    opcheck(bwd, (dy, ds, s, mean, rstd, weight))
    first = bwd(dy, ds, s, mean, rstd, weight)
    second = bwd(dy, ds, s, mean, rstd, weight)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # no atomics: bitwise reproducible


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rejects_mixed_devices():
    _require_cuda_kernels()
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in op_args().items()}
    with pytest.raises(ValueError, match="expected residual on x's device cuda:0, got cpu"):
        torch.ops.flash_attn.add_layernorm_fwd(**{**args, "residual": torch.randn(3, 8)})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("norm_first", [False, True])
def test_cuda_layers_fused_match_unfused(norm_first):
    _require_cuda_kernels()
    fused, plain = pair(EncoderLayer, dropout=0.0, norm_first=norm_first)
    fused, plain = fused.cuda(), plain.cuda()
    x = torch.randn(B, S, D, device="cuda", requires_grad=True)
    assert_same_outputs_and_grads(fused, plain, lambda m: m(x))


# -------------------------------------------------------------------------------------- benchmark


def test_benchmark_cli_writes_table_and_files(tmp_path, capsys, load_script):
    cli = load_script("bench_add_layernorm")
    cli.main(
        ["--device", "cpu", "--shapes", "33x7", "--warmup-ms", "0", "--rep-ms", "1", "--out", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    table = printed[printed.index("| dtype") :].strip().splitlines()
    assert len(table) == 2 + 2  # header, rule, fwd, fwd_bwd
    assert "speed-up" in table[0] and table[2].split("|")[4].strip() == "fwd"
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0] == "device,dtype,rows,width,direction,impl,us,gbps,status" and len(rows) == 1 + 4
    status = "ok" if fused_kernels_available("cpu") else "no kernels"
    last = rows[-1].split(",")
    assert last[4:6] == ["fwd_bwd", "fused"] and last[-1] == status
    assert "| dtype" in (tmp_path / "summary.md").read_text()
