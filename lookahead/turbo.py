"""Turbo lookahead cache: one global n-gram trie shared by all requests and turns, memory bounded.

References: Ant Group's Lookahead (Zhao et al., 2023, https://arxiv.org/abs/2312.12728: a trie of
prompt and output n-grams, frequency-ranked multi-branch retrieval, halving frequencies on
overflow) and TACO-LLM's TurboLookaheadCache (a global cache next to the per-request Raw one,
reported at about 1.4x Raw's hit rate). Prompt lookup decoding (Saxena, 2023) is the baseline.

Layout. Every committed position starts a *window* of the next ``max_match + branch_length``
tokens; the trie holds all windows, so the path root -> n tokens exists iff that n-gram was seen,
and the subtree below it holds what followed. Each node keeps two frequencies:

* ``out``: output-side, global: +1 per window through the node that came from generated tokens
  (or from :meth:`TurboLookaheadCache.warm_up`). Multiplied by ``decay`` at every eviction, so old
  statistics fade relative to new ones.
* ``inp``: prompt-side, scoped to the requests in flight: +1 per window of a request's prompt,
  taken back when the request ends (:meth:`end`). A prompt helps its own request (and, while both
  run, the others of a batch) but does not accumulate across requests.

A node's score is ``out + prompt_weight * inp`` (kept in ``x``, recomputed from the two counts
at every change, so a loaded cache ranks bit for bit like the saved one).

Updates are incremental: a request keeps one cursor per open window (at most ``max_match +
branch_length``), and each committed token advances every cursor by one trie edge, so a token
costs O(window) dict operations and every window counts exactly once per node.

Memory bound: before a token is inserted, if the node count could pass ``capacity``, the cache
evicts. Eviction scales every ``out`` by ``decay`` and removes the lowest-scoring nodes (ties:
older first) with their subtrees until at most ``evict_to * capacity`` remain. It is O(nodes) but
runs once per ``(1 - evict_to) * capacity`` new nodes at most, so its amortised cost per token
is O(window). The node count never exceeds ``capacity``.

Query cost. A query's work is its best-first walk (about one heap step per draft node), plus the
ranking of the children of the nodes it expands. A node keeps its ranked child list between
queries; updates only queue the entries of children whose count rose, and the next query that
expands the node merges them in (:meth:`TurboLookaheadCache._ranked`), so a wide node (a common
token's continuations) is not re-scored child by child at every step. The rest is mostly memory
traffic over the trie's objects, which the node layout keeps small (see ``_Node``: an only child
without a dict, int scores until the first decay, one shared int object per token id). Hybrid's
merge with Raw's proposal runs inside the walk (:meth:`TurboLookaheadCache.query_merged`).
Measured figures are in ``notes/issue3.md``.
"""

from __future__ import annotations

import bisect
import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .trie import Proposal, _Builder, check_budget, check_knobs

__all__ = ["TurboLookaheadCache"]

_FORMAT = "specdec.turbo_lookahead/1"


class _Node:
    __slots__ = ("tok", "x", "only", "order", "pending", "kids", "uid", "out", "inp")

    def __init__(self, uid: int, tok: int):
        # children: a leaf has neither; one child (most nodes: 9 in 10 of a warm trie) is ``only``,
        # without a dict; two or more are ``kids``, token -> child (and ``only`` is None)
        self.only: _Node | None = None
        self.kids: dict[int, _Node] | None = None
        self.out = 0  # output-side frequency (an int until the first decay)
        self.inp = 0  # prompt-side frequency of the requests in flight
        self.x = 0  # score: always recomputed as out + prompt_weight * inp (never accumulated)
        self.uid = uid  # creation order: ties rank the newer node first
        self.tok = tok
        # the children ranked for queries (see TurboLookaheadCache._ranked): a list of
        # (x, uid, child) best first, built by the first query that expands this node; entries
        # whose x is no longer the child's are stale and skipped. Updates queue a fresh entry in
        # ``pending`` (merged in at the next query, a near-linear sort) instead of re-ranking.
        self.order: list[tuple] | None = None
        self.pending: list[tuple] | None = None

    @property
    def children(self) -> dict[int, "_Node"] | None:
        """Token -> child (None for a leaf; a one-entry dict made on the fly for an only child)."""
        if self.kids is not None:
            return self.kids
        c = self.only
        return None if c is None else {c.tok: c}

    def child(self, tok: int) -> "_Node | None":
        c = self.only
        if c is not None:
            return c if c.tok == tok else None
        kids = self.kids
        return None if kids is None else kids.get(tok)

    def child_nodes(self):
        kids = self.kids
        if kids is not None:
            return kids.values()
        return () if self.only is None else (self.only,)

    def __lt__(self, other: "_Node") -> bool:
        # the walk's heap entries are (-p, node, ...): on equal probabilities the newer node comes
        # first, as (-p, -uid) would order them, but a uid is only read on such a tie
        return self.uid > other.uid




@dataclass
class _Stream:
    """One request being indexed: its open windows."""

    prompt_side: bool = True
    tail: list[int] = field(default_factory=list)  # last (window - 1) tokens, for re-walks
    cursors: list = field(default_factory=list)  # open windows, oldest first; None = abandoned
    epoch: int = 0  # eviction epoch the cursors belong to
    prompt_nodes: list = field(default_factory=list)  # nodes whose ``inp`` this request raised


class TurboLookaheadCache:
    """Global frequency-ranked n-gram trie with bounded memory (no model, no tensors).

    Args:
        min_match: shortest suffix (tokens) looked up.
        max_match: longest suffix looked up.
        branch_length: at most this many tokens per branch (tree depth).
        capacity: the trie never holds more than this many nodes (root excluded).
        decay: on eviction, output-side frequencies are multiplied by this (0 < decay <= 1).
        prompt_weight: weight of prompt-side frequency in a node's score.
        evict_to: an eviction keeps at most this fraction of ``capacity``.
    """

    def __init__(self, *, min_match: int = 1, max_match: int = 4, branch_length: int = 12, capacity: int = 1_000_000,
                 decay: float = 0.5, prompt_weight: float = 1.0, evict_to: float = 0.75):
        check_knobs(min_match=min_match, max_match=max_match, branch_length=branch_length)
        window = max_match + branch_length
        if not isinstance(capacity, int) or capacity < 4 * window:
            raise ValueError(f"capacity must be an int >= 4 * (max_match + branch_length) = {4 * window}, got {capacity!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if prompt_weight < 0:
            raise ValueError(f"prompt_weight must be >= 0, got {prompt_weight}")
        if not 0.0 < evict_to < 1.0:
            raise ValueError(f"evict_to must be in (0, 1), got {evict_to}")
        self.min_match = min_match
        self.max_match = max_match
        self.branch_length = branch_length
        self.capacity = capacity
        self.decay = decay
        self.prompt_weight = prompt_weight
        # the weight the scores are computed with: an int when it is one (1.0 -> 1), so that
        # scores stay small ints (shared objects, no float per node to fetch) until the first
        # decay; equal values, so the same ranking and the same products as with floats
        self._pw = int(prompt_weight) if float(prompt_weight).is_integer() else prompt_weight
        self.evict_to = evict_to
        self.window = window
        self._root = _Node(0, -1)
        self._next_uid = 1
        self._count = 0
        self._epoch = 0
        self._streams: dict[int, _Stream] = {}
        # one int object per token id: nodes of the same token share it, so dict probes match it by
        # identity and hashing it reads one (usually cached) object instead of one per node
        self._tok_ids: dict[int, int] = {}
        self._next_handle = 0
        self.evictions = 0

    def __repr__(self) -> str:
        return (f"TurboLookaheadCache(min_match={self.min_match}, max_match={self.max_match}, branch_length="
                f"{self.branch_length}, capacity={self.capacity}, decay={self.decay}, nodes={self._count})")

    @property
    def node_count(self) -> int:
        """Nodes in the trie, root excluded (always ``<= capacity``)."""
        return self._count

    @property
    def active_requests(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ updates
    def begin(self, prompt: Iterable[int] = ()) -> int:
        """Start a request: index its prompt (prompt-side) and return a handle for :meth:`extend`."""
        h = self._next_handle
        self._next_handle += 1
        s = _Stream(epoch=self._epoch)
        self._streams[h] = s
        self._feed(s, prompt)
        s.prompt_side = False
        return h

    def extend(self, handle: int, tokens: Iterable[int]) -> None:
        """Index tokens committed for request ``handle`` (output-side)."""
        s = self._stream(handle)
        s.prompt_side = False
        self._feed(s, tokens)

    def end(self, handle: int) -> None:
        """Finish a request: take back its prompt-side counts. Output-side counts stay."""
        s = self._streams.pop(handle, None)
        if s is None:
            raise KeyError(f"no request with handle {handle}")
        pw = self._pw
        for parent, node in s.prompt_nodes:
            node.inp -= 1
            node.x = node.out + pw * node.inp
            parent.order = parent.pending = None  # a score went down: rank again from scratch

    def warm_up(self, sequences: Iterable[Sequence[int]]) -> None:
        """Index a corpus of token sequences (e.g. earlier outputs) as output-side statistics,
        then rank the children of every node (:meth:`rank_all`)."""
        for seq in sequences:
            h = self.begin(())
            self.extend(h, seq)
            self.end(h)
        self.rank_all()

    def rank_all(self) -> None:
        """Rank the children of every node that has several (what the first query to expand each
        would do, see :meth:`_ranked`), so queries after a warm-up or a :meth:`load` do not pay
        for it. Changes no proposal; O(nodes): about a tenth of the time the warm-up took."""
        ranked = self._ranked
        stack = list(self._root.child_nodes())  # (the root itself is never expanded)
        while stack:
            node = stack.pop()
            while node.only is not None:  # down a chain of only children
                node = node.only
            if node.kids is None:
                continue
            if node.order is None or node.pending is not None:
                ranked(node)
            stack.extend(node.kids.values())

    def _stream(self, handle: int) -> _Stream:
        s = self._streams.get(handle)
        if s is None:
            raise KeyError(f"no request with handle {handle}")
        return s

    def _feed(self, s: _Stream, tokens: Iterable[int]) -> None:
        """Advance every open window of ``s`` by each token (the hot update path: inlined)."""
        W = self.window
        cap = self.capacity
        pw = self._pw
        root = self._root
        prompt_side = s.prompt_side
        prompt_nodes = s.prompt_nodes
        tail = s.tail
        tok_id = self._tok_ids.setdefault
        for tok in tokens:
            tok = int(tok)
            tok = tok_id(tok, tok)
            if self._count + W > cap:
                self._evict()
            if s.epoch != self._epoch:
                self._rewalk(s)
            cursors = s.cursors
            cursors.append(root)  # the window starting at this token
            uid = self._next_uid
            if not prompt_side:  # generated tokens: the path every timed update takes
                for j, node in enumerate(cursors):
                    if node is None:
                        continue
                    nxt = node.only
                    if nxt is not None:
                        if nxt.tok != tok:  # the only child is another token's: a second child
                            new = _Node(uid, tok)
                            uid += 1
                            node.kids = {nxt.tok: nxt, tok: new}
                            node.only = None
                            nxt = new
                    else:
                        ch = node.kids
                        if ch is None:  # a leaf
                            nxt = node.only = _Node(uid, tok)
                            uid += 1
                        else:
                            nxt = ch.get(tok)
                            if nxt is None:
                                nxt = ch[tok] = _Node(uid, tok)
                                uid += 1
                    o = nxt.out + 1
                    nxt.out = o
                    x = nxt.x = o + pw * nxt.inp
                    if node.order is not None:
                        # the score rose (never fell), so the new entry outranks the child's old one
                        pend = node.pending
                        if pend is None:
                            node.pending = [(x, nxt.uid, nxt)]
                        else:
                            pend.append((x, nxt.uid, nxt))
                    cursors[j] = nxt
            else:
                for j, node in enumerate(cursors):
                    if node is None:
                        continue
                    nxt = node.child(tok)
                    if nxt is None:
                        nxt = _Node(uid, tok)
                        uid += 1
                        if node.only is not None:
                            node.kids = {node.only.tok: node.only, tok: nxt}
                            node.only = None
                        elif node.kids is not None:
                            node.kids[tok] = nxt
                        else:
                            node.only = nxt
                    i = nxt.inp + 1
                    nxt.inp = i
                    x = nxt.x = nxt.out + pw * i
                    prompt_nodes.append((node, nxt))
                    if node.order is not None and pw:
                        pend = node.pending
                        if pend is None:
                            node.pending = [(x, nxt.uid, nxt)]
                        else:
                            pend.append((x, nxt.uid, nxt))
                    cursors[j] = nxt
            self._count += uid - self._next_uid
            self._next_uid = uid
            if len(cursors) >= W:  # the oldest window is complete
                del cursors[0]
            tail.append(tok)
            if len(tail) >= W:
                del tail[0]

    def _rewalk(self, s: _Stream) -> None:
        """After an eviction the cursors may point at removed nodes: find them again from the
        root (never creating nodes); a window whose path was evicted is abandoned."""
        n = len(s.cursors)
        tail = s.tail[len(s.tail) - n :] if n else []
        new = []
        for j in range(n):
            node = self._root if s.cursors[j] is not None else None
            for t in tail[j:]:
                if node is None:
                    break
                node = node.child(t)
            new.append(node)
        s.cursors = new
        s.epoch = self._epoch

    def _score(self, node: _Node) -> float:
        return node.out + self._pw * node.inp

    def _evict(self) -> None:
        """Decay ``out`` everywhere and cut the trie to ``evict_to * capacity`` nodes (lowest score
        first, older first on ties; a removed node takes its subtree with it)."""
        target = min(int(self.capacity * self.evict_to), self.capacity - self.window)
        pw = self._pw
        scores, uids = [], []
        stack = [self._root]
        while stack:
            node = stack.pop()
            for c in node.child_nodes():
                scores.append(c.out + pw * c.inp)
                uids.append(c.uid)
                stack.append(c)
        # the cut: every node whose (score, uid) is <= (thr_score, thr_uid), i.e. the k lowest
        k = len(scores) - target
        thr_score, thr_uid = float("-inf"), -1
        if k > 0:
            ordered = sorted(scores)
            thr_score = ordered[k - 1]
            ties_needed = k - bisect.bisect_left(ordered, thr_score)
            del ordered
            tie_uids = sorted(u for x, u in zip(scores, uids) if x == thr_score)
            thr_uid = tie_uids[ties_needed - 1]
        del scores, uids
        decay = self.decay
        kept = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            ch = node.kids
            if ch is None:
                if node.only is None:
                    continue
                ch = {node.only.tok: node.only}
            for tok in list(ch):
                c = ch[tok]
                x = c.out + pw * c.inp
                if x < thr_score or (x == thr_score and c.uid <= thr_uid):
                    del ch[tok]
                    continue
                c.out *= decay
                c.x = c.out + pw * c.inp
                kept += 1
                stack.append(c)
            node.order = node.pending = None  # rebuilt on demand (children removed, scores decayed)
            node.only = node.kids = None
            if len(ch) == 1:
                for node.only in ch.values():
                    pass
            elif ch:
                node.kids = ch
        self._count = kept
        self._epoch += 1
        self.evictions += 1

    # ------------------------------------------------------------------ queries
    def query(self, context: Sequence[int], budget: int) -> Proposal:
        """Ranked draft nodes (at most ``budget``) continuing ``context`` (only its last
        ``max_match`` tokens are read).

        For n = ``max_match`` down to ``min_match`` while budget remains: find the node of the
        context's last n tokens and add its subtree best-first by estimated path probability
        (see :meth:`_walk`), at most ``branch_length`` deep; nodes already in the tree are merged.
        """
        check_budget(budget)
        builder = _Builder(budget)
        if budget == 0:
            return Proposal()
        match_len = 0
        for n, node, order in self._matches(context):
            match_len = match_len or n
            toks = builder.tokens
            if not toks:  # a fresh tree: nothing can merge, no index
                self._walk(builder, node, order, None)
            else:
                index = builder._index
                if len(index) < len(toks):  # the previous pass was a fresh one: build its merge index now
                    index.update(zip(zip(builder.parents, toks), range(len(toks))))
                self._walk(builder, node, order, index)
            if builder.full:
                break
        return Proposal(builder.tokens, builder.parents, match_len if builder.tokens else 0)

    def _matches(self, context: Sequence[int]):
        """``(n, node, ranked children)`` for each suffix of ``context``, ``max_match`` down to
        ``min_match`` tokens long, whose trie node has a child with a positive score (generated
        lazily: a query that fills its tree stops looking up shorter suffixes)."""
        L = len(context)
        tok_id = self._tok_ids.get
        ctx = [tok_id(t, t) for t in map(int, context[max(0, L - self.max_match) :])]
        L = len(ctx)
        for n in range(min(self.max_match, L), self.min_match - 1, -1):
            node = self._root
            for t in ctx[L - n :]:
                node = node.child(t)
                if node is None:
                    break
            if node is None or (node.only is None and node.kids is None):
                continue
            order = self._ranked(node)
            if not order or order[0][0] <= 0:  # (the first entry is never stale after _ranked)
                continue
            yield n, node, order

    def _walk(self, builder: _Builder, start: _Node, order: list, index: dict | None) -> None:
        """Best-first walk of ``start``'s subtree (``order``: its ranked children) into
        ``builder``; ``index`` is the tree's merge index, or None for a walk into an empty tree
        (no node can merge there).

        Nodes rank by an estimate of the probability that the target reaches them: the product,
        along the path, of ``score(child) / (score(parent) + 1)`` (the +1 discounts contexts seen
        rarely), so the tree trades depth for breadth by expected acceptance (as EAGLE-2 ranks
        by path confidence, https://arxiv.org/abs/2406.16858); ties go to the newer node. A node
        that is already in the tree (from a longer suffix's pass) is merged and costs nothing; the
        pass ends when a new node finds the budget spent.

        Siblings are enumerated lazily (as in k-best enumeration): a node's children share one
        factor, so their order is the node's ranked child list (:meth:`_ranked`), and only the
        best child enters the heap; popping an entry queues its next sibling. The heap never holds
        more than one entry per expanded node, and the pop order (hence the tree) is the same as
        queueing every child at once. So a proposal at budget k is exactly the first k nodes of the
        proposal at any larger budget. The first pass (an empty tree, where nothing can merge)
        skips the merge index.

        The current entry lives in locals: ``neg_p`` (minus the path probability), ``depth``,
        ``parent`` (its parent's id in the tree), ``node``, and its siblings' ``f`` (shared factor),
        ``sib`` (ranked list, None for an only child) and ``j`` (its position there). Heap entries
        are ``(neg_p, node, depth, parent, f, sib, j)``, ordered as ``(neg_p, -uid)`` (``_Node``
        compares newer first); a child that beats every queued entry (what ``heappushpop`` would
        hand back) becomes the current entry without being packed into one.
        """
        budget = builder.budget
        toks, pars = builder.tokens, builder.parents
        heappush, heappushpop, heappop = heapq.heappush, heapq.heappushpop, heapq.heappop
        ranked = self._ranked
        cap = self.branch_length
        f = -1.0 / (start.x + 1.0)
        x, _, node = order[0]
        neg_p, depth, parent, sib, j = x * f, 1, -1, order, 0
        heap = []
        while True:
            if sib is not None:  # queue the next sibling (skipping stale entries)
                for j in range(j + 1, len(sib)):
                    x, _, c = sib[j]
                    if x == c.x:
                        if x > 0:
                            heappush(heap, (f * x, c, depth, parent, f, sib, j))
                        break
            if index is None:
                nid = len(toks)
                if nid >= budget:
                    return
                toks.append(node.tok)
                pars.append(parent)
            else:
                key = (parent, node.tok)
                nid = index.get(key)
                if nid is None:
                    nid = len(toks)
                    if nid >= budget:
                        return
                    toks.append(node.tok)
                    pars.append(parent)
                    index[key] = nid
            if depth < cap:
                c = node.only
                if c is not None:  # most deep nodes: one continuation
                    x = c.x
                    sib = None
                else:
                    sib = node.order
                    if sib is None or node.pending is not None:
                        sib = ranked(node) if node.kids is not None else None
                    if sib is None:  # a leaf
                        x = 0
                    else:
                        x, _, c = sib[0]
                if x > 0:
                    f = neg_p / (node.x + 1.0)
                    p = f * x
                    if heap:
                        h = heap[0]
                        if p > h[0] or (p == h[0] and h[1] < c):  # a queued entry comes first
                            neg_p, node, depth, parent, f, sib, j = heappushpop(
                                heap, (p, c, depth + 1, nid, f, sib, 0))
                            continue
                    neg_p, depth, parent, node, j = p, depth + 1, nid, c, 0
                    continue
            if not heap:
                return
            neg_p, node, depth, parent, f, sib, j = heappop(heap)

    def query_merged(self, context: Sequence[int], budget: int, first: Proposal) -> Proposal:
        """``merge_proposals([first, self.query(context, budget)], budget)``, computed in one walk.

        Hybrid's tree (Raw's proposal ``first`` interleaved rank by rank with this cache's) without
        building Turbo's proposal and merging it afterwards: the best-first walk of :meth:`query`
        writes straight into the merged tree. Just before Turbo's rank-r node (a node new to
        Turbo's own tree) is placed, ``first``'s rank-r node is, as in the round-robin merge. The
        merged tree and Turbo's own tree are the same paths under different node ids (a node is
        its path in both), so one index keyed by merged ids serves both merges, and a flag per
        merged node says whether Turbo's tree has it already (merged for free) or not (Turbo's next
        rank). The walk stops as soon as the merged tree is full (later ranks could only merge or
        be cut) or Turbo's own budget is spent; ``first``'s remaining ranks follow.
        """
        check_budget(budget)
        if budget == 0:
            return Proposal()
        toks: list[int] = []
        pars: list[int] = []
        index: dict = {}
        in_turbo: list[bool] = []  # per merged node: Turbo's own tree has it
        fmap = [-2] * len(first.tokens) + [-1]  # first's node -> merged node (-2: cut); root slot
        state = [0, toks, pars, index, in_turbo, first.tokens, first.parents, fmap]  # [0]: Turbo's rank count
        match_len = 0
        full = False
        for n, node, order in self._matches(context):
            match_len = match_len or n
            if self._walk_merged(budget, node, order, state):
                full = True
                break
            if state[0] >= budget:
                break
        if not full:  # first's ranks that Turbo's did not reach
            ftoks, fpars = first.tokens, first.parents
            for r in range(state[0], len(ftoks)):
                mpar = fmap[fpars[r]]
                if mpar == -2:
                    continue
                key = (mpar, ftoks[r])
                got = index.get(key)
                if got is None:
                    if len(toks) >= budget:
                        break  # full: the rest can only merge or be cut
                    got = index[key] = len(toks)
                    toks.append(ftoks[r])
                    pars.append(mpar)
                fmap[r] = got
        match = max(first.match_len, match_len)  # (a pass that starts always gives Turbo a node)
        return Proposal(toks, pars, match if toks else 0)

    def _walk_merged(self, budget: int, start: _Node, order: list, state: list) -> bool:
        """:meth:`_walk` writing into the merged tree of :meth:`query_merged`; True when that tree
        is full. The sibling queueing and heap steps repeat :meth:`_walk`'s on purpose: a shared
        per-node generator or callback would add a call per walked node on the per-step hot path."""
        tcount, toks, pars, index, in_turbo, ftoks, fpars, fmap = state
        nfirst = len(ftoks)
        heappush, heappushpop, heappop = heapq.heappush, heapq.heappushpop, heapq.heappop
        ranked = self._ranked
        cap = self.branch_length
        f = -1.0 / (start.x + 1.0)
        x, _, node = order[0]
        neg_p, depth, parent, sib, j = x * f, 1, -1, order, 0
        heap = []
        try:
            while True:
                if sib is not None:  # queue the next sibling (skipping stale entries)
                    for j in range(j + 1, len(sib)):
                        x, _, c = sib[j]
                        if x == c.x:
                            if x > 0:
                                heappush(heap, (f * x, c, depth, parent, f, sib, j))
                            break
                tok = node.tok
                key = (parent, tok)
                nid = index.get(key)
                if nid is None or not in_turbo[nid]:  # Turbo's rank ``tcount``
                    if tcount >= budget:
                        return False  # Turbo's own budget is spent
                    if tcount < nfirst:  # the round-robin: first's rank ``tcount`` goes first
                        mpar = fmap[fpars[tcount]]
                        if mpar != -2:
                            t2 = ftoks[tcount]
                            k2 = (mpar, t2)
                            got = index.get(k2)
                            if got is None:
                                got = index[k2] = len(toks)
                                toks.append(t2)
                                pars.append(mpar)
                                in_turbo.append(False)
                                if got + 1 >= budget:
                                    return True
                                if k2 == key:
                                    nid = got
                            fmap[tcount] = got
                    tcount += 1
                    if nid is None:
                        nid = index[key] = len(toks)
                        toks.append(tok)
                        pars.append(parent)
                        in_turbo.append(True)
                        if nid + 1 >= budget:
                            return True
                    else:
                        in_turbo[nid] = True
                if depth < cap:
                    c = node.only
                    if c is not None:
                        x = c.x
                        sib = None
                    else:
                        sib = node.order
                        if sib is None or node.pending is not None:
                            sib = ranked(node) if node.kids is not None else None
                        if sib is None:
                            x = 0
                        else:
                            x, _, c = sib[0]
                    if x > 0:
                        f = neg_p / (node.x + 1.0)
                        p = f * x
                        if heap:
                            h = heap[0]
                            if p > h[0] or (p == h[0] and h[1] < c):
                                neg_p, node, depth, parent, f, sib, j = heappushpop(
                                    heap, (p, c, depth + 1, nid, f, sib, 0))
                                continue
                        neg_p, depth, parent, node, j = p, depth + 1, nid, c, 0
                        continue
                if not heap:
                    return False
                neg_p, node, depth, parent, f, sib, j = heappop(heap)
        finally:
            state[0] = tcount

    @staticmethod
    def _ranked(node: _Node) -> list[tuple]:
        """``node``'s children as ``(x, uid, child)`` entries, best first (higher score, then
        newer); an entry whose ``x`` differs from ``child.x`` is stale (skip it).

        Built on the first query that expands the node. Afterwards an update only queues the
        child's new entry (scores only rise while requests run; a fall, at :meth:`end`, or an
        eviction drops the list), and the next query merges the queue in with one sort of an
        already sorted run plus a short tail: near-linear, in C, comparing floats, instead of
        scoring every child of a wide node again. The list is rebuilt when stale entries would
        make up more than half of it.
        """
        order = node.order
        if order is None:
            order = node.order = sorted([(c.x, c.uid, c) for c in node.child_nodes()], reverse=True)
            node.pending = None
        elif node.pending is not None:
            order += node.pending
            node.pending = None
            if len(order) > 2 * (len(node.kids) if node.kids is not None else 1) + 8:
                order = node.order = sorted([(c.x, c.uid, c) for c in node.child_nodes()], reverse=True)
            else:
                order.sort(reverse=True)
        return order

    # ------------------------------------------------------------------ persistence
    def count_nodes(self) -> int:
        """Count the nodes by walking the trie (for checks; :attr:`node_count` is O(1))."""
        n, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            kids = node.child_nodes()
            n += len(kids)
            stack.extend(kids)
        return n

    def save(self, path: str | Path) -> None:
        """Write the trie (output-side statistics) and its knobs to a JSON file.

        The whole trie is written (so a loaded cache also evicts at the same moments), but
        prompt-side counts belong to requests in flight and are not: save between requests to get
        a cache whose proposals stay identical after :meth:`load`.
        """
        tokens, parents, outs, uids = [], [], [], []
        stack = [(self._root, -1)]
        while stack:
            node, idx = stack.pop()
            for c in node.child_nodes():
                tokens.append(c.tok)
                parents.append(idx)
                outs.append(c.out)
                uids.append(c.uid)
                stack.append((c, len(tokens) - 1))
        doc = {
            "format": _FORMAT,
            "knobs": dict(min_match=self.min_match, max_match=self.max_match, branch_length=self.branch_length,
                          capacity=self.capacity, decay=self.decay, prompt_weight=self.prompt_weight,
                          evict_to=self.evict_to),
            "next_uid": self._next_uid,
            "evictions": self.evictions,
            "tokens": tokens, "parents": parents, "out": outs, "uid": uids,
        }
        Path(path).write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: str | Path) -> "TurboLookaheadCache":
        """Read a cache written by :meth:`save`."""
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a Turbo lookahead cache file (format {doc.get('format')!r})")
        cache = cls(**doc["knobs"])
        nodes = []
        for tok, par, out, uid in zip(doc["tokens"], doc["parents"], doc["out"], doc["uid"]):
            tok = cache._tok_ids.setdefault(tok, tok)
            node = _Node(uid, tok)
            node.out = out
            node.x = out + cache._pw * node.inp
            parent = cache._root if par < 0 else nodes[par]
            if parent.kids is not None:
                parent.kids[tok] = node
            elif parent.only is not None:
                parent.kids = {parent.only.tok: parent.only, tok: node}
                parent.only = None
            else:
                parent.only = node
            nodes.append(node)
        cache._count = len(nodes)
        cache._next_uid = doc["next_uid"]
        cache.evictions = doc["evictions"]
        cache.rank_all()
        return cache
