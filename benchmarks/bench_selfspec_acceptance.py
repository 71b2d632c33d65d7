"""Acceptance of the self-speculative drafters on SmolLM2-135M (CPU is fine).

    python -m benchmarks.bench_selfspec_acceptance            # MT-bench, HumanEval, GSM8K
    python -m benchmarks.bench_selfspec_acceptance --limit 3 --max-new-tokens 96 --exit-layers 6,12,18,24 --bits 8,4

Per dataset: plain AR decoding (reference output and target step time), then early exit at each
k (chain, fixed depth) and the int8 / int4 quantized copies (same depth). Every drafted run is
checked token for token against the AR output. Prints alpha per depth and tau as a markdown table
and writes JSON to ``results/`` (git-ignored). Reuses :mod:`benchmarks.tune_selfspec`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.tune_selfspec import (
    _csv,
    add_machine_args,
    load_prompt_ids,
    machine,
    markdown_table,
    run_ar,
    run_config,
    setup_target,
)

DATASETS = ("mtbench", "humaneval", "gsm8k")


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--limit", type=int, default=3, help="prompts per dataset")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--exit-layers", default="6,12,18,24")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    add_machine_args(p)
    p.add_argument("--out", default="results/bench_selfspec_acceptance.json")
    args = p.parse_args(argv)
    from tqdm import tqdm

    loaded = setup_target(args, _csv(args.datasets, str))
    if loaded is None:
        return []
    model, tok = loaded
    specs = [dict(kind="early_exit", exit_layer=k, depth=args.depth) for k in _csv(args.exit_layers, int)]
    specs += [dict(kind="quantized", bits=b, group_size=args.group_size, depth=args.depth) for b in _csv(args.bits, int)]
    datasets = _csv(args.datasets, str)
    prompts = {d: load_prompt_ids(tok, d, args.limit, ids_file=args.prompt_ids) for d in datasets}
    bar = tqdm(total=sum(len(v) for v in prompts.values()) * (len(specs) + 1), desc="selfspec acceptance", unit="run")
    results, ar = [], {}
    t0 = time.perf_counter()
    for d in datasets:
        reference, t_target, ar_tps = run_ar(model, prompts[d], args.max_new_tokens, bar)
        ar[d] = {"t_target_step_ms": t_target * 1e3, "tokens_per_s": ar_tps}
        for spec in specs:
            bar.set_postfix_str(f"{d}: {spec}")
            results.append(run_config(model, prompts[d], spec, dataset=d, max_new_tokens=args.max_new_tokens,
                                      budget=args.depth, reference=reference, t_target=t_target, ar_tps=ar_tps,
                                      progress=bar))
    bar.close()
    wall = time.perf_counter() - t0
    print(f"\n{args.model}, greedy fp32, {args.limit} prompts/dataset x {args.max_new_tokens} new tokens, chain depth "
          f"{args.depth}; machine: {machine(args.device)}; wall {wall:.0f} s\n")
    print(markdown_table(results, depths=args.depth))
    for d, v in ar.items():
        print(f"AR {d}: {v['t_target_step_ms']:.1f} ms/token, {v['tokens_per_s']:.1f} tok/s")
    for r in results:
        if "memory" in r.extra and r.dataset == datasets[0]:
            print(f"{r.name}: {r.extra['memory']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "machine": machine(args.device), "wall_s": wall, "ar": ar,
                               "results": [asdict(r) for r in results]}, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
