"""Per-shape GEMM formulations (specdec.gemm_pick): every formulation computes the same linear (the
Triton GEMV under TRITON_INTERPRET on CPU), the choice follows the timings (with a margin), the
mode routes a model's linears eagerly and under torch.compile, and the runner with the picker
commits the eager loop's tokens (CPU, capture off)."""

import contextlib
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import specdec
from drafters import Replay
from specdec.cuda_graph import CUDAGraphRunner
from specdec.gemm_pick import (FORMULATIONS, GEMV_FORMULATIONS, SEPARATE, SKINNY_FORMULATIONS, GemmPicker, applies,
                                group_applies, linear_as, linear_group_as)
from specdec.generate import verify_step
from tests.helpers import tiny_model
from verifiers import SDPAVerifier


_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
_N = len(FORMULATIONS)


class _FakeTimer:
    """µs per formulation from a table (padded with inf); records the shapes it was asked to time."""

    def __init__(self, times):
        self.times, self.calls = tuple(times) + (float("inf"),) * (_N - len(times)), []

    def __call__(self, x, weight, bias):
        self.calls.append((x.shape[0], weight.shape[0], x.shape[1], bias is not None))
        return self.times


@pytest.mark.parametrize("with_bias", [False, True])
def test_formulations_compute_the_same_linear(with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 33, generator=g)  # [B, n, K]: leading dims flattened to M = 14 rows
    w = torch.randn(19, 33, generator=g)
    b = torch.randn(19, generator=g) if with_bias else None
    ref = (x.double() @ w.double().T + (b.double() if with_bias else 0)).float()
    for f in range(3):  # the cuBLAS formulations (plain matmuls on CPU)
        y = linear_as(x, w, b, f)
        assert y.shape == (2, 7, 19) and y.is_contiguous()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not any(applies(f, x, w) for f in GEMV_FORMULATIONS)  # the GEMV takes one row only
    # 14 fp32 rows: the skinny GEMM's 3xTF32 launch shapes, where Triton runs (CUDA, or the interpreter)
    triton_here = x.is_cuda or _INTERP
    assert [applies(f, x, w) for f in SKINNY_FORMULATIONS] == [triton_here and _f32(f) for f in SKINNY_FORMULATIONS]
    before = torch.backends.cuda.preferred_blas_library()
    linear_as(x, w, b, 2)
    assert torch.backends.cuda.preferred_blas_library() == before  # the global preference is restored


@pytest.mark.skipif(not _INTERP, reason="the Triton GEMV runs on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K, with_bias", [(19, 33, False), (64, 1100, True), (3, 4097, False)])
def test_gemv_matches_reference(dtype, N, K, with_bias):
    """Every GEMV launch shape on fresh random inputs, N and K not multiples of the blocks."""
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(1, 1, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if with_bias else None
    ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * K ** 0.5)
    for f in GEMV_FORMULATIONS:
        assert applies(f, x, w)
        y = linear_as(x, w, b, f)
        assert y.shape == (1, 1, N) and y.dtype == dtype
        torch.testing.assert_close(y.double(), ref, **tol)
    assert not applies(3, x, w.t().contiguous().t())  # rows must be contiguous
    assert not any(applies(f, x, w) for f in SKINNY_FORMULATIONS)  # 2 rows or more


_SKINNY_CASES = [(dt, dev) for dev, dts in (("cpu", [torch.float16, torch.float32] if _INTERP else []),
                                             ("cuda", [torch.float16, torch.bfloat16, torch.float32]
                                              if torch.cuda.is_available() else []))
                 for dt in dts]  # (on CPU no bf16: the interpreter's ``tl.dot`` mishandles bf16 operands)


def _f32(f: int) -> bool:
    """Is skinny formulation ``f`` one of the fp32 (3xTF32) launch shapes?"""
    from specdec.kernels.skinny import SKINNY_CONFIGS

    return bool(SKINNY_CONFIGS[f - SKINNY_FORMULATIONS[0]].get("F32", False))


def _skinny_for(dtype: torch.dtype) -> list[int]:
    """The skinny formulations (launch shapes) for ``dtype``."""
    return [f for f in SKINNY_FORMULATIONS if _f32(f) == (dtype == torch.float32)]


@pytest.mark.skipif(not _SKINNY_CASES, reason="the Triton skinny GEMM needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("M, N, K, with_bias", [(2, 19, 33, False), (5, 70, 300, True), (16, 64, 1100, False),
                                                (33, 3, 129, True), (64, 45, 197, False)])
def test_skinny_matches_reference(M, N, K, with_bias):
    """Every skinny launch shape (split-K ones included) on fresh random inputs, M, N and K not
    multiples of the blocks; each called twice, so a split-K counter left dirty would show."""
    g = torch.Generator().manual_seed(M * N * K)
    for dtype, dev in _SKINNY_CASES:
        assert _skinny_for(dtype)
        w = torch.randn(N, K, generator=g).to(dev, dtype)
        b = torch.randn(N, generator=g).to(dev, dtype) if with_bias else None
        for f in _skinny_for(dtype):
            for _ in range(2):  # fresh inputs for the second call too
                x = torch.randn(M, K, generator=g).to(dev, dtype)
                assert applies(f, x, w)
                ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
                y = linear_as(x.view(1, M, K), w, b, f)
                assert y.shape == (1, M, N) and y.dtype == dtype
                # fp32 (3xTF32 on CUDA): the bound of the fp32 GEMV tests; 16 bits: output rounding of |y| ~ sqrt(K)
                tol = {torch.float32: 1e-5, torch.float16: 2e-3}.get(dtype, 1.6e-2)
                torch.testing.assert_close(y[0].double(), ref, rtol=tol, atol=tol * K ** 0.5)
        assert not any(applies(f, x[:1], w) for f in SKINNY_FORMULATIONS)  # one row: the GEMV's
        assert not any(applies(f, torch.randn(65, K).to(dev, dtype), w) for f in SKINNY_FORMULATIONS)
        other = [f for f in SKINNY_FORMULATIONS if f not in _skinny_for(dtype)]
        assert other and not any(applies(f, x, w) for f in other)  # launch shapes of the other dtype class


@pytest.mark.skipif(not (_INTERP or torch.cuda.is_available()), reason="the Triton skinny GEMM needs CUDA or TRITON_INTERPRET=1")
def test_fp32_skinny_can_be_switched_off(monkeypatch):
    """``skinny.FP32_TF32X3 = False``: fp32 linears stay on cuBLAS (no skinny formulation applies)."""
    from specdec.kernels import skinny

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w = torch.randn(8, 40, device=dev), torch.randn(24, 40, device=dev)
    assert any(applies(f, x, w) for f in SKINNY_FORMULATIONS)
    f32 = _skinny_for(torch.float32)[0]
    picker = GemmPicker(device_types=(dev,), timer=_FakeTimer((10.0, 11.0, 12.0) + tuple(
        1.0 if f == f32 else float("inf") for f in range(3, _N))))
    assert picker.formulation(x, w, None) == f32  # picked while 3xTF32 is on
    monkeypatch.setattr(skinny, "FP32_TF32X3", False)
    assert not any(applies(f, x, w) for f in SKINNY_FORMULATIONS)
    with pytest.raises(ValueError, match="FP32_TF32X3"):
        skinny.skinny_linear(x, w)
    assert picker.formulation(x, w, None) == 0  # switched off: its own table, timed again, cuBLAS
    assert any(applies(f, x.half(), w.half()) for f in SKINNY_FORMULATIONS)  # 16 bits: unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="3xTF32 products need a GPU (the interpreter multiplies in fp32)")
@pytest.mark.parametrize("M, N, K", [(16, 576 + 192 + 192, 576), (64, 1536, 576), (5, 576, 1536), (16, 4099, 333)])
def test_fp32_skinny_error_at_most_cublas_cuda(M, N, K):
    """Every fp32 (3xTF32) launch shape: its largest error against the fp64 product stays within 3x
    cuBLAS's IEEE fp32 error on the same inputs (plus a hair for ties)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(M + N + K)
    w = torch.randn(N, K, device="cuda", generator=g) / K ** 0.5
    x = torch.randn(M, K, device="cuda", generator=g)
    ref = x.double() @ w.double().T
    scale = ref.abs().max().item()
    err_cublas = (F.linear(x, w).double() - ref).abs().max().item() / scale
    for f in _skinny_for(torch.float32):
        err = (linear_as(x, w, None, f).double() - ref).abs().max().item() / scale
        assert err <= 3 * err_cublas + 2e-7, (FORMULATIONS[f], err, err_cublas)  # (plain TF32: ~1e-3)


def test_choice_follows_timings_with_a_margin():
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    assert GemmPicker(device_types=("cpu",), timer=_FakeTimer((10.0, 9.8, 12.0))).formulation(x, w, None) == 0  # < 3 % gain
    assert GemmPicker(device_types=("cpu",), timer=_FakeTimer((10.0, 8.0, 12.0))).formulation(x, w, None) == 1
    assert GemmPicker(device_types=("cpu",), timer=_FakeTimer((54.0, 8.3, 7.5))).formulation(x, w, None) == 2
    assert GemmPicker(device_types=("cpu",), timer=_FakeTimer((10.0, float("inf"), 3.0))).formulation(x, w, None) == 2
    # a GEMV that times fastest is not taken for 4 rows (it does not apply)
    assert GemmPicker(device_types=("cpu",), timer=_FakeTimer((10.0, 11.0, 12.0, 1.0))).formulation(x, w, None) == 0
    timer = _FakeTimer((10.0, 5.0, 12.0))
    p = GemmPicker(device_types=("cpu",), timer=timer)
    for _ in range(3):  # timed once per shape
        p.formulation(x, w, None)
        p.formulation(x.unsqueeze(0), w, None)  # [1, 4, 8] is the same 4-row problem
    p.formulation(torch.randn(2, 8), w, None)
    assert timer.calls == [(4, 5, 8, False), (2, 5, 8, False)]
    assert p.timings[(None, "float32", 4, 5, 8, False)][:3] == (10.0, 5.0, 12.0)


def _model_logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("compiled", [False, True])
def test_mode_routes_every_fp32_linear(compiled):
    """Under the mode every linear of the model goes through ``specdec::linear`` with the chosen
    formulation (eagerly and inside one fullgraph torch.compile trace); the logits are unchanged."""
    if compiled and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("Inductor on CPU needs a C compiler")
    model = tiny_model("llama", seed=4)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = _model_logits(model, ids)
        timer = _FakeTimer((10.0, 1.0, 12.0))  # the transposed formulation wins every shape
        picker = GemmPicker(device_types=("cpu",), timer=timer)
        fn = _model_logits
        if compiled:
            torch._dynamo.reset()
            fn = torch.compile(_model_logits, backend="inductor", fullgraph=True)
        with picker.mode():
            out = fn(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cfg = model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    shapes = {(6, n, k, False) for n, k in [(H * D, cfg.hidden_size), (Hkv * D, cfg.hidden_size),
                                            (cfg.hidden_size, H * D), (cfg.intermediate_size, cfg.hidden_size),
                                            (cfg.hidden_size, cfg.intermediate_size), (cfg.vocab_size, cfg.hidden_size)]}
    assert set(timer.calls) == shapes  # each distinct projection shape timed once, all of them routed
    assert all(f == 1 for f in picker.choice.values())


def test_mode_leaves_other_dtypes_and_devices_alone():
    timer = _FakeTimer((10.0, 1.0, 12.0))
    picker = GemmPicker(timer=timer)  # CUDA only
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with picker.mode():
        F.linear(x, w)
        F.linear(x.double(), w.double())
    assert timer.calls == []
    p2 = GemmPicker(device_types=("cpu",), timer=timer)
    with p2.mode():
        F.linear(x.double(), w.double())  # float64: untouched
        with pytest.raises(RuntimeError):  # mixed dtypes: untouched, F.linear raises as usual
            F.linear(x.bfloat16(), w)
    assert timer.calls == []


def _prompt_and_picker(times):
    """The prompt these runner tests decode, and a CPU picker whose timer returns ``times``."""
    prompt = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(8))
    timer = _FakeTimer(times)
    return prompt, timer, GemmPicker(device_types=("cpu",), timer=timer)


@pytest.mark.parametrize("drafter_name", ["chain", "tree"])
def test_runner_with_picker_matches_eager(drafter_name):
    """The runner's steps under the picker (every shape taking a non-default formulation) commit
    exactly the eager loop's tokens, tree buckets and the one-token step alike."""
    model = tiny_model("llama", seed=6)
    prompt, timer, picker = _prompt_and_picker((10.0, 9.0, 1.0))  # cuBLASLt preference wins (a no-op on CPU)
    ref = specdec.generate(model, prompt, max_new_tokens=32, cuda_graphs=False)
    cont = ref.new_tokens[0]
    drafter = Replay(cont, 0.3, seed=1) if drafter_name == "chain" else Replay(cont, 0.5, branching=3, seed=2)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 256, buckets=(1, 4, 16), capture=False,
                             pick_gemm=picker)
    out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=32, budget=6, verifier=SDPAVerifier(),
                           cuda_graphs=runner)
    assert out.new_tokens == ref.new_tokens
    assert timer.calls and any(m > 1 for m, *_ in timer.calls)  # tree buckets were routed
    ar = specdec.generate(model, prompt, max_new_tokens=8, verifier=SDPAVerifier(), cuda_graphs=runner)
    assert ar.new_tokens[0] == ref.new_tokens[0][:8]
    assert any(m == 1 for m, *_ in timer.calls)  # and the one-token step
    assert runner.gemm is picker


def test_runner_picks_only_on_cuda_by_default():
    model = tiny_model("llama", seed=6)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64, buckets=(1,), capture=False)
    assert runner.gemm is None  # CPU: off unless asked
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64, buckets=(1,), capture=False, pick_gemm=True)
    assert isinstance(runner.gemm, GemmPicker) and runner.gemm.device_types == ("cuda",)


@pytest.mark.skipif(not _INTERP, reason="the Triton GEMV runs on CPU tensors only under TRITON_INTERPRET=1")
def test_runner_with_gemv_matches_eager():
    """The one-token steps through the Triton GEMV (forced for every one-row shape) commit the
    eager loop's tokens (fp32)."""
    model = tiny_model("llama", seed=6)
    prompt, _, picker = _prompt_and_picker((10.0, 11.0, 12.0, 1.0))
    ref = specdec.generate(model, prompt, max_new_tokens=12, cuda_graphs=False)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64, buckets=(1,), capture=False, pick_gemm=picker)
    out = specdec.generate(model, prompt, max_new_tokens=12, verifier=SDPAVerifier(), cuda_graphs=runner)
    assert out.new_tokens == ref.new_tokens
    assert picker.choice and all(f == 3 for k, f in picker.choice.items() if k[2] == 1)


@pytest.mark.skipif(not _INTERP, reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("skinny", _skinny_for(torch.float16)[:1] + _skinny_for(torch.float16)[-1:]
                         + _skinny_for(torch.float32)[:1])
def test_runner_with_skinny_matches_eager(skinny):
    """fp16 (and fp32, 3xTF32) tree steps through the Triton skinny GEMM (forced for every shape of
    2+ rows; whole-K and split-K launch shapes) commit the eager loop's tokens."""
    import copy  # tiny_model is cached: convert a copy, not the model the other tests share

    model = copy.deepcopy(tiny_model("llama", seed=6))
    if not _f32(skinny):
        model = model.half()
    prompt, _, picker = _prompt_and_picker((10.0, 11.0, 12.0) + (float("inf"),) * len(GEMV_FORMULATIONS)
                                           + tuple(1.0 if f == skinny else float("inf") for f in SKINNY_FORMULATIONS))
    ref = specdec.generate(model, prompt, max_new_tokens=24, cuda_graphs=False)
    drafter = Replay(ref.new_tokens[0], 0.4, branching=2, seed=3)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64, buckets=(1, 4, 16), capture=False,
                             pick_gemm=picker)
    out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=24, budget=6, verifier=SDPAVerifier(),
                           cuda_graphs=runner)
    assert out.new_tokens == ref.new_tokens
    multi = {k: f for k, f in picker.choice.items() if k[2] > 1}
    assert multi and all(f == skinny for f in multi.values())


# ---------------------------------------------------------------- linears of one input in one launch
@pytest.mark.skipif(not _INTERP, reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_launches_match_reference(with_bias):
    """The grouped GEMV (fp32) and skinny GEMM (fp16, split-K included, each called twice) compute
    every linear of a group of 1-4, with ragged row counts, as the separate reference does."""
    g = torch.Generator().manual_seed(11)
    K, Ns = 197, (45, 3, 70, 16)
    for dtype, Ms, fs in ((torch.float32, (1,), GEMV_FORMULATIONS), (torch.float16, (2, 16, 64), _skinny_for(torch.float16)),
                          (torch.float32, (3, 64), _skinny_for(torch.float32))):
        ws = [(torch.randn(n, K, generator=g) / 8).to(dtype) for n in Ns]
        bs = [torch.randn(n, generator=g).to(dtype) for n in Ns] if with_bias else [None] * len(Ns)
        for M in Ms:
            for f in fs:
                for size in (1, 2, 3, 4):
                    x = torch.randn(1, M, K, generator=g).to(dtype)
                    assert group_applies(f, x, ws[:size])
                    outs = linear_group_as(x, ws[:size], bs[:size], f)
                    assert len(outs) == size
                    for y, w, b in zip(outs, ws, bs):
                        ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
                        assert y.shape == (1, M, w.shape[0]) and y.dtype == dtype and y.is_contiguous()
                        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3 * K ** 0.5)
                        torch.testing.assert_close(y.double(), ref, **tol)
    x = torch.randn(1, 1, K)
    w32 = [torch.randn(5, K), torch.randn(6, K)]
    assert not group_applies(0, x, w32)  # cuBLAS has no grouped call
    assert not group_applies(GEMV_FORMULATIONS[0], x, [w32[0], w32[1].double()])  # one dtype
    assert not group_applies(GEMV_FORMULATIONS[0], x, w32 * 3)  # at most MAX_GROUP linears
    assert group_applies(SEPARATE, x, w32 * 3)


class _FakeGroupTimer(_FakeTimer):
    def __call__(self, x, weights, biases):
        self.calls.append((x.shape[0], tuple(w.shape[0] for w in weights), x.shape[1]))
        return self.times


@pytest.mark.skipif(not _INTERP, reason="the grouped GEMV applies to CPU tensors only under TRITON_INTERPRET=1")
def test_group_choice_follows_timings_with_a_margin():
    """A group runs grouped only when that beats its linears' own best times by > 3 %; each group
    shape is timed once; the summary lists it with its separate time."""
    x, ws = torch.randn(1, 8), [torch.randn(5, 8), torch.randn(3, 8)]
    gemv = GEMV_FORMULATIONS[0]
    single = _FakeTimer((4.0, 5.0, 6.0))  # 4 µs per linear, 8 µs separate
    for grouped_us, want in ((7.9, SEPARATE), (7.5, gemv), (float("inf"), SEPARATE)):
        times = (1.0, 1.0, 1.0) + (float("inf"),) * (gemv - 3) + (grouped_us,)  # cuBLAS entries are ignored
        p = GemmPicker(device_types=("cpu",), timer=single, group_timer=_FakeGroupTimer(times))
        assert p.group_formulation(x, ws, [None, None]) == want
    gt = _FakeGroupTimer((float("inf"),) * gemv + (2.0,))
    p = GemmPicker(device_types=("cpu",), timer=_FakeTimer((4.0, 5.0, 6.0)), group_timer=gt)
    for _ in range(3):
        assert p.group_formulation(x.view(1, 1, 8), ws, [None, None]) == gemv
    assert gt.calls == [(1, (5, 3), 8)]
    s = p.summary()["float32 1x5+3x8"]
    assert s["pick"] == FORMULATIONS[gemv] and s["us"]["separate"] == 8.0


def _qkvo(x, wq, wk, wv, wo, index):
    q = torch.ops.specdec.linear(x, wq, None, index)
    k = torch.ops.specdec.linear(x, wk, None, index)
    v = torch.ops.specdec.linear(x, wv, None, index)
    return torch.ops.specdec.linear(q * k.sum() + v.mean(), wo, None, index)


def test_group_pass_joins_linears_of_one_input():
    """The post-grad pass turns the three linears of ``x`` into one ``specdec::linear_group`` (the
    fourth, of another input, stays), at most MAX_GROUP per group; results are unchanged."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from specdec.gemm_pick import _PICKERS, group_linears
    from specdec.kernels.gemv import MAX_GROUP

    picker = GemmPicker(device_types=("cpu",), timer=_FakeTimer((1.0, 5.0, 6.0)),
                        group_timer=_FakeGroupTimer((float("inf"),) * _N))  # no grouped launch applies: SEPARATE
    with picker.mode():
        pass  # registers the picker
    index = next(i for i, p in enumerate(_PICKERS) if p is picker)
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(1, 8, generator=g)] + [torch.randn(8, 8, generator=g) for _ in range(4)]
    ref = _qkvo(*args, index)
    gm = make_fx(lambda *a: _qkvo(*a, index))(*args)
    assert group_linears(gm.graph) == 1
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.specdec.linear_group.default) == 1
    assert targets.count(torch.ops.specdec.linear.default) == 1
    torch.testing.assert_close(gm(*args), ref)

    def many(x, *w):
        return sum(torch.ops.specdec.linear(x, wi, None, index).sum() for wi in w)

    ws = [torch.randn(4, 8, generator=g) for _ in range(MAX_GROUP + 2)]
    gm = make_fx(many)(args[0], *ws)
    assert group_linears(gm.graph) == 2  # MAX_GROUP + 2 linears: two groups
    gm.recompile()
    torch.testing.assert_close(gm(args[0], *ws), many(args[0], *ws))


@pytest.mark.skipif(not _INTERP, reason="the Triton GEMV runs on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="Inductor on CPU needs a C compiler")
def test_compiled_forward_runs_grouped_linears():
    """compile=True (Inductor, with the group pass): a model's q/k/v and gate/up run as grouped GEMVs
    when those time faster, and the logits stay those of the plain model."""
    from specdec.cuda_graph import compiled_forward

    model = tiny_model("llama", seed=4)
    ids = torch.randint(3, 256, (1, 1), generator=torch.Generator().manual_seed(2))
    gemv = GEMV_FORMULATIONS[0]
    picker = GemmPicker(device_types=("cpu",), timer=_FakeTimer((10.0, 11.0, 12.0)),
                        group_timer=_FakeGroupTimer((float("inf"),) * gemv + (1.0,)))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        torch._dynamo.reset()
        with picker.mode():
            out = compiled_forward(True)(model, input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    cfg = model.config
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    groups = {k[3] for k in picker.choice if isinstance(k[3], tuple) and k[3][0] != "swiglu"}
    assert groups == {(H * D, Hkv * D, Hkv * D), (cfg.intermediate_size, cfg.intermediate_size)}
    assert all(picker.choice[(*k[:3], n, *k[4:])] == gemv for k in picker.choice for n in groups if k[3] == n)


# ---------------------------------------------------------------- one-row SwiGLU: gate, up and the SiLU product in one launch
class _FakeSwigluTimer:
    """One-launch µs per formulation and the SiLU-product launch's µs; records the shapes."""

    def __init__(self, fused, product):
        self.fused, self.product, self.calls = tuple(fused) + (float("inf"),) * (_N - len(fused)), product, []

    def __call__(self, x, w_gate, w_up, b_gate, b_up):
        self.calls.append((x.shape[0], w_gate.shape[0], x.shape[1]))
        return self.fused, self.product


def _gemv_cfg(f):
    from specdec.kernels.gemv import GEMV_CONFIGS

    return GEMV_CONFIGS[f - GEMV_FORMULATIONS[0]]


@pytest.mark.skipif(not _INTERP, reason="the Triton GEMV runs on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gemv_swiglu_matches_reference(dtype):
    """One launch computes ``silu(x Wg^T + bg) * (x Wu^T + bu)`` with gate, up, SiLU and product each
    rounded to the dtype as the eager ops round them (16-bit: equal to the eager ops applied to the
    exactly rounded linears, up to a rounding of the fp32 sums); every launch shape, K and N off the
    blocks, with and without biases; the SiLU-product launch equals ``F.silu(g) * u``."""
    from specdec.gemm_pick import linear_swiglu_as, silu_mul

    gen = torch.Generator().manual_seed(21)
    for N, K in ((37, 300), (70, 2100)):
        x = torch.randn(1, 1, K, generator=gen).to(dtype)
        wg, wu = ((torch.randn(N, K, generator=gen) / K ** 0.5 * 2).to(dtype) for _ in range(2))
        for bg, bu in ((None, None), (torch.randn(N, generator=gen).to(dtype), torch.randn(N, generator=gen).to(dtype))):
            lin = lambda w, b: (x.double() @ w.double().T + (b.double() if b is not None else 0)).to(dtype)
            g, u = lin(wg, bg), lin(wu, bu)  # [1, 1, N], each exactly rounded
            ref = F.silu(g) * u
            for f in GEMV_FORMULATIONS:
                y = linear_swiglu_as(x, wg, wu, bg, bu, f)
                assert y.shape == (1, 1, N) and y.dtype == dtype
                tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -8)
                torch.testing.assert_close(y, ref, **tol)
            sep = linear_swiglu_as(x, wg, wu, bg, bu, SEPARATE)
            exact = dict(rtol=0, atol=0) if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-6)  # (fp32: exp's last bit)
            torch.testing.assert_close(sep, F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu), **exact)
            torch.testing.assert_close(silu_mul(g, u), ref, **exact)
    with pytest.raises(ValueError, match="no SwiGLU launch"):
        linear_swiglu_as(x, wg, wu, None, None, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_swiglu_cuda(dtype):
    """On the GPU (Triton's fast exp): the one launch stays within an output rounding of the eager
    ``F.silu(gate) * up`` of the plain GEMVs, at a Llama-3-8B MLP shape."""
    from specdec.gemm_pick import linear_swiglu_as
    from specdec.kernels.gemv import gemv

    gen = torch.Generator(device="cuda").manual_seed(4)
    N, K = 14336, 4096
    x = torch.randn(1, 1, K, generator=gen, device="cuda").to(dtype)
    wg, wu = ((torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5 * 2).to(dtype) for _ in range(2))
    for f in GEMV_FORMULATIONS:
        ref = F.silu(gemv(x, wg, None, _gemv_cfg(f))) * gemv(x, wu, None, _gemv_cfg(f))
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -9)
        torch.testing.assert_close(linear_swiglu_as(x, wg, wu, None, None, f), ref, **tol)


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
                    reason="programmatic dependent launch needs sm90+")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_skinny_pdl_chain_in_graph_matches_plain_cuda(dtype):
    """Skinny GEMMs launched with PDL (``pdl.on()``) inside a captured chain, each reading the
    previous one's output (split-K and whole-K launch shapes, a 3-linear group), give bit-equal
    results to the plain launches: every one waits for its predecessor before its first load."""
    from specdec.kernels import pdl
    from specdec.kernels.skinny import SKINNY_CONFIGS, skinny_group

    gen = torch.Generator(device="cuda").manual_seed(5)
    f32 = dtype == torch.float32
    cfgs = [c for c in SKINNY_CONFIGS if bool(c.get("F32", False)) == f32 and c["BLOCK_K"] <= 128]  # (smem at 32 rows)
    cfgs = [next(c for c in cfgs if c["SPLIT_K"] == 1), next(c for c in cfgs if c["SPLIT_K"] > 1)]
    K = 1024
    ws = [(torch.randn(K, K, generator=gen, device="cuda") / K ** 0.5).to(dtype) for _ in range(6)]
    x0 = torch.randn(24, K, generator=gen, device="cuda").to(dtype)

    def chain(x):
        for i, w in enumerate(ws):
            cfg = cfgs[i % 2]
            if i == 3:  # a group of three linears of one input, summed into the next input
                a, b, c = skinny_group(x, [w, ws[0], ws[1]], config=cfg)
                x = (a + b - c) * 0.5
            else:
                x = skinny_group(x, [w], config=cfg)[0] * 1.5
        return x

    ref = chain(x0)  # (also creates the split-K workspaces, eagerly)
    outs = {}
    for use_pdl in (False, True):
        x = x0.clone()
        chain(x)  # warm-up of the PDL variant's compile outside the capture
        with pdl.on() if use_pdl else contextlib.nullcontext():
            chain(x)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = chain(x)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        outs[use_pdl] = y.clone()
    torch.testing.assert_close(outs[False], ref, rtol=0, atol=0)
    torch.testing.assert_close(outs[True], ref, rtol=0, atol=0)


@pytest.mark.skipif(not _INTERP, reason="the GEMV applies to CPU tensors only under TRITON_INTERPRET=1")
def test_swiglu_choice_follows_timings_with_a_margin():
    """The one launch is used only when it beats the gate/up linears' best (here grouped, 6 µs)
    plus the product launch (1 µs) by > 3 %, for one row only; each shape is timed once and listed
    in the summary."""
    x, wg, wu = torch.randn(1, 1, 16), torch.randn(5, 16), torch.randn(5, 16)
    gemv = GEMV_FORMULATIONS[0]
    for fused_us, want in ((6.8, SEPARATE), (6.7, gemv), (float("inf"), SEPARATE)):
        st = _FakeSwigluTimer((1.0, 1.0, 1.0) + (float("inf"),) * (gemv - 3) + (fused_us,), 1.0)
        p = GemmPicker(device_types=("cpu",), timer=_FakeTimer((4.0, 5.0, 6.0)),
                       group_timer=_FakeGroupTimer((float("inf"),) * gemv + (6.0,)), swiglu_timer=st)
        for _ in range(2):
            assert p.swiglu_formulation(x, wg, wu, None, None) == want
        assert st.calls == [(1, 5, 16)]
    s = p.summary()["float32 1xswiglu(5+5)x16"]
    assert s["pick"] == "separate" and s["us"]["separate"] == 7.0
    st = _FakeSwigluTimer((float("inf"),) * gemv + (0.1,), 1.0)
    p = GemmPicker(device_types=("cpu",), timer=_FakeTimer((4.0, 5.0, 6.0)),
                   group_timer=_FakeGroupTimer((float("inf"),) * _N), swiglu_timer=st)
    assert p.swiglu_formulation(x.expand(1, 4, 16), wg, wu, None, None) == SEPARATE  # several rows


@pytest.mark.parametrize("form", ["silu", "decomposed", "sigmoid"])
@pytest.mark.parametrize("rows", [1, 3])
def test_swiglu_pass_finds_the_mlp(form, rows):
    """:func:`fuse_swiglu` replaces ``silu(linear(h, Wg)) * linear(h, Wu)`` at one row, in each form a
    SiLU takes in a post-grad graph (bf16 computed in fp32 between two casts), and nothing at several
    rows, nor when the product is of two inputs or the SiLU stays in fp32; results are unchanged."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from specdec.gemm_pick import _PICKERS, fuse_swiglu

    picker = GemmPicker(device_types=("cpu",), timer=_FakeTimer((1.0, 5.0, 6.0)),
                        group_timer=_FakeGroupTimer((float("inf"),) * _N))  # no one launch, no grouped launch
    with picker.mode():
        pass  # registers the picker
    index = next(i for i, p in enumerate(_PICKERS) if p is picker)
    prims = torch.ops.prims

    def silu(x):
        if form == "silu":
            return torch.ops.aten.silu(x)
        xf = prims.convert_element_type(x, torch.float32)
        y = xf / (torch.ops.aten.exp(torch.ops.aten.neg(xf)) + 1) if form == "decomposed" else xf * torch.sigmoid(xf)
        return prims.convert_element_type(y, x.dtype)

    def mlp(h, wg, wu, wd):
        gate = torch.ops.specdec.linear(h, wg, None, index)
        up = torch.ops.specdec.linear(h, wu, None, index)
        return torch.ops.specdec.linear(silu(gate) * up, wd, None, index)

    gen = torch.Generator().manual_seed(5)
    args = [torch.randn(1, rows, 8, generator=gen).bfloat16(), torch.randn(12, 8, generator=gen).bfloat16(),
            torch.randn(12, 8, generator=gen).bfloat16(), torch.randn(8, 12, generator=gen).bfloat16()]
    gm = make_fx(mlp)(*args)
    assert fuse_swiglu(gm.graph) == (1 if rows == 1 else 0)
    gm.graph.lint()
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.specdec.linear_swiglu.default) == (1 if rows == 1 else 0)
    assert targets.count(torch.ops.specdec.linear.default) == (1 if rows == 1 else 3)
    if rows == 1:
        assert not any(t in targets for t in (torch.ops.aten.exp.default, torch.ops.aten.silu.default,
                                              torch.ops.aten.sigmoid.default, torch.ops.aten.mul.Tensor))
    torch.testing.assert_close(gm(*args), mlp(*args), rtol=0, atol=0)

    def two_inputs(h, wg, wu, wd):  # gate and up of different inputs: not a SwiGLU of one input
        gate = torch.ops.specdec.linear(h, wg, None, index)
        up = torch.ops.specdec.linear(h * 2, wu, None, index)
        return torch.ops.specdec.linear(silu(gate) * up, wd, None, index)

    def fp32_silu(h, wg, wu, wd):  # a SiLU left in fp32 (no cast back to the gate's dtype)
        gate = torch.ops.specdec.linear(h, wg, None, index)
        up = torch.ops.specdec.linear(h, wu, None, index)
        s = prims.convert_element_type(gate, torch.float32)
        return torch.ops.specdec.linear((s * torch.sigmoid(s) * up).bfloat16(), wd, None, index)

    for f in (two_inputs, fp32_silu):
        assert fuse_swiglu(make_fx(f)(*args).graph) == 0


@pytest.mark.skipif(not _INTERP, reason="the Triton GEMV runs on CPU tensors only under TRITON_INTERPRET=1")
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="Inductor on CPU needs a C compiler")
@pytest.mark.parametrize("fuse", [True, False])
def test_compiled_forward_runs_the_swiglu_in_one_launch(fuse):
    """compile=True: a Llama's one-token MLP runs gate, up and the SiLU product as one GEMV launch
    when that times faster (``{"fuse_swiglu": False}``: never); the logits stay the plain model's; a
    several-token forward keeps the grouped linears."""
    from specdec.cuda_graph import compiled_forward

    model = tiny_model("llama", seed=4)
    gemv = GEMV_FORMULATIONS[0]
    picker = GemmPicker(device_types=("cpu",), timer=_FakeTimer((10.0, 11.0, 12.0)),
                        group_timer=_FakeGroupTimer((float("inf"),) * _N),
                        swiglu_timer=_FakeSwigluTimer((float("inf"),) * gemv + (1.0,), 5.0))
    for n in (1, 3):
        ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            ref = model(input_ids=ids).logits
            torch._dynamo.reset()
            with picker.mode():
                out = compiled_forward(True if fuse else {"fuse_swiglu": False})(model, input_ids=ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fused = {k: f for k, f in picker.choice.items() if isinstance(k[3], tuple) and k[3][0] == "swiglu"}
    cfg = model.config
    assert fused == ({(None, "float32", 1, ("swiglu", cfg.intermediate_size), cfg.hidden_size, False): gemv}
                     if fuse else {})
