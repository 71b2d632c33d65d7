"""Probe (seventeenth session): int8 W8A16 at 16-bit activations, 32 / 64 rows, Llama-3-8B shapes.

Side by side in one process, each timed by the bench's CUDA-graph ``bench()`` (best of 3 medians, µs):
* ``bf16``: cuBLAS ``x @ w.T``;
* ``lib``: the library default (``_q8_tma_kernel``);
* ``peel``: the same Triton kernel with its first K step peeled out of the loop. ptxas reports
  C7515 ("wgmma.mma_async instructions are serialized") for the library kernel: the zero-trip path
  of the loop defines the accumulator with ``mov``s; with the peel it does not;
* ``static``: the same Triton kernel with a compile-time trip count per split (no zero-trip path:
  no C7515 either, and the first step stays inside the pipeline, unlike ``peel``);
* ``g:...`` (``GLUON=1``): the Gluon kernel of ``notes/issue4_s17_q8_gluon.py`` (warp-specialized or not).
* ``staticR`` (with ``static``): the same with each tile starting at its own K step (``ROT``);
* ``occ:...`` (``OCC=1``, instead of ``static``): small rings with ``maxnreg=128`` or without.
Every variant is checked against the fp32 reference and for run-to-run equality first. Prints one
JSON line ``RESULT {...}``. Run: ``PYTHONPATH=. python3 notes/issue4_s17_gluon_probe.py``; env
``MS=64,32``, ``SHAPES=q/o,k/v``, ``NOPEEL=1``, ``GLUON=1``, ``OCC=1``, ``ROTONLY=1``, ``QUICK=1``.
Results: ``notes/issue4_h200_s17_*probe*.json``, summary in ``notes/issue4_quantized.md``.
"""
import importlib
import importlib.util
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

import benchmarks.bench_quant_kernels as bq
from specdec.kernels.skinny import store_y, workspace

_spec = importlib.util.spec_from_file_location("q8_gluon", os.path.join(os.path.dirname(__file__), "issue4_s17_q8_gluon.py"))
q8_gluon = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(q8_gluon)

qm = importlib.import_module("drafters.kernels.quant_matmul")


@triton.jit
def _finish(acc, s_ptr, y_ptr, ws_ptr, cnt_ptr, off_n, M, N, stride_ym, pid, pid_k,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    """The library kernel's epilogue: channel scale, then ``store_y`` (ordered split-K)."""
    rn = off_n + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0)[:, None]
    store_y(acc, y_ptr, y_ptr, ws_ptr, cnt_ptr, rn, rm, n_ok, rm < M, stride_ym, pid, pid_k,
            False, BLOCK_N, BLOCK_M, SPLIT)


@triton.jit
def _q8_tma_peel(x_desc, w_desc, s_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, k_per_split, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                 STAGES: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    off_n = pid * BLOCK_N
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    w = w_desc.load([off_n, k_lo])
    xt = x_desc.load([0, k_lo])
    acc = tl.dot(w.to(xt.dtype), tl.trans(xt))  # [BN, BM]
    for k in tl.range(k_lo + BLOCK_K, k_hi, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([off_n, k])
        xt = x_desc.load([0, k])
        acc = tl.dot(w.to(xt.dtype), tl.trans(xt), acc)
    _finish(acc, s_ptr, y_ptr, ws_ptr, cnt_ptr, off_n, M, N, stride_ym, pid, pid_k, BLOCK_N, BLOCK_M, SPLIT)


@triton.jit
def _q8_tma_static(x_desc, w_desc, s_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                   STAGES: tl.constexpr, KPS: tl.constexpr, ROT: tl.constexpr):
    """The library kernel with a compile-time trip count (``KPS // BLOCK_K`` steps per split; TMA zero-fills
    past K): no zero-trip path, so ptxas does not serialize the wgmmas (no C7515)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    off_n = pid * BLOCK_N
    k_lo = pid_k * KPS
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    NSTEPS: tl.constexpr = KPS // BLOCK_K
    for i in tl.range(0, NSTEPS, num_stages=STAGES):
        if ROT:  # each tile starts at its own K step: the programs of a split do not all read one x tile at once
            k = k_lo + ((i + pid) % NSTEPS) * BLOCK_K
        else:
            k = k_lo + i * BLOCK_K
        w = w_desc.load([off_n, k])
        xt = x_desc.load([0, k])
        acc = tl.dot(w.to(xt.dtype), tl.trans(xt), acc)
    _finish(acc, s_ptr, y_ptr, ws_ptr, cnt_ptr, off_n, M, N, stride_ym, pid, pid_k, BLOCK_N, BLOCK_M, SPLIT)


def _launch(x, q, s, bn, bk, split, stages, warps, peeled, **extra):
    """One launch of ``_q8_tma_static`` or (``peeled``) ``_q8_tma_peel``, split-K as the library's."""
    M, K = x.shape
    N = q.shape[0]
    bm = max(16, triton.next_power_of_2(M))
    split = min(split, triton.cdiv(K, bk))
    kps = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, kps)
    tiles = triton.cdiv(N, bn)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    ws, cnt = workspace(x.device, tiles, bn * bm, split) if split > 1 else (y, y)
    xd = qm._TensorDescriptor.from_tensor(x, [bm, bk])
    wd = qm._TensorDescriptor.from_tensor(q, [bn, bk])
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, STAGES=stages, num_warps=warps)
    if peeled:
        _q8_tma_peel[(tiles, split)](xd, wd, s, y, ws, cnt, M, N, K, kps, y.stride(0), **meta)
    else:
        _q8_tma_static[(tiles, split)](xd, wd, s, y, ws, cnt, M, N, K, y.stride(0), KPS=kps, **meta, **extra)
    return y


def static(x, q, s, bn, bk, split, stages, warps=4, rot=False, maxnreg=None):
    return _launch(x, q, s, bn, bk, split, stages, warps, False, ROT=rot, **({"maxnreg": maxnreg} if maxnreg else {}))


def peel(x, q, s, bn, bk, split, stages, warps=4):
    return _launch(x, q, s, bn, bk, split, stages, warps, True)


def gluon_grid(name, M):
    out = []
    if name == "k/v":
        for bk in (128, 256):
            for split in (4, 8):
                for st in ((3, 4) if bk == 256 else (4, 6)):
                    for ws in (True, False):
                        out.append(dict(block_n=64, block_k=bk, split_k=split, stages=st, ws=ws))
        out.append(dict(block_n=128, block_k=128, split_k=8, stages=4, ws=True))
    else:
        splits = (2, 4) if name == "q/o" else (1, 2) if name == "gate/up" else (4, 8)
        for split in splits:
            for st in (4, 6):
                for ws in (True, False):
                    out.append(dict(block_n=64, block_k=128, split_k=split, stages=st, ws=ws))
            out.append(dict(block_n=128, block_k=128, split_k=split, stages=4, ws=True))
            out.append(dict(block_n=64, block_k=256, split_k=split, stages=3, ws=True))
    out.sort(key=lambda g: (-g["block_n"], not g["ws"]))  # the two-warpgroup tiles first
    if os.environ.get("QUICK"):
        out = out[:4]
    return out


def peel_grid(name, cfg):
    base = (cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_stages)
    alts = {base, (64, 128, cfg.split_k, 4), (64, 128, max(1, cfg.split_k // 2), 4), (64, 256, cfg.split_k, 3)}
    return sorted(alts)


def occ_grid(name):
    if name == "k/v":
        return [(256, 8, 3), (128, 16, 2), (128, 16, 3), (64, 16, 4), (128, 8, 2), (64, 8, 4), (256, 16, 2)]
    if name == "q/o":
        return [(128, 4, 3), (128, 8, 2), (128, 4, 2), (64, 8, 4), (64, 4, 4), (64, 8, 3), (128, 16, 2)]
    if name == "gate/up":
        return [(128, 1, 4), (128, 1, 2), (64, 1, 4), (128, 2, 2), (256, 1, 3)]
    return [(128, 4, 4), (128, 8, 2), (64, 8, 4), (128, 4, 2), (256, 4, 3)]


def static_grid(name, cfg):
    base = (cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_stages)
    out = [base]
    for bk, sts in ((128, (3, 4, 5)), (256, (2, 3))):
        for sp in sorted({max(1, cfg.split_k // 2), cfg.split_k, min(8, cfg.split_k * 2)}):
            for st in sts:
                if (64, bk, sp, st) != base:
                    out.append((64, bk, sp, st))
    return out


def main():
    assert not os.environ.get("GLUON") or q8_gluon.available(), "Gluon Hopper API not available here"
    torch.inference_mode().__enter__()
    gen = torch.Generator(device="cuda").manual_seed(0)
    MS = tuple(int(m) for m in os.environ.get("MS", "64,32").split(","))
    res = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}
    t0 = time.time()
    only = os.environ.get("SHAPES")
    for name, N, K in bq.SHAPES:
        if only and name not in only.split(","):
            continue
        ncopy = max(2, -(-(2 * 60 << 20) // (N * K)))
        ws = []
        for _ in range(ncopy):
            q, s = qm.quantize_int8(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
            ws.append((q, s, qm.dequantize_int8(q, s).to(torch.bfloat16)))
        for M in MS:
            x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
            ref = x.float() @ ws[0][2].float().T
            cell = {}

            def timeit(label, f):
                try:
                    err = bq.rel_err(f(x, ws[0][0], ws[0][1]), ref)
                    if not err < 1e-2:
                        cell[label] = f"WRONG {err:.3g}"
                        return
                    again = f(x, ws[0][0], ws[0][1])
                    first = f(x, ws[0][0], ws[0][1])
                    det = bool(torch.equal(again, first))
                    t = min(bq.bench([lambda q=q, s=s: f(x, q, s) for q, s, _ in ws], 25, 100) for _ in range(3))
                    cell[label] = round(t * 1e3, 2) if det else f"{t * 1e3:.2f} NONDET"
                except Exception as e:  # noqa: BLE001 - a probe: record and go on
                    cell[label] = f"FAIL {type(e).__name__}: {str(e)[:160]}"
                print(name, M, label, cell[label], f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)

            cell["bf16"] = round(min(bq.bench([lambda w=w: x @ w.T for _, _, w in ws], 25, 100) for _ in range(3)) * 1e3, 2)
            timeit("lib", lambda x, q, s: qm.quant_matmul(x, q, s, 8))
            cfg = qm.default_config(M, N, K, 8, None, x.device, dtype=x.dtype)
            for bn, bk, sp, st in (peel_grid(name, cfg) if not os.environ.get("NOPEEL") else []):
                timeit(f"peel:bn{bn}/bk{bk}/s{sp}/st{st}",
                       lambda x, q, s, bn=bn, bk=bk, sp=sp, st=st: peel(x, q, s, bn, bk, sp, st))
            if os.environ.get("OCC"):  # more programs resident per SM: small rings, registers capped
                for bk, sp, st in occ_grid(name):
                    for mr in (None, 128):
                        timeit(f"occ:bk{bk}/s{sp}/st{st}/r{mr or 0}",
                               lambda x, q, s, bk=bk, sp=sp, st=st, mr=mr: static(x, q, s, 64, bk, sp, st, maxnreg=mr))
            for bn, bk, sp, st in (static_grid(name, cfg) if not os.environ.get("OCC") else []):
                for rot in ((False, True) if not os.environ.get("ROTONLY") else (True,)):
                    timeit(f"static{'R' if rot else ''}:bn{bn}/bk{bk}/s{sp}/st{st}",
                           lambda x, q, s, bn=bn, bk=bk, sp=sp, st=st, rot=rot: static(x, q, s, bn, bk, sp, st, rot=rot))
            for g in (gluon_grid(name, M) if os.environ.get("GLUON") else []):
                lab = "g:bn{block_n}/bk{block_k}/s{split_k}/st{stages}/{w}".format(w="ws" if g["ws"] else "sp", **g)
                timeit(lab, lambda x, q, s, g=g: q8_gluon.q8_gluon_matmul(x, q, s, **g))
            # cuBLAS and the library again, last (drift check)
            cell["bf16_end"] = round(min(bq.bench([lambda w=w: x @ w.T for _, _, w in ws], 25, 100) for _ in range(3)) * 1e3, 2)
            timeit("lib_end", lambda x, q, s: qm.quant_matmul(x, q, s, 8))
            res[f"{name} M={M}"] = cell
            print("CELL", name, M, json.dumps(cell), flush=True)
    print("RESULT", json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
