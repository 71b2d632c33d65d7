"""Session 13 probe (archived copy; its host gauge now comes from benchmarks.bench_gpu): where does a Replay step's time go, per runner variant (8B peaked, bf16)?

Per step: host time of propose / _load / graph launch, the host's wait for the read-back, the
host's work after it, and the replay's GPU time (events around CUDAGraph.replay).
"""
import gc
import json
import os
import statistics as st
import sys
import time

import torch

import specdec
from specdec import cuda_graph as CG
from drafters import Replay
from verifiers import auto_verifier
from benchmarks.bench_gpu import host_gauge_us, llama3_8b_config
from transformers import AutoModelForCausalLM

OUT = os.environ.get("OUT", "/tmp")
VARIANTS = [v for v in os.environ.get("VARIANTS", "default,pdl,pdl_all").split(",") if v]
OPTS = {"default": True, "pdl": {"pdl": True}, "pdl_all": {"pdl": "all"}}
dev = torch.device("cuda")
_IM = torch.inference_mode()
_IM.__enter__()
cfg = llama3_8b_config()
torch.manual_seed(0)
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
with torch.no_grad():
    model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
T, NEW = 128, 128
ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).to(dev)
ver = auto_verifier(dev)
no_eos = dict(eos_token_id=-1)

ON = [False]
EV = [torch.cuda.Event(enable_timing=True) for _ in range(4000)]
REC: list[dict] = []


def now():
    return time.perf_counter()


_propose, _observe = Replay.propose, Replay.observe
_load, _replay = CG.CUDAGraphRunner._load, torch.cuda.CUDAGraph.replay


def propose(self, state, budget):
    if not ON[0]:
        return _propose(self, state, budget)
    r = {"p0": now()}
    REC.append(r)
    t = _propose(self, state, budget)
    r["p1"] = now()
    return t


def observe(self, state, res):
    if ON[0] and REC:
        REC[-1]["o0"] = now()
    _observe(self, state, res)
    if ON[0] and REC:
        REC[-1]["o1"] = now()


def load(self, b, tree):
    if not ON[0] or not REC:
        return _load(self, b, tree)
    t0 = now()
    _load(self, b, tree)
    REC[-1]["load"] = now() - t0


def replay(self):
    if not ON[0] or not REC:
        return _replay(self)
    r = REC[-1]
    i = 2 * (len(REC) - 1)
    e0, e1 = EV[i % 4000], EV[(i + 1) % 4000]
    r["r0"] = now()
    e0.record()
    _replay(self)
    e1.record()
    r["r1"] = now()
    r["ev"] = (e0, e1)


Replay.propose, Replay.observe = propose, observe
CG.CUDAGraphRunner._load = load
torch.cuda.CUDAGraph.replay = replay


def med(xs):
    return st.median(xs) if xs else float("nan")


def summarize(recs):
    torch.cuda.synchronize()
    out = {k: [] for k in ("propose", "load", "launch", "wait", "post", "gpu", "wall", "pre")}
    for a, b in zip(recs, recs[1:]):
        if "ev" not in a or "o1" not in a:
            continue
        out["propose"].append(a["p1"] - a["p0"])
        out["load"].append(a.get("load", 0.0))
        out["pre"].append(a["r0"] - a["p0"])  # propose + step up to the replay call
        out["launch"].append(a["r1"] - a["r0"])
        out["wait"].append(a["o0"] - a["r1"])  # read-back wait + token bookkeeping
        out["post"].append(b["p0"] - a["o0"])  # observe + loop until the next propose
        out["gpu"].append(a["ev"][0].elapsed_time(a["ev"][1]) / 1e3)
        out["wall"].append(b["p0"] - a["p0"])
    return {k: med(v) * 1e6 for k, v in out.items()} | {"steps": len(out["wall"]),
                                                        "idle_us": (med(out["wall"]) - med(out["gpu"])) * 1e6}


def gauge():  # (as run: the same loop, defined here, median of 30)
    return host_gauge_us(30)


RES = {}
for vi, name in enumerate(VARIANTS):
    comp = OPTS[name]
    CG._RUNNERS.clear()
    gc.collect()
    torch.cuda.empty_cache()
    R = RES[f"{vi}:{name}"] = {"compile": repr(comp)}
    kw = dict(verifier=ver, cuda_graphs=True, compile=comp, **no_eos)
    t0 = now()
    specdec.generate(model, ids, max_new_tokens=8, **kw)
    R["first_call_s"] = now() - t0
    gc.collect()
    gc.freeze()
    ars = sorted((specdec.generate(model, ids, max_new_tokens=NEW, **kw) for _ in range(3)), key=lambda o: o.stats.tpot_s)
    ar = ars[1]
    R["ar_ms"] = [o.stats.tpot_s * 1e3 for o in ars]
    runner = CG._RUNNERS.get(model)
    R["verify_ms"] = {n: runner.time_bucket(n, T + NEW, iters=20) * 1e3 for n in (1, 16, 64)}
    print(name, "AR", R["ar_ms"], "verify", R["verify_ms"], flush=True)
    cont = ar.new_tokens[0]
    for _ in range(2):
        cont = specdec.generate(model, ids, drafter=Replay(cont, 0.0), budget=8, max_new_tokens=NEW, **kw).new_tokens[0]
    R["replay"] = {}
    for c in (0.32, 0.0):
        specdec.generate(model, ids, drafter=Replay(cont, c, seed=1), budget=8, max_new_tokens=16, **kw)
        rows = []
        for rep in range(3):
            g0 = gauge()
            REC.clear()
            ON[0] = True
            o = specdec.generate(model, ids, drafter=Replay(cont, c, seed=1), budget=8, max_new_tokens=NEW, **kw)
            ON[0] = False
            s = o.stats
            per = (s.draft_s + s.verify_s) / max(s.verify_steps, 1)
            rows.append(dict(gauge_us=(g0, gauge()), tau=s.tau, tpot_ms=s.tpot_s * 1e3, per_step_ms=per * 1e3, eta=ar.stats.tpot_s / per,
                             equal=o.new_tokens[0] == cont, **summarize(list(REC))))
        # and uninstrumented, for the overhead of the probe itself
        plain = [specdec.generate(model, ids, drafter=Replay(cont, c, seed=1), budget=8, max_new_tokens=NEW, **kw).stats
                 for _ in range(3)]
        R["replay"][c] = {"instrumented": rows,
                          "plain_per_step_ms": [(s.draft_s + s.verify_s) / s.verify_steps * 1e3 for s in plain]}
        print(name, "c", c, json.dumps(rows[1]), "plain", R["replay"][c]["plain_per_step_ms"], flush=True)
    gc.unfreeze()
    del runner
    json.dump(RES, open(os.path.join(OUT, "s13_replay.json"), "w"), indent=1, default=str)
print("done", flush=True)
