"""Per-shape GEMM formulation for fp32 linears in captured tree steps, measured once on the device.

Why: cuBLAS's heuristics pick poor kernels for some fp32 shapes with a few rows. On an H200
(``notes/issue6.md``, "fp32 linears with a few rows"), SmolLM2's k/v projection (192 x 576) took
54 µs at M = 8 and 16 rows against 3.4 µs at M = 1 and 7.5 µs with cuBLASLt; over 60 such calls
that was half of a 16-node verify step. No single formulation wins every shape (cuBLASLt is 1.3-2.2x
slower than cuBLAS on other cells), so each ``(M, N, K)`` is timed once, on the device, with each
formulation, and the fastest is used from then on:

    0  ``F.linear``                   (PyTorch's own choice; the default)
    1  ``(W @ x.T).T`` made contiguous (cuBLAS sees the transposed problem)
    2  ``F.linear`` with cuBLASLt preferred (``torch.backends.cuda.preferred_blas_library``)

All three are IEEE fp32 GEMMs (TF32 follows ``torch.backends.cuda.matmul.allow_tf32`` as usual);
they differ only in summation order, as cuBLAS's kernels already do from one ``M`` to the next, so
greedy equality with autoregressive decoding is unaffected (tested).

How it is wired: :class:`GemmPicker.mode` is a ``TorchFunctionMode`` that the CUDA-graph runner
holds around the target's forward of tree buckets (never the one-token step). It sends every CUDA
fp32 ``F.linear`` to the custom op ``specdec::linear``, which dynamo treats as opaque, so the same
path works under ``torch.compile``. The op looks up the shape's formulation; a shape seen for the
first time is timed right there (the runner's warm-up runs before capture), and a shape first met
while a graph is being captured uses formulation 0.
"""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["GemmPicker", "FORMULATIONS", "linear_as", "shared_picker"]

FORMULATIONS = ("linear", "transposed", "cublaslt")
_MIN_GAIN = 0.9  # switch away from ``F.linear`` only when another formulation takes < 90 % of its time


def linear_as(x: Tensor, weight: Tensor, bias: Tensor | None, formulation: int) -> Tensor:
    """``x @ weight.T + bias`` computed with formulation ``formulation`` (see the module docstring)."""
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


class GemmPicker:
    """Fastest formulation per ``(device, M, N, K, bias)``, timed on first use (CUDA graphs of ``reps``
    back-to-back calls, median of ``trials`` replays).

    Args:
        device_types: devices whose fp32 linears the mode re-routes (CUDA; tests add ``"cpu"``).
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
        key = (x.device.index, M, weight.shape[0], K, bias is not None)
        f = self.choice.get(key)
        if f is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():  # cannot time inside a capture
                return 0
            self.timings[key] = t = tuple(self._timer(x.reshape(M, K), weight, bias))
            f = min(range(len(t)), key=t.__getitem__)
            if t[f] > _MIN_GAIN * t[0]:
                f = 0
            self.choice[key] = f
        return f

    def _time(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[float, ...]:
        out = []
        stream = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            for f in range(len(FORMULATIONS)):
                try:
                    for _ in range(2):
                        linear_as(x, weight, bias, f)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for _ in range(self.reps):
                            linear_as(x, weight, bias, f)
                    ts = []
                    for _ in range(self.trials):
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        g.replay()
                        e.record()
                        e.synchronize()
                        ts.append(s.elapsed_time(e) * 1e3 / self.reps)
                    out.append(statistics.median(ts))
                    del g
                except RuntimeError:  # a formulation this build cannot capture: never picked
                    out.append(float("inf"))
        torch.cuda.current_stream(x.device).wait_stream(stream)
        return tuple(out)

    def mode(self) -> contextlib.AbstractContextManager:
        """Context in which CUDA fp32 ``F.linear`` calls go through ``specdec::linear``."""
        return _LinearMode(self)


_PICKERS: list[GemmPicker] = []  # the op refers to pickers by index (custom ops take no objects)
_SHARED: GemmPicker | None = None


def shared_picker() -> GemmPicker:
    """The process-wide picker the CUDA-graph runners use (a shape is timed once per device)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = GemmPicker()
    return _SHARED



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
            if x.device.type in self.device_types and x.dtype == torch.float32 and weight.dtype == torch.float32:
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
