"""Greedy speculative decoding reproduces plain greedy decoding token for token (fp32)."""

import pytest
import torch

import specdec
from drafters import DraftModel, Replay
from tests.helpers import ARCHS, hf_greedy, tiny_model

NEW = 40


def _prompt(seed=1, T=10, B=1):
    return torch.randint(3, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _eos_inside(ref_new: list[int], at: int = 25) -> int:
    """A token that first appears near position ``at`` of the reference output (so EOS lands mid-stream)."""
    for t in ref_new[at:]:
        if t not in ref_new[:at]:
            return t
    return ref_new[-1]


DRAFTERS = {
    "ar": lambda m, cont: None,
    "other-chain": lambda m, cont: DraftModel(tiny_model(m.config.model_type.replace("_text", "") if False else _arch(m), seed=7), depth=4),
    "other-tree": lambda m, cont: DraftModel(tiny_model(_arch(m), seed=7), depth=3, branching=3, width=4),
    "self-chain": lambda m, cont: DraftModel(m, depth=5),
    "self-tree": lambda m, cont: DraftModel(m, depth=3, branching=2, width=3),
    "replay0-chain": lambda m, cont: Replay(cont, 0.0),
    "replay50-chain": lambda m, cont: Replay(cont, 0.5, seed=3),
    "replay100-chain": lambda m, cont: Replay(cont, 1.0, seed=4),
    "replay0-tree": lambda m, cont: Replay(cont, 0.0, branching=3),
    "replay50-tree": lambda m, cont: Replay(cont, 0.5, branching=3, seed=5),
    "replay100-tree": lambda m, cont: Replay(cont, 1.0, branching=2, seed=6),
}


def _arch(model) -> str:
    return {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral", "gemma3_text": "gemma3"}[model.config.model_type]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_equals_hf_generate(arch, name):
    model = tiny_model(arch)
    ids = _prompt()
    ref_free = hf_greedy(model, ids, NEW, eos_token_id=[])
    cont = ref_free[0, ids.shape[1] :].tolist()
    # 1. no EOS: full length
    out = specdec.generate(model, ids, drafter=DRAFTERS[name](model, cont), max_new_tokens=NEW, eos_token_id=[], budget=8)
    assert out.sequences.tolist() == ref_free.tolist()
    # 2. with an EOS that the reference emits mid-stream: both stop right after it
    eos = _eos_inside(cont)
    ref = hf_greedy(model, ids, NEW, eos_token_id=eos)
    out = specdec.generate(model, ids, drafter=DRAFTERS[name](model, cont), max_new_tokens=NEW, eos_token_id=eos, budget=8)
    assert out.sequences.tolist() == ref.tolist()
    assert out.sequences[0, -1].item() == eos
    if name.startswith("replay0") or name.startswith("self"):
        assert out.stats.tau > 1.5, out.stats  # the drafts were really accepted in multi-token steps


def test_batch_rows_stop_independently():
    model = tiny_model("llama")
    ids = torch.cat([_prompt(1), _prompt(2)], 0)
    free = hf_greedy(model, ids, NEW, eos_token_id=[])
    eos = _eos_inside(free[0, 10:].tolist(), 15)
    ref = hf_greedy(model, ids, NEW, eos_token_id=eos)
    for drafter in [None, DraftModel(tiny_model("llama", seed=7), depth=3, branching=2, width=2), DraftModel(model, depth=4)]:
        out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=NEW, eos_token_id=eos, budget=6)
        assert out.sequences.tolist() == ref.tolist()


def test_eos_defaults_to_generation_config():
    model = tiny_model("llama")
    ids = _prompt()
    cont = hf_greedy(model, ids, NEW, eos_token_id=[])[0, 10:].tolist()
    eos = _eos_inside(cont)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        out = specdec.generate(model, ids, drafter=Replay(cont), max_new_tokens=NEW)
        assert out.sequences[0, -1].item() == eos and len(out.new_tokens[0]) == cont.index(eos) + 1
    finally:
        model.generation_config.eos_token_id = old


def test_drafter_prefill_counts_as_draft_time_not_lost():
    """The drafter's prefill (a draft model's prompt forward) is draft time: it was once timed under
    a segment that neither ``draft_s`` nor ``ttft_s`` counted, so drafters with a costly prefill
    looked cheap per step while their TPOT was not."""
    import time

    model = tiny_model("llama")
    ids = _prompt()
    cont = hf_greedy(model, ids, 8)[0, ids.shape[1]:].tolist()

    class SlowPrefill(Replay):
        def prefill(self, state):
            super().prefill(state)
            time.sleep(0.2)

    out = specdec.generate(model, ids, drafter=SlowPrefill(cont, 0.0), max_new_tokens=8, cuda_graphs=False)
    s = out.stats
    assert out.sequences[0].tolist() == ids[0].tolist() + cont
    assert s.draft_s >= 0.2, s
    assert s.ttft_s < 0.2 <= s.total_s - s.ttft_s, s  # not in TTFT, inside the decode span TPOT divides
