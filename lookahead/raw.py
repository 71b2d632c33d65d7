"""Raw lookahead cache: a per-request n-gram index over the prompt and every committed token.

The idea of drafting by looking the current suffix up in the context is prompt lookup decoding
(A. Saxena, 2023, https://github.com/apoorvumang/prompt-lookup-decoding), which proposes one
continuation of the first match. Following Ant Group's Lookahead (Zhao et al., 2023,
https://arxiv.org/abs/2312.12728) and TACO-LLM's RawLookaheadCache, this cache proposes *several*
continuations as the branches of one token tree, ranked by how many earlier occurrences agree,
so a single verify step checks them all.

Index: for every n in ``[min_match, max_match]``, a dict from the n tokens before position p to
the positions p (ascending) where such an n-gram was followed by a token. Appending a token adds
``max_match - min_match + 1`` entries; a query is ``max_match - min_match + 1`` dict look-ups plus
a best-first walk over at most ``max_candidates`` continuations. Nothing is rebuilt, and the
history is never scanned.

Proposal (the spec the tests check against a brute-force oracle):
  for n = longest suffix match down to ``min_match`` (a pass per n, while budget remains):
    candidates = the ``max_candidates`` most recent positions p whose preceding n tokens equal the
                 context's last n tokens;
    branch(p)  = tokens[p : p + branch_length] (cut at the end of the context);
    nodes      = the distinct prefixes of the branches, ranked by (count of branches through the
                 node desc, most recent position through it desc, depth asc), added in that order
                 (a node already in the tree is merged and costs nothing) until the budget is spent.
"""

from __future__ import annotations

import heapq
from typing import Iterable

from .trie import Proposal, _Builder, check_budget, check_knobs

__all__ = ["RawLookaheadCache"]


class RawLookaheadCache:
    """Per-request n-gram index (no model, no tensors).

    Args:
        min_match: shortest suffix (in tokens) worth looking up.
        max_match: longest suffix looked up (the first pass uses the longest one that matches).
        branch_length: at most this many tokens per branch (tree depth).
        max_candidates: at most this many earlier occurrences (most recent) per pass.
    """

    def __init__(self, *, min_match: int = 1, max_match: int = 4, branch_length: int = 12, max_candidates: int = 16):
        check_knobs(min_match=min_match, max_match=max_match, branch_length=branch_length)
        if not isinstance(max_candidates, int) or max_candidates < 1:
            raise ValueError(f"max_candidates must be an int >= 1, got {max_candidates!r}")
        self.min_match = min_match
        self.max_match = max_match
        self.branch_length = branch_length
        self.max_candidates = max_candidates
        self.tokens: list[int] = []
        self._index: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return (f"RawLookaheadCache(min_match={self.min_match}, max_match={self.max_match}, "
                f"branch_length={self.branch_length}, max_candidates={self.max_candidates}, tokens={len(self.tokens)})")

    def extend(self, tokens: Iterable[int]) -> None:
        """Append committed tokens (the prompt first, then each step's accepted tokens + bonus)."""
        toks, index = self.tokens, self._index
        lo, hi = self.min_match, self.max_match
        for t in tokens:
            i = len(toks)
            for n in range(lo, min(hi, i) + 1):
                key = tuple(toks[i - n : i])
                pos = index.get(key)
                if pos is None:
                    index[key] = [i]
                else:
                    pos.append(i)
            toks.append(int(t))

    def query(self, budget: int) -> Proposal:
        """Ranked draft nodes (at most ``budget``) continuing the current context."""
        check_budget(budget)
        toks = self.tokens
        L = len(toks)
        builder = _Builder(budget)
        match_len = 0
        if budget == 0:
            return Proposal()
        for n in range(min(self.max_match, L), self.min_match - 1, -1):
            if builder.full:
                break
            pos = self._index.get(tuple(toks[L - n :]))
            if not pos:
                continue
            if match_len == 0:
                match_len = n
            self._expand(builder, pos[-self.max_candidates :])
        return Proposal(builder.tokens, builder.parents, match_len if builder.tokens else 0)

    def _expand(self, builder: _Builder, cands: list[int]) -> None:
        """Best-first walk of the continuations of ``cands`` (ascending positions).

        Heap entries are ``(-count, -most recent position, depth, token, parent id, positions)``;
        within one walk the first three never tie (at a given depth a position belongs to one
        group), so the entries compare on them alone. A node with one continuation (all its
        positions agree, e.g. a single candidate) hands it straight on when it beats every queued
        entry (what ``heappushpop`` returns), without a dict of groups or a heap round trip.
        """
        toks = self.tokens
        L = len(toks)
        budget = builder.budget
        btoks, bpars, index = builder.tokens, builder.parents, builder._index
        heappush, heappushpop, heappop = heapq.heappush, heapq.heappushpop, heapq.heappop
        groups: dict[int, list[int]] = {}
        for p in cands:  # p < L always: an indexed position was followed by a token
            g = groups.get(toks[p])
            if g is None:
                groups[toks[p]] = [p]
            else:
                g.append(p)
        # key: more branches first, then the most recent occurrence, then shallower
        heap = [(-len(ps), -ps[-1], 1, tok, -1, ps) for tok, ps in groups.items()]
        heapq.heapify(heap)
        depth_cap = self.branch_length
        item = heappop(heap)
        while True:
            n_neg, last_neg, depth, tok, parent, ps = item
            key = (parent, tok)
            nid = index.get(key)
            if nid is None:
                nid = len(btoks)
                if nid >= budget:
                    return  # budget spent; later entries are new nodes or children of new nodes
                btoks.append(tok)
                bpars.append(parent)
                index[key] = nid
            item = None
            if depth < depth_cap:
                if n_neg == -1:  # one position: one continuation
                    q = ps[0] + depth
                    if q < L:
                        item = (-1, last_neg, depth + 1, toks[q], nid, ps)
                else:
                    groups = {}
                    for p in ps:
                        q = p + depth
                        if q < L:
                            t2 = toks[q]
                            g = groups.get(t2)
                            if g is None:
                                groups[t2] = [p]
                            else:
                                g.append(p)
                    if len(groups) == 1:
                        for t2, ps2 in groups.items():
                            item = (-len(ps2), -ps2[-1], depth + 1, t2, nid, ps2)
                    else:
                        for t2, ps2 in groups.items():
                            heappush(heap, (-len(ps2), -ps2[-1], depth + 1, t2, nid, ps2))
            if item is not None:
                if heap:
                    item = heappushpop(heap, item)
            elif heap:
                item = heappop(heap)
            else:
                return
