"""Sweep report: Pareto plot (PNG), markdown table, and one W&B summary run (the dashboard).

    python -m experiments.report SWEEP_DIR [--out DIR] [--wandb offline|online|disabled]

Reads every ``summary.json`` under SWEEP_DIR (one per run of a Hydra multirun, any depth), one
point per config, and writes into ``--out`` (default SWEEP_DIR):

    pareto.png   TPOT against tau and against acceptance rate alpha; the Pareto frontier
                 (no other point has both lower TPOT and higher tau / alpha) drawn and ringed
    report.md    one row per config, sorted by TPOT, with speedup over the AR baseline
                 (drafter=none) of the same model, prompt set and max_new_tokens when present
    points.csv   the same rows, machine-readable
    wandb/       one W&B run (job_type=report): the table, scatter charts TPOT-vs-tau and
                 TPOT-vs-alpha, a speedup bar chart and the PNG. Offline by default;
                 upload with ``wandb sync SWEEP_DIR/wandb/offline-run-*``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

__all__ = ["load_points", "pareto_front", "write_report", "main"]

COLUMNS = ["label", "drafter", "tau", "alpha", "tpot_ms", "speedup", "ttft_ms", "tokens_per_s", "draft_frac",
           "requests", "new_tokens", "greedy_match_rate", "frontier_tau", "frontier_alpha", "model", "dataset", "run_dir"]


def load_points(sweep_dir: str | Path) -> list[dict]:
    """One dict per run under ``sweep_dir`` (its summary.json, flattened for the table)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    points = []
    for f in sorted(sweep_dir.rglob("summary.json")):
        if "wandb" in f.parts:
            continue
        s = json.loads(f.read_text(encoding="utf-8"))
        knobs = s.get("knobs", {})
        points.append({
            "label": s["label"],
            "drafter": knobs.get("drafter", "none"),
            "tau": s["tau"],
            "alpha": s["alpha"],
            "tpot_ms": s["tpot_s"] * 1e3,
            "ttft_ms": s["ttft_mean_s"] * 1e3,
            "tokens_per_s": s["tokens_per_s"],
            "draft_frac": s.get("draft_frac", 0.0),
            "requests": s["requests"],
            "new_tokens": s["new_tokens"],
            "greedy_match_rate": s.get("greedy_match_rate"),
            "alpha_per_depth": s.get("alpha_per_depth", []),
            "model": s.get("model"),
            "dataset": s.get("dataset"),
            "max_new_tokens": s.get("max_new_tokens"),
            "temperature": s.get("temperature"),
            "knobs": knobs,
            "run_dir": str(f.parent.relative_to(sweep_dir)) or ".",
        })
    if not points:
        raise FileNotFoundError(f"no summary.json under {sweep_dir}: is it a sweep directory of experiments.run?")
    _speedups(points)
    for key in ("tau", "alpha"):
        front = set(pareto_front(points, key))
        for i, p in enumerate(points):
            p[f"frontier_{key}"] = i in front
    return points


def _speedups(points: list[dict]) -> None:
    """speedup = TPOT of the AR baseline (drafter=none, same model/dataset/max_new_tokens/T) / TPOT."""
    def key(p):
        return (p["model"], p["dataset"], p["max_new_tokens"], p["temperature"])

    base: dict = {}
    for p in points:
        if p["drafter"] == "none" and math.isfinite(p["tpot_ms"]):
            base.setdefault(key(p), []).append(p["tpot_ms"])
    for p in points:
        b = base.get(key(p))
        p["speedup"] = (sum(b) / len(b)) / p["tpot_ms"] if b and p["tpot_ms"] > 0 else None


ORACLES = ("replay",)  # drafters that read the answer: shown, but kept off the frontier


def pareto_front(points: list[dict], x: str = "tau") -> list[int]:
    """Indices of the points no other point dominates (>= x and <= TPOT, one of them strictly),
    sorted by x. AR points (no drafting) count too. Oracle drafters (``replay``: it proposes the
    target's own continuation) are left out whenever real drafters are present, so that the frontier
    says which real configuration to pick."""
    real = [i for i, p in enumerate(points) if p.get("drafter") not in ORACLES]
    pool = real if real else range(len(points))
    idx = [i for i in pool if math.isfinite(points[i][x]) and math.isfinite(points[i]["tpot_ms"])]
    front = []
    for i in idx:
        pi = points[i]
        dominated = any(
            points[j][x] >= pi[x] and points[j]["tpot_ms"] <= pi["tpot_ms"]
            and (points[j][x] > pi[x] or points[j]["tpot_ms"] < pi["tpot_ms"])
            for j in idx if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][x])


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drafters = sorted({p["drafter"] for p in points})
    cmap = plt.get_cmap("tab10")
    color = {d: cmap(i % 10) for i, d in enumerate(drafters)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True)
    for ax, x, xlabel in ((axes[0], "tau", "τ: tokens per verify step"), (axes[1], "alpha", "α: acceptance rate")):
        for d in drafters:
            ps = [p for p in points if p["drafter"] == d]
            oracle = d in ORACLES
            ax.scatter([p[x] for p in ps], [p["tpot_ms"] for p in ps], color=color[d], s=70 if oracle else 36,
                       marker="*" if oracle else "o", label=f"{d} (oracle)" if oracle else d, zorder=3)
        front = pareto_front(points, x)
        ax.plot([points[i][x] for i in front], [points[i]["tpot_ms"] for i in front], "--", color="0.3", lw=1,
                zorder=2, label="Pareto frontier (real drafters)")
        ax.scatter([points[i][x] for i in front], [points[i]["tpot_ms"] for i in front], s=140, facecolors="none",
                   edgecolors="k", lw=1.2, zorder=4)
        for i in front:
            p = points[i]
            ax.annotate(p["label"], (p[x], p["tpot_ms"]), textcoords="offset points", xytext=(5, 5), fontsize=7)
        ar = [p["tpot_ms"] for p in points if p["drafter"] == "none"]
        if ar:
            ax.axhline(sum(ar) / len(ar), color="0.5", lw=0.8, ls=":", label="AR TPOT")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("TPOT (ms, lower is better)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "✓" if v else ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{nd}f}"
    return str(v)


def markdown(points: list[dict], title: str) -> str:
    rows = sorted(points, key=lambda p: p["tpot_ms"])
    head = ["config", "τ", "α", "TPOT ms", "speedup", "TTFT ms", "tok/s", "draft time", "requests", "greedy = AR",
            "Pareto (τ / α)"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in rows:
        front = ("τ" if p["frontier_tau"] else "") + (" α" if p["frontier_alpha"] else "")
        if p["drafter"] in ORACLES:
            front = "oracle"
        lines.append("| " + " | ".join([
            p["label"], _fmt(p["tau"], 2), _fmt(p["alpha"], 3), _fmt(p["tpot_ms"], 1),
            "–" if p["speedup"] is None else f"{p['speedup']:.2f}×", _fmt(p["ttft_ms"], 0), _fmt(p["tokens_per_s"], 1),
            f"{100 * p['draft_frac']:.0f}%", str(p["requests"]),
            "–" if p["greedy_match_rate"] is None else f"{100 * p['greedy_match_rate']:.0f}%", front.strip() or "",
        ]) + " |")
    models = sorted({str(p["model"]) for p in points})
    sets = sorted({str(p["dataset"]) for p in points})
    lines += ["", (f"Model: {', '.join(models)}; prompts: {', '.join(sets)}. TPOT = decode time / (new tokens - 1), "
                   "token-weighted over requests; τ = tokens committed per verify step (bonus included); α = accepted / "
                   "drafted tokens; speedup = AR TPOT / TPOT (AR = drafter=none in the same sweep). Pareto: on the "
                   "frontier of TPOT against τ / α among real drafters (replay is an oracle that proposes the "
                   "target's own continuation, a systems benchmark, so it is kept off the frontier).")]
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str | Path, out: str | Path | None = None, wandb_mode: str = "offline",
                 project: str = "specdec", entity: str | None = None) -> dict:
    """Write pareto.png, report.md, points.csv (and the W&B report run) for ``sweep_dir``.

    Returns the paths: ``{"png", "table", "csv", "wandb"}`` (wandb: the local run dir or None).
    """
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    points = load_points(sweep_dir)
    title = f"Acceptance vs TPOT — {sweep_dir.name} ({len(points)} configs)"
    png = out / "pareto.png"
    plot(points, png, title)
    table = out / "report.md"
    table.write_text(markdown(points, title), encoding="utf-8")
    csv_path = out / "points.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for p in sorted(points, key=lambda p: p["tpot_ms"]):
            w.writerow(p)
    wb_dir = _wandb_report(points, png, out, sweep_dir.name, wandb_mode, project, entity)
    return {"png": str(png), "table": str(table), "csv": str(csv_path), "wandb": wb_dir}


def _wandb_report(points, png: Path, out: Path, name: str, mode: str, project: str, entity) -> str | None:
    from experiments.wandb_logger import WandbLogger

    logger = WandbLogger(mode=mode, project=project, entity=entity)
    if not logger.enabled:
        return None
    import wandb

    logger.start(name=f"report {name}", config={"sweep_dir": name, "configs": len(points)}, out_dir=out,
                 group=name, job_type="report")
    run = logger.run
    table = wandb.Table(columns=COLUMNS, data=[[p.get(c) for c in COLUMNS] for p in points])
    logs = {
        "points": table,
        "tpot_vs_tau": wandb.plot.scatter(table, "tau", "tpot_ms", title="TPOT (ms) vs tau"),
        "tpot_vs_alpha": wandb.plot.scatter(table, "alpha", "tpot_ms", title="TPOT (ms) vs acceptance rate"),
        "pareto": wandb.Image(str(png)),
    }
    sp = [p for p in points if p["speedup"] is not None]
    if sp:
        bar = wandb.Table(columns=["label", "speedup"], data=[[p["label"], p["speedup"]] for p in sp])
        logs["speedup"] = wandb.plot.bar(bar, "label", "speedup", title="speedup over AR (TPOT ratio)")
    run.log(logs)
    best = min(points, key=lambda p: p["tpot_ms"])
    run.summary["best_label"] = best["label"]
    run.summary["best_tpot_ms"] = best["tpot_ms"]
    if best["speedup"] is not None:
        run.summary["best_speedup"] = best["speedup"]
    wb_dir = logger.run_dir
    logger.finish()
    return wb_dir


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a Hydra multirun directory of experiments.run (or any folder holding runs)")
    ap.add_argument("--out", default=None, help="where to write the report (default: SWEEP_DIR)")
    ap.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"], help="W&B mode of the report run")
    ap.add_argument("--project", default="specdec")
    ap.add_argument("--entity", default=None)
    a = ap.parse_args(argv)
    try:
        paths = write_report(a.sweep_dir, a.out, a.wandb, a.project, a.entity)
    except FileNotFoundError as e:
        print(f"report: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Pareto plot : {paths['png']}")
    print(f"Table       : {paths['table']}")
    print(f"Points CSV  : {paths['csv']}")
    if paths["wandb"]:
        print(f"W&B report  : {paths['wandb']}  (upload: wandb sync {paths['wandb']})")
    return paths


if __name__ == "__main__":
    main()
