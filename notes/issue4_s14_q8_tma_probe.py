"""Probe: int8 W8A16 at M = 16/64 with tensor-descriptor (TMA) loads of W and x, pipelined by
Triton (num_stages), W converted in registers and used as the wgmma A operand (swap: W @ x^T).
Split-K programs add fp32 partials with atomics into a zeroed workspace; y = ws * scale (cast kernel).

Run: ``PYTHONPATH=. python notes/issue4_s14_q8_tma_probe.py`` on the GPU machine (JSON to $OUT). The int8 and int4 probes share
``sweep`` (in the int8 one)."""
import sys, json, os
import torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def q8_tma(x_desc, w_desc, s_ptr, ws_ptr, M, N, K, k_per_split,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
           SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    off_n = pid_n * BLOCK_N
    k_lo = pid_k * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in tl.range(k_lo, k_lo + k_per_split, BLOCK_K, num_stages=NUM_STAGES):
        w = w_desc.load([off_n, k])  # [BN, BK] int8
        x = x_desc.load([0, k])  # [BM, BK] bf16
        acc = tl.dot(w.to(tl.bfloat16), tl.trans(x), acc)
    n = off_n + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    s = tl.load(s_ptr + n, mask=n < N, other=0.0)
    y = acc * s[:, None]
    ptrs = ws_ptr + m[None, :] * N + n[:, None]
    ok = (n[:, None] < N) & (m[None, :] < M)
    if SPLIT == 1:
        tl.store(ptrs, y.to(tl.bfloat16), mask=ok)
    else:
        tl.atomic_add(ptrs, y, mask=ok, sem="relaxed")


def make(M, N, K, BN, BK, stages, split, warps, q, s, dev="cuda"):
    """One probe call over the int8 weight ``q [N, K]``, scales ``s [N]``: ``(call, y, ref_fn)``."""
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    BM = max(16, M)
    ws = torch.zeros(M, N, device=dev, dtype=torch.float32)
    y = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    if split == 1:
        ws = y  # stored in bf16 directly
    xd = TensorDescriptor.from_tensor(x, [BM, BK])
    wd = TensorDescriptor.from_tensor(q, [BN, BK])
    kps = triton.cdiv(triton.cdiv(K, split), BK) * BK
    grid = (triton.cdiv(N, BN), triton.cdiv(K, kps))

    def f():
        if split > 1:
            ws.zero_()
        q8_tma[grid](xd, wd, s, ws, M, N, K, kps, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, NUM_STAGES=stages,
                     SPLIT=split, num_warps=warps)
        if split > 1:
            y.copy_(ws)
    return f, y, lambda: x.float() @ (q.float() * s[:, None]).T


SHAPES = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]  # Llama-3-8B


def sweep(quantize, lib_call, variants, build, out_name, label):
    """For M in (64, 16) and each 8B layer: cuBLAS bf16, the library kernel ``lib_call(x, qw)`` and
    every probe variant ``(key, params)`` of ``variants(N)`` built by ``build(M, N, K, params, qw)``
    -> ``(call, y, ref_fn)``, over weight copies > 2x L2 (each call streams from HBM), timed by
    ``bench_quant_kernels.bench``; the best variant within 2e-2 relative error. JSON to $OUT."""
    import benchmarks.bench_quant_kernels as bq
    torch.inference_mode().__enter__()
    out = os.environ.get("OUT", ".")
    rows = []
    for M in (64, 16):
        for name, N, K in SHAPES:
            ncopy = max(2, -(-(2 * 60 << 20) // (N * K)))
            xs = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            wb = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(ncopy)]
            t_bf16 = bq.bench([lambda w=w: xs @ w.T for w in wb], 25, 100) * 1e3
            qs = [quantize(w) for w in wb]
            del wb
            t_lib = bq.bench([lambda qw=qw: lib_call(xs, qw) for qw in qs], 25, 100) * 1e3
            best, res = None, {}
            for key, params in variants(N):
                try:
                    built = [build(M, N, K, params, qw) for qw in qs]
                    call0, y0, ref0 = built[0]
                    call0()
                    torch.cuda.synchronize()
                    r = ref0()
                    err = ((y0.float() - r).abs().max() / r.abs().max()).item()
                    t = bq.bench([b[0] for b in built], 25, 100) * 1e3
                except Exception as e:
                    print("fail", key, type(e).__name__, str(e)[:100], flush=True)
                    continue
                res[key] = (t, err)
                if err < 2e-2 and (best is None or t < best[1]):
                    best = (key, t)
            rows.append(dict(M=M, layer=name, N=N, K=K, bf16_us=t_bf16, lib_us=t_lib, tma_best=best, sweep=res))
            print(f"M={M} {name}: bf16 {t_bf16:.1f} us, lib {label} {t_lib:.1f} ({t_bf16 / t_lib:.2f}x), "
                  f"TMA best {best[0] if best else None} {best[1] if best else float('nan'):.1f} "
                  f"({t_bf16 / best[1] if best else 0:.2f}x)", flush=True)
            with open(os.path.join(out, out_name), "w") as fh:
                json.dump(rows, fh, indent=1)


def q8_variants(N):
    for BN in (64, 128):
        for BK in (128, 256):
            for stages in (3, 5):
                for split in (1, 2, 4, 8):
                    for warps in ((4,) if BN == 64 else (8,)):
                        if 60 <= N // BN * split <= 1200:
                            yield f"bn{BN}bk{BK}s{stages}k{split}w{warps}", (BN, BK, stages, split, warps)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "compile":
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        sig = dict(x_desc="tensordesc<bf16[64, 128]>", w_desc="tensordesc<i8[64, 128]>", s_ptr="*fp32", ws_ptr="*fp32",
                   M="i32", N="i32", K="i32", k_per_split="i32")
        ce = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, NUM_STAGES=4, SPLIT=2)
        sig.update({k: "constexpr" for k in ce})
        k = triton.compile(ASTSource(q8_tma, sig, constexprs=ce), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        ttg = k.asm["ttgir"]
        for op in ["warp_group_dot", "async_tma_copy_global_to_local", "barrier_expect", "wait_barrier", "local_load", "local_alloc", "tt.descriptor_load"]:
            print(op, ttg.count(op))
        print("shared", k.metadata.shared)
        sys.exit()
    sys.path.insert(0, ".")
    from drafters.kernels.quant_matmul import quantize_int8, w8a16_matmul
    sweep(quantize_int8, lambda x, qw: w8a16_matmul(x, qw[0], qw[1]), q8_variants,
          lambda M, N, K, p, qw: make(M, N, K, *p, qw[0], qw[1]), "q8tma.json", "int8")
