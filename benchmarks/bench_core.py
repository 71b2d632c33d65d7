"""Core-engine benchmark (issue #2): SmolLM2-135M on MT-bench first turns.

Side by side, on the same prompts: HF ``generate`` (greedy AR), specdec AR (``drafter=None``),
``DraftModel(self)`` (the target drafting for itself: tau is maximal, cost is not), and ``Replay``
of the target's own continuation at two corruption rates (free drafts: shows what the engine's
verify path costs at a given tau). Prints a markdown table; writes JSON to ``results/``.

    python -m benchmarks.bench_core --limit 5 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import specdec
from drafters import DraftModel, Replay
from experiments.prompts import chat_ids, load_prompts


def hf_timed(model, ids, n):
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, top_k=None, top_p=None, temperature=None)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, **kw)
    total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    return out, (total - ttft) / max(new - 1, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="results/bench_core.json")
    args = ap.parse_args(argv)

    model, tok = specdec.load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    prompts = [torch.tensor([chat_ids(tok, r.turns[:1])], device=args.device) for r in load_prompts("mtbench", limit=args.limit)]
    # warm-up (allocator, kernels)
    specdec.generate(model, prompts[0], max_new_tokens=8)
    hf_timed(model, prompts[0], 8)

    names = ["HF generate AR", "specdec AR", "DraftModel(self) chain d=4", "Replay 10% corruption", "Replay 40% corruption"]
    rows = {n: {"tpot": [], "tau": [], "equal": 0} for n in names}
    for ids in tqdm(prompts, desc="prompts"):
        ref, tpot = hf_timed(model, ids, args.max_new_tokens)
        rows[names[0]]["tpot"].append(tpot)
        rows[names[0]]["tau"].append(1.0)
        rows[names[0]]["equal"] += 1
        cont = ref[0, ids.shape[1] :].tolist()
        drafters = [None, DraftModel(model, depth=4), Replay(cont, 0.1, seed=1), Replay(cont, 0.4, seed=2)]
        for name, d in zip(names[1:], drafters):
            out = specdec.generate(model, ids, drafter=d, max_new_tokens=args.max_new_tokens, budget=args.budget)
            rows[name]["tpot"].append(out.stats.tpot_s)
            rows[name]["tau"].append(out.stats.tau)
            rows[name]["equal"] += int(out.sequences.tolist() == ref.tolist())

    base = statistics.mean(rows[names[0]]["tpot"])
    ar = statistics.mean(rows[names[1]]["tpot"])
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.model} {args.dtype} on {dev}; MT-bench first turns x{len(prompts)}, {args.max_new_tokens} new tokens, budget {args.budget}\n")
    print("| method | TPOT (ms) | tau | speedup vs HF AR | speedup vs specdec AR | greedy-equal |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for n in names:
        t = statistics.mean(rows[n]["tpot"])
        tau = statistics.mean(rows[n]["tau"])
        summary[n] = {"tpot_ms": t * 1e3, "tau": tau, "speedup_vs_hf": base / t, "speedup_vs_ar": ar / t,
                      "equal": f"{rows[n]['equal']}/{len(prompts)}"}
        print(f"| {n} | {t * 1e3:.2f} | {tau:.2f} | {base / t:.2f}x | {ar / t:.2f}x | {rows[n]['equal']}/{len(prompts)} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": dev, "args": vars(args), "results": summary}, indent=2))


if __name__ == "__main__":
    main()
