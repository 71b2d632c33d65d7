"""Sweep of the library's tensor-descriptor kernels (``QuantConfig(tma=True)``: ``_q8_tma_kernel``,
``_q4_tma_kernel``) at Llama-3-8B linear shapes against cuBLAS bf16 and the library default.

For each layer and M: bf16 ``x @ w.T``, ``quant_matmul`` with its default config, and every TMA
variant (each checked against the fp32 dequantized reference first, relative Frobenius error < 1e-2),
all timed by ``benchmarks/bench_quant_kernels.bench`` over weight copies > 2x L2 (every call streams
its weights from HBM). Kernels are pre-compiled in parallel processes first. JSON rows to
``$OUT/s15_tma_q{bits}.json`` after each layer.

Launch shapes: environment variables BNS, BKS, STAGES, SPLITS, WARPS, ASMS, SWAPS (comma-separated) replace
the default grid. Run on the GPU machine: ``PYTHONPATH=. python notes/issue4_s15_tma_sweep.py 8`` (or ``4``; optional
comma-separated Ms as the second argument, default 16,64 for int8 and 1,16,64 for int4).
``TRITON_INTERPRET=1 ... --smoke`` runs one tiny shape on the CPU."""
import itertools
import json
import os
import sys
import time

import torch

import benchmarks.bench_quant_kernels as bq
from drafters.kernels.quant_matmul import QuantConfig, quant_matmul


def variants(bits: int, N: int, lo: int = 60) -> list[tuple[str, QuantConfig]]:
    """TMA launch shapes: weight rows per program, K per step, pipeline depth, split-K; only those
    giving 60..1200 programs (1..9 per SM on 132 SMs) for this N."""
    env = lambda k, d: tuple(int(v) for v in os.environ.get(k, d).split(","))  # noqa: E731
    out = []
    for bn in env("BNS", "64,128"):  # int4 with G = 128: block_k 128 / 256 is one / two groups per step
        for bk in env("BKS", "128,256"):
            for stages in env("STAGES", "3,5"):
                for split in env("SPLITS", "1,2,4,8"):
                    # ASMS: int8 ignores it since the session's end (its inline PTX was removed)
                    for warps, asm, swap in itertools.product(
                            env("WARPS", "0"), env("ASMS", "1" if bits == 4 else "0"), env("SWAPS", "1")):
                        if lo <= -(-N // bn) * split <= 1200:  # warps 0: 4 for 64 rows, 8 above
                            cfg = QuantConfig(gemv=False, block_n=bn, block_k=bk, split_k=split, num_stages=stages,
                                              num_warps=warps or (4 if bn == 64 else 8), tma=True, asm=bool(asm),
                                              swap=bool(swap))
                            out.append((f"bn{bn}bk{bk}s{stages}k{split}w{cfg.num_warps}" + "a" * asm
                                        + "n" * (1 - swap), cfg))
    return out


def main() -> None:
    smoke = "--smoke" in sys.argv
    argv = [a for a in sys.argv[1:] if a != "--smoke"]
    bits = int(argv[0]) if argv else 8
    ms = tuple(int(m) for m in argv[1].split(",")) if len(argv) > 1 else ((16, 64) if bits == 8 else (1, 16, 64))
    dev = "cpu" if smoke else "cuda"
    bq.DEV = dev
    shapes = [("tiny", 256, 256)] if smoke else [s for s in bq.SHAPES if s[0] in os.environ.get("LAYERS", s[0])]
    dtype = torch.float16 if smoke else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    out = os.environ.get("OUT", ".")
    torch.inference_mode().__enter__()
    if not smoke:
        tasks = [(bits, c, "bfloat16", 4096, 4096, M, dev) for M in ms for _, c in variants(bits, 4096)]
        tasks += [(bits, c, "bfloat16", 1024, 4096, M, dev) for M in ms for _, c in variants(bits, 1024)]
        bq.prewarm(tasks, 15, print)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, N, K in shapes:
        ncopy = 1 if smoke else max(2, -(-(2 * 60 << 20) // (N * K * bits // 8)))
        ws = [bq.make_weight(bits, N, K, gen) for _ in range(ncopy)]  # (q, s, fp32 dequantized)
        wb = [w[2].to(dtype) for w in ws]
        for M in ms:
            x = torch.randn(M, K, device=dev, generator=gen).to(dtype)
            ref = x.float() @ ws[0][2].T
            t_bf16 = bq.bench([lambda w=w: x @ w.T for w in wb], 25, 100) * 1e3
            t_lib = bq.bench([lambda q=q, s=s: quant_matmul(x, q, s, bits, bq.GROUP) for q, s, _ in ws], 25, 100) * 1e3
            res, best = {}, None
            t0 = time.time()
            for key, cfg in (variants(bits, N, 0)[::9] if smoke else variants(bits, N)):
                try:
                    err = bq.rel_err(quant_matmul(x, ws[0][0], ws[0][1], bits, bq.GROUP, cfg), ref)
                    t = bq.bench([lambda q=q, s=s: quant_matmul(x, q, s, bits, bq.GROUP, cfg) for q, s, _ in ws],
                                 25, 100) * 1e3
                except Exception as e:  # e.g. shared memory over the limit
                    print("fail", key, type(e).__name__, str(e)[:120], flush=True)
                    continue
                res[key] = (t, err)
                if err < 1e-2 and (best is None or t < best[1]):
                    best = (key, t)
            rows.append(dict(bits=bits, M=M, layer=name, N=N, K=K, bf16_us=t_bf16, lib_us=t_lib, tma_best=best,
                             sweep=res))
            print(f"int{bits} M={M} {name}: bf16 {t_bf16:.1f} us, lib {t_lib:.1f} ({t_bf16 / t_lib:.2f}x), "
                  f"TMA best {best[0] if best else None} {best[1] if best else float('nan'):.1f} "
                  f"({t_bf16 / best[1] if best else 0:.2f}x) [{len(res)} variants, {time.time() - t0:.0f} s]",
                  flush=True)
            with open(os.path.join(out, f"s15_tma_q{bits}.json"), "w") as fh:
                json.dump(rows, fh, indent=1)
        del ws, wb
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
