"""One experiment: one target x one drafter x one prompt set, measured request by request.

    python -m experiments.run [overrides]                       # one config
    python -m experiments.run -m sweep=acceptance_vs_tpot       # a Hydra multirun (basic launcher)
    python -m experiments.run -m hydra/launcher=joblib ...      # jobs in parallel processes

Writes into the Hydra run directory:
    requests.jsonl / requests.csv   one row per request (= one turn of one prompt)
    summary.json                    aggregate metrics + the run's knobs (what the report reads)
    wandb/offline-run-*             the W&B run (config = resolved Hydra config, per-request
                                    table, summary, alpha-per-depth chart) unless logger=disabled

Multi-turn prompts (MT-bench) go turn by turn through the chat template: turn k's prompt holds
the model's own answers to turns 1..k-1. A request is one turn.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from experiments.config import ConfigError, check_overrides, validate

__all__ = ["run_experiment", "summarize", "main", "cli"]


@dataclass
class Setup:
    target: torch.nn.Module
    tokenizer: object
    verifier: object
    make_drafter: functools.partial | None  # call with the injected arguments to get a drafter
    per_turn: bool  # the drafter needs per-turn injection (Replay's continuation)
    prompts: list


def _inject(make: functools.partial, target, tokenizer, continuation=None) -> dict:
    """Arguments the run supplies to a drafter node: the target (and its tokenizer) where the
    constructor asks for them, the per-turn continuation (Replay), and ``model: null`` -> the
    target itself (self-drafting)."""
    params = inspect.signature(make.func).parameters
    kw = make.keywords
    out = {}
    if "target" in params and kw.get("target") is None:
        out["target"] = target
    if "target_tokenizer" in params and kw.get("target_tokenizer") is None:
        out["target_tokenizer"] = tokenizer
    if "continuation" in params and kw.get("continuation") is None:
        out["continuation"] = continuation
    if "model" in params and "model" in kw and kw["model"] is None:
        out["model"] = target
        if "tokenizer" in params and kw.get("tokenizer") is None:
            out["tokenizer"] = tokenizer
    return out


def build(cfg: DictConfig) -> Setup:
    """Check the config, then instantiate model, verifier, drafter factory and prompts."""
    from hydra.utils import instantiate

    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    target, tok = instantiate(cfg.model)
    verifier = instantiate(cfg.verifier) if cfg.verifier is not None else None
    make = None
    per_turn = False
    if cfg.drafter is not None:
        make = instantiate(cfg.drafter, _partial_=True)
        per_turn = "continuation" in inspect.signature(make.func).parameters
    prompts = instantiate(cfg.dataset)
    if not prompts:
        raise ConfigError(f"dataset '{cfg.dataset.name}' gave no prompts (limit={cfg.dataset.limit}, offset={cfg.dataset.offset})")
    return Setup(target, tok, verifier, make, per_turn, prompts)


def _ar(setup: Setup, cfg, ids: torch.Tensor, max_new_tokens: int):
    from specdec import generate

    return generate(setup.target, ids, drafter=None, verifier=setup.verifier, max_new_tokens=max_new_tokens,
                    temperature=0.0, tokenizer=setup.tokenizer, **_graph_kwargs(cfg))


def _graph_kwargs(cfg) -> dict:
    """``cuda_graphs`` / ``compile`` of the run (GPU fast path, docs/gpu.md)."""
    compile = cfg.get("compile", False)
    if isinstance(compile, DictConfig):  # Inductor options, e.g. {freezing: true}
        compile = OmegaConf.to_container(compile, resolve=True)
    return dict(cuda_graphs=cfg.get("cuda_graphs", None), compile=compile)


def _decode_turn(setup: Setup, cfg, ids: torch.Tensor, shared_drafter, gen: torch.Generator, max_new_tokens: int,
                 need_ar: bool):
    """One request: optional AR pass (Replay's continuation / greedy check), then the measured call."""
    from specdec import generate

    ar = _ar(setup, cfg, ids, max_new_tokens) if need_ar else None
    drafter = shared_drafter
    if setup.make_drafter is not None and setup.per_turn:
        drafter = setup.make_drafter(**_inject(setup.make_drafter, setup.target, setup.tokenizer, ar.new_tokens[0]))
    out = generate(
        setup.target, ids, drafter=drafter, verifier=setup.verifier, max_new_tokens=max_new_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen,
        budget=cfg.budget if drafter is not None else 0, tokenizer=setup.tokenizer, **_graph_kwargs(cfg),
    )
    return out, ar


def run_experiment(cfg: DictConfig, out_dir: str | Path, *, label: str, knobs: dict, wandb_group: str | None = None,
                   wandb_config: dict | None = None) -> dict:
    """Run ``cfg`` over its prompt set, write requests.jsonl/.csv and summary.json into ``out_dir``."""
    from hydra.utils import instantiate
    from tqdm.auto import tqdm

    from experiments.prompts import chat_ids

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = instantiate(cfg.logger)
    setup = build(cfg)
    device = next(setup.target.parameters()).device
    greedy = cfg.temperature <= 0
    need_ar = setup.per_turn or (cfg.check_greedy and greedy)

    # warm-up (untimed): lazy inits, allocator, kernels; a throwaway drafter so that drafters that
    # learn across requests (n-gram caches) start the measured run cold
    first = torch.tensor([chat_ids(setup.tokenizer, setup.prompts[0].turns[:1])], device=device)
    for _ in range(cfg.warmup):
        n = min(16, cfg.max_new_tokens)
        d = None
        if setup.make_drafter is not None and not setup.per_turn:
            d = setup.make_drafter(**_inject(setup.make_drafter, setup.target, setup.tokenizer))
        _decode_turn(setup, cfg, first, d, torch.Generator(device).manual_seed(cfg.seed), n, need_ar)

    shared = None
    if setup.make_drafter is not None and not setup.per_turn:
        shared = setup.make_drafter(**_inject(setup.make_drafter, setup.target, setup.tokenizer))

    logger.start(name=label, config=wandb_config or OmegaConf.to_container(cfg, resolve=True), out_dir=out_dir,
                 group=wandb_group)
    rows: list[dict] = []
    total = sum(len(p.turns) for p in setup.prompts)
    bar = tqdm(total=total, desc=label, unit="req", disable=not cfg.progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for rec in setup.prompts:
            answers: list[str] = []
            for ti in range(len(rec.turns)):
                ids = torch.tensor([chat_ids(setup.tokenizer, rec.turns[: ti + 1], answers)], device=device)
                gen = torch.Generator(device).manual_seed(cfg.seed + len(rows))
                out, ar = _decode_turn(setup, cfg, ids, shared, gen, cfg.max_new_tokens, need_ar)
                new = out.new_tokens[0]
                text = setup.tokenizer.decode(new, skip_special_tokens=True)
                answers.append(text)
                s = out.stats
                row = {
                    "request": len(rows),
                    "question_id": rec.question_id,
                    "category": rec.category,
                    "turn": ti + 1,
                    "prompt_tokens": ids.shape[1],
                    **{k: v for k, v in s.to_dict().items() if k != "prompt_tokens"},
                    "greedy_match": (new == ar.new_tokens[0]) if (ar is not None and greedy) else None,
                }
                if cfg.save_text:
                    row["output"] = text
                rows.append(row)
                logger.log_request(row["request"], row)
                bar.update(1)
                bar.set_postfix(tau=f"{s.tau:.2f}", tpot=f"{s.tpot_s * 1e3:.1f}ms")
    finally:
        bar.close()
    wall = time.perf_counter() - t0

    summary = summarize(rows)
    summary.update(label=label, knobs=knobs, wall_s=wall, model=_model_name(cfg), dataset=cfg.dataset.name,
                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, budget=cfg.budget,
                   device=str(device))
    _write(out_dir, rows, summary)
    summary_wandb = logger.run_dir
    logger.finish_run(rows=rows, summary=summary)
    if summary_wandb:
        summary["wandb_dir"] = summary_wandb
    return summary


def _model_name(cfg) -> str:
    m = cfg.model
    return str(m.get("name_or_path") or m._target_.rsplit(".", 1)[-1])


def summarize(rows: list[dict]) -> dict:
    """Aggregate per-request rows (definitions as in :mod:`specdec.metrics`):

    tpot_s  = sum(decode time) / sum(new_tokens - 1)       (token-weighted; tpot_mean_s is per request)
    tau     = sum(new_tokens - 1) / sum(verify_steps)      (tokens per verify step, bonus included)
    alpha   = sum(accepted) / sum(drafted)
    alpha_per_depth[d] = sum(accepted at depth d+1) / sum(reached depth d+1)   (pooled over requests)
    """
    if not rows:
        raise ValueError("no requests to summarize")
    dec_tok = sum(max(r["new_tokens"] - 1, 0) for r in rows)
    dec_s = sum(r["total_s"] - r["ttft_s"] for r in rows)
    steps = sum(r["verify_steps"] for r in rows)
    drafted = sum(r["drafted_tokens"] for r in rows)
    accepted = sum(r["accepted_tokens"] for r in rows)
    tpots = [r["tpot_s"] for r in rows if r["new_tokens"] > 1]
    depth = max((len(r["reached_per_depth"]) for r in rows), default=0)
    apd = []
    for d in range(depth):
        reached = sum(r["reached_per_depth"][d] for r in rows if d < len(r["reached_per_depth"]))
        if not reached:
            break
        apd.append(sum(r["accepted_per_depth"][d] for r in rows if d < len(r["accepted_per_depth"])) / reached)
    matches = [r["greedy_match"] for r in rows if r.get("greedy_match") is not None]
    total_s = sum(r["total_s"] for r in rows)
    draft_s = sum(r["draft_s"] for r in rows)
    verify_s = sum(r["verify_s"] for r in rows)
    return {
        "requests": len(rows),
        "prompts": len({r["question_id"] for r in rows}),
        "new_tokens": sum(r["new_tokens"] for r in rows),
        "tpot_s": dec_s / dec_tok if dec_tok else math.nan,
        "tpot_mean_s": statistics.fmean(tpots) if tpots else math.nan,
        "tpot_p50_s": statistics.median(tpots) if tpots else math.nan,
        "tpot_p90_s": _quantile(tpots, 0.9),
        "ttft_mean_s": statistics.fmean(r["ttft_s"] for r in rows),
        "tau": dec_tok / steps if steps else math.nan,
        "alpha": accepted / drafted if drafted else 0.0,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "alpha_per_depth": apd,
        "tokens_per_s": sum(r["new_tokens"] for r in rows) / total_s if total_s > 0 else math.nan,
        "draft_frac": draft_s / (draft_s + verify_s) if draft_s + verify_s > 0 else 0.0,
        "greedy_match_rate": sum(matches) / len(matches) if matches else None,
    }


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[i]


def _write(out_dir: Path, rows: list[dict], summary: dict) -> None:
    with open(out_dir / "requests.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cols = list(rows[0])
    with open(out_dir / "requests.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    with open(out_dir / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, default=str)


def _label_and_knobs(cfg: DictConfig, choices: dict, task_overrides: list[str]) -> tuple[str, dict]:
    """A short point label for plots ("replay budget=4 corruption=0.2") and the drafter's knobs."""
    drafter = choices.get("drafter") or "none"
    knobs: dict = {"drafter": drafter}
    if cfg.drafter is not None:
        knobs["budget"] = cfg.budget
        for k, v in cfg.drafter.items():
            if not str(k).startswith("_") and not isinstance(v, (DictConfig,)) and v is not None:
                knobs[str(k)] = v if not OmegaConf.is_config(v) else OmegaConf.to_container(v)
    shown = []
    for o in task_overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if cfg.drafter is not None and (k == "budget" or k.startswith("drafter.")):
            shown.append(f"{k.removeprefix('drafter.')}={v}")
    label = "AR" if cfg.drafter is None else " ".join([drafter, *shown])
    if cfg.temperature > 0:
        label += f" T={cfg.temperature}"
    return label, knobs


def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    choices = dict(hc.runtime.choices)
    overrides = list(hc.overrides.task)
    label, knobs = _label_and_knobs(cfg, choices, overrides)
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    wb_config = OmegaConf.to_container(cfg, resolve=True)
    wb_config["hydra"] = {"choices": choices, "overrides": overrides, "output_dir": str(out_dir)}
    try:
        s = run_experiment(cfg, out_dir, label=label, knobs=knobs, wandb_group=group, wandb_config=wb_config)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    print(
        f"[{label}] TPOT {s['tpot_s'] * 1e3:.2f} ms  tau {s['tau']:.2f}  alpha {s['alpha']:.3f}  "
        f"{s['tokens_per_s']:.1f} tok/s  ({s['requests']} requests) -> {out_dir}"
        + (f"  (W&B: {s['wandb_dir']})" if s.get("wandb_dir") else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Check the command line's config first (one readable error), then hand over to Hydra."""
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    # the pre-check composes conf/config.yaml; skip it for help/info and for another config dir/name
    passthrough = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc",
                   "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
    if not any(a.split("=", 1)[0] in passthrough for a in argv):
        try:
            check_overrides(argv)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path="../conf", config_name="config", version_base="1.3")(_hydra_main)()


cli = main

if __name__ == "__main__":
    main()
