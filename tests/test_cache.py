"""StaticTreeCache.commit: accepted tree nodes end up exactly where sequential decoding puts them."""

import random

import torch

from specdec import StaticTreeCache, TokenTree
from specdec.attention import sdpa_tree_attention
from specdec.forward import causal_chain_mask, tree_forward
from tests.helpers import tiny_model


def test_commit_moves_exactly_the_path_slots():
    g = torch.Generator().manual_seed(0)
    cfg = tiny_model("llama").config
    B, T = 3, 40
    cache = StaticTreeCache(cfg, B, T, torch.float32, "cpu")
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    before = cache.kv.clone()
    cache.lengths.copy_(torch.tensor([3, 10, 0]))
    path = torch.tensor([[0, 2, 5, -1], [0, 1, 3, 7], [0, -1, -1, -1]])
    path_len = torch.tensor([3, 4, 1])
    cache.commit(path, path_len)
    assert cache.lengths.tolist() == [6, 14, 1]
    for b, L in enumerate([3, 10, 0]):
        # committed prefix untouched
        assert torch.equal(cache.kv[:, :, b, :, :L], before[:, :, b, :, :L])
        for j in range(int(path_len[b])):
            src = L + int(path[b, j])
            assert torch.equal(cache.kv[:, :, b, :, L + j], before[:, :, b, :, src])


def _prefill(model, ids, max_len):
    B, T = ids.shape
    cache = StaticTreeCache(model.config, B, max_len, torch.float32, "cpu")
    tree_forward(model, cache, ids, causal_chain_mask(B, T, "cpu"), torch.arange(T).expand(B, T), T, sdpa_tree_attention)
    cache.advance(T)
    return cache


def test_commit_of_random_paths_equals_sequential_decoding():
    model = tiny_model("qwen2")
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    for trial in range(4):
        T, N = 7 + trial, 12
        ids = torch.randint(3, 256, (1, T), generator=g)
        parents = [-1] + [rng.randrange(0, i) for i in range(1, N)]
        tokens = torch.randint(3, 256, (1, N), generator=g)
        tree = TokenTree(tokens=tokens, parents=torch.tensor([parents]))
        # tree verify pass after a prefill of ids[:, :-1]; the root is the last prompt token
        tokens[0, 0] = ids[0, -1]
        cache = _prefill(model, ids[:, :-1], 64)
        with torch.inference_mode():
            tree_forward(model, cache, tree.tokens, tree.ancestor_mask, tree.depths, T - 1 + N, sdpa_tree_attention)
        leaf = rng.randrange(N)
        path_nodes = sorted(tree.ancestor_mask[0, leaf].nonzero().flatten().tolist(), key=lambda j: int(tree.depths[0, j]))
        cache.commit(torch.tensor([path_nodes]), torch.tensor([len(path_nodes)]))
        # reference: decode prompt + path tokens one by one
        seq = torch.cat([ids[:, :-1], tokens[:, path_nodes]], 1)
        ref = _prefill(model, seq[:, :1], 64)
        for t in range(1, seq.shape[1]):
            with torch.inference_mode():
                tree_forward(model, ref, seq[:, t : t + 1], torch.ones(1, 1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long), t + 1, sdpa_tree_attention)
            ref.advance(1)
        L = int(cache.lengths[0])
        assert L == int(ref.lengths[0]) == seq.shape[1]
        torch.testing.assert_close(cache.kv[..., :L, :], ref.kv[..., :L, :], atol=1e-5, rtol=1e-5)
