"""Launch-shape sweep of the Triton skinny GEMM (``specdec.kernels.skinny``) against cuBLAS (GPU).

For Llama-3-8B's bf16 linear shapes and M = 2..64 rows, times every launch shape of a grid
(weight rows per program, K step, pipeline stages, split-K) with the picker's method: a CUDA graph
of back-to-back calls over weight copies that together exceed 2x L2, median of 5 replays. Each
config is checked against ``F.linear`` before it is timed. Prints, per shape and M, cuBLAS /
cuBLASLt and the five fastest configs; ``SKINNY_CONFIGS`` was chosen from this table
(``notes/issue6_h200_s6_skinny_probe2.txt``).

``--fp32``: SmolLM2-135M's fp32 shapes instead (q+k+v, gate+up as grouped launches), the 3xTF32
launch shapes (``F32``) against cuBLAS / transposed / cuBLASLt, with each one's largest error
against the fp64 product next to cuBLAS's (the fp32 ``SKINNY_CONFIGS`` came from this sweep).

usage: python -m benchmarks.tune_skinny [--ms 2,4,8,16,32,64] [--budget-s 470] [--out DIR] [--fp32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.gemm_pick import linear_as, replay_us

SHAPES = {"k/v": (1024, 4096), "q/o": (4096, 4096), "gate/up": (14336, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}  # name -> (N, K)


def graph_time_us(fn, w, reps: int = 16, trials: int = 5) -> float:
    """µs per ``fn(weight_copy)``: a graph of ``reps`` calls rotating over copies of ``w`` (>= 2x L2)."""
    l2 = torch.cuda.get_device_properties(w.device).L2_cache_size
    nbytes = w.numel() * w.element_size()
    copies = [w] + [w.clone() for _ in range(max(0, min(15, math.ceil(2 * l2 / nbytes) - 1)))]
    for c in copies[:2]:
        fn(c)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(copies[i % len(copies)])
    return replay_us(g, reps, trials)


SMOLLM2_FP32 = {"q+k+v": [(576, 576), (192, 576), (192, 576)], "o": [(576, 576)], "gate+up": [(1536, 576)] * 2,
                "down": [(576, 1536)], "head": [(49152, 576)]}  # name -> [(N, K)] of one launch


def sweep_fp32(ms: list[int], budget_s: float) -> dict:
    """The fp32 (3xTF32) grid at SmolLM2-135M's shapes; error relative to the output's largest value."""
    from specdec.kernels.skinny import skinny_group

    torch.backends.cuda.matmul.allow_tf32 = False
    t0, res, dev = time.time(), {}, torch.device("cuda")
    cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=ns, SPLIT_K=sk, F32=True)
            for bn, bk, ns, sk in itertools.product((16, 32, 64), (32, 64), (2, 3), (1, 2, 4))]
    torch.manual_seed(0)
    for name, shapes in SMOLLM2_FP32.items():
        ws = [torch.randn(n, k, device=dev) / math.sqrt(k) for n, k in shapes]
        flat = torch.cat([w.reshape(-1) for w in ws])  # one tensor to copy: graph_time_us rotates copies of it
        views = lambda c: [t.view(n, k) for t, (n, k) in zip(c.split([n * k for n, k in shapes]), shapes)]
        for M in ms:
            if time.time() - t0 > budget_s:
                return res
            x = torch.randn(M, shapes[0][1], device=dev)
            refs = [x.double() @ w.double().T for w in ws]
            scale = max(r.abs().max().item() for r in refs)
            err = lambda outs: max((o.double() - r).abs().max().item() for o, r in zip(outs, refs)) / scale
            row = {"err linear": err([F.linear(x, w) for w in ws])}
            for f, name_f in enumerate(("linear", "transposed", "cublaslt")):  # the picker's cuBLAS formulations
                row[name_f] = graph_time_us(lambda c: [linear_as(x, w, None, f) for w in views(c)], flat)
            for cfg in cfgs:
                key = "{BLOCK_N}x{BLOCK_K}/{num_stages}s/k{SPLIT_K}".format(**cfg)
                try:
                    row["err " + key] = err(skinny_group(x, ws, None, cfg))
                    row[key] = graph_time_us(lambda c: skinny_group(x, views(c), None, cfg), flat)
                except Exception as e:
                    row[key] = f"ERR {type(e).__name__}"
            res[f"{name} M={M}"] = row
            cub = min(row["linear"], row["transposed"], row["cublaslt"])
            num = sorted(((k, v) for k, v in row.items() if isinstance(v, float) and "x" in k and not k.startswith("err")),
                         key=lambda kv: kv[1])
            print(f"{name:8s} M={M:3d} cuBLAS best {cub:7.2f} us (err {row['err linear']:.1e}) | 3xTF32 best "
                  + ", ".join(f"{k} {v:.2f} ({cub / v:.2f}x, err {row['err ' + k]:.1e})" for k, v in num[:3])
                  + f"  [{time.time() - t0:.0f}s]", flush=True)
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="2,4,8,16,32,64")
    ap.add_argument("--budget-s", type=float, default=470.0, help="stop sweeping after this many seconds")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results/tune_skinny")))
    ap.add_argument("--fp32", action="store_true", help="SmolLM2-135M fp32 shapes, 3xTF32 launch shapes")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_skinny times CUDA kernels: run it on a GPU machine")
    if args.fp32:
        res = sweep_fp32([int(m) for m in args.ms.split(",")], args.budget_s)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tune_skinny_fp32.json").write_text(json.dumps(res, indent=1))
        return
    from specdec.kernels.skinny import skinny_linear

    t0 = time.time()
    cfgs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=ns, SPLIT_K=sk)
            for bn, bk, ns, sk in itertools.product((16, 32, 64), (128, 256), (3, 4, 5), (1, 2, 4, 8))]
    res = {}
    torch.manual_seed(0)
    dev = torch.device("cuda")
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / 64
        for M in [int(m) for m in args.ms.split(",")]:
            if time.time() - t0 > args.budget_s:
                break
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, w).float()
            row = {"linear": graph_time_us(lambda c: F.linear(x, c), w)}
            prev = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library("cublaslt")
            row["cublaslt"] = graph_time_us(lambda c: F.linear(x, c), w)
            torch.backends.cuda.preferred_blas_library(prev)
            for cfg in cfgs:
                if name == "lm_head" and (cfg["BLOCK_N"] < 64 or cfg["SPLIT_K"] > 1):
                    continue  # 2000+ tiles: no split needed
                key = "{BLOCK_N}x{BLOCK_K}/{num_stages}s/k{SPLIT_K}".format(**cfg)
                try:
                    if not torch.allclose(skinny_linear(x, w, None, cfg).float(), ref, atol=2e-2, rtol=2e-2):
                        row[key] = "WRONG"
                        continue
                    row[key] = graph_time_us(lambda c: skinny_linear(x, c, None, cfg), w)
                except Exception as e:  # e.g. OutOfResources (shared memory) for the largest tiles
                    row[key] = f"ERR {type(e).__name__}"
            res[f"{name} M={M}"] = row
            num = sorted(((k, v) for k, v in row.items() if isinstance(v, float) and k not in ("linear", "cublaslt")),
                         key=lambda kv: kv[1])
            wrong = [k for k, v in row.items() if v == "WRONG"]
            print(f"{name:8s} M={M:3d} linear {row['linear']:7.2f} lt {row['cublaslt']:7.2f} | best "
                  + ", ".join(f"{k} {v:.2f}" for k, v in num[:5]) + (f" | WRONG: {wrong}" if wrong else "")
                  + f"  [{time.time() - t0:.0f}s]", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune_skinny.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
