"""Tune the self-speculative drafters (early exit, quantized copy) for one model and prompt set.

    python -m benchmarks.tune_selfspec --model smollm2-135m --dataset mtbench --limit 2 \
        --exit-layers 6,12,18,24 --thresholds none,0.4 --bits 8,4 --depth 4 --max-new-tokens 64

For every configuration: greedy decoding of each prompt through ``specdec.generate`` with the
drafter, checked token for token against plain autoregressive decoding (lossless or it is an
error), then

* alpha per depth (P(accept depth d | reached d), summed over prompts) and tau (tokens per verify step);
* draft cost = seconds per draft forward / seconds per target step (a target step = one
  autoregressive token of the same model through the same engine: the AR run's TPOT);
* estimated speedup = tau x t_target_step / (t_verify + t_draft) per verify step, with t_verify and
  t_draft measured in the run itself; and the measured speedup (tokens/s vs the AR run).

The best configuration by estimated speedup is printed last. Times are wall clock of this machine
(a busy shared CPU gives noisy costs; alpha and tau do not depend on timing).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["ConfigResult", "RunCounters", "load_prompt_ids", "main", "make_drafter", "markdown_table", "run_config"]


class RunCounters:
    """Wraps a drafter to count draft forwards: one per level of each proposed tree (the root /
    catch-up pass predicts level 1, each further level one pass). Reads the tree depth on the host
    once per step (benchmark only). Per-depth acceptance comes from the engine's own stats."""

    def __init__(self, inner):
        self.inner = inner
        self.forwards = 0
        self.prefill_s = 0.0  # the drafter's prompt forwards (inside the engine's draft_s)

    def __getattr__(self, name):  # check(), memory_report(), ... of the wrapped drafter
        return getattr(self.inner, name)

    def prefill(self, state):
        cuda = state.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(state.device)
        t = time.perf_counter()
        self.inner.prefill(state)
        if cuda:
            torch.cuda.synchronize(state.device)
        self.prefill_s += time.perf_counter() - t

    def propose(self, state, budget):
        tree = self.inner.propose(state, budget)
        self.forwards += int(tree.depths.max()) if tree.num_nodes > 1 else 0
        return tree

    def observe(self, state, accepted):
        self.inner.observe(state, accepted)


@dataclass
class ConfigResult:
    """One drafter configuration over a prompt set (greedy)."""

    name: str
    drafter: str
    dataset: str
    prompts: int = 0
    new_tokens: int = 0
    steps: int = 0
    tau: float = 0.0
    alpha: float = 0.0
    alpha_per_depth: list[float] = field(default_factory=list)
    reached_per_depth: list[int] = field(default_factory=list)
    draft_forwards_per_step: float = 0.0
    t_target_step_ms: float = 0.0  # AR TPOT of the same prompts
    t_draft_forward_ms: float = 0.0
    t_draft_step_ms: float = 0.0
    t_verify_step_ms: float = 0.0
    draft_cost: float = 0.0  # t_draft_forward / t_target_step
    est_speedup: float = 0.0  # tau * t_target / (t_verify + t_draft)
    measured_speedup: float = 0.0  # tokens/s over AR tokens/s
    tokens_per_s: float = 0.0
    lossless: bool = True
    extra: dict = field(default_factory=dict)


def load_prompt_ids(tokenizer, dataset: str, limit: int, offset: int = 0, ids_file: str | None = None) -> list[torch.Tensor]:
    """First turn of each prompt through the chat template, as ``[1, T]`` id tensors.

    ``ids_file``: a JSON ``{dataset: [[ids], ...]}`` written by ``--dump-prompt-ids`` (for machines
    without the prompt packages or the tokenizer).
    """
    if ids_file is not None:
        rows = json.loads(Path(ids_file).read_text())[dataset][offset:]
        return [torch.tensor([r]) for r in rows[:limit]]
    from experiments.prompts import chat_ids, load_prompts

    return [torch.tensor([chat_ids(tokenizer, r.turns[:1])]) for r in load_prompts(dataset, limit=limit, offset=offset)]


def dump_prompt_ids(tokenizer, datasets: list[str], limit: int, path: str, offset: int = 0) -> None:
    data = {d: [t[0].tolist() for t in load_prompt_ids(tokenizer, d, limit, offset)] for d in datasets}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data))
    print(f"wrote {path}: " + ", ".join(f"{d}={len(v)}" for d, v in data.items()))


def load_target(name: str, dtype: str = "float32", device: str = "cpu", gguf: str | None = None):
    """``(model, tokenizer)``: a packaged name / HF folder / hub id, or a GGUF file (``gguf``)."""
    if gguf is None:
        from specdec import load_model

        return load_model(name, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    g = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=getattr(torch, dtype))
    return model.to(device).eval(), None


def make_drafter(model, spec: dict):
    """Build a drafter from a spec: ``{"kind": "early_exit", exit_layer, threshold, ...}`` or
    ``{"kind": "quantized", bits, group_size, ...}``."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "early_exit":
        from drafters import EarlyExit

        return EarlyExit(model, **spec)
    if kind == "quantized":
        from drafters import QuantizedCopy

        return QuantizedCopy(model, **spec)
    raise ValueError(f"unknown drafter kind {kind!r}")


def spec_name(spec: dict) -> str:
    if spec["kind"] == "early_exit":
        s = f"early-exit k={spec['exit_layer']}"
        if spec.get("skip_layers"):
            s += f" skip={sorted(spec['skip_layers'])}"
        if spec.get("threshold") is not None:
            s += f" thr={spec['threshold']}"
    else:
        s = f"int{spec['bits']}" + (f" g{spec.get('group_size', 128)}" if spec["bits"] == 4 else "")
    if spec.get("branching", 1) > 1:
        s += f" tree b{spec['branching']} w{spec.get('width') or spec['branching']}"
    return s + f" d{spec.get('depth', 4)}"


def run_ar(model, prompts: list[torch.Tensor], max_new_tokens: int, progress=None) -> tuple[list[list[int]], float, float]:
    """Plain AR decoding through the engine: (outputs, seconds per token after the first, tokens/s)."""
    from specdec import generate

    outs, tpot_sum, n, tok, tot = [], 0.0, 0, 0, 0.0
    generate(model, prompts[0], max_new_tokens=8, eos_token_id=-1)  # warm-up (kernel JIT, allocator)
    for ids in prompts:
        o = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=-1)
        outs.append(o.new_tokens[0])
        tpot_sum += o.stats.tpot_s * max(o.stats.new_tokens - 1, 1)
        n += max(o.stats.new_tokens - 1, 1)
        tok += o.stats.new_tokens
        tot += o.stats.total_s
        if progress is not None:
            progress.update(1)
    return outs, tpot_sum / n, tok / tot


def _add(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum of two count lists of possibly different lengths."""
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def run_config(
    model,
    prompts: list[torch.Tensor],
    spec: dict,
    *,
    dataset: str,
    max_new_tokens: int,
    budget: int,
    reference: list[list[int]],
    t_target: float,
    ar_tps: float,
    progress=None,
    build: Callable = make_drafter,
) -> ConfigResult:
    """Greedy-decode every prompt with the drafter of ``spec``; aggregate acceptance and timings."""
    from specdec import generate

    res = ConfigResult(name=spec_name(spec), drafter=json.dumps(spec, default=list), dataset=dataset)
    t0 = time.perf_counter()
    drafter = RunCounters(build(model, spec))
    res.extra["build_s"] = time.perf_counter() - t0
    generate(model, prompts[0], drafter=drafter.inner, max_new_tokens=8, budget=budget, eos_token_id=-1)  # warm-up
    if hasattr(drafter.inner, "memory_report"):
        res.extra["memory"] = str(drafter.inner.memory_report())
    drafter.prefill_s = 0.0  # the timed calls only
    committed = draft_s = verify_s = total_s = 0.0
    drafted = accepted = 0
    reached_pd: list[int] = []
    accepted_pd: list[int] = []
    for ids, ref in zip(prompts, reference):
        o = generate(model, ids, drafter=drafter, max_new_tokens=max_new_tokens, budget=budget, eos_token_id=-1)
        if o.new_tokens[0] != ref:
            res.lossless = False
        st = o.stats
        res.prompts += 1
        res.new_tokens += st.new_tokens
        res.steps += st.verify_steps
        committed += st.tau * st.verify_steps
        draft_s += st.draft_s
        verify_s += st.verify_s
        total_s += st.total_s
        drafted += st.drafted_tokens
        accepted += st.accepted_tokens
        reached_pd = _add(reached_pd, st.reached_per_depth)
        accepted_pd = _add(accepted_pd, st.accepted_per_depth)
        if progress is not None:
            progress.update(1)
    if not res.lossless:
        raise AssertionError(f"{res.name}: output differs from autoregressive decoding (lossless violated)")
    D = max((d + 1 for d, r in enumerate(reached_pd) if r), default=0)
    res.reached_per_depth = reached_pd[:D]
    res.alpha_per_depth = [a / r if r else 0.0 for a, r in zip(accepted_pd[:D], reached_pd[:D])]
    steps = max(res.steps, 1)
    res.tau = committed / steps
    res.alpha = accepted / drafted if drafted else 0.0  # the engine's alpha: accepted / drafted tokens
    res.draft_forwards_per_step = drafter.forwards / steps
    res.t_target_step_ms = t_target * 1e3
    # per-step figures: the engine's draft_s less the drafter's prompt forwards (reported apart)
    res.extra["drafter_prefill_ms_per_prompt"] = drafter.prefill_s / max(res.prompts, 1) * 1e3
    draft_s = max(draft_s - drafter.prefill_s, 0.0)
    res.t_draft_step_ms = draft_s / steps * 1e3
    res.t_verify_step_ms = verify_s / steps * 1e3
    res.t_draft_forward_ms = draft_s / max(drafter.forwards, 1) * 1e3
    res.draft_cost = res.t_draft_forward_ms / res.t_target_step_ms if t_target > 0 else 0.0
    res.est_speedup = res.tau * t_target / ((draft_s + verify_s) / steps) if draft_s + verify_s > 0 else 0.0
    res.tokens_per_s = res.new_tokens / total_s if total_s > 0 else 0.0
    res.measured_speedup = res.tokens_per_s / ar_tps if ar_tps > 0 else 0.0
    return res


def markdown_table(results: list[ConfigResult], depths: int = 6) -> str:
    head = (
        "| dataset | drafter | " + " | ".join(f"α@{d}" for d in range(1, depths + 1))
        + " | τ | fwd/step | draft cost | est. speedup | measured | lossless |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [head, sep]
    for r in results:
        a = [f"{x:.2f}" for x in r.alpha_per_depth[:depths]] + ["–"] * max(0, depths - len(r.alpha_per_depth))
        rows.append(
            f"| {r.dataset} | {r.name} | " + " | ".join(a)
            + f" | {r.tau:.2f} | {r.draft_forwards_per_step:.2f} | {r.draft_cost:.2f} | {r.est_speedup:.2f}x"
            f" | {r.measured_speedup:.2f}x | {'yes' if r.lossless else 'NO'} |"
        )
    return "\n".join(rows)


def machine(device: str = "cpu") -> str:
    import os

    import transformers

    dev = torch.cuda.get_device_name() if str(device).startswith("cuda") else f"CPU ({torch.get_num_threads()} torch threads)"
    return (f"{dev}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def _csv(s: str, conv) -> list:
    return [conv(x) for x in s.split(",") if x.strip()]


def _thr(x: str):
    return None if x.strip().lower() in ("none", "off", "") else float(x)


def add_machine_args(p: argparse.ArgumentParser) -> None:
    """Where and how the target runs; shared by the tuning command and the acceptance benchmark."""
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gguf", default=None, help="load the target from this GGUF file instead of --model")
    p.add_argument("--prompt-ids", default=None, help="JSON of pre-tokenized prompts (see --dump-prompt-ids)")
    p.add_argument("--dump-prompt-ids", default=None, help="write pre-tokenized prompts to this JSON and exit")


def setup_target(args, datasets: list[str], offset: int = 0):
    """Apply ``add_machine_args`` options: returns ``(model, tokenizer)``, or None after ``--dump-prompt-ids``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.dump_prompt_ids:
        from specdec import load_model

        _, tok = load_model(args.model)
        dump_prompt_ids(tok, datasets, args.limit, args.dump_prompt_ids, offset)
        return None
    return load_target(args.model, getattr(args, "dtype", "float32"), args.device, args.gguf)


def main(argv: list[str] | None = None) -> list[ConfigResult]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="packaged name, HF folder or hub id")
    p.add_argument("--dataset", default="mtbench", choices=["mtbench", "humaneval", "gsm8k", "sharegpt"])
    p.add_argument("--limit", type=int, default=2, help="prompts")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--exit-layers", default="6,12,18,24", help="comma list of k; empty to skip early exit")
    p.add_argument("--thresholds", default="none", help="comma list of confidence thresholds ('none' = fixed depth)")
    p.add_argument("--bits", default="8,4", help="comma list of quantized-copy bit widths; empty to skip")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--branching", type=int, default=1)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--budget", type=int, default=None, help="max draft nodes per step (default: fits the tree)")
    p.add_argument("--dtype", default="float32")
    add_machine_args(p)
    p.add_argument("--out", default="results/tune_selfspec.json")
    args = p.parse_args(argv)
    from tqdm import tqdm

    loaded = setup_target(args, [args.dataset], args.offset)
    if loaded is None:
        return []
    model, tok = loaded
    n_layers = (model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config).num_hidden_layers
    prompts = load_prompt_ids(tok, args.dataset, args.limit, args.offset, args.prompt_ids)
    shape = dict(depth=args.depth, branching=args.branching, width=args.width)
    specs = [
        dict(kind="early_exit", exit_layer=k, threshold=t, **shape)
        for k in _csv(args.exit_layers, int)
        for t in _csv(args.thresholds, _thr)
    ]
    bits = _csv(args.bits, int)
    if bits:
        try:
            from drafters.quantized import QuantizedCopy  # noqa: F401
        except ImportError as e:
            print(f"[tune_selfspec] quantized copy unavailable ({e}); skipping bits={bits}")
            bits = []
    specs += [dict(kind="quantized", bits=b, group_size=args.group_size, **shape) for b in bits]
    for s in specs:
        if s["kind"] == "early_exit" and not 1 <= s["exit_layer"] <= n_layers:
            p.error(f"exit layer {s['exit_layer']} outside [1, {n_layers}] for {args.model}")
    budget = args.budget
    if budget is None:  # enough nodes for the full tree
        w = args.width or args.branching
        budget = sum(min(args.branching ** d, w * args.branching) for d in range(1, args.depth + 1))

    bar = tqdm(total=len(prompts) * (len(specs) + 1), desc="tune_selfspec", unit="run")
    reference, t_target, ar_tps = run_ar(model, prompts, args.max_new_tokens, bar)
    results = []
    for spec in specs:
        bar.set_postfix_str(spec_name(spec))
        results.append(
            run_config(model, prompts, spec, dataset=args.dataset, max_new_tokens=args.max_new_tokens, budget=budget,
                       reference=reference, t_target=t_target, ar_tps=ar_tps, progress=bar)
        )
    bar.close()
    print(f"\nmodel={args.model} ({n_layers} layers) dataset={args.dataset} prompts={len(prompts)} "
          f"new_tokens={args.max_new_tokens} budget={budget}; AR target step {t_target * 1e3:.1f} ms, "
          f"{ar_tps:.1f} tok/s; machine: {machine(args.device)}\n")
    print(markdown_table(results, depths=args.depth))
    best = max(results, key=lambda r: r.est_speedup) if results else None
    if best is not None:
        print(f"\nbest by estimated speedup: {best.name} (τ={best.tau:.2f}, draft cost {best.draft_cost:.2f}, "
              f"est. {best.est_speedup:.2f}x, measured {best.measured_speedup:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "args": vars(args), "machine": machine(args.device), "t_target_step_ms": t_target * 1e3, "ar_tokens_per_s": ar_tps,
        "results": [asdict(r) for r in results], "best": best.name if best else None,
    }, indent=2))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
