"""Programmatic dependent launch (PDL, sm90+) for the kernels of a captured step.

A kernel launched with PDL may start while the kernel before it on the stream is still running:
its programs get resident, may load what does not depend on that kernel (a GEMV's weights), and
call ``gdc_wait`` (``griddepcontrol.wait``) before touching anything the previous kernel may write
or read. Every kernel launched this way here waits before its first access to a step buffer, so
each completes only after its predecessor and the chain stays in stream order. What it saves is the
launch latency and the ramp-up between the small kernels of a one-token step and the GEMVs around
them (H200: Llama-3-8B AR 4.308 -> 4.142 ms, a SmolLM2-shaped fp32 model 0.857 -> 0.653 ms,
``notes/issue6.md``, eleventh session). CUDA programming guide, "Programmatic Dependent Launch and
Synchronization".

On by default with ``generate(compile=True)`` (Inductor) on sm90+: the CUDA-graph runner captures
every step inside :func:`on`, and its compiled code has Inductor's own ``triton.enable_pdl`` (with
every Inductor kernel waiting first). Thirteenth session, H200: 8B verify(16) 4.73-4.76 ->
4.62-4.64 ms, SmolLM2-shaped fp32 verify(16) 1.48 -> 1.32 ms, on top of the one-token step's gain.
``compile={"pdl": "one_token"}``: the one-token step only; ``{"pdl": False}``: off
(:func:`specdec.cuda_graph.pdl_mode`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

__all__ = ["enabled", "launch", "on"]

_ON = 0  # depth of ``on()`` contexts
_FAILED: set = set()  # devices where a programmatic dependent launch failed: plain launches there


@contextlib.contextmanager
def on():
    """Launch the specdec kernels with PDL inside this context (e.g. while capturing a step)."""
    global _ON
    _ON += 1
    try:
        yield
    finally:
        _ON -= 1


def enabled(device: torch.device) -> bool:
    """Launch with PDL on ``device``? (sm90+, inside :func:`on`, no earlier failure.)"""
    return (_ON > 0 and device.type == "cuda" and device.index not in _FAILED
            and torch.cuda.get_device_capability(device)[0] >= 9)


def launch(call: Callable[[bool], None], device: torch.device) -> None:
    """``call(pdl)``: with PDL where :func:`enabled`, else (or when the driver refuses the launch
    attribute outside a capture) without. ``call(True)`` must make the kernel ``gdc_wait`` before
    its first access to a buffer another kernel of the step writes or reads."""
    if enabled(device):
        try:
            call(True)
            return
        except Exception as e:
            from triton.runtime.errors import OutOfResources

            if isinstance(e, OutOfResources) or torch.cuda.is_current_stream_capturing():
                raise  # (a launch shape too big for this GPU: the caller's fallback, with or without PDL)
            _FAILED.add(device.index)
    call(False)
