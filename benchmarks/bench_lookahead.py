"""Lookahead drafters vs HF prompt lookup on real prompts (SmolLM2-135M-Instruct, greedy).

Method
------
Greedy speculative decoding is lossless, so the committed tokens do not depend on the drafter,
and with deterministic (n-gram) drafts each verify step is fully determined by the committed
tokens so far: the engine accepts the longest tree path that agrees with the target's greedy
continuation, then adds the target's next token as the bonus. So:

1. ``run`` (needs the model): each prompt is decoded once with transformers' prompt lookup
   (``generate(prompt_lookup_num_tokens=10)``, greedy, lossless). Its output is the greedy
   reference; a forward pre-hook counts the target forwards and their input lengths, which give
   prompt lookup's own figures (first forward = prefill; each later forward verifies
   ``input_len - 1`` candidates and commits accepted + 1 tokens). A cross-check then runs the real
   ``specdec.generate()`` with each lookahead drafter on the first evaluation request of every set
   and records its tau/drafted/accepted and whether its output equals the reference.
2. ``replay`` (CPU only): replays every request through the caches exactly as the engine drives
   them (query at the budget, walk the tree along the reference, commit accepted + bonus, update
   the cache) and reports tau and alpha for
     raw         RawLookahead (per request),
     turbo_cold  TurboLookahead, a fresh cache per prompt set that learns as the set is served,
     turbo_warm  TurboLookahead whose cache first served a disjoint split of the set
                 (records ``offset = --prompts`` onward, their greedy outputs), then the evaluation,
     hybrid      HybridLookahead on a copy of that warmed cache,
     pld         prompt lookup as measured in step 1.
   The replayed figures for the cross-checked requests must equal the real ``generate()`` ones:
   that check is printed. Cache operations (query at ``--timing-budget`` + update) are timed alone
   per step on this CPU, and a Turbo cache is fed 10,000 requests of real token streams (10% of the
   tokens perturbed so that n-grams keep being new) while its node count is checked after every
   update.

tau = tokens committed per verify step (bonus included, the prefill's first token excluded), as
in ``specdec.metrics``; alpha = committed draft tokens / drafted tokens. MT-bench uses both turns
as one conversation: turn 1 is generated, then turn 1's answer + turn 2 form the next prompt.

Usage::

    python benchmarks/bench_lookahead.py all                       # both parts on this machine
    python benchmarks/bench_lookahead.py dump-prompts DIR           # prompt files for an offline box
    python benchmarks/bench_lookahead.py run --prompt-dir DIR --gguf FILE --device cuda   # -> $OUT or results/
    python benchmarks/bench_lookahead.py replay --reference results/bench_lookahead_reference.json
    python benchmarks/bench_lookahead.py bounds --reference ... --budget 16   # what retrieval could reach
    python benchmarks/bench_lookahead.py run --extend-warm REF --warm-prompts 80 --warm-batch 16 --out REF2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETS = ("mtbench", "humaneval", "gsm8k")
METHODS = ("raw", "turbo_cold", "turbo_warm", "hybrid", "pld")


@dataclass
class Tally:
    """Verify-step counts of one method over some requests."""

    steps: int = 0
    drafted: int = 0
    new_tokens: int = 0  # generated tokens, the prefill's first one included
    requests: int = 0

    def add(self, steps: int, drafted: int, new_tokens: int) -> None:
        self.steps += steps
        self.drafted += drafted
        self.new_tokens += new_tokens
        self.requests += 1

    @property
    def accepted(self) -> int:  # each step commits its accepted drafts + 1 bonus
        return self.new_tokens - self.requests - self.steps

    def row(self) -> dict:
        committed = self.new_tokens - self.requests
        return {"tau": committed / self.steps if self.steps else 0.0,
                "alpha": self.accepted / self.drafted if self.drafted else 0.0,
                "drafted": self.drafted, "accepted": self.accepted, "steps": self.steps,
                "new_tokens": self.new_tokens, "requests": self.requests}


def accepted_len(prop, out: list[int], i: int) -> int:
    """Greedy acceptance of a proposal (``prop.tokens`` / ``prop.parents``, parent -1 = the root) against
    the reference continuation ``out[i:]``: the length of the longest agreeing root path."""
    kids = {(p, t): j for j, (t, p) in enumerate(zip(prop.tokens, prop.parents))}
    node, k = -1, 0
    while i + k < len(out):
        nxt = kids.get((node, out[i + k]))
        if nxt is None:
            break
        node, k = nxt, k + 1
    return k


# ---------------------------------------------------------------------------- part 1: the model


def load_target(args):
    import torch

    if args.gguf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = os.path.split(os.path.abspath(args.gguf))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.to(args.device).eval(), tok
    from specdec import load_model

    return load_model(args.model, dtype=torch.float32, device=args.device)


def load_set(args, name: str, limit: int, offset: int):
    from experiments.prompts import load_prompts

    if args.prompt_dir:
        return load_prompts("jsonl", limit=limit, offset=offset, path=os.path.join(args.prompt_dir, f"{name}.jsonl"))
    return load_prompts(name, limit=limit, offset=offset)


class PromptLookupRunner:
    """transformers' prompt lookup with a forward counter."""

    def __init__(self, model, tok, max_new_tokens: int):
        self.model, self.tok, self.n = model, tok, max_new_tokens
        self.eos = model.generation_config.eos_token_id
        self.device = next(model.parameters()).device
        self._fwd: list[int] = []
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._fwd.append(int(ids.shape[1]))

    def conversation(self, turns: list[str]) -> list[dict]:
        from experiments.prompts import chat_ids

        out, answers = [], []
        for i in range(len(turns)):
            ids = chat_ids(self.tok, turns[: i + 1], answers)
            req = self.one(ids)
            out.append(req)
            answers.append(self.tok.decode(req["output"], skip_special_tokens=True))
        return out

    def one(self, ids: list[int]) -> dict:
        import torch

        x = torch.tensor([ids], device=self.device)
        self._fwd = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=self.n, do_sample=False,
                                    prompt_lookup_num_tokens=10, eos_token_id=self.eos, pad_token_id=0,
                                    top_k=None, top_p=None, temperature=None)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        verify = self._fwd[1:]
        return {"prompt": ids, "output": y[0, len(ids):].tolist(),
                "pld": {"steps": len(verify), "drafted": sum(f - 1 for f in verify), "wall_s": wall}}


def clone_cache(cache):
    from lookahead.turbo import TurboLookaheadCache

    with tempfile.TemporaryDirectory() as d:
        cache.save(os.path.join(d, "turbo.json"))
        return TurboLookaheadCache.load(os.path.join(d, "turbo.json"))


def feed(cache, req: dict) -> None:
    """What serving ``req`` leaves in a Turbo cache (independent of the step boundaries)."""
    h = cache.begin(req["prompt"])
    cache.extend(h, req["output"])
    cache.end(h)


def run_reference(args) -> dict:
    model, tok = load_target(args)
    pl = PromptLookupRunner(model, tok, args.max_new_tokens)
    if args.mode == "crosscheck":
        doc = json.loads(Path(args.reference).read_text())
        for name, s in doc["sets"].items():
            s["crosscheck"] = crosscheck(model, pl, s, args)
        return doc
    if args.extend_warm:
        # decode more warm-up conversations for an existing reference (eval requests unchanged)
        doc = json.loads(Path(args.extend_warm).read_text())
        have = doc["config"]["warm_prompts"]
        for name, s in doc["sets"].items():
            n_turns = 2 if name == "mtbench" else 1
            more = load_set(args, name, args.warm_prompts - have, doc["config"]["prompts"] + have)
            t0 = time.perf_counter()
            if args.warm_batch:
                s["warm"] += batched_conversations(model, tok, [r.turns[:n_turns] for r in more], args.max_new_tokens,
                                                   pl.eos, args.warm_batch)
            else:
                s["warm"] += [q for r in more for q in pl.conversation(r.turns[:n_turns])]
            print(f"[{name}] +{len(more)} warm-up conversations in {time.perf_counter() - t0:.1f} s", flush=True)
        doc["config"]["warm_prompts"] = args.warm_prompts
        doc["config"].setdefault("warm_batched_from", {})[str(have)] = args.warm_batch
        return doc
    doc = {"config": vars(args).copy(), "device": str(pl.device), "sets": {}}
    for name in args.sets:
        n_turns = 2 if name == "mtbench" else 1
        t0 = time.perf_counter()
        evals = [q for r in load_set(args, name, args.prompts, 0) for q in pl.conversation(r.turns[:n_turns])]
        warms = [q for r in load_set(args, name, args.warm_prompts, args.prompts)
                 for q in pl.conversation(r.turns[:n_turns])]
        print(f"[{name}] {len(evals)} eval + {len(warms)} warm-up requests decoded in {time.perf_counter() - t0:.1f} s",
              flush=True)
        doc["sets"][name] = {"eval": evals, "warm": warms}
        doc["sets"][name]["crosscheck"] = crosscheck(model, pl, doc["sets"][name], args)
    return doc


def batched_conversations(model, tok, convs: list[list[str]], max_new_tokens: int, eos, batch: int) -> list[dict]:
    """Greedy outputs of many conversations, ``batch`` requests per ``model.generate`` call (left
    padded, longest prompts together): a fast way to decode a large warm-up split. Padding can
    change a rare near-tie token relative to unbatched decoding; these outputs only warm a cache,
    they are never a reference. Turn i + 1's prompt holds turn i's answer, as in
    :meth:`PromptLookupRunner.conversation`. Requests are returned conversation by conversation."""
    import torch

    from experiments.prompts import chat_ids

    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    device = next(model.parameters()).device
    answers: list[list[str]] = [[] for _ in convs]
    done: list[list[dict]] = [[] for _ in convs]
    for turn in range(max(len(c) for c in convs)):
        todo = [k for k, c in enumerate(convs) if turn < len(c)]
        prompts = {k: chat_ids(tok, convs[k][: turn + 1], answers[k]) for k in todo}
        todo.sort(key=lambda k: len(prompts[k]))
        for j in range(0, len(todo), batch):
            ks = todo[j : j + batch]
            width = max(len(prompts[k]) for k in ks)
            x = torch.zeros((len(ks), width), dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, k in enumerate(ks):
                x[r, width - len(prompts[k]) :] = torch.tensor(prompts[k])
                mask[r, width - len(prompts[k]) :] = 1
            with torch.inference_mode():
                y = model.generate(x.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=eos, pad_token_id=0, top_k=None, top_p=None,
                                   temperature=None)
            for r, k in enumerate(ks):
                out = []
                for t in y[r, width:].tolist():
                    out.append(t)
                    if t in eos_ids:
                        break
                done[k].append({"prompt": prompts[k], "output": out, "batched": True})
                answers[k].append(tok.decode(out, skip_special_tokens=True))
    return [q for reqs in done for q in reqs]


def crosscheck(model, pl, s: dict, args) -> dict:
    """The real engine on the set's first evaluation request, cache states as in the replay."""
    import torch

    from drafters import HybridLookahead, RawLookahead, TurboLookahead
    from lookahead.turbo import TurboLookaheadCache
    from specdec.generate import generate
    from verifiers import SDPAVerifier

    warm = TurboLookaheadCache()
    for q in s["warm"]:
        feed(warm, q)
    q = s["eval"][0]
    x = torch.tensor([q["prompt"]], device=pl.device)
    n_cc = args.crosscheck_tokens or args.max_new_tokens
    checks = {"max_new_tokens": n_cc, "warm_requests": len(s["warm"])}
    for m, drafter in (("raw", RawLookahead()), ("turbo_cold", TurboLookahead(TurboLookaheadCache())),
                       ("turbo_warm", TurboLookahead(clone_cache(warm))),
                       ("hybrid", HybridLookahead(clone_cache(warm)))):
        out = generate(model, x, drafter=drafter, verifier=SDPAVerifier(), max_new_tokens=n_cc,
                       budget=args.budget, eos_token_id=pl.eos)
        new = out.new_tokens[0]
        st = out.stats
        checks[m] = {"steps": st.verify_steps, "drafted": st.drafted_tokens, "new_tokens": len(new),
                     "tau": st.tau, "same_output": new == q["output"][:n_cc]}
    print(f"  generate() cross-check on request 0: {checks}", flush=True)
    return checks


# ---------------------------------------------------------------------------- part 2: replay
class _RawSide:
    def __init__(self, req):
        from lookahead.raw import RawLookaheadCache

        self.c = RawLookaheadCache()
        self.c.extend(req["prompt"] + req["output"][:1])

    def query(self, budget):
        return self.c.query(budget)

    def update(self, toks):
        self.c.extend(toks)

    def close(self):
        pass


class _TurboSide:
    def __init__(self, cache, req):
        self.cache = cache
        self.h = cache.begin(req["prompt"])
        cache.extend(self.h, req["output"][:1])
        self.ctx = list(req["prompt"][-cache.max_match :]) + req["output"][:1]

    def query(self, budget):
        return self.cache.query(self.ctx[-self.cache.max_match :], budget)

    def update(self, toks):
        self.cache.extend(self.h, toks)
        self.ctx.extend(toks)
        del self.ctx[: -self.cache.max_match]

    def close(self):
        self.cache.end(self.h)


class _HybridSide:
    def __init__(self, cache, req):
        self.raw, self.turbo = _RawSide(req), _TurboSide(cache, req)

    def query(self, budget):  # as HybridLookahead: Raw's proposal merged into Turbo's walk
        t = self.turbo
        return t.cache.query_merged(t.ctx[-t.cache.max_match :], budget, self.raw.query(budget))

    def update(self, toks):
        self.raw.update(toks)
        self.turbo.update(toks)

    def close(self):
        self.turbo.close()


def replay(side, output: list[int], budget: int, times: list | None = None) -> tuple[int, int]:
    """Drive a cache through one request as ``generate()`` does (greedy); return (steps, drafted).

    Per step: query at ``budget``; walk the proposal along the reference (the target's greedy
    tokens); commit accepted + bonus; update the cache. ``times`` collects the query + update cost
    (ns) of each step.
    """
    i, steps, drafted = 1, 0, 0  # output[0] came from the prefill
    while i < len(output):
        t0 = time.perf_counter_ns()
        prop = side.query(budget)
        t1 = time.perf_counter_ns()
        k = accepted_len(prop, output, i)
        commit = output[i : i + k + 1]  # accepted drafts + bonus (cut at the end, like EOS / max_new_tokens)
        t2 = time.perf_counter_ns()
        side.update(commit)
        t3 = time.perf_counter_ns()
        if times is not None:
            times.append((t1 - t0) + (t3 - t2))
        i += len(commit)
        steps += 1
        drafted += len(prop)
    side.close()
    return steps, drafted


def replay_set(s: dict, budget: int, times: dict | None = None, gc_freeze: bool = False) -> tuple[dict, dict]:
    from lookahead.turbo import TurboLookaheadCache

    warm = TurboLookaheadCache()
    for q in s["warm"]:
        feed(warm, q)
    caches = {"turbo_cold": TurboLookaheadCache(), "turbo_warm": clone_cache(warm), "hybrid": clone_cache(warm)}
    if gc_freeze:  # what a server would do after warm-up: the cyclic GC stops walking the warm tries
        gc.collect()
        gc.freeze()
    tallies = {m: Tally() for m in METHODS}
    first = {}
    for n, q in enumerate(s["eval"]):
        for m in METHODS:
            if m == "pld":
                tallies[m].add(q["pld"]["steps"], q["pld"]["drafted"], len(q["output"]))
                continue
            if n == 0 and m in s["crosscheck"] and s["crosscheck"].get("warm_requests", len(s["warm"])) == len(s["warm"]):
                # the same request cut at the cross-check's max_new_tokens, from the same cache state
                n_cc = s["crosscheck"]["max_new_tokens"]
                probe = _RawSide(q) if m == "raw" else _HybridSide(clone_cache(caches[m]), q) if m == "hybrid" \
                    else _TurboSide(clone_cache(caches[m]), q)
                st, dr = replay(probe, q["output"][:n_cc], budget)
                first[m] = {"steps": st, "drafted": dr}
            side = _RawSide(q) if m == "raw" else _HybridSide(caches[m], q) if m == "hybrid" else _TurboSide(caches[m], q)
            tt = None if times is None else times.setdefault(m, [])
            steps, drafted = replay(side, q["output"], budget, tt)
            tallies[m].add(steps, drafted, len(q["output"]))
    return {m: t.row() for m, t in tallies.items()}, first


def capacity_run(doc: dict, n_requests: int, capacity: int, seed: int = 0, perturb: float = 0.03) -> dict:
    """Feed a Turbo cache ``n_requests`` requests (recorded prompts, last 128 tokens, and outputs,
    each token replaced by a random one with probability ``perturb`` so that new n-grams keep
    coming); report its largest node count after any update."""
    from lookahead.turbo import TurboLookaheadCache

    pool = [(q["prompt"], q["output"]) for s in doc["sets"].values() for q in s["eval"] + s["warm"]]
    vocab = max(max(p + o) for p, o in pool) + 1
    rng = random.Random(seed)
    cache = TurboLookaheadCache(capacity=capacity)
    worst = 0
    t0 = time.perf_counter()
    for r in range(n_requests):
        if r and r % 2000 == 0:
            print(f"  capacity run: {r} requests, {cache.node_count} nodes, {cache.evictions} evictions, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        prompt, out = pool[rng.randrange(len(pool))]
        prompt = [rng.randrange(vocab) if rng.random() < perturb else t for t in prompt[-128:]]
        out = [rng.randrange(vocab) if rng.random() < perturb else t for t in out]
        h = cache.begin(prompt)
        worst = max(worst, cache.node_count)
        for j in range(0, len(out), 4):
            cache.extend(h, out[j : j + 4])
            worst = max(worst, cache.node_count)
        cache.end(h)
    return {"requests": n_requests, "capacity": capacity, "max_nodes": worst, "final_nodes": cache.node_count,
            "walked_nodes": cache.count_nodes(), "evictions": cache.evictions,
            "wall_s": time.perf_counter() - t0, "within_capacity": worst <= capacity, "perturb": perturb}


def bounds(doc: dict, budget: int, unlimited: int = 1 << 20) -> dict:
    """How far can retrieval go with what the caches know? Per evaluation position i (context =
    prompt + output[:i], caches updated token by token), the draft tokens the target would
    accept from: Raw at ``budget``; warm Turbo at ``budget``; warm Turbo with no budget (every
    continuation of every suffix match, ``unlimited`` nodes); the better of Raw and warm Turbo at
    that position. Each is then walked as decoding does (from i, commit accepted + 1) and summed
    over the set. The unlimited figure bounds any ranking of the Turbo trie's knowledge; the
    per-position best of the two bounds what Turbo could gain by using the request's own context
    the way Raw does."""
    from lookahead.raw import RawLookaheadCache
    from lookahead.turbo import TurboLookaheadCache

    accepted = accepted_len

    def walk(acc, n):
        i, total = 1, 0
        while i < n:
            total += min(acc[i], n - 1 - i)  # the last token of an output is its final bonus
            i += acc[i] + 1
        return total

    rows = {}
    for name, s in doc["sets"].items():
        warm = TurboLookaheadCache()
        for q in s["warm"]:
            feed(warm, q)
        tot = {"raw": 0, "turbo_warm": 0, "turbo_warm_unlimited": 0, "best_of_raw_and_turbo_warm": 0}
        for q in s["eval"]:
            out = q["output"]
            raw = RawLookaheadCache()
            raw.extend(q["prompt"] + out[:1])
            h = warm.begin(q["prompt"])
            warm.extend(h, out[:1])
            a_raw, a_tw, a_unl = [0] * len(out), [0] * len(out), [0] * len(out)
            for i in range(1, len(out)):
                ctx = (q["prompt"] + out[:i])[-warm.max_match :]
                a_raw[i] = accepted(raw.query(budget), out, i)
                a_tw[i] = accepted(warm.query(ctx, budget), out, i)
                a_unl[i] = accepted(warm.query(ctx, unlimited), out, i)
                raw.extend(out[i : i + 1])
                warm.extend(h, out[i : i + 1])
            warm.end(h)
            tot["raw"] += walk(a_raw, len(out))
            tot["turbo_warm"] += walk(a_tw, len(out))
            tot["turbo_warm_unlimited"] += walk(a_unl, len(out))
            tot["best_of_raw_and_turbo_warm"] += walk([max(a, b) for a, b in zip(a_raw, a_tw)], len(out))
        rows[name] = tot
    rows["all"] = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
    print(f"\ncommitted draft tokens (and / Raw at budget {budget}), warm split as in the reference:")
    for name, r in rows.items():
        print(f"  {name:10s} " + "  ".join(f"{k} {v} ({v / max(r['raw'], 1):.3f}x)" for k, v in r.items()))
    return rows


def print_table(results: dict, budget: int) -> None:
    print(f"\nbudget {budget} draft nodes (pld: 10-token chain)")
    print(f"{'set':10s} {'method':11s} {'tau':>6s} {'alpha':>6s} {'drafted':>8s} {'accepted':>8s} {'steps':>6s} {'new':>6s}")
    for name, rows in results.items():
        for m, r in rows.items():
            print(f"{name:10s} {m:11s} {r['tau']:6.3f} {r['alpha']:6.3f} {r['drafted']:8d} {r['accepted']:8d} "
                  f"{r['steps']:6d} {r['new_tokens']:6d}")
    sys.stdout.flush()


def run_replay(doc: dict, args) -> dict:
    rep = {"budgets": {}, "crosscheck": {}}
    for budget in sorted({args.budget, args.timing_budget}):
        results = {}
        times: dict = {}
        for name, s in doc["sets"].items():
            results[name], first = replay_set(s, budget, times if budget == args.timing_budget else None,
                                              args.gc_freeze)
            if budget == args.budget:
                rep["crosscheck"][name] = {
                    m: {"replay": first[m], "generate": {k: s["crosscheck"][m][k] for k in ("steps", "drafted")},
                        "equal": first[m] == {k: s["crosscheck"][m][k] for k in ("steps", "drafted")},
                        "generate_output_equals_reference": s["crosscheck"][m]["same_output"]}
                    for m in first}
        tot = {m: sum(results[n][m]["accepted"] for n in results) for m in METHODS}
        verdict = {n: {"raw_tau_ge_pld": results[n]["raw"]["tau"] >= results[n]["pld"]["tau"],
                       "turbo_warm_over_raw_accepted": results[n]["turbo_warm"]["accepted"] / max(results[n]["raw"]["accepted"], 1),
                       "hybrid_over_raw_accepted": results[n]["hybrid"]["accepted"] / max(results[n]["raw"]["accepted"], 1)}
                   for n in results}
        verdict["all"] = {"turbo_warm_over_raw_accepted": tot["turbo_warm"] / max(tot["raw"], 1),
                          "hybrid_over_raw_accepted": tot["hybrid"] / max(tot["raw"], 1)}
        rep["budgets"][budget] = {"results": results, "verdicts": verdict}
        print_table(results, budget)
        print(json.dumps(verdict))
        if times:
            rep["timing_us"] = {}
            print(f"\ncache operations per step (query at budget {budget} + update), this CPU, wall clock"
                  f"{', gc.freeze() after the caches were built' if args.gc_freeze else ''}:")
            for m, ts in times.items():
                us = sorted(t / 1e3 for t in ts)
                row = {"median": statistics.median(us), "p90": us[int(0.9 * (len(us) - 1))],
                       "p99": us[int(0.99 * (len(us) - 1))], "steps": len(us)}
                rep["timing_us"][m] = row
                print(f"  {m:11s} median {row['median']:7.1f} us  p90 {row['p90']:7.1f} us  p99 {row['p99']:8.1f} us"
                      f"  ({row['steps']} steps)")
    print("\nreplay vs real generate() on request 0 of each set (steps, drafted):")
    for name, c in rep["crosscheck"].items():
        print(f"  {name}: " + ", ".join(f"{m} {'==' if v['equal'] else '!='} ({v['replay']['steps']}, "
                                        f"{v['replay']['drafted']}) output {'ok' if v['generate_output_equals_reference'] else 'DIFFERS'}"
                                        for m, v in c.items()))
    if not args.capacity_requests:
        return rep
    rep["capacity"] = capacity_run(doc, args.capacity_requests, args.capacity)
    c = rep["capacity"]
    print(f"\ncapacity: {c['requests']} requests into a Turbo cache of capacity {c['capacity']}: largest node count "
          f"{c['max_nodes']}, {c['evictions']} evictions, {c['wall_s']:.1f} s")
    return rep


# ---------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("all", "run", "replay", "crosscheck", "dump-prompts", "bounds"))
    ap.add_argument("dir", nargs="?", help="dump-prompts: output folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--gguf", default=None, help="load the target from this GGUF file instead")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--prompts", type=int, default=10, help="evaluation conversations per set")
    ap.add_argument("--warm-prompts", type=int, default=20, help="disjoint warm-up conversations per set")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=16, help="draft nodes per tree")
    ap.add_argument("--timing-budget", type=int, default=64)
    ap.add_argument("--capacity-requests", type=int, default=10_000)
    ap.add_argument("--gc-freeze", action="store_true",
                    help="replay: gc.freeze() once each set's caches are built (no cyclic-GC walks of the warm tries)")
    ap.add_argument("--capacity", type=int, default=200_000)
    ap.add_argument("--prompt-dir", default=None, help="read <set>.jsonl (Spec-Bench format) from here")
    ap.add_argument("--crosscheck-tokens", type=int, default=0,
                    help="max_new_tokens of the real generate() cross-check (default: --max-new-tokens)")
    ap.add_argument("--extend-warm", default=None, help="run: add warm-up conversations to this reference file")
    ap.add_argument("--warm-batch", type=int, default=0,
                    help="--extend-warm: decode the added warm-up conversations in batches of this size (plain "
                         "batched greedy instead of prompt lookup one by one; 0 = one by one)")
    ap.add_argument("--out", default=None, help="run: write the reference here (default $OUT or results/)")
    ap.add_argument("--reference", default="results/bench_lookahead_reference.json")
    args = ap.parse_args(argv)

    if args.mode == "dump-prompts":
        d = Path(args.dir or "results/prompts")
        d.mkdir(parents=True, exist_ok=True)
        for name in args.sets:
            recs = load_set(args, name, args.prompts + args.warm_prompts, 0)
            with open(d / f"{name}.jsonl", "w") as f:
                for r in recs:
                    f.write(json.dumps({"question_id": r.question_id, "category": r.category, "turns": r.turns}) + "\n")
        print(f"wrote {len(args.sets)} sets to {d}")
        return
    if args.mode == "bounds":
        doc = json.loads(Path(args.reference).read_text())
        bounds(doc, args.budget)
        return
    if args.mode in ("all", "run", "crosscheck"):
        doc = run_reference(args)
        out_dir = Path(os.environ["OUT"]) if args.mode == "run" and os.environ.get("OUT") else Path("results")
        ref = Path(args.out) if args.out else out_dir / "bench_lookahead_reference.json"
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(json.dumps(doc))
        print(f"wrote {ref}")
    if args.mode in ("all", "replay"):
        if args.mode == "replay":
            doc = json.loads(Path(args.reference).read_text())
        rep = run_replay(doc, args)
        Path("results").mkdir(exist_ok=True)
        path = Path("results") / ("bench_lookahead.json" if args.capacity_requests else "bench_lookahead_tables.json")
        path.write_text(json.dumps({"config": vars(args), "reference_config": doc["config"],
                                    "reference_device": doc["device"], **rep}))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
