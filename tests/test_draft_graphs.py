"""Model drafters' captured draft steps (specdec.draft_graphs).

CPU: the fixed-view static-buffer path that the graphs replay (``cuda_graphs="static"``, run
eagerly) proposes exactly the eager path's trees and the generated tokens equal the target's
greedy output (DraftModel chain / tree, EarlyExit chain / tree, QuantizedCopy; batch 2 with a row
finishing early; reuse across calls; invalidation; sampling and threshold fall back to eager).
CUDA only (skipped on CPU): real graph replays give the eager path's trees and tokens.
"""

import pytest
import torch

import specdec
from drafters import DraftModel, EarlyExit, QuantizedCopy
from specdec.cuda_graph import CUDAGraphRunner
from specdec.draft_graphs import DraftGraphs
from specdec.generate import SpecDecInputError, verify_step
from tests.helpers import eos_stops_one_row, tiny_model
from verifiers import SDPAVerifier

NEW = 32
CUDA = torch.cuda.is_available()


def _prompt(seed=1, T=10, B=1, device="cpu"):
    return torch.randint(3, 256, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def _record(drafter):
    """Wrap ``drafter.propose`` to keep a copy of every proposed tree ([B, N] tokens, parents)."""
    trees = []
    orig = drafter.propose

    def propose(state, budget):
        t = orig(state, budget)
        trees.append((t.tokens.clone(), t.parents.clone()))
        return t

    drafter.propose = propose
    return trees


def _noisy(model, scale=0.3, seed=0):
    """A perturbed copy of ``model``: a draft that agrees with it only part of the time."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g).to(p.device))
    return m


def _make(name, model, mode):
    draft = _noisy(model)
    if name == "draft-self-chain":  # the target drafting for itself: long acceptances, catch-up n = 1..depth+1
        return DraftModel(model, depth=4, cuda_graphs=mode)
    if name == "draft-other-tree":
        return DraftModel(draft, depth=3, branching=2, width=2, cuda_graphs=mode)
    if name == "early-exit-chain":
        return EarlyExit(model, exit_layer=1, depth=4, cuda_graphs=mode)
    if name == "early-exit-tree":
        return EarlyExit(model, exit_layer=1, depth=3, branching=2, width=3, cuda_graphs=mode)
    if name == "quantized-int8":
        return QuantizedCopy(model, bits=8, depth=3, cuda_graphs=mode)
    raise ValueError(name)


NAMES = ["draft-self-chain", "draft-other-tree", "early-exit-chain", "early-exit-tree", "quantized-int8"]


def _same_trees(a, b):
    assert len(a) == len(b)
    for i, ((ta, pa), (tb, pb)) in enumerate(zip(a, b)):
        assert torch.equal(ta, tb) and torch.equal(pa, pb), f"step {i}: trees differ"


@pytest.mark.parametrize("name", NAMES)
def test_static_path_matches_eager_cpu(name):
    """Fixed view + static buffers (what the graph replays), run eagerly: same trees every step,
    same tokens (= the target's greedy output), with the verify step eager or on a static runner;
    the static cache and per-shape entries are reused by the next call."""
    model = tiny_model("llama")
    prompt = _prompt(seed=5)
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    eager_d = _make(name, model, False)
    eager_trees = _record(eager_d)
    eager = specdec.generate(model, prompt, drafter=eager_d, max_new_tokens=NEW, budget=6, verifier=SDPAVerifier(),
                             cuda_graphs=False)
    assert eager_d.graphs is None
    static_d = _make(name, model, "static")
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 256, buckets=(1, 4, 8), capture=False)
    steps = 0
    for verify_graphs in (False, runner, runner):  # eager verify, then a static runner twice (shared buffers)
        static_trees = _record(static_d)
        out = specdec.generate(model, prompt, drafter=static_d, max_new_tokens=NEW, budget=6, verifier=SDPAVerifier(),
                               cuda_graphs=verify_graphs)
        static_d.propose = type(static_d).propose.__get__(static_d)  # unwrap for the next call
        steps += out.stats.verify_steps
        assert out.new_tokens == eager.new_tokens == ref.new_tokens
        assert out.stats.accepted_per_depth == eager.stats.accepted_per_depth
        _same_trees(static_trees, eager_trees)
    g = static_d.graphs
    assert isinstance(g, DraftGraphs) and not g.capture and len(g) > 0 and g.stats.static_runs > 0
    if isinstance(static_d, DraftModel):
        # every propose ran the static path (the prompt is caught up in prefill)
        assert g.stats.static_runs == steps
        first_cache = static_d.cache
        specdec.generate(model, prompt, drafter=static_d, max_new_tokens=8, budget=6, verifier=SDPAVerifier(),
                         cuda_graphs=runner)
        assert static_d.cache is first_cache  # kept across calls that fit (graphs stay valid)
        # keyed by the catch-up length
        assert all(k[0] <= static_d.depth + 1 for k in g._entries)
    if name == "draft-self-chain":
        # self-draft: every draft accepted, so every catch-up is depth + 1 long but the first one of a
        # call (the root alone: the prompt was caught up in prefill)
        assert {k[0] for k in g._entries} == {1, static_d.depth + 1}
    if name == "draft-other-tree":
        assert len({k[0] for k in g._entries}) >= 2  # several catch-up lengths -> one entry each


def test_batch_rows_finish_early_static_matches_eager():
    """Batch 2, one row stops at an EOS: finished rows feed their last token and commit nothing."""
    model = tiny_model("llama")
    prompt = _prompt(seed=9, B=2)
    eos, ref = eos_stops_one_row(model, prompt, NEW)
    for make in (lambda m: DraftModel(model, depth=3, cuda_graphs=m),
                 lambda m: EarlyExit(model, exit_layer=1, depth=3, branching=2, cuda_graphs=m)):
        eager_d, static_d = make(False), make("static")
        te, ts = _record(eager_d), _record(static_d)
        kw = dict(max_new_tokens=NEW, eos_token_id=eos, budget=5, verifier=SDPAVerifier(), cuda_graphs=False)
        eager = specdec.generate(model, prompt, drafter=eager_d, **kw)
        out = specdec.generate(model, prompt, drafter=static_d, **kw)
        assert out.new_tokens == eager.new_tokens == ref.new_tokens
        assert torch.equal(out.sequences, ref.sequences)
        _same_trees(ts, te)
        assert static_d.graphs.stats.static_runs > 0


def test_sampling_and_threshold_fall_back_to_eager():
    """Sampling (random draws) and the confidence threshold (a host read per level) are not
    captured: the drafter takes its eager path, with the eager path's exact results."""
    model = tiny_model("llama")
    prompt = _prompt(seed=3)
    outs = []
    for mode in (False, "static"):
        d = DraftModel(tiny_model("llama", seed=7), depth=3, branching=2, cuda_graphs=mode)
        outs.append(specdec.generate(model, prompt, drafter=d, max_new_tokens=NEW, budget=6, temperature=0.8,
                                     generator=torch.Generator().manual_seed(0), verifier=SDPAVerifier(),
                                     cuda_graphs=False).new_tokens)
        if mode == "static":
            assert len(d.graphs) == 0 and d.graphs.stats.static_runs == 0
    assert outs[0] == outs[1]
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    d = EarlyExit(model, exit_layer=1, depth=4, threshold=0.3, cuda_graphs="static")
    out = specdec.generate(model, prompt, drafter=d, max_new_tokens=NEW, budget=4, verifier=SDPAVerifier(),
                           cuda_graphs=False)
    assert out.new_tokens == ref.new_tokens
    assert len(d.graphs) == 0 and d.graphs.stats.static_runs == 0


def test_bind_invalidates_and_options_validated():
    g = DraftGraphs(capture=False)
    a, b = torch.zeros(4), torch.zeros(4)
    g.bind([a])
    outs = g.run("k", lambda: (a + 1,))
    assert torch.equal(outs[0], torch.ones(4)) and len(g) == 1
    g.bind([a])  # same tensors: kept
    assert len(g) == 1 and g.stats.invalidations == 0
    g.bind([b])  # another tensor (e.g. a re-created cache): dropped
    assert len(g) == 0 and g.stats.invalidations == 1
    g.bind([b.view(2, 2)])  # same storage, other shape: dropped too (the graph baked the layout in)
    model = tiny_model("llama")
    d = DraftModel(model, depth=2, cuda_graphs="static")
    specdec.generate(model, _prompt(), drafter=d, max_new_tokens=8, budget=2, verifier=SDPAVerifier(), cuda_graphs=False)
    cache, graphs = d.cache, d.graphs
    specdec.generate(model, _prompt(B=2), drafter=d, max_new_tokens=8, budget=2, verifier=SDPAVerifier(),
                     cuda_graphs=False)
    assert d.cache is not cache and d.graphs is not graphs  # batch changed: new cache, new graphs
    with pytest.raises(ValueError):
        DraftModel(model, cuda_graphs="yes")
    with pytest.raises(SpecDecInputError):
        EarlyExit(model, exit_layer=1, cuda_graphs=1.5)
    if not CUDA:
        with pytest.raises(SpecDecInputError):  # capture needs CUDA
            specdec.generate(model, _prompt(), drafter=DraftModel(model, cuda_graphs=True), max_new_tokens=4,
                             cuda_graphs=False)


# ---------------------------------------------------------------- real graphs (CUDA only)
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("verify_graphs", [True, False])
def test_graph_replay_matches_eager_cuda(name, verify_graphs):
    """Graph replays of the draft step == the eager draft step (trees and tokens), reused across calls."""
    import copy

    model = copy.deepcopy(tiny_model("llama")).cuda()  # a copy: the cached CPU model stays on the CPU
    prompt = _prompt(seed=5, device="cuda")
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    eager_d = _make(name, model, False)
    te = _record(eager_d)
    eager = specdec.generate(model, prompt, drafter=eager_d, max_new_tokens=NEW, budget=6, cuda_graphs=verify_graphs)
    d = _make(name, model, True)
    captured = None
    for call in range(2):
        tg = _record(d)
        out = specdec.generate(model, prompt, drafter=d, max_new_tokens=NEW, budget=6, cuda_graphs=verify_graphs)
        d.propose = type(d).propose.__get__(d)
        assert out.new_tokens == eager.new_tokens == ref.new_tokens
        _same_trees(tg, te)
        g = d.graphs
        assert g.disabled is None and len(g) > 0 and all(e.graph is not None for e in g._entries.values())
        assert g.stats.replays > 0 and g.stats.static_runs == 0
        if call == 0:
            captured = dict(g.stats.captures)
        elif verify_graphs:  # the verify runner's persistent buffers: nothing captured again
            assert g.stats.captures == captured and g.stats.invalidations == 0
