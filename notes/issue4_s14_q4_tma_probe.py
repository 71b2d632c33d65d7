"""Probe: int4 W4A16 (group-local half-split packing, G = 128) at M = 16/64 with tensor-descriptor
(TMA) loads pipelined by Triton; nibbles widened in registers (plain Triton ops), two wgmma dots per
group (low / high halves against the matching x halves), group scale applied to the group's partial.

Run: ``PYTHONPATH=. python notes/issue4_s14_q4_tma_probe.py`` on the GPU machine (JSON to $OUT). The int8 and int4 probes share
``sweep`` (in the int8 one)."""
import sys
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def q4_tma(x_desc, w_desc, s_ptr, ws_ptr, M, N, g_per_split,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr, NUM_STAGES: tl.constexpr,
           SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    off_n = pid_n * BLOCK_N
    n = off_n + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    g_lo = pid_k * g_per_split
    for g in tl.range(g_lo, g_lo + g_per_split, 1, num_stages=NUM_STAGES):
        b = w_desc.load([off_n, g * (G // 2)])  # [BN, G/2] uint8
        xlo = x_desc.load([0, g * G])  # [BM, G/2]
        xhi = x_desc.load([0, g * G + G // 2])
        lo = ((b & 15).to(tl.int16) - 8).to(xlo.dtype)
        hi = ((b >> 4).to(tl.int16) - 8).to(xlo.dtype)
        part = tl.dot(lo, tl.trans(xlo))
        part = tl.dot(hi, tl.trans(xhi), part)
        s = tl.load(s_ptr + g * N + n, mask=n_ok, other=0.0)
        acc += part * s[:, None]
    m = tl.arange(0, BLOCK_M)
    ptrs = ws_ptr + m[None, :] * N + n[:, None]
    ok = n_ok[:, None] & (m[None, :] < M)
    if SPLIT == 1:
        tl.store(ptrs, acc.to(ws_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(ptrs, acc, mask=ok, sem="relaxed")


def make(M, N, K, BN, stages, split, warps, packed, s, G=128, dev="cuda"):
    """One probe call over ``packed [N, K/2]`` uint8, scales ``s [K/G, N]``: ``(call, y, x)``."""
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    BM = max(16, M)
    y = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    ws = y if split == 1 else torch.zeros(M, N, device=dev, dtype=torch.float32)
    xd = TensorDescriptor.from_tensor(x, [BM, G // 2])
    wd = TensorDescriptor.from_tensor(packed, [BN, G // 2])
    ng = K // G
    gps = triton.cdiv(ng, split)
    grid = (triton.cdiv(N, BN), triton.cdiv(ng, gps))

    def f():
        if split > 1:
            ws.zero_()
        q4_tma[grid](xd, wd, s, ws, M, N, gps, BLOCK_M=BM, BLOCK_N=BN, G=G, NUM_STAGES=stages, SPLIT=split, num_warps=warps)
        if split > 1:
            y.copy_(ws)
    return f, y, x


def q4_variants(N):
    for BN in (64, 128):
        for stages in (3, 4, 6):
            for split in (1, 2, 4, 8):
                for warps in (4, 8):
                    if 60 <= N // BN * split <= 1200:
                        yield f"bn{BN}s{stages}k{split}w{warps}", (BN, stages, split, warps)


def build(M, N, K, params, qw):
    from drafters.kernels.quant_matmul import dequantize_int4
    f, y, x = make(M, N, K, *params, qw[0], qw[1])
    return f, y, lambda: x.float() @ dequantize_int4(qw[0], qw[1], K, 128).float().T


if __name__ == "__main__":
    sys.path.insert(0, ".")
    from drafters.kernels.quant_matmul import quantize_int4, w4a16_matmul
    from notes.issue4_s14_q8_tma_probe import sweep
    sweep(lambda w: quantize_int4(w, 128), lambda x, qw: w4a16_matmul(x, qw[0], qw[1], 128), q4_variants, build,
          "q4tma.json", "int4")
