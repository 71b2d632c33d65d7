"""GPU fast-path benchmark (issue #6): everything in ONE invocation, side by side.

(a) Llama-3-8B-shaped bf16 model, random weights (timing only; 32 layers, hidden 4096, 32/8 heads,
    MLP 14336, vocab 128256, created on the GPU): the weight-read floor (weight bytes / measured
    device-copy bandwidth), HF ``generate`` AR, specdec AR eager and with CUDA graphs, the verify
    step (one graph replay) for N in {1, 2, 4, ..., 128}, and ``Replay`` end-to-end TPOT at
    tau ~ 2, 3, 4 (the target's own greedy continuation, corrupted; chain of 8 drafts).
(b) SmolLM2-135M-Instruct, real weights (fp32), MT-bench first turns: HF AR, HF prompt lookup
    (``prompt_lookup_num_tokens=10``), specdec AR, and every drafter: Raw / Turbo / Hybrid
    lookahead, EarlyExit, QuantizedCopy int8 / int4, DraftModel (the target drafting for itself), each
    model drafter twice: draft step as CUDA graphs (``specdec.draft_graphs``) and eager. Turbo and
    Hybrid also "(warm)": their cache first serves ``--warm-prompts`` other MT-bench first turns
    (disjoint from the timed ones, decoded here by specdec AR). With ``--compile`` on / both, the
    same rows with the target's forward compiled. TPOT, tau, speedup over specdec AR and over HF
    AR, greedy-equality rate.

Writes ``bench_gpu.json`` and ``bench_gpu.md`` to ``--out`` (sections are written as they finish,
so a timeout keeps what was measured). Targets (batch 1) are checked here and only here:
specdec AR <= 1.10x floor; verify(64) <= 1.15x verify(1); eta = AR step / (verify + draft) >= 0.85;
TPOT < floor at tau >= 2; SmolLM2 best drafter >= 20x HF AR and >= 2x specdec AR.

    python -m benchmarks.bench_gpu --out results/gpu                       # on the GPU machine
    python -m benchmarks.bench_gpu --smoke --out /tmp/smoke                 # CPU: tiny shapes, no graphs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

import torch

import specdec
from specdec.cuda_graph import DEFAULT_BUCKETS, CUDAGraphRunner, _RUNNERS, bucket_for
from specdec.generate import verify_step

RESULTS: dict = {}
MD: list[str] = []


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    (out / "bench_gpu.md").write_text("\n".join(MD) + "\n")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Graphs:
    """What specdec calls pass as ``cuda_graphs``: True on CUDA; on CPU (smoke) a capture-free runner
    per model, so the padded static-buffer path is exercised everywhere."""

    def __init__(self, cuda: bool, options: dict | None = None):
        self.cuda = cuda
        self.options = options or None  # Inductor options of the compiled rows (CUDA)
        self.cpu_runners: dict[tuple[int, bool], CUDAGraphRunner] = {}

    def compile_arg(self, compiled: bool):
        """``generate(compile=...)``: Inductor on CUDA; on CPU (smoke) the traced graph runs as is."""
        return ((self.options or True) if self.cuda else "aot_eager") if compiled else False

    def arg(self, model, verifier, need_len: int, compiled: bool = False):
        if self.cuda:
            return True
        key = (id(model), compiled)
        r = self.cpu_runners.get(key)
        if r is None or not r.fits(model, verifier, 1, need_len, 129):
            r = CUDAGraphRunner(model, verifier, verify_step, 1, need_len + 256, capture=False,
                                compile=self.compile_arg(compiled))
            self.cpu_runners[key] = r
        return r

    def kw(self, model, verifier, need_len: int, compiled: bool = False) -> dict:
        """``cuda_graphs`` / ``compile`` arguments of a specdec call (with or without the compiled forward)."""
        g = self.arg(model, verifier, need_len, compiled)
        return dict(cuda_graphs=g, compile=self.compile_arg(compiled) if g is True else False)

    def runner(self, model, compiled: bool = False):
        return _RUNNERS.get(model) if self.cuda else self.cpu_runners.get((id(model), compiled))


def hf_tpot(model, ids, n: int, force_len: bool = False, **kw) -> tuple[list[int], float, float]:
    """HF generate: (new tokens, TPOT, TTFT). TPOT = (t(n) - t(1)) / (new - 1).
    ``force_len``: never stop at EOS (random weights: timing only)."""
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, top_k=None, top_p=None, temperature=None, **kw)
    _sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)
    _sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=n, **(dict(kw, min_new_tokens=n) if force_len else kw))
    _sync()
    total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    return out[0, ids.shape[1]:].tolist(), (total - ttft) / max(new - 1, 1), ttft


def device_copy_bandwidth(device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of a few."""
    n = nbytes // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    x.fill_(1.0)
    best = float("inf")
    for _ in range(3):
        y.copy_(x)
    if device.type == "cuda":
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(5):
                y.copy_(x)
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3 / 5)
    else:
        t0 = time.perf_counter()
        y.copy_(x)
        best = time.perf_counter() - t0
    del x, y
    return 2 * nbytes / best


# ---------------------------------------------------------------- (a) 8B-shaped, random weights
def llama3_8b_config():
    """Llama-3-8B's shapes (32 layers, hidden 4096, MLP 14336, 32 / 8 heads, vocab 128256), for random weights."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def bench_8b(args, graphs: Graphs, device) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig
    from drafters import Replay
    from verifiers import auto_verifier

    if args.smoke:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        dtype = torch.float32
    else:
        cfg = llama3_8b_config()
        dtype = torch.bfloat16
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if args.peaked_8b:
        # Timing-only model with a bf16-robust argmax: with plain random weights the argmax is
        # near-tied and flips between GEMM shapes (M=1 AR vs M=16 tree), so a replayed continuation
        # stops matching after the first flip (measured: tau ~1.0 even at corruption 0). Zeroing the
        # residual branches' output projections and copying the embedding into the (untied) head
        # makes logits = E . norm(e_t): the argmax is the input token with a ~sqrt(hidden) margin.
        # Same shapes, same bytes, same kernels: timing is unchanged.
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
    _sync()
    R = RESULTS["8b"] = {"config": ("smoke-tiny" if args.smoke else "Llama-3-8B shape, bf16, random weights")
                         + (" (peaked: o/down proj zeroed, head = embedding)" if args.peaked_8b else ""),
                         "create_s": time.perf_counter() - t0}
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    bw = device_copy_bandwidth(device, min(4 << 30, max(wbytes, 64 << 20)))
    R.update(weight_bytes=wbytes, copy_bw_Bps=bw, floor_s=wbytes / bw,
             floor_no_embed_s=(wbytes - emb.numel() * emb.element_size()) / bw)
    log(f"8B: weights {wbytes / 1e9:.2f} GB, copy bw {bw / 1e12:.2f} TB/s, floor {R['floor_s'] * 1e3:.3f} ms")
    _write(args.out)

    T, NEW = args.prompt_len_8b, args.new_8b
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1)).to(device)
    no_eos = dict(eos_token_id=-1)  # random weights: run the full length (timing only)
    # HF generate AR
    hf_n = args.hf_new_8b
    hf_tpot(model, ids, 2, force_len=True)  # warm-up
    _, R["hf_ar_tpot_s"], _ = hf_tpot(model, ids, hf_n, force_len=True)
    log(f"8B HF generate AR TPOT {R['hf_ar_tpot_s'] * 1e3:.2f} ms")
    _write(args.out)

    verifier = auto_verifier(device)
    need = T + NEW
    # specdec AR eager
    eager = specdec.generate(model, ids, max_new_tokens=min(NEW, 32), verifier=verifier, cuda_graphs=False, **no_eos)
    R["specdec_ar_eager_tpot_s"] = eager.stats.tpot_s
    # GEMV probe: one bf16 [1, 4096] x [4096, 14336] linear (the MLP up projection), replayed in a graph
    if device.type == "cuda":
        w = model.model.layers[0].mlp.up_proj.weight
        x = torch.randn(1, w.shape[1], dtype=w.dtype, device=device)
        y = torch.nn.functional.linear(x, w)
        gg = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gg):
            for _ in range(20):
                y = torch.nn.functional.linear(x, w)
        gg.replay()
        a_, b_ = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a_.record()
        for _ in range(5):
            gg.replay()
        b_.record()
        b_.synchronize()
        t = a_.elapsed_time(b_) / 1e3 / 100
        R["gemv_up_proj_s"] = t
        R["gemv_up_proj_bw_fraction"] = w.numel() * w.element_size() / t / bw
        log(f"8B GEMV probe (up_proj, M=1): {t * 1e6:.1f} us = {R['gemv_up_proj_bw_fraction']:.2f} of copy bandwidth")

    for compiled in args.compile_modes:
        _graph_rows(args, graphs, model, ids, verifier, eager, R, compiled)
    del model
    _RUNNERS.clear()
    graphs.cpu_runners.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _graph_rows(args, graphs: Graphs, model, ids, verifier, eager, R0: dict, compiled: bool) -> None:
    """AR, verify(N) and Replay rows with graph-replayed steps; ``compiled``: the target forward
    inside them is torch.compile-d (results under ``R0["compiled"]``)."""
    R = R0.setdefault("compiled", {}) if compiled else R0
    tag = "[compiled] " if compiled else ""
    T, NEW = args.prompt_len_8b, args.new_8b
    need = T + NEW
    no_eos = dict(eos_token_id=-1)
    gk = graphs.kw(model, verifier, need, compiled)
    t0 = time.perf_counter()
    specdec.generate(model, ids, max_new_tokens=8, verifier=verifier, **gk, **no_eos)  # captures (and compiles)
    R["first_call_s"] = time.perf_counter() - t0
    # Timed calls: the median of ``--repeats`` generates, with every object alive now out of the
    # cyclic collector's way (after compiling, a full collection walks dynamo's and Inductor's objects
    # and lands in one timed call at random; the SmolLM2 rows below do the same).
    gc.collect()
    gc.freeze()
    full_gcs = gc.get_stats()[2]["collections"]
    R["repeats"] = max(1, args.repeats)
    try:
        ar = _median_run(args, lambda: specdec.generate(model, ids, max_new_tokens=NEW, verifier=verifier, **gk, **no_eos))
        _graph_rows_timed(args, graphs, model, ids, verifier, eager, R0, R, ar, gk, tag, compiled)
    finally:
        R["full_gc_while_timed"] = gc.get_stats()[2]["collections"] - full_gcs
        gc.unfreeze()


def python_loop_s() -> float:
    """Seconds for a fixed pure-Python loop (3000 additions)."""
    t0 = time.perf_counter()
    s = 0
    for i in range(3000):
        s += i
    return time.perf_counter() - t0


def host_gauge_us(samples: int = 15) -> float:
    """µs for :func:`python_loop_s` (median): how fast the host runs right now. A tree step's host
    work (tree, staging, launch, bookkeeping) sits between two replays, so η moves with it; the GPU
    machine's host was measured at 85-181 µs within one machine start (notes/issue6.md)."""
    xs = sorted(python_loop_s() for _ in range(samples))
    return xs[len(xs) // 2] * 1e6


def _median_run(args, call):
    """The run of median TPOT among ``args.repeats`` calls of ``call`` (a generate)."""
    runs = sorted((call() for _ in range(max(1, args.repeats))), key=lambda o: o.stats.tpot_s)
    return runs[len(runs) // 2]


def _graph_rows_timed(args, graphs, model, ids, verifier, eager, R0, R, ar, gk, tag, compiled) -> None:
    """The rows of :func:`_graph_rows` after its timed AR run ``ar``."""
    from drafters import Replay

    NEW = args.new_8b
    need = args.prompt_len_8b + NEW
    no_eos = dict(eos_token_id=-1)
    R["specdec_ar_tpot_s"] = ar.stats.tpot_s
    R["specdec_ar_vs_floor"] = ar.stats.tpot_s / R0["floor_s"]
    R["ar_graph_eq_eager"] = ar.new_tokens[0][: len(eager.new_tokens[0])] == eager.new_tokens[0]
    log(f"8B {tag}specdec AR graphs {ar.stats.tpot_s * 1e3:.3f} ms ({R['specdec_ar_vs_floor']:.3f}x floor); "
        f"graph==eager tokens: {R['ar_graph_eq_eager']}; first call (capture/compile) {R['first_call_s']:.1f} s")
    _write(args.out)

    # verify step per bucket (graph replays at a fixed committed length)
    runner = graphs.runner(model, compiled)
    prefix = min(need, runner.max_len - max(DEFAULT_BUCKETS) - 2)
    R["verify_prefix_len"] = prefix
    R["verify_s"] = {}
    for n in DEFAULT_BUCKETS:
        R["verify_s"][n] = runner.time_bucket(n, prefix, iters=args.iters)
        log(f"8B {tag}verify N={n:4d}: {R['verify_s'][n] * 1e3:.3f} ms")
    R["verify64_over_1"] = R["verify_s"][64] / R["verify_s"][1]
    R["capture_s"] = dict(runner.stats.captures)
    _write(args.out)

    # Replay at tau ~ 2, 3, 4 (chain of 8 drafts; tau = (1 - (1-c)^9) / c for corruption c).
    # The continuation must be the target's greedy output *as the verify step computes it*: with
    # random bf16 weights, near-tied argmaxes flip between the M=1 (AR) and M=16 (tree) GEMM
    # shapes, and after one flip a position-indexed replay never matches again. So: replay the AR
    # output once at c=0 and take what the tree verifier committed as the continuation.
    budget = 8
    kw0 = dict(max_new_tokens=NEW, verifier=verifier, **gk, budget=budget, **no_eos)
    cont = ar.new_tokens[0]
    for _ in range(2):
        cont = specdec.generate(model, ids, drafter=Replay(cont, 0.0), **kw0).new_tokens[0]
    R["replay_cont_eq_ar_prefix"] = next((i for i, (x, y) in enumerate(zip(cont, ar.new_tokens[0])) if x != y), len(cont))
    R["replay"] = []
    for c in (0.5, 0.32, 0.22, 0.0):
        kw = dict(max_new_tokens=NEW, verifier=verifier, **gk, budget=budget, **no_eos)
        specdec.generate(model, ids, drafter=Replay(cont, c, seed=1), **dict(kw, max_new_tokens=16))  # capture
        gauge = host_gauge_us()
        out = _median_run(args, lambda: specdec.generate(model, ids, drafter=Replay(cont, c, seed=1), **kw))
        s = out.stats
        per_step = (s.draft_s + s.verify_s) / max(s.verify_steps, 1)
        row = dict(corruption=c, budget=budget, tau=s.tau, tpot_s=s.tpot_s, tpot_vs_floor=s.tpot_s / R0["floor_s"],
                   speedup_vs_ar=R["specdec_ar_tpot_s"] / s.tpot_s, draft_per_step_s=s.draft_s / max(s.verify_steps, 1),
                   verify_per_step_s=s.verify_s / max(s.verify_steps, 1),
                   eta=R["specdec_ar_tpot_s"] / per_step, equal_to_cont=out.new_tokens[0] == cont,
                   host_gauge_us=(gauge, host_gauge_us()))
        R["replay"].append(row)
        log(f"8B {tag}Replay c={c}: tau {s.tau:.2f} TPOT {s.tpot_s * 1e3:.3f} ms ({row['tpot_vs_floor']:.2f}x floor) "
            f"eta {row['eta']:.3f} equal {row['equal_to_cont']}")
        _write(args.out)
    del runner


# ---------------------------------------------------------------- (b) SmolLM2-135M, MT-bench
def load_smollm2(args, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.smollm2_gguf:
        p = Path(args.smollm2_gguf)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=getattr(torch, args.smollm2_dtype))
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        return model.to(device).eval(), tok
    return specdec.load_model("smollm2-135m", dtype=args.smollm2_dtype, device=device)


def mtbench_first_turns(args) -> list[str]:
    if args.mtbench:
        rows = [json.loads(line) for line in Path(args.mtbench).read_text().splitlines() if line.strip()]
        return [r["turns"][0] for r in rows]
    from experiments.prompts import load_prompts

    return [r.turns[0] for r in load_prompts("mtbench")]


def _decode_warm_split(model, warm_prompts, args, verifier, gk) -> list[tuple[list[int], list[int]]]:
    """(prompt, greedy output) of every warm-up request, decoded by specdec AR (graph-replayed)."""
    from tqdm import tqdm

    out = []
    t0 = time.perf_counter()
    for p in tqdm(warm_prompts, desc="warm-up split", disable=not warm_prompts):
        o = specdec.generate(model, p, max_new_tokens=args.new, verifier=verifier, **gk)
        out.append((p[0].tolist(), o.new_tokens[0]))
    if out:
        log(f"SmolLM2 warm-up split: {len(out)} requests, {sum(len(o) for _, o in out)} tokens "
            f"decoded in {time.perf_counter() - t0:.1f}s")
    return out


def _warm_cache(warm_outputs):
    """A Turbo cache that has served the warm-up split (prompt-side and output-side statistics, as
    serving those requests would have left them), children ranked."""
    from benchmarks.bench_lookahead import feed
    from lookahead import TurboLookaheadCache

    cache = TurboLookaheadCache()
    for prompt, output in warm_outputs:
        feed(cache, {"prompt": prompt, "output": output})
    cache.rank_all()
    return cache


def bench_smollm2(args, graphs: Graphs, device) -> None:
    from drafters import DraftModel, EarlyExit, HybridLookahead, QuantizedCopy, RawLookahead, TurboLookahead
    from experiments.prompts import chat_ids
    from verifiers import auto_verifier

    t0 = time.perf_counter()
    model, tok = load_smollm2(args, device)
    R = RESULTS["smollm2"] = {"load_s": time.perf_counter() - t0, "dtype": args.smollm2_dtype, "new_tokens": args.new,
                              "prompts": args.prompts}
    log(f"SmolLM2 loaded in {R['load_s']:.1f}s")
    turns = mtbench_first_turns(args)
    # spread over the 8 categories: every 10th question
    step = max(1, len(turns) // args.prompts)
    eval_idx = list(range(0, len(turns), step))[: args.prompts]
    prompts = [torch.tensor([chat_ids(tok, [turns[i]])], device=device) for i in eval_idx]
    # the warm-up split of the "(warm)" Turbo rows: the other questions, disjoint from the timed ones
    warm_turns = [t for i, t in enumerate(turns) if i not in set(eval_idx)][: args.warm_prompts]
    warm_prompts = [torch.tensor([chat_ids(tok, [t])], device=device) for t in warm_turns]
    verifier = auto_verifier(device)
    need = max(p.shape[1] for p in prompts + warm_prompts) + args.new
    rows = R["rows"] = {}

    def hf_row(name, **kw):
        hf_tpot(model, prompts[0], 4, **kw)  # warm-up
        toks, tp = [], []
        for p in prompts:
            out, tpot, _ = hf_tpot(model, p, args.new, **kw)
            toks.append(out)
            tp.append(tpot)
        rows[name] = dict(tpot_s=sum(tp) / len(tp), tau=None, tokens=toks)
        log(f"SmolLM2 {name}: TPOT {rows[name]['tpot_s'] * 1e3:.2f} ms")
        _write(args.out)

    hf_row("HF AR")
    hf_row("HF prompt lookup (10)", prompt_lookup_num_tokens=10)

    import re

    def spec_row(name, make_drafter, budget, graphed=True, compiled=False):
        if args.skip_rows and re.search(args.skip_rows, name):
            log(f"SmolLM2 {name}: skipped (--skip-rows)")
            return
        if graphed and not compiled and False not in args.compile_modes:
            log(f"SmolLM2 {name}: skipped (--compile on)")
            return
        gk = graphs.kw(model, verifier, need, compiled) if graphed else dict(cuda_graphs=False)
        try:
            specdec.generate(model, prompts[0], drafter=make_drafter(), max_new_tokens=min(16, args.new), budget=budget,
                             verifier=verifier, **gk)  # warm-up: captures the buckets (and compiles)
            runner = graphs.runner(model, compiled) if graphed else None
            if runner is not None and budget:  # every verify bucket a tree of this budget can use: captured now
                for nb in runner.buckets:
                    if 1 < nb <= (bucket_for(budget + 1, runner.buckets) or 0):
                        runner._bucket(nb, root_only=False)
            # every timed prompt once, briefly: its length's one-time work (Triton compiles of new
            # specializations in the target's and the drafter's prompt forwards: 0.5-1.4 s each on the
            # H200, tenth session) must not land in a timed call (the drafter's prefill counts as draft);
            # the global lookahead tries would learn the prompts from it, so they warm the target only
            learns = isinstance(make_drafter(), (TurboLookahead, HybridLookahead))
            for p in prompts:
                specdec.generate(model, p, drafter=None if learns else make_drafter(), max_new_tokens=2,
                                 budget=0 if learns else budget, verifier=verifier, **gk)
            n_verify = len(runner._buckets) if runner is not None else 0
            dg = getattr(make_drafter(), "graphs", None)  # the drafter's own graphs (specdec.draft_graphs)
            if dg is not None:  # warm up every catch-up length / level shape before timing
                for p in prompts[:2]:
                    specdec.generate(model, p, drafter=make_drafter(), max_new_tokens=args.new, budget=budget,
                                     verifier=verifier, **gk)
            n_capt = len(dg.stats.captures) if dg is not None else 0
            toks, tp, taus, steps, drafts, verifs = [], [], [], 0, 0.0, 0.0
            # Every object alive now (tries of the lookahead caches: ~10^5-10^6 Python objects) out of
            # the collector's way: a full collection over them costs ~0.1-0.4 s and would land in
            # some row's timed calls at random (HybridLookahead [compiled] measured 1.8x slow twice).
            gc.collect()
            gc.freeze()
            full_gcs = gc.get_stats()[2]["collections"]
            try:
                for p in prompts:
                    out = specdec.generate(model, p, drafter=make_drafter(), max_new_tokens=args.new, budget=budget,
                                           verifier=verifier, **gk)
                    s = out.stats
                    toks.append(out.new_tokens[0])
                    tp.append(s.tpot_s)
                    taus.append((s.tau, s.verify_steps))
                    steps += s.verify_steps
                    drafts += s.draft_s
                    verifs += s.verify_s
            finally:
                full_gcs = gc.get_stats()[2]["collections"] - full_gcs
                gc.unfreeze()
            tau = sum(t * n for t, n in taus) / max(sum(n for _, n in taus), 1)
            rows[name] = dict(tpot_s=sum(tp) / len(tp), tau=tau, tokens=toks, budget=budget, compiled=compiled,
                              draft_per_step_s=drafts / max(steps, 1), verify_per_step_s=verifs / max(steps, 1),
                              full_gc_while_timed=full_gcs)
            if runner is not None:
                rows[name]["verify_graphs_captured_while_timed"] = len(runner._buckets) - n_verify
            if dg is not None:
                rows[name]["draft_graphs"] = dict(
                    captured=len(dg.stats.captures), captured_while_timed=len(dg.stats.captures) - n_capt,
                    capture_s=sum(dg.stats.captures.values()), replays=dg.stats.replays,
                    static_runs=dg.stats.static_runs, disabled=dg.disabled)
            log(f"SmolLM2 {name}: TPOT {rows[name]['tpot_s'] * 1e3:.3f} ms tau {tau:.2f} "
                f"draft/step {rows[name]['draft_per_step_s'] * 1e3:.2f} ms verify/step {rows[name]['verify_per_step_s'] * 1e3:.2f} ms")
        except Exception as e:  # one broken drafter must not sink the table
            rows[name] = dict(error=f"{type(e).__name__}: {e}")
            log(f"SmolLM2 {name}: FAILED {e}\n{traceback.format_exc()}")
        _write(args.out)

    spec_row("specdec AR (eager)", lambda: None, 0, graphed=False)
    spec_row("specdec AR", lambda: None, 0)
    LB = args.lookahead_budget
    spec_row("RawLookahead", lambda: RawLookahead(), LB)
    turbo = TurboLookahead()  # one global trie across the prompts (learns as it serves)
    spec_row("TurboLookahead", lambda: turbo, LB)
    hybrid = HybridLookahead()
    spec_row("HybridLookahead", lambda: hybrid, LB)
    warm_outputs = _decode_warm_split(model, warm_prompts, args, verifier, graphs.kw(model, verifier, need))
    R["warm_split"] = dict(requests=len(warm_outputs), output_tokens=sum(len(o) for _, o in warm_outputs))
    if warm_outputs:
        turbo_w = TurboLookahead(_warm_cache(warm_outputs))
        spec_row("TurboLookahead (warm)", lambda: turbo_w, LB)
        hybrid_w = HybridLookahead(_warm_cache(warm_outputs))
        spec_row("HybridLookahead (warm)", lambda: hybrid_w, LB)
    D = args.model_depth
    # model drafters: draft step as CUDA graphs (specdec.draft_graphs; on CUDA, the default) first,
    # then the eager draft step (cuda_graphs=False) -- the verify step is graph-replayed in both.
    # One drafter object per row, reused across prompts (its graphs / quantized copy are built once).
    model_rows = [
        (f"EarlyExit(8/30 layers, depth {D})", lambda dg: EarlyExit(model, exit_layer=8, depth=D, cuda_graphs=dg)),
        (f"QuantizedCopy int8 (depth {D})", lambda dg: QuantizedCopy(model, bits=8, depth=D, cuda_graphs=dg)),
        (f"QuantizedCopy int4 (depth {D})", lambda dg: QuantizedCopy(model, bits=4, group_size=64, depth=D, cuda_graphs=dg)),
        (f"DraftModel(self, depth {D})", lambda dg: DraftModel(model, depth=D, cuda_graphs=dg)),
    ]
    draft_modes = [("graph draft", None if graphs.cuda else "static"), ("eager draft", False)]
    for label, dg in draft_modes:
        for name, make in model_rows:
            row = f"{name} [{label}]"
            if args.skip_rows and re.search(args.skip_rows, row):
                log(f"SmolLM2 {row}: skipped (--skip-rows)")
                continue
            d = make(dg)
            spec_row(row, lambda d=d: d, D)
            del d
            gc.collect()
    if True in args.compile_modes:  # the same rows with the target forward torch.compile-d in the verify graphs
        spec_row("specdec AR [compiled]", lambda: None, 0, compiled=True)
        turbo_c = TurboLookahead()  # fresh: learns over the same calls as the uncompiled row's cache
        spec_row("TurboLookahead [compiled]", lambda: turbo_c, LB, compiled=True)
        hybrid_c = HybridLookahead()
        spec_row("HybridLookahead [compiled]", lambda: hybrid_c, LB, compiled=True)
        if warm_outputs:
            turbo_wc = TurboLookahead(_warm_cache(warm_outputs))
            spec_row("TurboLookahead (warm) [compiled]", lambda: turbo_wc, LB, compiled=True)
            hybrid_wc = HybridLookahead(_warm_cache(warm_outputs))
            spec_row("HybridLookahead (warm) [compiled]", lambda: hybrid_wc, LB, compiled=True)
        for name, make in model_rows:
            row = f"{name} [graph draft, compiled]"
            if args.skip_rows and re.search(args.skip_rows, row):
                log(f"SmolLM2 {row}: skipped (--skip-rows)")
                continue
            d = make(draft_modes[0][1])
            spec_row(row, lambda d=d: d, D, compiled=True)
            del d
            gc.collect()

    # derived columns
    hf = rows["HF AR"]["tpot_s"]
    ref_hf = rows["HF AR"]["tokens"]
    for name, r in rows.items():
        if "error" in r:
            continue
        ar_row = rows.get("specdec AR [compiled]" if r.get("compiled") else "specdec AR", {})  # same mode
        ar, ref_ar = ar_row.get("tpot_s"), ar_row.get("tokens")
        r["speedup_vs_hf_ar"] = hf / r["tpot_s"]
        r["speedup_vs_specdec_ar"] = ar / r["tpot_s"] if ar else None
        r["equal_to_hf_ar"] = sum(a == b for a, b in zip(r["tokens"], ref_hf)) / len(ref_hf)
        r["equal_to_specdec_ar"] = sum(a == b for a, b in zip(r["tokens"], ref_ar)) / len(ref_ar) if ref_ar else None
    _write(args.out)


# ---------------------------------------------------------------- report
def fmt_ms(x):
    return "—" if x is None else f"{x * 1e3:.3f}"


def _report_8b_mode(a: dict, tag: str, targets: dict) -> None:
    """Verify-step and Replay tables of one 8B mode (graphs, or graphs + compiled forward), and its targets."""
    if "verify_s" in a:
        MD.append(f"\nverify step{tag} (one graph replay, committed prefix {a['verify_prefix_len']}):\n")
        MD.append("| N | " + " | ".join(str(n) for n in a["verify_s"]) + " |")
        MD.append("|---" * (len(a["verify_s"]) + 1) + "|")
        MD.append("| ms | " + " | ".join(f"{v * 1e3:.3f}" for v in a["verify_s"].values()) + " |")
        MD.append("| × N=1 | " + " | ".join(f"{v / a['verify_s'][1]:.2f}" for v in a["verify_s"].values()) + " |")
    if "full_gc_while_timed" in a:
        MD.append(f"\nAR and Replay rows{tag}: the median of {a.get('repeats', '?')} timed generates each, cyclic GC frozen "
                  f"(full collections while timed: {a['full_gc_while_timed']}).")
    if a.get("replay"):
        MD.append(f"\n| Replay{tag} corruption (chain 8) | τ | TPOT ms | × floor | speedup vs specdec AR | draft+verify per step ms | η | tokens = continuation | host gauge µs before / after |")
        MD.append("|---|---|---|---|---|---|---|---|---|")
        for r in a["replay"]:
            g = r.get("host_gauge_us")
            MD.append(f"| {r['corruption']} | {r['tau']:.2f} | {fmt_ms(r['tpot_s'])} | {r['tpot_vs_floor']:.2f} | "
                      f"{r['speedup_vs_ar']:.2f} | {(r['draft_per_step_s'] + r['verify_per_step_s']) * 1e3:.3f} | "
                      f"{r['eta']:.3f} | {r['equal_to_cont']} | "
                      + (f"{g[0]:.0f} / {g[1]:.0f} |" if g else "– |"))
        MD.append("\n(host gauge: a fixed pure-Python loop, median of 15; the draft + verify steps include "
                  "the host's work between replays, so they and η move with it)")
    if "specdec_ar_vs_floor" in a:
        targets[f"specdec AR{tag} <= 1.10x floor"] = (round(a["specdec_ar_vs_floor"], 3), a["specdec_ar_vs_floor"] <= 1.10)
    if "verify64_over_1" in a:
        targets[f"verify(64) <= 1.15x verify(1){tag}"] = (round(a["verify64_over_1"], 3), a["verify64_over_1"] <= 1.15)
    reps = [r for r in a.get("replay", []) if r["corruption"] > 0]
    if reps:
        eta = min(r["eta"] for r in reps)
        targets[f"eta >= 0.85 (min over tau 2-4){tag}"] = (round(eta, 3), eta >= 0.85)
        ok = [r for r in reps if r["tau"] >= 2]
        if ok:
            worst = max(r["tpot_vs_floor"] for r in ok)
            targets[f"TPOT < floor at tau >= 2 (worst){tag}"] = (round(worst, 3), worst < 1.0)


def report(args, device) -> None:
    MD.clear()
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (smoke)"
    MD.append(f"# bench_gpu — {dev}, torch {torch.__version__}\n")
    if RESULTS.get("compile_options") and device.type == "cuda":
        MD.append(f"Compiled rows: `generate(compile={RESULTS['compile_options']!r})` (Inductor options).\n")
    a = RESULTS.get("8b")
    targets = RESULTS.setdefault("targets", {})
    if a:
        MD.append(f"## (a) {a['config']}\n")
        MD.append(f"weights {a['weight_bytes'] / 1e9:.2f} GB; measured copy bandwidth {a['copy_bw_Bps'] / 1e12:.2f} TB/s; "
                  f"**floor {a['floor_s'] * 1e3:.3f} ms/token** (without the embedding table: {a['floor_no_embed_s'] * 1e3:.3f} ms)\n")
        MD.append("| decoder | TPOT ms | × floor |\n|---|---|---|")
        for k, name in (("hf_ar_tpot_s", "HF generate AR"), ("specdec_ar_eager_tpot_s", "specdec AR (eager)"),
                        ("specdec_ar_tpot_s", "specdec AR (CUDA graphs)")):
            if k in a:
                MD.append(f"| {name} | {fmt_ms(a[k])} | {a[k] / a['floor_s']:.2f} |")
        c = a.get("compiled", {})
        if "specdec_ar_tpot_s" in c:
            MD.append(f"| specdec AR (CUDA graphs, compiled forward) | {fmt_ms(c['specdec_ar_tpot_s'])} | "
                      f"{c['specdec_ar_tpot_s'] / a['floor_s']:.2f} |")
        for tag, r in (("", a), (" [compiled]", c)):
            _report_8b_mode(r, tag, targets)
    b = RESULTS.get("smollm2")
    if b and b.get("rows"):
        MD.append(f"\n## (b) SmolLM2-135M-Instruct ({b['dtype']}), MT-bench first turns × {b['prompts']}, {b['new_tokens']} new tokens\n")
        MD.append("| decoder | TPOT ms | τ | × HF AR | × specdec AR | = HF AR | = specdec AR | draft ms/step | verify ms/step |\n"
                  "|---|---|---|---|---|---|---|---|---|")
        for name, r in b["rows"].items():
            if "error" in r:
                MD.append(f"| {name} | failed: {r['error'][:80]} | | | | | | | |")
                continue
            tau = "—" if r["tau"] is None else f"{r['tau']:.2f}"
            sa = "—" if r.get("speedup_vs_specdec_ar") is None else f"{r['speedup_vs_specdec_ar']:.2f}"
            ea = "—" if r.get("equal_to_specdec_ar") is None else f"{r['equal_to_specdec_ar']:.2f}"
            MD.append(f"| {name} | {fmt_ms(r['tpot_s'])} | {tau} | {r.get('speedup_vs_hf_ar', 0):.1f} | {sa} | "
                      f"{r.get('equal_to_hf_ar', 0):.2f} | {ea} | {fmt_ms(r.get('draft_per_step_s'))} | "
                      f"{fmt_ms(r.get('verify_per_step_s'))} |")
        spec = {n: r for n, r in b["rows"].items() if "error" not in r and r.get("tau") is not None
                and not n.startswith("specdec AR") and r.get("speedup_vs_specdec_ar")}
        for compiled in (False, True):
            mode = {n: r for n, r in spec.items() if bool(r.get("compiled")) == compiled}
            if not mode:
                continue
            best = max(mode, key=lambda n: mode[n]["speedup_vs_specdec_ar"])
            ar_name = "specdec AR [compiled]" if compiled else "specdec AR"
            targets[f"SmolLM2 best ({best}) >= 20x HF AR"] = (round(mode[best]["speedup_vs_hf_ar"], 2), mode[best]["speedup_vs_hf_ar"] >= 20)
            targets[f"SmolLM2 best ({best}) >= 2x {ar_name}"] = (round(mode[best]["speedup_vs_specdec_ar"], 2), mode[best]["speedup_vs_specdec_ar"] >= 2)
    if targets:
        MD.append("\n## targets\n\n| target | measured | met |\n|---|---|---|")
        for k, (v, ok) in targets.items():
            MD.append(f"| {k} | {v} | {'yes' if ok else 'NO'} |")
    _write(args.out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results/gpu")))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (CI / CPU check of the script)")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--smollm2-gguf", default=None, help="GGUF file (default: the packaged model)")
    ap.add_argument("--mtbench", default=None, help="MT-bench question.jsonl (default: the installed package)")
    ap.add_argument("--smollm2-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="SmolLM2 weights/activations (float32: specdec == HF greedy exactly; 16-bit: the "
                         "equality columns measure how often the two agree)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len-8b", type=int, default=128)
    ap.add_argument("--new-8b", type=int, default=128)
    ap.add_argument("--hf-new-8b", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="8B AR and Replay rows: the median of this many timed generates")
    ap.add_argument("--no-peaked-8b", dest="peaked_8b", action="store_false",
                    help="keep the 8B model's random weights as created (argmax near-ties: Replay tau collapses)")
    ap.add_argument("--lookahead-budget", type=int, default=15)
    ap.add_argument("--warm-prompts", type=int, default=72,
                    help="MT-bench first turns (disjoint from the timed ones) that warm the '(warm)' Turbo rows; 0: no such rows")
    ap.add_argument("--model-depth", type=int, default=4)
    ap.add_argument("--skip-rows", default=None, help="regex: SmolLM2 specdec rows whose names match are not run")
    ap.add_argument("--compile", choices=("off", "on", "both"), default="both",
                    help="graph rows without / with the target forward torch.compile-d (generate(compile=True)), or both")
    ap.add_argument("--compile-options", type=json.loads, default=None, metavar="JSON",
                    help='Inductor options of the compiled rows, e.g. \'{"freezing": true}\' (generate(compile={...}))')
    args = ap.parse_args(argv)
    args.compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.prompts, args.new, args.new_8b, args.hf_new_8b, args.iters = min(args.prompts, 2), min(args.new, 12), 96, 4, 2
        args.warm_prompts = min(args.warm_prompts, 2)
        args.prompt_len_8b = 16
    graphs = Graphs(device.type == "cuda", args.compile_options)
    RESULTS["compile_options"] = args.compile_options
    RESULTS["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    RESULTS["torch"] = torch.__version__
    import transformers

    RESULTS["transformers"] = transformers.__version__
    from specdec.gemm_pick import shared_picker

    with torch.inference_mode():
        for name, fn in (("8b", bench_8b), ("smollm2", bench_smollm2)):
            if getattr(args, f"skip_{name}", False):
                continue
            try:
                fn(args, graphs, device)
            except Exception as e:
                RESULTS.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                log(f"section {name} FAILED: {e}\n{traceback.format_exc()}")
            RESULTS["gemm_pick"] = shared_picker().summary()  # per-shape GEMM formulations used (CUDA)
            report(args, device)
    report(args, device)
    print("\n".join(MD), flush=True)


if __name__ == "__main__":
    main()
