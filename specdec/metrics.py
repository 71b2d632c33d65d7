"""Per-call statistics: one definition used by every report.

TTFT = prefill + first token; TPOT = (total - TTFT) / (new_tokens - 1);
tau = tokens committed per verify step (bonus included);
alpha = accepted draft tokens / drafted tokens; alpha per depth d = P(a node at depth d is
accepted | the path reached depth d - 1 and the tree had a node at depth d).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

__all__ = ["GenerateStats", "GenerateOutput", "StepTimer", "DepthCounters"]


@dataclass
class GenerateStats:
    new_tokens: int = 0  # generated tokens summed over the batch
    prompt_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    tpot_s: float = 0.0
    verify_steps: int = 0
    draft_s: float = 0.0  # the drafter's time: its prefill (e.g. a draft model's prompt forward) + every propose
    verify_s: float = 0.0
    tau: float = 0.0
    alpha: float = 0.0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    alpha_per_depth: list[float] = field(default_factory=list)
    drafted_per_depth: list[int] = field(default_factory=list)
    accepted_per_depth: list[int] = field(default_factory=list)
    reached_per_depth: list[int] = field(default_factory=list)  # steps whose path reached depth d - 1 with a node at d
    tokens_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        apd = ", ".join(f"{a:.2f}" for a in self.alpha_per_depth[:8])
        return (
            f"new={self.new_tokens} TTFT={self.ttft_s * 1e3:.1f}ms TPOT={self.tpot_s * 1e3:.2f}ms "
            f"tau={self.tau:.2f} alpha={self.alpha:.3f} steps={self.verify_steps} "
            f"draft={self.draft_s:.3f}s verify={self.verify_s:.3f}s tok/s={self.tokens_per_s:.1f} "
            f"alpha/depth=[{apd}]"
        )


@dataclass
class GenerateOutput:
    sequences: Tensor  # [B, prompt + new] (rows that stopped early padded with pad_token_id)
    stats: GenerateStats
    new_tokens: list[list[int]] = field(default_factory=list)  # per row, generated ids only


_EVENTS: dict = {}  # device index -> timing events of finished timers (reused: none created or destroyed per step)


class StepTimer:
    """Wall time of named phases. On CUDA it records events (no sync per step) and reads them at
    the end; elsewhere it uses ``perf_counter``. :meth:`release` hands the events back for reuse."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        if self.cuda:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._pool = _EVENTS.setdefault(index, [])

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def release(self) -> None:
        """Done reading: the events go back to the pool (at most a few thousand are kept)."""
        if self.cuda and len(self._pool) < 4096:
            self._pool.extend(ev for _, ev in self.marks)
        self.marks = []

    def totals(self) -> dict[str, float]:
        """Seconds from each mark to the next, summed by the earlier mark's name."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        return out

    def span(self, first: str, last: str) -> float:
        """Seconds from the first mark named ``first`` to the last mark named ``last``."""
        if self.cuda:
            torch.cuda.synchronize()
        a = next(t for n, t in self.marks if n == first)
        b = next(t for n, t in reversed(self.marks) if n == last)
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class DepthCounters:
    """Device-side acceptance counters per depth; read once at the end of a call."""

    def __init__(self, max_depth: int, device):
        self.D = max_depth + 1
        self.drafted = torch.zeros(self.D, dtype=torch.long, device=device)
        self.reached = torch.zeros(self.D, dtype=torch.long, device=device)
        self.accepted = torch.zeros(self.D, dtype=torch.long, device=device)

    def update(self, depths: Tensor, valid: Tensor, path_len: Tensor, active: Tensor) -> None:
        """depths/valid ``[B, N]``; path_len ``[B]``; active ``[B]`` rows still decoding."""
        D = self.D
        d = depths.clamp(max=D - 1)
        w = (valid & active.unsqueeze(1)).long()
        w[:, 0] = 0  # root is not a draft
        self.drafted.scatter_add_(0, d.flatten(), w.flatten())
        has_depth = torch.zeros(depths.shape[0], D, dtype=torch.long, device=depths.device)
        has_depth.scatter_add_(1, d, w)
        has_depth = has_depth > 0  # [B, D]
        acc_depth = path_len.unsqueeze(1) - 1  # deepest accepted draft depth
        ar = torch.arange(D, device=depths.device).unsqueeze(0)
        reached = has_depth & (ar <= acc_depth + 1) & (ar >= 1) & active.unsqueeze(1)
        accepted = reached & (ar <= acc_depth)
        self.reached += reached.long().sum(0)
        self.accepted += accepted.long().sum(0)

    def read(self) -> tuple[list[int], list[int], list[int]]:
        return self.drafted.tolist(), self.reached.tolist(), self.accepted.tolist()
