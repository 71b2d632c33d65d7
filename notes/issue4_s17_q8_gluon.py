"""PROBE (seventeenth session, not wired into the library): a warp-specialized W8A16 GEMM for
Hopper (sm_90) in Gluon, Triton's tile-level language with explicit layouts, shared memory, mbarriers, TMA and ``wgmma``
(https://github.com/triton-lang/triton/tree/main/python/tutorials/gluon).

Why: at 64 activation rows the Triton kernel ``_q8_tma_kernel`` of :mod:`drafters.kernels.quant_matmul` is
latency-bound (sixteenth-session Nsight Compute, ``notes/issue4_h200_s16_ncu.md``: no unit above 41 %,
no eligible warp in 61 % of cycles on q/o) and stays 2-8 % behind cuBLAS bf16 on the Llama-3-8B q/o
and k/v layers. Gluon lets the kernel own its pipeline, as Hopper GEMMs do (the producer / consumer
"warp specialization" of CUTLASS 3 and of FlashAttention-3, Shah et al. 2024,
https://arxiv.org/abs/2407.08608):

* one **producer warp** only issues TMA copies of the int8 weight tile ``[BN, BK]`` and the
  activation tile ``[BM, BK]`` into a ring of ``STAGES`` shared-memory slots, each signalled by a
  ``ready`` mbarrier, and refills a slot as soon as the consumers release it (``empty``);
* the **consumer warpgroup(s)** wait for a slot, read the weight bytes straight into the ``wgmma``
  register-operand layout, widen them to 16 bits (exact, ``|q| <= 127``), and issue an asynchronous
  ``wgmma`` against the activation tile in shared memory (``y.T = W @ x.T``: the weight rows fill
  the MMA's 64-row side, the few activation rows its N side). One MMA stays in flight while the
  next tile is widened; the slot of the previous step is released once its MMA has completed.
* Epilogue: the channel scale multiplies the fp32 accumulator; split-K partial tiles are summed in
  chunk order by the last-arriving program, as :func:`specdec.kernels.skinny.store_y` does
  (deterministic, one launch, counters left at zero).

``WS=False`` keeps the same pipeline in one partition (software-pipelined: the loads for step
``i + STAGES - 1`` are issued after step ``i``'s MMA), for comparison.

Outcome on an H200 (``notes/issue4_quantized.md``, seventeenth session): every correct launch was slower
than ``_q8_tma_kernel`` at 64 rows (q/o 13.2 against 12.4 µs, k/v 9.8 against 8.4), and two launch
shapes gave wrong results (``block_n=128``, two consumer warpgroups: relative error 0.07; ``ws=False``
split 4 with 4 stages: non-finite), which were not debugged. Kept for the record; do not import it
from library code. (After the runs its loop bodies were factored into ``_load_step`` /
``_first_mma`` / ``_next_mma``; that version was compile-checked for sm_90 under Triton 3.6 and 3.9,
not run again.)

Requirements (:func:`applies`): CUDA capability 9.x, Gluon with the Hopper API (Triton >= 3.5),
1..64 rows of fp16 / bf16 activations, int8 weights ``[N, K]``, 16-byte aligned rows and bases (TMA).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["available", "applies", "q8_gluon_matmul"]

try:  # Gluon (Triton >= 3.5) with the Hopper TMA / mbarrier / wgmma API
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the CTA-wide barrier: ``thread_barrier`` in Triton 3.5-3.6, ``barrier`` later (Gluon is experimental)
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # a TMA copy into shared memory: ``async_copy_global_to_shared`` in 3.5-3.6, ``async_load`` later
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _HAS_GLUON = True
except Exception:  # pragma: no cover - older Triton, or none
    _HAS_GLUON = False


def available(device: torch.device | str | None = None) -> bool:
    """Gluon's Hopper API is importable and ``device`` (default: the current one) is a CUDA device of
    capability 9.x; ``SPECDEC_GLUON=0`` turns the kernel off."""
    if not _HAS_GLUON or os.environ.get("SPECDEC_GLUON", "1") == "0" or not torch.cuda.is_available():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":  # Gluon has no interpreter
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    return torch.cuda.get_device_capability(dev)[0] == 9


def applies(x: Tensor, q: Tensor) -> bool:
    """Operands the kernel takes: 1..64 rows of contiguous fp16 / bf16 ``x [M, K]`` and int8 ``q [N, K]``
    on one CUDA device, rows and bases 16-byte aligned (TMA)."""
    return (x.dim() == 2 and q.dim() == 2 and x.is_cuda and q.is_cuda and q.dtype == torch.int8
            and x.dtype in (torch.float16, torch.bfloat16) and 1 <= x.shape[0] <= 64 and x.shape[1] == q.shape[1]
            and x.stride(1) == 1 and q.stride(1) == 1
            and all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x, q)))


if _HAS_GLUON:

    @gluon.jit
    def _load_partition(x_desc, w_desc, w_bufs, x_bufs, ready, empty, off_n, k_lo, n_steps,
                        BLOCK_K: gl.constexpr):
        """Producer: TMA copies of the weight and activation tiles of step ``i`` into slot
        ``i % STAGES`` once the consumers released it (the first pass waits on the already-completed
        phase of a fresh barrier, so it does not block)."""
        STAGES: gl.constexpr = w_bufs.type.shape[0]
        for i in range(n_steps):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            _load_step(x_desc, w_desc, w_bufs, x_bufs, ready, s, off_n, k_lo + i * BLOCK_K, True)

    @gluon.jit
    def _load_step(x_desc, w_desc, w_bufs, x_bufs, ready, slot, off_n, k, pred):
        """TMA copies of one K step's weight and activation tiles into ``slot`` (skipped if not ``pred``)."""
        mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=pred)
        _tma_load(w_desc, [off_n, k], ready.index(slot), w_bufs.index(slot), pred=pred)
        _tma_load(x_desc, [0, k], ready.index(slot), x_bufs.index(slot), pred=pred)

    @gluon.jit
    def _first_mma(w_bufs, x_bufs, ready, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, num_warps: gl.constexpr):
        """Step 0, peeled (n_steps >= 1): no path then reaches the final wait without a wgmma defining
        the accumulator, else ptxas serializes every wgmma (C7515). Returns ``acc [BN, BM]``."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        mbarrier.wait(ready.index(0), 0)
        a = w_bufs.index(0).load(a_layout).to(x_bufs.dtype)  # [BN, BK] exact 16-bit integers
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=mma)
        acc = warpgroup_mma(a, x_bufs.index(0).permute((1, 0)), acc, use_acc=False, is_async=True)
        return warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))  # (no wait: the loop carries a tensor)

    @gluon.jit
    def _next_mma(w_bufs, x_bufs, ready, i, acc, num_warps: gl.constexpr):
        """Step ``i >= 1``: widen its weight tile, issue its wgmma, wait for step ``i - 1``'s; then every
        warp has read step ``i - 1``'s weights and the fence orders those generic-proxy reads before a
        TMA write into that slot."""
        STAGES: gl.constexpr = w_bufs.type.shape[0]
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        a = w_bufs.index(s).load(a_layout).to(x_bufs.dtype)
        acc = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        _cta_barrier()
        fence_async_shared()
        return acc

    @gluon.jit
    def _mma_partition(w_bufs, x_bufs, ready, empty, n_steps,
                       BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, num_warps: gl.constexpr):
        """Consumers: widen each weight tile in registers, one async wgmma in flight, release each slot
        once its MMA has completed; returns the fp32 accumulator ``[BN, BM]`` (``y.T`` tile)."""
        STAGES: gl.constexpr = w_bufs.type.shape[0]
        acc = _first_mma(w_bufs, x_bufs, ready, BLOCK_N, BLOCK_M, num_warps)
        for i in range(1, n_steps):
            acc = _next_mma(w_bufs, x_bufs, ready, i, acc, num_warps)
            mbarrier.arrive(empty.index((i - 1) % STAGES), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        return (acc, )  # (warp_specialize returns the default partition's results as a tuple)

    @gluon.jit
    def _pipelined(x_desc, w_desc, w_bufs, x_bufs, ready, off_n, k_lo, n_steps,
                   BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr):
        """``WS=False``: the same ring in one partition; the loads for step ``i + STAGES - 1`` go out
        after step ``i``'s MMA is issued and step ``i - 1``'s has completed."""
        STAGES: gl.constexpr = w_bufs.type.shape[0]
        for j0 in gl.static_range(STAGES):  # (step STAGES - 1 would go out at step 0, which is peeled)
            _load_step(x_desc, w_desc, w_bufs, x_bufs, ready, j0, off_n, k_lo + j0 * BLOCK_K, j0 < n_steps)
        acc = _first_mma(w_bufs, x_bufs, ready, BLOCK_N, BLOCK_M, num_warps)
        for i in range(1, n_steps):
            acc = _next_mma(w_bufs, x_bufs, ready, i, acc, num_warps)
            j = i + STAGES - 1  # into slot (i - 1) % STAGES, free now
            _load_step(x_desc, w_desc, w_bufs, x_bufs, ready, j % STAGES, off_n, k_lo + j * BLOCK_K, j < n_steps)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        return acc

    @gluon.jit
    def _q8_gluon_kernel(
        x_desc, w_desc, s_ptr, y_ptr, ws_ptr, cnt_ptr,  # x[M, K] box [BM, BK]; w[N, K] int8 box [BN, BK]; s[N] fp32
        M, N, K, k_per_split, stride_ym,  # k_per_split: a multiple of BLOCK_K
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT: gl.constexpr,
        STAGES: gl.constexpr, WS: gl.constexpr, num_warps: gl.constexpr,
    ):
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        off_n = pid * BLOCK_N
        k_lo = pid_k * k_per_split
        n_steps = gl.cdiv(gl.minimum(K, k_lo + k_per_split) - k_lo, BLOCK_K)

        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()  # the initialised barriers are visible to the async proxy

        if WS:
            res = gl.warp_specialize([
                (_mma_partition, (w_bufs, x_bufs, ready, empty, n_steps, BLOCK_N, BLOCK_M, num_warps)),
                (_load_partition, (x_desc, w_desc, w_bufs, x_bufs, ready, empty, off_n, k_lo, n_steps, BLOCK_K)),
            ], [1], [40])
            acc = res[0]
        else:
            acc = _pipelined(x_desc, w_desc, w_bufs, x_bufs, ready, off_n, k_lo, n_steps,
                             BLOCK_N, BLOCK_M, BLOCK_K, num_warps)

        # epilogue, in the wgmma layout: acc[n, m] is y[m, off_n + n]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        ln = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))  # [BN]
        rm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))  # [BM]
        rn = off_n + ln
        n_ok = rn < N
        acc = acc * gl.expand_dims(gl.load(s_ptr + rn, mask=n_ok, other=0.0), 1)
        y_ptrs = y_ptr + gl.expand_dims(rm, 0) * stride_ym + gl.expand_dims(rn, 1)  # [BN, BM]
        y_ok = gl.expand_dims(n_ok, 1) & gl.expand_dims(rm < M, 0)
        if SPLIT == 1:
            gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)
        else:
            TILE: gl.constexpr = BLOCK_N * BLOCK_M
            local = gl.expand_dims(ln, 1) * BLOCK_M + gl.expand_dims(rm, 0)  # [BN, BM]
            tiles = gl.num_programs(0)
            gl.store(ws_ptr + (pid_k * tiles + pid) * TILE + local, acc)
            _cta_barrier()  # every thread's partial is issued before the arrival is published
            arrived = gl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")  # old value
            if arrived == SPLIT - 1:
                total = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=mma)
                for c in range(SPLIT):  # chunk order: deterministic sums
                    total += gl.load(ws_ptr + (c * tiles + pid) * TILE + local, volatile=True)
                gl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_ok)
                gl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")


def _shared_layouts(bm: int, bn: int, bk: int, xdtype: torch.dtype):
    """NVMMA (swizzled) shared layouts of the activation and weight boxes."""
    xg = gl.bfloat16 if xdtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([bm, bk], xg), gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)


def q8_gluon_matmul(x: Tensor, q: Tensor, s: Tensor, block_n: int = 64, block_k: int = 128, split_k: int = 1,
                    stages: int = 4, ws: bool = True, num_warps: int | None = None,
                    maxnreg: int | None = 128) -> Tensor:
    """``y[M, N] = x @ (q * s[:, None]).T`` in x's dtype; see the module docstring. ``block_n`` 64 (one
    consumer warpgroup) or 128 (two, sharing every activation tile); ``split_k`` chunks of K summed in
    order. ``maxnreg`` (``ws`` only) caps the registers per thread the warp-specialized launch reserves
    (by default it assumes 255, which leaves one CTA per SM). Raises ``ValueError`` on operands
    :func:`applies` refuses."""
    if not _HAS_GLUON:
        raise RuntimeError("q8_gluon_matmul needs Triton's Gluon with the Hopper API (Triton >= 3.5)")
    if not applies(x, q):
        raise ValueError("q8_gluon_matmul takes 1..64 rows of contiguous fp16 / bf16 activations and int8 weights "
                         "[N, K] on CUDA with 16-byte aligned rows")
    if block_n not in (64, 128) or block_k % 32 or not 2 <= stages <= 8:
        raise ValueError(f"q8_gluon_matmul: block_n 64 / 128, block_k a multiple of 32, 2..8 stages; got "
                         f"{block_n}, {block_k}, {stages}")
    from specdec.kernels.skinny import workspace

    M, K = x.shape
    N = q.shape[0]
    bm = max(16, triton.next_power_of_2(M))
    split = min(max(1, split_k), triton.cdiv(K, block_k))
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k  # whole steps per chunk
    split = triton.cdiv(K, k_per_split)
    tiles = triton.cdiv(N, block_n)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    wsp, cnt = workspace(x.device, tiles, block_n * bm, split) if split > 1 else (y, y)
    xl, wl = _shared_layouts(bm, block_n, block_k, x.dtype)
    x_desc = TensorDescriptor.from_tensor(x, [bm, block_k], xl)
    w_desc = TensorDescriptor.from_tensor(q, [block_n, block_k], wl)
    _q8_gluon_kernel[(tiles, split)](
        x_desc, w_desc, s, y, wsp, cnt, M, N, K, k_per_split, y.stride(0),
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split, STAGES=stages, WS=ws,
        num_warps=num_warps or block_n // 16, **({"maxnreg": maxnreg} if ws and maxnreg else {}),
    )
    return y
