"""ncu probe (sixteenth session): where int8 W8A16 at M = 64 spends its time on q/o and k/v, next to
cuBLAS bf16 and the int4 TMA kernel. Each op is warmed up, then called once between
``cudaProfilerStart/Stop`` so ``ncu --profile-from-start off`` sees only those launches.
Run on the GPU machine: ``PYTHONPATH=. ncu --profile-from-start off --clock-control none
--section SpeedOfLight ... python notes/issue4_s16_ncu_probe.py``."""
import dataclasses
import os

import torch

import benchmarks.bench_quant_kernels as bq
from drafters.kernels.quant_matmul import default_config, quant_matmul

torch.inference_mode().__enter__()
gen = torch.Generator(device="cuda").manual_seed(0)
M = int(os.environ.get("M", "64"))
ops = []
for name, N, K in [s for s in bq.SHAPES if s[0] in os.environ.get("LAYERS", "q/o,k/v")]:
    x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
    q8, s8, deq = bq.make_weight(8, N, K, gen)
    q4, s4, _ = bq.make_weight(4, N, K, gen)
    wb = deq.to(torch.bfloat16)
    c8 = default_config(M, N, K, 8, None, x.device, x.dtype)
    ops.append((f"{name} bf16", lambda x=x, wb=wb: x @ wb.T))
    ops.append((f"{name} int8 {c8}", lambda x=x, q=q8, s=s8: quant_matmul(x, q, s, 8)))
    ops.append((f"{name} int4", lambda x=x, q=q4, s=s4: quant_matmul(x, q, s, 4, bq.GROUP)))
    for bn, warps in ((128, 8), (128, 4)):
        c = dataclasses.replace(c8, block_n=bn, num_warps=warps)
        ops.append((f"{name} int8 bn{bn}w{warps}", lambda x=x, q=q8, s=s8, c=c: quant_matmul(x, q, s, 8, None, c)))
for label, f in ops:
    for _ in range(3):
        f()
torch.cuda.synchronize()
for label, f in ops:
    print("OP", label, flush=True)
    torch.cuda.cudart().cudaProfilerStart()
    f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
