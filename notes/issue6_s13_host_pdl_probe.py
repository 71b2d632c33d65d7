"""Does a CUDA graph of PDL-launched kernels slow the host thread while it runs?

A chain of small Triton kernels captured in one graph, launched with or without PDL; while it
runs, the host times a fixed pure-Python loop; the same loop is timed again after a sync.
"""
import json
import os
import statistics as st
import threading
import time

import torch
import triton
import triton.language as tl

from benchmarks.bench_gpu import python_loop_s


@triton.jit
def kern(X, Y, n, ITERS: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n)
    for _ in range(ITERS):
        x = x * 1.0001 + 0.5
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(Y + offs, x, mask=offs < n)


busy = python_loop_s  # (as run: the same loop, defined here)


dev = torch.device("cuda")
n = 132 * 1024
X = torch.randn(n, device=dev)
Y = torch.empty_like(X)
RES = {}
for kernels, iters in ((300, 400), (300, 50)):
    for mode in ("plain", "pdl", "half"):
        def chain():
            a, b = X, Y
            for i in range(kernels):
                pdl = mode == "pdl" or (mode == "half" and i % 2 == 0)
                kern[(132,)](a, b, n, ITERS=iters, PDL=pdl, BLOCK=1024, **(dict(launch_pdl=True) if pdl else {}))
                a, b = b, a
        chain()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain()
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        launch, during, after, gpu = [], [], [], []
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(40):
            e0.record()
            t0 = time.perf_counter()
            g.replay()
            t1 = time.perf_counter()
            e1.record()
            during.append(busy())
            torch.cuda.synchronize()
            after.append(busy())
            launch.append(t1 - t0)
            gpu.append(e0.elapsed_time(e1) / 1e3)
        r = {k: st.median(v) * 1e6 for k, v in dict(launch=launch, during=during, after=after, gpu=gpu).items()}
        RES[f"{kernels}x{iters}:{mode}"] = r
        print(kernels, iters, mode, json.dumps({k: round(v, 1) for k, v in r.items()}), flush=True)
json.dump(RES, open(os.path.join(os.environ.get("OUT", "/tmp"), "s13_hostpdl.json"), "w"), indent=1)
print("threads:", [t.name for t in threading.enumerate()])
