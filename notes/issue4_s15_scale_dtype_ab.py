"""A/B: the int4 kernels with bf16 group scales against the same packed weights with the fp32 scales
of ``quantize_int4`` (the kernels take either), library default configs, at the Llama-3-8B shapes and M in {1, 16, 64}; cuBLAS bf16 alongside. Each cell times the
two variants three times, alternating, through ``benchmarks/bench_quant_kernels.bench`` over weight
copies > 2x L2. JSON to ``$OUT/s15_scale_ab.json``.
(The recorded run, ``notes/issue4_h200_s15_scale_dtype_ab.json``, had ``quantize_int4`` itself store
bf16 scales rounded up, a trial since reverted; this script rounds to nearest instead.)

Run on the GPU machine: ``PYTHONPATH=. python notes/issue4_s15_scale_dtype_ab.py``
(``TRITON_INTERPRET=1 ... --smoke``: one tiny shape on the CPU)."""
import json
import os
import sys

import torch

import benchmarks.bench_quant_kernels as bq
from drafters.kernels.quant_matmul import quant_matmul, quant_matmul_ref


def main() -> None:
    smoke = "--smoke" in sys.argv
    dev = "cpu" if smoke else "cuda"
    bq.DEV = dev
    dtype = torch.float16 if smoke else torch.bfloat16
    shapes = [("tiny", 256, 256)] if smoke else bq.SHAPES
    torch.inference_mode().__enter__()
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for name, N, K in shapes:
        ncopy = 1 if smoke else max(2, -(-(2 * 60 << 20) // (N * K // 2)))
        ws = [bq.make_weight(4, N, K, gen) for _ in range(ncopy)]  # (packed, fp32 scales, fp32 dequantized)
        ws = [(q, s.to(torch.bfloat16), d) for q, s, d in ws]  # bf16 scales (the trial format); fp32 below
        wb = [w[2].to(dtype) for w in ws]
        for M in ((1, 16) if smoke else (1, 16, 64)):
            x = torch.randn(M, K, device=dev, generator=gen).to(dtype)
            ref = quant_matmul_ref(x.float(), ws[0][0], ws[0][1], 4, K, bq.GROUP).float()
            errs = {k: bq.rel_err(quant_matmul(x, ws[0][0], sc(ws[0][1]), 4, bq.GROUP), ref)
                    for k, sc in (("bf16", lambda s: s), ("fp32", lambda s: s.float()))}
            s32 = [w[1].float() for w in ws]
            t = {"bf16": [], "fp32": [], "cublas": []}
            for _ in range(3):
                t["bf16"].append(bq.bench([lambda q=q, s=s: quant_matmul(x, q, s, 4, bq.GROUP) for q, s, _ in ws], 25, 100) * 1e3)
                t["fp32"].append(bq.bench([lambda q=q[0], s=s: quant_matmul(x, q, s, 4, bq.GROUP) for q, s in zip(ws, s32)], 25, 100) * 1e3)
                t["cublas"].append(bq.bench([lambda w=w: x @ w.T for w in wb], 25, 100) * 1e3)
            best = {k: min(v) for k, v in t.items()}
            rows.append(dict(layer=name, N=N, K=K, M=M, us=t, best_us=best, rel_err=errs))
            print(f"M={M} {name}: bf16 scales {best['bf16']:.2f} us, fp32 scales {best['fp32']:.2f} us "
                  f"(ratio {best['fp32'] / best['bf16']:.3f}); cuBLAS {best['cublas']:.2f} -> "
                  f"{best['cublas'] / best['bf16']:.2f}x vs {best['cublas'] / best['fp32']:.2f}x; "
                  f"err {errs['bf16']:.1e} / {errs['fp32']:.1e}", flush=True)
            with open(os.path.join(os.environ.get("OUT", "."), "s15_scale_ab.json"), "w") as fh:
                json.dump(rows, fh, indent=1)
        del ws, wb
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
