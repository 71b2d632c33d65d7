"""Probe: int4 W4A16 (group-local half-split packing, G = 128) at M = 16/64 with tensor-descriptor
(TMA) loads pipelined by Triton; nibbles widened in registers (plain Triton ops), two wgmma dots per
group (low / high halves against the matching x halves), group scale applied to the group's partial."""
import sys, json, os
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


if __name__ == "__main__":
    torch.inference_mode().__enter__()
    sys.path.insert(0, ".")
    out = os.environ.get("OUT", ".")
    import benchmarks.bench_quant_kernels as bq
    from drafters.kernels.quant_matmul import quantize_int4, dequantize_int4, w4a16_matmul
    rows = []
    shapes = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]
    for M in (64, 16):
        for name, N, K in shapes:
            ncopy = max(2, -(-(2 * 60 << 20) // (N * K)))
            xs = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ncopy)]
            t_bf16 = bq.bench([lambda w=w: xs @ w.T for w in wb], 25, 100) * 1e3
            qs = [quantize_int4(w, 128) for w in wb]
            del wb
            t_lib = bq.bench([lambda q=q: w4a16_matmul(xs, q[0], q[1], 128) for q in qs], 25, 100) * 1e3
            wref = dequantize_int4(qs[0][0], qs[0][1], K, 128).float()  # [N, K]
            best, res = None, {}
            for BN in (64, 128):
                for stages in (3, 4, 6):
                    for split in (1, 2, 4, 8):
                        for warps in (4, 8):
                            if N // BN * split < 60 or N // BN * split > 1200:
                                continue
                            try:
                                fns = [make(M, N, K, BN, stages, split, warps, q[0], q[1]) for q in qs]
                                f0, y0, x0 = fns[0]
                                f0(); torch.cuda.synchronize()
                                r = x0.float() @ wref.T
                                err = ((y0.float() - r).abs().max() / r.abs().max()).item()
                                t = bq.bench([fr[0] for fr in fns], 25, 100) * 1e3
                            except Exception as e:
                                print("fail", BN, stages, split, warps, type(e).__name__, str(e)[:100], flush=True)
                                continue
                            key = f"bn{BN}s{stages}k{split}w{warps}"
                            res[key] = (t, err)
                            if err < 2e-2 and (best is None or t < best[1]):
                                best = (key, t)
            row = dict(M=M, layer=name, N=N, K=K, bf16_us=t_bf16, lib_us=t_lib, tma_best=best, sweep=res)
            rows.append(row)
            print(f"M={M} {name}: bf16 {t_bf16:.1f} us, lib int4 {t_lib:.1f} ({t_bf16 / t_lib:.2f}x), "
                  f"TMA best {best[0] if best else None} {best[1] if best else float('nan'):.1f} "
                  f"({t_bf16 / best[1] if best else 0:.2f}x); errs {sorted(set(round(e, 4) for _, e in res.values()))[:3]}", flush=True)
            with open(os.path.join(out, "q4tma.json"), "w") as fh:
                json.dump(rows, fh, indent=1)
