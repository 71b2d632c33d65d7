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
  each row's keys are split into ``num_splits`` chunks processed in parallel; each writes an
  unnormalised partial output plus its ``(m, l)``, merged by log-sum-exp rescale either in a second
  small kernel or, fused, by the last-arriving split program (arrival counter, see the kernel).
* SpecInfer tree attention (Miao et al., 2024, https://arxiv.org/abs/2305.09781): all tree nodes
  are verified in one pass with a topology-aware mask; here the mask is an ancestor bitset of
  ``ceil(N / 64)`` int64 words per query, so the tree part needs no dense ``[n, L]`` mask at all.

The tree keys (at most 128, starting at the unaligned slot ``prefix_lens[b]``) are swept by a second
loop with the bitset; every other key is a plain unmasked sweep over the prefix. Which split program
gets which keys is the ``tree_split`` policy of :func:`pick_config`.

fp32 inputs: both dots (``q k^T`` and ``p v``) in 3xTF32 on tensor cores by default (each operand a
TF32 high part plus a TF32 remainder, three products summed in fp32; see
:mod:`specdec.kernels.skinny`). On an H200 at SmolLM2-135M's heads (9 / 3, D 64) it took 5.8 - 18 µs
where IEEE dots on FMA units took 9.3 - 38 µs (N = 1 - 32, prefix 256 - 1200), with comparable error
against an fp64 reference (6e-8 - 6e-7 vs 7e-8 - 4e-7; ``notes/issue6.md``, ninth session).
``config={"dot": "ieee"}``, or ``SPECDEC_FP32_TF32X3=0`` in the environment, keeps IEEE dots.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources

from specdec.kernels import pdl as _step_pdl

__all__ = ["tree_attention", "pick_config", "MAX_TREE_NODES", "SUPPORTED_HEAD_DIMS"]

MAX_TREE_NODES = 128  # N <= 128: at most two 64-bit mask words per query
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128)

_LOG2E = 1.4426950408889634
# fp32 dots: "tf32x3" (3xTF32 on tensor cores) or "ieee" (FMA units); see the module docstring
FP32_DOT = "ieee" if os.environ.get("SPECDEC_FP32_TF32X3", "1") == "0" else "tf32x3"


@triton.jit
def _tree_attn_fwd(
    Q, K, V, O, MASK, PREFIX,  # pointers
    OPART, MPART, LPART,  # split-K partials (unused when WRITE_PARTIAL is False)
    COUNTER,  # [B * Hkv * m_blocks] int32 arrival counters, all zero between launches (FUSED only)
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_mb, stride_mn, stride_mw,
    H_KV, N_Q, N_TREE, NUM_SPLITS, R_TOTAL,
    CHUNK,  # TREE_SPLIT 3: prefix keys per split, from the host view
    G: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TREE_SPLIT: tl.constexpr,  # 0: prefix + tree keys split evenly; 1 / 2: tree keys alone in the first / last split;
    # 3: host-sized prefix chunks, tree keys at the end of the last split (the two-launch kernel of 56964df)
    WRITE_PARTIAL: tl.constexpr,  # split-K: write (acc, m, l) partials instead of the output
    FUSED: tl.constexpr,  # the last-arriving split program of a (row block, batch, kv head) merges
    RED_M: tl.constexpr,  # fused merge: rows per step
    RED_S: tl.constexpr,  # fused merge: partials per step
    PDL: tl.constexpr,  # let the merge kernel launch early (programmatic dependent launch, sm90+)
    DOT: tl.constexpr,  # fp32 dots: "ieee" (FMA units) or "tf32x3" (tensor cores, 3xTF32); "": 16-bit
    WAIT: tl.constexpr,  # this grid was launched early (specdec.kernels.pdl): wait for the previous one
):
    if WAIT:
        tl.extra.cuda.gdc_wait()
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    kvh = pid_bh % H_KV
    b64 = b.to(tl.int64)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the merge kernel waits for this grid to finish anyway

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] folded (query, group head)
    qi = rows // G  # [BLOCK_M] query index
    hq = kvh * G + rows % G  # [BLOCK_M] query head
    row_ok = qi < N_Q
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D

    prefix = tl.load(PREFIX + b).to(tl.int32)
    q_ptrs = Q + b64 * stride_qb + hq[:, None] * stride_qh + qi[:, None] * stride_qn + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh
    m_base = MASK + b64 * stride_mb + qi[:, None] * stride_mn  # [BLOCK_M, 1] this row's mask words

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # This split's share of the row's keys. TREE_SPLIT 0-2 cut it from the real prefix read on
    # device (so a fixed host view longer than the prefix, as under CUDA graphs with view_len =
    # max_len, still spreads the work over every split). 0: keys [0, prefix + N) in equal
    # 16-key-aligned chunks (prefix slots, then tree node j at slot prefix + j). 1 / 2: whole key
    # tiles of the prefix over NUM_SPLITS - 1 programs, the N tree keys alone in the first / last
    # program. 3: CHUNK prefix keys per split (host view), the tree keys after the last split's.
    if TREE_SPLIT == 0:
        total = prefix + N_TREE
        chunk = tl.cdiv(tl.cdiv(total, NUM_SPLITS), 16) * 16
        lo = pid_s * chunk
        hi = tl.minimum(lo + chunk, total)
        j_lo = tl.maximum(lo - prefix, 0)  # tree nodes [j_lo, j_hi) of this split
        j_hi = tl.maximum(hi - prefix, 0)
        do_tree = True  # (unguarded loop, as timed in the final run; empty where j_hi <= j_lo)
    elif TREE_SPLIT == 3:
        lo = pid_s * CHUNK
        hi = tl.minimum(lo + CHUNK, prefix)
        j_lo = 0
        j_hi = N_TREE
        do_tree = pid_s == NUM_SPLITS - 1
    else:
        if TREE_SPLIT == 1:
            ps = pid_s - 1
            do_tree = pid_s == 0
        else:
            ps = pid_s
            do_tree = pid_s == NUM_SPLITS - 1
        chunk = tl.cdiv(tl.cdiv(prefix, BLOCK_N), NUM_SPLITS - 1) * BLOCK_N
        lo = ps * chunk
        hi = tl.where(do_tree, lo, tl.minimum(lo + chunk, prefix))
        j_lo = 0
        j_hi = N_TREE
    kv_end = tl.minimum(hi, prefix)  # 1. prefix keys: every key visible, no mask
    for start in range(lo, kv_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key slots
        col_ok = cols < kv_end
        k = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kl + d[:, None] * stride_kd,
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT != "":
            s = tl.dot(q, k, input_precision=DOT)
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
        if DOT != "":
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # 2. this split's tree nodes [j_lo, j_hi): ancestor bitset, one or two int64 words a row
    if do_tree:  # modes 1-3: programs without tree keys skip the loop and its pipeline prologue
        for j0 in range(j_lo, j_hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] tree node ids
            j_ok = j < j_hi
            slots = (prefix + j).to(tl.int64)
            k = tl.load(k_base + slots[None, :] * stride_kl + d[:, None] * stride_kd,
                        mask=j_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            words = tl.load(m_base + (j // 64)[None, :] * stride_mw,
                            mask=row_ok[:, None] & j_ok[None, :], other=0)  # [BLOCK_M, BLOCK_N] int64
            bit = (words >> (j % 64).to(tl.int64)[None, :]) & 1
            vis = (bit != 0) & j_ok[None, :]
            if DOT != "":
                s = tl.dot(q, k, input_precision=DOT)
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
            if DOT != "":
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT)
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
        if FUSED:
            # Arrival counter: every thread's partial stores are done (barrier), then one gpu-scope
            # acq_rel atomic publishes them (release) and, for the last arrival, makes every other
            # split's stores visible (acquire). The last arrival merges and re-arms the counter.
            tl.debug_barrier()
            c_ptr = COUNTER + pid_bh * tl.num_programs(0) + pid_m
            ticket = tl.atomic_add(c_ptr, 1, sem="acq_rel", scope="gpu")
            if ticket == NUM_SPLITS - 1:
                tl.atomic_xchg(c_ptr, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
                m_rows = tl.minimum(N_Q * G - pid_m * BLOCK_M, BLOCK_M)
                for r0 in range(0, m_rows, RED_M):
                    rr = r0 + tl.arange(0, RED_M)  # [RED_M] row within the block
                    rok = rr < m_rows
                    fr = pid_m * BLOCK_M + rr  # folded row
                    rq = fr // G  # [RED_M] query
                    rh = kvh * G + fr % G  # [RED_M] query head
                    rrow = (b64 * N_Q + rq) * (H_KV * G) + rh  # [RED_M] partial row
                    m_run = tl.full([RED_M], float("-inf"), dtype=tl.float32)
                    den = tl.zeros([RED_M], dtype=tl.float32)
                    o = tl.zeros([RED_M, BLOCK_D], dtype=tl.float32)
                    # partials merged in split order, RED_S at a time (all loads of a step at once):
                    # deterministic whichever program merges
                    for s0 in range(0, NUM_SPLITS, RED_S):
                        ss = s0 + tl.arange(0, RED_S)
                        ok3 = (ss < NUM_SPLITS)[:, None] & rok[None, :]  # [RED_S, RED_M]
                        p3 = ss[:, None].to(tl.int64) * R_TOTAL + rrow[None, :]  # [RED_S, RED_M]
                        ms = tl.load(MPART + p3, mask=ok3, other=float("-inf"), cache_modifier=".cg")
                        ls = tl.load(LPART + p3, mask=ok3, other=0.0, cache_modifier=".cg")
                        op = tl.load(OPART + p3[:, :, None] * BLOCK_D + d[None, None, :], mask=ok3[:, :, None],
                                     other=0.0, cache_modifier=".cg")  # [RED_S, RED_M, BLOCK_D]
                        m_new = tl.maximum(m_run, tl.max(ms, 0))
                        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                        a = tl.exp2(m_run - m_use)  # [RED_M]
                        ws = tl.exp2(ms - m_use[None, :])  # [RED_S, RED_M]; empty splits weigh 0
                        den = den * a + tl.sum(ls * ws, 0)
                        o = o * a[:, None] + tl.sum(op * ws[:, :, None], 0)
                        m_run = m_new
                    den = tl.where(den == 0.0, 1.0, den)
                    o_ptrs = (O + b64 * stride_ob + rq[:, None] * stride_on + rh[:, None] * stride_oh
                              + d[None, :] * stride_od)
                    tl.store(o_ptrs, (o / den[:, None]).to(O.dtype.element_ty), mask=rok[:, None] & d_ok[None, :])
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
    PDL: tl.constexpr,
):
    """Merge the split-K partials of one output row r (log-sum-exp rescale, Flash-Decoding)."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    if PDL:
        tl.extra.cuda.gdc_wait()  # launched early: wait until the attention grid is done and flushed
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


def pick_config(n_q: int, group: int, head_dim: int, dtype: torch.dtype, view_len: int | None = None) -> dict:
    """Block shapes and split-K policy by the folded query count M = n_q * G.

    From the sweeps in ``benchmarks/bench_tree_attention.py`` (H200, Llama-3-8B heads, bf16,
    prefix 8k / 16k; numbers in ``notes/issue5.md``): small M is memory-bound and wants every SM
    streaming one program's worth of K/V in a single wave; large M is compute-bound and likes
    64-row query blocks.

    Keys besides the launch shape (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``):

    * ``waves``, ``fill``: the default number of split-K programs aims at ``waves`` programs per SM,
      rounded down (``"floor"``: no SM gets two) or up (``"ceil"``);
    * ``min_tiles``: at least this many key tiles per split (counted on the host view);
    * ``max_splits``: at most this many splits (``"legacy"`` policy; default 64);
    * ``tree_split``: ``"none"`` (prefix + tree keys cut into equal chunks), ``"first"`` / ``"last"``
      (whole prefix tiles over all programs but one; the tree keys alone in the first / last),
      ``"legacy"`` (prefix chunks sized on the host view, the tree keys after the last split's
      prefix keys: the previous kernel's policy); all but ``"legacy"`` cut the chunks from the
      prefix read on device;
    * ``combine``: split-K merge, ``"kernel"`` (a second launch), ``"fused"`` (the last-arriving
      split program merges in the same launch) or ``"auto"`` (fused while one program's merge reads
      at most ``_FUSE_MAX_ELEMS`` partial elements);
    * ``pdl``: launch the merge kernel with programmatic dependent launch (sm90+).

    What the H200 sweeps found (``notes/issue5.md``): for few queries none of the new policies
    beat the previous one below 16k (the fused merge's release fence + atomic + loads cost more
    than a second launch, PDL added ~0.5 us, a dedicated tree program or one more wave did not
    pay); for many queries the even prefix + tree split, and for 512-row blocks the fused merge,
    are 5-25 % faster than the previous kernel at every prefix.
    """
    m = n_q * group
    if dtype == torch.float32 and m <= 64:
        # fp32 (swept with IEEE dots on FMA units): 128-key tiles cost registers, not bandwidth, and the
        # host-view tile rule left one split for short views (26.6 us at a 256-token prefix for
        # SmolLM2's 9/3 heads, D 64); 32-key tiles and up to 16 splits: 6.7 us (H200 sweep, notes/issue6.md).
        # With 3xTF32 dots (the default since the ninth session) these stayed within ~10 % of the best
        # of 32/64-key tiles and 2/3 stages at N = 1-32 in views of 1024 / 2048.
        return dict(BLOCK_M=16 if m <= 16 else (32 if m <= 32 else 64), BLOCK_N=32, num_warps=4, num_stages=2,
                    waves=2, fill="ceil", min_tiles=1, max_splits=16, tree_split="legacy", combine="kernel", pdl=False)
    # few queries: the split policy and launch shapes of the previous kernel (host-sized prefix
    # chunks, tree keys at the end of the last split): faster than every new policy in the final
    # H200 run at prefixes up to 8k (notes/issue5.md)
    legacy = dict(waves=2, fill="ceil", min_tiles=4, tree_split="legacy", combine="kernel", pdl=False)
    # Short host views (a decode or verify step early in a sequence; the CUDA-graph runner's view is
    # its max_len): fixed cost, not bandwidth, sets the time. Llama-3-8B heads, bf16, H200, views of
    # 512 / 1024 / 2048 keys, L2-hot sweep (notes/issue6.md, fourth session, "Short-view attention
    # configs", which also has the HBM-cold A/B): N = 1 6.8 / 9.8 / 10.4 us -> 5.0 /
    # 5.5 / 6.8 (64-key tiles, one tile per split); N = 16 10.1 / 10.4 / 10.9 -> 8.8 / 9.0 / 9.7 (2
    # stages); N = 64 18.1 / 19.6 / 22.8 -> 13.4 / 14.8 / 16.1 (host-sized chunks, at most 4
    # splits, fused merge). Views over 2048 keys keep the configs below (4096: same times).
    # 16-bit only: fp32 (IEEE dots) with 64 x 64 tiles was ~4x slower at N = 64 (SmolLM2 heads, H200).
    short = view_len is not None and view_len <= _SHORT_VIEW and dtype != torch.float32
    if m <= 16:  # decode (N = 1): one 16-row block holds the whole GQA group
        if short:
            return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, **dict(legacy, min_tiles=1, max_splits=16))
        if view_len is not None:  # (fp32 returned above)
            # Long 16-bit views: 64-key tiles (96 KB of shared memory in 3 stages, so two programs
            # share an SM and 16-32 splits per KV head run in one wave; 128-key tiles fit one per
            # SM and the 32 splits of a 16k view took two waves), view/16 keys per split within
            # [256, 1024]. H200, 8B heads, N = 1, HBM-cold (notes/issue5.md, fourteenth session):
            # 4k / 8k / 16k / 32k 11.9 / 15.3 / 28.0 / 45.3 us -> 10.4 / 15.4 / 24.2 / 41.4.
            keys = min(1024, max(256, view_len // 16))
            return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3,
                        **dict(legacy, waves=4, min_tiles=keys // 64))
        return dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, **legacy)
    # Views of at most 1024 keys, several tree nodes: 16-row query blocks (four nodes of a GQA group
    # of 4), so a 64-node tree is 16 blocks per KV head, 128 programs that need no split at all.
    # H200, 8B heads, bf16, prefix 256 / 256 / 640 in views of 512 / 1024 / 1024 (sweep
    # ``.carry``-probe of 2026-11-22, eighth session; notes/issue6.md): N = 16 9.00 / 9.16 / 9.14 us
    # -> 7.77 / 7.79 / 9.30 (device-side prefix split, tree keys alone in the first program);
    # N = 32 13.11 / 13.59 / 14.00 -> 8.78 / 8.50 / 12.31 (two host-sized splits); N = 64 13.45 /
    # 15.20 / 15.41 -> 9.64 / 9.67 / 14.69 (no split). In views of 2048 they lose (prefix 1024 /
    # 1900: N = 64 16.4 / 22.2 -> 20.1 / 31.9 us), so those keep the configs below.
    tiny = short and view_len <= _TINY_VIEW
    if tiny and m <= 64:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, waves=1, fill="floor", min_tiles=2,
                    tree_split="first", combine="kernel", pdl=False)
    if tiny and m <= 256:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3, **dict(legacy, max_splits=2 if m <= 128 else 1))
    if m <= 64:
        return dict(BLOCK_M=32 if m <= 32 else 64, BLOCK_N=32, num_warps=4, num_stages=2 if short else 3, **legacy)
    if 128 < m <= 256 and short:  # (M = 128, N = 32: 1.2-1.4x slower this way; it keeps the split below)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, **dict(legacy, max_splits=4, combine="fused"))
    # compute-bound side (the final run's sweep winners at prefix 8k): prefix + tree keys split evenly
    if m <= 256:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3, waves=1, fill="floor", min_tiles=4,
                    tree_split="none", combine="kernel", pdl=False)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, waves=1, fill="ceil", min_tiles=4,
                tree_split="none", combine="fused", pdl=False)


_SHORT_VIEW = 2048  # host views up to this many key slots get the short-view configs of pick_config
_TINY_VIEW = 1024  # ... and up to this many, the 16-row query blocks for trees
_SAFE_CONFIG = dict(BLOCK_N=32, num_stages=2)  # fallback when a GPU has less shared memory
_OUT_OF_RESOURCES: set = set()  # launch configs that did not fit, per device / dtype / shape class
_NO_PDL: set = set()  # devices where a programmatic-dependent launch failed: plain launches there
_FUSE_MAX_ELEMS = 1 << 13  # fused merge only while rows * splits * BLOCK_D partial elements stay small
_RED_ELEMS = 1 << 13  # fused merge: partial elements loaded per step (registers)
_COUNTERS: dict = {}  # device -> int32 arrival counters of the fused merge (zero between launches)
_RETIRED_COUNTERS: list = []  # outgrown counter buffers, never freed (CUDA graphs may point at them)


def _counters(device: torch.device, n: int) -> Tensor | None:
    """Per-device arrival counters, ``>= n`` of them, zero-initialised once and re-armed by the kernel.

    Allocated outside CUDA-graph capture (the first eager call, e.g. a warm-up); returns None when a
    capture would need a new / larger buffer (the caller then uses the two-launch merge). One buffer
    per device: fused launches on one device must not run concurrently on different streams.
    """
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:  # outgrown: kept alive, a graph captured with it still uses its address
            _RETIRED_COUNTERS.append(buf)
        buf = torch.zeros(max(n, 1 << 12), dtype=torch.int32, device=device)  # [n_counters]
        _COUNTERS[key] = buf
    return buf


def _pdl_ok(device: torch.device) -> bool:
    return device.type == "cuda" and device.index not in _NO_PDL and torch.cuda.get_device_capability(device)[0] >= 9


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
        num_splits: split-K programs per (row block, batch, kv head), a tree-only program included
            (default: enough programs for the device, see ``waves`` in :func:`pick_config`).
        config: block shapes (``BLOCK_M``, ``BLOCK_N``, ``num_warps``, ``num_stages``) and split-K
            policy (``waves``, ``fill``, ``min_tiles``, ``tree_split``, ``combine``, ``pdl``), see
            :func:`pick_config`; for fp32 also ``dot`` (``"tf32x3"``, the default, or ``"ieee"``).
        out: optional ``[B, n, Hq, D]`` output buffer (contiguous unless the merge is fused).
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
    cfg = dict(pick_config(n, G, D, q.dtype, view_len=L))
    if config:
        cfg.update(config)
    dot = cfg.get("dot", FP32_DOT) if q.dtype == torch.float32 else ""  # 16-bit: plain tensor-core dots
    if dot not in ("", "ieee", "tf32x3"):
        raise ValueError(f"tree_attention: config 'dot' must be 'ieee' or 'tf32x3', got {dot!r}")
    BLOCK_M, BLOCK_N = cfg["BLOCK_M"], cfg["BLOCK_N"]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    scale = scaling if scaling is not None else D ** -0.5
    if out is None:
        out = torch.empty(B, n, Hq, D, dtype=q.dtype, device=q.device)  # [B, n, Hq, D]

    m_blocks = triton.cdiv(n * G, BLOCK_M)
    prefix_bound = max(L - n_tree, 0)  # host-side upper bound on every prefix (no device sync)
    p_blocks = triton.cdiv(prefix_bound + n_tree, BLOCK_N)
    per_split = m_blocks * B * Hkv  # programs per split
    mode = cfg.get("tree_split", "none")
    chunk = 0  # host-sized prefix chunk (legacy policy only)
    if mode == "legacy":
        pb = triton.cdiv(prefix_bound, BLOCK_N)  # prefix tiles of the host view
        if num_splits is None:
            want = triton.cdiv(int(cfg.get("waves", 2) * _num_sms(q.device)), per_split)
            num_splits = max(1, min(want, triton.cdiv(pb, cfg.get("min_tiles", 4)), cfg.get("max_splits", 64)))
        num_splits = max(1, min(int(num_splits), max(pb, 1)))
        chunk = triton.cdiv(pb, num_splits) * BLOCK_N if pb else BLOCK_N
        num_splits = max(1, triton.cdiv(prefix_bound, chunk)) if pb else 1
        tree_split = 3
    else:
        if num_splits is None:
            slots = cfg.get("waves", 1) * _num_sms(q.device)
            want = slots // per_split if cfg.get("fill", "ceil") == "floor" else triton.cdiv(slots, per_split)
            num_splits = min(want, triton.cdiv(p_blocks, cfg.get("min_tiles", 1)), 64)
        # split-K programs per (row block, batch, kv head), the tree program included
        num_splits = max(1, min(int(num_splits), max(p_blocks, 1)))
        tree_split = {"none": 0, "first": 1, "last": 2}[mode] if num_splits > 2 else 0
    write_partial = num_splits > 1

    R = B * n * Hq
    rows = min(BLOCK_M, n * G)  # real rows of one program
    combine = cfg.get("combine", "kernel")
    fused = write_partial and (combine == "fused" or (combine == "auto" and rows * num_splits * BLOCK_D <= _FUSE_MAX_ELEMS))
    counters = _counters(q.device, per_split) if fused else None
    fused = counters is not None
    # the merge launched early: a config's choice, or every kernel of the step (specdec.kernels.pdl)
    pdl = (bool(cfg.get("pdl", False)) or _step_pdl.enabled(q.device)) and write_partial and not fused and _pdl_ok(q.device)
    if write_partial:
        opart = torch.empty(num_splits, R, BLOCK_D, dtype=torch.float32, device=q.device)  # [S, B*n*Hq, BLOCK_D]
        mpart = torch.empty(num_splits, R, dtype=torch.float32, device=q.device)  # [S, B*n*Hq]
        lpart = torch.empty(num_splits, R, dtype=torch.float32, device=q.device)  # [S, B*n*Hq]
        if not fused and not out.is_contiguous():
            raise ValueError("split-K output must be contiguous [B, n, Hq, D]")
    else:
        opart = mpart = lpart = out
    if counters is None:
        counters = mpart  # never touched
    red_m = triton.next_power_of_2(rows)
    block_s = max(2, triton.next_power_of_2(num_splits))
    red_s = max(1, min(block_s, _RED_ELEMS // (red_m * BLOCK_D)))
    red_s = 1 << (red_s.bit_length() - 1)  # power of two
    grid = (m_blocks, B * Hkv, num_splits)

    def launch(block_n, stages, pdl):
        # (the attention grid lets the merge launch at its start only when the config asks: with
        # every kernel of the step on PDL the merge is launched early but triggered at the end)
        trigger = pdl and bool(cfg.get("pdl", False))
        _step_pdl.launch(lambda wait: _launch_fwd(block_n, stages, trigger, wait), q.device)

    def _launch_fwd(block_n, stages, pdl, wait):
        _tree_attn_fwd[grid](
            q, k, v, out, packed_mask, prefix_lens,
            opart, mpart, lpart, counters,
            scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *packed_mask.stride(),
            Hkv, n, n_tree, num_splits, R, chunk,
            G=G, HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
            TREE_SPLIT=tree_split, WRITE_PARTIAL=write_partial, FUSED=fused,
            RED_M=red_m, RED_S=red_s, PDL=pdl,
            DOT=dot, WAIT=wait,
            num_warps=cfg["num_warps"], num_stages=stages,
            **(dict(launch_pdl=True) if wait else {}),
        )

    def combine_launch(pdl):
        extra = dict(launch_pdl=True) if pdl else {}
        _split_combine[(R,)](
            opart, mpart, lpart, out, R, num_splits,
            HEAD_D=D, BLOCK_D=BLOCK_D, BLOCK_S=block_s, PDL=pdl,
            num_warps=4, **extra,
        )

    key = (q.device.index, q.dtype, D, G, BLOCK_M, BLOCK_N, cfg["num_warps"], cfg["num_stages"], write_partial, fused, dot)
    if key in _OUT_OF_RESOURCES:  # known too big for this GPU: never retry (a failed load breaks graph capture)
        block_n, stages = _SAFE_CONFIG["BLOCK_N"], _SAFE_CONFIG["num_stages"]
        launch(block_n, stages, pdl)
    else:
        block_n, stages = BLOCK_N, cfg["num_stages"]
        try:
            launch(block_n, stages, pdl)
        except OutOfResources:  # e.g. 3 stages of 128-key tiles on a GPU with less shared memory
            _OUT_OF_RESOURCES.add(key)
            block_n, stages = _SAFE_CONFIG["BLOCK_N"], _SAFE_CONFIG["num_stages"]
            launch(block_n, stages, pdl)
    if write_partial and not fused:
        if pdl:
            try:
                combine_launch(True)
            except Exception:  # this Triton / driver cannot launch dependents: plain launches from now on
                if torch.cuda.is_current_stream_capturing():
                    raise
                _NO_PDL.add(q.device.index)
                combine_launch(False)
        else:
            combine_launch(False)
    return out
