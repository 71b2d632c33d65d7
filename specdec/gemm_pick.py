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
           bf16 / fp16, and fp32 in 3xTF32; tensor cores, no separate split-K reduce launch)

All accumulate in fp32 and differ only in summation order, as cuBLAS's kernels already do from one
``M`` to the next, so greedy equality with autoregressive decoding is unaffected (tested). fp32
inputs: cuBLAS and the GEMV multiply in IEEE fp32 (TF32 follows ``torch.backends.cuda.matmul
.allow_tf32`` as usual); the skinny GEMM's fp32 launch shapes use 3xTF32 products, whose error was
measured at or below cuBLAS fp32's (:mod:`specdec.kernels.skinny`; ``skinny.FP32_TF32X3 = False``
leaves fp32 to cuBLAS).

How it is wired: :class:`GemmPicker.mode` is a ``TorchFunctionMode`` that the CUDA-graph runner
holds around the target's forward. It sends every CUDA ``F.linear`` of a float dtype to the custom
op ``specdec::linear``, which dynamo treats as opaque, so the same path works under
``torch.compile``. The op looks up the shape's formulation; a shape seen for the first time is
timed right there (the runner's warm-up runs before capture) over enough weight copies that the
timed calls read their weights from HBM, as a model's layers do; a shape first met while a graph is
being captured uses formulation 0.

Linears of one input (q/k/v, gate/up) can run as ONE launch: under ``torch.compile`` the
Inductor pass :data:`GROUP_PASS` (:func:`group_linears`) replaces ``specdec::linear`` calls that
share their input by one ``specdec::linear_group`` call, and the picker times, per group shape, the
separate calls (each with its own formulation) against the grouped GEMV / skinny launches
(:func:`specdec.kernels.gemv.gemv_group`), keeping the faster.

A SwiGLU MLP at one row, ``silu(gate(h)) * up(h)``, can run as one GEMV launch that stores only the
product (:func:`specdec.kernels.gemv.gemv_swiglu`): the same pass (:func:`fuse_swiglu`, before the
grouping) replaces the pattern by ``specdec::linear_swiglu``, and the picker times that launch
against the gate/up linears' own best (grouped or not) plus the product's launch
(:meth:`GemmPicker.swiglu_formulation`).
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import statistics
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["GemmPicker", "FORMULATIONS", "GEMV_FORMULATIONS", "SKINNY_FORMULATIONS", "ENABLED", "linear_as", "applies", "shared_picker", "default_picker",
           "SEPARATE", "group_applies", "linear_group_as", "group_linears", "GROUP_PASS", "linear_swiglu_as",
           "fuse_swiglu", "LinearPass"]

ENABLED = True  # process-wide default of ``CUDAGraphRunner(pick_gemm=None)`` (benchmarks' A/B switch)
_N_CUBLAS = 3  # formulations 0-2; then one GEMV per launch shape, then one skinny GEMM per launch shape


def _gemv_configs() -> tuple[dict, ...]:
    try:
        from .kernels.gemv import GEMV_CONFIGS
    except ImportError:  # no Triton: cuBLAS formulations only
        return ()
    return GEMV_CONFIGS


def _fp32_tf32x3() -> bool:
    try:
        from .kernels import skinny
    except ImportError:
        return False
    return skinny.FP32_TF32X3


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
    ("skinny-tf32x3 " if c.get("F32") else "skinny ") + "{BLOCK_N}x{BLOCK_K}/{num_stages}s/k{SPLIT_K}".format(**c)
    for c in _skinny_configs())
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

    return skinny_applies(x, weight, _skinny_configs()[formulation - _N_CUBLAS - _N_GEMV])


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


SEPARATE = -1  # a group's formulation: its linears one by one, each with its own formulation


def group_applies(formulation: int, x: Tensor, weights: list[Tensor]) -> bool:
    """Can ``formulation`` compute the linears ``weights`` of ``x`` in one launch? (GEMV and skinny
    formulations; the weights need one dtype, ``K`` and row stride; cuBLAS has no grouped call.)"""
    if formulation == SEPARATE:
        return True
    if formulation < _N_CUBLAS or not 1 <= len(weights) <= _max_group():
        return False
    w0 = weights[0]
    return all(w.dtype == w0.dtype and w.shape[1] == w0.shape[1] and w.stride(0) == w0.stride(0)
               and applies(formulation, x, w) for w in weights)


def _max_group() -> int:
    try:
        from .kernels.gemv import MAX_GROUP
    except ImportError:
        return 0
    return MAX_GROUP


def linear_group_as(x: Tensor, weights: list[Tensor], biases: list[Tensor | None], formulation: int,
                    picker: "GemmPicker | None" = None) -> list[Tensor]:
    """``[x @ w.T + b ...]`` with ``formulation``: :data:`SEPARATE` (each linear with its own
    formulation from ``picker``, else ``F.linear``), or one grouped GEMV / skinny launch."""
    if formulation == SEPARATE:
        return [linear_as(x, w, b, picker.formulation(x, w, b) if picker is not None else 0)
                for w, b in zip(weights, biases)]
    if formulation >= _N_CUBLAS + _N_GEMV:
        from .kernels.skinny import skinny_group

        return skinny_group(x, weights, biases, _skinny_configs()[formulation - _N_CUBLAS - _N_GEMV])
    if formulation >= _N_CUBLAS:
        from .kernels.gemv import gemv_group

        return gemv_group(x, weights, biases, _gemv_configs()[formulation - _N_CUBLAS])
    raise ValueError(f"formulation {FORMULATIONS[formulation]!r} has no grouped call")


def silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """``silu(g) * u`` rounded as the eager model rounds it (the SiLU, then the product): one Triton
    launch where Triton runs (as Inductor would fuse it), else the two eager ops."""
    if g.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from .kernels.gemv import silu_mul as kernel
        except ImportError:  # no Triton
            pass
        else:
            return kernel(g, u)
    return F.silu(g) * u


def linear_swiglu_as(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
                     formulation: int, picker: "GemmPicker | None" = None) -> Tensor:
    """``silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)``: a GEMV formulation as one launch that
    stores only the product (:func:`specdec.kernels.gemv.gemv_swiglu`); :data:`SEPARATE`: the two
    linears as ``picker`` runs them (grouped or not; else ``F.linear``), then the product."""
    if formulation in GEMV_FORMULATIONS:
        from .kernels.gemv import gemv_swiglu

        return gemv_swiglu(x, w_gate, w_up, b_gate, b_up, _gemv_configs()[formulation - _N_CUBLAS])
    if formulation != SEPARATE:
        raise ValueError(f"formulation {FORMULATIONS[formulation]!r} has no SwiGLU launch")
    ws, bs = [w_gate, w_up], [b_gate, b_up]
    g, u = linear_group_as(x, ws, bs, picker.group_formulation(x, ws, bs) if picker is not None else SEPARATE, picker)
    return silu_mul(g, u)


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
    median of ``trials`` replays. Groups of linears of one input (``N`` a tuple) are timed the same
    way, grouped launches against the sum of their linears' own best times.

    Args:
        device_types: devices whose float linears the mode re-routes (CUDA; tests add ``"cpu"``).
        timer: ``timer(x [M, K], weight, bias) -> µs per formulation``; default: CUDA-graph timing.
        group_timer: ``group_timer(x [M, K], weights, biases) -> µs per formulation`` of a grouped
            launch (formulations without a grouped call are ignored); default: CUDA-graph timing.
        swiglu_timer: ``swiglu_timer(x [M, K], w_gate, w_up, b_gate, b_up) -> (µs per formulation of
            the one-launch SwiGLU (GEMVs only), µs of the separate SiLU-product launch)``; default:
            CUDA-graph timing, or with a ``timer`` given, never the one launch.
    """

    def __init__(self, reps: int = 16, trials: int = 5, device_types: tuple[str, ...] = ("cuda",), timer=None,
                 group_timer=None, swiglu_timer=None):
        self.reps, self.trials = reps, trials
        self.device_types = tuple(device_types)
        self._timer = timer or self._time
        self._group_timer = group_timer or self._time_group
        # (a given ``timer`` without a ``swiglu_timer``: the one launch never applies)
        self._swiglu_timer = swiglu_timer or (self._time_swiglu if timer is None else
                                              lambda x, *w: ((float("inf"),) * len(FORMULATIONS), 0.0))
        self.choice: dict[tuple, int] = {}  # shape key -> formulation index (groups: or SEPARATE)
        self.timings: dict[tuple, tuple[float, ...]] = {}  # shape key -> µs per call, per formulation
        self.separate_us: dict[tuple, float] = {}  # group key -> µs of its linears one by one

    @staticmethod
    def _key(x: Tensor, n, bias: bool) -> tuple:
        K = x.shape[-1]
        dt = str(x.dtype).removeprefix("torch.")
        if x.dtype == torch.float32 and not _fp32_tf32x3():
            dt += "/ieee"  # 3xTF32 switched off: its own table (choices made with it on may not apply)
        return (x.device.index, dt, x.numel() // max(K, 1), n, K, bias)

    def formulation(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> int:
        key = self._key(x, weight.shape[0], bias is not None)
        f = self.choice.get(key)
        if f is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():  # cannot time inside a capture
                return 0
            M, K = key[2], key[4]
            t = tuple(self._timer(x.reshape(M, K), weight, bias))
            t = tuple(ti if applies(i, x, weight) else float("inf") for i, ti in enumerate(t))
            self.timings[key] = t
            f = min(range(len(t)), key=t.__getitem__)
            if t[f] > _MIN_GAIN * t[0]:
                f = 0
            self.choice[key] = f
        return f

    def group_formulation(self, x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> int:
        """:data:`SEPARATE` or the grouped formulation for the linears ``weights`` of ``x``."""
        key = self._key(x, tuple(w.shape[0] for w in weights), biases[0] is not None)
        f = self.choice.get(key)
        if f is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return SEPARATE
            sep = 0.0
            for w, b in zip(weights, biases):
                fi = self.formulation(x, w, b)
                sep += self.timings.get(self._key(x, w.shape[0], b is not None), (0.0,) * (fi + 1))[fi]
            M, K = key[2], key[4]
            t = tuple(self._group_timer(x.reshape(M, K), weights, biases))
            t = tuple(ti if i >= _N_CUBLAS and group_applies(i, x, weights) else float("inf") for i, ti in enumerate(t))
            self.timings[key], self.separate_us[key] = t, sep
            best = min(range(len(t)), key=t.__getitem__)
            f = best if t[best] < _MIN_GAIN * sep else SEPARATE
            self.choice[key] = f
        return f

    def swiglu_formulation(self, x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None,
                           b_up: Tensor | None) -> int:
        """:data:`SEPARATE` or the GEMV launch computing ``silu(gate(x)) * up(x)`` at once (one row),
        timed against the gate/up linears' own best (grouped or not) plus the product's launch."""
        key = self._key(x, ("swiglu", w_gate.shape[0]), b_gate is not None)
        f = self.choice.get(key)
        if f is None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return SEPARATE
            ws, bs = [w_gate, w_up], [b_gate, b_up]
            fg = self.group_formulation(x, ws, bs)  # (times the pair grouped and one by one)
            gkey = self._key(x, (w_gate.shape[0], w_up.shape[0]), b_gate is not None)
            sep = self.separate_us[gkey] if fg == SEPARATE else self.timings[gkey][fg]
            M, K = key[2], key[4]
            t, t_prod = self._swiglu_timer(x.reshape(M, K), w_gate, w_up, b_gate, b_up)
            t = tuple(ti if i in GEMV_FORMULATIONS and M == 1 and applies(i, x, w_gate) else float("inf")
                      for i, ti in enumerate(t))
            self.timings[key], self.separate_us[key] = t, sep + t_prod
            best = min(range(len(t)), key=t.__getitem__)
            f = best if t[best] < _MIN_GAIN * (sep + t_prod) else SEPARATE
            self.choice[key] = f
        return f

    def _time_swiglu(self, x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None,
                     b_up: Tensor | None) -> tuple[tuple[float, ...], float]:
        ok = [f in GEMV_FORMULATIONS and applies(f, x, w_gate) for f in range(len(FORMULATIONS))]
        out_bytes = x.shape[0] * w_gate.shape[0] * x.element_size()
        fused = self._time_calls([w_gate, w_up], out_bytes, ok,
                                 lambda f, ws: linear_swiglu_as(x, ws[0], ws[1], b_gate, b_up, f))
        g = x.new_empty(x.shape[0], w_gate.shape[0]).normal_()
        prod = self._time_calls([g], out_bytes, [True] + [False] * (len(FORMULATIONS) - 1),
                                lambda f, gs: silu_mul(gs[0], g))[0]
        return fused, prod

    def _time(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[float, ...]:
        ok = [applies(f, x, weight) for f in range(len(FORMULATIONS))]
        return self._time_calls([weight], x.shape[0] * weight.shape[0] * x.element_size(), ok,
                                lambda f, ws: linear_as(x, ws[0], bias, f))

    def _time_group(self, x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> tuple[float, ...]:
        ok = [f >= _N_CUBLAS and group_applies(f, x, weights) for f in range(len(FORMULATIONS))]
        n = sum(w.shape[0] for w in weights)
        return self._time_calls(weights, x.shape[0] * n * x.element_size(), ok,
                                lambda f, ws: linear_group_as(x, ws, biases, f))

    def _time_calls(self, weights: list[Tensor], out_bytes: int, ok: list[bool], call) -> tuple[float, ...]:
        """µs per ``call(f, weights)`` for each formulation ``f`` with ``ok[f]`` (others: inf)."""
        dev = weights[0].device
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
        n_copies = max(1, min(16, math.ceil(2 * l2 / nbytes)))
        copies = [list(weights)] + [[w.clone() for w in weights] for _ in range(n_copies - 1)]
        reps = max(4, min(self.reps, (64 << 20) // max(out_bytes, 1)))  # outputs held: <= 64 MB or 4 calls
        out = []
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for f in range(len(FORMULATIONS)):
                if not ok[f]:
                    out.append(float("inf"))
                    continue
                try:
                    for ws in copies[:2]:
                        call(f, ws)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):  # (each call's output stays allocated in the graph's pool)
                        for i in range(reps):
                            call(f, copies[i % len(copies)])
                    out.append(replay_us(g, reps, self.trials))
                    del g
                except Exception:  # a formulation this build cannot run or capture: never picked
                    out.append(float("inf"))
        torch.cuda.current_stream(dev).wait_stream(stream)
        del copies
        return tuple(out)

    def summary(self) -> dict[str, dict]:
        """``{"dtype MxNxK[+bias]": {"pick": name, "us": {name: µs}}}`` of every shape timed so far
        (groups: ``N`` as ``N1+N2+...``, with a ``"separate"`` time)."""
        out = {}
        for key, t in self.timings.items():
            _, dt, M, N, K, b = key
            f = self.choice[key]
            us = {FORMULATIONS[i]: round(x, 2) for i, x in enumerate(t) if x != float("inf")}
            if isinstance(N, tuple) and N[0] == "swiglu":
                us["separate"] = round(self.separate_us[key], 2)
                N = f"swiglu({N[1]}+{N[1]})"
            elif isinstance(N, tuple):
                us["separate"] = round(self.separate_us[key], 2)
                N = "+".join(map(str, N))
            out[f"{dt} {M}x{N}x{K}{'+bias' if b else ''}"] = dict(
                pick="separate" if f == SEPARATE else FORMULATIONS[f], us=us)
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


@torch.library.custom_op("specdec::linear_group", mutates_args=())
def _linear_group_op(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], picker: int) -> list[Tensor]:
    with torch._C.DisableTorchFunction():
        p = _PICKERS[picker]
        return linear_group_as(x, weights, biases, p.group_formulation(x, weights, biases), p)


@_linear_group_op.register_fake
def _(x, weights, biases, picker):
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]


@torch.library.custom_op("specdec::linear_swiglu", mutates_args=())
def _linear_swiglu_op(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
                      picker: int) -> Tensor:
    with torch._C.DisableTorchFunction():
        p = _PICKERS[picker]
        return linear_swiglu_as(x, w_gate, w_up, b_gate, b_up, p.swiglu_formulation(x, w_gate, w_up, b_gate, b_up), p)


@_linear_swiglu_op.register_fake
def _(x, w_gate, w_up, b_gate, b_up, picker):
    return x.new_empty(*x.shape[:-1], w_gate.shape[0])


def group_linears(graph: torch.fx.Graph) -> int:
    """Replace ``specdec::linear`` calls that share their input (and picker, and whether they have a
    bias) by ``specdec::linear_group`` calls of up to ``MAX_GROUP`` linears each, in graph order.
    Returns the number of groups made. Used as an Inductor post-grad pass (:data:`GROUP_PASS`)."""
    linear = torch.ops.specdec.linear.default
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_input: dict[tuple, list] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is linear:
            x, w, b, picker = _op_args(node, ("x", "weight", "bias", "picker"))
            by_input.setdefault((x, picker, b is None), []).append((node, w, b))
    made, cap = 0, _max_group()
    for (x, picker, _), calls in by_input.items():
        for i in range(0, len(calls), cap or 1):
            chunk = calls[i:i + cap]
            first = chunk[0][0]
            # every weight / bias must exist before the first call: inputs do; constants (get_attr,
            # Inductor's freezing places them at their use) are moved up; computed ones: no group
            late = [a for _, w, b in chunk for a in (w, b) if isinstance(a, torch.fx.Node) and order[a] > order[first]]
            if len(chunk) < 2 or any(a.op != "get_attr" for a in late):
                continue
            for a in late:
                first.prepend(a)
            with graph.inserting_before(first):
                group = graph.call_function(torch.ops.specdec.linear_group.default,
                                            (x, [w for _, w, _ in chunk], [b for _, _, b in chunk], picker))
                group.meta["val"] = [n.meta.get("val") for n, _, _ in chunk]
                for j, (node, _, _) in enumerate(chunk):
                    item = graph.call_function(operator.getitem, (group, j))
                    item.meta.update(node.meta)
                    node.replace_all_uses_with(item)
            for node, _, _ in chunk:
                graph.erase_node(node)
            made += 1
    return made


def _silu_input(node) -> "tuple[torch.fx.Node, set] | None":
    """``(g, nodes)`` if ``node`` computes ``silu(g)`` in ``g``'s dtype (as ``aten.silu``, or
    decomposed: ``g / (1 + exp(-g))`` or ``g * sigmoid(g)``, optionally in fp32 between two dtype
    casts) with the nodes in ``nodes`` (``node`` included), else None."""
    aten, prims = torch.ops.aten, torch.ops.prims
    cast = prims.convert_element_type.default

    def val(n):
        return n.meta.get("val") if isinstance(n, torch.fx.Node) else None

    def is_op(n, *targets):
        return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets

    out = node
    nodes = {node}
    if is_op(out, cast):
        out = out.args[0]
    if is_op(out, aten.silu.default):
        c = out.args[0]
    elif is_op(out, aten.div.Tensor) and is_op(out.args[1], aten.add.Tensor):
        c, add = out.args
        e = next((a for a in add.args if is_op(a, aten.exp.default)), None)
        one = next((a for a in add.args if a is not e), None)
        if e is None or one != 1 or not is_op(e.args[0], aten.neg.default) or e.args[0].args[0] is not c:
            return None
        nodes |= {add, e, e.args[0]}
    elif is_op(out, aten.mul.Tensor) and any(is_op(a, aten.sigmoid.default) for a in out.args):
        s = next(a for a in out.args if is_op(a, aten.sigmoid.default))
        c = next((a for a in out.args if a is not s), None)
        if s.args[0] is not c:
            return None
        nodes.add(s)
    else:
        return None
    nodes.add(out)
    g = c.args[0] if is_op(c, cast) else c
    if c is not g:
        nodes.add(c)
    vg, vn = val(g), val(node)
    if vg is None or vn is None or vg.dtype != vn.dtype or vg.shape != vn.shape:
        return None  # (the SiLU's output must come back in g's own dtype, as F.silu(g) returns it)
    if any(set(n.users) - nodes for n in nodes - {node}):
        return None  # an intermediate is used elsewhere
    return g, nodes


def fuse_swiglu(graph: torch.fx.Graph) -> int:
    """Replace a one-row SwiGLU, ``silu(linear(x, Wg, bg)) * linear(x, Wu, bu)`` (both linears
    ``specdec::linear`` of one input, used only there), by ``specdec::linear_swiglu(x, Wg, Wu, bg,
    bu)``; returns how many. Run before :func:`group_linears`. Trees (several rows) keep the grouped
    linears and Inductor's product kernel (the one launch is a GEMV: one row)."""
    linear, mul = torch.ops.specdec.linear.default, torch.ops.aten.mul.Tensor
    made = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not mul or len(node.args) != 2:
            continue
        for s, u in (node.args, node.args[::-1]):
            g, chain = _silu_input(s) or (None, set())
            if (isinstance(g, torch.fx.Node) and isinstance(u, torch.fx.Node) and g.target is linear
                    and u.target is linear and g is not u and len(u.users) == 1 and set(g.users) <= chain
                    and len(s.users) == 1):
                gx, wg, bg, pg = _op_args(g, ("x", "weight", "bias", "picker"))
                ux, wu, bu, pu = _op_args(u, ("x", "weight", "bias", "picker"))
                vg, vu, vm = g.meta.get("val"), u.meta.get("val"), node.meta.get("val")
                if (gx is ux and pg == pu and (bg is None) == (bu is None) and vg is not None and vu is not None
                        and vm is not None and vg.shape == vu.shape == vm.shape and vg.dtype == vu.dtype == vm.dtype
                        and vm.numel() == vm.shape[-1]):
                    break
        else:
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(torch.ops.specdec.linear_swiglu.default, (gx, wg, wu, bg, bu, pg))
        fused.meta.update({k: v for k, v in node.meta.items() if k != "eager_input_vals"})  # (the mul's args)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)
        todo, gone = [s, u], set()  # the SiLU chain and the two linears, now unused
        while todo:
            n = todo.pop()
            if n is not gx and n not in gone and not n.users and n.op == "call_function":
                todo += n.all_input_nodes
                graph.erase_node(n)
                gone.add(n)
        made += 1
    return made


def _op_args(node: torch.fx.Node, names: tuple[str, ...]) -> list:
    args = list(node.args)
    return args + [node.kwargs.get(n) for n in names[len(args):]]


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # an Inductor without custom pass hashing: a plain callable (disables its FX cache)
    CustomGraphPass, get_hash_for_files = object, None


class LinearPass(CustomGraphPass):
    """:func:`fuse_swiglu` and / or :func:`group_linears` as an Inductor ``post_grad_custom_pre_pass``
    (hashable for its cache)."""

    def __init__(self, group: bool = True, swiglu: bool = True):
        self.group, self.swiglu = group, swiglu

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.swiglu:
            fuse_swiglu(graph)
        if self.group:
            group_linears(graph)

    def uuid(self):
        h = get_hash_for_files((os.path.abspath(__file__),)) if get_hash_for_files else None
        return None if h is None else (h, self.group, self.swiglu)


GROUP_PASS = LinearPass()
