"""Per-shape GEMM formulation for the target's linears in captured steps, measured once on the device.

Why: cuBLAS's heuristics pick poor kernels for some shapes with few rows. On an H200
(``notes/issue6.md``, fifth session): SmolLM2's fp32 k/v projection (192 x 576) took 54 µs at
M = 8 and 16 rows against 3.4 µs at M = 1 and 7.5 µs with cuBLASLt (over 60 such calls that was
half of a 16-node verify step); Llama-3-8B's bf16 GEMVs stream at 1.2-3.8 TB/s where a plain
Triton GEMV reaches 2.1-4.0 TB/s. No single formulation wins every shape (cuBLASLt is 1.3-2.2x
slower than cuBLAS on other cells), so each ``(dtype, M, N, K)`` is timed once, on the device,
with each formulation that applies, and the fastest is used from then on:

    0      ``F.linear``                   (PyTorch's own choice; the default)
    1      ``(W @ x.T).T`` made contiguous (cuBLAS sees the transposed problem)
    2      ``F.linear`` with cuBLASLt preferred (``torch.backends.cuda.preferred_blas_library``)
    3, …   the Triton GEMV of :mod:`specdec.kernels.gemv`, one launch shape each (one row only)
    …      the Triton skinny GEMM of :mod:`specdec.kernels.skinny`, one launch shape each (2-64 rows,
           bf16 / fp16; tensor cores, no separate split-K reduce launch)

All accumulate in fp32 (IEEE for fp32 inputs; TF32 follows ``torch.backends.cuda.matmul
.allow_tf32`` as usual) and differ only in summation order, as cuBLAS's kernels already do from one
``M`` to the next, so greedy equality with autoregressive decoding is unaffected (tested).

How it is wired: :class:`GemmPicker.mode` is a ``TorchFunctionMode`` that the CUDA-graph runner
holds around the target's forward. It sends every CUDA ``F.linear`` of a float dtype to the custom
op ``specdec::linear``, which dynamo treats as opaque, so the same path works under
``torch.compile``. The op looks up the shape's formulation; a shape seen for the first time is
timed right there (the runner's warm-up runs before capture) over enough weight copies that the
timed calls read their weights from HBM, as a model's layers do; a shape first met while a graph is
being captured uses formulation 0.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["GemmPicker", "FORMULATIONS", "GEMV_FORMULATIONS", "SKINNY_FORMULATIONS", "ENABLED", "linear_as", "applies", "shared_picker", "default_picker"]

ENABLED = True  # process-wide default of ``CUDAGraphRunner(pick_gemm=None)`` (benchmarks' A/B switch)
_N_CUBLAS = 3  # formulations 0-2; then one GEMV per launch shape, then one skinny GEMM per launch shape


def _gemv_configs() -> tuple[dict, ...]:
    try:
        from .kernels.gemv import GEMV_CONFIGS
    except ImportError:  # no Triton: cuBLAS formulations only
        return ()
    return GEMV_CONFIGS


def _skinny_configs() -> tuple[dict, ...]:
    try:
        from .kernels.skinny import SKINNY_CONFIGS
    except ImportError:
        return ()
    return SKINNY_CONFIGS


_N_GEMV = len(_gemv_configs())
GEMV_FORMULATIONS = range(_N_CUBLAS, _N_CUBLAS + _N_GEMV)  # indices of the GEMV launch shapes
SKINNY_FORMULATIONS = range(_N_CUBLAS + _N_GEMV, _N_CUBLAS + _N_GEMV + len(_skinny_configs()))
FORMULATIONS = ("linear", "transposed", "cublaslt") + tuple(
    "gemv {BLOCK_N}x{BLOCK_K}/{num_warps}w".format(**c) for c in _gemv_configs()) + tuple(
    "skinny {BLOCK_N}x{BLOCK_K}/{num_stages}s/k{SPLIT_K}".format(**c) for c in _skinny_configs())
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_GAIN = 0.97  # switch away from ``F.linear`` only when another formulation takes < 97 % of its time


def applies(formulation: int, x: Tensor, weight: Tensor) -> bool:
    """Can ``formulation`` compute this linear? (The GEMV: one row; the skinny GEMM: 2-64 rows of
    bf16 / fp16; both: contiguous weight rows and a device Triton runs on.)"""
    if formulation < _N_CUBLAS:
        return True
    if not (weight.stride(1) == 1 and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    if formulation < _N_CUBLAS + _N_GEMV:
        return x.numel() == x.shape[-1]
    from .kernels.skinny import skinny_applies

    return skinny_applies(x, weight)


def linear_as(x: Tensor, weight: Tensor, bias: Tensor | None, formulation: int) -> Tensor:
    """``x @ weight.T + bias`` computed with formulation ``formulation`` (see the module docstring)."""
    if formulation >= _N_CUBLAS + _N_GEMV:
        from .kernels.skinny import skinny_linear

        return skinny_linear(x, weight, bias, _skinny_configs()[formulation - _N_CUBLAS - _N_GEMV])
    if formulation >= _N_CUBLAS:
        from .kernels.gemv import gemv

        return gemv(x, weight, bias, _gemv_configs()[formulation - _N_CUBLAS])
    if formulation == 1:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K]
        y = torch.mm(weight, x2.t()).t().contiguous()  # [M, N]
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    if formulation == 2 and x.is_cuda:  # (on CPU there is no cuBLASLt: plain F.linear)
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            return F.linear(x, weight, bias)
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
    return F.linear(x, weight, bias)


def replay_us(graph: "torch.cuda.CUDAGraph", calls: int, trials: int = 5) -> float:
    """µs per call of a captured graph of ``calls`` calls: median over ``trials`` replays."""
    ts = []
    for _ in range(trials):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(ts)


class GemmPicker:
    """Fastest formulation per ``(device, dtype, M, N, K, bias)``, timed on first use: CUDA graphs of
    ``reps`` back-to-back calls rotating over copies of the weight (together >= 2x L2, at most 16),
    median of ``trials`` replays.

    Args:
        device_types: devices whose float linears the mode re-routes (CUDA; tests add ``"cpu"``).
        timer: ``timer(x [M, K], weight, bias) -> µs per formulation``; default: CUDA-graph timing.
    """

    def __init__(self, reps: int = 16, trials: int = 5, device_types: tuple[str, ...] = ("cuda",), timer=None):
        self.reps, self.trials = reps, trials
        self.device_types = tuple(device_types)
        self._timer = timer or self._time
        self.choice: dict[tuple, int] = {}  # shape key -> formulation index
        self.timings: dict[tuple, tuple[float, ...]] = {}  # shape key -> µs per call, per formulation

    def formulation(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> int:
        M, K = x.numel() // max(x.shape[-1], 1), x.shape[-1]
        key = (x.device.index, str(x.dtype).removeprefix("torch."), M, weight.shape[0], K, bias is not None)
        f = self.choice.get(key)
        if f is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():  # cannot time inside a capture
                return 0
            t = tuple(self._timer(x.reshape(M, K), weight, bias))
            t = tuple(ti if applies(i, x, weight) else float("inf") for i, ti in enumerate(t))
            self.timings[key] = t
            f = min(range(len(t)), key=t.__getitem__)
            if t[f] > _MIN_GAIN * t[0]:
                f = 0
            self.choice[key] = f
        return f

    def _time(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[float, ...]:
        dev = x.device
        nbytes = weight.numel() * weight.element_size()
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
        copies = [weight] + [weight.clone() for _ in range(max(0, min(15, math.ceil(2 * l2 / nbytes) - 1)))]
        out_bytes = x.shape[0] * weight.shape[0] * x.element_size()
        reps = max(4, min(self.reps, (64 << 20) // max(out_bytes, 1)))  # outputs held: <= 64 MB or 4 calls
        out = []
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for f in range(len(FORMULATIONS)):
                if not applies(f, x, weight):
                    out.append(float("inf"))
                    continue
                try:
                    for w in copies[:2]:
                        linear_as(x, w, bias, f)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):  # (each call's output stays allocated in the graph's pool)
                        for i in range(reps):
                            linear_as(x, copies[i % len(copies)], bias, f)
                    out.append(replay_us(g, reps, self.trials))
                    del g
                except Exception:  # a formulation this build cannot run or capture: never picked
                    out.append(float("inf"))
        torch.cuda.current_stream(dev).wait_stream(stream)
        del copies
        return tuple(out)

    def summary(self) -> dict[str, dict]:
        """``{"dtype MxNxK[+bias]": {"pick": name, "us": {name: µs}}}`` of every shape timed so far."""
        out = {}
        for key, t in self.timings.items():
            _, dt, M, N, K, b = key
            out[f"{dt} {M}x{N}x{K}{'+bias' if b else ''}"] = dict(
                pick=FORMULATIONS[self.choice[key]],
                us={FORMULATIONS[i]: round(x, 2) for i, x in enumerate(t) if x != float("inf")})
        return out

    def mode(self) -> contextlib.AbstractContextManager:
        """Context in which CUDA ``F.linear`` calls (fp32 / bf16 / fp16) go through ``specdec::linear``."""
        return _LinearMode(self)


_PICKERS: list[GemmPicker] = []  # the op refers to pickers by index (custom ops take no objects)
_SHARED: GemmPicker | None = None


def shared_picker() -> GemmPicker:
    """The process-wide picker the CUDA-graph runners use (a shape is timed once per device)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = GemmPicker()
    return _SHARED


def default_picker() -> GemmPicker | None:
    """What captured steps use when not told otherwise: :func:`shared_picker`, or ``None`` while
    :data:`ENABLED` is False."""
    return shared_picker() if ENABLED else None


class _LinearMode(TorchFunctionMode):
    def __init__(self, picker: GemmPicker):
        super().__init__()
        if not any(p is picker for p in _PICKERS):
            _PICKERS.append(picker)
        self.index = next(i for i, p in enumerate(_PICKERS) if p is picker)
        self.device_types = picker.device_types

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is torch._C._nn.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.device.type in self.device_types and x.dtype in _DTYPES and weight.dtype == x.dtype:
                return torch.ops.specdec.linear(x, weight, bias, self.index)
        return func(*args, **kwargs)


@torch.library.custom_op("specdec::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, picker: int) -> Tensor:
    with torch._C.DisableTorchFunction():  # the mode, if still on the stack, must not re-route these
        f = _PICKERS[picker].formulation(x, weight, bias)
        return linear_as(x, weight, bias, f)


@_linear_op.register_fake
def _(x, weight, bias, picker):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
