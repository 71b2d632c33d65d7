"""Issue #5 probe (fourteenth session): a decode-attention layout that streams K/V the way the
read-floor probe's fastest read does (many programs, plain loads, no cp.async pipeline), against
the shipped tree attention at N = 1, timed by ``benchmarks/bench_tree_attention.py``'s ``bench()``.

Program (kv head h, split s) reads TILES tiles of BLOCK_T keys and scores the G query heads of h
on CUDA cores (``MATH="fma"``: broadcast products reduced over D) or on tensor cores (``"dot"``:
the G rows padded to 16); the split's (acc, m, l) partials are merged by the shipped
``_split_combine`` kernel (second launch). Outputs are checked against the shipped kernel.

    PYTHONPATH=. python notes/issue5_s14_decode_probe.py --out $OUT
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import benchmarks.bench_tree_attention as bta
from notes.issue5_s14_read_floor_probe import probe_setup, save_rows
from verifiers.kernels import tree_attention
from verifiers.kernels.tree_attention import _split_combine


@triton.jit
def _decode_split(Q, K, V, OPART, MPART, LPART, L, qk_scale,
                  stride_qh, stride_kh, stride_kl, stride_vh, stride_vl, R_TOTAL,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
                  TILES: tl.constexpr, MATH: tl.constexpr):
    h = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.arange(0, GP)  # [GP] query heads of kv head h (padded)
    g_ok = g < G
    d = tl.arange(0, D)
    q = tl.load(Q + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)  # [GP, D]
    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    qf = q.to(tl.float32)
    for i in range(TILES):
        t = (s * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] key slots
        t_ok = t < L
        k = tl.load(K + h * stride_kh + t[:, None] * stride_kl + d[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, D]
        v = tl.load(V + h * stride_vh + t[:, None] * stride_vl + d[None, :], mask=t_ok[:, None], other=0.0)  # [BLOCK_T, D]
        if MATH == "fma":
            sc = tl.sum(qf[:, None, :] * k.to(tl.float32)[None, :, :], 2)  # [GP, BLOCK_T]
        else:
            sc = tl.dot(q, tl.trans(k))  # [GP, BLOCK_T]
        sc = tl.where(t_ok[None, :], sc * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MATH == "fma":
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)  # [GP, D]
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    r = h * G + g  # partial row (B = 1, N = 1): the query head
    base = s.to(tl.int64) * R_TOTAL + r
    tl.store(OPART + base[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
    tl.store(MPART + base, m_i, mask=g_ok)
    tl.store(LPART + base, l_i, mask=g_ok)


def decode_fn(q, k, v, out, L, block_t, tiles, warps, math_):
    """q [1, Hq, 1, D] (view), k/v [1, Hkv, L, D] views; out [1, 1, Hq, D]."""
    Hq, D = q.shape[1], q.shape[3]
    Hkv = k.shape[1]
    G = Hq // Hkv
    S = triton.cdiv(triton.cdiv(L, block_t), tiles)
    opart = torch.empty(S, Hq, D, device=q.device, dtype=torch.float32)
    mpart = torch.empty(S, Hq, device=q.device, dtype=torch.float32)
    lpart = torch.empty(S, Hq, device=q.device, dtype=torch.float32)
    scale = D ** -0.5 * 1.4426950408889634
    gp = max(16, G) if math_ == "dot" else triton.next_power_of_2(G)

    def f():
        _decode_split[(Hkv, S)](q, k, v, opart, mpart, lpart, L, scale, q.stride(1), k.stride(1), k.stride(2),
                                v.stride(1), v.stride(2), Hq, G=G, GP=gp, D=D, BLOCK_T=block_t, TILES=tiles,
                                MATH=math_, num_warps=warps)
        _split_combine[(Hq,)](opart, mpart, lpart, out, Hq, S, HEAD_D=D, BLOCK_D=D,
                              BLOCK_S=triton.next_power_of_2(S), PDL=False)
    return f


def main():
    args, gen, copy_bw = probe_setup("4096,8192,16384,32768")
    shapes = [(m, bt, tiles, w) for m in ("fma", "dot") for bt in (16, 32, 64) for tiles in (2, 4, 8, 16) for w in (4, 8)]
    if args.smoke:
        shapes = [("fma", 16, 2, 4), ("dot", 16, 2, 4)]
    rows = []
    for prefix in [int(p) for p in args.prefixes.split(",")]:
        tree, sets, pl, L = bta.setup_point(1, prefix, gen)
        kv_bytes = 2 * bta.HKV * (prefix + 1) * bta.D * 2
        packed = tree.packed_ancestor_mask
        t_ship = bta.bench([lambda q=q, k=k, v=v: tree_attention(q, k, v, pl, packed, 1) for q, k, v in sets]) * 1e3
        q0, k0, v0 = sets[0]
        G = bta.HQ // bta.HKV
        ke = k0[:, :, : prefix + 1].float().repeat_interleave(G, 1)  # [1, Hq, prefix + 1, D]
        ve = v0[:, :, : prefix + 1].float().repeat_interleave(G, 1)
        ref = (torch.softmax(q0.float() @ ke.transpose(-1, -2) * bta.D ** -0.5, -1) @ ve).transpose(1, 2)  # [1, 1, Hq, D]
        shipped = tree_attention(q0, k0, v0, pl, packed, 1).float()
        err_ship = ((shipped - ref).abs().max() / ref.abs().max()).item()
        sweep, errs = {}, {}
        for m, bt, tiles, w in shapes:
            if (bt * tiles) > 4 * (prefix + 1):
                continue
            outs = [torch.empty(1, 1, bta.HQ, bta.D, device=bta.DEV, dtype=q0.dtype) for _ in sets]
            try:
                fns = [decode_fn(q, k, v, o, prefix + 1, bt, tiles, w, m) for (q, k, v), o in zip(sets, outs)]
                fns[0]()
                err = ((outs[0].float() - ref).abs().max() / ref.abs().max()).item()
                t = bta.bench(fns) * 1e3
            except Exception as e:  # out of resources etc.
                print(f"  {m} {bt}x{tiles}w{w}: {type(e).__name__} {str(e)[:80]}", flush=True)
                continue
            key = f"{m}:{bt}x{tiles}w{w}"
            sweep[key], errs[key] = t, err
        ok = {k_: t for k_, t in sweep.items() if errs[k_] < 2e-2}
        best = min(ok, key=ok.get) if ok else None
        frac = (lambda us: kv_bytes / (us * 1e-6) / 1e9 / copy_bw)
        row = dict(prefix=prefix, shipped_us=t_ship, shipped_err=err_ship, shipped_frac=frac(t_ship), best=best,
                   best_us=ok.get(best), best_frac=frac(ok[best]) if best else None,
                   best_err=errs.get(best), sweep=sweep, errs=errs)
        rows.append(row)
        top = sorted(ok.items(), key=lambda x: x[1])[:6]
        print(f"prefix {prefix:6d}: shipped N=1 {t_ship:.1f} us ({100 * frac(t_ship):.0f}%, err {err_ship:.1e}); probe best {best} "
              f"{ok.get(best, math.nan):.1f} us ({100 * (row['best_frac'] or 0):.0f}%, err {errs.get(best, math.nan):.1e}); "
              f"top {[(k_, round(t, 1)) for k_, t in top]}; bad {[k_ for k_ in sweep if errs[k_] >= 2e-2]}", flush=True)
        del sets
        save_rows(args, "decode_probe.json", copy_GBps=copy_bw, rows=rows)


if __name__ == "__main__":
    main()
