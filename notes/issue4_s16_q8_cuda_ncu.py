"""ncu companion of ``issue4_s16_q8_cuda_probe.py``: one call per launch shape between
cudaProfilerStart/Stop (run under ``ncu --profile-from-start off``)."""

import torch

import notes.issue4_s16_q8_gemm_cuda as q8c
from drafters.kernels.quant_matmul import quantize_int8

torch.inference_mode().__enter__()
mod = q8c.build()
gen = torch.Generator(device="cuda").manual_seed(0)
for (N, K, nw, st, split) in [(4096, 4096, 2, 3, 8), (4096, 14336, 4, 3, 8), (4096, 4096, 4, 3, 1)]:
    q, s = quantize_int8(torch.randn(N, K, device="cuda", generator=gen) * 0.02)
    x = torch.randn(64, K, device="cuda", generator=gen).to(torch.bfloat16)
    for _ in range(3):
        q8c.q8_gemm(mod, x, q, s, nw, 8, st, split)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    q8c.q8_gemm(mod, x, q, s, nw, 8, st, split)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
