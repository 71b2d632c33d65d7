"""Bad input gets one clear error and leaves everything reusable; stop sequences end where AR would."""

import pytest
import torch

import specdec
from drafters import DraftModel, Replay
from specdec import SpecDecInputError
from tests.helpers import hf_greedy, tiny_model


def _ids(T=8):
    return torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(3))


def _works(model, drafter=None):
    out = specdec.generate(model, _ids(), drafter=drafter, max_new_tokens=12, eos_token_id=[])
    assert out.sequences.tolist() == hf_greedy(model, _ids(), 12, eos_token_id=[]).tolist()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4), "empty prompt"),
        (dict(input_ids=[], max_new_tokens=4), "empty prompt"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(max_new_tokens=1020), "context length"),
        (dict(input_ids=torch.tensor([[5, 300]]), max_new_tokens=4), "vocabulary"),
        (dict(max_new_tokens=4, budget=-1), "budget"),
    ],
)
def test_bad_input_raises_one_clear_error_and_model_stays_usable(kwargs, match):
    model = tiny_model("llama")
    drafter = DraftModel(model, depth=3)
    kwargs.setdefault("input_ids", _ids())
    ids = kwargs.pop("input_ids")
    with pytest.raises(SpecDecInputError, match=match):
        specdec.generate(model, ids, drafter=drafter, eos_token_id=[], **kwargs)
    _works(model, drafter)


def test_draft_vocabulary_mismatch():
    model = tiny_model("llama")
    other = tiny_model("llama", seed=3, vocab=300)
    drafter = DraftModel(other)
    with pytest.raises(SpecDecInputError, match="vocabulary"):
        specdec.generate(model, _ids(), drafter=drafter, max_new_tokens=8)
    _works(model)
    _works(model, DraftModel(model))


def test_reused_cache_is_reset_between_calls():
    model = tiny_model("qwen2")
    ids = _ids()
    cache = specdec.StaticTreeCache(model.config, 1, 64, torch.float32, "cpu")
    a = specdec.generate(model, ids, max_new_tokens=12, eos_token_id=[], cache=cache)
    b = specdec.generate(model, ids, max_new_tokens=12, eos_token_id=[], cache=cache)
    assert a.sequences.tolist() == b.sequences.tolist() == hf_greedy(model, ids, 12, eos_token_id=[]).tolist()
    with pytest.raises(SpecDecInputError, match="cache holds"):
        specdec.generate(model, ids, max_new_tokens=100, eos_token_id=[], cache=cache)


@pytest.mark.parametrize("drafter_kind", ["ar", "replay", "self"])
def test_stop_token_sequence_ends_exactly_where_ar_would(drafter_kind):
    model = tiny_model("mistral")
    ids = _ids()
    full = hf_greedy(model, ids, 40, eos_token_id=[])[0, ids.shape[1] :].tolist()
    # a bigram that first completes after position 8
    k = next(i for i in range(8, 39) if all(full[j : j + 2] != full[i : i + 2] for j in range(i)))
    stop = full[k : k + 2]
    expected = ids[0].tolist() + full[: k + 2]
    drafter = {"ar": None, "replay": Replay(full), "self": DraftModel(model, depth=6)}[drafter_kind]
    out = specdec.generate(model, ids, drafter=drafter, max_new_tokens=40, eos_token_id=[], stop=[stop], budget=8)
    assert out.sequences[0].tolist() == expected


def test_max_new_tokens_is_exact_even_when_a_step_commits_more():
    model = tiny_model("llama")
    ids = _ids()
    full = hf_greedy(model, ids, 40, eos_token_id=[])[0, ids.shape[1] :].tolist()
    for n in [1, 2, 7, 13]:
        out = specdec.generate(model, ids, drafter=Replay(full), max_new_tokens=n, eos_token_id=[], budget=8)
        assert out.new_tokens[0] == full[:n]


def test_string_stop_needs_a_tokenizer():
    model = tiny_model("llama")
    with pytest.raises(SpecDecInputError, match="tokenizer"):
        specdec.generate(model, _ids(), max_new_tokens=4, stop=["abc"])
