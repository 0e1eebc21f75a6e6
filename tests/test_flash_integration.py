"""The flash backend as users meet it: torch.compile, the seed's modules, the JIT build and the fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attention_backends as ab
from transformer import EncoderLayer
from transformer.flash_attention import CUDAMultiHeadAttention, FlashAttention, flash_attention_cuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def built():
    ab.load_extension()


def test_compiled_model_with_flash_has_no_graph_break():
    torch.manual_seed(0)
    layer = EncoderLayer(64, 2, dim_feedforward=128, dropout=0.0, backend="flash").eval()
    x = torch.randn(2, 9, 64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    with ab.use_backend("flash", strict=True), torch.no_grad():
        eager = layer(x, src_key_padding_mask=pad)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.allclose(compiled(x, src_key_padding_mask=pad), eager, atol=1e-5)


def test_compiled_flash_backward_matches_eager():
    q, k, v = (torch.randn(2, 4, 17, 32, requires_grad=True) for _ in range(3))

    def loss(q, k, v):
        return ab.attention(q, k, v, backend="flash", strict=True, is_causal=True)[0].square().sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(q, k, v), (q, k, v))
    for e, c in zip(eager, compiled, strict=True):
        assert torch.allclose(e, c, atol=1e-5)


def test_flash_attention_module_weights_are_exact():
    torch.manual_seed(0)
    module = FlashAttention(32, 4)
    x, mem = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[0, 8:] = True
    out, weights = module(x, mem, mem, key_padding_mask=pad, need_weights=True)
    assert out.shape == (2, 7, 32) and weights.shape == (2, 4, 7, 11)
    with ab.use_backend("naive"):
        module.backend = "naive"
        ref_out, ref_weights = module(x, mem, mem, key_padding_mask=pad, need_weights=True)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(weights, ref_weights, atol=1e-6)
    assert module(x, mem, mem)[1] is None


def test_cuda_mha_as_self_attn_of_an_encoder_layer_subclass():
    class FlashEncoderLayer(EncoderLayer):
        def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
            super().__init__(d_model, num_heads, dim_feedforward=64, dropout=dropout)
            self.self_attn = CUDAMultiHeadAttention(d_model, num_heads, dropout)

    layer = FlashEncoderLayer(32, 4)
    x = torch.randn(3, 10, 32, requires_grad=True)
    with ab.track_backends() as used:
        y = layer(x)
        y.sum().backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()
    assert used == {"flash": 1}


def test_functional_entry():
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, _ = flash_attention_cuda(q, k, v, is_causal=True, strict=True)
    ref, _ = ab.reference_attention(q, k, v, is_causal=True)
    assert ab.relative_error(out, ref) < 1e-5


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=900,
        check=False,
    )


def test_missing_extension_falls_back_with_one_line_warning():
    result = run_python(
        """
        import warnings, torch, attention_backends as ab
        q = torch.randn(1, 2, 4, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ab.attention(q, q, q, backend="flash")
            ab.attention(q, q, q, backend="flash")
        print(ab.last_backend_used(), len(caught))
        print(caught[0].message)
        """,
        FLASH_ATTN_DISABLE_PREBUILT="1",
    )
    assert result.returncode == 0, result.stderr
    used, count = result.stdout.splitlines()[0].split()
    message = result.stdout.splitlines()[1]
    assert used == "sdpa" and count == "1"
    assert "flash extension is not built" in message and "compile_cuda_extension" in message


def test_build_lock_times_out_instead_of_hanging(tmp_path):
    from attention_backends.extension import _acquire

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(tmp_path / "x.lock")!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("locked", flush=True)
            time.sleep(30)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TimeoutError, match="held"):
            _acquire(tmp_path / "x.lock", timeout=1.0)
    finally:
        holder.kill()
        holder.wait()
    os.close(_acquire(tmp_path / "x.lock", timeout=5.0))  # a dead holder's lock is released by the OS


@pytest.mark.slow
def test_two_processes_build_just_in_time_at_once(tmp_path):
    code = f"""
        import torch, attention_backends as ab
        ab.compile_cuda_extension(build_dir={str(tmp_path)!r}, with_cuda=False)
        q = torch.randn(1, 2, 9, 16)
        out, _ = ab.attention(q, q, q, backend="flash", strict=True, is_causal=True)
        ref, _ = ab.reference_attention(q, q, q, is_causal=True)
        print(ab.relative_error(out, ref))
    """
    env = {**os.environ, "FLASH_ATTN_DISABLE_PREBUILT": "1", "MAX_JOBS": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, err[-3000:]
        assert float(out.strip().splitlines()[-1]) < 1e-5
