"""QuantizedCopy (int8 / int4 weight-only copy of the target) and its W8A16 / W4A16 kernels.

* quantize -> dequantize error: ``|w - dequant(q)| <= s / 2`` elementwise (s = the element's
  channel (int8) or group (int4) scale), and ``s`` is the absmax scale of that channel / group;
* Triton kernels (under ``TRITON_INTERPRET=1`` on CPU, as ``scripts/test.sh`` sets) against the
  PyTorch dequantize-then-matmul reference, fresh random inputs, M in {1, 4, 16, 64}, K and N not
  multiples of any block size, both kernels (GEMV and tensor-core), split-K on and off;
* greedy equality through ``specdec.generate`` with QuantizedCopy int8 / int4, chain and tree, on
  tiny random models and on SmolLM2-135M (fp32) -- lossless regardless of draft quality;
* the target is untouched, the copy's memory is reported, bad arguments raise one clear error.
"""

import functools
import importlib
import os

import pytest
import torch
from torch import nn

import specdec
from drafters import QuantizedCopy
from drafters.kernels.quant_matmul import (
    QuantConfig,
    default_config,
    dequantize_int4,
    dequantize_int8,
    quant_matmul,
    quant_matmul_ref,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from drafters.quantized import QuantLinear
from tests.helpers import ARCHS, hf_greedy, tiny_model

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _weights(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[0] *= 0.0  # an all-zero row
    w[1, :7] *= 40.0  # outliers in one row / group
    return w


# ------------------------------------------------------------------ quantize / dequantize
@pytest.mark.parametrize("N,K", [(37, 100), (64, 129)])
def test_int8_roundtrip_bound(N, K):
    w = _weights(N, K, 0)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (N, K) and s.shape == (N,)
    assert int(q.abs().max()) <= 127
    amax = w.abs().amax(1)
    nz = amax > 0
    torch.testing.assert_close(s[nz], amax[nz] / 127)
    err = (w - dequantize_int8(q, s)).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all()
    assert (dequantize_int8(q, s)[0] == 0).all()  # zero rows stay exactly zero


@pytest.mark.parametrize("N,K,G", [(37, 100, 32), (20, 256, 128), (5, 300, 64), (8, 17, 16)])
def test_int4_roundtrip_bound(N, K, G):
    w = _weights(N, K, 1)
    packed, s = quantize_int4(w, G)
    ng = -(-K // G)
    assert packed.dtype == torch.uint8 and packed.shape == (N, ng * G // 2) and s.shape == (ng, N)
    q = unpack_int4(packed, G)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert (q[:, K:] == 0).all()  # ragged K: padding quantizes to zero
    wp = torch.zeros(N, ng * G)
    wp[:, :K] = w
    amax = wp.view(N, ng, G).abs().amax(2).t()  # [ng, N]
    nz = amax > 0
    torch.testing.assert_close(s[nz], amax[nz] / 7)
    deq = dequantize_int4(packed, s, K, G)
    assert deq.shape == (N, K)
    s_el = s.t().repeat_interleave(G, dim=1)[:, :K]  # [N, K] scale of each element
    assert ((w - deq).abs() <= s_el / 2 * (1 + 1e-5) + 1e-12).all()
    # nibble layout (group-local half split): byte o of group g holds elements g*G + o (low nibble)
    # and g*G + G/2 + o (high nibble)
    p = packed.to(torch.int16).view(N, ng, G // 2)
    qg = q.view(N, ng, G).float()
    torch.testing.assert_close(((p & 0xF) - 8).float(), qg[:, :, : G // 2])
    torch.testing.assert_close(((p >> 4) - 8).float(), qg[:, :, G // 2 :])


def test_bad_arguments_raise_one_clear_error():
    m = tiny_model("llama")
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedCopy(m, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantizedCopy(m, bits=4, group_size=100)
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 64), 8)
    with pytest.raises(ValueError, match="scales must be"):
        quant_matmul(torch.randn(2, 64), *quantize_int4(torch.randn(4, 64), 32), 4, group_size=16)


# ------------------------------------------------------------------ Triton kernels vs reference
GEMV = [QuantConfig(gemv=True, block_n=16, block_k=64), QuantConfig(gemv=True, block_n=32, block_k=32, split_k=3),
        QuantConfig(gemv=True, block_n=4, block_k=128, split_k=2, evict_first=False),  # int4: tile spans groups
        QuantConfig(gemv=True, block_n=8, block_k=64, split_k=2, prefetch=True)]
GEMM = [QuantConfig(gemv=False, block_m=16, block_n=32, block_k=32, split_k=2),  # int4: one group per tile
        QuantConfig(gemv=False, block_m=32, block_n=16, block_k=128),  # block_k 128 > group 32: per-element scales
        QuantConfig(gemv=False, block_m=16, block_n=32, block_k=32, split_k=3, swap=True),
        QuantConfig(gemv=False, block_m=16, block_n=16, block_k=64, swap=True, evict_first=False),
        QuantConfig(gemv=False, block_m=16, block_n=32, block_k=32, split_k=2, swap=True, prefetch=True, asm=True)]
# (asm=True runs the fp32-conversion path here: inline PTX needs a GPU; the GPU bench checks it)
HALF = [QuantConfig(gemv=True, block_n=4, block_k=128, half=True),  # int4, fp16/bf16: 16-bit group sums
        QuantConfig(gemv=True, block_n=8, block_k=64, split_k=2, half=True)]
SKINNY = [QuantConfig(gemv=False, block_n=32, block_k=64, split_k=3, skinny=True),  # fp16/bf16, 2..64 rows
          QuantConfig(gemv=False, block_n=16, block_k=32, num_stages=2, skinny=True, asm=True)]  # (int4: a group per step)


@pytest.mark.skipif(not INTERPRET, reason="Triton kernels run on CPU only under TRITON_INTERPRET=1 (scripts/test.sh)")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_kernels_match_reference(bits, M):
    g = torch.Generator().manual_seed(100 * bits + M)
    N, K, G = 45, 197, 32  # neither a multiple of any block size; K not a multiple of the group
    w = torch.randn(N, K, generator=g) * 0.05
    q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, G)
    configs = [None] + (GEMV if M <= 4 else []) + GEMM
    for dtype in (torch.float32, torch.float16):  # bf16 tl.dot is not emulated by the interpreter
        x = torch.randn(M, K, generator=g).to(dtype)
        ref = quant_matmul_ref(x, q, s, bits, K, G).float()
        skinny = M >= 2 and dtype == torch.float16
        # the default for these (N <= K) is the skinny kernel; int4 one-row GEMVs sum in 16 bits
        assert default_config(M, N, K, bits, G, dtype=dtype).skinny == (skinny and M > 2)
        assert default_config(M, N, K, bits, G, dtype=dtype).half == (bits == 4 and M <= 2 and dtype == torch.float16)
        half = HALF if bits == 4 and M <= 4 and dtype == torch.float16 else []
        for cfg in configs + (SKINNY if skinny else []) + half:
            y = quant_matmul(x, q, s, bits, G, cfg)
            assert y.shape == (M, N) and y.dtype == dtype
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            assert rel < (1e-5 if dtype == torch.float32 else 2e-3), (dtype, cfg, rel)
    # split-K programs leave their workspace zeroed and their arrival counters at 0 for the next call
    from drafters.kernels.quant_matmul import _WORKSPACE

    assert _WORKSPACE, "no split-K launch happened"
    for ws, cnt in _WORKSPACE.values():
        assert (ws == 0).all() and (cnt == 0).all()
    if M >= 2:
        from specdec.kernels.skinny import _WORKSPACE as SKINNY_WS

        assert all((cnt == 0).all() for _, cnt in SKINNY_WS.values())  # its split-K counters too
        with pytest.raises(ValueError, match="skinny"):  # fp32 activations: not this kernel
            quant_matmul(x.float(), q, s, bits, G, SKINNY[0])
    if bits == 4:
        with pytest.raises(ValueError, match="half"):  # 16-bit sums need 16-bit activations
            quant_matmul(x.float(), q, s, bits, G, HALF[0])


TMA = [QuantConfig(gemv=False, block_n=64, block_k=128, num_stages=3, swap=True, tma=True),  # tensor descriptors
       QuantConfig(gemv=False, block_n=32, block_k=64, split_k=3, num_stages=2, swap=True, tma=True, asm=True),
       QuantConfig(gemv=False, block_n=64, block_k=256, split_k=2, tma=True)]  # not swapped: x @ W.T


@pytest.mark.skipif(not INTERPRET, reason="Triton kernels run on CPU only under TRITON_INTERPRET=1 (scripts/test.sh)")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_tma_kernels_match_reference(bits, M):
    """The tensor-descriptor kernels: ragged N and K (int8: K % 16 == 0, a TMA alignment rule, but
    no multiple of any block; int4: K past the last whole group), split-K on and off, swapped or
    not; out-of-bounds tiles read as zeros. Operands TMA cannot take raise one clear error."""
    from specdec.kernels.skinny import _WORKSPACE as SKINNY_WS

    g = torch.Generator().manual_seed(300 + 10 * bits + M)
    N, K, G = 45, (208 if bits == 8 else 200), 32
    w = torch.randn(N, K, generator=g) * 0.05
    q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, G)
    x = torch.randn(M, K, generator=g).half()  # fp16: the interpreter's bf16 tl.dot is wrong
    ref = quant_matmul_ref(x, q, s, bits, K, G).float()
    for cfg in TMA:
        y = quant_matmul(x, q, s, bits, G, cfg)
        assert y.shape == (M, N) and y.dtype == torch.float16
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel < 2e-3, (cfg, rel)
    assert all((cnt == 0).all() for _, cnt in SKINNY_WS.values())  # split-K counters reset for the next call
    xs = torch.randn(M, K + 1, generator=g).half()[:, 1:]  # a view 2 bytes past a 16-byte boundary
    bad = [x.float(), xs]
    if bits == 8:
        bad.append(torch.randn(M, K - 8, generator=g).half())  # K % 16 != 0 (with a weight to match)
    for xb in bad:
        qb, sb = (quantize_int8(w[:, :xb.shape[1]]) if bits == 8 else (q, s))
        with pytest.raises(ValueError, match="tma"):
            quant_matmul(xb, qb, sb, bits, G, TMA[0])
    if bits == 4:
        q64, s64 = quantize_int4(w, 64)
        with pytest.raises(ValueError, match="multiple of group_size"):
            quant_matmul(x, q64, s64, bits, 64, QuantConfig(gemv=False, block_n=64, block_k=32, tma=True))


@pytest.mark.skipif(not INTERPRET, reason="Triton kernels run on CPU only under TRITON_INTERPRET=1 (scripts/test.sh)")
def test_tma_default_where_the_device_has_tma(monkeypatch):
    """default_config picks the tensor-descriptor tiles only on a TMA device (faked here) for 16-bit
    activations -- int4 at 2 < M <= 64, int8 at 16 < M <= 64 -- and quant_matmul falls back to
    the other kernels when the operands break TMA's alignment rules (a K that is no multiple of 16)."""
    qm = importlib.import_module("drafters.kernels.quant_matmul")
    bf16 = torch.bfloat16
    assert not qm.tma_device("cpu") and not qm.tma_device(None)
    assert not default_config(64, 4096, 4096, 8, device=torch.device("cpu"), dtype=bf16).tma
    monkeypatch.setattr(qm, "tma_device", lambda device: True)
    cfg = default_config(64, 4096, 4096, 8, dtype=bf16)
    assert cfg.tma and cfg.swap and cfg.block_n == 64 and cfg.split_k == 4
    assert default_config(64, 14336, 4096, 8, dtype=bf16).split_k == 1  # N > K: enough tiles unsplit
    assert default_config(4, 1024, 4096, 4, 128, dtype=bf16).tma
    assert default_config(4, 1024, 4096, 4, 256, dtype=bf16).block_k == 256  # whole groups per step
    assert not default_config(16, 4096, 4096, 8, dtype=bf16).tma  # int8 at <= 16 rows: the skinny kernel
    assert not default_config(64, 4096, 4096, 8, dtype=torch.float32).tma
    assert not default_config(2, 4096, 4096, 4, 128, dtype=bf16).tma  # one or two rows: the GEMV
    assert not default_config(64, 4096, 4096, 8, dtype=bf16, tma=False).tma
    calls = []
    real = qm._launch_tma
    monkeypatch.setattr(qm, "_launch_tma", lambda *a: calls.append(a[3]) or real(*a))
    g = torch.Generator().manual_seed(5)
    for bits, K, taken in ((8, 208, True), (8, 197, False), (4, 200, True), (4, 197, False)):
        w = torch.randn(40, K, generator=g) * 0.05
        q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, 32)
        x = torch.randn(20, K, generator=g).half()
        n = len(calls)
        y = quant_matmul(x, q, s, bits, 32)
        assert (len(calls) > n) == taken, (bits, K)
        ref = quant_matmul_ref(x, q, s, bits, K, 32).float()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-3


def test_cuda_gemv_choice_and_fallback(monkeypatch):
    """The int4 one-row bf16 default on CUDA is the CUDA-extension GEMV for wide layers only; an
    explicit QuantConfig(cuda=True) on operands it cannot take raises one clear error; when the
    extension is missing (no nvcc, a failed build) quant_matmul falls back to the Triton GEMV."""
    qm = importlib.import_module("drafters.kernels.quant_matmul")
    ext = importlib.import_module("drafters.kernels.q4_gemv_cuda")
    bf16 = torch.bfloat16
    cfg = default_config(1, 4096, 4096, 4, 128, device=torch.device("cuda"), dtype=bf16)
    assert cfg.cuda and cfg.gemv
    assert not default_config(1, 1024, 4096, 4, 128, device=torch.device("cuda"), dtype=bf16).cuda  # narrow: Triton
    assert not default_config(1, 4096, 4096, 4, 128, device=torch.device("cuda"), dtype=torch.float16).cuda
    assert not default_config(2, 4096, 4096, 4, 128, device=torch.device("cuda"), dtype=bf16).cuda
    assert not default_config(1, 4096, 4096, 8, device=torch.device("cuda"), dtype=bf16).cuda
    assert not default_config(1, 4096, 4096, 4, 128, device=torch.device("cpu"), dtype=bf16).cuda
    assert not default_config(1, 4096, 4096, 4, 128, device=torch.device("cuda"), dtype=bf16, cuda=False).cuda
    g = torch.Generator().manual_seed(8)
    w = torch.randn(40, 256, generator=g) * 0.05
    q, s = quantize_int4(w, 64)
    x = torch.randn(1, 256, generator=g).half()
    assert not ext.applies(x, q, s, 256, 64)  # not CUDA, not bf16
    with pytest.raises(ValueError, match="cuda=True"):
        quant_matmul(x, q, s, 4, 64, QuantConfig(gemv=True, block_n=4, block_k=64, num_warps=2, num_stages=2, cuda=True))
    if not INTERPRET:
        return
    # the fallback: the default is the extension (faked CUDA device), the extension is unavailable
    real = qm.default_config
    monkeypatch.setattr(qm, "default_config", lambda M, N, K, bits, G, device=None, dtype=None, **kw:
                        real(M, N, K, bits, G, torch.device("cuda"), dtype=torch.bfloat16, **kw))
    monkeypatch.setattr(ext, "applies", lambda *a: True)
    monkeypatch.setattr(ext, "available", lambda: False)
    w = torch.randn(4100, 256, generator=g) * 0.05  # N > 2048: the extension's default
    q, s = quantize_int4(w, 64)
    assert qm.default_config(1, 4100, 256, 4, 64).cuda
    y = quant_matmul(x, q, s, 4, 64)
    ref = quant_matmul_ref(x, q, s, 4, 256, 64).float()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-3


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="the CUDA extension needs a GPU (and nvcc)")
def test_cuda_gemv_matches_reference_cuda():
    """The CUDA-extension int4 GEMV against the fp32 reference: groups 64 and 128, odd N (a warp's
    second row past the end), both load depths, eager and replayed from a CUDA graph."""
    ext = importlib.import_module("drafters.kernels.q4_gemv_cuda")
    if not ext.available():
        pytest.skip(f"extension not built here: {ext._STATE.get('error')}")
    g = torch.Generator().manual_seed(9)
    for N, K, G in ((4097, 4096, 128), (333, 640, 64), (5000, 1024, 128)):
        w = torch.randn(N, K, generator=g) * 0.05
        q, s = (t.cuda() for t in quantize_int4(w, G))
        x = torch.randn(1, K, generator=g).to("cuda", torch.bfloat16)
        assert ext.applies(x, q, s, K, G)
        ref = quant_matmul_ref(x, q, s, 4, K, G).float()
        for rows, warps, chunk in ((4, 2, 2), (8, 4, 4), (2, 1, 2)):
            y = quant_matmul(x, q, s, 4, G, QuantConfig(gemv=True, block_n=rows, block_k=G, num_warps=warps,
                                                        num_stages=chunk, cuda=True))
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            assert y.shape == (1, N) and rel < 1e-2, (N, K, G, rows, warps, chunk, rel)
        if N > 2048:
            assert default_config(1, N, K, 4, G, x.device, dtype=x.dtype).cuda
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = quant_matmul(x, q, s, 4, G)
        graph.replay()
        torch.cuda.synchronize()
        assert ((yg.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA needs an sm_90+ GPU")
def test_tma_defaults_bf16_and_in_a_cuda_graph_cuda():
    """On a TMA GPU the defaults for 16-bit tree-width rows are the tensor-descriptor kernels (int8
    above 16 rows, int4 above 2), with the inline-PTX widening in bf16; ragged N and K against the
    fp32 reference, eager and replayed from a CUDA graph (the descriptors are launch arguments)."""
    g = torch.Generator().manual_seed(21)
    for bits, N, K, M in ((8, 1000, 1040, 40), (8, 4096, 4096, 64), (4, 1000, 1000, 5), (4, 4096, 4096, 64)):
        w = torch.randn(N, K, generator=g) * 0.05
        q, s = (t.cuda() for t in (quantize_int8(w) if bits == 8 else quantize_int4(w, 128)))
        x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
        assert default_config(M, N, K, bits, 128, x.device, dtype=x.dtype).tma
        ref = quant_matmul_ref(x, q, s, bits, K, 128).float()
        y = quant_matmul(x, q, s, bits, 128)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            yg = quant_matmul(x, q, s, bits, 128)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        for out in (y, yg):
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            assert rel < 1e-2, (bits, N, K, M, rel)


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="bf16 elementwise math and the inline PTX "
                    "need a GPU (the interpreter does not emulate bf16 arithmetic)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gemv_matches_reference_cuda(dtype):
    """int4 one/two-row GEMV with 16-bit products and group sums (the default for 16-bit activations),
    fresh random inputs, ragged N and K: within a few roundings of x's dtype of the fp32 reference
    (bf16 keeps 8 mantissa bits: unit roundoff 2^-9 = 2e-3 per product and per partial sum)."""
    g = torch.Generator().manual_seed(11)
    for N, K, G in ((45, 197, 32), (1000, 1500, 128), (4096, 4096, 128)):
        w = torch.randn(N, K, generator=g) * 0.05
        q, s = (t.cuda() for t in quantize_int4(w, G))
        for M in (1, 2):
            x = torch.randn(M, K, generator=g).to("cuda", dtype)
            ref = quant_matmul_ref(x, q, s, 4, K, G).float()
            cfg = default_config(M, N, K, 4, G, dtype=dtype)
            assert cfg.half
            for c in (cfg, *HALF):
                y = quant_matmul(x, q, s, 4, G, c)
                rel = ((y.float() - ref).norm() / ref.norm()).item()
                assert rel < (1e-2 if dtype == torch.bfloat16 else 2e-3), (N, K, M, c, rel)


def test_split_workspace_grows_without_freeing_the_old_one():
    """An outgrown split-K workspace stays alive (a CUDA graph captured with it keeps its address);
    sizes are powers of two; a smaller request reuses the current pair."""
    qm = importlib.import_module("drafters.kernels.quant_matmul")  # (the package re-exports a function of that name)
    dev = torch.device("cpu")
    qm._WORKSPACE.pop(str(dev), None)
    a = qm._split_workspace(dev, 1000, 7)
    assert a[0].numel() == 1024 and a[1].numel() == 8 and not a[0].any() and not a[1].any()
    assert qm._split_workspace(dev, 900, 3)[0] is a[0]
    retired = len(qm._RETIRED)
    b = qm._split_workspace(dev, 1025, 7)
    assert b[0].numel() == 2048 and b[0] is not a[0] and not b[0].any()
    assert len(qm._RETIRED) == retired + 1 and qm._RETIRED[-1][0] is a[0]


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="CUDA graphs need a CUDA device")
def test_split_workspace_outgrown_stays_valid_for_captured_graphs_cuda():
    """Graphs captured one after another in one pool, as a drafter's catch-up graphs of 3, 5, 9 and 16
    rows are (each warmed up eagerly on a side stream first, each needing a larger split-K workspace
    than the last), then replayed after other tensors took whatever memory was freed: every graph
    still computes its own product. (The outgrown workspace used to be dropped: the probable cause
    of a bf16 int8 QuantizedCopy of SmolLM2 drafting at tau 1.04 on an H200.)"""
    g = torch.Generator().manual_seed(3)
    N, K = 1536, 576  # an up projection: 3..16 bf16 rows take the split-K tensor-core kernel
    q, s = (t.cuda() for t in quantize_int8(torch.randn(N, K, generator=g) * 0.05))
    assert default_config(5, N, K, 8, dtype=torch.bfloat16).split_k > 1
    pool = torch.cuda.graph_pool_handle()
    runs = []
    for M in (3, 5, 9, 16):
        x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as DraftGraphs does
            quant_matmul(x, q, s, 8)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            y = quant_matmul(x, q, s, 8)
        runs.append((graph, x, y))
    # memory of every size a dropped workspace could have been (1 KB .. 256 KB), filled with junk
    junk = [torch.full((1 << e,), 7.0, device="cuda") for e in range(8, 17) for _ in range(4)]
    for graph, x, y in reversed(runs):
        for _ in range(2):
            graph.replay()
        torch.cuda.synchronize()
        ref = quant_matmul_ref(x.float(), q, s, 8, K)
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (x.shape[0], rel)
    del junk


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_kernel_plain_conversion_path_matches():
    g = torch.Generator().manual_seed(7)
    for bits in (8, 4):
        w = torch.randn(33, 70, generator=g)
        q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, 16)
        x = torch.randn(3, 70, generator=g)
        ref = quant_matmul_ref(x, q, s, bits, 70, 16)
        for cfg in (QuantConfig(gemv=True, block_n=16, block_k=32, magic=False),
                    QuantConfig(gemv=False, block_m=16, block_n=16, block_k=32, magic=False)):
            torch.testing.assert_close(quant_matmul(x, q, s, bits, 16, cfg), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the quantized copy
def test_copy_leaves_target_untouched_and_reports_memory():
    m = tiny_model("qwen2", seed=3)  # qwen2: q/k/v biases
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    n_lin = sum(type(mod) is nn.Linear for mod in m.modules())
    for bits in (8, 4):
        d = QuantizedCopy(m, bits=bits, group_size=32)
        qlin = [mod for mod in d.model.modules() if isinstance(mod, QuantLinear)]
        assert len(qlin) == n_lin and not any(type(mod) is nn.Linear for mod in d.model.modules())
        assert d.model.get_input_embeddings().weight is m.get_input_embeddings().weight  # shared, not copied
        rep = d.memory_report()
        assert rep.copy_bytes == d.memory_bytes() > 0
        assert rep.shared_bytes == m.get_input_embeddings().weight.numel() * 4
        # int8: 1 byte + 4/K scale bytes per weight vs 4 (fp32); int4 (G=32): 0.5 + 4/32
        per_w = 1 + 4 / 64 if bits == 8 else 0.5 + 4 / 32
        assert rep.quantized_bytes < rep.float_linear_bytes * (per_w / 4) * 1.1
        assert rep.copy_bytes < rep.target_bytes
        x = torch.randn(5, 64)
        q0 = qlin[0]
        torch.testing.assert_close(q0(x), x @ q0.dequantize().t() + (0 if q0.bias is None else q0.bias))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].data_ptr() == ptrs[k] for k in before)
    assert all(type(mod) is not QuantLinear for mod in m.modules())


def _prompt(seed=1, T=10):
    return torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(seed))


SHAPES = {"chain": dict(depth=4), "tree": dict(depth=3, branching=2, width=4)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bits,group", [(8, 128), (4, 32), (4, 128)])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_equals_hf_tiny(arch, bits, group, shape):
    model = tiny_model(arch)
    ids = _prompt()
    ref = hf_greedy(model, ids, 40, eos_token_id=[])
    d = QuantizedCopy(model, bits=bits, group_size=group, **SHAPES[shape])
    out = specdec.generate(model, ids, drafter=d, max_new_tokens=40, eos_token_id=[], budget=8)
    assert out.sequences.tolist() == ref.tolist()
    assert out.stats.tau > 1.0  # the copy agrees with the target on some tokens


def test_greedy_equals_hf_unquantized_head_and_uncached_path():
    model = tiny_model("llama", seed=5)
    ids = _prompt(seed=4)
    ref = hf_greedy(model, ids, 30, eos_token_id=[])
    d = QuantizedCopy(model, bits=4, group_size=16, depth=3, quantize_head=False, cache_dequantized=False)
    assert d.model.get_output_embeddings().weight is model.get_output_embeddings().weight
    out = specdec.generate(model, ids, drafter=d, max_new_tokens=30, eos_token_id=[], budget=6)
    assert out.sequences.tolist() == ref.tolist()
    assert d.memory_report().cpu_cache_bytes == 0


@functools.lru_cache(maxsize=1)
def _smollm2_case(n: int = 64):
    """(model, prompt ids, HF greedy reference) for one MT-bench prompt, computed once."""
    from experiments.prompts import chat_ids, load_prompts
    from tests.helpers import smollm2

    model, tok = smollm2()
    rec = load_prompts("mtbench", limit=1)[0]
    ids = torch.tensor([chat_ids(tok, rec.turns[:1])])
    return model, ids, hf_greedy(model, ids, n, eos_token_id=[])


@pytest.mark.slow
@pytest.mark.parametrize("bits,shape", [(8, "chain"), (4, "tree")])
def test_greedy_equals_hf_smollm2(bits, shape):
    model, ids, ref = _smollm2_case()
    d = QuantizedCopy(model, bits=bits, group_size=128, **SHAPES[shape])
    out = specdec.generate(model, ids, drafter=d, max_new_tokens=ref.shape[1] - ids.shape[1], eos_token_id=[], budget=8)
    assert out.sequences.tolist() == ref.tolist()
    assert out.stats.tau > 1.5, out.stats  # a real quantized copy drafts well (int8 ~4.5, int4 tree ~2.3)
    rep = d.memory_report()
    assert rep.quantized_bytes < rep.float_linear_bytes * (0.27 if bits == 8 else 0.16)  # int4: 0.53 B/weight + K padding 576 -> 640
    assert rep.shared_bytes > 0  # the embedding table is the target's
