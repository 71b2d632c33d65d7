"""Weights & Biases logging for experiment runs and sweep reports (offline by default).

The ``logger`` config node (``conf/logger/*.yaml``) instantiates :class:`WandbLogger`. With
``mode: offline`` runs are written under ``<dir>/wandb/offline-run-*`` and uploaded later with
``wandb sync``; ``mode: disabled`` never imports wandb.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["WandbLogger", "REQUEST_KEYS"]

# scalar per-request metrics logged step by step (one W&B step per request)
REQUEST_KEYS = ("new_tokens", "ttft_s", "tpot_s", "tau", "alpha", "verify_steps", "draft_s", "verify_s", "tokens_per_s")
MODES = ("offline", "online", "disabled")


class WandbLogger:
    """One W&B run per experiment run (or per report).

    Args:
        mode: ``offline`` (default; sync later), ``online`` or ``disabled``.
        project, entity, group, tags: the usual W&B run fields; ``group`` defaults to the sweep
            directory's name so that a sweep's runs group together.
        dir: where ``wandb/`` goes (default: the run's output directory).
    """

    def __init__(
        self,
        mode: str = "offline",
        project: str = "specdec",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
        dir: str | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"logger.mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.project = project
        self.entity = entity
        self.group = group
        self.tags = list(tags)
        self.dir = dir
        self.run = None

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"

    @property
    def run_dir(self) -> str | None:
        """The local W&B run directory (``.../wandb/offline-run-<time>-<id>``), once started."""
        return None if self.run is None else str(Path(self.run.dir).parent)

    def start(self, *, name: str, config: dict, out_dir: str | os.PathLike, group: str | None = None,
              job_type: str = "run") -> None:
        if not self.enabled:
            return
        os.environ.setdefault("WANDB_SILENT", "true")  # our own lines say where the run is
        import wandb

        root = Path(self.dir) if self.dir is not None else Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=self.mode,
            project=self.project,
            entity=self.entity,
            group=self.group or group,
            tags=self.tags or None,
            name=name,
            job_type=job_type,
            dir=str(root),
            config=config,
            reinit="finish_previous",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.run.define_metric("request")
        for k in REQUEST_KEYS:
            self.run.define_metric(f"request/{k}", step_metric="request")

    def log_request(self, index: int, row: dict) -> None:
        if self.run is None:
            return
        data = {"request": index}
        data.update({f"request/{k}": row[k] for k in REQUEST_KEYS if row.get(k) is not None})
        self.run.log(data)

    def finish_run(self, *, rows: list[dict], summary: dict) -> None:
        """Per-request table, summary, and the alpha-per-depth chart; then close the run."""
        if self.run is None:
            return
        import wandb

        cols = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))] if rows else []
        table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        apd = summary.get("alpha_per_depth") or []
        logs = {"requests": table}
        if apd:  # a custom chart; W&B stores its data as the table "alpha_per_depth_chart_table"
            depth_table = wandb.Table(columns=["depth", "alpha"], data=[[d + 1, a] for d, a in enumerate(apd)])
            logs["alpha_per_depth_chart"] = wandb.plot.line(
                depth_table, "depth", "alpha", title=f"acceptance rate per draft depth ({self.run.name})"
            )
        self.run.log(logs)
        for k, v in summary.items():
            if not isinstance(v, (dict,)):
                self.run.summary[k] = v
        self.finish()

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
