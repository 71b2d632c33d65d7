"""Probe: a hand-written CUDA int4 GEMV (M = 1, bf16 x) for the library's packed format, built with
``torch.utils.cpp_extension.load_inline`` on the GPU machine (nvcc 13), against the library's Triton
GEMV and cuBLAS bf16 at the Llama-3-8B shapes.

Format (``quantize_int4``): ``packed[N, Kp/2]`` uint8, group-local half split (byte o of group g:
element g*G + o in the low nibble, g*G + G/2 + o in the high one), fp32 scales ``s[Kp/G, N]``.
Kernel: R weight rows per warp sharing every x load, x staged once per block in shared memory, every lane issues all
its 16-byte weight loads of a chunk before any math (explicit memory-level parallelism), nibbles
widened with the library's PTX (``prmt`` / ``lop3`` / packed subtract), bf16x2 FMAs within a
16-byte vector, fp32 across vectors with the group scale, one warp reduction per row at the end. (``RUN3=1`` / ``RUN4=1``: the third / fourth recorded runs'
launch shapes; the fourth adds x read through L1 instead of staged in shared memory.)

Run: ``PYTHONPATH=. python notes/issue4_s15_cuda_gemv_probe.py`` (GPU). JSON to ``$OUT``."""
import json
import os

import torch

from drafters.kernels.q4_gemv_cuda import _CUDA_HELPERS  # includes, the nibble widening, as_b2

CUDA_SRC = _CUDA_HELPERS + r"""
template <int G, int CHUNK, int R, bool SMEM>
__global__ void q4_gemv(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ s,
                        __nv_bfloat16* __restrict__ y, int N, int K, int KB, int rows_per_block) {
  // R rows per warp share every x load (the Triton GEMV's rows-per-thread reuse)
  extern __shared__ __align__(16) __nv_bfloat16 xs[];  // [Kp] (SMEM; else x is read through L1, K == Kp)
  const int Kp = KB * 2;
  for (int i = threadIdx.x * 8; SMEM && i < Kp; i += blockDim.x * 8) {
    uint4 v = make_uint4(0, 0, 0, 0);
    if (i + 8 <= K) v = *reinterpret_cast<const uint4*>(x + i);
    else for (int j = 0; j < 8; ++j) reinterpret_cast<__nv_bfloat16*>(&v)[j] = (i + j < K) ? x[i + j] : __float2bfloat16(0.f);
    *reinterpret_cast<uint4*>(xs + i) = v;
  }
  if (SMEM) __syncthreads();
  const __nv_bfloat16* xb = SMEM ? xs : x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int HG = G / 2;
  for (int r0 = warp * R; r0 < rows_per_block; r0 += (blockDim.x >> 5) * R) {
    const int n0 = blockIdx.x * rows_per_block + r0;
    if (n0 >= N) break;
    const int nvec = KB / 16;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (int v0 = 0; v0 < nvec; v0 += 32 * CHUNK) {
      uint4 p[CHUNK][R];
#pragma unroll
      for (int c = 0; c < CHUNK; ++c) {
        int v = v0 + c * 32 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          int n = min(n0 + r, N - 1);
          p[c][r] = v < nvec ? __ldcs(reinterpret_cast<const uint4*>(w + (size_t)n * KB) + v)
                             : make_uint4(0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u);
        }
      }
#pragma unroll
      for (int c = 0; c < CHUNK; ++c) {
        int v = v0 + c * 32 + lane;
        if (v >= nvec) break;
        int b = v * 16;
        int g = b / HG, o = b % HG;
        const uint4* xl = reinterpret_cast<const uint4*>(xb + g * G + o);
        const uint4* xh = reinterpret_cast<const uint4*>(xb + g * G + HG + o);
        uint4 xv[4];
        if (SMEM) { xv[0] = xl[0]; xv[1] = xl[1]; xv[2] = xh[0]; xv[3] = xh[1]; }
        else { xv[0] = __ldg(xl); xv[1] = __ldg(xl + 1); xv[2] = __ldg(xh); xv[3] = __ldg(xh + 1); }
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);  // [0..7] low-half x pairs, [8..15] high
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t* pw = reinterpret_cast<const uint32_t*>(&p[c][r]);
          __nv_bfloat162 a = __float2bfloat162_rn(0.f);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            uint32_t lo0, lo1, hi0, hi1;
            widen(pw[q], lo0, lo1, hi0, hi1);
            a = __hfma2(as_b2(lo0), as_b2(xw[2 * q]), a);
            a = __hfma2(as_b2(lo1), as_b2(xw[2 * q + 1]), a);
            a = __hfma2(as_b2(hi0), as_b2(xw[8 + 2 * q]), a);
            a = __hfma2(as_b2(hi1), as_b2(xw[8 + 2 * q + 1]), a);
          }
          float2 f = __bfloat1622float2(a);
          acc[r] = fmaf(f.x + f.y, __ldg(s + (size_t)g * N + min(n0 + r, N - 1)), acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float t = acc[r];
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) t += __shfl_xor_sync(0xffffffffu, t, m);
      if (lane == 0 && n0 + r < N) y[n0 + r] = __float2bfloat16(t);
    }
  }
}

template <int C, int RR, bool SM>
void launch(const __nv_bfloat16* xp, const uint8_t* wp, const float* sp, __nv_bfloat16* yp, int N, int K, int KB,
            int rows_per_block, int blocks, int threads, cudaStream_t stream) {
  auto kern = q4_gemv<128, C, RR, SM>;
  const int smem = SM ? KB * 2 * (int)sizeof(__nv_bfloat16) : 0;
  if (SM) cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  kern<<<blocks, threads, smem, stream>>>(xp, wp, sp, yp, N, K, KB, rows_per_block);
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t K, int64_t rows_per_block, int64_t threads,
                   int64_t chunk, int64_t R, int64_t smem) {
  const int N = w.size(0), KB = w.size(1);
  TORCH_CHECK(smem || K == KB * 2, "the L1 path needs K == Kp");
  auto y = torch::empty({1, N}, x.options());
  const int blocks = (N + rows_per_block - 1) / rows_per_block;
  auto stream = at::cuda::getCurrentCUDAStream();
  auto xp = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>());
  auto yp = reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>());
  auto wp = w.data_ptr<uint8_t>();
  auto sp = s.data_ptr<float>();
  const int key = (int)(R * 100 + chunk * 10 + (smem ? 1 : 0));
#define L(C, RR, SM) launch<C, RR, SM>(xp, wp, sp, yp, N, (int)K, KB, (int)rows_per_block, blocks, (int)threads, stream)
  switch (key) {
    case 121: L(2, 1, true); break;   case 141: L(4, 1, true); break;   case 181: L(8, 1, true); break;
    case 140: L(4, 1, false); break;  case 180: L(8, 1, false); break;
    case 211: L(1, 2, true); break;   case 221: L(2, 2, true); break;   case 241: L(4, 2, true); break;
    case 281: L(8, 2, true); break;
    case 210: L(1, 2, false); break;  case 220: L(2, 2, false); break;  case 240: L(4, 2, false); break;
    case 411: L(1, 4, true); break;   case 421: L(2, 4, true); break;
    case 410: L(1, 4, false); break;  case 420: L(2, 4, false); break;
    default: TORCH_CHECK(false, "no such launch");
  }
  return y;
}
"""
CPP_SRC = ("torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t K, int64_t rows_per_block, "
           "int64_t threads, int64_t chunk, int64_t R, int64_t smem);")


# (rows per block, threads per block, 16-byte loads per lane in flight per row, rows per warp); the
# recorded runs: R = 1 only (``..._r1.json``), then these (``..._r2.json``), then RUN3 / RUN4 (``..._r3/4.json``)
LAUNCHES = [(16, 512, 2, 1), (8, 256, 4, 1), (16, 256, 2, 2), (16, 256, 1, 2), (32, 512, 2, 2), (8, 128, 2, 2),
            (16, 128, 4, 2), (32, 256, 1, 4), (32, 256, 2, 4), (16, 128, 1, 4), (64, 512, 1, 4), (16, 256, 4, 2)]
RUN3 = [(16, 256, 4, 2), (16, 256, 8, 2), (16, 256, 1, 2), (32, 512, 4, 2), (8, 128, 4, 2), (8, 128, 8, 2),
        (4, 64, 4, 2), (4, 64, 8, 2), (4, 128, 4, 1), (4, 128, 8, 1), (8, 256, 8, 1), (32, 256, 2, 4), (16, 128, 2, 4)]
# run 4: x through L1 instead of shared memory (5th field 0), for the narrow / short layers
RUN4 = [(16, 256, 4, 2, 1), (32, 256, 2, 4, 1), (16, 256, 4, 2, 0), (8, 128, 4, 2, 0), (4, 64, 4, 2, 0),
        (4, 128, 4, 1, 0), (8, 256, 8, 1, 0), (32, 256, 2, 4, 0), (16, 128, 2, 4, 0), (8, 64, 2, 4, 0),
        (16, 256, 1, 2, 0), (8, 128, 2, 2, 0), (4, 64, 2, 2, 0), (2, 32, 4, 2, 0)]
if os.environ.get("RUN3"):
    LAUNCHES = RUN3
if os.environ.get("RUN4"):
    LAUNCHES = RUN4


def main() -> None:
    from torch.utils.cpp_extension import load_inline

    import benchmarks.bench_quant_kernels as bq
    from drafters.kernels.quant_matmul import quant_matmul

    torch.inference_mode().__enter__()
    mod = load_inline("q4gemv_probe", CPP_SRC, cuda_sources=CUDA_SRC, functions=["gemv"], verbose=False,
                      extra_cuda_cflags=["-O3", "-arch=sm_90a", "--use_fast_math"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, N, K in bq.SHAPES:
        ncopy = max(2, -(-(2 * 60 << 20) // (N * K // 2)))
        ws = [bq.make_weight(4, N, K, gen) for _ in range(ncopy)]
        wb = [w[2].to(torch.bfloat16) for w in ws]
        x = torch.randn(1, K, device="cuda", generator=gen).to(torch.bfloat16)
        ref = x.float() @ ws[0][2].T
        t_cublas = bq.bench([lambda w=w: x @ w.T for w in wb], 25, 100) * 1e3
        t_lib = bq.bench([lambda q=q, s=s: quant_matmul(x, q, s, 4, bq.GROUP) for q, s, _ in ws], 25, 100) * 1e3
        res = {}
        for launch in LAUNCHES:
            rpb, threads, chunk, R, sm = (*launch, 1)[:5]
            key = f"r{rpb}t{threads}c{chunk}R{R}" + ("" if sm else "L1")
            try:
                err = bq.rel_err(mod.gemv(x, ws[0][0], ws[0][1], K, rpb, threads, chunk, R, sm), ref)
                t = bq.bench([lambda q=q, s=s: mod.gemv(x, q, s, K, rpb, threads, chunk, R, sm) for q, s, _ in ws],
                             25, 100) * 1e3
            except Exception as e:
                print("fail", key, type(e).__name__, str(e)[:200], flush=True)
                continue
            res[key] = (t, err)
        best = min(((t, k) for k, (t, e) in res.items() if e < 2e-2), default=(float("nan"), None))
        rows.append(dict(layer=name, N=N, K=K, cublas_us=t_cublas, lib_us=t_lib, cuda=res, best=best))
        print(f"{name}: cuBLAS {t_cublas:.2f} us, library {t_lib:.2f} ({t_cublas / t_lib:.2f}x), CUDA best {best[1]} "
              f"{best[0]:.2f} ({t_cublas / best[0]:.2f}x); errs {sorted(set(round(e, 4) for t, e in res.values()))[:3]}",
              flush=True)
        with open(os.path.join(os.environ.get("OUT", "."), "s15_cuda_gemv.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
        del ws, wb
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
