"""Shared primitives of the n-gram caches: ranked proposals, their merge, knob validation.

Glossary
--------
context    the committed tokens of a request (prompt + generated); its last token is the tree root.
match      the longest suffix of the context (``min_match``..``max_match`` tokens) seen before.
branch     a continuation that followed an earlier occurrence of the match, ``<= branch_length``
           tokens long; several branches share prefixes and form one tree.
proposal   the draft nodes of that tree in *rank order*, best first. Every prefix of a proposal is
           itself a valid tree (each node's parent comes earlier), so cutting a proposal at any
           budget keeps the best nodes, and two proposals can be interleaved without breaking a path.

Everything here is plain Python (ints, lists, dicts): the caches run on the host, next to the
engine's one host sync per step, and never touch a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Proposal", "merge_proposals", "check_knobs"]


@dataclass
class Proposal:
    """Draft nodes in rank order (best first), the root excluded.

    Attributes:
        tokens: ``tokens[i]`` is the token of draft node i.
        parents: ``parents[i]`` is ``-1`` (child of the root) or an earlier index ``< i``.
        match_len: suffix tokens matched to retrieve the first node (0 when nothing matched).
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    match_len: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    def paths(self) -> list[list[int]]:
        """Root-to-leaf token paths (root excluded), in the order of their leaves."""
        has_child = [False] * len(self.tokens)
        for p in self.parents:
            if p >= 0:
                has_child[p] = True
        out = []
        for i, leaf in enumerate(has_child):
            if leaf:
                continue
            path, j = [], i
            while j >= 0:
                path.append(self.tokens[j])
                j = self.parents[j]
            out.append(path[::-1])
        return out

    def first_chain(self) -> list[int]:
        """The top-ranked branch: follow the best (first) child from the root."""
        chain, cur = [], -1
        for i, p in enumerate(self.parents):
            if p == cur:
                chain.append(self.tokens[i])
                cur = i
        return chain


class _Builder:
    """Accumulates draft nodes under a budget, merging a (parent, token) pair seen twice."""

    __slots__ = ("budget", "tokens", "parents", "_index")

    def __init__(self, budget: int):
        self.budget = budget
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self._index: dict[tuple[int, int], int] = {}

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.budget

    def add(self, parent: int, token: int) -> int | None:
        """Node id of ``token`` under ``parent`` (new or merged); None if the budget is spent."""
        key = (parent, token)
        got = self._index.get(key)
        if got is not None:
            return got
        if len(self.tokens) >= self.budget:
            return None
        nid = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self._index[key] = nid
        return nid


def merge_proposals(proposals: list[Proposal], budget: int) -> Proposal:
    """Interleave ranked proposals round-robin (rank 0 of each, then rank 1, ...) into one tree of
    at most ``budget`` nodes; a node that several proposals share is kept once and costs once.

    A node whose parent was cut (budget spent) is dropped with its subtree, so the result is
    always a valid tree; since parents rank before children, only the tail is ever cut.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}
    # per proposal: (its tokens, its parents, its node -> merged node (-2: cut)); the root maps to
    # -1 through the extra slot at the end of each map (a parent of -1 indexes it)
    srcs = [(p.tokens, p.parents, [-2] * len(p.tokens) + [-1]) for p in proposals]
    longest = max((len(p.tokens) for p in proposals), default=0)
    for r in range(longest):
        for toks, pars, mp in srcs:
            if r >= len(toks):
                continue
            new_par = mp[pars[r]]
            if new_par == -2:
                continue  # parent cut: so is the node (mp[r] stays -2)
            tok = toks[r]
            key = (new_par, tok)
            got = index.get(key)
            if got is not None:
                mp[r] = got
            elif len(tokens) < budget:
                mp[r] = index[key] = len(tokens)
                tokens.append(tok)
                parents.append(new_par)
    match = max((p.match_len for p in proposals), default=0)
    return Proposal(tokens, parents, match if tokens else 0)


def check_knobs(*, min_match: int, max_match: int, branch_length: int) -> None:
    """One clear error for inconsistent n-gram knobs."""
    for name, v in (("min_match", min_match), ("max_match", max_match), ("branch_length", branch_length)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if min_match > max_match:
        raise ValueError(f"min_match ({min_match}) must be <= max_match ({max_match})")


def check_budget(budget) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
