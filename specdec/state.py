"""Decode state shared by the engine, drafters and verifiers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .cache import StaticTreeCache

__all__ = ["SamplingConfig", "DecodeState", "AcceptResult"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the *target* distribution is shaped (HF order: temperature -> top-k -> top-p).

    ``temperature == 0`` means greedy decoding.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class AcceptResult:
    """What one verify step committed.

    output = accepted draft tokens + bonus token (the target's own token after the last accepted node).
    """

    path: Tensor  # [B, P] accepted node ids, root first; padded with -1 past path_len
    path_len: Tensor  # [B] number of valid entries in ``path`` (>= 1: the root)
    bonus: Tensor  # [B] bonus token
    new_tokens: list[list[int]] = field(default_factory=list)  # host: committed this step (after stop/EOS trim)

    @property
    def num_accepted(self) -> Tensor:
        """``[B]`` accepted draft tokens (root and bonus excluded)."""
        return self.path_len - 1


@dataclass
class DecodeState:
    """Everything a drafter may look at while decoding.

    The target's cache holds K/V for ``tokens[:, :seq_len - 1]``; the last token of each row is
    the root of the next tree.
    """

    target: Any  # the HF causal LM being decoded
    cache: "StaticTreeCache"  # the target's cache
    sequences: Tensor  # [B, T_max] token buffer (prompt + generated), padded past seq_lens
    seq_lens: Tensor  # [B] tokens in each row (device)
    host_tokens: list[list[int]]  # per row, the same tokens on the host (engine keeps it in sync)
    prompt_len: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    max_total_len: int  # T_max: the cache and the buffer never grow past this
    done: list[bool] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # drafters may keep per-call scratch here
    host_trees_to_cpu: bool = False  # set by the engine when a CUDA-graph runner takes the steps

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def device(self) -> torch.device:
        return self.sequences.device

    @property
    def tree_device(self) -> torch.device:
        """Where a drafter that builds its tree on the host should leave it: the CPU while a
        CUDA-graph runner takes the steps (it stages the tree through pinned memory in one copy,
        where a device tree built on the host costs one blocking copy per field), else
        :attr:`device`. Trees computed on the device stay there either way."""
        return torch.device("cpu") if self.host_trees_to_cpu else self.device

    @property
    def roots(self) -> Tensor:
        """``[B]`` last committed token of each row."""
        return self.sequences.gather(1, (self.seq_lens - 1).unsqueeze(1)).squeeze(1)

    @property
    def num_generated(self) -> list[int]:
        return [len(t) - self.prompt_len for t in self.host_tokens]
