"""int4 M=1 GEMV probe (tenth session): word-wise inline PTX that dequantizes 4 packed bytes AND multiplies
them with 8 activations (bf16x2 products, fp32 out), x read as 64-bit pairs in the weight words' layout (no
shared-memory layout conversion), per-thread fp32 accumulators (one cross-thread reduction at the end)."""
import sys, os, math, statistics, itertools, json, torch, triton
import triton.language as tl
import torch.nn.functional as F
sys.path.insert(0, ".")
import importlib
qm = importlib.import_module("drafters.kernels.quant_matmul")
from drafters.kernels.quant_matmul import quantize_int4, w4a16_matmul, quant_matmul_ref


def _dot8_ptx(magic, fmt):
    m2 = f"0x{magic:04X}{magic:04X}"
    k2 = f"0x{magic + 8:04X}{magic + 8:04X}"
    hi_mask = "0xFFFF0000"
    if fmt == "bf16x2":
        conv = ["shl.b32 e, d, 16;", f"and.b32 d, d, {hi_mask};", "add.f32 $0, e, d;"]
    else:  # f16x2 -> two f32
        conv = [".reg .f16 ha, hb;", ".reg .f32 fa, fb;", "mov.b32 {ha, hb}, d;", "cvt.f32.f16 fa, ha;", "cvt.f32.f16 fb, hb;",
                "add.f32 $0, fa, fb;"]
    lines = ["{", ".reg .b32 t0, t1, l0, l1, h0, h1, xa, xb, xc, xd, d, e, k;",
             "mov.b64 {xa, xb}, $2;", "mov.b64 {xc, xd}, $3;", f"mov.b32 k, {k2};",
             "prmt.b32 t0, $1, 0, 0x4140;", "prmt.b32 t1, $1, 0, 0x4342;",
             f"lop3.b32 l0, t0, 0x000F000F, {m2}, 0xEA;", f"lop3.b32 l1, t1, 0x000F000F, {m2}, 0xEA;",
             "shr.u32 t0, t0, 4;", "shr.u32 t1, t1, 4;",
             f"lop3.b32 h0, t0, 0x000F000F, {m2}, 0xEA;", f"lop3.b32 h1, t1, 0x000F000F, {m2}, 0xEA;",
             f"sub.rn.{fmt} l0, l0, k;", f"sub.rn.{fmt} l1, l1, k;", f"sub.rn.{fmt} h0, h0, k;", f"sub.rn.{fmt} h1, h1, k;",
             f"mul.rn.{fmt} d, l0, xa;", f"fma.rn.{fmt} d, l1, xb, d;", f"fma.rn.{fmt} d, h0, xc, d;", f"fma.rn.{fmt} d, h1, xd, d;"]
    return "\n".join(lines + conv + ["}"])


PTX_BF16 = tl.constexpr(_dot8_ptx(0x4300, "bf16x2"))
PTX_F16 = tl.constexpr(_dot8_ptx(0x6400, "f16x2"))


@triton.jit
def _dot8(w, xl, xh, BF16: tl.constexpr):
    if BF16:
        return tl.inline_asm_elementwise(PTX_BF16, "=r,r,l,l", [w, xl, xh], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(PTX_F16, "=r,r,l,l", [w, xl, xh], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _q4w(x_ptr, w_ptr, s_ptr, y_ptr, N, K, NGT, stride_ww,
         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, VW: tl.constexpr, BF16: tl.constexpr,
         EVICT: tl.constexpr):
    """w_ptr: packed weights as uint32 words [N, KB/4]; x_ptr: activations as uint64 (4 x 16-bit) [K/4].
    Tile: BLOCK_N rows x NG groups x (HG/4 words); VW words per thread chunk (contiguity hint)."""
    HW: tl.constexpr = GROUP // 8  # words per group (16 for G = 128)
    NC: tl.constexpr = HW // VW
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    gi = tl.arange(0, NG)
    ci = tl.arange(0, NC)
    vi = tl.arange(0, VW)
    acc = tl.zeros([BLOCK_N, NG, NC], dtype=tl.float32)
    wrow = w_ptr + n.to(tl.int64)[:, None, None, None] * stride_ww
    for g0 in range(0, NGT, NG):
        g = g0 + gi  # [NG]
        wo = (g * HW)[:, None, None] + (ci * VW)[None, :, None] + vi[None, None, :]  # [NG, NC, VW] word index
        if EVICT:
            p = tl.load(wrow + wo[None], eviction_policy="evict_first")  # [BN, NG, NC, VW] u32
        else:
            p = tl.load(wrow + wo[None])
        xo = (g * (2 * HW))[:, None, None] + (ci * VW)[None, :, None] + vi[None, None, :]  # u64 index of the low x
        zero = tl.zeros([BLOCK_N, 1, 1, 1], dtype=tl.int32)
        xl = tl.load(x_ptr + (xo[None] + zero))  # [BN, NG, NC, VW] u64, same address for every row
        xh = tl.load(x_ptr + (xo[None] + HW + zero))
        part = tl.sum(_dot8(p, xl, xh, BF16), axis=3)  # [BN, NG, NC] fp32
        s = tl.load(s_ptr + g[None, :] * N + n[:, None])  # [BN, NG]
        acc += part * s[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty))


def q4w(x, packed, s, G, bn, ng, vw, warps, evict=True):
    N = packed.shape[0]; K = x.shape[-1]; NGT = s.shape[0]
    assert N % bn == 0 and NGT % ng == 0
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    w32 = packed.view(torch.int32)
    x64 = x.view(torch.int64)
    _q4w[(N // bn,)](x64, w32, s, y, N, K, NGT, w32.stride(0), GROUP=G, BLOCK_N=bn, NG=ng, VW=vw,
                     BF16=x.dtype == torch.bfloat16, EVICT=evict, num_warps=warps)
    return y


if __name__ == "__main__":
    OUT = os.environ.get("OUT", "."); dev = "cuda"
    l2 = torch.cuda.get_device_properties(0).L2_cache_size

    def timeit_calls(calls, reps=32, trials=7):
        for c in calls[:2]: c()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(reps): calls[i % len(calls)]()
        g.replay(); torch.cuda.synchronize()
        ts = []
        for _ in range(trials):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / reps)
        return statistics.median(ts)

    shapes = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
    G = 128
    res = {}
    torch.manual_seed(0)
    grid = list(itertools.product((4, 8, 16), (4, 8, 16), (2, 4), (4, 8)))
    for dt in (torch.bfloat16, torch.float16):
        for name, (N, K) in shapes.items():
            w = torch.randn(N, K, device=dev, dtype=dt) / 64
            x = torch.randn(1, K, device=dev, dtype=dt)
            p4, s4 = quantize_int4(w, G)
            ref = quant_matmul_ref(x, p4, s4, 4, K, G).float()
            ncp = lambda nbytes: max(2, min(32, math.ceil(2 * l2 / nbytes)))
            wc = [w] + [w.clone() for _ in range(ncp(w.numel() * 2) - 1)]
            c4 = [(p4, s4)] + [(p4.clone(), s4.clone()) for _ in range(ncp(p4.numel() + s4.numel() * 4) - 1)]
            lib = w4a16_matmul(x, p4, s4, G).float()
            row = {"bf16 cublas": timeit_calls([lambda c=c: F.linear(x, c) for c in wc]),
                   "int4 default": timeit_calls([lambda q=q, s=s: w4a16_matmul(x, q, s, G) for q, s in c4]),
                   "int4 default err": (lib - ref).abs().max().item() / ref.abs().max().item()}
            for bn, ng, vw, warps in grid:
                if bn * ng * 64 > 16384 or bn * ng * 64 < 1024 or ng * G > K or N % bn or (K // G) % ng:
                    continue
                key = f"bn{bn} ng{ng} vw{vw} w{warps}"
                try:
                    got = q4w(x, p4, s4, G, bn, ng, vw, warps).float()
                    err = (got - ref).abs().max().item() / ref.abs().max().item()
                    if err > 3e-2:
                        row[key] = f"WRONG {err:.2e}"; continue
                    row[key] = timeit_calls([lambda q=q, s=s: q4w(x, q, s, G, bn, ng, vw, warps) for q, s in c4])
                    row[key + " err"] = err
                except Exception as ex:
                    row[key] = f"ERR {type(ex).__name__}: {str(ex)[:120]}"
            res[f"{dt} {name}"] = row
            b = row["bf16 cublas"]
            best = sorted(((k, v) for k, v in row.items() if k.startswith("bn") and not k.endswith("err") and isinstance(v, float)), key=lambda kv: kv[1])
            print(f"{str(dt):15s} {name:8s} cublas {b:6.2f} | int4 default {row['int4 default']:6.2f} ({b/row['int4 default']:.2f}x) err {row['int4 default err']:.1e}", flush=True)
            for k, v in best[:6]:
                print(f"    {k:28s} {v:6.2f} ({b/v:.2f}x) err {row[k + ' err']:.1e}", flush=True)
            bad = [(k, v) for k, v in row.items() if isinstance(v, str)]
            if bad:
                print("    issues:", bad[:3], flush=True)
            del wc, c4; torch.cuda.empty_cache()
        if os.environ.get("BF16_ONLY") == "1":
            break
    json.dump(res, open(os.path.join(OUT, "s10_q4.json"), "w"), indent=1)
