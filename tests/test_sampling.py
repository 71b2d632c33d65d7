"""Speculative sampling preserves the target distribution (chi-square tests, fixed generator).

End to end through ``generate()``: a tiny-vocabulary target, many identical prompts in one batch,
three new tokens each; the empirical joint distribution of the three tokens is compared with the
exact one, computed by enumerating all V^3 continuations with the target.
"""

import itertools

import pytest
import torch

import specdec
from drafters import DraftModel, Replay
from specdec import SamplingConfig, TokenTree, sample_accept, target_probs
from tests.helpers import tiny_model

V = 8
ROWS = 3000
NEW = 3


def chi2_pvalue(counts: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square p-value; cells with small expectation are pooled into one."""
    counts, expected = counts.double().flatten(), expected.double().flatten()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2.0))


def exact_joint(model, prompt: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """``[V, V, V]`` probability of each 3-token continuation under the (warped) target."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=NEW)))  # [V^3, 3]
    ids = torch.cat([prompt.expand(seqs.shape[0], -1), seqs], 1)
    with torch.no_grad():
        logits = model(ids).logits[:, prompt.shape[1] - 1 : -1]  # [V^3, 3, V]
    p = target_probs(logits, sampling)  # [V^3, 3, V]
    step = p.gather(2, seqs.unsqueeze(-1)).squeeze(-1)  # [V^3, 3]
    return step.prod(-1).view(V, V, V)


CASES = [
    ("chain", 1.0, None, None),
    ("chain", 0.5, 4, None),
    ("tree", 1.0, None, 0.8),
    ("tree", 0.5, None, None),
    ("tree", 1.0, 4, None),
    ("replay-tree", 1.0, None, None),
    ("replay-chain", 0.5, None, 0.8),
]


@pytest.mark.parametrize("kind,temperature,top_k,top_p", CASES)
def test_generate_sampling_matches_target_distribution(kind, temperature, top_k, top_p):
    target = tiny_model("llama", seed=11, vocab=V)
    draft = tiny_model("llama", seed=12, vocab=V)
    prompt = torch.tensor([[3, 5, 1, 6]])
    sampling = SamplingConfig(temperature, top_k, top_p)
    if kind == "chain":
        drafter = DraftModel(draft, depth=3)
    elif kind == "tree":
        drafter = DraftModel(draft, depth=2, branching=2, width=2)
    else:  # deterministic drafts (q = one-hot): a fixed guess with random siblings
        drafter = Replay([[1, 2, 3, 4]] * ROWS, corruption=0.3, branching=3 if kind == "replay-tree" else 1)
    g = torch.Generator().manual_seed(1234)
    out = specdec.generate(
        target, prompt.expand(ROWS, -1), drafter=drafter, max_new_tokens=NEW, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=[], generator=g, budget=6,
    )
    new = out.sequences[:, prompt.shape[1] :]
    assert new.shape == (ROWS, NEW)
    counts = torch.zeros(V, V, V)
    idx = new[:, 0] * V * V + new[:, 1] * V + new[:, 2]
    counts.view(-1).index_add_(0, idx, torch.ones(ROWS))
    expected = exact_joint(target, prompt, sampling) * ROWS
    p = chi2_pvalue(counts, expected)
    assert p > 0.01, f"chi2 p={p:.4g} ({kind}, T={temperature}, top_k={top_k}, top_p={top_p})"
    assert out.stats.accepted_tokens > 0  # drafts were accepted: the speculative path was exercised


def test_chi2_detects_a_biased_sampler():
    """The test above can fail: a sampler that ignores temperature is rejected."""
    target = tiny_model("llama", seed=11, vocab=V)
    prompt = torch.tensor([[3, 5, 1, 6]])
    g = torch.Generator().manual_seed(1234)
    out = specdec.generate(target, prompt.expand(ROWS, -1), max_new_tokens=NEW, temperature=1.0, eos_token_id=[], generator=g)
    new = out.sequences[:, prompt.shape[1] :]
    counts = torch.zeros(V, V, V)
    counts.view(-1).index_add_(0, new[:, 0] * V * V + new[:, 1] * V + new[:, 2], torch.ones(ROWS))
    wrong = exact_joint(target, prompt, SamplingConfig(0.5)) * ROWS
    assert chi2_pvalue(counts, wrong) < 1e-6


@pytest.mark.parametrize("use_q", [False, True])
def test_sample_accept_first_token_marginal_on_a_random_tree(use_q):
    """Unit level: a random 12-node tree, random target logits and draft distributions."""
    g = torch.Generator().manual_seed(5)
    B, N = 20000, 12
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 4, 4, 5, 7, 3])
    logits = torch.randn(1, N, V, generator=g).mul(2).expand(B, N, V)
    sampling = SamplingConfig(1.0)
    if use_q:
        # children drawn without replacement from a per-parent draft distribution q
        q_par = torch.softmax(torch.randn(N, V, generator=g), -1)
        tokens = torch.zeros(B, N, dtype=torch.long)
        probs = torch.zeros(B, N, V)
        for u in range(N):
            kids = (parents == u).nonzero().flatten().tolist()
            removed = torch.zeros(B, V)
            for c in kids:
                rem = q_par[u] * (1 - removed)
                rem = rem / rem.sum(-1, keepdim=True)
                tokens[:, c] = torch.multinomial(rem, 1, generator=g).squeeze(1)
                probs[:, c] = rem
                removed.scatter_(1, tokens[:, c : c + 1], 1.0)
        tree = TokenTree(tokens=tokens, parents=parents.expand(B, N), draft_probs=probs)
    else:
        tokens = torch.randint(0, V, (1, N), generator=g).expand(B, N)
        tree = TokenTree(tokens=tokens, parents=parents.expand(B, N))
    res = sample_accept(tree, logits, sampling, g)
    first = torch.where(res.path_len > 1, tree.tokens.gather(1, res.path[:, 1:2].clamp(min=0)).squeeze(1), res.bonus)
    counts = torch.bincount(first, minlength=V).float()
    expected = torch.softmax(logits[0, 0], -1) * B
    assert chi2_pvalue(counts, expected) > 0.01
    # second committed token, conditional on the first being the most common one
    x1 = int(counts.argmax())
    rows = first == x1
    second_node = torch.where(res.path_len > 2, res.path[:, 2], torch.full_like(res.path_len, -1))
    second = torch.where(second_node >= 0, tree.tokens.gather(1, second_node.clamp(min=0).unsqueeze(1)).squeeze(1), res.bonus)
    # rows whose first token was the bonus have no second token: keep those where x1 was accepted from the tree
    acc1 = rows & (res.path_len > 1)
    node1 = res.path[acc1, 1]
    if acc1.sum() > 2000 and (node1 == node1[0]).all():
        c2 = torch.bincount(second[acc1], minlength=V).float()
        e2 = torch.softmax(logits[0, int(node1[0])], -1) * acc1.sum()
        assert chi2_pvalue(c2, e2) > 0.01
