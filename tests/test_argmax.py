"""Split-reduction argmax (specdec.kernels.argmax) against torch.argmax (CPU, TRITON_INTERPRET=1).

Kernel tests run the Triton kernels under the interpreter (``scripts/test.sh`` sets it), which
costs a few ms per program of the grid whatever its block: most cases force a large block (few
chunks, ragged last chunk); a few force small ones for many chunks and multi-block chunks
(``ITERS > 1``) on one row.
"""

from __future__ import annotations

import os

import pytest
import torch

from specdec.acceptance import greedy_accept
from specdec.kernels import argmax as am
from specdec.kernels.argmax import argmax_applies, argmax_lastdim, fast_argmax
from specdec.tree import TokenTree

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interp = pytest.mark.skipif(not INTERPRET, reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")


def _check(x: torch.Tensor, **kw) -> torch.Tensor:
    y = argmax_lastdim(x, **kw)
    ref = torch.argmax(x, -1)
    assert y.dtype == torch.int64 and y.shape == ref.shape
    assert torch.equal(y, ref), (y, ref)
    return y


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("V", [1, 7, 4097, 50_021])
def test_random_matches_torch(rows, V, dtype):
    gen = torch.Generator().manual_seed(rows * 100_003 + V)
    x = torch.randn(rows, V, generator=gen).to(dtype)
    # V not a multiple of any block: the last chunk is ragged (4097 -> 4 x 1024 + 1 element)
    _check(x, block=1024 if V < 10_000 else 4096)
    if rows == 1:
        _check(x)  # the default launch shape (50_021: 98 chunks of 512)


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_chunks_and_iters(dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4100, generator=gen).to(dtype)
    assert am._launch_shape(4100, 16)[1:3] == (2, 129)  # 257 blocks: 2 per chunk, 129 chunks
    # ties: 2081 and 2097 are the same lane of one chunk's two blocks (2080..2111); 3000, 4099 later chunks
    x[0, [2081, 2097, 3000, 4099]] = 50.0
    assert _check(x, block=16).tolist() == [2081]


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_cardinality_many_ties(dtype):
    """Values from a small set: the maximum repeats all over the row."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(-3, 4, (3, 6000), generator=gen).to(dtype)
    _check(x, block=256)
    _check(x[:1], block=16)  # 375 blocks -> 2 per chunk, 188 chunks


@needs_interp
@pytest.mark.parametrize("block", [None, 1024, 256])  # None: 128
def test_ties_across_chunk_boundaries(block):
    V = 4097
    x = torch.randn(4, V, generator=torch.Generator().manual_seed(1)).clamp(max=3.0)
    # row 0: max at a chunk's last element, again at the next chunk's first, and at the end
    x[0, [1023, 1024, 3072, V - 1]] = 7.0
    # row 1: max only in later chunks, the earliest copy in the middle of a chunk
    x[1, [3000, 2000, 4096]] = 7.0
    # row 2: the same value twice in one chunk and a larger one later
    x[2, [10, 11]] = 5.0
    x[2, 4000] = 6.0
    # row 3: max at index 0 and at the end
    x[3, [0, V - 1]] = 9.0
    y = _check(x, block=block)
    assert y.tolist() == [1023, 2000, 4000, 0]


@needs_interp
@pytest.mark.parametrize("value", [0.0, -1.5, float("inf"), float("-inf")])
def test_all_equal_row(value):
    x = torch.full((2, 5000), value)
    assert _check(x, block=512).tolist() == [0, 0]


@needs_interp
def test_neg_inf_rows_and_signed_zero():
    x = torch.full((3, 4100), float("-inf"))
    x[1, 3333] = -1e30  # the only finite value
    x[2, :] = -0.0
    x[2, 2050] = 0.0  # equal to -0.0: the first index wins, as in torch
    y = _check(x, block=512)
    assert y.tolist() == [0, 3333, 0]


@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_is_the_maximum(dtype):
    x = torch.randn(5, 4097, generator=torch.Generator().manual_seed(3)).to(dtype)
    x[0, 1000] = float("nan")
    x[0, 3000] = float("nan")
    x[0, 5] = float("inf")  # inf before the NaN: the NaN still wins
    x[1, 4096] = float("nan")  # the last element, alone in its chunk
    x[1, 7] = 100.0
    x[2, :] = float("nan")  # all NaN
    x[3, :] = float("-inf")
    x[3, 2222] = float("nan")  # NaN in a row of -inf
    # row 4: no NaN
    y = _check(x, block=512)
    assert y[:4].tolist() == [1000, 4096, 0, 2222]
    _check(x[:1], block=16)  # 2 blocks per chunk: NaNs inside multi-block chunks


@needs_interp
def test_leading_shape_and_strides():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4500, generator=gen)
    x[1, 2, [17, 4400]] = 10.0
    y = _check(x, block=1024)
    assert y.shape == (2, 3) and int(y[1, 2]) == 17
    _check(x[:, 1:], block=1024)  # non-contiguous leading dims, contiguous rows
    _check(x.transpose(0, 1), block=1024)
    xt = torch.randn(4500, 3, generator=gen).t()  # last dim strided: copied
    assert xt.stride(-1) != 1
    _check(xt, block=1024)
    _check(torch.randn(4097, generator=gen), block=1024)  # 1-D: 0-d result
    _check(torch.randn(0, 5000))  # no rows


@needs_interp
def test_bf16():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 6000, generator=gen).to(torch.bfloat16)  # bf16: many exact ties
    x[1, [4000, 4500]] = float("nan")
    _check(x, block=512)


def test_launch_shape():
    block, iters, chunks, _ = am._launch_shape(128_256)
    assert (block, iters, chunks) == (1024, 1, 126)  # ~100-200 programs for one 128k row
    for V in (1, 7, 4097, 49_152, 128_256, 262_144, 1 << 24):
        block, iters, chunks, _ = am._launch_shape(V)
        assert chunks <= am.MAX_CHUNKS and chunks * iters * block >= V > (chunks - 1) * iters * block


def test_rejects_unsupported():
    with pytest.raises(ValueError):
        argmax_lastdim(torch.zeros(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError):
        argmax_lastdim(torch.zeros(2, 0))


def test_dispatcher_cpu_is_torch():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 8192, generator=gen)
    assert not argmax_applies(x)  # CPU tensors never take the Triton path unless allowed
    assert torch.equal(fast_argmax(x), torch.argmax(x, -1))
    for bad in (torch.randn(1, 4095), torch.randn(65, 5000), torch.randn(2, 5000).double(), torch.zeros(3, 5000).long()):
        assert not argmax_applies(bad, allow_interpreter=True)
        assert torch.equal(fast_argmax(bad, allow_interpreter=True), torch.argmax(bad, -1))


def test_dispatcher_uses_kernel_when_allowed(monkeypatch):
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(8))
    assert argmax_applies(torch.empty(64, 4096), allow_interpreter=True) == INTERPRET  # MAX_ROWS rows
    calls = []
    real = am.argmax_lastdim
    monkeypatch.setattr(am, "argmax_lastdim", lambda t: calls.append(t.shape) or real(t))
    y = fast_argmax(x, allow_interpreter=True)
    assert torch.equal(y, torch.argmax(x, -1))
    assert calls == ([x.shape] if INTERPRET else [])
    assert argmax_applies(x, allow_interpreter=True) == INTERPRET


def test_greedy_accept_on_cpu_unchanged():
    """greedy_accept (which calls the dispatcher) picks the drafts that equal torch's argmax."""
    V = 5000
    logits = torch.randn(1, 4, V, generator=torch.Generator().manual_seed(9))
    g = torch.argmax(logits, -1)[0]
    # chain root -> 1 -> 2 -> 3: nodes 1, 2 right, node 3 wrong
    tokens = torch.tensor([[0, int(g[0]), int(g[1]), (int(g[2]) + 1) % V]])
    tree = TokenTree(tokens=tokens, parents=torch.tensor([[-1, 0, 1, 2]]))
    res = greedy_accept(tree, logits)
    assert res.path_len.tolist() == [3]
    assert res.path[0, :3].tolist() == [0, 1, 2]
    assert res.bonus.tolist() == [int(g[2])]
