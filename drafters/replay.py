"""Replay: an oracle drafter that proposes a known continuation, corrupted at a chosen rate.

For systems benchmarks: with the target's own greedy continuation and ``corruption=c``, each draft
token is independently replaced by a different random token with probability c, which sets the
acceptance rate (and so tau) without a real draft model; the draft costs nothing. (The random
draws use Python's ``random.Random``: about 0.05 µs each, where a ``torch.rand(...).item()`` on a
``torch.Generator`` costs 2-5 µs of host time, which at 8 draws per step showed up in the GPU
benchmark's η as a draft cost the oracle should not have.)
"""

from __future__ import annotations

import random

import torch

from specdec.state import AcceptResult, DecodeState
from specdec.tree import TokenTree

__all__ = ["Replay"]


class Replay:
    """Propose ``continuation[g : g + depth]`` where g = tokens generated so far.

    Args:
        continuation: the tokens expected *after the prompt*: a list of ints (batch 1), a list of
            lists, or a ``[B, L]`` tensor.
        corruption: probability that a draft token is replaced by another random token.
        branching: nodes per depth; >1 adds ``branching - 1`` random siblings next to the spine
            token at every depth (a tree with one correct path).
        seed: seed of the drafter's own generator (corruption pattern is reproducible).
    """

    def __init__(self, continuation, corruption: float = 0.0, branching: int = 1, seed: int = 0):
        if not 0.0 <= corruption <= 1.0:
            raise ValueError(f"corruption must be in [0, 1], got {corruption}")
        if branching < 1:
            raise ValueError("branching must be >= 1")
        if isinstance(continuation, torch.Tensor):
            continuation = continuation.reshape(-1, continuation.shape[-1]).tolist()
        elif continuation and isinstance(continuation[0], int):
            continuation = [list(continuation)]
        self.continuation: list[list[int]] = [list(map(int, c)) for c in continuation]
        self.corruption = corruption
        self.branching = branching
        self.seed = seed
        self._rng = random.Random(seed)
        self._vocab = 0

    def __repr__(self) -> str:
        return f"Replay(corruption={self.corruption}, branching={self.branching})"

    def prefill(self, state: DecodeState) -> None:
        if len(self.continuation) != state.batch_size:
            raise ValueError(f"Replay has {len(self.continuation)} continuations for a batch of {state.batch_size}")
        cfg = state.target.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self._vocab = cfg.vocab_size
        self._rng.seed(self.seed)

    def observe(self, state: DecodeState, accepted: AcceptResult) -> None:
        pass

    def _corrupt(self, tok: int) -> int:
        if self.corruption > 0 and self._rng.random() < self.corruption:
            other = self._rng.randrange(self._vocab - 1)
            return other + (other >= tok)  # uniform over the other tokens
        return tok

    def propose(self, state: DecodeState, budget: int) -> TokenTree:
        depth = budget // self.branching
        rows_tok, rows_par = [], []
        for b, cont in enumerate(self.continuation):
            g = len(state.host_tokens[b]) - state.prompt_len
            spine = cont[g : g + depth] if not state.done[b] else []
            tok = [state.host_tokens[b][-1]]
            par = [-1]
            prev_spine = 0
            for t in spine:
                t = self._corrupt(t)
                level_start = len(tok)
                tok.append(t)
                par.append(prev_spine)
                for _ in range(self.branching - 1):
                    other = self._rng.randrange(self._vocab - 1)
                    tok.append(other + (other >= t))
                    par.append(prev_spine)
                prev_spine = level_start
            rows_tok.append(tok)
            rows_par.append(par)
        n = max(len(r) for r in rows_tok)
        return TokenTree._from_rows(rows_tok, rows_par, n, state.tree_device)
