"""CUDA-graph runner: bucketing and padding (CPU), padded == unpadded acceptance (CPU, SDPA), the
runner's static-buffer steps == the eager loop (CPU, capture off), graph replay == eager (CUDA only)."""

import shutil

import pytest
import torch

import specdec
from drafters import DraftModel, Replay
from specdec.acceptance import greedy_accept
from specdec.cache import StaticTreeCache
from specdec.cuda_graph import CUDAGraphRunner, bucket_for, pad_to_bucket
from specdec.forward import causal_chain_mask, tree_forward
from specdec.generate import SpecDecInputError, verify_step
from specdec.tree import TokenTree
from tests.helpers import eos_stops_one_row, tiny_model
from verifiers import SDPAVerifier

NEW = 40


def _prompt(seed=1, T=10, B=1):
    return torch.randint(3, 256, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- bucketing / padding
def test_bucket_for():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 9, 16, 17, 64, 65, 128)] == [1, 2, 4, 4, 8, 16, 16, 32, 64, 128, 128]
    assert bucket_for(129) is None
    assert bucket_for(5, (1, 8, 64)) == 8
    assert bucket_for(3, (64, 1, 8)) == 8  # order of the buckets does not matter
    with pytest.raises(ValueError):
        bucket_for(0)


def test_pad_to_bucket_structure():
    root = torch.tensor([5, 6])
    tree = TokenTree.from_paths(root, [[[1, 2, 3], [1, 4]], [[7]]])  # rows of 5 and 2 nodes -> N = 5
    padded = pad_to_bucket(tree)
    assert padded.num_nodes == 8
    assert torch.equal(padded.tokens[:, :5], tree.tokens)
    assert torch.equal(padded.parents[:, :5], tree.parents)
    assert padded.valid_mask[:, 5:].sum() == 0  # pad nodes are invalid ...
    assert torch.equal(padded.valid_mask[:, :5], tree.valid_mask)
    assert torch.equal(padded.parents[:, 5:], torch.zeros(2, 3, dtype=torch.long))  # ... and hang off the root
    assert torch.equal(padded.depths[:, :5], tree.depths)  # real nodes keep depth and ancestry
    assert torch.equal(padded.ancestor_mask[:, :5, :5], tree.ancestor_mask)
    assert pad_to_bucket(padded) is padded  # already a bucket size
    big = TokenTree.chain(root[:1], torch.ones(1, 200, dtype=torch.long))
    assert pad_to_bucket(big) is big  # no bucket: unchanged (the engine runs it eagerly)


def _verify_accept(model, prompt, tree):
    """Prefill ``prompt[:, :-1]`` into a fresh cache (the last token is the tree's root), verify
    ``tree`` with SDPA, accept greedily."""
    prompt = prompt[:, :-1]
    B, T = prompt.shape
    cache = StaticTreeCache(model.config, B, T + 200, torch.float32, "cpu")
    v = SDPAVerifier()
    tree_forward(model, cache, prompt, causal_chain_mask(B, T, "cpu"), torch.arange(T).expand(B, T), T, v.backend)
    cache.advance(T)
    logits = v(model, tree, cache, T + tree.num_nodes)
    return logits, greedy_accept(tree, logits)


@pytest.mark.parametrize("bucket", [16, 64])
def test_padded_tree_accepts_same_tokens(bucket):
    """A tree padded to a bucket gives the same real-node logits and the same accepted path and bonus."""
    model = tiny_model("llama")
    prompt = _prompt(seed=3, B=2)
    ref = specdec.generate(model, prompt, max_new_tokens=6, cuda_graphs=False).sequences[:, 10:]  # greedy truth
    root = prompt[:, -1]
    # row 0: the true continuation as one branch (all 6 drafts accepted), plus wrong branches;
    # row 1: only wrong branches
    paths = [[ref[0].tolist(), [(ref[0, 0].item() + 1) % 256, 9], ref[0, :2].tolist() + [7]], [[11, 12], [13]]]
    tree = TokenTree.from_paths(root, paths)
    logits, res = _verify_accept(model, prompt, tree)
    padded = tree.pad_to(bucket)
    logits_p, res_p = _verify_accept(model, prompt, padded)
    n = tree.num_nodes
    torch.testing.assert_close(logits_p[:, :n], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(res.path_len, res_p.path_len)
    assert torch.equal(res.bonus, res_p.bonus)
    for b in range(2):
        L = int(res.path_len[b])
        assert torch.equal(res.path[b, :L], res_p.path[b, :L])
    assert int(res.path_len[0]) == 7 and int(res.path_len[1]) == 1  # the tree exercised both outcomes


# ---------------------------------------------------------------- runner (CPU: capture off)
def _drafters(model, cont):
    return {
        "ar": None,
        "replay-chain": Replay(cont, 0.3, seed=1),
        "replay-tree": Replay(cont, 0.5, branching=3, seed=2),  # 3 nodes per level -> padded buckets
        "draft-tree": DraftModel(tiny_model("llama", seed=7), depth=3, branching=2, width=2),
    }


@pytest.mark.parametrize("name", ["ar", "replay-chain", "replay-tree", "draft-tree"])
def test_runner_static_steps_match_eager_cpu(name):
    """The runner's padded, fixed-view, static-buffer step (the function a graph captures), run
    eagerly on CPU, commits exactly the tokens of the eager loop; buffers are reused across calls."""
    model = tiny_model("llama")
    prompt = _prompt(seed=5)
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    cont = ref.new_tokens[0]
    budget = 6
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 256, buckets=(1, 4, 16), capture=False)
    for _ in range(2):  # second call: same buffers, reset in between
        eager = specdec.generate(model, prompt, drafter=_drafters(model, cont)[name], max_new_tokens=NEW, budget=budget,
                                 verifier=SDPAVerifier(), cuda_graphs=False)
        out = specdec.generate(model, prompt, drafter=_drafters(model, cont)[name], max_new_tokens=NEW, budget=budget,
                               verifier=SDPAVerifier(), cuda_graphs=runner)
        assert out.new_tokens == ref.new_tokens == eager.new_tokens
        assert out.stats.verify_steps == eager.stats.verify_steps
        assert out.stats.accepted_per_depth == eager.stats.accepted_per_depth
        assert out.stats.drafted_per_depth == eager.stats.drafted_per_depth
    used = {key: b.replays for key, b in runner._buckets.items()}
    if name == "ar":
        assert set(used) == {(1, True)}
    else:  # trees of 7 nodes and less: buckets 4 and 16 (padding exercised), root-only graph unused
        assert (16, False) in used and all(not root for (_, root) in used)


def test_runner_batch_rows_finish_at_different_steps():
    """Batch 2 with an EOS that stops one row early: the inactive row commits nothing."""
    model = tiny_model("llama")
    prompt = _prompt(seed=9, B=2)
    eos, ref = eos_stops_one_row(model, prompt, NEW)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 2, 256, buckets=(1, 8), capture=False)
    for drafter in (None, Replay([r + [0] * 8 for r in ref.new_tokens], 0.2, seed=4)):
        out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, eos_token_id=eos, budget=5,
                               verifier=SDPAVerifier(), cuda_graphs=runner)
        assert out.new_tokens == ref.new_tokens
        assert torch.equal(out.sequences, ref.sequences)


def test_autoregressive_steps_run_one_ahead_of_the_host():
    """Plain decoding through the runner queues step k + 1 before reading step k back: same tokens
    as the eager loop, never a step past ``max_new_tokens``, one wasted step when every row stops
    on an EOS, and no running ahead when an ``on_step`` callback may read the step's buffers."""
    model = tiny_model("llama")
    prompt = _prompt(seed=2, B=2)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 2, 256, buckets=(1, 8), capture=False)

    def replays(**kw):
        before = runner._buckets[(1, True)].replays if (1, True) in runner._buckets else 0
        out = specdec.generate(model, prompt, max_new_tokens=NEW, verifier=SDPAVerifier(), cuda_graphs=runner, **kw)
        ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False, **kw)
        assert out.new_tokens == ref.new_tokens
        assert torch.equal(out.sequences, ref.sequences)
        return out, runner._buckets[(1, True)].replays - before

    out, n = replays(eos_token_id=-1)
    assert n == NEW - 1 == out.stats.verify_steps  # the first token is the prefill's
    full = out.new_tokens
    # an EOS that stops both rows well before max_new_tokens: the step where the later one stops
    last, eos = min((max(r.index(t) for r in full), t) for t in set(full[0]) & set(full[1]))
    assert last < NEW - 2
    out, n = replays(eos_token_id=eos)
    assert out.stats.verify_steps == last
    assert n == last + 1  # the step queued while the last row's EOS was read back
    out, n = replays(eos_token_id=eos, on_step=lambda state, res: None)
    assert n == out.stats.verify_steps == last  # a callback sees each step's buffers: no running ahead


def test_runner_rejects_misfits_and_cpu_graphs():
    model = tiny_model("llama")
    prompt = _prompt()
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64, buckets=(1, 8), capture=False)
    with pytest.raises(SpecDecInputError):  # 10 + 60 tokens do not fit 64 slots
        specdec.generate(model, prompt, max_new_tokens=60, verifier=SDPAVerifier(), cuda_graphs=runner)
    with pytest.raises(SpecDecInputError):  # sampling is not captured
        specdec.generate(model, prompt, max_new_tokens=4, temperature=1.0, verifier=SDPAVerifier(), cuda_graphs=runner)
    if not torch.cuda.is_available():
        with pytest.raises(SpecDecInputError):
            specdec.generate(model, prompt, max_new_tokens=4, cuda_graphs=True)
        with pytest.raises(ValueError):
            CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64)  # capture needs CUDA


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_tree_larger_than_every_bucket_runs_eagerly(device):
    """On CUDA the drafter leaves its host-built tree on the CPU for the runner; the eager
    fallback moves it to the device."""
    import copy

    model = tiny_model("llama") if device == "cpu" else copy.deepcopy(tiny_model("llama")).cuda()
    prompt = _prompt(seed=2).to(device)
    ref = specdec.generate(model, prompt, max_new_tokens=20, cuda_graphs=False)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 256, buckets=(1, 2), capture=device == "cuda")
    out = specdec.generate(model, prompt, drafter=Replay(ref.new_tokens[0], 0.0), max_new_tokens=20, budget=4,
                           verifier=SDPAVerifier(), cuda_graphs=runner)
    assert out.new_tokens == ref.new_tokens
    assert runner.stats.eager_steps == out.stats.verify_steps  # 5-node trees > bucket 2: every step eager


def test_host_and_device_trees_load_the_same_inputs():
    """``_load`` stages a host tree in one copy and copies a device tree field by field: both
    leave the same packed input, padding included, and the unpacked tree is the padded tree."""
    model = tiny_model("llama")
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 2, 64, buckets=(8,), capture=False)
    b = runner._bucket(8, root_only=False)
    trees = [TokenTree._from_rows([[5, 6, 7, 8, 9], [4, 3]], [[-1, 0, 1, 1, 3], [-1, 0]], 5, "cpu"),
             TokenTree._from_rows([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, [[-1, 0, 1, 2, 3, 4, 5, 6]] * 2, 8, "cpu"),
             TokenTree._from_rows([[9, 8]] * 2, [[-1, 0]] * 2, 2, "cpu")]
    staged = b.staged
    for tree in trees:
        b.packed.fill_(-7)  # stale inputs everywhere
        runner._load(b, tree)
        via_host = b.packed.clone()
        b.packed.fill_(-7)
        b.staged = None  # as for a tree computed on the device
        runner._load(b, tree)
        b.staged = staged
        via_fields = b.packed.clone()
        n = tree.num_nodes
        assert torch.equal(via_host[:, 1:], via_fields[:, 1:]) and torch.equal(via_host[:, 0, :n], via_fields[:, 0, :n])
        padded = pad_to_bucket(tree, (8,))
        assert torch.equal(via_host[:, 1], padded.parents) and torch.equal(via_host[:, 2] != 0, padded.valid_mask)
        assert torch.equal(via_host[:, 0, :n], tree.tokens)


# ---------------------------------------------------------------- real graphs (CUDA only)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["ar", "replay-chain", "replay-tree", "draft-tree"])
def test_graph_replay_matches_eager_cuda(name):
    import copy  # the lru-cached CPU model must stay on the CPU for the other tests of the session

    model = copy.deepcopy(tiny_model("llama")).cuda()
    prompt = _prompt(seed=5).cuda()
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    cont = ref.new_tokens[0]
    for _ in range(2):
        drafter = _drafters(model, cont)[name]
        if isinstance(drafter, DraftModel):
            drafter = DraftModel(copy.deepcopy(tiny_model("llama", seed=7)).cuda(), depth=3, branching=2, width=2)
        eager = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, budget=6, cuda_graphs=False)
        drafter = _drafters(model, cont)[name]
        if isinstance(drafter, DraftModel):
            drafter = DraftModel(copy.deepcopy(tiny_model("llama", seed=7)).cuda(), depth=3, branching=2, width=2)
        graphed = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, budget=6, cuda_graphs=True)
        assert graphed.new_tokens == eager.new_tokens == ref.new_tokens
        assert graphed.stats.accepted_per_depth == eager.stats.accepted_per_depth
    from specdec.cuda_graph import _RUNNERS

    runner = _RUNNERS[model]
    assert runner.disabled is None
    assert runner._buckets and all(b.graph is not None for b in runner._buckets.values())
    assert sum(b.replays for b in runner._buckets.values()) > 0


# ---------------------------------------------------------------- compiled target forward
class _RecordingBackend:
    """A torch.compile backend that keeps the dynamo graphs and runs them as traced (no Inductor)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.parametrize("verifier_name", ["sdpa", "triton"])
def test_runner_compiled_forward_matches_eager_cpu(verifier_name):
    """compile=<backend>: the whole target forward is traced in ONE graph per shape (fullgraph, so a
    graph break would raise), the cache write and the Triton kernel enter it as custom ops, and
    the runner commits exactly the eager loop's tokens; the first bucket is static, the second
    recompiles with the tree size symbolic and then serves every later bucket."""
    from verifiers import TritonTreeVerifier
    from verifiers.triton_tree import _triton_can_run

    if verifier_name == "triton" and not _triton_can_run(torch.zeros(1)):
        pytest.skip("the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1")
    model = tiny_model("llama", seed=3)
    verifier = SDPAVerifier() if verifier_name == "sdpa" else TritonTreeVerifier()
    prompt = _prompt(seed=5)
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    backend = _RecordingBackend()
    runner = CUDAGraphRunner(model, verifier, verify_step, 1, 256, buckets=(1, 4, 8, 16), capture=False, compile=backend)
    for drafter in (None, Replay(ref.new_tokens[0], 0.5, branching=3, seed=2), Replay(ref.new_tokens[0], 0.1, seed=3)):
        out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, budget=6, verifier=verifier,
                               cuda_graphs=runner)
        assert out.new_tokens == ref.new_tokens
    used = sorted(n for (n, _), b in runner._buckets.items() if b.replays)
    assert len(used) >= 3, used  # AR + at least two tree buckets went through the compiled forward
    assert len(backend.graphs) == 2  # static first shape, then one dynamic graph for the rest
    for gm in backend.graphs:
        code = gm.code
        assert code.count("specdec.kv_write") == model.config.num_hidden_layers
        if verifier_name == "triton":
            assert code.count("specdec.tree_attention") == model.config.num_hidden_layers
    # the same model decodes uncompiled afterwards (a plain call replaces the compiled runner)
    assert specdec.generate(model, prompt, max_new_tokens=8, cuda_graphs=False).new_tokens[0] == ref.new_tokens[0][:8]


def test_pdl_mode_from_compile(monkeypatch):
    """Programmatic dependent launch: every step by default with Inductor on sm90+, the one-token step
    or none when asked, off for other backends and older GPUs; bad values raise."""
    from specdec.cuda_graph import pdl_mode

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    for compile in (True, "inductor", {}, {"freezing": True}, False, "aot_eager", {"pdl": False}):
        assert pdl_mode(compile, cpu) is None
    for asked in (True, "all", "one_token"):
        with pytest.raises(ValueError, match="sm90"):
            pdl_mode({"pdl": asked}, cpu)
    with pytest.raises(ValueError, match="one_token"):
        pdl_mode({"pdl": "first"}, cpu)
    for cap, want in (((9, 0), "all"), ((8, 0), None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        assert pdl_mode(True, gpu) == want and pdl_mode({"max_autotune": True}, gpu) == want
        assert pdl_mode("aot_eager", gpu) is None and pdl_mode({"pdl": False}, gpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pdl_mode({"pdl": True}, gpu) == pdl_mode({"pdl": "all"}, gpu) == "all"
    assert pdl_mode({"pdl": "one_token"}, gpu) == "one_token"


def test_compile_needs_the_graph_runner():
    model = tiny_model("llama")
    prompt = _prompt()
    ref = specdec.generate(model, prompt, max_new_tokens=6, cuda_graphs=False)
    with pytest.raises(SpecDecInputError, match="compile"):
        specdec.generate(model, prompt, max_new_tokens=6, cuda_graphs=False, compile=True)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64, buckets=(1,), capture=False)
    with pytest.raises(SpecDecInputError, match="compile"):  # the runner was built without it
        specdec.generate(model, prompt, max_new_tokens=6, verifier=SDPAVerifier(), cuda_graphs=runner, compile=True)
    if not torch.cuda.is_available():
        with pytest.raises(SpecDecInputError, match="compile"):  # CPU: no graph runner by default
            specdec.generate(model, prompt, max_new_tokens=6, compile=True)
    assert specdec.generate(model, prompt, max_new_tokens=6, cuda_graphs=False).new_tokens == ref.new_tokens


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="Inductor on CPU needs a C compiler")
def test_runner_compiled_step_matches_eager_cpu():
    """compile=True: Inductor compiles the runner's whole step (forward, acceptance, commit, append)
    and the runner commits the eager loop's tokens, one-token and tree steps alike."""
    model = tiny_model("llama", seed=3)
    prompt = _prompt(seed=5)
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    torch._dynamo.reset()
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 256, buckets=(1, 8), capture=False, compile=True)
    assert runner._step is not None and runner._forward is None
    for drafter in (None, Replay(ref.new_tokens[0], 0.5, branching=3, seed=2)):
        out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, budget=6, verifier=SDPAVerifier(),
                               cuda_graphs=runner)
        assert out.new_tokens == ref.new_tokens
    assert {n for (n, _), b in runner._buckets.items() if b.replays} == {1, 8}
    forward_only = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 64, buckets=(1,), capture=False,
                                   compile={"compile_step": False})
    assert forward_only._step is None and forward_only._forward is not None


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="Inductor on CPU needs a C compiler")
def test_compiled_step_one_graph_for_every_tree_bucket():
    """The whole-step compile traces the one-node step once and every tree bucket (2, 4, 8 nodes)
    once, as one dynamic graph (the first tree bucket is marked dynamic; no size-1 slice of the
    accepted path specializes the two-node bucket), and still commits the eager loop's tokens."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", seed=3)
    prompt = _prompt(seed=5)
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    torch._dynamo.reset()
    counters.clear()
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 256, buckets=(1, 2, 4, 8), capture=False, compile=True)
    for drafter, budget in ((None, 1), (Replay(ref.new_tokens[0], 0.5, seed=2), 1),
                            (Replay(ref.new_tokens[0], 0.5, seed=2), 3), (Replay(ref.new_tokens[0], 0.5, seed=2), 7)):
        out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, budget=budget, verifier=SDPAVerifier(),
                               cuda_graphs=runner)
        assert out.new_tokens == ref.new_tokens
    assert {n for (n, _), b in runner._buckets.items() if b.replays} == {1, 2, 4, 8}
    assert counters["stats"]["unique_graphs"] == 2


def test_compiled_forward_is_one_function_per_setting():
    """Inductor options as a dict: equal dicts share one compiled function, other settings do not."""
    from specdec.cuda_graph import compiled_forward

    a = compiled_forward({"freezing": True, "max_autotune": False})
    assert compiled_forward({"max_autotune": False, "freezing": True}) is a
    assert compiled_forward({"freezing": False}) is not a
    assert compiled_forward(True) is compiled_forward("inductor") is not a


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="Inductor on CPU needs a C compiler")
def test_freezing_option_reaches_dynamo():
    """compile={"freezing": True}: the weights are frozen (Inductor's freezing passes run on them),
    which needs the option set while dynamo traces, not only in the backend."""
    from torch._dynamo.utils import counters

    from specdec.cuda_graph import compiled_forward

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(32, 64, bias=False)
            self.down = torch.nn.Linear(64, 32, bias=False)

        def forward(self, input_ids):
            return self.down(torch.nn.functional.silu(self.gate(input_ids)) * self.up(input_ids))

    model, x = MLP().eval(), torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x)
        counters.clear()
        out = compiled_forward({"freezing": True})(model, input_ids=x)
    torch.testing.assert_close(out, ref)
    assert counters["inductor"]["pattern_matcher_count"] > 0  # freezing passes matched the frozen weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name, compile", [("ar", True), ("replay-tree", True), ("replay-tree", {"freezing": True}),
                                           ("replay-tree", {"compile_step": False})])
def test_compiled_graph_replay_matches_eager_cuda(name, compile):
    """compile=True (Inductor; or with freezing: constant weights, concatenated linears) inside the
    captured steps: same tokens as the eager loop (fp32)."""
    runner = _compiled_runner_matching_eager(name, compile)
    assert runner.compile == compile and runner.disabled is None
    assert all(b.graph is not None for b in runner._buckets.values())


def _compiled_runner_matching_eager(name: str, compile) -> CUDAGraphRunner:
    """Two ``generate(compile=compile)`` calls with drafter ``name`` on a CUDA copy of the tiny
    Llama commit the eager loop's tokens (fp32); returns the runner they used."""
    import copy

    from specdec.cuda_graph import _RUNNERS

    model = copy.deepcopy(tiny_model("llama", seed=11)).cuda()
    prompt = _prompt(seed=5).cuda()
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    for _ in range(2):
        drafter = _drafters(model, ref.new_tokens[0])[name]
        out = specdec.generate(model, prompt, drafter=drafter, max_new_tokens=NEW, budget=6, compile=compile)
        assert out.new_tokens == ref.new_tokens
    return _RUNNERS[model]


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.mark.skipif(not _sm90(), reason="programmatic dependent launch needs sm90+")
@pytest.mark.parametrize("pdl_opt", ["default", "one_token"])
@pytest.mark.parametrize("name", ["ar", "replay-tree"])
def test_pdl_graph_replay_matches_eager_cuda(name, pdl_opt):
    """Programmatic dependent launch (on by default with Inductor on sm90+): every kernel of a step
    (Inductor's, the GEMVs, skinny GEMMs, KV writes, attention) launched early with a wait first;
    {"pdl": "one_token"}: the one-token step only, trees captured without it. Same tokens as the
    eager loop (fp32)."""
    from specdec.kernels import pdl

    runner = _compiled_runner_matching_eager(name, True if pdl_opt == "default" else {"pdl": pdl_opt})
    every = pdl_opt == "default"
    assert runner.pdl and runner.pdl_trees == every and runner.pdl_mode == ("all" if every else "one_token")
    assert (runner._step_root is runner._step) == every  # one compilation unless only the one-token step has PDL
    assert not pdl.enabled(runner.device)  # only while the runner captures
    with pdl.on():
        assert pdl.enabled(runner.device)


@pytest.mark.skipif(not _sm90(), reason="Inductor emits PDL code for sm90+ only")
def test_inductor_pdl_kernels_wait_first_cuda():
    """With the specdec filter, every Inductor kernel compiled with ``triton.enable_pdl`` waits for
    the previous grid before anything else (Inductor alone may load first when the previous node
    did not write the loaded buffer, e.g. after an opaque op with several outputs)."""
    from torch._inductor.utils import run_and_get_code

    from specdec.cuda_graph import _inductor_pdl_wait_first

    _inductor_pdl_wait_first()
    w = torch.randn(64, 64, device="cuda")

    def f(x, r):
        y = x @ w  # an extern kernel between Inductor kernels
        return torch.rms_norm(y + r, (64,)) * 2, (x * 3).sum(-1)

    x, r = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
    torch._dynamo.reset()
    fn = torch.compile(f, options={"triton.enable_pdl": True})
    _, codes = run_and_get_code(fn, x, r)
    kernels = [k for c in codes for k in c.split("@triton.jit")[1:]]
    assert kernels
    for k in kernels:
        lines = [ln.strip() for ln in k.splitlines()]
        waits = [i for i, ln in enumerate(lines) if "gdc_wait" in ln]
        access = [i for i, ln in enumerate(lines) if "tl.load(" in ln or "tl.store(" in ln]
        assert len(waits) == 1 and access and waits[0] < access[0], k[:600]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="3xTF32 dots need a GPU (the interpreter multiplies in fp32)")
@pytest.mark.parametrize("N, prefix, L", [(1, 300, 1024), (16, 640, 1024), (32, 1200, 2048)])
def test_fp32_tf32x3_tree_attention_error_cuda(N, prefix, L):
    """fp32 tree attention with 3xTF32 dots (the default) stays as close to the fp64 reference as
    the IEEE-dot kernel does (within 3x its error, plus a hair), SmolLM2-135M's heads."""
    from specdec.tree import pack_bits
    from verifiers.kernels import tree_attention

    g = torch.Generator(device="cuda").manual_seed(N + prefix)
    Hq, Hkv, D = 9, 3, 64
    q = torch.randn(1, Hq, N, D, device="cuda", generator=g)
    k = torch.randn(1, Hkv, L, D, device="cuda", generator=g)
    v = torch.randn(1, Hkv, L, D, device="cuda", generator=g)
    mask = (torch.rand(N, N, device="cuda", generator=g) < 0.5).tril(-1) | torch.eye(N, dtype=torch.bool, device="cuda")
    vis = torch.ones(N, prefix + N, dtype=torch.bool, device="cuda")
    vis[:, prefix:] = mask
    kk = k[:, :, :prefix + N].double().repeat_interleave(Hq // Hkv, 1)
    vv = v[:, :, :prefix + N].double().repeat_interleave(Hq // Hkv, 1)
    ref = ((q.double() @ kk.transpose(-1, -2) * D ** -0.5).masked_fill(~vis, float("-inf")).softmax(-1) @ vv).transpose(1, 2)
    pl = torch.tensor([prefix], device="cuda")
    packed = pack_bits(mask[None].contiguous())
    err = {dot: (tree_attention(q, k, v, pl, packed, N, config={"dot": dot}).double() - ref).abs().max().item()
           for dot in ("ieee", "tf32x3")}
    assert err["tf32x3"] <= 3 * err["ieee"] + 2e-7, err  # (plain TF32 would be ~1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("compile", [{"pdl": False}, True])
def test_swiglu_one_launch_graph_replay_matches_eager_cuda(compile):
    """The one-token step with the SwiGLU MLP as one GEMV launch (forced by the picker's timer;
    without PDL, and with it as by default on sm90+): same tokens as the eager loop (fp32), AR and
    tree drafts."""
    import copy

    from specdec.gemm_pick import FORMULATIONS, GEMV_FORMULATIONS, GemmPicker
    from verifiers import SDPAVerifier

    gemv = GEMV_FORMULATIONS[0]
    forced = lambda x, *w: (tuple(1e-3 if f == gemv else float("inf") for f in range(len(FORMULATIONS))), 1.0)
    picker = GemmPicker(swiglu_timer=forced)
    torch._dynamo.reset()  # (compiled code of earlier tests has another picker's index baked in)
    model = copy.deepcopy(tiny_model("llama", seed=11)).cuda()
    prompt = _prompt(seed=5).cuda()
    ref = specdec.generate(model, prompt, max_new_tokens=NEW, cuda_graphs=False)
    runner = CUDAGraphRunner(model, SDPAVerifier(), verify_step, 1, 128, buckets=(1, 4, 16), compile=compile,
                             pick_gemm=picker)
    for name in ("ar", "replay-tree"):
        out = specdec.generate(model, prompt, drafter=_drafters(model, ref.new_tokens[0])[name], max_new_tokens=NEW,
                               budget=6, verifier=SDPAVerifier(), cuda_graphs=runner)
        assert out.new_tokens == ref.new_tokens
    assert [f for k, f in picker.choice.items() if isinstance(k[3], tuple) and k[3][0] == "swiglu"] == [gemv]
