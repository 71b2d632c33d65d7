# Snapshot of verifiers/kernels/tree_attention.py at commit 56964df (before the fused split-K
# combine), kept only so benchmarks/bench_tree_attention.py --old can time it side by side.
"""Triton tree attention: n tree queries over the committed prefix plus the N tree keys.

Semantics are those of :func:`specdec.attention.sdpa_tree_attention` (the reference): query q of
row b sees every key slot ``< prefix_lens[b]`` with no mask, and tree node j (key slot
``prefix_lens[b] + j``) iff bit ``j % 64`` of word ``j // 64`` of ``packed_mask[b, q]`` is set.

Design (ideas from the literature, code written for this project):

* FlashAttention (Dao et al., 2022, https://arxiv.org/abs/2205.14135): tiles of keys are streamed
  once through on-chip memory with an online softmax kept in fp32 (running max ``m``, running
  denominator ``l``); the ``[n, L]`` score matrix never reaches device memory.
* GQA folding: the ``G = Hq / Hkv`` query heads that share a KV head are stacked into the M
  dimension of one program (row ``r`` = query ``r // G``, head ``kv_head * G + r % G``), so each
  K/V tile is read from device memory once per KV head, not once per query head.
* Flash-Decoding (Dao, Haziza, Massa, Sizov, 2023,
  https://crfm.stanford.edu/2023/10/12/flashdecoding.html): with few queries (N = 1 decode, small
  trees) and batch 1 there are too few (batch, kv head, query block) programs to fill the GPU, so
  the prefix is split into ``num_splits`` chunks processed in parallel; each writes an unnormalised
  partial output plus its ``(m, l)`` and a second small kernel merges them (log-sum-exp rescale).
* SpecInfer tree attention (Miao et al., 2024, https://arxiv.org/abs/2305.09781): all tree nodes
  are verified in one pass with a topology-aware mask; here the mask is an ancestor bitset of
  ``ceil(N / 64)`` int64 words per query, so the tree part needs no dense ``[n, L]`` mask at all.

The last split also handles the tree keys (at most 128 of them), whose slots start at the
unaligned ``prefix_lens[b]``; everything else is a plain unmasked sweep over the prefix.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

__all__ = ["tree_attention", "pick_config", "MAX_TREE_NODES", "SUPPORTED_HEAD_DIMS"]

MAX_TREE_NODES = 128  # N <= 128: at most two 64-bit mask words per query
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)

_LOG2E = 1.4426950408889634


@triton.jit
def _tree_attn_fwd(
    Q, K, V, O, MASK, PREFIX,  # pointers
    OPART, MPART, LPART,  # split-K partials (unused when WRITE_PARTIAL is False)
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_mb, stride_mn, stride_mw,
    H_KV, N_Q, N_TREE, CHUNK, NUM_SPLITS, R_TOTAL,
    G: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    kvh = pid_bh % H_KV
    b64 = b.to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] folded (query, group head)
    qi = rows // G  # [BLOCK_M] query index
    hq = kvh * G + rows % G  # [BLOCK_M] query head
    row_ok = qi < N_Q
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D

    q_ptrs = Q + b64 * stride_qb + hq[:, None] * stride_qh + qi[:, None] * stride_qn + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    prefix = tl.load(PREFIX + b).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- 1. the committed prefix of this split: every key visible, no mask
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, prefix)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key slots
        col_ok = cols < hi
        k = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kl + d[:, None] * stride_kd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vl + d[None, :] * stride_vd,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # ---- 2. the tree keys (last split only): node j at slot prefix + j, ancestor bitset mask
    if pid_s == NUM_SPLITS - 1:
        m_base = MASK + b64 * stride_mb + qi[:, None] * stride_mn
        for j0 in range(0, N_TREE, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] tree node ids
            j_ok = j < N_TREE
            slots = (prefix + j).to(tl.int64)
            k = tl.load(k_base + slots[None, :] * stride_kl + d[:, None] * stride_kd,
                        mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            words = tl.load(m_base + (j // 64)[None, :] * stride_mw,
                            mask=row_ok[:, None] & j_ok[None, :], other=0)  # [BLOCK_M, BLOCK_N] int64
            bit = (words >> (j % 64).to(tl.int64)[None, :]) & 1
            vis = (bit != 0) & j_ok[None, :]
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = tl.where(vis, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + slots[:, None] * stride_vl + d[None, :] * stride_vd,
                        mask=j_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

    st_mask = row_ok[:, None] & d_ok[None, :]
    if WRITE_PARTIAL:
        # partial row index r = (b * N_Q + qi) * Hq + hq, same order as the [B, n, Hq, D] output
        r = (b64 * N_Q + qi) * (H_KV * G) + hq  # [BLOCK_M]
        base = pid_s.to(tl.int64) * R_TOTAL + r
        tl.store(OPART + base[:, None] * BLOCK_D + d[None, :], acc, mask=st_mask)
        tl.store(MPART + base, m_i, mask=row_ok)
        tl.store(LPART + base, l_i, mask=row_ok)
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptrs = O + b64 * stride_ob + qi[:, None] * stride_on + hq[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=st_mask)


@triton.jit
def _split_combine(
    OPART, MPART, LPART, O,
    R_TOTAL, NUM_SPLITS,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merge the split-K partials of one output row r (log-sum-exp rescale, Flash-Decoding)."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    m = tl.load(MPART + s * R_TOTAL + r, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    l = tl.load(LPART + s * R_TOTAL + r, mask=s_ok, other=0.0)  # [BLOCK_S]
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # [BLOCK_S]; empty splits have m = -inf -> weight 0
    acc = tl.load(OPART + (s[:, None] * R_TOTAL + r) * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)  # [BLOCK_D]
    den = tl.sum(l * w, 0)
    den = tl.where(den == 0.0, 1.0, den)
    tl.store(O + r * HEAD_D + d, (num / den).to(O.dtype.element_ty), mask=d < HEAD_D)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small split count still exercises the split-K path


def pick_config(n_q: int, group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Block shapes by the folded query count M = n_q * G.

    From the sweep in ``benchmarks/bench_tree_attention.py`` (H200, Llama-3-8B heads, bf16,
    prefix 8k; numbers in ``notes/issue5.md``): small M is memory-bound and likes deep pipelining
    of the K/V tiles; large M is compute-bound and likes 64-row query blocks with 4 warps.
    """
    m = n_q * group
    if m <= 16:  # decode (N = 1): one 16-row block holds the whole GQA group
        return dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3)
    if m <= 64:
        return dict(BLOCK_M=32 if m <= 32 else 64, BLOCK_N=32, num_warps=4, num_stages=3)
    if m <= 256:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


_SAFE_CONFIG = dict(BLOCK_N=32, num_stages=2)  # fallback when a GPU has less shared memory
_OUT_OF_RESOURCES: set = set()  # launch configs that did not fit, per device / dtype / shape class


def tree_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_lens: Tensor,
    packed_mask: Tensor,
    n_tree: int,
    scaling: float | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Tree attention of ``n`` queries over prefix + tree.

    Args:
        q: ``[B, Hq, n, D]`` queries (any strides).
        k, v: ``[B, Hkv, L_view, D]`` key / value slots (any strides, e.g. cache views);
            ``L_view >= max(prefix_lens) + n_tree``.
        prefix_lens: ``[B]`` committed slots per row (int32/int64, on device).
        packed_mask: ``[B, n, W]`` int64 ancestor bitset over the tree nodes, ``W = ceil(n_tree/64)``.
        n_tree: N, number of tree nodes (node j at key slot ``prefix_lens[b] + j``), ``<= 128``.
        scaling: softmax scale (default ``D ** -0.5``).
        num_splits: split-K chunks over the prefix (default: enough programs for the device).
        config: block shapes (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``).
        out: optional ``[B, n, Hq, D]`` contiguous output buffer.
    Returns:
        ``[B, n, Hq, D]`` in ``q.dtype``.
    """
    B, Hq, n, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads do not group over {Hkv} KV heads")
    G = Hq // Hkv
    if packed_mask.dtype != torch.int64 or packed_mask.shape[:2] != (B, n):
        raise ValueError(f"packed_mask must be int64 [B, n, W], got {packed_mask.dtype} {tuple(packed_mask.shape)}")
    cfg = dict(pick_config(n, G, D, q.dtype))
    if config:
        cfg.update(config)
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    scale = scaling if scaling is not None else D ** -0.5
    if out is None:
        out = torch.empty(B, n, Hq, D, dtype=q.dtype, device=q.device)  # [B, n, Hq, D]

    m_blocks = triton.cdiv(n * G, BLOCK_M)
    prefix_bound = max(L - n_tree, 0)  # host-side upper bound on every prefix (no device sync)
    p_blocks = triton.cdiv(prefix_bound, BLOCK_N)
    if num_splits is None:
        # fill the device: two waves of programs for few folded queries (memory-bound), one for many
        # (compute-bound: more splits only add fp32 partial traffic)
        waves = 2 if n * G <= 64 else 1
        want = triton.cdiv(waves * _num_sms(q.device), m_blocks * B * Hkv)
        num_splits = max(1, min(want, triton.cdiv(p_blocks, 4), 64))
    num_splits = max(1, min(int(num_splits), max(p_blocks, 1)))
    chunk = triton.cdiv(p_blocks, num_splits) * BLOCK_N if p_blocks else BLOCK_N
    num_splits = max(1, triton.cdiv(prefix_bound, chunk)) if p_blocks else 1

    R = B * n * Hq
    write_partial = num_splits > 1
    if write_partial:
        opart = torch.empty(num_splits, R, BLOCK_D, dtype=torch.float32, device=q.device)  # [S, B*n*Hq, BLOCK_D]
        mpart = torch.empty(num_splits, R, dtype=torch.float32, device=q.device)  # [S, B*n*Hq]
        lpart = torch.empty(num_splits, R, dtype=torch.float32, device=q.device)  # [S, B*n*Hq]
    else:
        opart = mpart = lpart = out
    grid = (m_blocks, B * Hkv, num_splits)

    def launch(block_n, stages):
        _tree_attn_fwd[grid](
            q, k, v, out, packed_mask, prefix_lens,
            opart, mpart, lpart,
            scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *packed_mask.stride(),
            Hkv, n, n_tree, chunk, num_splits, R,
            G=G, HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
            WRITE_PARTIAL=write_partial, IEEE=q.dtype == torch.float32,
            num_warps=cfg["num_warps"], num_stages=stages,
        )

    key = (q.device.index, q.dtype, D, G, BLOCK_M, BLOCK_N, cfg["num_warps"], cfg["num_stages"], write_partial)
    if key in _OUT_OF_RESOURCES:  # known too big for this GPU: never retry (a failed load breaks graph capture)
        launch(_SAFE_CONFIG["BLOCK_N"], _SAFE_CONFIG["num_stages"])
    else:
        try:
            launch(BLOCK_N, cfg["num_stages"])
        except OutOfResources:  # e.g. 3 stages of 128-key tiles on a GPU with less shared memory
            _OUT_OF_RESOURCES.add(key)
            launch(_SAFE_CONFIG["BLOCK_N"], _SAFE_CONFIG["num_stages"])
    if write_partial:
        if not out.is_contiguous():
            raise ValueError("split-K output must be contiguous [B, n, Hq, D]")
        _split_combine[(R,)](
            opart, mpart, lpart, out, R, num_splits,
            HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            num_warps=4,
        )
    return out
