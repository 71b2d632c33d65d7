"""Last-dim argmax of logits: ``torch.argmax(x, -1)`` vs :func:`specdec.kernels.argmax.fast_argmax` (GPU).

Why: an H200 profile of a captured Llama-3-8B decode step showed ``logits.argmax(-1)`` over one
row of 128,256 bf16 logits taking 30 us (see the module docstring of ``specdec/kernels/argmax.py``).

For each shape and dtype:
  1. correctness: the dispatcher (``fast_argmax``) and the forced kernel (``argmax_lastdim``) equal
     ``torch.argmax`` on random logits, on logits with many exact ties (few distinct values) and
     with NaNs planted (first NaN wins);
  2. timing: a CUDA graph of ``--calls`` back-to-back calls on the same logits, replayed; the time
     per call from CUDA events, median over replays (launch gaps of a captured step included, host
     overhead not). ``kernel`` is the Triton path forced even where the dispatcher would not take
     it (shapes with more rows than ``MAX_ROWS`` go to torch): it shows where the threshold should sit.
The markdown table is printed last.

Usage: python benchmarks/bench_argmax.py [--calls 50] [--reps 30]
       python benchmarks/bench_argmax.py --smoke   # CPU, tiny shapes under TRITON_INTERPRET=1; times mean nothing
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported: @triton.jit reads it at decoration
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from specdec.kernels import argmax as am

V_LLAMA3 = 128_256
SHAPES = [((1, 1, V_LLAMA3), torch.bfloat16), ((1, 2, V_LLAMA3), torch.bfloat16),
          ((1, 16, V_LLAMA3), torch.bfloat16), ((1, 64, V_LLAMA3), torch.bfloat16),
          ((1, 1, V_LLAMA3), torch.float32), ((1, 2, V_LLAMA3), torch.float32),
          ((1, 16, V_LLAMA3), torch.float32), ((1, 64, V_LLAMA3), torch.float32),
          ((1, 1, 49_152), torch.float32)]
SMOKE_SHAPES = [((1, 1, 5003), torch.float32), ((1, 2, 5003), torch.float16), ((1, 17, 4096), torch.float32),
                ((1, 1, 4000), torch.float32)]
DEV = "cuda"


def inputs(shape, dtype, gen) -> dict[str, torch.Tensor]:
    """Random logits, a few distinct values (exact ties everywhere) and random logits with NaNs."""
    x = (torch.randn(shape, device=DEV, generator=gen) * 3).to(dtype)
    ties = torch.randint(-2, 3, shape, device=DEV, generator=gen).to(dtype)
    nan = x.clone()
    V = shape[-1]
    nan.view(-1, V)[::2, V // 3] = float("nan")  # every other row, then an earlier NaN in every third
    nan.view(-1, V)[::3, V // 5] = float("nan")
    return {"random": x, "ties": ties, "nan": nan}


def graph_us(fn, x: torch.Tensor, calls: int, reps: int) -> float:
    """Median us of one call of ``fn(x)`` inside a CUDA graph of ``calls`` back-to-back calls."""
    if DEV != "cuda":  # --smoke: host timer of one eager call
        t = time.perf_counter()
        fn(x)
        return (time.perf_counter() - t) * 1e6
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile, warm the allocator before capture
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn(x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    from specdec.gemm_pick import replay_us

    us = replay_us(g, calls, reps)  # median over ``reps`` replays, µs per call
    del g
    return us


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=50, help="back-to-back calls per captured graph")
    ap.add_argument("--reps", type=int, default=30, help="graph replays (median)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run under TRITON_INTERPRET=1 (tiny shapes)")
    args = ap.parse_args()
    global DEV
    shapes = SHAPES
    if args.smoke:
        DEV, shapes = "cpu", SMOKE_SHAPES
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)")
        return 2
    import triton

    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        print(f"device {p.name}, {p.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    print(f"dispatcher: Triton path for CUDA fp32/fp16/bf16 with rows <= {am.MAX_ROWS} and V >= {am.MIN_COLS}")

    def fast(t):
        return am.fast_argmax(t, allow_interpreter=True)

    def forced(t):
        return am.argmax_lastdim(t)

    gen = torch.Generator(device=DEV).manual_seed(0)
    all_ok = True
    lines = ["| shape | dtype | chunks/row | path | torch us | fast_argmax us | kernel us | speedup | correct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape, dtype in shapes:
        xs = inputs(shape, dtype, gen)
        ok = True
        for kind, x in xs.items():
            ref = torch.argmax(x, -1)
            for name, fn in (("fast_argmax", fast), ("kernel", forced)):
                y = fn(x)
                same = y.dtype == ref.dtype and y.shape == ref.shape and torch.equal(y, ref)
                if not same:
                    ok = False
                    print(f"FAIL {name} {list(shape)} {dtype} {kind}: {y.flatten()[:8].tolist()} vs torch "
                          f"{ref.flatten()[:8].tolist()}")
        all_ok &= ok
        x = xs["random"]
        t_torch = graph_us(lambda t: torch.argmax(t, -1), x, args.calls, args.reps)
        t_fast = graph_us(fast, x, args.calls, args.reps)
        t_kernel = graph_us(forced, x, args.calls, args.reps)
        path = "triton" if am.argmax_applies(x, allow_interpreter=True) else "torch"
        chunks = am._launch_shape(shape[-1])[2]
        dt = str(dtype).removeprefix("torch.")
        lines.append(f"| {list(shape)} | {dt} | {chunks} | {path} | {t_torch:.2f} | {t_fast:.2f} | {t_kernel:.2f} | "
                     f"{t_torch / t_fast:.2f} | {'yes' if ok else 'NO'} |")
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    print(f"\ncorrectness (random, ties, NaN; dispatcher and forced kernel vs torch.argmax): {'PASS' if all_ok else 'FAIL'}"
          + ("; --smoke: CPU interpreter, times are host times of one eager call" if args.smoke else
             f"; CUDA graph of {args.calls} calls, median of {args.reps} replays"))
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
