"""Per-shape GEMM formulations side by side (GPU machine): what ``specdec.gemm_pick`` measures.

For the linear shapes of a model config (SmolLM2-135M-shaped fp32, Llama-3-8B-shaped bf16) and a
list of row counts M, times every formulation with the picker's own method (CUDA graphs of
back-to-back calls over weight copies that together exceed L2, median of 5 replays) and prints µs
per call, the chosen formulation, and the speedup of the pick over ``F.linear``.

usage: python -m benchmarks.bench_gemm_pick [--models smol,8b] [--ms 1,2,4,8,16,32,64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

SHAPES = {  # name -> (dtype, [(label, N, K)])
    "smol": (torch.float32, [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536),
                             ("lm_head", 49152, 576)]),
    "8b": (torch.bfloat16, [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096),
                            ("down", 4096, 14336), ("lm_head", 128256, 4096)]),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smol,8b")
    ap.add_argument("--ms", default="1,2,4,8,16,32,64")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results/gemm_pick")))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gemm_pick times CUDA kernels: run it on a GPU machine")
    from specdec.gemm_pick import FORMULATIONS, GemmPicker

    torch.backends.cuda.matmul.allow_tf32 = False
    ms = [int(m) for m in args.ms.split(",")]
    picker = GemmPicker()
    rows, md = [], ["| model | layer | N x K | M | " + " | ".join(FORMULATIONS) + " | pick | F.linear / pick |",
                    "|---|---|---|---|" + "---|" * len(FORMULATIONS) + "---|---|"]
    for model in args.models.split(","):
        dtype, shapes = SHAPES[model]
        for label, N, K in shapes:
            w = torch.randn(N, K, device="cuda", dtype=dtype)
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                f = picker.formulation(x, w, None)
                t = picker.timings[next(k for k in picker.timings if k[2:5] == (M, N, K) and k[1] == str(dtype)[6:])]
                cells = " | ".join("—" if v == float("inf") else f"{v:.2f}" for v in t)
                gain = t[0] / t[f]
                md.append(f"| {model} | {label} | {N} x {K} | {M} | {cells} | {FORMULATIONS[f]} | {gain:.2f}x |")
                rows.append(dict(model=model, layer=label, N=N, K=K, M=M, us=list(t), pick=FORMULATIONS[f]))
                print(md[-1], flush=True)
            del w
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gemm_pick.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(0), rows=rows),
                                                              indent=1, default=str))
    (args.out / "bench_gemm_pick.md").write_text(f"# GEMM formulations, {torch.cuda.get_device_name(0)} (µs per call)\n\n"
                                                 + "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
