"""A hand-written CUDA W4A16 GEMV (one row of bf16 activations) for the int4 format of
:mod:`drafters.kernels.quant_matmul`, built on first use with ``torch.utils.cpp_extension.load_inline``
where nvcc is installed; without it (or on any build error) :func:`available` is False and
``quant_matmul`` keeps the Triton GEMV.

Why CUDA: five sessions of Triton variants stopped at 2.24-2.42x cuBLAS bf16 on the Llama-3-8B
gate/up and down layers; this kernel reaches 2.56-2.73x there on an H200 (fifteenth session,
``notes/issue4_quantized.md``), by controlling what Triton does not expose:

* each warp owns ``R = 2`` weight rows, and every lane issues all its 16-byte weight loads of a
  chunk (``__ldcs``: streaming, evict-first) before any math -- explicit memory-level parallelism;
* the activations are read straight from global memory through L1 (``__ldg``, shared by every warp of
  the SM) in the weights' own order, so nothing is staged or converted through shared memory;
* nibbles become exact bf16 integers with the PTX of ``_int4_to_16bit_ptx`` (byte permutes,
  ``lop3``, packed subtracts; Kim et al. 2022, https://arxiv.org/abs/2211.10017), multiplied with
  packed bf16 FMAs within a 16-byte vector (32 products: the "16-bit products" of
  ``QuantConfig(half=True)``), summed in fp32 across vectors with the group scale;
* one warp reduction per row at the end.

Requirements (checked by :func:`applies`): CUDA, one row of bf16 activations, ``K`` a multiple of the
group (64 or 128), contiguous 16-byte aligned operands, fp32 scales.
"""

from __future__ import annotations

import os
import sys
import threading

import torch
from torch import Tensor

__all__ = ["available", "applies", "q4_gemv"]

_CUDA_HELPERS = r"""
#include <torch/extension.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <ATen/cuda/CUDAContext.h>

// 4 packed bytes -> low nibbles of bytes (0,1), (2,3) and high nibbles of the same, as bf16 pairs n - 8
__device__ __forceinline__ void widen(uint32_t w, uint32_t& lo0, uint32_t& lo1, uint32_t& hi0, uint32_t& hi1) {
  uint32_t t0, t1;
  asm("prmt.b32 %0, %1, 0, 0x4140;" : "=r"(t0) : "r"(w));
  asm("prmt.b32 %0, %1, 0, 0x4342;" : "=r"(t1) : "r"(w));
  const uint32_t k = 0x43084308u;  // bf16 136 | 136 (the magic 128 plus the nibble offset 8)
  asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(lo0) : "r"(t0));
  asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(lo1) : "r"(t1));
  t0 >>= 4; t1 >>= 4;
  asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(hi0) : "r"(t0));
  asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(hi1) : "r"(t1));
  asm("sub.rn.bf16x2 %0, %0, %1;" : "+r"(lo0) : "r"(k));
  asm("sub.rn.bf16x2 %0, %0, %1;" : "+r"(lo1) : "r"(k));
  asm("sub.rn.bf16x2 %0, %0, %1;" : "+r"(hi0) : "r"(k));
  asm("sub.rn.bf16x2 %0, %0, %1;" : "+r"(hi1) : "r"(k));
}

__device__ __forceinline__ __nv_bfloat162 as_b2(uint32_t v) { return *reinterpret_cast<__nv_bfloat162*>(&v); }
"""  # (the helpers above are shared with notes/issue4_s15_cuda_gemv_probe.py)
_CUDA_SRC = _CUDA_HELPERS + r"""

// y[n] = sum_k x[k] * (nibble(n, k) - 8) * s[k / G, n]; R rows per warp, CHUNK 16-byte loads per lane and row in flight
template <int G, int CHUNK, int R>
__global__ void q4_gemv_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                               const float* __restrict__ s, __nv_bfloat16* __restrict__ y, int N, int KB,
                               int rows_per_block) {
  constexpr int HG = G / 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nvec = KB / 16;  // 16-byte vectors per weight row
  for (int r0 = warp * R; r0 < rows_per_block; r0 += (blockDim.x >> 5) * R) {
    const int n0 = blockIdx.x * rows_per_block + r0;
    if (n0 >= N) break;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    for (int v0 = 0; v0 < nvec; v0 += 32 * CHUNK) {
      uint4 p[CHUNK][R];  // 1. every weight load of the chunk in flight first
#pragma unroll
      for (int c = 0; c < CHUNK; ++c) {
        const int v = v0 + c * 32 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int n = min(n0 + r, N - 1);
          p[c][r] = v < nvec ? __ldcs(reinterpret_cast<const uint4*>(w + (size_t)n * KB) + v)
                             : make_uint4(0x88888888u, 0x88888888u, 0x88888888u, 0x88888888u);
        }
      }
#pragma unroll
      for (int c = 0; c < CHUNK; ++c) {  // 2. widen, multiply with x (through L1), scale per group
        const int v = v0 + c * 32 + lane;
        if (v >= nvec) break;
        const int b = v * 16, g = b / HG, o = b % HG;  // byte in the row, its group, byte in the group's half
        const uint4* xl = reinterpret_cast<const uint4*>(x + g * G + o);       // x of the 16 low nibbles
        const uint4* xh = reinterpret_cast<const uint4*>(x + g * G + HG + o);  // x of the 16 high nibbles
        uint4 xv[4] = {__ldg(xl), __ldg(xl + 1), __ldg(xh), __ldg(xh + 1)};
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);  // [0..7] low-half pairs, [8..15] high
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
          const float2 f = __bfloat1622float2(a);
          acc[r] = fmaf(f.x + f.y, __ldg(s + (size_t)g * N + min(n0 + r, N - 1)), acc[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {  // 3. one warp reduction per row
      float t = acc[r];
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) t += __shfl_xor_sync(0xffffffffu, t, m);
      if (lane == 0 && n0 + r < N) y[n0 + r] = __float2bfloat16(t);
    }
  }
}

template <int G, int C>
void launch(const __nv_bfloat16* x, const uint8_t* w, const float* s, __nv_bfloat16* y, int N, int KB, int rpb,
            int threads, cudaStream_t stream) {
  q4_gemv_kernel<G, C, 2><<<(N + rpb - 1) / rpb, threads, 0, stream>>>(x, w, s, y, N, KB, rpb);
}

torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t G, int64_t rows_per_block,
                      int64_t threads, int64_t chunk) {
  const int N = w.size(0), KB = w.size(1);
  auto y = torch::empty({1, N}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  auto xp = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>());
  auto yp = reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>());
  auto wp = w.data_ptr<uint8_t>();
  auto sp = s.data_ptr<float>();
  const int rpb = (int)rows_per_block, th = (int)threads;
  if (G == 128 && chunk == 2) launch<128, 2>(xp, wp, sp, yp, N, KB, rpb, th, stream);
  else if (G == 128) launch<128, 4>(xp, wp, sp, yp, N, KB, rpb, th, stream);
  else if (chunk == 2) launch<64, 2>(xp, wp, sp, yp, N, KB, rpb, th, stream);
  else launch<64, 4>(xp, wp, sp, yp, N, KB, rpb, th, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}
"""
_CPP_SRC = ("torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t G, "
            "int64_t rows_per_block, int64_t threads, int64_t chunk);")

_MODULE = None
_STATE: dict[str, object] = {}  # "ok": bool once tried, "error": the build error
_LOCK = threading.Lock()


def available() -> bool:
    """Whether the extension is built (building it on the first call, about a minute): CUDA present,
    nvcc found, not disabled with ``SPECDEC_CUDA_EXT=0``. A failed build is reported once on stderr
    and not retried; callers fall back to the Triton kernels. Inside a CUDA-graph capture it only
    answers False (nothing is built there) until an eager call has built it."""
    global _MODULE
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False  # never build inside a CUDA-graph capture; the next eager call will
    with _LOCK:
        if "ok" in _STATE:
            return bool(_STATE["ok"])
        ok = False
        if os.environ.get("SPECDEC_CUDA_EXT", "1") != "0" and torch.cuda.is_available():
            try:
                from torch.utils.cpp_extension import CUDA_HOME, load_inline

                if CUDA_HOME is None:
                    raise RuntimeError("nvcc not found (CUDA_HOME unset)")
                print("specdec: building the CUDA int4 GEMV extension (once per machine, about a minute)...",
                      file=sys.stderr, flush=True)
                major, minor = torch.cuda.get_device_capability()
                _MODULE = load_inline("specdec_q4_gemv", _CPP_SRC, cuda_sources=_CUDA_SRC, functions=["q4_gemv"],
                                      extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
                                      verbose=False)
                ok = True
            except Exception as e:  # no compiler, a header mismatch, ...: keep the Triton path
                _STATE["error"] = f"{type(e).__name__}: {e}"
                print(f"specdec: CUDA int4 GEMV unavailable, using the Triton kernels ({_STATE['error'][:300]})",
                      file=sys.stderr, flush=True)
        _STATE["ok"] = ok
        return ok


def applies(x: Tensor, packed: Tensor, scales: Tensor, K: int, group_size: int) -> bool:
    """Operands this kernel takes: one row of bf16 activations on CUDA, K a whole number of groups of
    64 or 128, contiguous 16-byte aligned x and weight rows, fp32 scales ``[K/G, N]``."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous()
            and group_size in (64, 128) and K % group_size == 0 and packed.shape[1] * 2 == K
            and packed.is_contiguous() and scales.is_contiguous() and scales.dtype == torch.float32
            and x.data_ptr() % 16 == 0 and packed.data_ptr() % 16 == 0 and packed.shape[1] % 16 == 0)


def q4_gemv(x: Tensor, packed: Tensor, scales: Tensor, group_size: int, rows_per_block: int = 4,
            threads: int = 64, chunk: int = 2) -> Tensor:
    """``y[1, N] = x[1, K] @ dequant(packed, scales).T`` (bf16 out); call :func:`available` and
    :func:`applies` first. ``rows_per_block`` a multiple of 2 per warp of ``threads``; ``chunk`` 2 or 4
    weight vectors per lane and row in flight."""
    return _MODULE.q4_gemv(x, packed, scales, group_size, rows_per_block, threads, chunk)
