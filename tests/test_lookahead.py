"""The n-gram caches on their own (no model): literal trees, a brute-force oracle, memory bounds,
persistence, knob validation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead.raw import RawLookaheadCache
from lookahead.trie import Proposal, _Builder, merge_proposals
from lookahead.turbo import TurboLookaheadCache


# ---------------------------------------------------------------------------- Raw: literal trees
def test_raw_literal_two_branches_most_recent_first():
    c = RawLookaheadCache(min_match=1, max_match=2, branch_length=3)
    c.extend([1, 2, 3, 1, 2, 4, 1, 2])
    p = c.query(8)
    # suffix (1, 2) was followed by 3 (position 2) and by 4 (position 5): equal counts, the more
    # recent branch ranks first; the 1-token pass finds the same occurrences, merged for free
    assert p.tokens == [4, 1, 2, 3, 1, 2]
    assert p.parents == [-1, 0, 1, -1, 3, 4]
    assert p.match_len == 2
    assert p.paths() == [[4, 1, 2], [3, 1, 2]]


def test_raw_literal_frequency_beats_recency_and_budget_cuts_tail():
    c = RawLookaheadCache(min_match=1, max_match=1, branch_length=2)
    c.extend([7, 5, 7, 5, 7, 6, 7])
    # after 7: 5 (twice: positions 1, 3) and 6 (once, position 5, the most recent)
    p = c.query(8)
    assert p.tokens == [5, 7, 6, 7]
    assert p.parents == [-1, 0, -1, 2]
    assert c.query(3).tokens == [5, 7, 6]
    assert c.query(3).parents == [-1, 0, -1]
    assert c.query(0) == Proposal()


def test_raw_literal_shorter_match_fills_remaining_budget():
    c = RawLookaheadCache(min_match=1, max_match=2, branch_length=2)
    c.extend([9, 4, 8, 3, 4, 1, 3, 4])
    # (3, 4) occurred once, followed by 1, 3; the 1-token pass (4) adds position 2's branch 8, 3
    p = c.query(8)
    assert p.match_len == 2
    assert p.tokens == [1, 3, 8, 3]
    assert p.parents == [-1, 0, -1, 2]
    assert c.query(2).tokens == [1, 3]


def test_raw_no_match_and_short_history():
    c = RawLookaheadCache(min_match=2, max_match=3, branch_length=4)
    assert c.query(5) == Proposal()
    c.extend([1, 2, 3])
    assert c.query(5) == Proposal()  # (2, 3) never seen before
    c.extend([4, 2, 3])
    assert c.query(5).tokens == [4, 2, 3]  # stops at the end of the history


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_match=3, max_match=2), dict(min_match=0), dict(branch_length=0), dict(max_candidates=0),
     dict(max_match=1.5)],
)
def test_raw_bad_knobs(kwargs):
    with pytest.raises(ValueError):
        RawLookaheadCache(**kwargs)


def test_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        RawLookaheadCache().query(-1)
    with pytest.raises(ValueError, match="budget"):
        TurboLookaheadCache().query([1, 2], -1)
    with pytest.raises(ValueError, match="budget"):
        merge_proposals([], -2)


# ---------------------------------------------------------------------------- Raw vs oracle
def oracle_raw(tokens, *, min_match, max_match, branch_length, max_candidates, budget) -> Proposal:
    """Brute force: scan the whole history for every suffix length, enumerate every continuation
    prefix, sort all of them by (count desc, most recent desc, depth asc)."""
    L = len(tokens)
    b = _Builder(budget)
    match_len = 0
    if budget == 0:
        return Proposal()
    for n in range(min(max_match, L), min_match - 1, -1):
        if b.full:
            break
        suffix = tokens[L - n :]
        pos = [p for p in range(n, L) if tokens[p - n : p] == suffix]
        if not pos:
            continue
        match_len = match_len or n
        pos = pos[-max_candidates:]
        count, recent = {}, {}
        for p in pos:
            for k in range(1, min(branch_length, L - p) + 1):
                pre = tuple(tokens[p : p + k])
                count[pre] = count.get(pre, 0) + 1
                recent[pre] = max(recent.get(pre, -1), p)
        order = sorted(count, key=lambda pre: (-count[pre], -recent[pre], len(pre)))
        ids = {}
        for pre in order:
            parent = -1 if len(pre) == 1 else ids[pre[:-1]]
            nid = b.add(parent, pre[-1])
            if nid is None:
                break
            ids[pre] = nid
    return Proposal(b.tokens, b.parents, match_len if b.tokens else 0)


@settings(max_examples=150, deadline=None)
@given(
    stream=st.lists(st.integers(0, 5), min_size=0, max_size=60),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=30),
    min_match=st.integers(1, 3),
    extra=st.integers(0, 2),
    branch_length=st.integers(1, 6),
    max_candidates=st.integers(1, 6),
    budget=st.integers(0, 20),
)
def test_raw_matches_bruteforce_oracle(stream, chunks, min_match, extra, branch_length, max_candidates, budget):
    knobs = dict(min_match=min_match, max_match=min_match + extra, branch_length=branch_length,
                 max_candidates=max_candidates)
    c = RawLookaheadCache(**knobs)
    i = 0
    for k in chunks:  # incremental updates in uneven steps, a query after each
        c.extend(stream[i : i + k])
        i += k
        got = c.query(budget)
        want = oracle_raw(stream[:i], budget=budget, **knobs)
        assert (got.tokens, got.parents, got.match_len) == (want.tokens, want.parents, want.match_len)
        assert len(got) <= budget
        assert all(p < j for j, p in enumerate(got.parents))
        if i >= len(stream):
            break


# ---------------------------------------------------------------------------- Turbo
def test_turbo_literal_frequency_ranked_tree():
    t = TurboLookaheadCache(max_match=2, branch_length=3, capacity=100)
    t.warm_up([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4], [7, 1, 2, 9]])
    assert t.node_count == t.count_nodes() == 21
    p = t.query([5, 1, 2], 8)
    # after (1, 2): 3 (x3) -> 4 (x2), 5 (x1); 9 (x1, newer than 5 so ranked before it)
    assert p.tokens == [3, 4, 9, 5]
    assert p.parents == [-1, 0, -1, 0]
    assert p.match_len == 2
    # unseen bigram (8, 2): the 1-token suffix (2) still matches
    q = t.query([8, 2], 2)
    assert q.match_len == 1 and q.tokens == [3, 4]


def test_turbo_prompt_side_is_scoped_to_the_request():
    t = TurboLookaheadCache(max_match=2, branch_length=2, capacity=200)
    h = t.begin([5, 6, 7, 5, 6])
    assert t.query([5, 6], 4).tokens == [7, 5]  # the request's own prompt
    t.extend(h, [8])
    p = t.query([5, 6], 4)
    # prompt-side (5, 6) -> 7 -> 5 and output-side (5, 6) -> 8 both count 1: the newer node first
    assert p.tokens == [8, 7, 5]
    assert p.parents == [-1, -1, 1]
    t.end(h)
    # prompt-side counts are gone; the output-side window (5, 6) -> 8 stays
    assert t.query([5, 6], 4).tokens == [8]
    with pytest.raises(KeyError):
        t.end(h)


def test_turbo_stays_within_capacity_on_a_long_stream():
    rng = random.Random(0)
    cap = 600
    t = TurboLookaheadCache(max_match=3, branch_length=4, capacity=cap, decay=0.5)
    worst = 0
    for r in range(60):
        prompt = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        h = t.begin(prompt)
        worst = max(worst, t.node_count)
        for _ in range(rng.randrange(1, 15)):
            t.extend(h, [rng.randrange(50) for _ in range(rng.randrange(1, 5))])
            worst = max(worst, t.node_count)
            assert t.node_count == t.count_nodes()
            p = t.query(prompt[-3:], 16)
            assert len(p) <= 16
        t.end(h)
    assert t.evictions > 0, "the stream must overflow the cache for this test to mean anything"
    assert worst <= cap
    assert t.node_count == t.count_nodes() <= cap


def test_turbo_eviction_keeps_frequent_ngrams():
    t = TurboLookaheadCache(max_match=2, branch_length=2, capacity=2000, decay=0.5)
    t.warm_up([[1, 2, 3]] * 50)
    rng = random.Random(1)
    t.warm_up([[rng.randrange(100, 1000) for _ in range(30)] for _ in range(25)])
    assert 0 < t.evictions <= 4  # 50 * 0.5**4 still beats a fresh count of 1
    assert t.query([1, 2], 4).tokens == [3]


def test_turbo_save_load_identical_proposals(tmp_path):
    rng = random.Random(2)
    t = TurboLookaheadCache(max_match=3, branch_length=5, capacity=2000, decay=0.7)
    corpus = [[rng.randrange(30) for _ in range(rng.randrange(5, 60))] for _ in range(80)]
    t.warm_up(corpus)
    h = t.begin(corpus[0][:10])
    t.extend(h, corpus[1][:10])
    t.end(h)
    assert t.evictions > 0
    t.save(tmp_path / "turbo.json")
    u = TurboLookaheadCache.load(tmp_path / "turbo.json")
    assert u.capacity == t.capacity and u.decay == t.decay
    for _ in range(200):
        ctx = [rng.randrange(30) for _ in range(4)]
        a, b = t.query(ctx, 24), u.query(ctx, 24)
        assert (a.tokens, a.parents, a.match_len) == (b.tokens, b.parents, b.match_len)
    # they keep evolving identically
    more = [[rng.randrange(30) for _ in range(40)] for _ in range(20)]
    t.warm_up(more)
    u.warm_up(more)
    for _ in range(50):
        ctx = [rng.randrange(30) for _ in range(4)]
        assert t.query(ctx, 24) == u.query(ctx, 24)


def test_turbo_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a Turbo"):
        TurboLookaheadCache.load(tmp_path / "x.json")


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_match=3, max_match=2), dict(capacity=10), dict(decay=0.0), dict(decay=1.5), dict(prompt_weight=-1),
     dict(evict_to=1.0)],
)
def test_turbo_bad_knobs(kwargs):
    with pytest.raises(ValueError):
        TurboLookaheadCache(**kwargs)


# ---------------------------------------------------------------------------- merge (Hybrid)
def test_merge_interleaves_and_merges_shared_nodes():
    raw = Proposal([4, 1, 2], [-1, 0, 1], 2)
    turbo = Proposal([4, 1, 9, 3], [-1, 0, 1, -1], 1)
    m = merge_proposals([raw, turbo], 8)
    # rank 0: 4 (both, kept once); rank 1: 1 (both); rank 2: 2 (raw), 9 (turbo); rank 3: 3 (turbo)
    assert m.tokens == [4, 1, 2, 9, 3]
    assert m.parents == [-1, 0, 1, 1, -1]
    assert m.match_len == 2
    cut = merge_proposals([raw, turbo], 3)
    assert cut.tokens == [4, 1, 2] and cut.parents == [-1, 0, 1]


def test_merge_drops_children_of_cut_nodes():
    a = Proposal([1, 2, 3], [-1, 0, 1], 1)
    b = Proposal([5, 6, 7], [-1, 0, 1], 1)
    m = merge_proposals([a, b], 3)
    assert m.tokens == [1, 5, 2]
    assert m.parents == [-1, -1, 0]
    assert Proposal(m.tokens, m.parents).first_chain() == [1, 2]


# ---------------------------------------------------------------------------- adapter: proposal -> TokenTree
def test_proposals_to_tree_layout_and_vocab_filter():
    from types import SimpleNamespace

    import torch

    from drafters.lookahead import proposals_to_tree

    state = SimpleNamespace(host_tokens=[[5, 6, 7], [1, 2]], device=torch.device("cpu"), tree_device=torch.device("cpu"))
    prop = Proposal([4, 300, 9, 8], [-1, 0, 1, -1], 2)  # 300 is outside a vocab of 256: it and 9 go
    tree = proposals_to_tree(state, [prop, None], vocab=256)
    assert tree.tokens.tolist() == [[7, 4, 8], [2, 0, 0]]  # padding nodes (invalid)
    assert tree.parents.tolist() == [[-1, 0, 0], [-1, 0, 0]]
    assert tree.valid_mask.tolist() == [[True, True, True], [True, False, False]]
    assert tree.depths[0].tolist() == [0, 1, 1]


# ---------------------------------------------------------------------------- Turbo vs a plain best-first oracle
def oracle_turbo(cache: TurboLookaheadCache, context, budget) -> Proposal:
    """The retrieval spec, written plainly: for n = longest suffix down to ``min_match`` while budget
    remains, walk the n-gram's subtree best-first by path probability (product of
    ``score(child) / (score(parent) + 1)``, score = out + prompt_weight * inp, recomputed here;
    ties: newer node first), every child with a positive score queued (no pruning), nodes merged
    into the tree when (parent, token) is already there; a pass ends when a new node finds the
    budget spent."""
    import heapq as hq

    pw = cache.prompt_weight
    score = lambda node: node.out + pw * node.inp  # noqa: E731
    b = _Builder(budget)
    match_len = 0
    ctx = list(context)[-cache.max_match :]
    L = len(ctx)
    for n in range(min(cache.max_match, L), cache.min_match - 1, -1):
        if b.full:
            break
        node = cache._root
        for t in ctx[L - n :]:
            node = node.children.get(t) if node.children else None
            if node is None:
                break
        if node is None or not node.children or not any(score(c) > 0 for c in node.children.values()):
            continue
        match_len = match_len or n
        # (products evaluated in the cache's order, so that equal probabilities compare equal and
        # the newer-first tie-break decides, as in the cache)
        norm = -1.0 / (score(node) + 1.0)
        heap = [(score(c) * norm, -c.uid, 1, -1, t, c) for t, c in node.children.items() if score(c) > 0]
        hq.heapify(heap)
        while heap:
            neg_p, _, depth, parent, tok, c = hq.heappop(heap)
            nid = b.add(parent, tok)
            if nid is None:
                break
            if depth < cache.branch_length and c.children:
                for t2, c2 in c.children.items():
                    if score(c2) > 0:
                        hq.heappush(heap, (neg_p / (score(c) + 1.0) * score(c2), -c2.uid, depth + 1, nid, t2, c2))
    return Proposal(b.tokens, b.parents, match_len if b.tokens else 0)


@pytest.mark.parametrize("seed,capacity,prompt_weight", [(0, 5000, 1.0), (1, 400, 1.0), (2, 400, 0.0), (3, 2000, 2.5)])
def test_turbo_matches_plain_oracle_and_prefix_property(seed, capacity, prompt_weight):
    """Interleaved requests (prompt-side counts come and go), evictions, queries after every update:
    the optimised retrieval (ranked child lists kept across updates, lazy sibling queues, fast
    path) gives exactly the oracle's tree, and a proposal at budget k is the first k nodes of the
    proposal at a larger budget (what makes ranked proposals safe to cut and to merge)."""
    rng = random.Random(seed)
    t = TurboLookaheadCache(max_match=3, branch_length=5, capacity=capacity, prompt_weight=prompt_weight)
    t.warm_up([[rng.randrange(12) for _ in range(rng.randrange(5, 40))] for _ in range(15)])
    open_handles = []
    checked = 0
    for step in range(120):
        r = rng.random()
        if r < 0.15 or not open_handles:
            open_handles.append((t.begin([rng.randrange(12) for _ in range(rng.randrange(1, 20))]), []))
        elif r < 0.25:
            h, _ = open_handles.pop(rng.randrange(len(open_handles)))
            t.end(h)
        else:
            h, ctx = open_handles[rng.randrange(len(open_handles))]
            toks = [rng.randrange(12) for _ in range(rng.randrange(1, 4))]
            t.extend(h, toks)
            ctx.extend(toks)
        context = [rng.randrange(12) for _ in range(3)]
        for budget in (1, 3, 8, 20, 60):
            got, want = t.query(context, budget), oracle_turbo(t, context, budget)
            assert (got.tokens, got.parents, got.match_len) == (want.tokens, want.parents, want.match_len)
            assert len(got) <= budget
            checked += len(got)
        big = t.query(context, 60)
        for k in (1, 2, 5, 13, 30):
            small = t.query(context, k)
            assert (small.tokens, small.parents) == (big.tokens[:k], big.parents[:k])
    assert checked > 500, "the queries must return real trees for this test to mean anything"
    if capacity < 1000:
        assert t.evictions > 0


def test_turbo_ranked_lists_stay_exact_under_many_updates():
    """A node queried after every update while its few children keep gaining counts: its ranked
    list gathers stale entries, is merged at every query and compacted when stale entries
    dominate; every answer still equals the oracle's."""
    rng = random.Random(5)
    t = TurboLookaheadCache(max_match=2, branch_length=3, capacity=5000)
    h = t.begin([1, 2, 1, 3])
    ctx = [1, 2, 1, 3]
    for _ in range(200):
        tok = rng.choice([1, 1, 2, 3, 4])
        t.extend(h, [tok])
        ctx.append(tok)
        for context in ([1], ctx[-2:]):
            got, want = t.query(context, 10), oracle_turbo(t, context, 10)
            assert (got.tokens, got.parents, got.match_len) == (want.tokens, want.parents, want.match_len)
    node = t._root.children[1]
    assert node.order is not None and len(node.order) <= 2 * len(node.children) + 8 + 4
    t.end(h)
    got, want = t.query([1], 10), oracle_turbo(t, [1], 10)  # prompt-side counts gone: lists rebuilt
    assert (got.tokens, got.parents) == (want.tokens, want.parents)


def _merge_oracle(proposals, budget):
    """Rank-by-rank interleave, written plainly: merged node of (proposal k, node i) by its path."""
    b = _Builder(budget)
    ids = [dict() for _ in proposals]  # per proposal: node -> merged node (absent: cut)
    for r in range(max((len(p) for p in proposals), default=0)):
        for k, p in enumerate(proposals):
            if r >= len(p):
                continue
            par = p.parents[r]
            if par >= 0 and par not in ids[k]:
                continue
            nid = b.add(-1 if par < 0 else ids[k][par], p.tokens[r])
            if nid is not None:
                ids[k][r] = nid
    return b.tokens, b.parents


def test_merge_matches_plain_oracle_on_random_proposals():
    rng = random.Random(7)
    for _ in range(300):
        props = []
        for _ in range(rng.randrange(1, 4)):
            n = rng.randrange(0, 12)
            parents = [rng.randrange(-1, i) for i in range(n)]
            props.append(Proposal([rng.randrange(3) for _ in range(n)], parents, rng.randrange(0, 4)))
        for budget in (0, 1, 4, 9, 40):
            m = merge_proposals(props, budget)
            assert (m.tokens, m.parents) == _merge_oracle(props, budget)
            assert len(m) <= budget and all(p < i for i, p in enumerate(m.parents))


@pytest.mark.parametrize("seed,capacity,prompt_weight", [(0, 5000, 1.0), (1, 400, 0.0), (2, 2000, 2.5)])
def test_turbo_query_merged_equals_merge_of_proposals(seed, capacity, prompt_weight):
    """Hybrid's one-walk merge equals ``merge_proposals([first, turbo query])`` (tokens, parents,
    match length) for Raw's own proposals, for empty ones and for random ones (shared nodes, cut
    parents, a full tree before Turbo's walk ends), over updates with evictions, at budgets 0-60."""
    rng = random.Random(seed)
    V = 8
    t = TurboLookaheadCache(max_match=3, branch_length=5, capacity=capacity, prompt_weight=prompt_weight)
    t.warm_up([[rng.randrange(V) for _ in range(rng.randrange(5, 40))] for _ in range(10)])
    raw = RawLookaheadCache(max_match=3, branch_length=5)
    prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 20))]
    h = t.begin(prompt)
    raw.extend(prompt)
    checked = 0
    for _ in range(60):
        toks = [rng.randrange(V) for _ in range(rng.randrange(1, 4))]
        t.extend(h, toks)
        raw.extend(toks)
        ctx = raw.tokens[-3:]
        for budget in (0, 1, 2, 3, 8, 20, 60):
            k = rng.randrange(0, budget + 1)
            rnd = Proposal([rng.randrange(V) for _ in range(k)], [rng.randrange(-1, i) for i in range(k)], rng.randrange(4))
            for first in (raw.query(budget), Proposal(), rnd):
                want = merge_proposals([first, t.query(ctx, budget)], budget)
                got = t.query_merged(ctx, budget, first)
                assert (got.tokens, got.parents, got.match_len) == (want.tokens, want.parents, want.match_len)
                checked += len(got)
    assert checked > 2000
    if capacity < 1000:
        assert t.evictions > 0
