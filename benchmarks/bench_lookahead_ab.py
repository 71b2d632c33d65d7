"""A/B timing of the lookahead caches: the working tree against an earlier git revision.

Timing on a shared CPU drifts by tens of percent from minute to minute, so two versions are only
comparable when measured side by side: for every evaluation request, each method (raw, turbo
cold, turbo warm, hybrid) replays the request with version A and with version B (which one goes
first alternates from request to request), and the
per-step cost (query at the budget + update, as ``bench_lookahead.py`` measures it) is collected
for both. Both versions replay the same recorded greedy outputs (``bench_lookahead.py run``), and
their committed draft tokens are printed too (they must be equal when the retrieval is meant to be
unchanged).

Usage::

    python benchmarks/bench_lookahead_ab.py --rev ced5253 --reference results/bench_lookahead_reference.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("raw", "turbo_cold", "turbo_warm", "hybrid")


def load_revision(rev: str, into: Path):
    """``lookahead`` as of ``rev``, importable as the package ``lookahead_ab``."""
    pkg = into / "lookahead_ab"
    pkg.mkdir()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:lookahead"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:lookahead/{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            (pkg / name).write_text(text)
    sys.path.insert(0, str(into))
    return {m: importlib.import_module(f"lookahead_ab.{m}") for m in ("raw", "trie", "turbo")}


class _Side:
    """One method of one version driving one request (mirrors bench_lookahead's sides)."""

    def __init__(self, mods, method, cache, req):
        self.mods, self.cache = mods, cache
        self.raw = None
        if method in ("raw", "hybrid"):
            self.raw = mods["raw"].RawLookaheadCache()
            self.raw.extend(req["prompt"] + req["output"][:1])
        self.h = None
        if method != "raw":
            self.h = cache.begin(req["prompt"])
            cache.extend(self.h, req["output"][:1])
            self.ctx = list(req["prompt"][-cache.max_match :]) + req["output"][:1]

    def query(self, budget):
        if self.h is None:
            return self.raw.query(budget)
        ctx = self.ctx[-self.cache.max_match :]
        if self.raw is None:
            return self.cache.query(ctx, budget)
        if hasattr(self.cache, "query_merged"):  # Hybrid as the version's drafter computes it
            return self.cache.query_merged(ctx, budget, self.raw.query(budget))
        return self.mods["trie"].merge_proposals([self.raw.query(budget), self.cache.query(ctx, budget)], budget)

    def update(self, toks):
        if self.raw is not None:
            self.raw.extend(toks)
        if self.h is not None:
            self.cache.extend(self.h, toks)
            self.ctx.extend(toks)
            del self.ctx[: -self.cache.max_match]

    def close(self):
        if self.h is not None:
            self.cache.end(self.h)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="git revision of version A (B = the working tree)")
    ap.add_argument("--reference", default="results/bench_lookahead_reference.json")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="replays of the whole evaluation")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() once each set's caches are built")
    ap.add_argument("--loaded", action="store_true",
                    help="warm caches saved and loaded before the replay (as bench_lookahead.py replay does) "
                         "instead of used as fed")
    args = ap.parse_args(argv)

    from benchmarks.bench_lookahead import feed, replay

    doc = json.loads(Path(args.reference).read_text())
    with tempfile.TemporaryDirectory() as d:
        versions = {args.rev: load_revision(args.rev, Path(d)),
                    "tree": {m: importlib.import_module(f"lookahead.{m}") for m in ("raw", "trie", "turbo")}}
        times: dict = {}
        accepted: dict = {}
        for rep in range(args.repeats):
            for s in doc["sets"].values():
                caches = {}
                for v, mods in versions.items():
                    caches[v] = {"turbo_cold": mods["turbo"].TurboLookaheadCache()}
                    for m in ("turbo_warm", "hybrid"):
                        caches[v][m] = c = mods["turbo"].TurboLookaheadCache()
                        for q in s["warm"]:
                            feed(c, q)
                        if args.loaded:  # as bench_lookahead's replay: a saved and loaded copy
                            path = Path(d) / f"{m}.json"
                            c.save(path)
                            caches[v][m] = mods["turbo"].TurboLookaheadCache.load(path)
                if args.gc_freeze:
                    gc.collect()
                    gc.freeze()
                for n, q in enumerate(s["eval"]):
                    # which version goes first alternates from request to request (the second run of
                    # a request finds its data in the CPU caches: a bias of a few % otherwise)
                    order = list(versions.items())[:: -1 if (n + rep) % 2 else 1]
                    for m in METHODS:
                        for v, mods in order:
                            ts = times.setdefault((m, v), [])
                            steps, _ = replay(_Side(mods, m, caches[v].get(m), q), q["output"], args.budget, ts)
                            if rep == 0:
                                accepted[(m, v)] = accepted.get((m, v), 0) + len(q["output"]) - 1 - steps
    print(f"per-step cost (query at budget {args.budget} + update), wall clock, {args.repeats} replays, "
          f"interleaved request by request; reference {args.reference}"
          f"{'; gc.freeze() after the caches were built' if args.gc_freeze else ''}"
          f"{'; warm caches saved + loaded' if args.loaded else ''}")
    for m in METHODS:
        for v in versions:
            us = sorted(t / 1e3 for t in times[(m, v)])
            print(f"  {m:11s} {v:8s} median {statistics.median(us):7.1f} us  p90 {us[int(0.9 * (len(us) - 1))]:7.1f} us"
                  f"  p99 {us[int(0.99 * (len(us) - 1))]:8.1f} us  committed drafts {accepted[(m, v)]}")
    sys.stdout.flush()


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
