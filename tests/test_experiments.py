"""experiments.run multirun -> results files + offline W&B runs; experiments.report -> PNG, table, W&B run."""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", WANDB_SILENT="true",
        WANDB_DIR=str(tmp / "wandb_default"), WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
        WANDB_CONFIG_DIR=str(tmp / "wandb_config"), WANDB_DATA_DIR=str(tmp / "wandb_data"),
    )
    return env


def read_wandb_offline(run_dir: Path, expect_history: set[str] = frozenset(), wait_s: float = 60.0) -> dict[str, set[str]]:
    """Keys recorded in an offline run's ``run-*.wandb`` file (LevelDB-style log of protobuf records).

    W&B's writer is a separate process: on a loaded machine its last records can land after
    ``run.finish()`` returned, so the file is re-read (up to ``wait_s``) until ``expect_history`` shows up.
    """
    deadline = time.monotonic() + wait_s
    while True:
        keys = _read_wandb_records(run_dir)
        if expect_history <= keys["history"] or time.monotonic() > deadline:
            return keys
        time.sleep(0.5)


def _read_wandb_records(run_dir: Path) -> dict[str, set[str]]:
    from wandb.proto import wandb_internal_pb2 as pb

    (f,) = run_dir.glob("run-*.wandb")
    data = f.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, typ = struct.unpack("<IHB", data[pos : pos + 7])
        if typ == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if typ == 1:
            records.append(payload)
        elif typ == 2:
            buf = payload
        elif typ == 3:
            buf += payload
        elif typ == 4:
            records.append(buf + payload)
    keys: dict[str, set[str]] = {"history": set(), "summary": set(), "config": set()}
    for d in records:
        r = pb.Record()
        r.ParseFromString(d)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            keys["history"] |= {it.key or "/".join(it.nested_key) for it in r.history.item}
        elif kind == "summary":
            keys["summary"] |= {it.key or "/".join(it.nested_key) for it in r.summary.update}
        elif kind == "run":
            keys["config"] |= {it.key for it in r.run.config.update}
        elif kind == "config":
            keys["config"] |= {it.key for it in r.config.update}
    return keys


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2-point multirun on tiny_random (basic launcher): AR baseline + raw lookahead."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "multirun"
    cmd = [sys.executable, "-m", "experiments.run", "-m", "model=tiny_random", "dataset.limit=2", "max_new_tokens=16",
           "drafter=none,lookahead_raw", "check_greedy=true", f"hydra.sweep.dir={out}"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p, tmp


def test_multirun_writes_results(sweep):
    out, proc, _ = sweep
    runs = sorted(d for d in out.iterdir() if d.is_dir())
    assert [d.name for d in runs] == ["0", "1"]
    labels = set()
    for d in runs:
        summary = json.loads((d / "summary.json").read_text())
        rows = [json.loads(x) for x in (d / "requests.jsonl").read_text().splitlines()]
        with open(d / "requests.csv", newline="") as f:
            csv_rows = list(csv.DictReader(f))
        # 2 MT-bench questions x 2 turns = 4 requests; turn 2's prompt holds turn 1's answer
        assert len(rows) == len(csv_rows) == summary["requests"] == 4
        assert [r["turn"] for r in rows] == [1, 2, 1, 2]
        assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]
        assert all(0 < r["new_tokens"] <= 16 for r in rows)
        assert summary["new_tokens"] == sum(r["new_tokens"] for r in rows)
        steps = sum(r["verify_steps"] for r in rows)
        assert math.isclose(summary["tau"], sum(r["new_tokens"] - 1 for r in rows) / steps)
        assert summary["greedy_match_rate"] == 1.0  # lossless under greedy
        assert (d / ".hydra" / "config.yaml").exists()
        labels.add(summary["label"])
    assert labels == {"AR", "lookahead_raw"}
    assert "Launching 2 jobs locally" in proc.stderr + proc.stdout


def test_offline_wandb_runs_hold_the_logged_keys(sweep):
    out, _, _ = sweep
    for d in ("0", "1"):
        (run_dir,) = (out / d / "wandb").glob("offline-run-*")
        keys = read_wandb_offline(run_dir)
        assert {"request/tpot_s", "request/tau", "request/alpha", "requests/_type"} <= keys["history"]
        assert {"tpot_s", "tau", "alpha", "alpha_per_depth", "label"} <= keys["summary"]
        assert {"model", "drafter", "max_new_tokens", "temperature", "seed", "budget", "hydra"} <= keys["config"]
        tables = list((run_dir / "files" / "media" / "table").glob("requests_*.table.json"))
        assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 4
    # the lookahead run drafted, so it has the alpha-per-depth chart
    (run_dir,) = (out / "1" / "wandb").glob("offline-run-*")
    assert any(k.startswith("alpha_per_depth_chart_table") for k in read_wandb_offline(run_dir)["history"])


def test_report_writes_png_table_and_wandb_run(sweep, monkeypatch):
    from experiments.report import main as report_main

    out, _, tmp = sweep
    for k, v in _env(tmp).items():
        if k.startswith("WANDB"):
            monkeypatch.setenv(k, v)
    paths = report_main([str(out)])
    png = Path(paths["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = Path(paths["table"]).read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| config")]
    assert len(rows) == 2
    assert any(r.startswith("| AR |") and "1.00×" in r for r in rows)
    assert any(r.startswith("| lookahead_raw |") for r in rows)
    with open(paths["csv"], newline="") as f:
        pts = list(csv.DictReader(f))
    assert {p["label"] for p in pts} == {"AR", "lookahead_raw"}
    keys = read_wandb_offline(Path(paths["wandb"]), expect_history={"points/_type", "pareto/_type"})
    assert {"points/_type", "pareto/_type"} <= keys["history"]
    assert any(k.startswith("tpot_vs_tau_table") for k in keys["history"])
    assert any(k.startswith("tpot_vs_alpha_table") for k in keys["history"])
    assert "best_label" in keys["summary"]


def test_report_on_a_directory_without_runs(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.report", str(tmp_path), "--wandb", "disabled"], cwd=REPO,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no summary.json" in p.stderr and "Traceback" not in p.stderr


def test_joblib_launcher(tmp_path):
    out = tmp_path / "jl"
    cmd = [sys.executable, "-m", "experiments.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "model=tiny_random", "dataset.limit=1", "dataset.max_turns=1", "max_new_tokens=8", "logger=disabled",
           "drafter=lookahead_raw,lookahead_turbo", "warmup=0", f"hydra.sweep.dir={out}"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Joblib" in p.stdout + p.stderr
    labels = sorted(json.loads((out / d / "summary.json").read_text())["label"] for d in ("0", "1"))
    assert labels == ["lookahead_raw", "lookahead_turbo"]
    assert not list(out.rglob("offline-run-*"))  # logger=disabled writes no W&B run


# ---------------------------------------------------------------------------- pure functions


def _row(new, steps, total, ttft, drafted, accepted, reached_pd, accepted_pd):
    return dict(new_tokens=new, verify_steps=steps, total_s=total, ttft_s=ttft, tpot_s=(total - ttft) / max(new - 1, 1),
                drafted_tokens=drafted, accepted_tokens=accepted, reached_per_depth=reached_pd,
                accepted_per_depth=accepted_pd, alpha_per_depth=[a / r for a, r in zip(accepted_pd, reached_pd)],
                draft_s=0.1, verify_s=0.3, question_id="q", greedy_match=None)


def test_summarize_is_token_weighted():
    from experiments.run import summarize

    rows = [_row(11, 5, 2.0, 1.0, 10, 5, [5, 4], [4, 1]), _row(21, 5, 3.0, 1.0, 10, 10, [5, 5], [5, 5]),
            _row(5, 4, 1.0, 0.5, 4, 0, [4], [0])]
    s = summarize(rows)
    assert math.isclose(s["tpot_s"], (1.0 + 2.0 + 0.5) / (10 + 20 + 4))
    assert math.isclose(s["tau"], (10 + 20 + 4) / 14)
    assert math.isclose(s["alpha"], 15 / 24)
    # pooled over requests: accepted at depth d / steps that reached depth d
    assert s["alpha_per_depth"] == pytest.approx([(4 + 5 + 0) / (5 + 5 + 4), (1 + 5) / (4 + 5)])
    assert s["greedy_match_rate"] is None
    with pytest.raises(ValueError):
        summarize([])


def test_pareto_front():
    from experiments.report import pareto_front

    pts = [dict(tau=1.0, tpot_ms=50.0), dict(tau=2.0, tpot_ms=40.0), dict(tau=1.5, tpot_ms=60.0),
           dict(tau=3.0, tpot_ms=45.0), dict(tau=3.0, tpot_ms=70.0)]
    # point 0 is dominated by 1 (higher tau, lower TPOT); 2 by 1; 4 by 3
    assert pareto_front(pts, "tau") == [1, 3]
    # an oracle (replay) that dominates everything stays off the frontier of the real drafters
    oracle = [{**p, "drafter": "lookahead_raw"} for p in pts] + [{"tau": 9.0, "tpot_ms": 10.0, "drafter": "replay"}]
    assert pareto_front(oracle, "tau") == [1, 3]
    assert pareto_front([{"tau": 9.0, "tpot_ms": 10.0, "drafter": "replay"}], "tau") == [0]
