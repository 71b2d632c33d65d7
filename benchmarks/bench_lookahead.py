"""Lookahead drafters vs HF prompt lookup on real prompts (SmolLM2-135M-Instruct, greedy).

Two parts, runnable together (``all``) or apart (``run`` on a machine with the model, ``cache`` on
the CPU whose speed is being measured, reading the token streams ``run`` recorded):

run    MT-bench (both turns as one conversation: turn 1 is generated, then turn 1's answer and
       turn 2 form the next prompt), HumanEval and GSM8K: tau and alpha for
         raw         RawLookahead (per request),
         turbo_cold  TurboLookahead, a fresh cache per prompt set that learns as the set is served,
         turbo_warm  TurboLookahead whose cache first served a disjoint split of the set
                     (records ``offset = --prompts`` onward), then the evaluation prompts,
         hybrid      HybridLookahead on a copy of that warmed cache (copied through save/load),
         pld         transformers' prompt lookup (``prompt_lookup_num_tokens=10``): a forward
                     pre-hook counts target forwards and their input lengths; the first forward is
                     the prefill, each later one verifies ``input_len - 1`` candidates, so
                     tau = (new - 1) / verify forwards, alpha = (new - 1 - verify forwards) / drafted.
       tau = tokens committed per verify step (bonus included, first token excluded), as
       ``specdec.metrics``; alpha = accepted draft tokens / drafted tokens.
cache  Times the cache operations alone on the recorded streams: per verify step, one query at
       ``--timing-budget`` nodes + the update with that step's committed tokens (median, p90, in
       microseconds, wall clock and thread CPU time); then feeds a Turbo cache 10,000 requests of
       real token streams (perturbed so that n-grams keep being new) and records its largest node
       count after every update.

Results: a table on stdout and JSON under ``results/`` (git-ignored).

Usage::

    python benchmarks/bench_lookahead.py all --prompts 5 --max-new-tokens 128
    python benchmarks/bench_lookahead.py dump-prompts .carry/prompts        # for an offline machine
    python benchmarks/bench_lookahead.py run --prompt-dir .carry/prompts --gguf /root/m/smollm2.gguf --device cuda
    python benchmarks/bench_lookahead.py cache --streams results/bench_lookahead_run.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETS = ("mtbench", "humaneval", "gsm8k")
METHODS = ("raw", "turbo_cold", "turbo_warm", "hybrid", "pld")


# ---------------------------------------------------------------------------- bookkeeping
@dataclass
class Request:
    """One generate() call: its prompt, first token and the tokens each verify step committed."""

    prompt: list[int]
    first: int
    steps: list[list[int]] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    wall_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return 1 + sum(len(s) for s in self.steps)

    def output(self) -> list[int]:
        return [self.first] + [t for s in self.steps for t in s]


@dataclass
class MethodResult:
    tau: float
    alpha: float
    drafted: int
    accepted: int
    new_tokens: int
    verify_steps: int
    wall_s: float
    tokens_per_s: float


def summarize(reqs: list[Request]) -> MethodResult:
    steps = sum(len(r.steps) for r in reqs)
    committed = sum(r.new_tokens - 1 for r in reqs)
    drafted = sum(r.drafted for r in reqs)
    accepted = sum(r.accepted for r in reqs)
    wall = sum(r.wall_s for r in reqs)
    new = sum(r.new_tokens for r in reqs)
    return MethodResult(
        tau=committed / steps if steps else 0.0,
        alpha=accepted / drafted if drafted else 0.0,
        drafted=drafted, accepted=accepted, new_tokens=new, verify_steps=steps,
        wall_s=wall, tokens_per_s=new / wall if wall else 0.0,
    )


# ---------------------------------------------------------------------------- generation
def load_target(args):
    import torch

    if args.gguf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(os.path.abspath(args.gguf))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        model = model.to(args.device).eval()
        return model, tok
    from specdec import load_model

    return load_model(args.model, dtype=torch.float32, device=args.device)


def load_set(args, name: str, limit: int, offset: int):
    from experiments.prompts import load_prompts

    if args.prompt_dir:
        return load_prompts("jsonl", limit=limit, offset=offset, path=os.path.join(args.prompt_dir, f"{name}.jsonl"))
    return load_prompts(name, limit=limit, offset=offset)


class Engine:
    """Runs one method on one conversation (a list of turns) and records a Request per turn."""

    def __init__(self, model, tok, args):
        import torch

        from verifiers import SDPAVerifier

        self.model, self.tok, self.args = model, tok, args
        self.verifier = SDPAVerifier()
        self.eos = model.generation_config.eos_token_id
        self.device = next(model.parameters()).device
        self._fwd = []  # input lengths of the target forwards in the current HF call
        model.register_forward_pre_hook(self._count, with_kwargs=True)
        self.torch = torch

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._fwd.append(int(ids.shape[1]))

    def conversation(self, turns: list[str], drafter) -> list[Request]:
        from experiments.prompts import chat_ids

        reqs, answers = [], []
        for i in range(len(turns)):
            ids = chat_ids(self.tok, turns[: i + 1], answers)
            req = self._one(ids, drafter)
            reqs.append(req)
            answers.append(self.tok.decode(req.output(), skip_special_tokens=True))
        return reqs

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _one(self, ids: list[int], drafter) -> Request:
        torch = self.torch
        x = torch.tensor([ids], device=self.device)
        n = self.args.max_new_tokens
        if drafter == "pld":
            self._fwd = []
            self._sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                          prompt_lookup_num_tokens=10, eos_token_id=self.eos, pad_token_id=0,
                                          top_k=None, top_p=None, temperature=None)
            self._sync()
            wall = time.perf_counter() - t0
            new = out[0, len(ids):].tolist()
            fwd = self._fwd[1:]  # the first forward is the prefill
            req = Request(prompt=ids, first=new[0], wall_s=wall)
            req.drafted = sum(f - 1 for f in fwd)
            # HF commits accepted + 1 per verify forward; per-step chunks are not observable, so the
            # recorded steps only carry the count (used for tau), not the boundaries
            req.steps = [[] for _ in fwd]
            if req.steps:
                req.steps[-1] = new[1:]
            req.accepted = max(len(new) - 1 - len(fwd), 0)
            return req
        from specdec.generate import generate

        steps: list[list[int]] = []
        self._sync()
        t0 = time.perf_counter()
        out = generate(self.model, x, drafter=drafter, verifier=self.verifier, max_new_tokens=n,
                       budget=self.args.budget, eos_token_id=self.eos,
                       on_step=lambda st, res: steps.append(list(res.new_tokens[0])))
        self._sync()
        wall = time.perf_counter() - t0
        new = out.new_tokens[0]
        req = Request(prompt=ids, first=new[0], steps=steps, wall_s=wall)
        # accepted = draft tokens actually committed (the same count as for pld: the engine's own
        # counter also includes drafts accepted past max_new_tokens / EOS and then cut)
        req.drafted, req.accepted = out.stats.drafted_tokens, len(new) - 1 - len(steps)
        assert req.output() == new, "on_step stream disagrees with the output"
        return req


def clone_cache(cache):
    from lookahead.turbo import TurboLookaheadCache

    with tempfile.TemporaryDirectory() as d:
        cache.save(os.path.join(d, "turbo.json"))
        return TurboLookaheadCache.load(os.path.join(d, "turbo.json"))


def run_generation(args) -> dict:
    from drafters import HybridLookahead, RawLookahead, TurboLookahead
    from lookahead.turbo import TurboLookaheadCache

    model, tok = load_target(args)
    eng = Engine(model, tok, args)
    doc = {"config": vars(args).copy(), "device": str(eng.device), "sets": {}}
    t_all = time.perf_counter()
    for name in args.sets:
        evals = load_set(args, name, args.prompts, 0)
        warms = load_set(args, name, args.warm_prompts, args.prompts)
        n_turns = 2 if name == "mtbench" else 1
        print(f"[{name}] {len(evals)} eval / {len(warms)} warm-up conversations", flush=True)
        # warm-up: a global Turbo cache serves the disjoint split (model outputs, as in serving)
        warm_cache = TurboLookaheadCache()
        warm_reqs = []
        t0 = time.perf_counter()
        for r in warms:
            warm_reqs += eng.conversation(r.turns[:n_turns], TurboLookahead(warm_cache))
        print(f"  warm-up: {len(warm_reqs)} requests, {warm_cache.node_count} nodes, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        drafters = {
            "raw": lambda: RawLookahead(),
            "turbo_cold": (lambda d: (lambda: d))(TurboLookahead(TurboLookaheadCache())),
            "turbo_warm": (lambda d: (lambda: d))(TurboLookahead(clone_cache(warm_cache))),
            "hybrid": (lambda d: (lambda: d))(HybridLookahead(clone_cache(warm_cache))),
            "pld": lambda: "pld",
        }
        per = {m: [] for m in METHODS}
        for r in evals:
            for m in METHODS:
                per[m] += eng.conversation(r.turns[:n_turns], drafters[m]())
        outputs = {m: [q.output() for q in per[m]] for m in METHODS}
        same = {m: sum(a == b for a, b in zip(outputs[m], outputs["raw"])) for m in METHODS}
        doc["sets"][name] = {
            "results": {m: asdict(summarize(per[m])) for m in METHODS},
            "same_output_as_raw": same,
            "requests": len(per["raw"]),
            "streams": {m: [asdict(q) for q in per[m]] for m in METHODS if m != "pld"},
            "warm_streams": [asdict(q) for q in warm_reqs],
        }
        print_table({name: doc["sets"][name]})
    doc["generation_wall_s"] = time.perf_counter() - t_all
    return doc


def print_table(sets: dict) -> None:
    print(f"{'set':10s} {'method':11s} {'tau':>6s} {'alpha':>6s} {'drafted':>8s} {'accepted':>8s} {'new':>6s} "
          f"{'steps':>6s} {'tok/s':>7s} {'=raw':>5s}")
    for name, s in sets.items():
        for m, r in s["results"].items():
            print(f"{name:10s} {m:11s} {r['tau']:6.3f} {r['alpha']:6.3f} {r['drafted']:8d} {r['accepted']:8d} "
                  f"{r['new_tokens']:6d} {r['verify_steps']:6d} {r['tokens_per_s']:7.1f} "
                  f"{s['same_output_as_raw'][m]:2d}/{s['requests']}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- cache timing
def _clock():
    return time.perf_counter_ns(), time.thread_time_ns()


def time_cache_ops(doc: dict, budget: int) -> dict:
    """Median cost of one step's query (``budget`` nodes) + update, replaying the recorded streams."""
    from lookahead.raw import RawLookaheadCache
    from lookahead.trie import merge_proposals
    from lookahead.turbo import TurboLookaheadCache

    wall = {"raw": [], "turbo": [], "hybrid": []}
    cpu = {"raw": [], "turbo": [], "hybrid": []}
    sizes = {"raw": [], "turbo": [], "hybrid": []}
    for name, s in doc["sets"].items():
        warm = TurboLookaheadCache()
        for q in s["warm_streams"]:
            h = warm.begin(q["prompt"])
            warm.extend(h, [q["first"]] + [t for st in q["steps"] for t in st])
            warm.end(h)
        for kind, method in (("raw", "raw"), ("turbo", "turbo_warm"), ("hybrid", "hybrid")):
            turbo = clone_cache(warm)
            m = turbo.max_match
            for q in s["streams"][method]:
                raw = RawLookaheadCache()
                raw.extend(q["prompt"] + [q["first"]])
                h = turbo.begin(q["prompt"])
                turbo.extend(h, [q["first"]])
                ctx = q["prompt"] + [q["first"]]
                for chunk in q["steps"]:
                    # the engine's work per step, cache side: query, then feed the committed tokens
                    w0, c0 = _clock()
                    if kind == "raw":
                        p = raw.query(budget)
                        raw.extend(chunk)
                    elif kind == "turbo":
                        p = turbo.query(ctx[-m:], budget)
                        turbo.extend(h, chunk)
                    else:
                        p = merge_proposals([raw.query(budget), turbo.query(ctx[-m:], budget)], budget)
                        raw.extend(chunk)
                        turbo.extend(h, chunk)
                    w1, c1 = _clock()
                    wall[kind].append((w1 - w0) / 1e3)
                    cpu[kind].append((c1 - c0) / 1e3)
                    sizes[kind].append(len(p))
                    if kind != "raw":
                        ctx.extend(chunk)
                turbo.end(h)

    def stats(xs):
        xs = sorted(xs)
        return {"median_us": statistics.median(xs), "p90_us": xs[int(0.9 * (len(xs) - 1))], "steps": len(xs)}

    return {k: {"wall": stats(wall[k]), "thread_cpu": stats(cpu[k]),
                "mean_nodes_proposed": statistics.mean(sizes[k])} for k in wall}


def capacity_run(doc: dict, n_requests: int, capacity: int, seed: int = 0) -> dict:
    """Feed a Turbo cache ``n_requests`` requests; report its largest node count after any update."""
    from lookahead.turbo import TurboLookaheadCache

    pool = []
    for s in doc["sets"].values():
        for qs in list(s["streams"].values()) + [s["warm_streams"]]:
            for q in qs:
                out = [q["first"]] + [t for st in q["steps"] for t in st]
                pool.append((q["prompt"], out))
    vocab = max(max(p + o) for p, o in pool) + 1
    rng = random.Random(seed)
    cache = TurboLookaheadCache(capacity=capacity)
    worst = 0
    t0 = time.perf_counter()
    for i in range(n_requests):
        prompt, out = pool[rng.randrange(len(pool))]
        # perturb 10% of the tokens so that the stream keeps bringing new n-grams
        prompt = [rng.randrange(vocab) if rng.random() < 0.1 else t for t in prompt[-256:]]
        out = [rng.randrange(vocab) if rng.random() < 0.1 else t for t in out]
        h = cache.begin(prompt)
        worst = max(worst, cache.node_count)
        for j in range(0, len(out), 4):
            cache.extend(h, out[j : j + 4])
            worst = max(worst, cache.node_count)
        cache.end(h)
    wall = time.perf_counter() - t0
    return {"requests": n_requests, "capacity": capacity, "max_nodes": worst, "final_nodes": cache.node_count,
            "walked_nodes": cache.count_nodes(), "evictions": cache.evictions, "wall_s": wall,
            "within_capacity": worst <= capacity}


def run_cache_part(doc: dict, args) -> dict:
    timing = time_cache_ops(doc, args.timing_budget)
    cap = capacity_run(doc, args.capacity_requests, args.capacity)
    print(f"\ncache operations per step (query at budget {args.timing_budget} + update), this CPU:")
    for k, v in timing.items():
        print(f"  {k:7s} median {v['wall']['median_us']:7.1f} us wall ({v['thread_cpu']['median_us']:7.1f} us thread CPU), "
              f"p90 {v['wall']['p90_us']:7.1f} us, {v['wall']['steps']} steps, {v['mean_nodes_proposed']:.1f} nodes/tree")
    print(f"capacity: {cap['requests']} requests into capacity {cap['capacity']}: max {cap['max_nodes']} nodes, "
          f"{cap['evictions']} evictions, {cap['wall_s']:.1f} s")
    return {"timing": timing, "capacity": cap}


def verdicts(doc: dict) -> dict:
    out = {}
    for name, s in doc["sets"].items():
        r = s["results"]
        out[name] = {
            "raw_tau_ge_pld": r["raw"]["tau"] >= r["pld"]["tau"],
            "warm_turbo_accepted_over_raw": r["turbo_warm"]["accepted"] / max(r["raw"]["accepted"], 1),
            "hybrid_accepted_over_raw": r["hybrid"]["accepted"] / max(r["raw"]["accepted"], 1),
        }
    tot = {m: sum(s["results"][m]["accepted"] for s in doc["sets"].values()) for m in METHODS}
    out["all"] = {"warm_turbo_accepted_over_raw": tot["turbo_warm"] / max(tot["raw"], 1),
                  "hybrid_accepted_over_raw": tot["hybrid"] / max(tot["raw"], 1)}
    return out


# ---------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("all", "run", "cache", "dump-prompts"))
    ap.add_argument("dir", nargs="?", help="dump-prompts: output folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gguf", default=None, help="load the target from this GGUF file instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--prompts", type=int, default=5, help="evaluation conversations per set")
    ap.add_argument("--warm-prompts", type=int, default=10, help="disjoint warm-up conversations per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=16, help="draft nodes per tree for the tau/alpha runs")
    ap.add_argument("--timing-budget", type=int, default=64)
    ap.add_argument("--capacity-requests", type=int, default=10_000)
    ap.add_argument("--capacity", type=int, default=200_000)
    ap.add_argument("--prompt-dir", default=None, help="read <set>.jsonl (Spec-Bench format) from here")
    ap.add_argument("--streams", default="results/bench_lookahead_run.json", help="cache: the run part's JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.mode == "dump-prompts":
        d = Path(args.dir or ".carry/prompts")
        d.mkdir(parents=True, exist_ok=True)
        for name in args.sets:
            recs = load_set(args, name, args.prompts + args.warm_prompts, 0)
            with open(d / f"{name}.jsonl", "w") as f:
                for r in recs:
                    f.write(json.dumps({"question_id": r.question_id, "category": r.category, "turns": r.turns}) + "\n")
        print(f"wrote {len(args.sets)} sets to {d}")
        return
    out_dir = Path(os.environ.get("OUT", "results")) if args.mode == "run" and os.environ.get("OUT") else Path("results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.mode in ("all", "run"):
        doc = run_generation(args)
        doc["verdicts"] = verdicts(doc)
        path = Path(args.out) if args.out else out_dir / "bench_lookahead_run.json"
        path.write_text(json.dumps(doc))
        print("\nall sets:")
        print_table(doc["sets"])
        print(json.dumps(doc["verdicts"], indent=1))
        print(f"wrote {path}")
    if args.mode in ("all", "cache"):
        if args.mode == "cache":
            doc = json.loads(Path(args.streams).read_text())
        cache = run_cache_part(doc, args)
        doc.update(cache)
        doc["verdicts"] = verdicts(doc)
        path = Path(args.out) if args.out else Path("results") / "bench_lookahead.json"
        path.write_text(json.dumps({k: v for k, v in doc.items()}))
        print("\nall sets:")
        print_table(doc["sets"])
        print(json.dumps(doc["verdicts"], indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
