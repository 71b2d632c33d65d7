"""A/B (sixteenth session): ``_q8_tma_kernel`` with the channel-scale load after the K loop (the module
given as argv[1], the fifteenth-session kernel) or before it (the library). One process per variant,
alternated by the caller; prints JSON of best-of-3 median µs per layer at M in MS (default 32,64)
for the library default config, with cuBLAS bf16 alongside. Run: ``PYTHONPATH=. python3
notes/issue4_s16_scale_hoist_ab.py [path/to/quant_matmul.py]``."""
import importlib.util
import json
import os
import sys

import torch

import benchmarks.bench_quant_kernels as bq

if len(sys.argv) > 1:  # the variant under test replaces the library module
    spec = importlib.util.spec_from_file_location("drafters.kernels.quant_matmul", sys.argv[1])
    qm = importlib.util.module_from_spec(spec)
    sys.modules["drafters.kernels.quant_matmul"] = qm
    spec.loader.exec_module(qm)
else:  # (the package re-exports a function of the same name, so import the module by name)
    qm = importlib.import_module("drafters.kernels.quant_matmul")

torch.inference_mode().__enter__()
gen = torch.Generator(device="cuda").manual_seed(0)
out = {"variant": sys.argv[1] if len(sys.argv) > 1 else "library"}
for name, N, K in bq.SHAPES:
    ncopy = max(2, -(-(2 * 60 << 20) // (N * K)))
    ws = []
    for _ in range(ncopy):
        q, s = qm.quantize_int8(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
        ws.append((q, s, qm.dequantize_int8(q, s).to(torch.bfloat16)))
    for M in tuple(int(m) for m in os.environ.get("MS", "32,64").split(",")):
        x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
        err = bq.rel_err(qm.quant_matmul(x, ws[0][0], ws[0][1], 8), x.float() @ ws[0][2].float().T)
        assert err < 1e-2, err
        lib = min(bq.bench([lambda q=q, s=s: qm.quant_matmul(x, q, s, 8) for q, s, _ in ws], 25, 100) for _ in range(3))
        bf = min(bq.bench([lambda w=w: x @ w.T for _, _, w in ws], 25, 100) for _ in range(3))
        out[f"{name} M={M}"] = [round(lib * 1e3, 3), round(bf * 1e3, 3)]
print("RESULT", json.dumps(out), flush=True)
