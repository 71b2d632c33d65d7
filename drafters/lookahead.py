"""N-gram lookahead drafters: adapters from the model-free caches in :mod:`lookahead` to the
:class:`~drafters.base.Drafter` interface.

* :class:`RawLookahead`: per-request index of prompt + committed tokens (prompt lookup decoding,
  Saxena 2023, generalised to ranked multi-branch trees as in Ant Group's Lookahead,
  https://arxiv.org/abs/2312.12728).
* :class:`TurboLookahead`: one global frequency trie shared across requests and turns
  (Lookahead's trie; TACO-LLM's TurboLookaheadCache), bounded memory, warm-up and save/load.
* :class:`HybridLookahead`: both, interleaved rank by rank into one tree under one budget, shared
  nodes merged.

The drafts are deterministic (``draft_probs=None``): under sampling the engine accepts a draft
token x with probability p(x) (q = one-hot), which keeps decoding lossless.
"""

from __future__ import annotations

from lookahead.raw import RawLookaheadCache
from lookahead.trie import Proposal
from lookahead.turbo import TurboLookaheadCache
from specdec.state import AcceptResult, DecodeState
from specdec.tree import TokenTree

__all__ = ["RawLookahead", "TurboLookahead", "HybridLookahead", "proposals_to_tree"]


def _vocab_size(target) -> int | None:
    cfg = getattr(target, "config", None)
    if cfg is None:
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "vocab_size", None)


def proposals_to_tree(state: DecodeState, proposals: list[Proposal | None], vocab: int | None = None) -> TokenTree:
    """One row per batch entry: the root (last committed token) then the proposal's nodes.

    ``None`` (a finished row) gives a root-only row. Nodes with ids outside ``[0, vocab)`` (a
    cache warmed with another tokenizer) are dropped with their subtrees.
    """
    rows_tok, rows_par = [], []
    for b, prop in enumerate(proposals):
        tok = [state.host_tokens[b][-1]]
        par = [-1]
        if prop is not None:
            new_id = [0] * len(prop.tokens)
            for i, (t, p) in enumerate(zip(prop.tokens, prop.parents)):
                parent = 0 if p < 0 else new_id[p]
                if parent < 0 or (vocab is not None and not 0 <= t < vocab):
                    new_id[i] = -1
                    continue
                new_id[i] = len(tok)
                tok.append(t)
                par.append(parent)
        rows_tok.append(tok)
        rows_par.append(par)
    n = max(len(r) for r in rows_tok)
    return TokenTree._from_rows(rows_tok, rows_par, n, state.tree_device)


def _check_budget(budget) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")


class RawLookahead:
    """Draft from a per-request n-gram index (a fresh :class:`~lookahead.raw.RawLookaheadCache`
    per row and per ``generate()`` call).

    Args:
        min_match, max_match: suffix lengths looked up, longest first.
        branch_length: at most this many tokens per branch.
        max_candidates: earlier occurrences (most recent) considered per suffix length.
    """

    def __init__(self, *, min_match: int = 1, max_match: int = 4, branch_length: int = 12, max_candidates: int = 16):
        # validate once, here, with the cache's own checks
        RawLookaheadCache(min_match=min_match, max_match=max_match, branch_length=branch_length,
                          max_candidates=max_candidates)
        self.knobs = dict(min_match=min_match, max_match=max_match, branch_length=branch_length,
                          max_candidates=max_candidates)
        self.caches: list[RawLookaheadCache] = []

    def __repr__(self) -> str:
        return "RawLookahead(" + ", ".join(f"{k}={v}" for k, v in self.knobs.items()) + ")"

    def prefill(self, state: DecodeState) -> None:
        self.caches = []
        for toks in state.host_tokens:
            c = RawLookaheadCache(**self.knobs)
            c.extend(toks)
            self.caches.append(c)

    def observe(self, state: DecodeState, accepted: AcceptResult) -> None:
        for c, toks in zip(self.caches, state.host_tokens):
            if len(toks) > len(c):
                c.extend(toks[len(c) :])

    def proposals(self, state: DecodeState, budget: int) -> list[Proposal | None]:
        return [None if state.done[b] else c.query(budget) for b, c in enumerate(self.caches)]

    def propose(self, state: DecodeState, budget: int) -> TokenTree:
        _check_budget(budget)
        return proposals_to_tree(state, self.proposals(state, budget))


class TurboLookahead:
    """Draft from a global :class:`~lookahead.turbo.TurboLookaheadCache` that learns from every
    request it serves (prompt-side counts while a request runs, output-side counts for good).

    Args:
        cache: a shared cache (e.g. warmed up, or loaded with ``TurboLookaheadCache.load``); by
            default a new one is made from the knobs below.
        min_match, max_match, branch_length, capacity, decay, prompt_weight: knobs of the new
            cache (see :class:`~lookahead.turbo.TurboLookaheadCache`); give them only without ``cache``.
    """

    def __init__(self, cache: TurboLookaheadCache | None = None, *, min_match: int | None = None,
                 max_match: int | None = None, branch_length: int | None = None, capacity: int | None = None,
                 decay: float | None = None, prompt_weight: float | None = None):
        knobs = {k: v for k, v in dict(min_match=min_match, max_match=max_match, branch_length=branch_length,
                                        capacity=capacity, decay=decay, prompt_weight=prompt_weight).items()
                 if v is not None}
        if cache is not None and knobs:
            raise ValueError(f"pass either a cache or cache knobs, not both (got cache and {sorted(knobs)})")
        self.cache = cache if cache is not None else TurboLookaheadCache(**knobs)
        self._handles: list[int | None] = []
        self._fed: list[int] = []
        self._vocab: int | None = None

    def __repr__(self) -> str:
        return f"TurboLookahead({self.cache!r})"

    def _end_all(self) -> None:
        for h in self._handles:
            if h is not None:
                self.cache.end(h)
        self._handles = []

    def prefill(self, state: DecodeState) -> None:
        self._end_all()  # a previous call that stopped without a final observe
        self._vocab = _vocab_size(state.target)
        self._handles, self._fed = [], []
        for toks in state.host_tokens:
            h = self.cache.begin(toks[: state.prompt_len])
            self.cache.extend(h, toks[state.prompt_len :])
            self._handles.append(h)
            self._fed.append(len(toks))

    def observe(self, state: DecodeState, accepted: AcceptResult) -> None:
        for b, toks in enumerate(state.host_tokens):
            h = self._handles[b]
            if h is None:
                continue
            if len(toks) > self._fed[b]:
                self.cache.extend(h, toks[self._fed[b] :])
                self._fed[b] = len(toks)
            if state.done[b]:
                self.cache.end(h)
                self._handles[b] = None

    def proposals(self, state: DecodeState, budget: int) -> list[Proposal | None]:
        m = self.cache.max_match
        return [None if state.done[b] else self.cache.query(toks[-m:], budget)
                for b, toks in enumerate(state.host_tokens)]

    def propose(self, state: DecodeState, budget: int) -> TokenTree:
        _check_budget(budget)
        return proposals_to_tree(state, self.proposals(state, budget), self._vocab)


class HybridLookahead:
    """Raw and Turbo together: their ranked proposals interleaved (Raw's rank 0, Turbo's rank 0,
    Raw's rank 1, ...) into one tree of at most ``budget`` nodes; a branch both propose is kept
    once, so agreement costs no budget and frees room for more alternatives.

    Args:
        cache: the shared Turbo cache (default: a new one from the knobs).
        min_match, max_match, branch_length: used by both caches.
        max_candidates: Raw's earlier occurrences per suffix length.
        capacity, decay, prompt_weight: knobs of a new Turbo cache (only without ``cache``).
    """

    def __init__(self, cache: TurboLookaheadCache | None = None, *, min_match: int = 1, max_match: int = 4,
                 branch_length: int = 12, max_candidates: int = 16, capacity: int | None = None,
                 decay: float | None = None, prompt_weight: float | None = None):
        self.raw = RawLookahead(min_match=min_match, max_match=max_match, branch_length=branch_length,
                                max_candidates=max_candidates)
        if cache is None:
            self.turbo = TurboLookahead(min_match=min_match, max_match=max_match, branch_length=branch_length,
                                        capacity=capacity, decay=decay, prompt_weight=prompt_weight)
        else:
            if any(v is not None for v in (capacity, decay, prompt_weight)):
                raise ValueError("pass either a cache or Turbo knobs (capacity, decay, prompt_weight), not both")
            self.turbo = TurboLookahead(cache)

    @property
    def cache(self) -> TurboLookaheadCache:
        return self.turbo.cache

    def __repr__(self) -> str:
        return f"HybridLookahead({self.raw!r}, {self.turbo!r})"

    def prefill(self, state: DecodeState) -> None:
        self.raw.prefill(state)
        self.turbo.prefill(state)

    def observe(self, state: DecodeState, accepted: AcceptResult) -> None:
        self.raw.observe(state, accepted)
        self.turbo.observe(state, accepted)

    def propose(self, state: DecodeState, budget: int) -> TokenTree:
        _check_budget(budget)
        cache, m = self.turbo.cache, self.turbo.cache.max_match
        # == merge_proposals([raw, turbo], budget), without building Turbo's proposal first
        merged = [None if state.done[b] else cache.query_merged(toks[-m:], budget, self.raw.caches[b].query(budget))
                  for b, toks in enumerate(state.host_tokens)]
        return proposals_to_tree(state, merged, self.turbo._vocab)
