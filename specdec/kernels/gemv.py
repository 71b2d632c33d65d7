"""One-row linear (``M = 1``): ``y = x @ W.T (+ b)`` streamed as a GEMV.

Why: an autoregressive step at batch 1 is a chain of GEMVs, and reading the weights is the whole
cost. cuBLAS splits K for narrow matrices and adds a reduce launch; on an H200 its bf16 GEMVs at
Llama-3-8B shapes stream at 1.2 TB/s (k/v, 1024 x 4096) to 3.8 TB/s (MLP) against a 4.2 TB/s
copy. Here each program owns ``BLOCK_N`` whole weight rows: it loads them in ``BLOCK_K``-wide
chunks (many independent 16-byte loads per thread, evict-first so the weights do not push the
activations out of L2), multiplies by ``x`` in fp32 and reduces in registers. No split-K, one
launch, and a fixed summation order per output. H200 probe (``notes/issue6.md``, fifth session):
k/v 6.94 -> 4.05 us, q/o 12.83 -> 10.54, gate/up 30.83 -> 29.44, down 31.52 -> 29.04 us.

:mod:`specdec.gemm_pick` times it against cuBLAS per shape and uses it only where it is faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl as _pdl

__all__ = ["gemv", "gemv_group", "GEMV_CONFIGS", "MAX_GROUP"]

MAX_GROUP = 4  # linears of one input in one launch (q/k/v, gate/up)

# Launch shapes the picker tries (the best ones of the H200 probe across the 8B shapes).
GEMV_CONFIGS: tuple[dict, ...] = (
    dict(BLOCK_N=2, BLOCK_K=2048, num_warps=8),
    dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4),
    dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8),
)


@triton.jit
def group_tile(pid, S1, S2, S3, W0, W1, W2, W3, Y0, Y1, Y2, Y3, B0, B1, B2, B3, N0, N1, N2, N3,
               NUM_GROUPS: tl.constexpr):
    """Which linear of a group program ``pid`` works for: its weight, output and bias pointers, its
    row count and its tile index within that linear. ``S1 <= S2 <= S3`` are the first tiles of
    linears 1-3 (programs are numbered across the group's linears, in order)."""
    W, Y, B, N, first = W0, Y0, B0, N0, pid * 0
    if NUM_GROUPS > 1:
        if pid >= S1:
            W, Y, B, N, first = W1, Y1, B1, N1, S1 + pid * 0
    if NUM_GROUPS > 2:
        if pid >= S2:
            W, Y, B, N, first = W2, Y2, B2, N2, S2 + pid * 0
    if NUM_GROUPS > 3:
        if pid >= S3:
            W, Y, B, N, first = W3, Y3, B3, N3, S3 + pid * 0
    return W, Y, B, N, pid - first


@triton.jit(do_not_specialize=["N0", "N1", "N2", "N3", "S1", "S2", "S3"])
def _gemv(
    X, K, stride_wn,
    W0, W1, W2, W3, Y0, Y1, Y2, Y3, B0, B1, B2, B3,
    N0, N1, N2, N3, S1, S2, S3,
    NUM_GROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (sm90+, :mod:`specdec.kernels.pdl`)
):
    # A group of up to 4 linears of the same x (e.g. q/k/v) in one launch: program ``pid`` owns
    # BLOCK_N rows of one of them (``group_tile``); NUM_GROUPS = 1 is the plain GEMV.
    W, Y, BIAS, N, tile = group_tile(tl.program_id(0), S1, S2, S3, W0, W1, W2, W3, Y0, Y1, Y2, Y3,
                                     B0, B1, B2, B3, N0, N1, N2, N3, NUM_GROUPS)
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns = weight rows
    n_ok = rn < N
    w_rows = W + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = 0
    if PDL:
        # Started before the previous kernel finished: the weights are constants, so the first chunk
        # is requested now; x is read only after the previous grid has completed and flushed.
        rk = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = rk < K
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
        tl.extra.cuda.gdc_wait()
        x = tl.load(X + rk, mask=k_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = rk < K
        x = tl.load(X + rk, mask=k_ok, other=0.0)
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start its own pre-wait part
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=n_ok)


def group_args(weights, outs, biases, block_n: int) -> tuple[list, int]:
    """Kernel arguments of a group of 1-4 linears (unused slots repeat the last one) and its number
    of row tiles: ``[W0..W3, Y0..Y3, B0..B3, N0..N3, S1..S3]``, tiles."""
    g = len(weights)
    if not 1 <= g <= MAX_GROUP:
        raise ValueError(f"a group takes 1..{MAX_GROUP} linears, got {g}")
    ns = [w.shape[0] for w in weights]
    starts, t = [], 0
    for n in ns:
        starts.append(t)
        t += triton.cdiv(n, block_n)
    bs = [b if b is not None else y for b, y in zip(biases, outs)]
    pad = lambda v: list(v) + [v[-1]] * (MAX_GROUP - g)
    return pad(weights) + pad(outs) + pad(bs) + pad(ns) + pad(starts[1:] or [t])[:MAX_GROUP - 1], t


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None, config: dict | None = None) -> Tensor:
    """``x @ weight.T + bias`` for a single row.

    Args:
        x: ``[..., K]`` with one row in all (e.g. ``[1, 1, K]``); last dim contiguous.
        weight: ``[N, K]`` with contiguous rows (``stride(1) == 1``), the dtype of ``x``.
        bias: optional ``[N]``.
        config: one of :data:`GEMV_CONFIGS` (default: the first).
    Returns:
        ``[..., N]`` in ``x``'s dtype (fp32 accumulation).
    """
    N, K = weight.shape
    if x.numel() != K or x.shape[-1] != K:
        raise ValueError(f"gemv takes one row of {K} features, got x of shape {tuple(x.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("gemv needs weight rows contiguous (stride(1) == 1)")
    return gemv_group(x, [weight], [bias], config)[0]


def gemv_group(x: Tensor, weights: list[Tensor], biases: list[Tensor | None] | None = None,
               config: dict | None = None) -> list[Tensor]:
    """``[x @ w.T + b for w, b in zip(weights, biases)]`` for one row of ``x``, in ONE launch.

    A decode step's linears that read the same input (q/k/v, gate/up) are each too small to keep
    the memory system busy from launch to tail; as one grid they stream like one larger matrix
    (H200, 8B shapes: q+k+v 18.4 -> 13.9 µs, gate+up 58.1 -> 54.6 µs; ``notes/issue6.md``,
    seventh session).

    Args:
        x: ``[..., K]`` with one row in all; weights: 1-4 ``[N_i, K]`` with contiguous rows and one
        row stride; biases: ``None`` or one entry per weight (all ``None`` or all tensors).
    Returns:
        one ``[..., N_i]`` tensor per weight.
    """
    K = x.shape[-1]
    biases = list(biases) if biases is not None else [None] * len(weights)
    if x.numel() != K:
        raise ValueError(f"gemv takes one row of {K} features, got x of shape {tuple(x.shape)}")
    if any(w.shape[1] != K or w.stride(1) != 1 or w.stride(0) != weights[0].stride(0) for w in weights):
        raise ValueError("gemv needs [N, K] weights with contiguous rows and one row stride")
    if len(biases) != len(weights) or len({b is None for b in biases}) > 1:
        raise ValueError("gemv_group: give no biases or one per weight")
    if any(w.dtype != x.dtype or (b is not None and b.dtype != x.dtype) for w, b in zip(weights, biases)):
        raise ValueError("gemv_group: weights and biases must have x's dtype")
    cfg = dict(config or GEMV_CONFIGS[0])
    xc = x.reshape(K).contiguous()
    outs = [torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device) for w in weights]
    args, tiles = group_args(weights, outs, biases, cfg["BLOCK_N"])

    def launch(pdl: bool):
        _gemv[(tiles,)](
            xc, K, weights[0].stride(0), *args,
            NUM_GROUPS=len(weights), HAS_BIAS=biases[0] is not None, BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], PDL=pdl, num_warps=cfg["num_warps"], num_stages=1,
            **(dict(launch_pdl=True) if pdl else {}),
        )

    _pdl.launch(launch, x.device)
    return outs
