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

__all__ = ["gemv", "gemv_group", "gemv_swiglu", "silu_mul", "GEMV_CONFIGS", "MAX_GROUP"]

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


@triton.jit
def _round_as(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (nearest, ties to even, as torch rounds), kept in fp32. bf16 by
    its bits, because Triton's interpreter truncates a plain fp32 -> bf16 cast."""
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        return x


@triton.jit
def _silu_mul_rounded(g, u, dtype: tl.constexpr):
    """``silu(g) * u`` from fp32 ``g``, ``u`` already rounded to ``dtype``: the SiLU and the product
    each rounded to ``dtype``, as the two eager ops ``F.silu(g) * u`` round them."""
    s = _round_as(g / (1.0 + tl.exp(-g)), dtype)
    return _round_as(s * u, dtype)


@triton.jit
def _gemv_swiglu(
    X, K, stride_wn, WG, WU, Y, BG, BU, N,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # rows of each matrix per program (a tile of 2 * ROWS rows, as a GEMV's BLOCK_N)
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    # program ``pid`` owns ROWS rows of the gate AND the same rows of the up projection, streamed as
    # ONE [2 * ROWS, BLOCK_K] tile per chunk (rows 0..ROWS-1 from the gate, the rest from the up
    # projection), so the SiLU product of its outputs is formed here and only it is stored
    r2 = tl.arange(0, 2 * ROWS)  # [2 * ROWS]
    is_up = r2 >= ROWS
    rn = tl.program_id(0) * ROWS + (r2 % ROWS)  # weight row of either matrix
    n_ok = rn < N
    off = rn.to(tl.int64)[:, None] * stride_wn  # [2 * ROWS, 1]
    rows = tl.where(is_up[:, None], WU + off, WG + off)
    acc = tl.zeros((2 * ROWS, BLOCK_K), dtype=tl.float32)
    k_start = 0
    if PDL:  # (see _gemv: the first weight chunk before the wait)
        rk = tl.arange(0, BLOCK_K)
        k_ok = rk < K
        w = tl.load(rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")
        tl.extra.cuda.gdc_wait()
        x = tl.load(X + rk, mask=k_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        k_start = BLOCK_K
    for k0 in range(k_start, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = rk < K
        x = tl.load(X + rk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # [2 * ROWS, BLOCK_K]
        acc += w.to(tl.float32) * x[None, :]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    y = tl.sum(acc, axis=1)  # [2 * ROWS]: gate rows, then up rows
    if HAS_BIAS:  # (the bias added in fp32 before the rounding, as F.linear's epilogue does)
        y += tl.load(tl.where(is_up, BU, BG) + rn, mask=n_ok, other=0.0).to(tl.float32)
    dt: tl.constexpr = Y.dtype.element_ty
    y = tl.reshape(_round_as(y, dt), (2, ROWS))
    half = tl.arange(0, 2)[:, None]  # [2, 1]
    g = tl.sum(tl.where(half == 0, y, 0.0), axis=0)  # [ROWS]
    u = tl.sum(tl.where(half == 1, y, 0.0), axis=0)
    m = _silu_mul_rounded(g, u, dt)
    ro = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tl.store(Y + ro, m.to(dt), mask=ro < N)


def gemv_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None = None, b_up: Tensor | None = None,
                config: dict | None = None) -> Tensor:
    """``silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)`` for one row, in ONE launch.

    A SwiGLU MLP (Llama, Mistral, Qwen: ``down(silu(gate(h)) * up(h))``) at one token: each program
    streams ``BLOCK_N / 2`` rows of the gate and the same rows of the up projection as one tile of
    the config's ``BLOCK_N`` rows (the plain GEMV's tile shape), and stores only the
    SiLU product (each of gate, up, SiLU and product rounded to the dtype as the eager ops round
    them), so the product needs no kernel of its own between the GEMVs.

    Args:
        x: ``[..., K]``, one row in all; w_gate, w_up: ``[N, K]``, contiguous rows, one row stride.
    Returns:
        ``[..., N]`` in ``x``'s dtype.
    """
    K = x.shape[-1]
    N = w_gate.shape[0]
    if x.numel() != K:
        raise ValueError(f"gemv_swiglu takes one row of {K} features, got x of shape {tuple(x.shape)}")
    if w_up.shape != w_gate.shape or w_gate.shape[1] != K or w_gate.stride() != w_up.stride() or w_gate.stride(1) != 1:
        raise ValueError("gemv_swiglu needs gate and up weights [N, K] of one shape with contiguous rows")
    if (b_gate is None) != (b_up is None):
        raise ValueError("gemv_swiglu: give both biases or none")
    cfg = dict(config or GEMV_CONFIGS[0])
    rows = max(1, cfg["BLOCK_N"] // 2)
    xc = x.reshape(K).contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    bg = b_gate if b_gate is not None else y
    bu = b_up if b_up is not None else y

    def launch(pdl: bool):
        _gemv_swiglu[(triton.cdiv(N, rows),)](
            xc, K, w_gate.stride(0), w_gate, w_up, y, bg, bu, N,
            HAS_BIAS=b_gate is not None, ROWS=rows, BLOCK_K=cfg["BLOCK_K"], PDL=pdl,
            num_warps=cfg["num_warps"], num_stages=1, **(dict(launch_pdl=True) if pdl else {}),
        )

    _pdl.launch(launch, x.device)
    return y


@triton.jit
def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < n
    if PDL:
        tl.extra.cuda.gdc_wait()
    g = tl.load(G + r, mask=ok, other=0.0)
    u = tl.load(U + r, mask=ok, other=0.0).to(tl.float32)
    y = _silu_mul_rounded(g.to(tl.float32), u, g.dtype)
    tl.store(Y + r, y.to(g.dtype), mask=ok)


def silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """``F.silu(g) * u`` in one launch (rounded as the two eager ops round), contiguous inputs."""
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ValueError(f"silu_mul: {tuple(g.shape)} {g.dtype} and {tuple(u.shape)} {u.dtype} differ")
    gc, uc = g.contiguous(), u.contiguous()
    y = torch.empty_like(gc)
    n, block = gc.numel(), 1024

    def launch(pdl: bool):
        _silu_mul_kernel[(triton.cdiv(n, block),)](gc, uc, y, n, BLOCK=block, PDL=pdl, num_warps=4,
                                                    **(dict(launch_pdl=True) if pdl else {}))

    _pdl.launch(launch, g.device)
    return y
