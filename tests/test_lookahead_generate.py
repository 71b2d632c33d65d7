"""The lookahead drafters through ``generate()``: greedy output equals plain HF greedy decoding."""

from __future__ import annotations

import pytest
import torch

from drafters import HybridLookahead, RawLookahead, TurboLookahead
from lookahead.turbo import TurboLookaheadCache
from specdec.generate import generate
from tests.helpers import hf_greedy, smollm2, tiny_model

DRAFTERS = {
    "raw": lambda: RawLookahead(max_match=3, branch_length=6),
    "turbo": lambda: TurboLookahead(max_match=3, branch_length=6, capacity=5000),
    "hybrid": lambda: HybridLookahead(max_match=3, branch_length=6, capacity=5000),
}


def _repetitive_prompt(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, vocab, (7,), generator=g)
    return torch.cat([motif, motif, motif[:4], torch.randint(3, vocab, (5,), generator=g), motif[:3]]).unsqueeze(0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_equals_hf_tiny(arch, name):
    model = tiny_model(arch)
    ids = _repetitive_prompt(model.config.vocab_size)
    n = 40
    ref = hf_greedy(model, ids, n, eos_token_id=[])  # no EOS: always n tokens
    out = generate(model, ids, drafter=DRAFTERS[name](), max_new_tokens=n, budget=12, eos_token_id=[])
    assert torch.equal(out.sequences.cpu(), ref.cpu())
    s = out.stats
    assert s.drafted_tokens > 0
    # each step commits its accepted drafts + 1 bonus (the last step may be cut at max_new_tokens)
    assert s.verify_steps + s.accepted_tokens >= n - 1 >= s.verify_steps


def test_turbo_learns_across_calls_and_batch_rows():
    """A shared cache: the second call repeats the first call's output, Turbo has learned it."""
    model = tiny_model("llama")
    ids = _repetitive_prompt(model.config.vocab_size, seed=1)
    cache = TurboLookaheadCache(max_match=3, branch_length=8, capacity=20000)
    drafter = TurboLookahead(cache)
    first = generate(model, ids, drafter=drafter, max_new_tokens=32, budget=12, eos_token_id=[])
    assert cache.active_requests == 0  # the request was closed on its last observe
    second = generate(model, ids, drafter=drafter, max_new_tokens=32, budget=12, eos_token_id=[])
    assert torch.equal(first.sequences, second.sequences)
    assert second.stats.accepted_tokens > first.stats.accepted_tokens
    assert second.stats.tau > 3.0
    # batch of two identical rows through Hybrid (rows have their own Raw caches)
    batch = ids.expand(2, -1).contiguous()
    out = generate(model, batch, drafter=HybridLookahead(cache), max_new_tokens=24, budget=12, eos_token_id=[])
    ref = hf_greedy(model, ids, 24, eos_token_id=[])
    assert torch.equal(out.sequences[0].cpu(), ref[0].cpu()) and torch.equal(out.sequences[1].cpu(), ref[0].cpu())


def test_sampling_runs_and_is_reproducible():
    model = tiny_model("qwen2")
    ids = _repetitive_prompt(model.config.vocab_size, seed=2)
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(123)
        outs.append(generate(model, ids, drafter=HybridLookahead(capacity=5000), max_new_tokens=24, budget=8,
                             temperature=0.8, top_k=20, generator=g, eos_token_id=[]).sequences)
    assert torch.equal(outs[0], outs[1])


def test_drafter_knob_errors():
    with pytest.raises(ValueError, match="min_match"):
        RawLookahead(min_match=5, max_match=2)
    with pytest.raises(ValueError, match="either a cache"):
        TurboLookahead(TurboLookaheadCache(), capacity=100)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="budget"):
        generate(model, _repetitive_prompt(256), drafter=RawLookahead(), max_new_tokens=4, budget=-1)


def test_greedy_equals_hf_smollm2_mtbench():
    """Real model, real prompt (MT-bench 124: find the bug in a given function, so the answer
    quotes the prompt). Raw starts cold; Turbo is warmed with the reference answer, which drives
    long accepted paths through the engine; Hybrid shares that cache."""
    from experiments.prompts import chat_ids, load_prompts

    model, tok = smollm2()
    rec = load_prompts("mtbench", offset=43, limit=1)[0]
    assert rec.question_id == "124"
    ids = torch.tensor([chat_ids(tok, rec.turns[:1])])
    n = 64
    ref = hf_greedy(model, ids, n)
    eos = model.generation_config.eos_token_id
    raw = generate(model, ids, drafter=RawLookahead(), max_new_tokens=n, budget=12, eos_token_id=eos)
    assert torch.equal(raw.sequences.cpu(), ref.cpu())
    assert raw.stats.accepted_tokens > 0
    cache = TurboLookaheadCache()
    cache.warm_up([ref[0, ids.shape[1] :].tolist()])
    for drafter in (TurboLookahead(cache), HybridLookahead(cache)):
        out = generate(model, ids, drafter=drafter, max_new_tokens=n, budget=12, eos_token_id=eos)
        assert torch.equal(out.sequences.cpu(), ref.cpu()), repr(drafter)
        assert out.stats.tau > 2.0, (repr(drafter), out.stats.tau)
