"""Inductor options of ``generate(compile=...)`` side by side (GPU machine, one invocation).

For a SmolLM2-135M-shaped fp32 model and a Llama-3-8B-shaped bf16 model (random weights, timing
only), each option set runs in its own subprocess (fresh dynamo / Inductor state):

* ``graphs``: ``compile=False`` (CUDA graphs only);
* ``default``: ``compile=True``;
* ``no-group``: ``compile={"group_linears": False}`` (q/k/v and gate/up as separate launches);
* ``forward-only``: ``compile={"compile_step": False}`` (the forward compiled alone, the step's
  acceptance / commit / append bookkeeping eager; ``default`` compiles the whole step);
* ``no-pick`` / ``graphs+no-pick``: the same with ``specdec.gemm_pick.ENABLED = False`` (every linear
  through ``F.linear``, as cuBLAS chooses);
* ``freeze``: ``compile={"freezing": True}`` (weights as constants; Inductor's freezing passes
  concatenate linears that share an input, e.g. an MLP's gate and up projections: extra memory);
* ``autotune``: ``compile={"max_autotune": True, ...}`` (Triton GEMM templates timed against cuBLAS);
* ``freeze+autotune``: both.
* ``no-pdl``: ``compile={"pdl": False}`` (no programmatic dependent launch; the default launches
  every kernel of every step with it on sm90+); ``pdl-one-token``: ``{"pdl": "one_token"}`` (the
  one-token step only);
* ``no-swiglu`` / ``no-pdl+no-swiglu``: ``{"fuse_swiglu": False}`` (the one-row SwiGLU MLP's gate/up
  GEMV stores both outputs and Inductor's kernel forms ``silu(g) * u``, instead of one launch).

Per variant: AR TPOT through ``generate`` (128 tokens; also with every step read back before the
next is queued, i.e. without the run-ahead of autoregressive steps), the verify graph's replay time per bucket
at a fixed committed length, peak memory, and, with ``--profile``, the kernel count and top kernels
of one replay. Greedy tokens are compared with the first variant's.

usage: python -m benchmarks.bench_compile_options [--models smol,8b] [--variants ...] [--profile 1,64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "graphs": False,  # CUDA graphs, no compile
    "graphs+no-pick": False,
    "default": True,
    "no-group": {"group_linears": False},
    "forward-only": {"compile_step": False},  # the forward compiled, the step's bookkeeping eager  # default without grouping the linears of one input
    "no-pick": True,  # default without specdec.gemm_pick (cuBLAS's own choice for every linear)
    "freeze": {"freezing": True},
    "autotune": {"max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    "freeze+autotune": {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "ATEN,TRITON"},
    "cdt": {"coordinate_descent_tuning": True},  # Inductor tunes its own pointwise / reduction launches
    "no-pdl": {"pdl": False},  # no programmatic dependent launch (default: every step, sm90+, specdec.kernels.pdl)
    "pdl-one-token": {"pdl": "one_token"},  # PDL in the one-token step only
    "no-swiglu": {"fuse_swiglu": False},  # the one-row MLP's gate/up GEMV and SiLU product as two launches
    "no-pdl+no-swiglu": {"pdl": False, "fuse_swiglu": False},
}
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def build(kind: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if kind == "smol":
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          tie_word_embeddings=True, rope_theta=100000.0)
        dtype = torch.float32
    else:
        from benchmarks.bench_gpu import llama3_8b_config

        cfg = llama3_8b_config()
        dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return model, cfg


def profile_bucket(runner, n: int, prefix: int) -> dict:
    """Kernels of one replay of the bucket-``n`` verify graph (CUPTI sees the graph's kernels)."""
    from torch.profiler import ProfilerActivity, profile

    b = runner._bucket(n, root_only=False)
    runner.set_active([False] * runner.batch_size)
    runner.cache.lengths.fill_(prefix)
    b.graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        b.graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", 0)
        if t > 0:
            rows.append((t, e.count, e.key[:90]))
    rows.sort(reverse=True)
    return {"kernels": sum(r[1] for r in rows), "sum_us": sum(r[0] for r in rows), "top": rows[:12]}


@torch.inference_mode()
def child(kind: str, variant: str, out: str, prof: tuple[int, ...]) -> None:
    import specdec
    from specdec import gemm_pick
    from specdec.cuda_graph import _RUNNERS

    compile = VARIANTS[variant]
    gemm_pick.ENABLED = not variant.endswith("no-pick")
    model, cfg = build(kind)
    T = 200 if kind == "smol" else 512
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).cuda()
    res = {"kind": kind, "variant": variant, "compile": compile, "device": torch.cuda.get_device_name(0)}
    t0 = time.perf_counter()
    specdec.generate(model, ids, max_new_tokens=8, compile=compile, eos_token_id=-1)  # compiles + captures
    res["first_call_s"] = time.perf_counter() - t0
    o = specdec.generate(model, ids, max_new_tokens=128, compile=compile, eos_token_id=-1)
    res["ar_tpot_ms"] = o.stats.tpot_s * 1e3
    res["tokens"] = [int(t) for t in o.new_tokens[0]]
    # the same with the host reading every step back before queueing the next one (an ``on_step``
    # callback turns the run-ahead of autoregressive steps off)
    o = specdec.generate(model, ids, max_new_tokens=128, compile=compile, eos_token_id=-1, on_step=lambda s, r: None)
    res["ar_tpot_sync_ms"] = o.stats.tpot_s * 1e3
    res["tokens_sync_equal"] = [int(t) for t in o.new_tokens[0]] == res["tokens"]
    runner = _RUNNERS[model]
    prefix = T + 56
    res["verify_prefix"] = prefix
    res["verify_ms"] = {n: runner.time_bucket(n, prefix, iters=50) * 1e3 for n in BUCKETS}
    res["v64_over_v1"] = res["verify_ms"][64] / res["verify_ms"][1]
    res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    for n in prof:
        res[f"profile_{n}"] = profile_bucket(runner, n, prefix)
    res["gemm_pick"] = gemm_pick.shared_picker().summary()
    Path(out).write_text(json.dumps(res, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smol,8b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile", default="", help="buckets whose replay is profiled, e.g. 1,64")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results/compile_options")))
    ap.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_compile_options needs a CUDA device (compile runs inside the CUDA-graph steps)")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    md = ["| model | variant | AR TPOT ms | " + " | ".join(f"verify({n}) ms" for n in BUCKETS)
          + " | verify(64)/verify(1) | peak GB | first call s | tokens = first variant's |",
          "|---|---|---|" + "---|" * len(BUCKETS) + "---|---|---|---|"]
    for kind in args.models.split(","):
        res = {}
        for v in variants:
            f = args.out / f"{kind}_{v.replace('+', '_')}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_compile_options", "--child", kind, v, str(f), args.profile]
            p = subprocess.run(cmd, timeout=args.timeout)
            if p.returncode != 0:
                print(f"{kind} {v}: failed (rc {p.returncode})", flush=True)
                continue
            r = res[v] = json.loads(f.read_text())
            vm = r["verify_ms"]
            same = r["tokens"] == next(iter(res.values()))["tokens"]  # the first variant's tokens
            print(f"{kind} {v:16s} AR {r['ar_tpot_ms']:.3f} ms (read back every step: {r.get('ar_tpot_sync_ms', 0):.3f}, "
                  f"same tokens: {r.get('tokens_sync_equal')}) | verify " + " ".join(f"{n}:{vm[str(n)]:.3f}" for n in BUCKETS)
                  + f" | 64/1 {r['v64_over_v1']:.3f} | peak {r['peak_mem_gb']:.1f} GB | tokens = first: {same}", flush=True)
            picks = {k: v["pick"] for k, v in r.get("gemm_pick", {}).items() if v["pick"] != "linear"}
            if picks:
                print(f"    GEMM picks other than F.linear: {picks}", flush=True)
            for n in [x for x in args.profile.split(",") if x]:
                pr = r[f"profile_{n}"]
                print(f"    N={n}: {pr['kernels']} kernels, {pr['sum_us']:.0f} us; top: "
                      + "; ".join(f"{k[:40]} x{c} {t:.0f}us" for t, c, k in pr["top"][:5]), flush=True)
            md.append(f"| {kind} | {v} | {r['ar_tpot_ms']:.3f} | " + " | ".join(f"{vm[str(n)]:.3f}" for n in BUCKETS)
                      + f" | {r['v64_over_v1']:.3f} | {r['peak_mem_gb']:.1f} | {r['first_call_s']:.0f} | {same} |")
    (args.out / "bench_compile_options.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], tuple(int(x) for x in sys.argv[5].split(",") if x))
    else:
        main()
