"""A/B (seventeenth session): ``_q8_tma_kernel`` with a runtime K-step count (the module at argv[1], the
previous library) against the compile-time count (``KPS``, the library), in one process, at the
16-bit int8 TMA rows (17..64) on the Llama-3-8B shapes. Per cell, best of 3 CUDA-graph medians (µs) of:
``bf16`` (cuBLAS), ``old``/``new`` at each module's default config, and ``old256``/``new256`` with
256-wide K steps and 3 stages at the default split (the candidate default for 17..32 rows).
Run: ``PYTHONPATH=. python3 notes/issue4_s17_static_ab.py .carry/old_quant_matmul.py``."""
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import replace

import torch

import benchmarks.bench_quant_kernels as bq

new = importlib.import_module("drafters.kernels.quant_matmul")
spec = importlib.util.spec_from_file_location("drafters.kernels.quant_matmul_old", sys.argv[1])
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old  # (dataclasses look their module up)
spec.loader.exec_module(old)

torch.inference_mode().__enter__()
gen = torch.Generator(device="cuda").manual_seed(0)
MS = tuple(int(m) for m in os.environ.get("MS", "17,24,32,48,64").split(","))
out = {"device": torch.cuda.get_device_name()}
for name, N, K in bq.SHAPES:
    ncopy = max(2, -(-(2 * 60 << 20) // (N * K)))
    ws = []
    for _ in range(ncopy):
        q, s = new.quantize_int8(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
        ws.append((q, s, new.dequantize_int8(q, s).to(torch.bfloat16)))
    for M in MS:
        x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
        ref = x.float() @ ws[0][2].float().T
        cfg_old = old.default_config(M, N, K, 8, None, x.device, dtype=x.dtype)
        cfg_new = new.default_config(M, N, K, 8, None, x.device, dtype=x.dtype)
        variants = {
            "old": (old, cfg_old), "new": (new, cfg_new),
            "old256": (old, replace(cfg_old, block_k=256, num_stages=3)),
            "new256": (new, replace(cfg_new, block_k=256, num_stages=3)),
        }
        for lab, (mod, cfg) in variants.items():
            err = bq.rel_err(mod.quant_matmul(x, ws[0][0], ws[0][1], 8, config=cfg), ref)
            assert err < 1e-2, (name, M, lab, err)
        t = {k: [] for k in ["bf16", *variants]}
        for _ in range(3):  # alternate the variants, best of 3
            t["bf16"].append(bq.bench([lambda w=w: x @ w.T for _, _, w in ws], 25, 100))
            for lab, (mod, cfg) in variants.items():
                t[lab].append(bq.bench([lambda q=q, s=s, mod=mod, cfg=cfg: mod.quant_matmul(x, q, s, 8, config=cfg)
                                        for q, s, _ in ws], 25, 100))
        cell = {k: round(min(v) * 1e3, 2) for k, v in t.items()}
        cell["cfg_new"] = f"bk{cfg_new.block_k}/s{cfg_new.split_k}/st{cfg_new.num_stages}"
        out[f"{name} M={M}"] = cell
        print(name, M, json.dumps(cell), file=sys.stderr, flush=True)
print("RESULT", json.dumps(out), flush=True)
