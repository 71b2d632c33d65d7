"""Weight-only quantization (int8 per output channel, int4 group-wise) and W8A16 / W4A16 matmuls.

``y[M, N] = x[M, K] @ dequant(W)[N, K].T`` with ``x`` in fp16 / bf16 / fp32 and ``W`` stored as
integers plus float scales. Two Triton kernels cover the two regimes a drafter sees:

* **GEMV** (M = 1, plain decoding / chain drafts): purely memory-bound, so the only goal is to
  read every weight byte once at full bandwidth. Many programs tile N, optionally split K
  (fp32 partial sums combined with atomics), the int weights are widened in registers and reduced
  with the activations in fp32 -- the weights are never written back dequantized.
* **GEMM** (M = tree width, 16 / 64): tensor-core ``tl.dot`` on tiles whose weight operand is
  dequantized in registers right after the load (the W4A16 recipe of GPTQ's and AWQ's CUDA
  kernels and of Marlin, https://arxiv.org/abs/2408.11743: keep weights compressed in memory,
  expand them only on chip, apply the group scale to the partial product of a group).

Formats (symmetric, no zero point stored -- a choice: it keeps the error bound simple and the
kernels short; GPTQ https://arxiv.org/abs/2210.17323 and AWQ https://arxiv.org/abs/2306.00978 use
asymmetric groups with zero points, which buy a little accuracy for one more subtraction):

* int8: ``q[N, K]`` int8 in [-127, 127], ``s[N]`` fp32 = ``max_k |w[n, k]| / 127`` -- the
  per-output-channel ("vector-wise") absmax scaling of LLM.int8() (Dettmers et al., 2022,
  https://arxiv.org/abs/2208.07339) applied to weights only, without its outlier decomposition.
  The scale factors out of the K sum: ``y = (x @ q.T) * s``.
* int4: groups of ``group_size`` consecutive K elements share ``s[g, n]`` fp32 =
  ``max |w[n, g*G:(g+1)*G]| / 7``; ``q = round(w / s)`` in [-7, 7] is stored as the nibble
  ``q + 8``; two nibbles per byte, element ``2j`` in the low nibble and ``2j+1`` in the high one:
  ``packed[N, Kp/2]`` uint8. K is zero-padded to ``Kp = ceil(K / G) * G`` (ragged K works).
  Scales are stored ``[Kp/G, N]`` so a tile's scales are one contiguous load along N.

Error bound of both (round to nearest, no clipping since the absmax maps inside the range):
``|w - dequant(q)| <= s / 2`` elementwise, with ``s`` the element's channel / group scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

try:  # Triton is a dependency, but keep the CPU path importable without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without Triton
    triton = None
    tl = None
    _HAS_TRITON = False

__all__ = [
    "QuantConfig",
    "quantize_int8",
    "quantize_int4",
    "dequantize_int8",
    "dequantize_int4",
    "quant_matmul",
    "quant_matmul_ref",
    "w8a16_matmul",
    "w4a16_matmul",
    "triton_available",
    "default_config",
    "check_quant_args",
]

INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8  # stored nibble = q + 8


def triton_available() -> bool:
    return _HAS_TRITON


def check_quant_args(bits: int, group_size: int | None) -> None:
    """One clear error for unsupported quantization settings."""
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 4:
        if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
            raise ValueError(f"int4 group_size must be a power of two >= 16 (e.g. 64, 128), got {group_size!r}")


# --------------------------------------------------------------------------- quantize / dequantize
@torch.no_grad()
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w[N, K]`` float -> ``(q[N, K] int8, s[N] fp32)`` symmetric per output channel."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)  # [N]
    s = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))  # all-zero rows: any scale, q = 0
    q = torch.round(wf / s[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), s.contiguous()


@torch.no_grad()
def quantize_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """``w[N, K]`` float -> ``(packed[N, Kp/2] uint8, s[Kp/G, N] fp32)``, symmetric group-wise.

    ``Kp = ceil(K / group_size) * group_size``; the padding is zeros (stored nibble 8).
    """
    check_quant_args(4, group_size)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    N, K = w.shape
    G = group_size
    ng = -(-K // G)
    wf = torch.zeros(N, ng * G, dtype=torch.float32, device=w.device)
    wf[:, :K] = w.detach().float()
    wg = wf.view(N, ng, G)  # [N, ng, G]
    amax = wg.abs().amax(dim=2)  # [N, ng]
    s = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))
    q = torch.round(wg / s[:, :, None]).clamp_(-INT4_MAX, INT4_MAX).to(torch.int16) + INT4_OFFSET  # [N, ng, G] in [1, 15]
    q = q.view(N, ng * G)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)  # [N, Kp/2]
    return packed.contiguous(), s.t().contiguous()  # s: [ng, N]


def dequantize_int8(q: Tensor, s: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q[N, K], s[N]) -> w[N, K]`` in ``dtype`` (computed in fp32)."""
    return (q.float() * s.float()[:, None]).to(dtype)


def unpack_int4(packed: Tensor) -> Tensor:
    """``packed[N, Kp/2]`` uint8 -> ``q[N, Kp]`` int8 in [-8, 7] (nibble - 8)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    return torch.stack([lo, hi], dim=2).view(packed.shape[0], -1).to(torch.int8) - INT4_OFFSET


def dequantize_int4(packed: Tensor, s: Tensor, K: int, group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(packed[N, Kp/2], s[Kp/G, N]) -> w[N, K]`` in ``dtype`` (computed in fp32)."""
    q = unpack_int4(packed).float()  # [N, Kp]
    N, Kp = q.shape
    w = q.view(N, Kp // group_size, group_size) * s.float().t()[:, :, None]
    return w.view(N, Kp)[:, :K].to(dtype)


def quant_matmul_ref(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, K: int, group_size: int | None = None) -> Tensor:
    """PyTorch reference: dequantize (fp32) then matmul in fp32; ``x[M, K] -> y[M, N]`` in x's dtype."""
    if bits == 8:
        w = dequantize_int8(qweight, scales)
    else:
        w = dequantize_int4(qweight, scales, K, group_size)
    return (x.float() @ w.t()).to(x.dtype)


# --------------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class QuantConfig:
    """Tile configuration of one launch.

    ``gemv=True`` uses the M-row-at-a-time reduction kernel (one program per (N tile, K split,
    row)); otherwise the tensor-core kernel with ``block_m`` rows. ``split_k > 1`` reduces partial
    sums with fp32 atomics into a zeroed buffer (more programs for small N, at the price of a memset
    and a cast).
    """

    gemv: bool
    block_n: int
    block_k: int
    block_m: int = 16
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    magic: bool = True  # int -> float through the exponent-bits trick (False: plain conversions)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _pow2_floor(v: int) -> int:
    return 1 << max(0, int(v).bit_length() - 1)


def default_config(M: int, N: int, K: int, bits: int, group_size: int | None = None,
                   device: torch.device | None = None) -> QuantConfig:
    """Heuristic tiles (tuned with ``benchmarks/bench_quant_kernels.py`` on an H100)."""
    sms = _sm_count(device if device is not None else torch.device("cpu"))
    G = group_size if bits == 4 else 1 << 30
    if M <= 2:
        # memory-bound: ~4 KB of weight bytes per program per iteration, >= 2 programs per SM
        bk = 128 if bits == 8 else min(128, G)
        bn = 32 if bits == 8 else 64
        progs = -(-N // bn)
        split = 1
        while progs * split < 2 * sms and K // (split * 2) >= 4 * bk and split < 16:
            split *= 2
        return QuantConfig(gemv=True, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=3)
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bk = 128 if bits == 8 else min(128, G)
    bn = 64
    progs = -(-M // bm) * -(-N // bn)
    split = 1
    while progs * split < sms and K // (split * 2) >= 4 * bk and split < 8:
        split *= 2
    return QuantConfig(gemv=False, block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=4)


# --------------------------------------------------------------------------- Triton kernels
if _HAS_TRITON:

    @triton.jit
    def _int4_pair(p, MAGIC: tl.constexpr):
        """Packed bytes (uint8) -> (low, high) nibble values - 8 as fp32.

        MAGIC: build the float from its bits, ``0x4B000000 | n`` is ``2**23 + n``, so one logic op
        and one add replace an int->float conversion (a quarter-rate instruction on Hopper); the
        fp16 form of this trick is the one in FasterTransformer's and Marlin's dequantizers.
        """
        if MAGIC:
            w = p.to(tl.int32)
            lo = ((w & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2**23 + 8
            hi = ((w >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        else:
            lo = (p & 0xF).to(tl.float32) - 8.0
            hi = (p >> 4).to(tl.float32) - 8.0
        return lo, hi

    @triton.jit
    def _int8_value(q, MAGIC: tl.constexpr):
        """int8 -> fp32 (``2**23 + 128 + q`` from its bits, minus ``2**23 + 128``)."""
        if MAGIC:
            return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            return q.to(tl.float32)

    @triton.jit
    def _qgemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr,  # x[M, K], w[N, K] int8 | [N, Kp/2] uint8, s[N] | [Kp/G, N], y[M, N]
        N, K, KP, k_per_split,  # KP: padded K (int4) or K (int8); k_per_split: multiple of BLOCK_K
        stride_xm, stride_wn, stride_ym,
        BITS: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, MAGIC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_n = offs_n < N
        # 2-D fp32 accumulator: the cross-thread reduction happens once, after the K loop
        if BITS == 8:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
        x_row = x_ptr + m * stride_xm
        k_lo = pid_k * k_per_split
        for i in range(0, k_per_split, BLOCK_K):
            k0 = k_lo + i
            if BITS == 8:
                offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
                mk = offs_k < K
                x = tl.load(x_row + offs_k, mask=mk, other=0.0).to(tl.float32)
                w = _int8_value(tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                                        mask=mask_n[:, None] & mk[None, :], other=0), MAGIC)  # [BN, BK] fp32
                acc2 += w * x[None, :]
            else:
                offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2] byte columns
                mb = offs_b < KP // 2
                p = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :],
                            mask=mask_n[:, None] & mb[None, :], other=0x88)  # [BN, BK/2]
                lo, hi = _int4_pair(p, MAGIC)
                xe = tl.load(x_row + 2 * offs_b, mask=2 * offs_b < K, other=0.0).to(tl.float32)
                xo = tl.load(x_row + 2 * offs_b + 1, mask=2 * offs_b + 1 < K, other=0.0).to(tl.float32)
                prod = lo * xe[None, :] + hi * xo[None, :]  # [BN, BK/2]
                if BLOCK_K <= GROUP:  # the tile lies in one group: one scale per row
                    s = tl.load(s_ptr + tl.minimum(k0 // GROUP, KP // GROUP - 1) * N + offs_n, mask=mask_n, other=0.0)
                    acc2 += prod * s[:, None]
                else:  # several groups per tile: scale elementwise
                    g = (2 * offs_b) // GROUP
                    s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=mask_n[:, None] & mb[None, :], other=0.0)
                    acc2 += prod * s
        acc = tl.sum(acc2, axis=1)  # [BN]
        if BITS == 8:
            acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if ATOMIC:
            tl.atomic_add(y_ptr + m * stride_ym + offs_n, acc, mask=mask_n)
        else:
            tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _qgemm_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr,
        M, N, K, KP, k_per_split,
        stride_xm, stride_wn, stride_ym,
        BITS: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ATOMIC: tl.constexpr, FP32: tl.constexpr, MAGIC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        k_lo = pid_k * k_per_split
        for i in range(0, k_per_split, BLOCK_K):
            k0 = k_lo + i
            if BITS == 8:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mk = offs_k < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & mk[None, :], other=0.0)  # [BM, BK]
                w = _int8_value(tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                                        mask=mk[:, None] & mask_n[None, :], other=0), MAGIC).to(x.dtype)  # [BK, BN], exact
                if FP32:
                    acc += tl.dot(x, w, input_precision="ieee")
                else:
                    acc += tl.dot(x, w)
            else:
                offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2]
                mb = offs_b < KP // 2
                xm = x_ptr + offs_m[:, None] * stride_xm + 2 * offs_b[None, :]
                xe = tl.load(xm, mask=mask_m[:, None] & (2 * offs_b[None, :] < K), other=0.0)  # [BM, BK/2]
                xo = tl.load(xm + 1, mask=mask_m[:, None] & (2 * offs_b[None, :] + 1 < K), other=0.0)
                p = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_b[:, None],
                            mask=mb[:, None] & mask_n[None, :], other=0x88)  # [BK/2, BN]
                lo, hi = _int4_pair(p, MAGIC)
                if BLOCK_K <= GROUP:  # integers are exact in the activation dtype; scale the product
                    lo = lo.to(xe.dtype)
                    hi = hi.to(xe.dtype)
                    if FP32:
                        part = tl.dot(xe, lo, input_precision="ieee") + tl.dot(xo, hi, input_precision="ieee")
                    else:
                        part = tl.dot(xe, lo) + tl.dot(xo, hi)
                    s = tl.load(s_ptr + tl.minimum(k0 // GROUP, KP // GROUP - 1) * N + offs_n, mask=mask_n, other=0.0)
                    acc += part * s[None, :]
                else:  # dequantize the tile elementwise, then one product
                    g = (2 * offs_b) // GROUP
                    s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mb[:, None] & mask_n[None, :], other=0.0)
                    lo = (lo * s).to(xe.dtype)
                    hi = (hi * s).to(xe.dtype)
                    if FP32:
                        acc += tl.dot(xe, lo, input_precision="ieee") + tl.dot(xo, hi, input_precision="ieee")
                    else:
                        acc += tl.dot(xe, lo) + tl.dot(xo, hi)
        if BITS == 8:
            acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        y_offs = offs_m[:, None] * stride_ym + offs_n[None, :]
        ymask = mask_m[:, None] & mask_n[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptr + y_offs, acc, mask=ymask)
        else:
            tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _launch(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, K: int, group_size: int,
            config: QuantConfig | None) -> Tensor:
    if not _HAS_TRITON:
        raise RuntimeError("Triton is not installed; use quant_matmul_ref")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [M, {K}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    x = x if x.stride(1) == 1 else x.contiguous()
    M = x.shape[0]
    N = qweight.shape[0]
    KP = qweight.shape[1] * 2 if bits == 4 else K
    G = group_size if bits == 4 else 1 << 30
    cfg = config or default_config(M, N, K, bits, group_size, x.device)
    split = max(1, cfg.split_k)
    k_per_split = triton.cdiv(triton.cdiv(KP, split), cfg.block_k) * cfg.block_k  # multiple of BLOCK_K
    split = triton.cdiv(KP, k_per_split)
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)(M, N, device=x.device, dtype=torch.float32 if atomic else x.dtype)
    if M > 0:
        if cfg.gemv:
            grid = (triton.cdiv(N, cfg.block_n), split, M)
            _qgemv_kernel[grid](
                x, qweight, scales, y, N, K, KP, k_per_split, x.stride(0), qweight.stride(0), y.stride(0),
                BITS=bits, GROUP=G, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ATOMIC=atomic, MAGIC=cfg.magic,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        else:
            grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
            _qgemm_kernel[grid](
                x, qweight, scales, y, M, N, K, KP, k_per_split, x.stride(0), qweight.stride(0), y.stride(0),
                BITS=bits, GROUP=G, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                ATOMIC=atomic, FP32=x.dtype == torch.float32, MAGIC=cfg.magic,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    return y.to(x.dtype) if atomic else y


def w8a16_matmul(x: Tensor, q: Tensor, s: Tensor, config: QuantConfig | None = None) -> Tensor:
    """Triton W8A16: ``x[M, K] @ (q[N, K] * s[N, None]).T -> y[M, N]`` in x's dtype."""
    if q.dtype != torch.int8 or q.dim() != 2 or s.shape != (q.shape[0],):
        raise ValueError("w8a16_matmul expects q[N, K] int8 and s[N]")
    if config is not None and config.block_k % 16:
        raise ValueError("block_k must be a multiple of 16")
    return _launch(x, q, s, 8, q.shape[1], 0, config)


def w4a16_matmul(x: Tensor, packed: Tensor, s: Tensor, group_size: int, config: QuantConfig | None = None) -> Tensor:
    """Triton W4A16: ``x[M, K] @ dequant(packed[N, Kp/2], s[Kp/G, N]).T -> y[M, N]`` in x's dtype."""
    check_quant_args(4, group_size)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("w4a16_matmul expects packed[N, Kp/2] uint8")
    N, KP = packed.shape[0], packed.shape[1] * 2
    if KP % group_size or s.shape != (KP // group_size, N):
        raise ValueError(f"scales must be [Kp/G, N] = [{KP // group_size}, {N}], got {tuple(s.shape)}")
    K = x.shape[-1]
    if not (KP - group_size < K <= KP):
        raise ValueError(f"x has K={K} columns but the weight holds {KP} (padded to group_size {group_size})")
    if config is not None and (config.block_k % 32 or config.block_k & (config.block_k - 1)):
        raise ValueError("int4 block_k must be a power of two >= 32")
    return _launch(x, packed, s, 4, K, group_size, config)


def quant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, group_size: int | None = None,
                 config: QuantConfig | None = None) -> Tensor:
    """Dispatch to :func:`w8a16_matmul` / :func:`w4a16_matmul`."""
    if bits == 8:
        return w8a16_matmul(x, qweight, scales, config)
    if bits == 4:
        return w4a16_matmul(x, qweight, scales, group_size, config)
    check_quant_args(bits, group_size)
    raise AssertionError("unreachable")
