"""Triton tree attention and KV commit against the torch references (CPU, TRITON_INTERPRET=1).

Sizes are small on purpose: the interpreter runs every program of the grid in Python.
"""

from __future__ import annotations

import importlib
import os
import zlib

import pytest
import torch

import specdec
from drafters import DraftModel, Replay
from specdec.attention import build_tree_meta, sdpa_tree_attention
from specdec.cache import StaticTreeCache
from specdec.tree import TokenTree
from tests.helpers import hf_greedy, tiny_model
from verifiers import TritonTreeVerifier
from verifiers.kernels import kv_commit, kv_write, tree_attention
from verifiers.triton_tree import pack_tree_mask, triton_tree_attention

# CPU tensors through the interpreter (``scripts/test.sh`` sets it); without it Triton would try to
# launch on the GPU with host pointers
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the kernels on CPU tensors under TRITON_INTERPRET=1 (scripts/test.sh sets it)")


def _tree(shape: str, B: int, N: int, gen: torch.Generator) -> TokenTree:
    """chain / star / random tree of N nodes per row (parents[i] < i)."""
    if shape == "chain":
        par = torch.arange(-1, N - 1).expand(B, N).clone()
    elif shape == "star":
        par = torch.zeros(B, N, dtype=torch.long)
    else:
        par = torch.stack([torch.tensor([0] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, N)]) for _ in range(B)])
    par[:, 0] = -1
    return TokenTree(tokens=torch.zeros(B, N, dtype=torch.long), parents=par)


def _inputs(B, Hq, Hkv, D, N, prefix, gen, dtype=torch.float32, slack=5, poison=True):
    """q as a transposed view and k/v as cache views with stride over a larger T_max (as HF hands them)."""
    L = max(prefix) + N + slack  # view_len
    T_max = L + 7
    q = torch.randn(B, N, Hq, D, generator=gen, dtype=dtype).transpose(1, 2)  # [B, Hq, N, D] non-contiguous
    kv = torch.randn(2, B, Hkv, T_max, D, generator=gen, dtype=dtype)
    pl = torch.tensor(prefix, dtype=torch.long)
    for b in range(B if poison else 0):  # slots past prefix + N are never visible: poison them
        kv[:, b, :, prefix[b] + N :] = float("nan")
    return q, kv[0, :, :, :L], kv[1, :, :, :L], pl, L


def _reference(q, k, v, pl, tree: TokenTree, L, scaling=None, sliding_window=None):
    """The SDPA reference backend with the dense mask (on un-poisoned K/V: masked NaNs leak into SDPA)."""
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    meta = build_tree_meta(pl, tree.ancestor_mask, tree.depths, None, L, sdpa_tree_attention)
    return sdpa_tree_attention(None, q, k, v, meta, scaling=scaling, sliding_window=sliding_window)[0], meta


# (B, Hq, Hkv, D, N, prefixes, tree shape, num_splits)
GRID = [
    (1, 2, 2, 16, 1, [0], "chain", None),  # decode, empty prefix
    (1, 4, 1, 16, 1, [150], "chain", 3),  # decode, GQA 4:1, split-K over a prefix not a multiple of 64
    (2, 4, 2, 32, 1, [70, 5], "chain", None),  # decode, per-row prefixes
    (2, 4, 2, 16, 9, [0, 64], "chain", 1),
    (2, 4, 2, 16, 9, [13, 64], "star", 2),
    (1, 8, 2, 32, 17, [100], "random", None),
    (2, 2, 1, 80, 6, [37, 0], "random", 2),  # head_dim 80: padded to 128 with masking
    (1, 4, 4, 16, 70, [3], "random", None),  # two mask words
    (1, 2, 1, 16, 128, [65], "chain", 2),  # N = 128: bit 63 (sign bit) of both words
    (1, 2, 2, 16, 128, [0], "random", None),
]


@pytest.mark.parametrize("B,Hq,Hkv,D,N,prefix,shape,splits", GRID)
def test_tree_attention_matches_sdpa(B, Hq, Hkv, D, N, prefix, shape, splits):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((B, Hq, Hkv, D, N, prefix, shape)).encode()))
    tree = _tree(shape, B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, prefix, gen)
    ref, _ = _reference(q, k, v, pl, tree, L)
    out = torch.full((B, N, Hq, D), float("nan"))  # poisoned: every element must be written
    got = tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, num_splits=splits, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("combine", ["fused", "kernel"])
@pytest.mark.parametrize("tree_split", ["none", "first", "last", "legacy"])
def test_split_k_merges_match_sdpa(combine, tree_split):
    """Both split-K merges (last-arriving program / second launch); prefix + tree keys cut evenly
    (tree nodes spread over two splits in row 0), the tree keys alone in the first / last program,
    or host-sized prefix chunks with the tree at the end of the last split; the fused merge re-arms
    its counters, so a second call repeats bit for bit."""
    ta = importlib.import_module("verifiers.kernels.tree_attention")
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, D, N = 2, 4, 2, 16, 9
    tree = _tree("random", B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, [13, 150], gen)
    ref, _ = _reference(q, k, v, pl, tree, L)
    cfg = dict(combine=combine, tree_split=tree_split, BLOCK_M=16, BLOCK_N=16)
    outs = []
    for _ in range(2):
        out = torch.full((B, N, Hq, D), float("nan"))
        ta.tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, num_splits=3, config=cfg, out=out)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert all(int(c.abs().sum()) == 0 for c in ta._COUNTERS.values())  # re-armed for the next launch


def test_long_view_splits_the_real_prefix():
    """A host view far longer than the prefixes (CUDA graphs keep view_len = max_len): the splits
    are cut from the prefix read on device (host-sized for "legacy"), the result equals the tight view's."""
    gen = torch.Generator().manual_seed(8)
    B, Hq, Hkv, D, N = 2, 4, 1, 16, 5
    tree = _tree("random", B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, [40, 7], gen, slack=300)
    ref, _ = _reference(q, k, v, pl, tree, L)
    for mode in ("none", "first", "last", "legacy"):
        got = tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, num_splits=4, config=dict(BLOCK_N=16, tree_split=mode))
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_tree_attention_queries_subset_and_scale():
    """n queries != N nodes (a drafter's level-by-level forward), a custom softmax scale."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, D, N = 2, 4, 2, 16, 12
    tree = _tree("random", B, N, gen)
    q_nodes = torch.tensor([[3, 7, 11], [0, 5, 9]])  # [B, n]
    prefix = [9, 66]
    _, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, prefix, gen, poison=False)
    q = torch.randn(B, Hq, 3, D, generator=gen)
    tmask = tree.ancestor_mask.gather(1, q_nodes.unsqueeze(-1).expand(B, 3, N))  # [B, n, N]
    meta = build_tree_meta(pl, tmask, tree.depths, q_nodes, L, sdpa_tree_attention)
    ref = sdpa_tree_attention(None, q, k, v, meta, scaling=0.3)[0]
    got = tree_attention(q, k, v, pl, pack_tree_mask(tmask), N, scaling=0.3, num_splits=2)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_tree_attention_half_precision():
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, N = 1, 4, 2, 32, 10
    tree = _tree("random", B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, [45], gen, dtype=torch.float16)
    ref, _ = _reference(q.float(), k.float(), v.float(), pl, tree, L)
    got = tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, num_splits=2)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("N, prefix, want", [
    (1, 400, dict(BLOCK_N=64, min_tiles=1, max_splits=16)),
    (16, 400, dict(BLOCK_M=16, num_stages=2, tree_split="first")),  # views <= 1024: 16-row query blocks
    (32, 400, dict(BLOCK_M=16, max_splits=2, tree_split="legacy")),
    (64, 400, dict(BLOCK_M=16, max_splits=1)),
    (64, 1100, dict(BLOCK_M=64, combine="fused", max_splits=4, tree_split="legacy")),  # 1024 < view <= 2048
])
def test_short_view_defaults_match_sdpa(N, prefix, want):
    """16-bit inputs in a short host view get the short-view launch configs (decode: one 64-key tile
    per split; trees in views up to 1024 keys: 16-row query blocks; N = 64 in longer short views:
    host-sized chunks with the fused merge) and still match the reference."""
    ta = importlib.import_module("verifiers.kernels.tree_attention")
    gen = torch.Generator().manual_seed(40 + N)
    B, Hq, Hkv, D = 2, 8, 2, 32
    tree = _tree("random", B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, [prefix, 3], gen, dtype=torch.float16)  # >= 2 splits where split
    cfg = ta.pick_config(N, Hq // Hkv, D, torch.float16, view_len=L)
    assert {key: cfg[key] for key in want} == want
    assert ta.pick_config(N, Hq // Hkv, D, torch.float16, view_len=8192) != cfg  # long views: unchanged
    assert ta.pick_config(N, Hq // Hkv, D, torch.float32, view_len=L) == ta.pick_config(N, Hq // Hkv, D, torch.float32)
    ref, _ = _reference(q.float(), k.float(), v.float(), pl, tree, L)
    out = torch.full((B, N, Hq, D), float("nan"), dtype=torch.float16)
    got = tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, out=out)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("view_prefix, keys", [(4000, 256), (9000, 512)])
def test_long_view_decode_config_matches_sdpa(view_prefix, keys):
    """N = 1 in a long 16-bit view: 64-key tiles, view/16 keys per split in [256, 1024] (so the
    split count stays near 16 per KV head), and the output still matches the reference."""
    ta = importlib.import_module("verifiers.kernels.tree_attention")
    gen = torch.Generator().manual_seed(7)
    B, Hq, Hkv, D, N = 1, 4, 1, 16, 1
    tree = _tree("chain", B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, [view_prefix], gen, dtype=torch.float16)
    cfg = ta.pick_config(N, Hq // Hkv, D, torch.float16, view_len=L)
    assert (cfg["BLOCK_N"], cfg["num_stages"], cfg["min_tiles"] * cfg["BLOCK_N"]) == (64, 3, keys)
    assert ta.pick_config(N, Hq // Hkv, D, torch.float16, view_len=1 << 20)["min_tiles"] * 64 == 1024
    ref, _ = _reference(q.float(), k.float(), v.float(), pl, tree, L)
    out = torch.full((B, N, Hq, D), float("nan"), dtype=torch.float16)
    got = tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, out=out)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, atol=3e-3, rtol=3e-3)


def test_backend_packs_missing_mask_and_falls_back_for_sliding_window():
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, N = 1, 2, 1, 16, 8
    tree = _tree("chain", B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, [20], gen, poison=False)
    for window in (None, 6):
        ref, meta = _reference(q, k, v, pl, tree, L, sliding_window=window)
        meta.backend = triton_tree_attention  # packed_mask is None: the backend packs it
        got = triton_tree_attention(None, q, k, v, meta, sliding_window=window)[0]
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert meta.packed_mask is None  # the window call went to the reference
    plain = _reference(q, k, v, pl, tree, L)[0]
    assert not torch.allclose(ref, plain)  # the window mattered, so the fallback was exercised


def _torch_commit(kv, path, path_len, lengths):
    B, P = path.shape
    cache = StaticTreeCache.__new__(StaticTreeCache)
    cache.kv, cache.lengths, cache.num_layers = kv, lengths.clone(), kv.shape[0]
    StaticTreeCache.commit(cache, path, path_len)  # CPU: the torch gather / scatter


@pytest.mark.parametrize("D", [16, 24])
def test_kv_commit_matches_torch_gather(D):
    gen = torch.Generator().manual_seed(D)
    n_layers, B, H, T = 3, 3, 2, 40
    kv = torch.randn(n_layers, 2, B, H, T, D, generator=gen)
    lengths = torch.tensor([5, 0, 17])
    # row 0: hazard case (slot 2 is both a destination and the source of entry 1); row 1: chain
    # prefix already in place then a jump; row 2: nothing accepted (-1 padding ignored)
    path = torch.tensor([[0, 2, 3, 9, 11], [0, 1, 2, 6, -1], [0, -1, -1, -1, -1]])
    path_len = torch.tensor([5, 4, 0])
    want = kv.clone()
    _torch_commit(want, path, path_len, lengths)
    got = kv.clone()
    kv_commit(got, path, path_len, lengths)
    assert torch.equal(got, want)
    assert not torch.equal(got, kv)


@pytest.mark.parametrize("n, D, src_dtype", [(1, 16, torch.float32), (5, 24, torch.float16), (40, 16, torch.float32)])
def test_kv_write_matches_scatter(n, D, src_dtype):
    """One launch writes K and V of a layer = the two torch scatters: transposed (HF) input views,
    a dtype cast, n over one token block; an out-of-range slot is skipped, the rest still written."""
    from specdec.cache import _kv_write  # on CPU: the torch scatter_ path

    gen = torch.Generator().manual_seed(n * 100 + D)
    n_layers, B, H, T = 2, 2, 3, 64
    kv = torch.randn(n_layers, 2, B, H, T, D, generator=gen)
    slots = torch.stack([torch.randperm(T - 1, generator=gen)[:n] for _ in range(B)])  # [B, n], distinct per row
    # HF hands the [B, n, H, D] projections transposed to [B, H, n, D] (non-contiguous views)
    key = torch.randn(B, n, H, D, generator=gen).to(src_dtype).transpose(1, 2)
    value = torch.randn(B, n, H, D, generator=gen).to(src_dtype).transpose(1, 2)
    want = kv.clone()
    _kv_write(want, 1, slots, key, value)
    got = kv.clone()
    kv_write(got[1], slots, key, value)
    assert torch.equal(got, want)
    assert not torch.equal(got[1], kv[1]) and torch.equal(got[0], kv[0])

    bad = slots.clone()
    bad[0, 0] = T  # out of range
    got_bad = kv.clone()
    kv_write(got_bad[1], bad, key, value)
    want_bad = want.clone()
    want_bad[1, :, 0, :, slots[0, 0]] = kv[1, :, 0, :, slots[0, 0]]  # that one row stays as it was
    assert torch.equal(got_bad, want_bad)


def test_greedy_generate_with_triton_verifier_equals_hf(monkeypatch):
    import verifiers.triton_tree as tt

    calls = []
    real = tt.tree_attention
    monkeypatch.setattr(tt, "tree_attention", lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    new = 16
    ref = hf_greedy(model, ids, new, eos_token_id=[])
    cont = ref[0, ids.shape[1] :].tolist()
    for drafter in (Replay(cont, 0.4, branching=3, seed=2), DraftModel(tiny_model("llama", seed=7), depth=3, branching=2, width=3)):
        out = specdec.generate(model, ids, drafter=drafter, verifier=TritonTreeVerifier(), max_new_tokens=new, eos_token_id=[], budget=8)
        assert out.sequences.tolist() == ref.tolist()
    assert max(calls) > 1 and len(calls) > 2 * model.config.num_hidden_layers  # the kernel ran on real trees


def test_out_of_resources_config_falls_back_once(monkeypatch):
    """A block config too big for the GPU's shared memory: retried with the safe config, then remembered
    (a second failing load would break CUDA-graph capture)."""
    from triton.runtime.errors import OutOfResources

    ta = importlib.import_module("verifiers.kernels.tree_attention")  # the module (the package re-exports a function of that name)

    real = ta._tree_attn_fwd
    tried = []

    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append(kw["BLOCK_N"])
                if kw["BLOCK_N"] == 128:
                    raise OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(ta, "_tree_attn_fwd", TooBig())
    monkeypatch.setattr(ta, "_OUT_OF_RESOURCES", set())
    gen = torch.Generator().manual_seed(9)
    tree = _tree("random", 1, 4, gen)
    q, k, v, pl, L = _inputs(1, 2, 1, 16, 4, [40], gen)
    ref, _ = _reference(q, k, v, pl, tree, L)
    for _ in range(2):
        got = ta.tree_attention(q, k, v, pl, tree.packed_ancestor_mask, 4, config=dict(BLOCK_N=128), num_splits=1)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert tried == [128, 32, 32]


@pytest.mark.parametrize("dot", ["ieee", "tf32x3"])
def test_fp32_dot_choice_matches_sdpa(dot):
    """fp32 takes IEEE or 3xTF32 dots (``config["dot"]``; the interpreter multiplies in fp32 either
    way, so this checks the plumbing; the GPU error bound is ``test_fp32_tf32x3_error_cuda``)."""
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, D, N = 1, 6, 2, 32, 9
    tree = _tree("random", B, N, gen)
    q, k, v, pl, L = _inputs(B, Hq, Hkv, D, N, [40], gen)
    ref, _ = _reference(q, k, v, pl, tree, L)
    got = tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, config={"dot": dot})
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="dot"):
        tree_attention(q, k, v, pl, tree.packed_ancestor_mask, N, config={"dot": "tf32"})


def test_fp32_dot_default_follows_environment():
    """3xTF32 by default; ``SPECDEC_FP32_TF32X3=0`` at import keeps IEEE dots (fresh interpreter)."""
    import subprocess
    import sys

    code = "import importlib; print(importlib.import_module('verifiers.kernels.tree_attention').FP32_DOT)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for env, want in (({}, "tf32x3"), ({"SPECDEC_FP32_TF32X3": "0"}, "ieee")):
        e = {k: v for k, v in os.environ.items() if k != "SPECDEC_FP32_TF32X3"} | env
        got = subprocess.run([sys.executable, "-c", code], cwd=root, env=e, capture_output=True, text=True, check=True)
        assert got.stdout.strip().splitlines()[-1] == want
