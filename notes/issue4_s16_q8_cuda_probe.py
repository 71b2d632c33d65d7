"""Probe (sixteenth session): the CUDA W8A16 tree-width GEMM of ``notes/issue4_s16_q8_gemm_cuda.py``
(mma.sync, cp.async ring, cluster split-K through distributed shared memory) against cuBLAS bf16 and
the library default, at the Llama-3-8B linear shapes, M in {32, 64} (env MS).

Builds the kernel alone with ``load_inline``; checks every launch shape against the fp32 reference
(ragged shapes too, and run-to-run bit equality), then times them with ``bench_quant_kernels.bench``
(weight copies > 2x L2). JSON to ``$OUT/s16_q8_cuda.json``. Run: ``PYTHONPATH=. python3 notes/issue4_s16_q8_cuda_probe.py``."""
import json
import os
import time

import torch

import benchmarks.bench_quant_kernels as bq
import notes.issue4_s16_q8_gemm_cuda as q8c
from drafters.kernels.quant_matmul import dequantize_int8, quant_matmul, quantize_int8

torch.inference_mode().__enter__()
out = os.environ.get("OUT", ".")
t0 = time.time()
mod = q8c.build()
print(f"built in {time.time() - t0:.0f} s", flush=True)
gen = torch.Generator(device="cuda").manual_seed(0)
res = {"checks": [], "times": {}}

# 1. correctness: ragged N (multiple of 8, not of the block), K a few steps, M 17..64, every launch shape and split
for (N, K) in [(1000, 1152), (4096, 4096), (136, 512)]:
    w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
    q, s = quantize_int8(w)
    deq = dequantize_int8(q, s)
    for M in (17, 33, 64):
        x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
        ref = x.float() @ deq.T
        for nw, nt, st in q8c.LAUNCHES:
            if nt * 8 < M:
                continue
            for split in (1, 2, 3, 8):
                if split > K // 128:
                    continue
                y = q8c.q8_gemm(mod, x, q, s, nw, nt, st, split)
                y2 = q8c.q8_gemm(mod, x, q, s, nw, nt, st, split)
                err = bq.rel_err(y, ref)
                ok = err < 1e-2 and torch.equal(y, y2)
                res["checks"].append([N, K, M, nw, nt, st, split, err, ok])
                if not ok:
                    print("FAIL", N, K, M, nw, nt, st, split, err, torch.equal(y, y2), flush=True)
print("checks:", len(res["checks"]), "failed:", sum(not c[-1] for c in res["checks"]),
      "worst err:", max(c[-2] for c in res["checks"]), flush=True)

# 2. timing
SPLITS = {"q/o": (2, 4, 8), "k/v": (4, 8), "gate/up": (1, 2), "down": (2, 4, 8)}
for name, N, K in bq.SHAPES:
    ncopy = max(2, -(-(2 * 60 << 20) // (N * K)))
    ws = []
    for _ in range(ncopy):
        w = torch.randn(N, K, device="cuda", generator=gen) * 0.02
        q, s = quantize_int8(w)
        ws.append((q, s, dequantize_int8(q, s).to(torch.bfloat16)))
    for M in tuple(int(m) for m in os.environ.get("MS", "32,64").split(",")):
        x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
        ref = x.float() @ ws[0][2].float().T
        row = {"bf16": bq.bench([lambda w=w: x @ w.T for _, _, w in ws], 25, 100) * 1e3,
               "lib": bq.bench([lambda q=q, s=s: quant_matmul(x, q, s, 8) for q, s, _ in ws], 25, 100) * 1e3}
        for nw, nt, st in q8c.LAUNCHES:
            if nt * 8 < M or (nt == 8 and M <= 32):
                continue
            for split in SPLITS[name]:
                blocks = -(-N // (32 * nw)) * split
                if not 48 <= blocks <= 600:
                    continue
                key = f"w{nw}t{nt}s{st}k{split}"
                try:
                    err = bq.rel_err(q8c.q8_gemm(mod, x, ws[0][0], ws[0][1], nw, nt, st, split), ref)
                    if err > 1e-2:
                        row[key] = f"err {err:.2e}"
                        continue
                    row[key] = bq.bench([lambda q=q, s=s: q8c.q8_gemm(mod, x, q, s, nw, nt, st, split)
                                         for q, s, _ in ws], 25, 100) * 1e3
                except Exception as e:
                    row[key] = f"{type(e).__name__}: {str(e)[:200]}"
        res["times"][f"{name} M={M}"] = row
        best = min((v, k) for k, v in row.items() if isinstance(v, float) and k not in ("bf16", "lib"))
        print(f"{name} M={M}: bf16 {row['bf16']:.2f} lib {row['lib']:.2f} best {best[1]} {best[0]:.2f} "
              f"({row['bf16'] / best[0]:.2f}x bf16)", flush=True)
        json.dump(res, open(f"{out}/s16_q8_cuda.json", "w"), indent=1)
print(f"total {time.time() - t0:.0f} s")
