"""The main job: an acceptance-vs-TPOT sweep on SmolLM2-135M over a small MT-bench subset, then
the report. CPU, offline, about 10 minutes on 2 cores.

    python -m experiments.main                      # the whole job
    python -m experiments.main --out DIR            # choose the sweep directory
    python -m experiments.main model=tiny_random    # extra Hydra overrides go to every run

It runs two Hydra multiruns into one sweep directory, exactly as you would by hand:

    python -m experiments.run -m sweep=baseline           hydra.sweep.dir=DIR <job overrides>
    python -m experiments.run -m sweep=acceptance_vs_tpot hydra.sweep.dir=DIR <job overrides>
    python -m experiments.report DIR

and prints where the Pareto plot, the table and the W&B runs are.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# sized for <= 10 minutes on a 2-core CPU: 2 MT-bench questions x 2 turns, 48 new tokens per turn,
# every drafter at budgets 2 and 4 (+ the AR baseline). One torch thread: on a shared or busy CPU,
# two threads fighting other processes were measured 5-7x slower per token; on an idle machine one
# thread costs little (and `threads=2` on the command line overrides it).
JOB_OVERRIDES = ["dataset=mtbench", "dataset.limit=2", "max_new_tokens=48", "threads=1"]
SWEEPS = [("baseline", []), ("acceptance_vs_tpot", ["budget=2,4"])]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.main", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="sweep directory (default: outputs/main/<time>)")
    ap.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"],
                    help="W&B mode for the runs and the report (default offline: sync later)")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. model=tiny_random)")
    a = ap.parse_args(argv)

    out = Path(a.out) if a.out else REPO / "outputs" / "main" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = out.resolve()
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_SILENT", "true")
    logger = {"offline": "logger=wandb", "online": "logger=online", "disabled": "logger=disabled"}[a.wandb]
    t0 = time.perf_counter()
    for sweep, sweep_overrides in SWEEPS:
        cmd = [sys.executable, "-m", "experiments.run", "-m", f"sweep={sweep}", f"hydra.sweep.dir={out}", logger,
               *JOB_OVERRIDES, *sweep_overrides, *a.overrides]
        print("$ " + " ".join(cmd[1:]).replace(sys.executable, "python"), flush=True)
        rc = subprocess.call(cmd, cwd=REPO, env=env)
        if rc != 0:
            print(f"main: the '{sweep}' sweep failed (exit {rc}); partial results are in {out}", file=sys.stderr)
            raise SystemExit(rc)
    from experiments.report import write_report

    os.environ.setdefault("WANDB_SILENT", "true")
    paths = write_report(out, wandb_mode=a.wandb)
    wall = time.perf_counter() - t0
    runs = sorted(str(p) for p in out.rglob("offline-run-*") if p.is_dir()) if a.wandb == "offline" else []
    print()
    print(f"Done in {wall / 60:.1f} min. Sweep directory: {out}")
    print(f"  Pareto plot : {paths['png']}")
    print(f"  Table       : {paths['table']}")
    print(f"  Points CSV  : {paths['csv']}")
    if a.wandb != "disabled":
        print(f"  W&B runs    : {len(runs) or 'see'} runs under {out}/**/wandb/ (report run: {paths['wandb']})")
        if a.wandb == "offline":
            print(f"  Upload them : wandb sync {out}/*/*/wandb/offline-run-* {out}/wandb/offline-run-*")
    print()
    print(Path(paths["table"]).read_text(encoding="utf-8"))
    return paths


if __name__ == "__main__":
    main()
