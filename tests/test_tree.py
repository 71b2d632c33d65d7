"""TokenTree: derived structure against brute force on random trees."""

import random

import torch

from specdec import TokenTree


def random_tree(n: int, rng: random.Random, vocab: int = 50) -> tuple[list[int], list[int]]:
    parents = [-1] + [rng.randrange(0, i) for i in range(1, n)]
    tokens = [rng.randrange(vocab) for _ in range(n)]
    return tokens, parents


def brute_ancestors(parents: list[int]) -> list[set[int]]:
    out = []
    for i in range(len(parents)):
        s, j = set(), i
        while j >= 0:
            s.add(j)
            j = parents[j]
        out.append(s)
    return out


def test_ancestor_mask_depths_and_packing_match_brute_force():
    rng = random.Random(0)
    for n in [1, 2, 5, 17, 64, 65, 100, 128]:
        rows = [random_tree(n, rng) for _ in range(3)]
        tree = TokenTree(tokens=torch.tensor([r[0] for r in rows]), parents=torch.tensor([r[1] for r in rows]))
        anc = tree.ancestor_mask
        packed = tree.packed_ancestor_mask
        assert packed.shape == (3, n, (n + 63) // 64)
        for b, (_, par) in enumerate(rows):
            ref = brute_ancestors(par)
            for i in range(n):
                assert set(anc[b, i].nonzero().flatten().tolist()) == ref[i]
                assert int(tree.depths[b, i]) == len(ref[i]) - 1
                for j in range(n):
                    word = int(packed[b, i, j // 64])
                    assert ((word >> (j % 64)) & 1) == (j in ref[i])


def test_chain_constructor():
    tree = TokenTree.chain(torch.tensor([7, 8]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert tree.tokens.tolist() == [[7, 1, 2, 3], [8, 4, 5, 6]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2]] * 2
    assert tree.depths.tolist() == [[0, 1, 2, 3]] * 2
    assert tree.leaf_paths() == [[[0, 1, 2, 3]], [[0, 1, 2, 3]]]


def test_from_paths_merges_prefixes_in_bfs_order():
    tree = TokenTree.from_paths(torch.tensor([9]), [[[1, 2, 3], [1, 2, 4], [5]]])
    # level 1: 1, 5 ; level 2: 2 ; level 3: 3, 4
    assert tree.tokens.tolist() == [[9, 1, 5, 2, 3, 4]]
    assert tree.parents.tolist() == [[-1, 0, 0, 1, 3, 3]]
    assert sorted(tree.leaf_paths()[0]) == [[0, 1, 3, 4], [0, 1, 3, 5], [0, 2]]


def test_from_paths_pads_rows_with_invalid_nodes():
    tree = TokenTree.from_paths(torch.tensor([9, 8]), [[[1, 2]], [[3]]])
    assert tree.num_nodes == 3
    assert tree.valid_mask.tolist() == [[True, True, True], [True, True, False]]
    padded = tree.pad_to(5)
    assert padded.num_nodes == 5 and padded.valid_mask[:, 3:].sum() == 0
    assert (padded.parents[:, 3:] == 0).all()


def test_position_ids():
    tree = TokenTree(tokens=torch.zeros(1, 4, dtype=torch.long), parents=torch.tensor([[-1, 0, 0, 1]]))
    assert tree.position_ids(torch.tensor([10])).tolist() == [[10, 11, 11, 12]]
