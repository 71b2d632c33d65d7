"""CUDA graphs for the model-based drafters' own forwards (DraftModel, QuantizedCopy, EarlyExit).

Why: a draft step of a model drafter is ``1 + (depth - 1)`` small model forwards plus the tree
growing around them (top-k, gathers, concatenations): at batch 1 on a small model every one of
those kernels costs more to launch from Python than to run. Recording the whole draft step once
and replaying it turns hundreds of launches into one (gpt-fast, https://github.com/pytorch-labs/gpt-fast:
static KV cache + ``torch.compile(mode="reduce-overhead")``; vLLM's ``CUDAGraphRunner``: one graph
per padded shape, inputs copied into static buffers). Same pattern as :mod:`specdec.cuda_graph`,
which captures the target's verify step.

What one graph holds (per *shape key*, e.g. ``(catch-up length n, budget)`` for a DraftModel)::

    static inputs  (copied in by the drafter before the replay; [3, B] int64 for a DraftModel)
    catch-up forward of the committed chain        # DraftModel only; one graph per chain length n
    level forwards 1 .. depth-1 + tree growing     # fixed level shapes (greedy, fixed depth)
    static outputs (tree tokens / parents [B, N])   # copied out inside the graph

Every forward inside sees a FIXED view of all ``cache.max_len`` slots (committed prefix + tree,
masked on the device from ``cache.lengths``; nothing past the tree is visible), so nothing in the
graph depends on a host-side length. A captured function must not read the device from the host
(no ``.item()``, ``.tolist()``, ``bool(tensor)``): greedy drafting with a fixed depth has none;
sampling (random draws from a caller's generator) and the confidence threshold (one host read per
level) run eagerly instead.

Lifetime: graphs are captured lazily (first time a shape key shows up), reused across steps and
``generate`` calls, and dropped when any tensor a graph reads or writes outside its inputs (the
draft cache, the token buffer, ...) is a different tensor than at capture time
(:meth:`DraftGraphs.bind`), e.g. when the draft cache is re-created.

Capture is side-effect free up to the ``restore`` callback: warm-up runs execute for real (Triton
JIT, allocator warm-up) and may advance ``cache.lengths``; the callback puts it back before the
capture and the real replay. K/V written to slots past the committed length are scratch that the
next forward overwrites (gpt-fast's no-rollback cache).

GEMMs: warm-up and capture run under the process-wide GEMM picker (:mod:`specdec.gemm_pick`), as
the target's verify step does: each linear shape of the draft forwards uses its fastest measured
formulation (e.g. the Triton GEMV for a chain's one-row levels).

Memory: each :class:`DraftGraphs` has its own graph memory pool; graph outputs are copied into
buffers allocated outside the capture, so no graph's pool memory is live between replays and the
graphs may share the pool in any replay order.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["DraftGraphs", "graph_mode", "round_up"]


def round_up(x: int, m: int = 512) -> int:
    return (int(x) + m - 1) // m * m


def graph_mode(cuda_graphs, device: torch.device) -> str:
    """``"capture"`` (CUDA graphs), ``"static"`` (the same fixed-view static-buffer path run
    eagerly: any device, for tests) or ``"eager"`` (the plain path), from the drafter option.

    ``None``: capture when ``device`` is CUDA, else eager. ``True``: capture (CUDA required).
    ``False``: eager. ``"static"``: static, never captured.
    """
    if cuda_graphs is False:
        return "eager"
    if cuda_graphs == "static":
        return "static"
    if cuda_graphs is None:
        return "capture" if device.type == "cuda" else "eager"
    if cuda_graphs is True:
        if device.type != "cuda":
            from specdec.generate import SpecDecInputError

            raise SpecDecInputError("drafter cuda_graphs=True needs the draft model on a CUDA device")
        return "capture"
    raise ValueError(f"cuda_graphs must be None, True, False or 'static', got {cuda_graphs!r}")


@dataclass
class _Entry:
    outs: tuple[Tensor, ...]  # static outputs (fixed addresses)
    graph: "torch.cuda.CUDAGraph | None" = None
    replays: int = 0


@dataclass
class DraftGraphStats:
    captures: dict = field(default_factory=dict)  # key -> capture seconds (warm-up included)
    replays: int = 0
    static_runs: int = 0  # runs of the static path without a graph (capture off or disabled)
    invalidations: int = 0


class DraftGraphs:
    """Lazily captured graphs of a drafter's static-shape draft steps, one per shape key.

    Args:
        capture: ``True`` records CUDA graphs; ``False`` runs the same functions eagerly (the
            "static" mode that CPU tests exercise).
        strict: a failed capture raises (``True``) or disables capturing with one warning and
            runs the static path eagerly from then on (``False``).
    """

    def __init__(self, capture: bool, strict: bool = False):
        self.capture = capture
        self.strict = strict
        self.disabled: str | None = None
        self._entries: dict[Hashable, _Entry] = {}
        self._bound: tuple | None = None
        self._pool = None
        self.stats = DraftGraphStats()

    def __len__(self) -> int:
        return len(self._entries)

    def invalidate(self) -> None:
        """Drop every graph and static output (e.g. the draft cache was re-created)."""
        if self._entries:
            self.stats.invalidations += 1
        self._entries.clear()
        self._bound = None

    @staticmethod
    def _sig(t: Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)

    def bind(self, tensors: Sequence[Tensor]) -> None:
        """Declare the persistent tensors the graphs read/write besides their inputs; graphs
        captured over other tensors (address, shape, strides, dtype) are dropped."""
        sig = tuple(self._sig(t) for t in tensors)
        if sig != self._bound:
            self.invalidate()
            self._bound = sig

    def will_capture(self, key: Hashable) -> bool:
        """Will the next :meth:`run` of ``key`` capture it (warm-up runs + ``restore`` calls)?"""
        e = self._entries.get(key)
        return self.capture and self.disabled is None and (e is None or e.graph is None)

    def run(self, key: Hashable, body: Callable[[], Sequence[Tensor]],
            restore: Callable[[], None] | None = None) -> tuple[Tensor, ...]:
        """Run ``body`` (all device work, static shapes for ``key``) and return its outputs.

        First call for ``key``: (capture mode) two warm-up runs on a side stream, each followed by
        ``restore()``, then the capture, then one replay; the outputs live in static buffers that
        every later replay of ``key`` overwrites (valid until the next :meth:`run` of that key).
        """
        e = self._entries.get(key)
        if e is not None and e.graph is not None:
            e.graph.replay()
            e.replays += 1
            self.stats.replays += 1
            return e.outs
        if not self.capture or self.disabled is not None:
            res = tuple(body())
            if e is None:
                e = self._entries[key] = _Entry(outs=tuple(torch.empty_like(r) for r in res))
            for o, r in zip(e.outs, res):
                o.copy_(r)
            self.stats.static_runs += 1
            return e.outs
        try:
            e = self._capture(key, body, restore)
        except Exception as ex:  # e.g. a host sync inside some model's forward
            if self.strict:
                raise
            self.disabled = f"{type(ex).__name__}: {ex}"
            warnings.warn(f"draft CUDA-graph capture failed, drafting eagerly: {self.disabled}", RuntimeWarning,
                          stacklevel=3)
            if restore is not None:
                restore()
            return self.run(key, body, restore)
        e.graph.replay()
        e.replays += 1
        self.stats.replays += 1
        return e.outs

    @torch.inference_mode()
    def _capture(self, key, body, restore) -> _Entry:
        from .gemm_pick import default_picker

        t0 = time.perf_counter()
        dev = torch.cuda.current_device()
        cur = torch.cuda.current_stream(dev)
        s = torch.cuda.Stream(dev)
        s.wait_stream(cur)
        picker = default_picker()
        picked = picker.mode if picker is not None else contextlib.nullcontext
        with torch.cuda.stream(s), picked():
            for _ in range(2):  # Triton JIT / autotune and allocator warm-up, outside the capture
                res = tuple(body())
                if restore is not None:
                    restore()
            like = [(r.shape, r.dtype) for r in res]
            del res
        cur.wait_stream(s)
        outs = tuple(torch.empty(shape, dtype=dt, device=dev) for shape, dt in like)  # on the current stream
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool), picked():
            res = tuple(body())
            for o, r in zip(outs, res):
                o.copy_(r)
            del res
        if restore is not None:
            restore()  # a capture records but does not run; restoring again is harmless
        e = self._entries[key] = _Entry(outs=outs, graph=g)
        torch.cuda.synchronize(dev)
        self.stats.captures[key] = time.perf_counter() - t0
        return e
