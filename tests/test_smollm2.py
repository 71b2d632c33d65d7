"""The real SmolLM2-135M-Instruct (fp32): speculative greedy output equals HF greedy output."""

import pytest
import torch

import specdec
from drafters import DraftModel, Replay
from experiments.prompts import chat_ids, load_prompts

pytestmark = pytest.mark.slow
NEW = 64


@pytest.fixture(scope="module")
def smol():
    from tests.helpers import smollm2

    return smollm2()


@pytest.fixture(scope="module")
def prompts(smol):
    _, tok = smol
    recs = load_prompts("mtbench")
    # two categories: writing and coding
    picked = [recs[0], next(r for r in recs if r.category == "coding")]
    return [torch.tensor([chat_ids(tok, r.turns[:1])]) for r in picked]


def _hf(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                          top_k=None, top_p=None, temperature=None, **kw)


def test_smollm2_greedy_equality(smol, prompts):
    model, tok = smol
    for ids in prompts:
        ref = _hf(model, ids)
        cont = ref[0, ids.shape[1] :].tolist()
        # (chain drafting by a model is covered on the tiny models; here: AR, a model tree, oracle chain and tree)
        for drafter in [None, DraftModel(model, depth=3, branching=2, width=3),
                        Replay(cont, 0.5, seed=1), Replay(cont, 0.2, branching=3, seed=2)]:
            out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=NEW, budget=8)
            assert out.sequences.tolist() == ref.tolist(), f"{drafter!r} diverged"


def test_smollm2_string_stop_matches_hf(smol, prompts):
    model, tok = smol
    ids = prompts[0]
    full = _hf(model, ids)[0, ids.shape[1] :].tolist()
    text = tok.decode(full)
    stop = text[len(text) // 3 : len(text) // 3 + 4]  # a piece of text from the middle of the answer
    ref = _hf(model, ids, stop_strings=[stop], tokenizer=tok)
    out = specdec.generate(model, ids, drafter=Replay(full), max_new_tokens=NEW, stop=[stop], tokenizer=tok, budget=8)
    assert out.sequences.tolist() == ref.tolist()
    assert ref.shape[1] < ids.shape[1] + len(full)  # the stop really cut the answer short
