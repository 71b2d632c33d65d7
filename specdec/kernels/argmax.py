"""Last-dim argmax of a few long rows (``logits.argmax(-1)`` over the vocabulary) as a split reduction.

Why: greedy acceptance takes the argmax of every verified node's logits. On an H200, a profile of
one captured decode step of a Llama-3-8B-shaped model showed ``logits.argmax(-1)`` over one row of
128,256 bf16 logits (PyTorch's ``at::native::reduce_kernel<512,1,ArgMaxOps>``) taking 30 us, 0.6%
of the 4.6 ms step: PyTorch reduces one row with too few blocks to use the GPU.

Algorithm (two launches, no atomics, no host sync; capturable in a CUDA graph):
  1. grid ``(rows, chunks)``: each program reduces ``ITERS * BLOCK`` consecutive elements of its row
     to a partial ``(value, index)`` in fp32/int32. Chunk sizes are picked so a 128k row gives
     ~100-200 programs (128,256 -> 126 chunks of 1024) and a row never has more than
     ``MAX_CHUNKS`` chunks.
  2. grid ``(rows,)``: one program per row reduces that row's partials.

Semantics, identical to ``torch.argmax(x, -1)``:
  * the first (lowest) index among equal maxima: each lane keeps the first index of its maximum
    (strict ``>`` over increasing indices), a block takes the minimum index among the lanes that
    hold the maximum, and stage 2 does the same over the chunks' global indices;
  * NaN counts as larger than everything: if a row holds a NaN, the answer is its first NaN
    (tracked separately from the maximum of the non-NaN values, which it then overrides);
  * ``-inf`` rows, ``+0.0`` vs ``-0.0`` (equal, so the first wins) behave as in torch. fp16/bf16
    are compared after an exact upcast to fp32.

:func:`fast_argmax` is the dispatcher: the Triton path where it pays (CUDA, few long rows, see
:func:`argmax_applies`), ``torch.argmax`` everywhere else (CPU results are torch's own).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_ROWS", "MIN_COLS", "argmax_applies", "argmax_lastdim", "fast_argmax"]

# Dispatcher thresholds. H200, bf16 [1, n, 128256] in a CUDA graph (benchmarks/bench_argmax.py,
# notes/issue6.md, seventh session): torch 26.1 / 26.8 / 27.1 us at n = 1 / 16 / 64 rows, this
# kernel 3.1 / 5.0 / 11.0 us, so it takes every tree of up to 64 nodes at batch 1 (the largest
# bucket). Short rows are cheap for torch whatever their number.
MAX_ROWS = 64
MIN_COLS = 4096
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MAX_CHUNKS = 256  # partials per row for stage 2 (one block of <= 256 lanes)
_TARGET_CHUNKS = 128  # chunks per row aimed at when choosing BLOCK
_MIN_BLOCK, _MAX_BLOCK = 128, 4096
_BIG = 2**31 - 1  # "no index" sentinel (larger than any column index: V < 2**31)


@triton.jit
def _argmax_partial(
    X, PV, PI,
    V, stride_xr, ITERS, NUM_CHUNKS,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = X + row.to(tl.int64) * stride_xr
    lane = tl.arange(0, BLOCK)
    best_v = tl.full((BLOCK,), float("-inf"), tl.float32)  # per lane: max of the non-NaN values seen
    best_i = tl.full((BLOCK,), 2147483647, tl.int32)  # first index of it (_BIG: none seen yet)
    nan_i = tl.full((BLOCK,), 2147483647, tl.int32)  # first NaN index (_BIG: none)
    start = chunk * ITERS * BLOCK
    for it in range(ITERS):
        idx = start + it * BLOCK + lane  # increasing per lane: strict '>' keeps the first index
        ok = idx < V
        x = tl.load(base + idx, mask=ok, other=float("-inf")).to(tl.float32)
        is_nan = x != x  # noqa: PLR0124 (NaN test)
        nan_i = tl.where(ok & is_nan & (nan_i == 2147483647), idx, nan_i)
        num = ok & (~is_nan)
        upd = num & ((x > best_v) | (best_i == 2147483647))  # the second term takes a first -inf
        best_v = tl.where(upd, x, best_v)
        best_i = tl.where(upd, idx, best_i)
    m = tl.max(best_v, axis=0)
    i_max = tl.min(tl.where((best_i != 2147483647) & (best_v == m), best_i, 2147483647), axis=0)
    i_nan = tl.min(nan_i, axis=0)
    has_nan = i_nan != 2147483647
    out = row * NUM_CHUNKS + chunk
    tl.store(PV + out, tl.where(has_nan, float("nan"), m))
    tl.store(PI + out, tl.where(has_nan, i_nan, i_max))


@triton.jit
def _argmax_final(
    PV, PI, Y,
    NUM_CHUNKS,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    ok = c < NUM_CHUNKS
    v = tl.load(PV + row * NUM_CHUNKS + c, mask=ok, other=float("-inf"))
    i = tl.load(PI + row * NUM_CHUNKS + c, mask=ok, other=2147483647)
    is_nan = ok & (v != v)  # noqa: PLR0124
    i_nan = tl.min(tl.where(is_nan, i, 2147483647), axis=0)  # global indices: min = first chunk's NaN
    num = ok & (v == v)  # noqa: PLR0124
    m = tl.max(tl.where(num, v, float("-inf")), axis=0)
    i_max = tl.min(tl.where(num & (v == m), i, 2147483647), axis=0)  # first chunk holding the max
    res = tl.where(i_nan != 2147483647, i_nan, i_max)
    tl.store(Y + row, res.to(tl.int64))


def _launch_shape(V: int, block: int | None = None) -> tuple[int, int, int, int]:
    """``(BLOCK, ITERS, chunks, num_warps)`` for a row of ``V``: ~``_TARGET_CHUNKS`` chunks of one
    block each (128,256 -> 126 x 1024; 49,152 -> 96 x 512), looping over blocks past ``MAX_CHUNKS``."""
    if block is None:
        block = min(_MAX_BLOCK, max(_MIN_BLOCK, triton.next_power_of_2(triton.cdiv(V, _TARGET_CHUNKS))))
    n_blocks = triton.cdiv(V, block)
    iters = triton.cdiv(n_blocks, MAX_CHUNKS)
    chunks = triton.cdiv(n_blocks, iters)
    num_warps = max(1, min(8, block // 256))  # 1024 -> 4 warps: 8 elements (one 16-byte bf16 load) per thread
    return block, iters, chunks, num_warps


def argmax_lastdim(x: Tensor, *, block: int | None = None) -> Tensor:
    """``torch.argmax(x, -1)`` through the Triton split reduction (any device Triton runs on).

    Args:
        x: ``[..., V]`` fp32/fp16/bf16, ``V >= 1``; a non-contiguous last dim is copied.
        block: stage-1 block (a power of 2 >= 16); default by ``V``. Tests force small blocks to get
            many chunks and multi-block chunks (``ITERS > 1``) at interpreter-friendly sizes.
    Returns:
        ``[...]`` int64 indices, bit-identical to ``torch.argmax(x, -1)`` (first index of the
        maximum; first NaN if the row has one).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"argmax_lastdim takes {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"argmax_lastdim needs a non-empty last dim, got shape {tuple(x.shape)}")
    V = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, V)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    R = x2.shape[0]
    y = torch.empty(lead, dtype=torch.int64, device=x.device)
    if R == 0:
        return y
    block, iters, chunks, num_warps = _launch_shape(V, block)
    pv = torch.empty(R, chunks, dtype=torch.float32, device=x.device)
    pi = torch.empty(R, chunks, dtype=torch.int32, device=x.device)
    _argmax_partial[(R, chunks)](
        x2, pv, pi,
        V, x2.stride(0), iters, chunks,
        BLOCK=block, num_warps=num_warps, num_stages=1,
    )
    block_c = max(16, triton.next_power_of_2(chunks))
    _argmax_final[(R,)](
        pv, pi, y,
        chunks,
        BLOCK_C=block_c, num_warps=max(1, min(4, block_c // 64)), num_stages=1,
    )
    return y


def argmax_applies(x: Tensor, allow_interpreter: bool = False) -> bool:
    """Whether :func:`fast_argmax` takes the Triton path for ``x``: fp32/fp16/bf16 on CUDA (or on the
    CPU under ``TRITON_INTERPRET=1`` when ``allow_interpreter``, for tests), at most ``MAX_ROWS``
    rows of at least ``MIN_COLS`` elements."""
    if x.dtype not in SUPPORTED_DTYPES or x.dim() == 0:
        return False
    if not (x.is_cuda or (allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    V = x.shape[-1]
    rows = x.numel() // V if V else 0
    return V >= MIN_COLS and 1 <= rows <= MAX_ROWS


def fast_argmax(x: Tensor, allow_interpreter: bool = False) -> Tensor:
    """``x.argmax(-1)``: :func:`argmax_lastdim` where :func:`argmax_applies`, else ``torch.argmax``."""
    if argmax_applies(x, allow_interpreter):
        return argmax_lastdim(x)
    return torch.argmax(x, -1)
