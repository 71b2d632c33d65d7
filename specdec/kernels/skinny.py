"""Few-row linear (``2 <= M <= 64``): ``y = x @ W.T (+ b)`` on tensor cores, weights read once.

Why: a verify step of a few to 64 tree nodes is, like the one-token step, a chain of weight reads,
but cuBLAS runs it with split-K kernels plus a separate reduce launch per linear. On an H200 at
Llama-3-8B shapes (``notes/issue6.md``, sixth session) a 16-node bf16 verify spent 4.58 ms in GEMMs
(160 of them with a 1.7 µs reduce kernel) where the one-token step's GEMVs take 3.89 ms, so verify
grew 1.25x from one node to 16 while the weights read are the same.

Here each program owns ``BLOCK_N`` whole weight rows and all ``M`` rows of ``x`` (padded to
``BLOCK_M`` >= 16 for the MMA): it walks K in ``BLOCK_K`` chunks, software-pipelined over
``num_stages``, multiplies ``W_tile [BLOCK_N, BLOCK_K] @ x_tile.T [BLOCK_K, BLOCK_M]`` on tensor cores
with fp32 accumulation, and writes ``y.T``. No split-K, one launch, a fixed summation order per
output (so replays are bit-reproducible). The weight stream is marked evict-first so that ``x``,
which every program re-reads, stays in L2. Inside a step captured with programmatic dependent
launch (:mod:`specdec.kernels.pdl`) it launches early and waits for the previous kernel before its
first load. This is the "swap AB" layout that skinny-GEMM kernels use
(e.g. TensorRT-LLM's and vLLM's small-batch GEMMs): the long dimension, the weight rows, takes the
MMA's M side.

fp32 takes the same kernel with the dots in **3xTF32** (``tl.dot(..., input_precision="tf32x3")``:
each operand split into a TF32 high part and a TF32 remainder, three tensor-core products
``hi*hi + hi*lo + lo*hi`` summed in fp32; the scheme of NVIDIA's CUTLASS "3xTF32" fp32 emulation).
Each product keeps ~21 of fp32's 24 significant bits, and with K-chunked fp32 accumulation the
result is as close to the fp64 product as cuBLAS's IEEE fp32 GEMM: on an H200 at SmolLM2-135M's
shapes the largest error relative to the output's scale was 1.7e-7 - 2.7e-7 against cuBLAS's
1.9e-7 - 1.0e-6, at 1.2 - 3.6x cuBLAS's speed for 16 rows (``notes/issue6.md``, ninth session).
Plain IEEE fp32 dots run on CUDA cores and lost to cuBLAS (0.4 - 0.8x). Set
:data:`FP32_TF32X3` to False to keep fp32 linears on cuBLAS.

:mod:`specdec.gemm_pick` times it against cuBLAS per shape and uses it only where it is faster.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl as _pdl
from .gemv import group_args, group_tile

__all__ = ["skinny_linear", "skinny_group", "skinny_applies", "SKINNY_CONFIGS", "SKINNY_MAX_M", "SKINNY_DTYPES",
           "FP32_TF32X3"]

SKINNY_MAX_M = 64
SKINNY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # fp32: 3xTF32 dots (module docstring)
# process-wide: may fp32 linears take the 3xTF32 kernel? (False: cuBLAS only; env SPECDEC_FP32_TF32X3=0)
FP32_TF32X3 = os.environ.get("SPECDEC_FP32_TF32X3", "1") != "0"

# Launch shapes the picker tries: the winners of the H200 probe over Llama-3-8B's bf16 shapes at
# M = 2..64 (``notes/issue6.md``, sixth session): whole-K 256- and 128-wide steps for the q/o, MLP
# and head shapes; split-K 2 for ``down`` (K = 14336); split-K 8 for the narrow k/v (N = 1024, where
# 16 tiles of 64 rows would leave most SMs idle).
# Added in the eighth session, timed on the model's own groups (H200, ``notes/issue6.md``): 6
# stages for q+k+v at 64 rows (17.95 -> 16.74 µs), 128-row tiles on two warpgroups for gate+up
# (16 rows 58.32 -> 57.41, 64 rows 62.92 -> 62.06 µs) and the head (64 rows 259.9 -> 255.9 µs).
SKINNY_CONFIGS: tuple[dict, ...] = (
    dict(BLOCK_N=64, BLOCK_K=256, num_warps=4, num_stages=5, SPLIT_K=1),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=1),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, SPLIT_K=1),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=6, SPLIT_K=1),
    dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, SPLIT_K=1),
    dict(BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=4, SPLIT_K=1),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=5, SPLIT_K=2),
    dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4, SPLIT_K=8),
    # fp32 (3xTF32, ``F32``): the five launch shapes that came within 0.5 % of the best of 36 at every
    # SmolLM2-135M group (q+k+v, o, gate+up, down, head) at 16 and 64 rows (H200, ninth session)
    dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3, SPLIT_K=4, F32=True),
    dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=3, SPLIT_K=4, F32=True),
    dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3, SPLIT_K=1, F32=True),
    dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=3, SPLIT_K=4, F32=True),
    dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=3, SPLIT_K=4, F32=True),
)


@triton.jit(do_not_specialize=["N0", "N1", "N2", "N3", "S1", "S2", "S3"])
def _skinny(
    X, SCALE, WS, CNT,
    M, K, k_per_split,
    stride_xm, stride_wn,
    W0, W1, W2, W3, Y0, Y1, Y2, Y3, B0, B1, B2, B3,
    N0, N1, N2, N3, S1, S2, S3,
    NUM_GROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    TF32X3: tl.constexpr = False,
    PDL: tl.constexpr = False,  # launched early (programmatic dependent launch, :mod:`specdec.kernels.pdl`)
):
    # Up to 4 linears of the same x in one launch (``group_tile``: program ``pid`` owns BLOCK_N
    # rows of one of them); y_i is a contiguous [M, N_i]. NUM_GROUPS = 1 is the plain skinny GEMM.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)  # which K chunk (SPLIT_K > 1)
    W, Y, BIAS, N, tile = group_tile(pid, S1, S2, S3, W0, W1, W2, W3, Y0, Y1, Y2, Y3,
                                     B0, B1, B2, B3, N0, N1, N2, N3, NUM_GROUPS)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns = weight rows
    rm = tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x
    n_ok = rn < N
    m_ok = rm < M
    w_rows = W + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    x_rows = X + rm[:, None] * stride_xm  # [BLOCK_M, 1]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if PDL:  # started while the previous kernel drains: wait for it before the first load (x and the
        # split-K counters are step buffers; the pipelined loop loads W and x together)
        tl.extra.cuda.gdc_wait()
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = rk < k_hi
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        if TF32X3:  # fp32: three TF32 tensor-core products per dot, fp32 sums (module docstring)
            acc = tl.dot(w, tl.trans(x), acc, input_precision="tf32x3")  # [BLOCK_N, BLOCK_M]
        else:
            acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)  # [BLOCK_N, BLOCK_M] (int8 weights: exact in 16 bits)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # (they still wait for this whole grid in their gdc_wait)
    if HAS_SCALE:  # int8 weights with one scale per output channel: y = (x @ q.T) * s (one linear)
        acc *= tl.load(SCALE + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    store_y(acc, Y, BIAS, WS, CNT, rn, rm, n_ok, m_ok, N, pid, pid_k, HAS_BIAS, BLOCK_N, BLOCK_M, SPLIT_K)


@triton.jit
def store_y(acc, Y, BIAS, WS, CNT, rn, rm, n_ok, m_ok, stride_ym, pid, pid_k,
            HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write a finished ``acc [BLOCK_N, BLOCK_M]`` (``y.T`` tile, fp32) into ``y [M, N]`` (+ bias).

    With ``SPLIT_K > 1``: deterministic split-K in one launch. Every chunk stores its partial tile
    in ``WS [SPLIT_K, tiles, BLOCK_N * BLOCK_M]``; the program that arrives last at the tile's
    counter ``CNT[pid]`` sums the partials in chunk order, writes ``y`` and resets the counter (so
    the workspace needs no memset between calls or replays). Shared with the quantized kernels.
    """
    y_ptrs = Y + rm[None, :] * stride_ym + rn[:, None]  # [BLOCK_N, BLOCK_M], y is [M, N]
    y_ok = n_ok[:, None] & m_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_ok)
    else:
        tile_elems = BLOCK_N * BLOCK_M
        local = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]  # [BLOCK_N, BLOCK_M]
        tl.store(WS + (pid_k * tl.num_programs(0) + pid) * tile_elems + local, acc)
        tl.debug_barrier()  # every thread's partial is issued before the arrival is published
        arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel")  # old value
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(WS + (s * tl.num_programs(0) + pid) * tile_elems + local, volatile=True)
            if HAS_BIAS:
                total += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=y_ok)
            tl.atomic_xchg(CNT + pid, 0, sem="relaxed")


_WORKSPACE: dict[tuple, tuple[Tensor, Tensor]] = {}


def workspace(device: torch.device, tiles: int, tile_elems: int, split_k: int) -> tuple[Tensor, Tensor]:
    """fp32 partial tiles ``[split_k, tiles, tile_elems]`` and int32 counters ``[tiles]``, one pair per
    launch shape, never freed: a captured graph keeps pointing at them. The kernels leave the counters
    at zero, so the pair is reusable by every later call and replay of that shape on any stream (calls
    of one shape must not run concurrently). Created by the first (eager) call, before any capture."""
    key = (str(device), tiles, tile_elems, split_k)
    ws = _WORKSPACE.get(key)
    if ws is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_linear: first split-K call of a shape inside a CUDA graph capture; "
                               "call it once eagerly first")
        ws = (torch.empty(split_k * tiles * tile_elems, device=device, dtype=torch.float32),
              torch.zeros(tiles, device=device, dtype=torch.int32))
        _WORKSPACE[key] = ws
    return ws


def skinny_applies(x: Tensor, weight: Tensor, config: dict | None = None) -> bool:
    """Shapes and dtypes :func:`skinny_linear` takes (an int8 weight needs ``scale``), and with
    ``config`` whether that launch shape is one for ``x``'s dtype (fp32 shapes have ``F32``)."""
    M = x.numel() // max(x.shape[-1], 1)
    f32 = x.dtype == torch.float32
    if f32 and not (FP32_TF32X3 and weight.dtype == torch.float32):
        return False
    if config is not None and bool(config.get("F32", False)) != f32:
        return False
    return (2 <= M <= SKINNY_MAX_M and x.dtype in SKINNY_DTYPES and weight.dtype in (x.dtype, torch.int8)
            and weight.stride(1) == 1)


def default_config(dtype: torch.dtype) -> dict:
    """The first launch shape of :data:`SKINNY_CONFIGS` for ``dtype`` (fp32: an ``F32`` one)."""
    f32 = dtype == torch.float32
    return next(c for c in SKINNY_CONFIGS if bool(c.get("F32", False)) == f32)


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, config: dict | None = None,
                  scale: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for ``2 <= M <= 64`` rows of ``x`` (16-bit dtypes, or fp32 in 3xTF32).

    Args:
        x: ``[..., K]``, ``M`` rows in all; bf16, fp16, or fp32 (3xTF32 dots, unless
            :data:`FP32_TF32X3` is False).
        weight: ``[N, K]`` with contiguous rows (``stride(1) == 1``), the dtype of ``x``, or int8
            with ``scale`` (W8A16: ``x @ (weight * scale[:, None]).T``; the int8 values are widened
            exactly to ``x``'s dtype on chip, the scale applied to the fp32 accumulator).
        bias: optional ``[N]``.
        config: one of :data:`SKINNY_CONFIGS` for ``x``'s dtype (default: the first such).
        scale: ``[N]`` per-output-channel scales of an int8 ``weight``.
    Returns:
        ``[..., N]`` in ``x``'s dtype (fp32 accumulation).
    """
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"skinny_linear: x has {x.shape[-1]} features, weight expects {K}")
    if not skinny_applies(x, weight):
        raise ValueError(f"skinny_linear takes 2..{SKINNY_MAX_M} rows of bf16/fp16 (fp32 with FP32_TF32X3) with "
                         f"contiguous weight rows; got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}")
    if (weight.dtype == torch.int8) != (scale is not None):
        raise ValueError("skinny_linear: an int8 weight needs its per-channel scale, and only an int8 weight takes one")
    if scale is not None and scale.shape != (N,):
        raise ValueError(f"skinny_linear: scale must be [{N}], got {tuple(scale.shape)}")
    return skinny_group(x, [weight], [bias], config, scale)[0]


def skinny_group(x: Tensor, weights: list[Tensor], biases: list[Tensor | None] | None = None,
                 config: dict | None = None, scale: Tensor | None = None) -> list[Tensor]:
    """``[x @ w.T + b for w, b in zip(weights, biases)]`` for 2-64 rows of ``x``, in ONE launch
    (the linears of one input, e.g. q/k/v; see :func:`specdec.kernels.gemv.gemv_group`).

    Args: as :func:`skinny_linear`, with 1-4 weights of one dtype and row stride, no biases or one
    per weight; ``scale`` (int8) only with a single weight.
    Returns: one ``[..., N_i]`` tensor per weight.
    """
    K = x.shape[-1]
    biases = list(biases) if biases is not None else [None] * len(weights)
    cfg = dict(config or default_config(x.dtype))
    if any(w.shape[1] != K or not skinny_applies(x, w, cfg) or w.stride(0) != weights[0].stride(0)
           or w.dtype != weights[0].dtype for w in weights):
        raise ValueError(f"skinny_group takes 2..{SKINNY_MAX_M} rows of bf16/fp16 (fp32 with FP32_TF32X3 and an "
                         f"F32 launch shape) and [N, {K}] weights of one "
                         f"dtype and row stride with contiguous rows; got x {tuple(x.shape)} {x.dtype}, weights "
                         f"{[(tuple(w.shape), w.dtype) for w in weights]}")
    if len(biases) != len(weights) or len({b is None for b in biases}) > 1:
        raise ValueError("skinny_group: give no biases or one per weight")
    if any(b is not None and b.dtype != x.dtype for b in biases):
        raise ValueError("skinny_group: biases must have x's dtype")
    if scale is not None and len(weights) != 1:
        raise ValueError("skinny_group: int8 scales take a single weight")
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    outs = [torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device) for w in weights]  # [M, N_i]
    bm, bn, bk = max(16, triton.next_power_of_2(M)), cfg["BLOCK_N"], cfg["BLOCK_K"]
    split = min(cfg.get("SPLIT_K", 1), triton.cdiv(K, bk))
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk  # a multiple of BLOCK_K
    split = triton.cdiv(K, k_per_split)
    args, tiles = group_args(weights, outs, biases, bn)
    ws, cnt = workspace(x.device, tiles, bn * bm, split) if split > 1 else (outs[0], outs[0])

    def launch(pdl: bool):
        _skinny[(tiles, split)](
            x2, scale if scale is not None else outs[0], ws, cnt,
            M, K, k_per_split, x2.stride(0), weights[0].stride(0), *args,
            NUM_GROUPS=len(weights), HAS_BIAS=biases[0] is not None, HAS_SCALE=scale is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, TF32X3=x.dtype == torch.float32, PDL=pdl,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **(dict(launch_pdl=True) if pdl else {}),
        )

    _pdl.launch(launch, x.device)
    return [y.reshape(*x.shape[:-1], y.shape[1]) for y in outs]
