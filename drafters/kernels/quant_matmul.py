"""Weight-only quantization (int8 per output channel, int4 group-wise) and W8A16 / W4A16 matmuls.

``y[M, N] = x[M, K] @ dequant(W)[N, K].T`` with ``x`` in fp16 / bf16 / fp32 and ``W`` stored as
integers plus float scales. Two Triton kernels cover the two regimes a drafter sees:

* **GEMV** (M = 1, plain decoding / chain drafts): purely memory-bound, so the only goal is to
  read every weight byte once at full bandwidth. Many programs tile N (and optionally split K);
  the int weights are widened in registers and reduced with the activations in fp32 -- the
  weights are never written back dequantized.
* **GEMM** (M = tree width, 16 / 64): tensor-core ``tl.dot`` on tiles whose weight operand is
  dequantized in registers right after the load (the W4A16 recipe of GPTQ's and AWQ's CUDA
  kernels and of Marlin, https://arxiv.org/abs/2408.11743: keep weights compressed in memory,
  expand them only on chip, apply the group scale to the partial product of a group). With
  ``swap`` the kernel computes ``y.T = W @ x.T`` so the large N side fills the MMA's M slot and a
  small M (1 .. 16) only pads the narrow side (the "swap AB" of small-batch GEMM kernels).

Split-K without extra launches: with ``split_k > 1`` each program adds its fp32 partial tile into
a per-(device, stream, shape) workspace with atomics, then bumps a per-tile counter; the program
that arrives last (the counter's old value is ``split_k - 1``) reads the sums back with atomic
exchanges that also zero them, writes ``y`` in the activation dtype and resets the counter. The
workspace is therefore always clean between calls: one launch, no memset, no cast kernel (the
"fix-up by the last CTA" of stream-K GEMM, Osama et al. 2023, https://arxiv.org/abs/2301.03598).
Floating-point atomics make split-K sums order-dependent in the last bits (drafts only; the
target's verification decides what is emitted).

Formats (symmetric, no zero point stored -- a choice: it keeps the error bound simple and the
kernels short; GPTQ https://arxiv.org/abs/2210.17323 and AWQ https://arxiv.org/abs/2306.00978 use
asymmetric groups with zero points, which buy a little accuracy for one more subtraction):

* int8: ``q[N, K]`` int8 in [-127, 127], ``s[N]`` fp32 = ``max_k |w[n, k]| / 127`` -- the
  per-output-channel ("vector-wise") absmax scaling of LLM.int8() (Dettmers et al., 2022,
  https://arxiv.org/abs/2208.07339) applied to weights only, without its outlier decomposition.
  The scale factors out of the K sum: ``y = (x @ q.T) * s``.
* int4: groups of ``group_size`` (G) consecutive K elements share ``s[g, n]`` fp32 =
  ``max |w[n, g*G:(g+1)*G]| / 7``; ``q = round(w / s)`` in [-7, 7] is stored as the nibble
  ``q + 8``, two per byte, **group-local half split**: byte ``o`` (0 <= o < G/2) of group ``g``
  holds element ``g*G + o`` in its low nibble and element ``g*G + G/2 + o`` in its high one:
  ``packed[N, Kp/2]`` uint8. So a tile of up to G/2 bytes of a row sees one scale and two
  *contiguous* runs of activations (no stride-2 gathers of x), the property Marlin's and
  FasterTransformer's interleaved layouts buy with a shuffle (Frantar et al. 2024,
  https://arxiv.org/abs/2408.11743). K is zero-padded to ``Kp = ceil(K / G) * G`` (ragged K works).
  Scales are stored ``[Kp/G, N]`` so a tile's scales are one contiguous load along N.

Error bound of both (round to nearest, no clipping since the absmax maps inside the range):
``|w - dequant(q)| <= s / 2`` elementwise, with ``s`` the element's channel / group scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from . import q4_gemv_cuda  # the CUDA-extension int4 GEMV (built lazily, on first use)

try:  # Triton is a dependency, but keep the CPU path importable without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
    try:  # host tensor descriptors (TMA on sm_90), Triton >= 3.4
        from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
    except ImportError:  # pragma: no cover - older Triton: QuantConfig(tma=True) is refused
        _TensorDescriptor = None
except ImportError:  # pragma: no cover - exercised only on installs without Triton
    triton = None
    tl = None
    _HAS_TRITON = False
    _TensorDescriptor = None

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
    half = G // 2
    packed = (q[:, :, :half] | (q[:, :, half:] << 4)).to(torch.uint8).view(N, ng * half)  # [N, Kp/2], group-local halves
    return packed.contiguous(), s.t().contiguous()  # s: [ng, N]


def dequantize_int8(q: Tensor, s: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q[N, K], s[N]) -> w[N, K]`` in ``dtype`` (computed in fp32)."""
    return (q.float() * s.float()[:, None]).to(dtype)


def unpack_int4(packed: Tensor, group_size: int) -> Tensor:
    """``packed[N, Kp/2]`` uint8 (group-local half split) -> ``q[N, Kp]`` int8 in [-8, 7] (nibble - 8)."""
    N, nb = packed.shape
    half = group_size // 2
    p = packed.to(torch.int16).view(N, nb // half, half)  # [N, ng, G/2]
    q = torch.cat([p & 0xF, p >> 4], dim=2)  # [N, ng, G]: low nibbles are the group's first half
    return q.view(N, 2 * nb).to(torch.int8) - INT4_OFFSET


def dequantize_int4(packed: Tensor, s: Tensor, K: int, group_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(packed[N, Kp/2], s[Kp/G, N]) -> w[N, K]`` in ``dtype`` (computed in fp32)."""
    q = unpack_int4(packed, group_size).float()  # [N, Kp]
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

    ``gemv=True``: the CUDA-core reduction kernel, one program per (N tile, K split, row);
    otherwise the tensor-core kernel with ``block_m`` rows (``swap``: ``y.T = W @ x.T``, the
    weight tile is the MMA's left operand). ``block_k`` counts K elements per tile (int4: half as
    many bytes). ``split_k > 1`` splits K over programs, reduced in one launch (see the module
    docstring). ``evict_first`` marks weight loads as streaming so they do not push the
    activations and scales out of L2. ``prefetch`` keeps one weight tile in flight while the
    previous one is reduced. ``skinny`` (2 < M <= 64, fp16/bf16 activations) uses the layout of
    the target's skinny GEMM (:mod:`specdec.kernels.skinny`) instead: ``block_n`` weight rows per
    program against all M rows, plain software-pipelined loads, a deterministic split-K in one
    launch; int8 runs that kernel (the int8 tile widened on chip, the channel scale applied to the
    fp32 accumulator), int4 ``_q4_skinny_kernel`` (one group per K step; ``asm`` as below). ``tma``
    (M <= 64, fp16/bf16 activations, 16-byte aligned rows) loads the weight and activation tiles through
    tensor descriptors, ``num_stages`` deep (TMA on sm_90), ``block_n`` weight rows against all M rows
    (``y.T = W @ x.T``), deterministic split-K as the skinny kernels: ``_q8_tma_kernel`` /
    ``_q4_tma_kernel`` (int4: ``block_k`` a multiple of the group, ``asm`` widening). ``cuda`` (int4,
    one row of bf16 activations) runs the hand-written GEMV of :mod:`drafters.kernels.q4_gemv_cuda`
    (built on first use where nvcc exists): ``block_n`` rows per block, ``num_warps`` warps (2 rows
    each), ``num_stages`` 16-byte weight loads per lane and row in flight (2 or 4). ``asm`` (int4 tensor-core kernel, CUDA, fp16/bf16 activations)
    widens 4 packed bytes to 8 16-bit values with 2 byte permutes, 4 logic ops and 4 packed
    subtractions (the magic-number dequantization of Kim et al. 2022,
    https://arxiv.org/abs/2211.10017, as Marlin uses it) instead of fp32 conversions.
    """

    gemv: bool
    block_n: int
    block_k: int
    block_m: int = 16
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    magic: bool = True  # int -> float through the exponent-bits trick (False: plain conversions)
    swap: bool = False
    evict_first: bool = True
    prefetch: bool = False  # load the next weight tile before using the current one (register double buffer)
    asm: bool = False  # tensor-core int4: nibbles -> packed bf16/fp16 pairs with inline PTX (GPU, 16-bit x only)
    skinny: bool = False  # 2 < M <= 64, fp16/bf16 x: the skinny-GEMM layout (block_n, split_k; int8 also block_k)
    tma: bool = False  # 16 < M <= 64 style tiles, fp16/bf16 x: W and x through tensor descriptors (see _q8_tma_kernel)
    cuda: bool = False  # int4, one bf16 row: the CUDA-extension GEMV (q4_gemv_cuda; block_n rows per block, num_warps, num_stages loads in flight)
    half: bool = False  # int4 GEMV, fp16/bf16 x, tiles of whole groups: 16-bit products and group sums
    # (nibbles widened with the inline PTX of ``asm`` on CUDA; fp32 across groups; error ~ x's rounding)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


_TMA_DEVICE: dict[int, bool] = {}


def tma_device(device: torch.device | str | None) -> bool:
    """Whether ``device`` is a GPU with tensor memory access (CUDA compute capability 9.0+) and this
    Triton has host tensor descriptors: where :func:`default_config` may pick ``tma`` tiles."""
    if _TensorDescriptor is None or device is None or torch.device(device).type != "cuda":
        return False
    d = torch.device(device)
    idx = d.index if d.index is not None else torch.cuda.current_device()
    if idx not in _TMA_DEVICE:  # (default_config runs on every call without a config: keep it cheap)
        _TMA_DEVICE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _TMA_DEVICE[idx]


def default_config(M: int, N: int, K: int, bits: int, group_size: int | None = None,
                   device: torch.device | None = None, dtype: torch.dtype | None = None,
                   tma: bool = True, cuda: bool = True) -> QuantConfig:
    """Heuristic tiles, read off the H200 sweep of ``benchmarks/bench_quant_kernels.py`` at the
    Llama-3-8B linear shapes (see ``notes/issue4_quant_bench_h200.md``) and generalised by N, K:

    * M <= 2, CUDA-core GEMV with no split: about 1000+ programs of a few rows each, each row read
      in long (1-2 KB) runs -- every program resident at once keeps enough bytes in flight;
    * M <= 16, tensor-core tiles of 32 output columns, split-K 4 (2 for wide N);
    * M > 16: narrow tiles for square layers, swapped wide tiles for N >> K (gate/up) and for
      K >> N (down, with split-K 4).
    int4 tensor-core tiles use the inline-PTX dequantization on CUDA.

    With ``dtype`` fp16 / bf16 and 2 < M <= 64, the skinny kernels take the shapes where the H200
    probes of the sixth session (``notes/issue4_quantized.md``) found them faster: int8 for
    ``N <= K`` except ``down``-like shapes at M <= 16; int4 for every shape at M <= 16 and for
    ``N <= K <= 4096`` (q/o, k/v) above.

    ``cuda`` (default on): int4 one-row bf16 GEMVs of wide layers (N > 2048) take the CUDA-extension
    kernel (fifteenth session, H200: 2.46 / 2.73 / 2.56x cuBLAS bf16 on q/o, gate/up, down against
    2.37 / 2.25 / 2.31x for the Triton GEMV; narrow k/v layers stay on Triton, 2.80x against 2.32x).

    ``tma`` (default: on where :func:`tma_device` says TMA exists) lets the tensor-descriptor
    kernels take what the fifteenth session's H200 sweep (``notes/issue4_quantized.md``) found
    them faster at: int4 for 2 < M <= 64, int8 for 16 < M <= 64 -- 64 weight rows per program,
    split-K to 128-512 programs on the 8B shapes (none for N > K, 8 ways for narrow N). int8 at
    17-32 rows takes 256-wide K steps with 3 stages (seventeenth session, H200: 2-8 % faster than the
    128-wide steps on every 8B shape, ``notes/issue4_h200_s17_static_ab.json``).
    """
    if (cuda and bits == 4 and M == 1 and dtype == torch.bfloat16 and N > 2048 and device is not None
            and torch.device(device).type == "cuda"):  # (quant_matmul falls back if the extension is missing)
        return QuantConfig(gemv=True, block_n=4, block_k=group_size or 128, num_warps=2, num_stages=2, cuda=True)
    if (tma and bits in (4, 8) and 2 < M <= 64 and dtype in (torch.float16, torch.bfloat16)
            and (bits == 4 or M > 16) and tma_device(device)):
        if bits == 4:
            G = group_size or 128
            split = (8 if N <= K or N <= 2048 else 4) if M <= 16 else (1 if N > K else 8 if N <= 2048 else 4)
            return QuantConfig(gemv=False, block_n=64, block_k=max(128, G), split_k=split, num_stages=3, swap=True,
                               asm=True, tma=True)
        split = 1 if N > K else 8 if N <= 2048 else 4
        if M <= 32:  # 256-wide K steps, 3 stages (see above)
            return QuantConfig(gemv=False, block_n=64, block_k=256, split_k=split, num_stages=3, swap=True, tma=True)
        return QuantConfig(gemv=False, block_n=64, block_k=256 if N <= 2048 else 128, split_k=split,
                           num_stages=3 if N == K or N <= 2048 else 4, swap=True, tma=True)
    if bits == 4 and 2 < M <= 64 and dtype in (torch.float16, torch.bfloat16) and (M <= 16 or N <= K <= 4096):
        if N <= 2048:  # narrow (k/v-like)
            return QuantConfig(gemv=False, block_n=32, block_k=128, split_k=8, num_stages=3, skinny=True, asm=True)
        split = 8 if M <= 16 and N <= K else 4
        return QuantConfig(gemv=False, block_n=64, block_k=128, split_k=split, num_stages=3, skinny=True, asm=True)
    if bits == 8 and 2 < M <= 64 and dtype in (torch.float16, torch.bfloat16) and N <= K:
        if M <= 16 and N <= 2048:  # narrow (k/v-like): split K 8 ways
            return QuantConfig(gemv=False, block_n=32, block_k=128, split_k=8, num_stages=3, skinny=True)
        if M <= 16 and N == K:  # square
            return QuantConfig(gemv=False, block_n=32, block_k=256, split_k=4, num_stages=4, skinny=True)
        if M > 16:
            if N <= 2048:
                return QuantConfig(gemv=False, block_n=32, block_k=256, split_k=4, num_stages=3, skinny=True)
            return QuantConfig(gemv=False, block_n=64, block_k=128, split_k=4, num_stages=3, skinny=True)
    G = group_size if bits == 4 else 1 << 30
    kp2 = 1 << max(4, (K - 1).bit_length())  # K rounded up to a power of two
    if M <= 2:
        if bits == 4:  # tiles of whole groups, the [BN, NG, HG] path; with fp16 / bf16 activations the
            # products and group sums in 16 bits (H200 probe of the eighth session, notes/issue4_quantized.md:
            # 4 rows x 2048 elements on 4 warps overall, 8 warps for narrow layers, 8 rows x 1024 for wide ones;
            # ninth session: narrow layers read whole 4096-element rows, k/v 3.33-3.41 -> 3.03-3.06 µs)
            half = dtype in (torch.float16, torch.bfloat16)
            bn, bk, warps = 4, 2048, 4
            if half and N <= 2048:
                bk, warps = 4096, 8
            elif half and N > 8192:
                bn, bk = 8, 1024
            return QuantConfig(gemv=True, block_n=bn, block_k=max(G, min(bk, max(256, kp2))), split_k=1,
                               num_warps=warps, num_stages=3, half=half)
        bn = min(16, max(2, 1 << max(0, (N // 1024).bit_length() - 1)))
        bk = min(2048, max(256, 4096 // bn), max(256, kp2))
        warps = 8 if bk >= 2048 else 4
        return QuantConfig(gemv=True, block_n=bn, block_k=bk, split_k=1, num_warps=warps, num_stages=3,
                           prefetch=bn >= 8)
    bk = 128 if bits == 8 else min(128, G)
    asm = bits == 4
    if M <= 16:
        return QuantConfig(gemv=False, block_m=16, block_n=32, block_k=bk, split_k=4 if N <= 4096 else 2,
                           num_warps=4, num_stages=4, asm=asm)
    bm = 32 if M <= 32 else 64
    if N <= 4096 and K <= 4096:
        return QuantConfig(gemv=False, block_m=bm, block_n=32, block_k=bk, split_k=2 if N >= 4096 else 4,
                           num_warps=4, num_stages=4, asm=asm)
    if N >= K:
        return QuantConfig(gemv=False, block_m=bm, block_n=64, block_k=bk, split_k=1, num_warps=4, num_stages=4,
                           swap=True, prefetch=bits == 4, asm=asm)
    return QuantConfig(gemv=False, block_m=bm, block_n=128, block_k=bk, split_k=8 if bits == 4 else 4, num_warps=8,
                       num_stages=3, swap=True, prefetch=bits == 4, asm=asm)


# --------------------------------------------------------------------------- split-K workspace
_WORKSPACE: dict[str, tuple[Tensor, Tensor]] = {}
_RETIRED: list[tuple[Tensor, Tensor]] = []  # outgrown workspaces, never freed (see _split_workspace)


def _split_workspace(device: torch.device, numel: int, tiles: int) -> tuple[Tensor, Tensor]:
    """Zeroed fp32 partial sums and int32 arrival counters, kept clean by the kernels themselves.

    One pair per device, shared by every call and graph on it: split-K launches on one device must
    not run concurrently on two streams (as for :func:`specdec.kernels.skinny.workspace`). A call
    that needs more than the current pair gets a new, larger one (sizes rounded up to a power of
    two, so this happens a few times at most), allocated and zeroed eagerly: a CUDA-graph capture
    that would need one raises (run the call once outside the capture first, as DraftGraphs' warm-up
    and the benchmarks do). The outgrown pair is **kept alive**, never freed: a graph captured with
    it reads and writes its address at every replay.

    History (ninth session): the pairs were per (device, stream) and an outgrown one was dropped.
    Draft graphs warm up on a side stream and capture on PyTorch's shared capture stream, so the
    capture stream's pair was allocated inside a capture, from the drafter's graph pool, and a later,
    larger capture dropped it while an earlier graph still used it; another tensor could then take
    that memory and the captured split-K sums start from its bytes. That made a bf16 QuantizedCopy
    int8 draft of SmolLM2 reach only tau 1.04 on an H200 (its catch-up graphs of 3-5 rows grow the
    pair); with this fix it reaches 4.66 (tenth session, ``notes/issue4_quantized.md``).
    """
    key = str(device)
    ws = _WORKSPACE.get(key)
    if ws is None or ws[0].numel() < numel or ws[1].numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("quant_matmul: a split-K call inside a CUDA-graph capture needs a larger workspace than "
                               "any eager call so far; run it once outside the capture first")
        n0 = triton.next_power_of_2(max(numel, ws[0].numel() if ws is not None else 0, 1))
        t0 = triton.next_power_of_2(max(tiles, ws[1].numel() if ws is not None else 0, 1))
        if ws is not None:
            _RETIRED.append(ws)
        ws = (torch.zeros(n0, device=device, dtype=torch.float32), torch.zeros(t0, device=device, dtype=torch.int32))
        _WORKSPACE[key] = ws
    return ws


def _int4_to_16bit_ptx(magic: int, fmt: str) -> str:
    """PTX for 4 packed int4 bytes ($4) -> 4 low-nibble values ($0, $1) and 4 high ones ($2, $3), each
    register a pair of 16-bit floats ``n - 8``: ``magic | n`` is the float ``magic_value + n``, minus
    ``magic_value + 8`` (one packed subtract). ``fmt`` is ``bf16x2`` or ``f16x2``."""
    m2 = f"0x{magic:04X}{magic:04X}"
    k2 = f"0x{magic + 8:04X}{magic + 8:04X}"
    lines = ["{", ".reg .b32 t0, t1, k;", "prmt.b32 t0, $4, 0, 0x4140;", "prmt.b32 t1, $4, 0, 0x4342;", f"mov.b32 k, {k2};",
             f"lop3.b32 $0, t0, 0x000F000F, {m2}, 0xEA;", f"lop3.b32 $1, t1, 0x000F000F, {m2}, 0xEA;",
             "shr.u32 t0, t0, 4;", "shr.u32 t1, t1, 4;",
             f"lop3.b32 $2, t0, 0x000F000F, {m2}, 0xEA;", f"lop3.b32 $3, t1, 0x000F000F, {m2}, 0xEA;"]
    lines += [f"sub.rn.{fmt} ${r}, ${r}, k;" for r in range(4)] + ["}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- Triton kernels
if _HAS_TRITON:
    from specdec.kernels.skinny import store_y

    _PTX_INT4_BF16 = tl.constexpr(_int4_to_16bit_ptx(0x4300, "bf16x2"))  # bf16 0x4300 = 128
    _PTX_INT4_F16 = tl.constexpr(_int4_to_16bit_ptx(0x6400, "f16x2"))  # fp16 0x6400 = 1024


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
    def _int4_pair_16(p, BF16: tl.constexpr):
        """Packed bytes (uint8) -> (low, high) nibble values - 8 as bf16 (BF16) or fp16, 4 bytes per asm.

        ``0x4300 | n`` is bf16 ``128 + n`` (``0x6400 | n`` is fp16 ``1024 + n``); one packed subtract of
        ``136`` (``1032``) leaves ``n - 8`` exactly. ``prmt`` spreads bytes 0,1 (2,3) into the two
        16-bit lanes, ``lop3`` does the mask and the OR in one instruction (LUT 0xEA = (a & b) | c).
        """
        if BF16:
            res = tl.inline_asm_elementwise(_PTX_INT4_BF16, "=r,=r,=r,=r,r", [p], dtype=(tl.bfloat16, tl.bfloat16),
                                            is_pure=True, pack=4)
        else:
            res = tl.inline_asm_elementwise(_PTX_INT4_F16, "=r,=r,=r,=r,r", [p], dtype=(tl.float16, tl.float16),
                                            is_pure=True, pack=4)
        return res[0], res[1]

    @triton.jit
    def _int4_halves(p, like, ASM: tl.constexpr, BF16: tl.constexpr):
        """Packed bytes -> (low, high) nibble values - 8 in ``like``'s 16-bit dtype: the inline PTX of
        :func:`_int4_pair_16` (ASM, CUDA) or the fp32 path converted (the interpreter)."""
        if ASM:
            return _int4_pair_16(p, BF16)
        else:
            lo, hi = _int4_pair(p, True)
            return lo.to(like.dtype), hi.to(like.dtype)

    @triton.jit
    def _load_w(w_ptr, offs_n, mask_n, offs_b, b_end, stride_wn, OTHER: tl.constexpr, EVICT: tl.constexpr):
        """One weight tile ``[BN, BKB]`` (bytes ``offs_b`` of rows ``offs_n``); bytes >= b_end read as OTHER."""
        ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :]
        mask = mask_n[:, None] & (offs_b < b_end)[None, :]
        if EVICT:
            return tl.load(ptrs, mask=mask, other=OTHER, eviction_policy="evict_first")
        else:
            return tl.load(ptrs, mask=mask, other=OTHER)

    @triton.jit
    def _w_first(w_ptr, offs_n, mask_n, b_lo, b_end, stride_wn, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
                 OTHER: tl.constexpr, EVICT: tl.constexpr, PREFETCH: tl.constexpr):
        """The weight stream's first in-flight tile (PREFETCH) or a placeholder that is never read."""
        if PREFETCH:
            return _load_w(w_ptr, offs_n, mask_n, b_lo + tl.arange(0, BLOCK_KB), b_end, stride_wn, OTHER, EVICT)
        else:
            return tl.zeros([BLOCK_N, BLOCK_KB], dtype=w_ptr.dtype.element_ty)

    @triton.jit
    def _w_step(p_next, w_ptr, offs_n, mask_n, offs_b, b_end, stride_wn, BLOCK_KB: tl.constexpr,
                OTHER: tl.constexpr, EVICT: tl.constexpr, PREFETCH: tl.constexpr):
        """``(tile for bytes offs_b, next in-flight tile)``: with PREFETCH the tile loaded one iteration
        earlier is used while the next one is requested (register double buffer)."""
        if PREFETCH:
            return p_next, _load_w(w_ptr, offs_n, mask_n, offs_b + BLOCK_KB, b_end, stride_wn, OTHER, EVICT)
        else:
            return _load_w(w_ptr, offs_n, mask_n, offs_b, b_end, stride_wn, OTHER, EVICT), p_next

    @triton.jit
    def _mma(a, b, acc, FP32: tl.constexpr):
        """``acc + a @ b`` on tensor cores; fp32 operands with IEEE products (tests, exactness)."""
        if FP32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _store_tile(acc, y_ptr, y_offs, ws_ptr, wsi_ptr, ws_offs, cnt_ptr, tile, mask, SPLIT: tl.constexpr):
        """Write a finished fp32 tile, or (split-K) add it to the workspace; the last split writes y."""
        if SPLIT == 1:
            tl.store(y_ptr + y_offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(ws_ptr + ws_offs, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()  # every thread's partial is issued before the arrival is published
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")  # old value
            if arrived == SPLIT - 1:
                # read back and zero in one atomic, on the int32 view (bits of the fp32 sums; 0 is 0.0)
                bits = tl.atomic_xchg(wsi_ptr + ws_offs, tl.zeros_like(acc).to(tl.int32), mask=mask, sem="acquire")
                total = bits.to(tl.float32, bitcast=True)
                tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")

    @triton.jit
    def _qgemv_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, wsi_ptr, cnt_ptr,  # x[M, K], w[N, KB] int8 | uint8, s[N] | [Kp/G, N], y[M, N]
        N, K, KB, kb_per_split,  # KB: bytes per weight row; kb_per_split: multiple of BLOCK_KB
        stride_xm, stride_wn, stride_ym,
        BITS: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr, SPLIT: tl.constexpr, MAGIC: tl.constexpr,
        EVICT: tl.constexpr, PREFETCH: tl.constexpr, ACC_W: tl.constexpr,
        HALF: tl.constexpr = False, ASM: tl.constexpr = False,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)
        HG: tl.constexpr = GROUP // 2  # int4: bytes per group
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_n = offs_n < N
        # 2-D fp32 accumulator: the cross-thread reduction happens once, after the K loop
        # (int4 tiles spanning several groups keep one column per group: ACC_W = BLOCK_KB // HG)
        acc2 = tl.zeros([BLOCK_N, ACC_W], dtype=tl.float32)
        x_row = x_ptr + m * stride_xm
        b_lo = pid_k * kb_per_split
        b_end = tl.minimum(KB, b_lo + kb_per_split)  # this split's bytes: [b_lo, b_end)
        OTHER: tl.constexpr = 0 if BITS == 8 else 0x88  # int4 padding nibbles 8 -> value 0
        p_next = _w_first(w_ptr, offs_n, mask_n, b_lo, b_end, stride_wn, BLOCK_N, BLOCK_KB, OTHER, EVICT, PREFETCH)
        for i in range(0, kb_per_split, BLOCK_KB):
            b0 = b_lo + i
            if BITS == 4 and BLOCK_KB > HG:
                # several whole groups per tile, read as [BN, NG, HG] bytes: each group's low and high
                # nibbles meet two contiguous runs of x, and the per-group sums need no reshape
                # (H200, M = 1, 8B shapes: 10-17 % faster than the 2-D tile summed through a
                # reshape, which made Triton convert layouts; notes/issue4_quantized.md)
                g = b0 // HG + tl.arange(0, ACC_W)  # [NG] groups of this tile
                g_ok = g * HG < b_end
                o = tl.arange(0, HG)  # [HG] byte within the group
                wp = w_ptr + offs_n[:, None, None] * stride_wn + (g * HG)[None, :, None] + o[None, None, :]
                wm = mask_n[:, None, None] & g_ok[None, :, None]
                if EVICT:
                    p3 = tl.load(wp, mask=wm, other=OTHER, eviction_policy="evict_first")  # [BN, NG, HG]
                else:
                    p3 = tl.load(wp, mask=wm, other=OTHER)
                e = (g * GROUP)[:, None] + o[None, :]  # [NG, HG] element of each low nibble
                xl = tl.load(x_row + e, mask=e < K, other=0.0)
                xh = tl.load(x_row + e + HG, mask=e + HG < K, other=0.0)
                if HALF:  # 16-bit products and group sums (x's dtype), fp32 across groups
                    if ASM:
                        lo, hi = _int4_pair_16(p3, xl.dtype == tl.bfloat16)
                    else:  # (interpreter) the same exact small integers, converted from fp32
                        lo, hi = _int4_pair(p3, MAGIC)
                        lo, hi = lo.to(xl.dtype), hi.to(xl.dtype)
                    part = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2).to(tl.float32)  # [BN, NG]
                else:
                    lo, hi = _int4_pair(p3, MAGIC)
                    part = tl.sum(lo * xl.to(tl.float32)[None, :, :] + hi * xh.to(tl.float32)[None, :, :], axis=2)
                s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=mask_n[:, None] & (g < KB // HG)[None, :],
                            other=0.0)  # [BN, NG]
                acc2 += part * s
            else:
                offs_b = b0 + tl.arange(0, BLOCK_KB)  # [BKB] byte columns
                p, p_next = _w_step(p_next, w_ptr, offs_n, mask_n, offs_b, b_end, stride_wn, BLOCK_KB, OTHER, EVICT,
                                    PREFETCH)  # [BN, BKB]
                if BITS == 8:
                    xv = tl.load(x_row + offs_b, mask=offs_b < K, other=0.0).to(tl.float32)  # [BKB]
                    acc2 += _int8_value(p, MAGIC) * xv[None, :]
                else:  # the tile lies in one group: one scale per row
                    e_lo = (offs_b // HG) * GROUP + offs_b % HG  # [BKB] element of each low nibble
                    xl = tl.load(x_row + e_lo, mask=e_lo < K, other=0.0).to(tl.float32)
                    xh = tl.load(x_row + e_lo + HG, mask=e_lo + HG < K, other=0.0).to(tl.float32)
                    lo, hi = _int4_pair(p, MAGIC)
                    prod = lo * xl[None, :] + hi * xh[None, :]  # [BN, BKB]
                    s = tl.load(s_ptr + tl.minimum(b0 // HG, KB // HG - 1) * N + offs_n, mask=mask_n, other=0.0)  # tiles past KB (all-zero products): any finite scale
                    acc2 += prod * s[:, None]
        acc = tl.sum(acc2, axis=1)  # [BN]
        if BITS == 8:
            acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        _store_tile(acc, y_ptr, m * stride_ym + offs_n, ws_ptr, wsi_ptr, m * N + offs_n, cnt_ptr,
                    m * tl.num_programs(0) + pid_n, mask_n, SPLIT)

    @triton.jit
    def _qgemm_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, wsi_ptr, cnt_ptr,
        M, N, K, KB, kb_per_split,
        stride_xm, stride_wn, stride_ym,
        BITS: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
        SPLIT: tl.constexpr, FP32: tl.constexpr, MAGIC: tl.constexpr, SWAP: tl.constexpr, EVICT: tl.constexpr,
        PREFETCH: tl.constexpr, ASM: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        HG: tl.constexpr = GROUP // 2
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
        mask_m = offs_m < M
        mask_n = offs_n < N
        if SWAP:
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # y.T tile
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        b_lo = pid_k * kb_per_split
        b_end = tl.minimum(KB, b_lo + kb_per_split)
        OTHER: tl.constexpr = 0 if BITS == 8 else 0x88
        p_next = _w_first(w_ptr, offs_n, mask_n, b_lo, b_end, stride_wn, BLOCK_N, BLOCK_KB, OTHER, EVICT, PREFETCH)
        for i in range(0, kb_per_split, BLOCK_KB):
            b0 = b_lo + i
            offs_b = b0 + tl.arange(0, BLOCK_KB)  # [BKB]
            wmask = mask_n[:, None] & (offs_b < b_end)[None, :]
            p, p_next = _w_step(p_next, w_ptr, offs_n, mask_n, offs_b, b_end, stride_wn, BLOCK_KB, OTHER, EVICT,
                                PREFETCH)  # [BN, BKB]
            if BITS == 8:
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_b[None, :],
                             mask=mask_m[:, None] & (offs_b[None, :] < K), other=0.0)  # [BM, BKB]
                if MAGIC:
                    w = _int8_value(p, MAGIC).to(xt.dtype)  # exact: |q| <= 127
                else:
                    w = p.to(xt.dtype)
                if SWAP:
                    acc = _mma(w, tl.trans(xt), acc, FP32)
                else:
                    acc = _mma(xt, tl.trans(w), acc, FP32)
            else:
                e_lo = (offs_b // HG) * GROUP + offs_b % HG  # [BKB]
                xp = x_ptr + offs_m[:, None] * stride_xm + e_lo[None, :]
                xl = tl.load(xp, mask=mask_m[:, None] & (e_lo[None, :] < K), other=0.0)  # [BM, BKB]
                xh = tl.load(xp + HG, mask=mask_m[:, None] & (e_lo[None, :] + HG < K), other=0.0)
                if BLOCK_KB <= HG:  # one group per tile: integer operands (exact), scale the partial product
                    if ASM:
                        lo, hi = _int4_pair_16(p, xl.dtype == tl.bfloat16)  # [BN, BKB] bf16 | fp16
                    else:
                        lo, hi = _int4_pair(p, MAGIC)  # [BN, BKB] fp32
                        lo = lo.to(xl.dtype)
                        hi = hi.to(xl.dtype)
                    s = tl.load(s_ptr + tl.minimum(b0 // HG, KB // HG - 1) * N + offs_n, mask=mask_n, other=0.0)  # tiles past KB (all-zero products): any finite scale  # [BN]
                    if SWAP:
                        part = _mma(lo, tl.trans(xl), tl.zeros_like(acc), FP32)
                        part = _mma(hi, tl.trans(xh), part, FP32)  # [BN, BM]
                        acc += part * s[:, None]
                    else:
                        part = _mma(xl, tl.trans(lo), tl.zeros_like(acc), FP32)
                        part = _mma(xh, tl.trans(hi), part, FP32)  # [BM, BN]
                        acc += part * s[None, :]
                else:  # several groups per tile: dequantize elementwise, then one product
                    lo, hi = _int4_pair(p, MAGIC)  # [BN, BKB] fp32
                    s = tl.load(s_ptr + (offs_b // HG)[None, :] * N + offs_n[:, None], mask=wmask, other=0.0)
                    lo = (lo * s).to(xl.dtype)
                    hi = (hi * s).to(xl.dtype)
                    if SWAP:
                        acc = _mma(lo, tl.trans(xl), acc, FP32)
                        acc = _mma(hi, tl.trans(xh), acc, FP32)
                    else:
                        acc = _mma(xl, tl.trans(lo), acc, FP32)
                        acc = _mma(xh, tl.trans(hi), acc, FP32)
        tile = pid_m * tl.num_programs(1) + pid_n
        if SWAP:
            if BITS == 8:
                acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
            _store_tile(acc, y_ptr, offs_m[None, :] * stride_ym + offs_n[:, None], ws_ptr, wsi_ptr,
                        offs_m[None, :] * N + offs_n[:, None], cnt_ptr, tile, mask_n[:, None] & mask_m[None, :], SPLIT)
        else:
            if BITS == 8:
                acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
            _store_tile(acc, y_ptr, offs_m[:, None] * stride_ym + offs_n[None, :], ws_ptr, wsi_ptr,
                        offs_m[:, None] * N + offs_n[None, :], cnt_ptr, tile, mask_m[:, None] & mask_n[None, :], SPLIT)


    @triton.jit
    def _q4_skinny_kernel(
        x_ptr, w_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr,  # x[M, K], w[N, Kp/2] uint8, s[Kp/G, N], y[M, N]
        M, N, K, KB, kb_per_split,  # kb_per_split: a multiple of G/2
        stride_xm, stride_wn, stride_ym,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        ASM: tl.constexpr, BF16: tl.constexpr,
    ):
        """W4A16 in the layout of :mod:`specdec.kernels.skinny`: ``BLOCK_N`` weight rows against all
        ``M <= BLOCK_M`` rows, one group per K step (``G/2`` bytes per row: one scale, two
        contiguous runs of x), plain pipelined loads, the partial product of a group scaled into the
        fp32 ``y.T`` accumulator; deterministic split-K through :func:`store_y`."""
        HG: tl.constexpr = GROUP // 2
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns = weight rows
        rm = tl.arange(0, BLOCK_M)  # [BM]
        n_ok = rn < N
        m_ok = rm < M
        w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
        x_rows = x_ptr + rm[:, None] * stride_xm  # [BM, 1]
        b_lo = pid_k * kb_per_split
        b_hi = tl.minimum(KB, b_lo + kb_per_split)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y.T tile
        for b0 in range(b_lo, b_hi, HG):
            rb = b0 + tl.arange(0, HG)  # [HG] bytes of one group
            p = tl.load(w_rows + rb[None, :], mask=n_ok[:, None] & (rb < b_hi)[None, :], other=0x88,
                        eviction_policy="evict_first")  # [BN, HG]
            e = (b0 // HG) * GROUP + tl.arange(0, HG)  # [HG] K index of the low nibbles
            xl = tl.load(x_rows + e[None, :], mask=m_ok[:, None] & (e < K)[None, :], other=0.0)  # [BM, HG]
            xh = tl.load(x_rows + e[None, :] + HG, mask=m_ok[:, None] & (e + HG < K)[None, :], other=0.0)
            lo, hi = _int4_halves(p, xl, ASM, BF16)  # [BN, HG] exact 16-bit integers
            part = tl.dot(lo, tl.trans(xl))
            part = tl.dot(hi, tl.trans(xh), part)  # [BN, BM]
            acc += part * tl.load(s_ptr + (b0 // HG) * N + rn, mask=n_ok, other=0.0)[:, None]
        store_y(acc, y_ptr, y_ptr, ws_ptr, cnt_ptr, rn, rm, n_ok, m_ok, stride_ym, pid, pid_k,
                False, BLOCK_N, BLOCK_M, SPLIT)


    @triton.jit
    def _zero_acc(BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SWAP: tl.constexpr):
        """fp32 zeros for a ``y.T`` tile ``[BN, BM]`` (SWAP) or a ``y`` tile ``[BM, BN]``."""
        if SWAP:
            return tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    @triton.jit
    def _q8_tma_step(x_desc, w_desc, off_n, k, acc, SWAP: tl.constexpr):
        """One K step of :func:`_q8_tma_kernel`: ``acc += W[off_n:, k:] @ x[:, k:].T`` (or its transpose)."""
        w = w_desc.load([off_n, k])  # [BN, BK] int8
        xt = x_desc.load([0, k])  # [BM, BK]
        w16 = w.to(xt.dtype)  # [BN, BK], exact: |q| <= 127 (an inline-PTX widening was 1-4 % slower)
        if SWAP:
            return tl.dot(w16, tl.trans(xt), acc)
        else:
            return tl.dot(xt, tl.trans(w16), acc)

    @triton.jit
    def _q8_tma_kernel(
        x_desc, w_desc, s_ptr, y_ptr, ws_ptr, cnt_ptr,  # x[M, K] block [BM, BK], w[N, K] int8 block [BN, BK], s[N]
        M, N, K, stride_ym,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
        STAGES: tl.constexpr, SWAP: tl.constexpr, KPS: tl.constexpr,  # KPS: K per split, a multiple of BLOCK_K
        FIXED: tl.constexpr,
    ):
        """W8A16 with both operands through tensor descriptors: on sm_90 each K step is a TMA copy
        into shared memory that Triton pipelines ``STAGES`` deep (``tl.range(num_stages=)``), so a
        program keeps several weight tiles in flight without registers -- pointer loads in the
        tensor-core kernel above compile to synchronous loads (fourteenth-session probe,
        ``notes/issue4_quantized.md``). The int8 tile is converted in registers and is the MMA's
        left operand (``y.T = W @ x.T``); out-of-bounds rows and columns read as zeros; the channel
        scale multiplies the fp32 accumulator; deterministic split-K through :func:`store_y`.

        ``FIXED``: every split runs ``KPS // BLOCK_K`` steps, a compile-time count (the last split's
        steps past K read TMA's zero fill). With a runtime count the loop has a zero-trip path on
        which the accumulator is defined by moves, and ptxas serializes every wgmma (its C7515 note).
        H200, seventeenth session (``notes/issue4_quantized.md``): the fixed count is 1-2 % faster
        with split-K or at 17-32 rows, 2 % slower on un-split gate/up at 64 rows, where
        :func:`_launch_tma` keeps the runtime count."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        off_n = pid * BLOCK_N
        k_lo = pid_k * KPS
        acc = _zero_acc(BLOCK_N, BLOCK_M, SWAP)
        if FIXED:
            for i in tl.range(0, KPS // BLOCK_K, num_stages=STAGES):
                acc = _q8_tma_step(x_desc, w_desc, off_n, k_lo + i * BLOCK_K, acc, SWAP)
        else:
            for k in tl.range(k_lo, tl.minimum(K, k_lo + KPS), BLOCK_K, num_stages=STAGES):
                acc = _q8_tma_step(x_desc, w_desc, off_n, k, acc, SWAP)
        if not SWAP:
            acc = tl.trans(acc)  # [BN, BM]
        rn = off_n + tl.arange(0, BLOCK_N)  # [BN] output columns
        rm = tl.arange(0, BLOCK_M)  # [BM]
        n_ok = rn < N
        acc *= tl.load(s_ptr + rn, mask=n_ok, other=0.0)[:, None]
        store_y(acc, y_ptr, y_ptr, ws_ptr, cnt_ptr, rn, rm, n_ok, rm < M, stride_ym, pid, pid_k,
                False, BLOCK_N, BLOCK_M, SPLIT)

    @triton.jit
    def _q4_tma_kernel(
        x_desc, w_desc, s_ptr, y_ptr, ws_ptr, cnt_ptr,  # x[M, K] block [BM, G/2], w[N, Kp/2] uint8 block [BN, G/2], s[Kp/G, N]
        M, N, KB, kb_per_split, stride_ym,  # kb_per_split: a multiple of GROUPS * G/2
        GROUP: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, BF16: tl.constexpr, SWAP: tl.constexpr,
    ):
        """W4A16 in the layout of :func:`_q8_tma_kernel`: ``GROUPS`` whole groups per pipelined K
        step, each ``G/2`` bytes of every weight row (one scale, two contiguous runs of x); nibbles
        widened in registers (``ASM``: the inline PTX of :func:`_int4_pair_16`), two MMAs per group,
        the group's partial product scaled into the fp32 accumulator. x columns past K read as zeros,
        so the zero-padded tail group adds nothing."""
        HG: tl.constexpr = GROUP // 2
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        off_n = pid * BLOCK_N
        rn = off_n + tl.arange(0, BLOCK_N)  # [BN]
        n_ok = rn < N
        b_lo = pid_k * kb_per_split
        b_hi = tl.minimum(KB, b_lo + kb_per_split)
        acc = _zero_acc(BLOCK_N, BLOCK_M, SWAP)
        for b0 in tl.range(b_lo, b_hi, GROUPS * HG, num_stages=STAGES):
            for g in tl.static_range(GROUPS):
                grp = b0 // HG + g
                p = w_desc.load([off_n, grp * HG])  # [BN, HG] uint8
                xl = x_desc.load([0, grp * GROUP])  # [BM, HG] x of the low nibbles
                xh = x_desc.load([0, grp * GROUP + HG])  # [BM, HG] x of the high nibbles
                lo, hi = _int4_halves(p, xl, ASM, BF16)  # [BN, HG] exact 16-bit integers
                s = tl.load(s_ptr + tl.minimum(grp, KB // HG - 1) * N + rn, mask=n_ok, other=0.0)  # groups past KB: x is 0 there
                if SWAP:
                    part = tl.dot(lo, tl.trans(xl))
                    part = tl.dot(hi, tl.trans(xh), part)  # [BN, BM]
                    acc += part * s[:, None]
                else:
                    part = tl.dot(xl, tl.trans(lo))
                    part = tl.dot(xh, tl.trans(hi), part)  # [BM, BN]
                    acc += part * s[None, :]
        if not SWAP:
            acc = tl.trans(acc)  # [BN, BM]
        store_y(acc, y_ptr, y_ptr, ws_ptr, cnt_ptr, rn, tl.arange(0, BLOCK_M), n_ok, tl.arange(0, BLOCK_M) < M,
                stride_ym, pid, pid_k, False, BLOCK_N, BLOCK_M, SPLIT)

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
    N, KB = qweight.shape  # KB: bytes per row
    G = group_size if bits == 4 else 1 << 30
    cfg = config or default_config(M, N, K, bits, group_size, x.device, dtype=x.dtype)
    if cfg.tma and not tma_applies(x, qweight, bits, group_size):  # e.g. a ragged K
        if config is not None:
            raise ValueError("QuantConfig(tma=True) takes 1..64 rows of fp16 / bf16 activations with 16-byte aligned "
                             "rows and base addresses (int8: K % 16 == 0, x: K % 8 == 0), int4 groups of >= 32, "
                             "and Triton's TensorDescriptor")
        cfg = default_config(M, N, K, bits, group_size, x.device, dtype=x.dtype, tma=False)
    if cfg.cuda:
        ok = bits == 4 and q4_gemv_cuda.applies(x, qweight, scales, K, group_size)
        if ok and q4_gemv_cuda.available():
            return q4_gemv_cuda.q4_gemv(x, qweight, scales, group_size, cfg.block_n, 32 * cfg.num_warps, cfg.num_stages)
        if config is not None and not ok:
            raise ValueError("QuantConfig(cuda=True) takes int4, one contiguous 16-byte aligned bf16 row on CUDA, "
                             "K a whole number of groups of 64 or 128, fp32 scales")
        cfg = default_config(M, N, K, bits, group_size, x.device, dtype=x.dtype, cuda=False)  # Triton instead
    if cfg.skinny:
        if not 2 <= M <= 64 or x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError("QuantConfig(skinny=True) takes 2..64 rows of fp16 / bf16 activations")
        if bits == 8:
            from specdec.kernels.skinny import skinny_linear

            return skinny_linear(x, qweight, None, dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                                                        num_warps=cfg.num_warps, num_stages=cfg.num_stages), scale=scales)
        return _launch_q4_skinny(x, qweight, scales, K, group_size, cfg)
    if cfg.tma:
        return _launch_tma(x, qweight, scales, bits, K, group_size, cfg)
    bkb = cfg.block_k if bits == 8 else cfg.block_k // 2  # bytes per tile row
    split = max(1, cfg.split_k)
    kb_per_split = triton.cdiv(triton.cdiv(KB, split), bkb) * bkb  # multiple of BLOCK_KB
    split = triton.cdiv(KB, kb_per_split)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    if cfg.gemv:
        grid = (triton.cdiv(N, cfg.block_n), split, M)
    else:
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
    # inline PTX needs a real GPU (not the interpreter) and 16-bit activations
    use_asm = (cfg.asm and bits == 4 and x.is_cuda and x.dtype != torch.float32
               and os.environ.get("TRITON_INTERPRET") != "1")
    half = cfg.half and bits == 4 and x.dtype in (torch.float16, torch.bfloat16)
    if cfg.half and bits == 4 and cfg.gemv and not half:
        raise ValueError("QuantConfig(half=True) takes fp16 / bf16 activations")
    if split > 1:
        ws, cnt = _split_workspace(x.device, M * N, grid[0] * grid[1] * (M if cfg.gemv else 1))
    else:
        ws, cnt = y, y  # unused
    if cfg.gemv:
        _qgemv_kernel[grid](
            x, qweight, scales, y, ws, ws.view(torch.int32) if split > 1 else ws, cnt, N, K, KB, kb_per_split, x.stride(0), qweight.stride(0), y.stride(0),
            BITS=bits, GROUP=G, BLOCK_N=cfg.block_n, BLOCK_KB=bkb, SPLIT=split, MAGIC=cfg.magic,
            EVICT=cfg.evict_first, PREFETCH=cfg.prefetch and not (bits == 4 and bkb > G // 2),
            ACC_W=bkb // (G // 2) if bits == 4 and bkb > G // 2 else bkb,
            HALF=half, ASM=half and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        _qgemm_kernel[grid](
            x, qweight, scales, y, ws, ws.view(torch.int32) if split > 1 else ws, cnt, M, N, K, KB, kb_per_split, x.stride(0), qweight.stride(0), y.stride(0),
            BITS=bits, GROUP=G, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_KB=bkb,
            SPLIT=split, FP32=x.dtype == torch.float32, MAGIC=cfg.magic, SWAP=cfg.swap, EVICT=cfg.evict_first,
            PREFETCH=cfg.prefetch, ASM=use_asm, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y


def tma_applies(x: Tensor, qweight: Tensor, bits: int, group_size: int | None) -> bool:
    """Whether :class:`QuantConfig` ``tma`` can take these operands: Triton's host tensor
    descriptors, 1..64 rows of fp16 / bf16 activations, both operands' base addresses and row
    strides 16-byte aligned (a TMA requirement), unit column stride; int4 groups of >= 32 (a
    descriptor box of at least 16 bytes)."""
    M = x.shape[0]
    return (_TensorDescriptor is not None and 1 <= M <= 64 and x.dtype in (torch.float16, torch.bfloat16)
            and (bits == 8 or (group_size or 0) >= 32)
            and x.stride(1) == 1 and qweight.stride(1) == 1
            and all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x, qweight)))


@dataclass(frozen=True)
class TmaShape:
    """How :func:`_launch_tma` cuts one call (shared with the bench's offline compile check)."""

    bm: int  # activation rows per tile (M rounded up to a power of two, >= 16)
    box: int  # descriptor box width in bytes of the weight (int8: = step; int4: one group, G/2)
    split: int  # K chunks (programs along K)
    kb_per_split: int  # weight bytes per chunk, whole K steps

    @property
    def fixed(self) -> bool:
        """int8: the compile-time K-step count of :func:`_q8_tma_kernel` (``FIXED``), where it measured faster."""
        return self.split > 1 or self.bm <= 32


def tma_shape(M: int, KB: int, bits: int, G: int, cfg: QuantConfig) -> TmaShape:
    """The launch shape of a ``QuantConfig(tma=True)`` call with ``M`` rows and ``KB`` weight bytes per row."""
    if bits == 8:
        step, box = cfg.block_k, cfg.block_k  # bytes = elements per K step; descriptor box width
    else:
        if cfg.block_k % G:
            raise ValueError(f"int4 QuantConfig(tma=True) needs block_k a multiple of group_size {G}, got {cfg.block_k}")
        step, box = cfg.block_k // 2, G // 2  # bytes per K step (whole groups); one group per descriptor load
    split = min(max(1, cfg.split_k), triton.cdiv(KB, step))
    kb_per_split = triton.cdiv(triton.cdiv(KB, split), step) * step  # whole steps per chunk
    return TmaShape(bm=max(16, triton.next_power_of_2(M)), box=box, split=triton.cdiv(KB, kb_per_split),
                    kb_per_split=kb_per_split)


def _launch_tma(x: Tensor, qweight: Tensor, scales: Tensor, bits: int, K: int, G: int, cfg: QuantConfig) -> Tensor:
    """One tensor-descriptor launch; the operands passed :func:`tma_applies` (checked by ``_launch``)."""
    from specdec.kernels.skinny import workspace

    M, (N, KB) = x.shape[0], qweight.shape
    sh = tma_shape(M, KB, bits, G, cfg)
    tiles = triton.cdiv(N, cfg.block_n)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    ws, cnt = workspace(x.device, tiles, cfg.block_n * sh.bm, sh.split) if sh.split > 1 else (y, y)
    x_desc = _TensorDescriptor.from_tensor(x, [sh.bm, sh.box])
    w_desc = _TensorDescriptor.from_tensor(qweight, [cfg.block_n, sh.box])
    if bits == 8:
        _q8_tma_kernel[(tiles, sh.split)](
            x_desc, w_desc, scales, y, ws, cnt, M, N, K, y.stride(0),
            BLOCK_M=sh.bm, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=sh.split, STAGES=cfg.num_stages,
            SWAP=cfg.swap, KPS=sh.kb_per_split, FIXED=sh.fixed, num_warps=cfg.num_warps,
        )
    else:
        use_asm = cfg.asm and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
        _q4_tma_kernel[(tiles, sh.split)](
            x_desc, w_desc, scales, y, ws, cnt, M, N, KB, sh.kb_per_split, y.stride(0),
            GROUP=G, GROUPS=cfg.block_k // G, BLOCK_M=sh.bm, BLOCK_N=cfg.block_n, SPLIT=sh.split,
            STAGES=cfg.num_stages, ASM=use_asm, BF16=x.dtype == torch.bfloat16, SWAP=cfg.swap,
            num_warps=cfg.num_warps,
        )
    return y


def _launch_q4_skinny(x: Tensor, packed: Tensor, scales: Tensor, K: int, G: int, cfg: QuantConfig) -> Tensor:
    from specdec.kernels.skinny import workspace

    M, (N, KB) = x.shape[0], packed.shape
    hg = G // 2
    split = min(max(1, cfg.split_k), KB // hg)
    kb_per_split = triton.cdiv(triton.cdiv(KB, split), hg) * hg  # whole groups per chunk
    split = triton.cdiv(KB, kb_per_split)
    bm = max(16, triton.next_power_of_2(M))
    tiles = triton.cdiv(N, cfg.block_n)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    ws, cnt = workspace(x.device, tiles, cfg.block_n * bm, split) if split > 1 else (y, y)
    use_asm = cfg.asm and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    _q4_skinny_kernel[(tiles, split)](
        x, packed, scales, y, ws, cnt, M, N, K, KB, kb_per_split, x.stride(0), packed.stride(0), y.stride(0),
        GROUP=G, BLOCK_M=bm, BLOCK_N=cfg.block_n, SPLIT=split, ASM=use_asm, BF16=x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def w8a16_matmul(x: Tensor, q: Tensor, s: Tensor, config: QuantConfig | None = None) -> Tensor:
    """Triton W8A16: ``x[M, K] @ (q[N, K] * s[N, None]).T -> y[M, N]`` in x's dtype."""
    if q.dtype != torch.int8 or q.dim() != 2 or s.shape != (q.shape[0],):
        raise ValueError("w8a16_matmul expects q[N, K] int8 and s[N]")
    if config is not None and (config.block_k < 16 or config.block_k & (config.block_k - 1)):
        raise ValueError("int8 block_k must be a power of two >= 16")
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
