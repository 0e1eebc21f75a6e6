"""The CUDA test matrix of our kernels alone, for compute-sanitizer (memcheck, racecheck, synccheck).

Runs every (dtype, head dim, shape, mask) case of tests/test_flash_cuda.py forward and backward, plus the
long, non-contiguous and seqlens_k cases, without the float64 reference or SDPA, so that the sanitizer
spends its time on our kernels. Each part can be chosen: ``python scripts/sanitizer_case.py attention``;
``SANITIZER_CASE_TRACE=1`` prints every call before it runs (to find where a run stops).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attention_backends as ab
from tests.test_flash_cuda import DTYPES, HEAD_DIMS, MASKS, SHAPES, make

TRACE = os.environ.get("SANITIZER_CASE_TRACE") == "1"  # print every call before it runs


def run_attention(q, k, v, kwargs) -> None:
    if TRACE:
        print(f"call {q.dtype} q {tuple(q.shape)} k {tuple(k.shape)} {sorted(kwargs)}", flush=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = ab.attention(*leaves, backend="flash", strict=True, **kwargs)
    out.float().sum().backward()


def attention_part() -> int:
    calls = 0
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for shape in SHAPES:
                for mask_kind in MASKS:
                    run_attention(*make(shape, head_dim, dtype, mask_kind, seed=calls))
                    calls += 1
        run_attention(*make((1, 2, 2, 1000, 2049), 128, dtype, "causal", seed=calls))
        run_attention(*make((2, 4, 2, 77, 131), 64, dtype, "padding+causal", seed=calls, non_contiguous=True))
        calls += 2
    q = torch.randn(3, 2, 5, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(3, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([40, 17, 0], device="cuda", dtype=torch.int32)
    for causal in (False, True):
        torch.ops.flash_attn.fwd(q, k, k, None, lengths, 0.125, causal)
        calls += 1
    return calls


def sm90_tiles_part() -> int:
    """The wgmma forward's tiles that the small shapes of the attention part do not reach: the default tiles
    at D = 128 (128-row blocks; every small grid there takes the 64-row tiles, FLASH_ATTN_FWD_SM90_SMALL_GRID)
    and the long-key tiles at D = 64 (192-row blocks; FLASH_ATTN_FWD_SM90_LONG_KEYS)."""
    calls = 0
    tiles = {128: {"FLASH_ATTN_FWD_SM90_SMALL_GRID": "0"}, 64: {"FLASH_ATTN_FWD_SM90_LONG_KEYS": "1"}}
    for head_dim, switches in tiles.items():
        with mock.patch.dict(os.environ, {"FLASH_ATTN_FWD_SM90_SMALL_GRID": "0", **switches}):
            for dtype in DTYPES:
                for shape in SHAPES:
                    for mask_kind in MASKS:
                        run_attention(*make(shape, head_dim, dtype, mask_kind, seed=calls))
                        calls += 1
                run_attention(*make((1, 2, 2, 1000, 2049), head_dim, dtype, "causal", seed=calls))
                calls += 1
    return calls


def sm90_backward_part() -> int:
    """The Hopper backward (FLASH_ATTN_BWD_WGMMA=1) over the attention part's shapes and masks, D = 64 and 128."""
    calls = 0
    with mock.patch.dict(os.environ, {"FLASH_ATTN_BWD_WGMMA": "1"}):
        for dtype in DTYPES:
            for head_dim in (64, 128):
                for shape in SHAPES:
                    for mask_kind in MASKS:
                        run_attention(*make(shape, head_dim, dtype, mask_kind, seed=calls))
                        calls += 1
    return calls


def decode_part(splits: str | None = None, dtype_name: str | None = None) -> int:
    """The split-KV path (forced split counts) on decode shapes, every dtype, head dim and mask.

    ``decode:3`` or ``decode:64:bfloat16`` runs one split count (and one dtype) only: racecheck's host
    memory grows by about 0.6 GB per call here, so the whole part (240 calls) exceeds a 128 GiB machine.
    """
    calls = 0
    for n in (splits,) if splits else ("3", "64"):
        os.environ["FLASH_ATTN_NUM_SPLITS"] = n
        for dtype in DTYPES:
            if dtype_name and dtype != getattr(torch, dtype_name):
                continue
            for head_dim in HEAD_DIMS:
                for shape in ((1, 8, 2, 1, 1000), (2, 4, 4, 3, 129), (1, 8, 1, 16, 37)):
                    for mask_kind in MASKS:
                        run_attention(*make(shape, head_dim, dtype, mask_kind, seed=calls))
                        calls += 1
    del os.environ["FLASH_ATTN_NUM_SPLITS"]
    return calls


def layernorm_part() -> int:
    """The fused residual add + LayerNorm kernels, forward and backward: vector and scalar paths."""
    from transformer.add_layernorm import add_layernorm

    calls = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for rows, width in ((1, 1), (3, 7), (257, 129), (64, 1024), (7, 8192), (5, 12288)):
            x, r = (
                torch.randn(rows, width, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2)
            )
            w = torch.randn(width, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(width, device="cuda", dtype=dtype, requires_grad=True)
            y, s = add_layernorm(x, r, w, b, 1e-5)
            (y.float().sum() + s.float().square().sum()).backward()
            calls += 1
    return calls


PARTS: dict[str, Callable[[], int]] = {
    "attention": attention_part,
    "sm90tiles": sm90_tiles_part,
    "sm90bwd": sm90_backward_part,
    "decode": decode_part,
    "layernorm": layernorm_part,
}


def main(names: list[str]) -> None:
    os.environ["FLASH_ATTN_POISON"] = "1"  # outputs start as NaN, as in the tests
    ab.load_extension()
    for name in names or list(PARTS):
        part, *options = name.split(":")  # e.g. decode:64:bfloat16
        start = time.perf_counter()
        calls = PARTS[part](*options)
        torch.cuda.synchronize()
        print(f"sanitizer case {name}: {calls} calls in {time.perf_counter() - start:.1f} s", flush=True)
    print("sanitizer case done")


if __name__ == "__main__":
    main(sys.argv[1:])
