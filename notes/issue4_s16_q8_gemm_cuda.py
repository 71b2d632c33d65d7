"""Probe kernel (sixteenth session, not used by the library): a hand-written CUDA W8A16 GEMM for
tree-width activations (17..64 bf16 rows) in the int8 format of :mod:`drafters.kernels.quant_matmul`
(``q[N, K]`` int8, ``s[N]`` fp32), built by ``notes/issue4_s16_q8_cuda_probe.py`` with ``load_inline``.

Why it was tried: the Triton tensor-descriptor kernel stayed at 0.92-0.98x cuBLAS bf16 on the
Llama-3-8B q/o and k/v layers at 64 rows; Nsight Compute showed it latency-bound (DRAM 25 %, L2 41 %,
SM 29 % of peak on q/o). Result (H200, ``notes/issue4_quantized.md``, sixteenth session): correct
everywhere, but 0.62x cuBLAS on q/o and 0.80x on down at 64 rows (legacy ``mma.sync`` at 2 warps per
scheduler leaves the tensor pipe 20-38 % busy); only at 32 rows did it beat the library on some layers.
Dropped. The design, like Marlin's (Frantar et al. 2024, https://arxiv.org/abs/2408.11743), for
the swapped product ``y.T = W @ x.T``:

* a block owns ``NB = 32 * NW`` weight rows (32 per warp: two ``m16`` tiles) against every activation
  row (``NT`` tiles of 8), so each x tile in shared memory serves ``NB`` weight rows;
* weights and activations stream through a ``STAGES``-deep ``cp.async`` ring of 128-wide K steps
  (no registers held for loads in flight);
* legacy ``mma.sync.m16n8k16`` with the weights as the A operand, read from shared memory as 16
  contiguous bytes per lane: the K order inside each 64-wide step is permuted identically for A and B
  (a dot product does not care), so no ``ldmatrix`` or shuffle is needed; int8 becomes bf16 exactly
  through the fp32 ``2^23 + u`` exponent trick (Kim et al. 2022, https://arxiv.org/abs/2211.10017);
* shared-memory rows are XOR-swizzled so every 16-byte read of a quarter-warp hits distinct banks;
* split-K over a thread-block **cluster** (Hopper): the ``S`` blocks of one weight tile each keep
  their fp32 partial tile in shared memory and reduce it through distributed shared memory, in rank
  order (deterministic), with no global workspace or second launch.

Requirements (checked by :func:`applies`): CUDA capability >= 9, 17..64 contiguous bf16 rows,
``K % 128 == 0``, ``N % 8 == 0``, contiguous 16-byte aligned operands, fp32 scales ``[N]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CUDA_SRC", "BINDING_SRC", "CPP_SRC", "build", "applies", "q8_gemm", "LAUNCHES"]

# (NW warps, NT token tiles of 8, STAGES): the compiled launch shapes
LAUNCHES = [(nw, nt, st) for nw in (2, 4, 8) for nt in (4, 8) for st in (3, 4)]

CUDA_SRC = r"""
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace q8g {
namespace cg = cooperative_groups;
constexpr int BK = 128;  // K elements (int8 bytes) per pipeline step

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int P>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(P)); }

// 4 int8 (one word) -> bf16 pairs (b0, b1), (b2, b3), exactly: u = b + 128 placed in the low byte of
// 2^23 as fp32, minus 2^23 + 128, then a packed round (exact: |b| <= 128)
__device__ __forceinline__ void i8_to_bf16x2(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t u = w ^ 0x80808080u, m = 0x4B000000u;
  uint32_t p0, p1, p2, p3;
  asm("prmt.b32 %0, %1, %2, 0x7540;" : "=r"(p0) : "r"(u), "r"(m));
  asm("prmt.b32 %0, %1, %2, 0x7541;" : "=r"(p1) : "r"(u), "r"(m));
  asm("prmt.b32 %0, %1, %2, 0x7542;" : "=r"(p2) : "r"(u), "r"(m));
  asm("prmt.b32 %0, %1, %2, 0x7543;" : "=r"(p3) : "r"(u), "r"(m));
  const float o = 8388736.f;  // 2^23 + 128
  const float f0 = __uint_as_float(p0) - o, f1 = __uint_as_float(p1) - o;
  const float f2 = __uint_as_float(p2) - o, f3 = __uint_as_float(p3) - o;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(f1), "f"(f0));
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(f3), "f"(f2));
}

__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// y[M, N] = (x[M, K] @ w[N, K].T) * s[N]. Grid (ceil(N / NB), S), clusters (1, S, 1): rank r of a
// cluster takes K steps [r * nk / S, (r + 1) * nk / S) of weight rows [blockIdx.x * NB, + NB).
template <int NW, int NT, int STAGES>
__global__ void __launch_bounds__(NW * 32, 1)
q8_gemm_kernel(const __nv_bfloat16* __restrict__ x, const int8_t* __restrict__ w, const float* __restrict__ s,
               __nv_bfloat16* __restrict__ y, int M, int N, int K) {
  constexpr int T = NW * 32;             // threads
  constexpr int NB = NW * 32;            // weight rows per block (32 per warp)
  constexpr int MT = NT * 8;             // activation rows, padded
  constexpr int W_BYTES = NB * BK;       // one stage of weights: [NB][128] int8, 16-byte chunks swizzled
  constexpr int X_BYTES = MT * BK * 2;   // one stage of x: [MT][128] bf16, 16-byte chunks swizzled
  constexpr int STAGE = W_BYTES + X_BYTES;
  constexpr int RP = NB + 4;             // fp32 pitch of the partial tile [MT][RP] (conflict-free writes)
  static_assert(MT * RP * 4 <= STAGES * STAGE, "partial tile must fit in the pipeline's shared memory");
  extern __shared__ __align__(128) uint8_t smem[];

  cg::cluster_group cluster = cg::this_cluster();
  const int S = (int)cluster.dim_blocks().y, rank = (int)cluster.block_rank();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int n_base = blockIdx.x * NB;
  const int nk = K / BK;
  const int c0 = (int)((long long)rank * nk / S), c1 = (int)((long long)(rank + 1) * nk / S), steps = c1 - c0;

  // 1. the cp.async producer: step c into ring slot st (rows past N or M are zero-filled)
  auto load_step = [&](int c, int st) {
    uint8_t* sw = smem + st * STAGE;
    uint8_t* sx = sw + W_BYTES;
    const int k0 = c * BK;
#pragma unroll
    for (int i = 0; i < NB * 8 / T; ++i) {  // weights: NB rows x 8 chunks; chunk ^ 4 on odd rows
      const int id = i * T + tid, r = id >> 3, ch = id & 7, n = n_base + r;
      cp_async16(smem_u32(sw + r * BK + ((ch ^ ((r & 1) << 2)) << 4)), w + (size_t)min(n, N - 1) * K + k0 + ch * 16,
                 n < N ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < (MT * 16 + T - 1) / T; ++i) {  // x: MT rows x 16 chunks; chunk ^ 1 on odd rows
      const int id = i * T + tid, r = id >> 4, ch = id & 15;
      if (MT * 16 % T == 0 || id < MT * 16)
        cp_async16(smem_u32(sx + r * (BK * 2) + ((ch ^ (r & 1)) << 4)), x + (size_t)min(r, M - 1) * K + k0 + ch * 8,
                   r < M ? 16 : 0);
    }
  };

  // 2. prologue: STAGES - 1 steps in flight
  float acc[2][NT][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < NT; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (st < steps) load_step(c0 + st, st);
    cp_commit();
  }

  // 3. main loop: wait for step i, refill the slot freed by step i - 1, then 2 x 64-wide halves of MMAs
  for (int i = 0; i < steps; ++i) {
    cp_wait<STAGES - 2>();
    __syncthreads();
    if (i + STAGES - 1 < steps) load_step(c0 + i + STAGES - 1, (i + STAGES - 1) % STAGES);
    cp_commit();
    const uint8_t* sw = smem + (i % STAGES) * STAGE;
    const uint8_t* sx = sw + W_BYTES;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // lane (g, t) holds bytes [16t, 16t + 16) of the half for rows g, g + 8 of each m16 tile; K step j of
      // the MMA sees bytes 4j .. 4j + 3 as its k = (2t, 2t + 1 | 2t + 8, 2t + 9): the same permutation is
      // applied to x below, so the dot products are unchanged
      uint4 araw[2][2];  // [m16 tile][rows g | g + 8]: 16 int8 each
#pragma unroll
      for (int rt = 0; rt < 2; ++rt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = warp * 32 + rt * 16 + g + 8 * hh;
          araw[rt][hh] = *reinterpret_cast<const uint4*>(sw + r * BK + (((4 * h + t) ^ ((r & 1) << 2)) << 4));
        }
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {  // x elements [16t + 8jj, + 8) of every activation row tile
        uint4 b[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int r = nt * 8 + g;  // activation row = MMA column g
          b[nt] = *reinterpret_cast<const uint4*>(sx + r * (BK * 2) + (((8 * h + 2 * t + jj) ^ (r & 1)) << 4));
        }
#pragma unroll
        for (int j2 = 0; j2 < 2; ++j2) {  // MMA K step j = 2jj + j2: 2 * NT independent accumulators back to back
          const int j = 2 * jj + j2;
          uint32_t a[2][4];
#pragma unroll
          for (int rt = 0; rt < 2; ++rt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
              const uint32_t wj = j == 0 ? araw[rt][hh].x : j == 1 ? araw[rt][hh].y : j == 2 ? araw[rt][hh].z : araw[rt][hh].w;
              i8_to_bf16x2(wj, a[rt][hh], a[rt][2 + hh]);
            }
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint32_t b0 = j2 == 0 ? b[nt].x : b[nt].z, b1 = j2 == 0 ? b[nt].y : b[nt].w;
#pragma unroll
            for (int rt = 0; rt < 2; ++rt) mma(acc[rt][nt], a[rt], b0, b1);
          }
        }
      }
    }
  }

  // 4. partial tile -> own shared memory as [MT][RP] fp32 (the ring is free once every copy landed)
  cp_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int rt = 0; rt < 2; ++rt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = warp * 32 + rt * 16 + g, m = nt * 8 + 2 * t;
      red[m * RP + n] = acc[rt][nt][0];
      red[(m + 1) * RP + n] = acc[rt][nt][1];
      red[m * RP + n + 8] = acc[rt][nt][2];
      red[(m + 1) * RP + n + 8] = acc[rt][nt][3];
    }
  cluster.sync();  // every rank's partial is visible to the cluster

  // 5. rank r sums activation rows [r * per, (r + 1) * per) over the cluster in rank order, scales, stores
  const int per = (M + S - 1) / S, m0 = rank * per, m1 = min(M, m0 + per);
  for (int e = tid; e < (m1 - m0) * (NB / 4); e += T) {
    const int m = m0 + e / (NB / 4), n4 = (e % (NB / 4)) * 4, n = n_base + n4;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int q = 0; q < S; ++q) {
      const float4 v = *reinterpret_cast<const float4*>(cluster.map_shared_rank(red, q) + m * RP + n4);
      sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
    }
    if (n < N) {  // N % 8 == 0: whole groups of 4 are in or out
      const float4 sc = *reinterpret_cast<const float4*>(s + n);
      __nv_bfloat162 lo = __floats2bfloat162_rn(sum.x * sc.x, sum.y * sc.y);
      __nv_bfloat162 hi = __floats2bfloat162_rn(sum.z * sc.z, sum.w * sc.w);
      uint2 o;
      o.x = *reinterpret_cast<uint32_t*>(&lo);
      o.y = *reinterpret_cast<uint32_t*>(&hi);
      *reinterpret_cast<uint2*>(y + (size_t)m * N + n) = o;
    }
  }
  cluster.sync();  // keep this block's shared memory alive until every rank has read it
}

template <int NW, int NT, int STAGES>
cudaError_t launch(const __nv_bfloat16* x, const int8_t* w, const float* s, __nv_bfloat16* y, int M, int N, int K,
                   int split, cudaStream_t stream) {
  constexpr int smem = STAGES * (NW * 32 * BK + NT * 8 * BK * 2);
  auto kern = q8_gemm_kernel<NW, NT, STAGES>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((N + NW * 32 - 1) / (NW * 32), split, 1);
  cfg.blockDim = dim3(NW * 32, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = split;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kern, x, w, s, y, M, N, K);
}
}  // namespace q8g

// the compiled (NW, NT, STAGES): keep in step with LAUNCHES in q8_gemm_cuda.py
cudaError_t q8_gemm_launch(const void* x, const void* w, const float* s, void* y, int M, int N, int K, int nw,
                           int nt, int stages, int split, cudaStream_t stream) {
  auto xp = reinterpret_cast<const __nv_bfloat16*>(x);
  auto wp = reinterpret_cast<const int8_t*>(w);
  auto yp = reinterpret_cast<__nv_bfloat16*>(y);
#define Q8G_CASE(NW_, NT_, ST_) \
  if (nw == NW_ && nt == NT_ && stages == ST_) return q8g::launch<NW_, NT_, ST_>(xp, wp, s, yp, M, N, K, split, stream);
  Q8G_CASE(2, 4, 3) Q8G_CASE(2, 4, 4) Q8G_CASE(2, 8, 3) Q8G_CASE(2, 8, 4)
  Q8G_CASE(4, 4, 3) Q8G_CASE(4, 4, 4) Q8G_CASE(4, 8, 3) Q8G_CASE(4, 8, 4)
  Q8G_CASE(8, 4, 3) Q8G_CASE(8, 4, 4) Q8G_CASE(8, 8, 3) Q8G_CASE(8, 8, 4)
#undef Q8G_CASE
  return cudaErrorInvalidValue;
}
"""

# the torch binding (compiled with the extension; kept apart so the kernel builds without torch headers)
BINDING_SRC = r"""
torch::Tensor q8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t nw, int64_t nt, int64_t stages,
                      int64_t split) {
  const int M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  cudaError_t e = q8_gemm_launch(x.data_ptr(), w.data_ptr(), s.data_ptr<float>(), y.data_ptr(), M, N, K, (int)nw,
                                 (int)nt, (int)stages, (int)split, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(e == cudaSuccess, "q8_gemm launch failed: ", cudaGetErrorString(e));
  return y;
}
"""
CPP_SRC = ("torch::Tensor q8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t nw, int64_t nt, "
           "int64_t stages, int64_t split);")


def build():
    """Compile the kernel and its binding with ``load_inline`` for this GPU (about a minute); returns the module."""
    from torch.utils.cpp_extension import load_inline

    major, minor = torch.cuda.get_device_capability()
    head = "#include <torch/extension.h>\n#include <ATen/cuda/CUDAContext.h>\n"
    return load_inline("specdec_q8_probe", CPP_SRC, cuda_sources=head + CUDA_SRC + BINDING_SRC, functions=["q8_gemm"],
                       extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])


def applies(x: Tensor, q: Tensor, scales: Tensor) -> bool:
    """Operands this kernel takes: 17..64 contiguous bf16 rows on a CUDA device of capability >= 9,
    ``K % 128 == 0``, ``N % 8 == 0``, contiguous 16-byte aligned int8 weights, fp32 scales ``[N]``."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and 16 < x.shape[0] <= 64):
        return False
    N, K = q.shape
    return (torch.cuda.get_device_capability(x.device)[0] >= 9 and q.dtype == torch.int8 and K == x.shape[1]
            and K % 128 == 0 and N % 8 == 0 and x.is_contiguous() and q.is_contiguous()
            and scales.dtype == torch.float32 and scales.is_contiguous() and scales.shape == (N,)
            and x.data_ptr() % 16 == 0 and q.data_ptr() % 16 == 0 and scales.data_ptr() % 16 == 0)


def q8_gemm(module, x: Tensor, q: Tensor, scales: Tensor, warps: int, tiles: int, stages: int, split: int) -> Tensor:
    """``y[M, N] = (x @ q.T) * scales`` (bf16) through the built extension ``module``; the operands passed
    :func:`applies`. ``warps`` x 32 weight rows per block, ``tiles`` x 8 >= M activation rows, ``split``
    K ranks per cluster (1..8, at most K / 128)."""
    return module.q8_gemm(x, q, scales, warps, tiles, stages, split)
