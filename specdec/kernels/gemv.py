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

__all__ = ["gemv", "GEMV_CONFIGS"]

# Launch shapes the picker tries (the best ones of the H200 probe across the 8B shapes).
GEMV_CONFIGS: tuple[dict, ...] = (
    dict(BLOCK_N=2, BLOCK_K=2048, num_warps=8),
    dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4),
    dict(BLOCK_N=16, BLOCK_K=1024, num_warps=8),
)


@triton.jit
def _gemv(
    X, W, BIAS, Y,
    N, K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns = weight rows
    n_ok = rn < N
    w_rows = W + rn.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = rk < K
        x = tl.load(X + rk, mask=k_ok, other=0.0)
        w = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(Y + rn, y.to(Y.dtype.element_ty), mask=n_ok)


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
    cfg = dict(config or GEMV_CONFIGS[0])
    xc = x.reshape(K).contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        xc, weight, bias if bias is not None else y, y,
        N, K, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=1,
    )
    return y
