"""EarlyExit: lossless greedy output, shared-KV safety, no model mutation, dynamic depth, bad input."""

from __future__ import annotations

import functools

import pytest
import torch

from drafters import EarlyExit
from drafters.draft_model import grow_tree
from specdec import SamplingConfig, SpecDecInputError, generate
from specdec.tree import TokenTree
from tests.helpers import hf_greedy, tiny_model

LAYERS = 4


def _prompt(batch: int = 1, length: int = 10, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@functools.cache
def _hf_reference(arch: str, new: int) -> torch.Tensor:
    """HF greedy output for the shared prompt (computed once per arch, reused by every mode)."""
    return hf_greedy(tiny_model(arch, seed=0, vocab=256, layers=LAYERS), _prompt(), new)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(exit_layer=2, depth=4),  # chain
        dict(exit_layer=1, depth=3, branching=2, width=3),  # tree
        dict(exit_layer=3, depth=5, threshold=0.3),  # chain, dynamic length
        dict(skip_layers={1, 2}, depth=3, branching=2),  # SWIFT-style skipped layers
    ],
    ids=["chain", "tree", "threshold", "skip"],
)
def test_greedy_equals_hf(arch, kw):
    model = tiny_model(arch, seed=0, vocab=256, layers=LAYERS)
    ids = _prompt()
    out = generate(model, ids, drafter=EarlyExit(model, **kw), max_new_tokens=24, budget=8)
    assert torch.equal(out.sequences, _hf_reference(arch, 24))
    assert out.stats.drafted_tokens > 0


def test_full_depth_exit_is_the_target():
    """exit_layer = all layers drafts with the target itself through the SHARED cache: if the
    draft read wrong K/V (positions, slots, masks), its tokens would differ and be rejected."""
    model = tiny_model("llama", seed=0, vocab=256, layers=LAYERS)
    ids = _prompt(seed=3)
    out = generate(model, ids, drafter=EarlyExit(model, exit_layer=LAYERS, depth=4), max_new_tokens=30)
    assert out.stats.drafted_tokens > 0
    assert out.stats.accepted_tokens == out.stats.drafted_tokens
    assert torch.equal(out.sequences, hf_greedy(model, ids, 30))


def test_full_depth_exit_sampling_accepts_everything():
    """Same-model draft under sampling: the recorded q equals the target's p, so min(1, p/q) = 1
    and (up to fp rounding) every draft is accepted; a wrong q would reject often."""
    model = tiny_model("qwen2", seed=0, vocab=256, layers=LAYERS)
    d = EarlyExit(model, exit_layer=LAYERS, depth=3, branching=2, width=2)
    out = generate(model, _prompt(seed=4), drafter=d, max_new_tokens=30, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert out.stats.alpha_per_depth[0] >= 0.99


class CacheGuard:
    """Wraps a drafter; around every propose, checks the target's committed K/V are bit-identical
    and that layers the draft does not run are not written at all."""

    def __init__(self, inner: EarlyExit):
        self.inner = inner
        self.calls = 0
        self.scratch_writes = 0

    def prefill(self, state):
        self.inner.prefill(state)

    def observe(self, state, accepted):
        self.inner.observe(state, accepted)

    def propose(self, state, budget):
        kv = state.cache.kv  # [L, 2, B, H, T, D]
        before = kv.clone()
        lengths = state.cache.lengths.clone()
        tree = self.inner.propose(state, budget)
        T = kv.shape[4]
        committed = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).view(1, 1, -1, 1, T, 1)
        assert torch.equal(torch.where(committed, kv, 0.0), torch.where(committed, before, 0.0)), "committed K/V changed"
        top = max(self.inner.layers) + 1
        assert torch.equal(kv[top:], before[top:]), "draft wrote layers it does not run"
        self.scratch_writes += int(not torch.equal(kv[:top], before[:top]))
        self.calls += 1
        return tree


@pytest.mark.parametrize("kw", [dict(exit_layer=2, depth=4), dict(exit_layer=3, skip_layers={0}, depth=3, branching=2)])
def test_committed_cache_bit_identical(kw):
    model = tiny_model("llama", seed=0, vocab=256, layers=LAYERS)
    ids = _prompt(batch=2, seed=5)
    guard = CacheGuard(EarlyExit(model, **kw))
    out = generate(model, ids, drafter=guard, max_new_tokens=20, budget=8)
    assert guard.calls > 0 and guard.scratch_writes == guard.calls  # it really drafted into the shared cache
    assert torch.equal(out.sequences, hf_greedy(model, ids, 20))


def test_model_is_not_mutated():
    model = tiny_model("gemma3", seed=0, vocab=256, layers=LAYERS)
    cfg_before = model.config.to_dict()
    layers_before = list(model.model.layers)
    ids = _prompt(seed=6)
    logits_before = model(ids).logits
    d = EarlyExit(model, exit_layer=2, depth=3)
    assert model.config.to_dict() == cfg_before  # building the drafter touches nothing
    generate(model, ids, drafter=d, max_new_tokens=8)
    cfg_after = model.config.to_dict()
    cfg_before.pop("_attn_implementation_autoset", None), cfg_after.pop("_attn_implementation_autoset", None)
    assert cfg_after["num_hidden_layers"] == LAYERS and cfg_after["layer_types"] == cfg_before["layer_types"]
    assert list(model.model.layers) == layers_before
    # the view shares the layer objects and owns a truncated copy of the config
    assert list(d.view.model.layers) == layers_before[:2]
    assert d.view.config.num_hidden_layers == 2 and d.view.config is not model.config
    assert d.view.model.config.layer_types == cfg_before["layer_types"][:2]
    assert torch.allclose(model(ids).logits, logits_before, atol=1e-5, rtol=0)


def _logits_with_max_prob(p: float, V: int = 16) -> torch.Tensor:
    """[V] logits whose softmax has max prob p on token 5, the rest uniform."""
    probs = torch.full((V,), (1 - p) / (V - 1))
    probs[5] = p
    return probs.log()


def test_threshold_stops_expansion():
    """grow_tree: a level whose best child is below the threshold is the last (no forward after it)."""
    confs = [0.9, 0.6, 0.3, 0.95, 0.95, 0.95]  # confidence of level 1, 2, 3, ...
    calls = []

    def forward_level(tree: TokenTree, new_tok, frontier):
        calls.append(tree.num_nodes)
        d = len(calls)  # predicting level d + 1
        return _logits_with_max_prob(confs[d]).expand(1, new_tok.shape[1], 16)

    roots = torch.tensor([7])
    common = dict(depth=6, branching=1, width=1, budget=16, sampling=SamplingConfig(), generator=None)
    tree = grow_tree(roots, _logits_with_max_prob(confs[0]).unsqueeze(0), forward_level, threshold=0.5, **common)
    assert tree.num_nodes == 4 and len(calls) == 2  # levels 1-3 proposed, 3rd below threshold: stop
    calls.clear()
    tree = grow_tree(roots, _logits_with_max_prob(confs[0]).unsqueeze(0), forward_level, threshold=None, **common)
    assert tree.num_nodes == 7 and len(calls) == 5


@pytest.mark.parametrize(
    "kw",
    [
        dict(exit_layer=0),
        dict(exit_layer=LAYERS + 1),
        dict(exit_layer=2.0),
        dict(),
        dict(exit_layer=2, skip_layers={2}),
        dict(exit_layer=2, skip_layers={0, 1}),
        dict(exit_layer=2, threshold=1.5),
        dict(exit_layer=2, depth=0),
    ],
)
def test_bad_input(kw):
    model = tiny_model("llama", seed=0, vocab=256, layers=LAYERS)
    with pytest.raises(SpecDecInputError):
        EarlyExit(model, **kw)


def test_other_target_rejected():
    model = tiny_model("llama", seed=0, vocab=256, layers=LAYERS)
    other = tiny_model("llama", seed=1, vocab=256, layers=LAYERS)
    with pytest.raises(SpecDecInputError, match="same target"):
        generate(other, _prompt(), drafter=EarlyExit(model, exit_layer=2), max_new_tokens=4)


@functools.cache
def _smollm2_reference(new: int):
    """(model, ids [1, T], HF greedy output) for the first MT-bench question."""
    from experiments.prompts import chat_ids, load_prompts
    from tests.helpers import smollm2

    model, tok = smollm2()
    q = load_prompts("mtbench", limit=1)[0]
    ids = torch.as_tensor(chat_ids(tok, q.turns[:1])).reshape(1, -1)
    return model, ids, hf_greedy(model, ids, new, eos_token_id=-1)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(exit_layer=12, depth=4), dict(exit_layer=18, depth=3, branching=2, width=4)],
                         ids=["chain", "tree"])
def test_smollm2_greedy_equals_hf(kw):
    model, ids, ref = _smollm2_reference(64)
    out = generate(model, ids, drafter=EarlyExit(model, **kw), max_new_tokens=64, eos_token_id=-1)
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted_tokens > 0
