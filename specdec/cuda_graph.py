"""CUDA-graph captured decode steps: one graph per tree-size bucket over fixed-address buffers.

Why: at batch 1 a decode step is a few hundred small kernels (norms, projections, rotary, attention,
acceptance, commit); launching them one by one from Python costs more than the GPU work itself on
small models and ~10x the weight-read time on 8B with HF ``generate``. Replaying a captured graph
launches them all with one call (gpt-fast, https://github.com/pytorch-labs/gpt-fast: static KV cache
+ ``torch.compile(mode="reduce-overhead")``; vLLM's ``CUDAGraphRunner``: one graph per padded batch
size, captured largest first into one shared memory pool, inputs copied into static buffers).

What is captured (greedy acceptance only; everything here is device work, no host read)::

    tree (static buffers, padded to the bucket)      # tokens/parents/valid [B, n_bucket]
    2. verify : ONE target forward over the tree     # view_len = cache.max_len (fixed)
    3. accept : greedy, vectorised                   # path [B, n], path_len [B], bonus [B]
    4. commit : accepted K/V -> contiguous slots     # one Triton launch (verifiers.kernels.kv_commit)
    5a. append: tokens into ``sequences``, ``seq_lens += path_len``, depth counters, and the
        ``[B, 1 + n]`` row ``[path_len, new tokens...]`` that the engine reads back: the ONE host sync.

Glossary: *bucket* = a captured tree size ``n`` (default 1, 2, 4, ..., 128); a tree of N nodes is
padded to the smallest bucket >= N with invalid nodes hanging off the root (never accepted, see
:meth:`TokenTree.pad_to`). *root-only* graph = the autoregressive step (drafter ``None``): its
single token (the last committed one) is gathered from ``sequences`` inside the graph, so an AR
step copies nothing in.

Fixed ``view_len``: every captured step lets attention see all ``max_len`` slots. With the Triton
tree kernel the cost follows the real prefix lengths (read on device; programs past a row's prefix
exit at once); with the SDPA reference the masked tail costs bandwidth but changes nothing.

Capture is side-effect free: warm-up and capture run with every row marked inactive, so the step
commits nothing (``path_len`` masked to 0) and only scratch slots past the committed length are
written, which the next step overwrites anyway (gpt-fast's no-rollback cache). Buckets are captured
lazily, the first time a tree of that size shows up.

``compile=True`` (or a dict of Inductor options) puts ``torch.compile(fullgraph=True)`` of the whole
device step inside the captured graph (a backend name: of the target's forward alone): Inductor fuses
the norms, rotary, activations and residual adds that HF's modeling code runs as separate kernels,
and the acceptance / commit / append bookkeeping around the forward (the Triton tree kernel, the
cache write and the commit enter the traced graph as custom ops, ``specdec::tree_attention`` /
``specdec::kv_write`` / ``specdec::kv_commit``; linears of one input become one
``specdec::linear_group`` launch where that is faster). Compilation happens at a bucket's first
capture: the first bucket compiles with static shapes, the second one recompiles with the tree size
symbolic, and that graph serves later buckets (dynamo's automatic dynamic shapes; a few more
recompile where a kernel's launch choice changes with the tree size, see ``docs/gpu.md``).

Model-based drafters capture their own draft steps separately (:mod:`specdec.draft_graphs`, used by
``DraftModel`` / ``QuantizedCopy`` / ``EarlyExit`` with ``cuda_graphs=None`` on CUDA); between two
verify replays the engine then launches one draft graph per step (see ``docs/gpu.md``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .attention import bind_model
from .cache import StaticTreeCache
from .gemm_pick import GemmPicker, default_picker, shared_picker
from .metrics import DepthCounters
from .state import AcceptResult, SamplingConfig
from .tree import TokenTree

__all__ = ["DEFAULT_BUCKETS", "bucket_for", "pad_to_bucket", "CUDAGraphRunner", "runner_for", "StepFn"]

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

# step_fn(target, verifier, tree, cache, view_len, sampling, generator, active, sequences, seq_lens, counters)
#   -> (AcceptResult, host [B, 1 + n] int64)       (specdec.generate.verify_step)
StepFn = Callable[..., "tuple[AcceptResult, Tensor]"]


def bucket_for(n: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> int | None:
    """Smallest bucket ``>= n`` (``None`` when the tree is larger than every bucket)."""
    if n < 1:
        raise ValueError(f"a tree has at least one node (the root), got {n}")
    for b in sorted(buckets):
        if b >= n:
            return b
    return None


def pad_to_bucket(tree: TokenTree, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> TokenTree:
    """``tree`` padded to its bucket with never-accepted nodes (unchanged if it has no bucket)."""
    b = bucket_for(tree.num_nodes, buckets)
    return tree if b is None else tree.pad_to(b)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass
class _Bucket:
    """Static buffers of one captured tree size ``n`` (fixed addresses for the graph's lifetime)."""

    n: int
    root_only: bool
    tokens: Tensor  # [B, n] in
    parents: Tensor  # [B, n] in
    valid: Tensor  # [B, n] in (bool)
    path: Tensor  # [B, n] out: accepted node ids, root first, -1 past path_len
    path_len: Tensor  # [B] out
    bonus: Tensor  # [B] out
    host: Tensor  # [B, 1 + n] out: [path_len, committed tokens...] (read back by the engine)
    packed: Tensor | None = None  # [B, 3, n] int64 in: tokens, parents, valid; unpacked inside the graph
    staged: Tensor | None = None  # [B, 3, n] int64 on the host (pinned on CUDA): a host tree, one copy to ``packed``
    staged_np: "object | None" = None  # numpy view of ``staged`` (written by ``_load``)
    host_out: Tensor | None = None  # [B, 1 + n] pinned host copy of ``host``, made inside the graph (tree buckets)
    graph: "torch.cuda.CUDAGraph | None" = None
    replays: int = 0
    masks: dict = field(default_factory=dict)  # root-only: the one-node tree's constant masks (compiled step)


@dataclass
class RunnerStats:
    captures: dict[int, float] = field(default_factory=dict)  # bucket -> capture seconds (warm-up included)
    replays: dict[int, int] = field(default_factory=dict)  # bucket -> replays
    eager_steps: int = 0  # steps that ran eagerly (tree larger than every bucket)


class CUDAGraphRunner:
    """Owns the decode buffers of one (target, batch, max_len) and the graphs captured over them.

    Args:
        target: HF causal LM (held weakly: the runner is cached per model, see :func:`runner_for`).
        verifier: the verifier whose forward is captured (Triton tree kernel or SDPA reference).
        step_fn: the engine's device step (:func:`specdec.generate.verify_step`).
        batch_size, max_len: the cache holds ``batch_size x max_len`` slots.
        buckets: captured tree sizes.
        capture: ``False`` runs the same static-buffer step eagerly (CPU tests of the padding and
            buffer logic; no CUDA needed).
        compile: ``False``; ``True`` (Inductor), a ``torch.compile`` backend (name or callable) or a dict of
            Inductor options (see :func:`compiled_forward`): the target's forward runs compiled (at most
            two compilations per model, see the module docstring).
        pick_gemm: time each linear shape of the captured steps once and use its fastest GEMM
            formulation (cuBLAS variants, a Triton GEMV for one row; :mod:`specdec.gemm_pick`).
            ``None`` (default): on for a CUDA target unless ``compile`` asks for Inductor's
            ``freezing`` (which concatenates linears) or ``specdec.gemm_pick.ENABLED`` is False;
            a :class:`GemmPicker` uses that one.
    Buffers (fixed addresses, reused by every ``generate`` call that fits):
        cache: :class:`StaticTreeCache`; sequences ``[B, max_len + max_bucket + 2]``; seq_lens ``[B]``;
        counters: :class:`DepthCounters` over depths ``0 .. max_bucket - 1``; active ``[B]`` bool.
    """

    def __init__(self, target, verifier, step_fn: StepFn, batch_size: int, max_len: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, capture: bool = True, compile=False,
                 pick_gemm: bool | GemmPicker | None = None):
        p = next(target.parameters())
        self.device, self.dtype = p.device, p.dtype
        if capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the target on a CUDA device")
        bind_model(target)  # eagerly: the lazy registration inside it cannot be traced by dynamo
        self._target = weakref.ref(target)
        self.verifier = verifier
        self.step_fn = step_fn
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.max_bucket = self.buckets[-1]
        self.batch_size = int(batch_size)
        self.max_len = int(max_len)
        self.capture = capture
        self.compile = compile
        # Inductor compiles the whole step unless told {"compile_step": False} or freezing (whose
        # constant folding was only validated on the forward); other backends compile the forward
        whole = (compile is True or compile == "inductor"
                 or (isinstance(compile, Mapping) and bool(compile.get("compile_step", True))
                     and not compile.get("freezing")))
        # Programmatic dependent launch (sm90+, Inductor): every step by default (H200: 8B AR 4.27 ->
        # 4.11 ms, a 16-node verify 4.75 -> 4.62 ms; SmolLM2-shaped fp32 AR 0.89 -> 0.60, verify(16)
        # 1.48 -> 1.32 ms; notes/issue6.md, thirteenth session); {"pdl": "one_token"}: the one-token
        # step only (trees compiled without it); {"pdl": False}: off
        self.pdl_mode = pdl_mode(compile, self.device)
        self.pdl = self.pdl_mode is not None
        self.pdl_trees = self.pdl_mode == "all"
        root_compile = tree_compile = compile
        if compile is True or compile == "inductor" or isinstance(compile, Mapping):
            base = {k: v for k, v in compile.items() if k != "pdl"} if isinstance(compile, Mapping) else {}
            root_compile = dict(base, pdl=True) if self.pdl else base
            tree_compile = dict(base, pdl=True) if self.pdl_trees else base
        self._step = compiled_forward(tree_compile, step_fn) if compile and whole else None  # the whole step
        self._forward = compiled_forward(tree_compile) if compile and not whole else None  # the forward only
        self._step_root = compiled_forward(root_compile, step_fn) if compile and whole else None
        self._forward_root = compiled_forward(root_compile) if compile and not whole else None
        # per-shape GEMM choice for every captured step (Inductor's freezing concatenates linears:
        # they must stay plain mm's there)
        if pick_gemm is None:
            freezing = isinstance(compile, Mapping) and bool(compile.get("freezing"))
            on = self.device.type == "cuda" and self.dtype.is_floating_point and not freezing
            self.gemm = default_picker() if on else None
        else:
            self.gemm = pick_gemm if isinstance(pick_gemm, GemmPicker) else shared_picker() if pick_gemm else None
        B, dev = self.batch_size, self.device
        self.cache = StaticTreeCache(target.config, B, self.max_len, self.dtype, dev)
        self.sequences = torch.zeros(B, self.max_len + self.max_bucket + 2, dtype=torch.long, device=dev)  # [B, W]
        self.seq_lens = torch.zeros(B, dtype=torch.long, device=dev)  # [B]
        self.counters = DepthCounters(self.max_bucket - 1, dev)
        self.active = torch.ones(B, dtype=torch.bool, device=dev)  # [B]
        self._active_host: tuple[bool, ...] = (True,) * B
        self._buckets: dict[tuple[int, bool], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.stats = RunnerStats()
        self.greedy = SamplingConfig()
        self.strict = True  # False: a failed capture disables the graphs (eager steps, one warning)
        self.disabled: str | None = None  # why capture failed, when it did

    # ------------------------------------------------------------------ per generate() call
    def fits(self, target, verifier, batch_size: int, need_len: int, max_nodes: int, compile=None) -> bool:
        """Can a call with ``need_len`` committed tokens at most and trees of ``max_nodes`` use this
        runner (and, unless ``compile`` is None, with that compile setting)?"""
        nb = bucket_for(max_nodes, self.buckets) or max_nodes
        return (
            self._target() is target
            and (compile is None or compile == self.compile)
            and type(verifier) is type(self.verifier)
            and batch_size == self.batch_size
            and need_len + nb + 1 <= self.max_len
            and next(target.parameters()).dtype == self.dtype
        )

    def reset(self, input_ids: Tensor, pad_token_id: int) -> None:
        """Start a call: empty cache, ``sequences = prompt + pad``, ``seq_lens = T``, counters zeroed."""
        B, T = input_ids.shape
        self.cache.reset()
        self.sequences.fill_(int(pad_token_id))
        self.sequences[:, :T] = input_ids
        self.seq_lens.fill_(T)
        for t in (self.counters.drafted, self.counters.reached, self.counters.accepted):
            t.zero_()
        self.set_active([True] * B)

    def set_active(self, active: list[bool]) -> None:
        """Rows still decoding; copied to the device only when it changed (rows finishing)."""
        a = tuple(bool(x) for x in active)
        if a != self._active_host:
            self.active.copy_(torch.tensor(a, dtype=torch.bool), non_blocking=False)
            self._active_host = a

    # ------------------------------------------------------------------ the step
    def step(self, tree: TokenTree | None, active: list[bool]) -> tuple[AcceptResult, Tensor] | None:
        """Steps 2-5a for ``tree`` (``None``: the autoregressive root-only step).

        Returns ``(AcceptResult, host [B, 1 + n])`` whose tensors are the runner's static output
        buffers (valid until the next step), or ``None`` when the tree fits no bucket (the caller
        then runs the step eagerly on the same buffers). ``host`` of a captured tree step is in
        pinned host memory, copied by the graph itself: synchronize the stream before reading it
        (one stream sync instead of a blocking copy call, as :func:`specdec.generate.generate` does).
        """
        self.set_active(active)
        nb = 1 if tree is None else bucket_for(tree.num_nodes, self.buckets)
        if nb is None or self.disabled is not None:
            self.stats.eager_steps += 1
            return None
        try:
            b = self._bucket(nb, root_only=tree is None)
        except Exception as e:  # capture failed (e.g. a host sync inside some model's forward)
            if self.strict:
                raise
            import warnings

            self.disabled = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA-graph capture failed, decoding eagerly: {self.disabled}", RuntimeWarning, stacklevel=3)
            self.stats.eager_steps += 1
            return None
        if tree is not None:
            self._load(b, tree)
        if b.graph is not None:
            b.graph.replay()
        else:
            self._run(b)
        b.replays += 1
        return AcceptResult(path=b.path, path_len=b.path_len, bonus=b.bonus), (b.host if b.host_out is None else b.host_out)

    def _load(self, b: _Bucket, tree: TokenTree) -> None:
        """Copy a tree into the bucket's packed input; the tail becomes padding off the root.

        A tree on the host (``DecodeState.tree_device``) is written into the pinned staging buffer
        and sent in ONE asynchronous copy (safe to overwrite next step: the engine's read-back of
        this step comes after the copy on the stream). A tree on the device is copied field by field.
        """
        n = tree.num_nodes
        if tree.tokens.device.type == "cpu" and b.staged is not None:
            st = b.staged_np  # [B, 3, nb], a numpy view of ``staged`` (its slice writes cost ~1/3 of torch's)
            st[:, 0, :n] = tree.tokens.numpy()
            st[:, 1, :n] = tree.parents.numpy()
            st[:, 2, :n] = 1 if tree.valid is None else tree.valid.numpy()
            if n < b.n:  # padding: invalid children of the root (tokens left stale: never accepted)
                st[:, 1:, n:] = 0
            b.packed.copy_(b.staged, non_blocking=True)
            return
        pk = b.packed
        pk[:, 0, :n].copy_(tree.tokens)
        pk[:, 1, :n].copy_(tree.parents)
        if tree.valid is None:
            pk[:, 2, :n].fill_(1)
        else:
            pk[:, 2, :n].copy_(tree.valid)
        if n < b.n:
            pk[:, 1:, n:].fill_(0)

    def _run(self, b: _Bucket) -> None:
        """The captured function: static inputs -> static outputs (all device work)."""
        if b.root_only:  # the last committed token, gathered on device
            b.tokens.copy_(self.sequences.gather(1, (self.seq_lens - 1).unsqueeze(1)))  # [B, 1]
        else:  # unpack the tree loaded by _load
            b.tokens.copy_(b.packed[:, 0])
            b.parents.copy_(b.packed[:, 1])
            b.valid.copy_(b.packed[:, 2] != 0)
        tree = TokenTree(tokens=b.tokens, parents=b.parents, valid=b.valid)
        if self._step is not None:  # the tree's masks outside the compiled step: their log2(N)
            # squarings would make dynamo compile one graph per power-of-two bucket
            if b.root_only and not b.masks:  # one node, fixed parents: constant masks, computed once
                b.masks = self._tree_masks(TokenTree(tokens=b.tokens, parents=b.parents, valid=b.valid))
            tree.__dict__.update(b.masks if b.root_only else self._tree_masks(tree))
            if not b.root_only:  # one dynamic graph for the tree sizes from the first tree bucket on
                # (else the first tree bucket compiles for its exact size and the next one again)
                for t in (tree.tokens, tree.parents, tree.valid, tree.depths):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
                for t in (tree.ancestor_mask, getattr(tree, "packed_ancestor_mask", None)):
                    if t is not None:
                        torch._dynamo.maybe_mark_dynamic(t, 1)
        step = (self._step_root if b.root_only else self._step) or self.step_fn
        forward = self._forward_root if b.root_only else self._forward
        target = self._target()
        if forward is not None:
            target = _CompiledCall(target, forward)
        from .kernels import pdl

        with (self.gemm.mode() if self.gemm is not None else contextlib.nullcontext(),
              pdl.on() if self.pdl and (b.root_only or self.pdl_trees) else contextlib.nullcontext()):
            res, host = step(
                target, self.verifier, tree, self.cache, self.max_len, self.greedy, None,
                self.active, self.sequences, self.seq_lens, self.counters,
            )
        b.path.copy_(res.path)
        b.path_len.copy_(res.path_len)
        b.bonus.copy_(res.bonus)
        b.host.copy_(host)
        if b.host_out is not None:  # the read-back as the graph's last node: the host only waits for the stream
            b.host_out.copy_(b.host, non_blocking=True)

    def _tree_masks(self, tree: TokenTree) -> dict:
        """The tree's cached masks the step reads (eager ops), as ``TokenTree`` attributes."""
        out = dict(ancestor_mask=tree.ancestor_mask, depths=tree.depths)
        if getattr(self.verifier, "uses_packed_mask", False):
            out["packed_ancestor_mask"] = tree.packed_ancestor_mask
        return out

    def _bucket(self, n: int, root_only: bool) -> _Bucket:
        key = (n, root_only)
        b = self._buckets.get(key)
        if b is not None:
            return b
        B, dev = self.batch_size, self.device
        parents = torch.zeros(B, n, dtype=torch.long, device=dev)
        parents[:, 0] = -1
        valid = torch.zeros(B, n, dtype=torch.bool, device=dev)
        valid[:, 0] = True
        packed = torch.stack([torch.zeros_like(parents), parents, valid.long()], 1)  # [B, 3, n]
        b = _Bucket(
            n=n, root_only=root_only,
            tokens=torch.zeros(B, n, dtype=torch.long, device=dev), parents=parents, valid=valid,
            path=torch.zeros(B, n, dtype=torch.long, device=dev),
            path_len=torch.zeros(B, dtype=torch.long, device=dev),
            bonus=torch.zeros(B, dtype=torch.long, device=dev),
            host=torch.zeros(B, 1 + n, dtype=torch.long, device=dev),
            packed=packed,
            staged=packed.cpu().pin_memory() if dev.type == "cuda" else packed.clone(),
        )
        b.staged_np = b.staged.numpy()
        if self.capture and not root_only:  # (the one-token step is read back by the engine itself: it runs ahead)
            b.host_out = torch.zeros(B, 1 + n, dtype=torch.long, pin_memory=True)
        if self.capture:
            self._capture(b)
        self._buckets[key] = b
        return b

    @torch.inference_mode()
    def _capture(self, b: _Bucket) -> None:
        """Warm up (Triton JIT, allocator) on a side stream, then capture; all rows inactive."""
        import time

        t0 = time.perf_counter()
        saved = self._active_host
        self.active.fill_(False)  # side-effect free: nothing is committed or appended
        try:
            s = torch.cuda.Stream(self.device)
            s.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._run(b)
            torch.cuda.current_stream(self.device).wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                self._run(b)
            b.graph = g
        finally:
            self.active.copy_(torch.tensor(saved, dtype=torch.bool))
        torch.cuda.synchronize(self.device)
        self.stats.captures[b.n if not b.root_only else 0] = time.perf_counter() - t0

    # ------------------------------------------------------------------ benchmarks
    def time_bucket(self, n: int, prefix_len: int, iters: int = 20) -> float:
        """Seconds per replay of the bucket-``n`` verify graph at committed length ``prefix_len``
        (all rows inactive, so nothing changes between replays). For benchmarks."""
        b = self._bucket(n, root_only=False)
        saved_len = self.cache.lengths.clone()
        saved = self._active_host
        self.set_active([False] * self.batch_size)
        self.cache.lengths.fill_(int(prefix_len))
        run = b.graph.replay if b.graph is not None else (lambda: self._run(b))
        for _ in range(3):
            run()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                run()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3 / iters
        else:
            import time

            t0 = time.perf_counter()
            for _ in range(iters):
                run()
            dt = (time.perf_counter() - t0) / iters
        self.cache.lengths.copy_(saved_len)
        self.set_active(list(saved))
        return dt


def _call_model(model, **kwargs):
    return model(**kwargs)


_COMPILED: dict = {}
PDL_MODES = ("all", "one_token")


def pdl_mode(compile, device: torch.device) -> str | None:
    """Which captured steps launch their kernels with programmatic dependent launch: ``"all"``,
    ``"one_token"`` or ``None``, from ``generate(compile=...)``.

    With Inductor (``True``, ``"inductor"`` or a dict of options) on an sm90+ GPU: every step unless
    the dict's ``"pdl"`` says otherwise (``True`` / ``"all"``: every step; ``"one_token"``: the
    one-token step only; ``False`` / ``None``: off). Other backends and older GPUs: off (a dict
    asking for it on a GPU without PDL raises). Unknown values raise."""
    inductor = compile is True or compile == "inductor" or isinstance(compile, Mapping)
    if not compile or not inductor:
        return None
    asked = compile.get("pdl", "default") if isinstance(compile, Mapping) else "default"
    if asked not in (True, False, None, "default") + PDL_MODES:
        raise ValueError(f'compile={{"pdl": ...}} takes True, False, "all" or "one_token", got {asked!r}')
    if asked in (False, None):
        return None
    sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    if not sm90:
        if asked != "default":
            raise ValueError("programmatic dependent launch (compile={'pdl': ...}) needs an sm90+ CUDA device")
        return None
    return "one_token" if asked == "one_token" else "all"


def compiled_forward(compile, fn: Callable | None = None) -> Callable:
    """``torch.compile`` of ``model(**kwargs)`` (or of ``fn``: the runner's whole step, see
    ``compile_step`` below).

    ``compile``: ``True`` (Inductor), a backend name or callable, or a dict of Inductor options
    (``torch.compile(options=...)``, e.g. ``{"freezing": True}``: the weights become constants and
    Inductor's freezing passes concatenate linears that share an input, such as an MLP's gate and
    up projections, into one GEMM; the concatenated copies are extra device memory).

    With Inductor, linears that share an input and run through the GEMM picker are grouped into one
    launch where that is faster (:data:`specdec.gemm_pick.GROUP_PASS`); the option
    ``{"group_linears": False}`` turns that off. A one-row SwiGLU MLP's ``silu(gate(h)) * up(h)``
    runs as one GEMV launch storing only the product where that is faster
    (:func:`specdec.gemm_pick.fuse_swiglu`); ``{"fuse_swiglu": False}`` turns that off. With Inductor the runner compiles its whole device
    step (verify forward, acceptance, commit, append: :func:`specdec.generate.verify_step`) as one
    graph, so the step's ~90 small bookkeeping kernels are fused too (H200, 8B: verify(1) 4.437 ->
    4.276 ms); ``{"compile_step": False}`` compiles the forward alone, and so does ``freezing`` (the
    whole step with frozen weights failed the CUDA equality test). Other backends compile the
    forward alone. ``{"pdl": True}``: Inductor's ``triton.enable_pdl`` with every kernel waiting
    first (:func:`_inductor_pdl_wait_first`); the runner asks for it per step as
    :func:`pdl_mode` says (every step by default on sm90+; ``docs/gpu.md``).

    One compiled function per setting, shared by every model: dynamo keeps one entry per (model,
    input shapes), so the recompile limit is raised to hold the buckets of a few models.
    """
    if isinstance(compile, Mapping):
        options = {str(k): v for k, v in compile.items()}
        key = ("inductor", tuple(sorted((k, repr(v)) for k, v in options.items())))
    elif compile is True or compile == "inductor":
        options, key = {}, "inductor"
    else:
        options, key = None, compile
    target_fn = fn or _call_model
    key = (target_fn, key)
    fn = _COMPILED.get(key)
    if fn is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
        if options is None:
            fn = torch.compile(target_fn, backend=key[1], fullgraph=True)
        else:
            options.pop("compile_step", None)  # (read by the runner)
            if options.pop("pdl", False):
                # programmatic dependent launch for Inductor's kernels and the specdec GEMVs (sm90+)
                _inductor_pdl_wait_first()
                options["triton.enable_pdl"] = True  # (the specdec kernels: the runner's pdl.on())
            group, swiglu = options.pop("group_linears", True), options.pop("fuse_swiglu", True)
            if group or swiglu:
                from .gemm_pick import GROUP_PASS, LinearPass

                options.setdefault("post_grad_custom_pre_pass",
                                   GROUP_PASS if group and swiglu else LinearPass(bool(group), bool(swiglu)))
            fn = torch.compile(target_fn, backend="inductor", options=options or None, fullgraph=True)
            if options.get("freezing"):
                fn = _traced_with_freezing(fn)
        _COMPILED[key] = fn
    return fn


def _inductor_pdl_wait_first() -> None:
    """Make every Inductor kernel launched with PDL wait for the previous grid before its first
    access (``gdc_wait`` as the body's first statement).

    Why: Inductor (``triton.enable_pdl``) waits before a load only when the scheduler's previous
    node wrote the loaded buffer; otherwise the load comes first and the wait after it. After an
    opaque custom op with several outputs (``specdec::linear_group``: q, k, v) the previous node is
    the last output alone, so a kernel reading q loaded it while the GEMV could still be writing it
    (H200, 8B: AR tokens changed). Waiting first keeps what PDL is for here, launching the next
    kernel while the previous one drains, and makes every PDL kernel complete only after its
    predecessor, so the chain of kernels stays ordered.
    """
    from torch._inductor.codegen.triton import TritonKernel

    if getattr(TritonKernel, "_specdec_wait_first", False):
        return
    original = TritonKernel._filter_pdl

    def filter_pdl(self, code):
        original(self, code)
        if self._enable_pdl_codegen():
            lines = [ln for ln in code._lines if not (isinstance(ln, str) and self.GDC_WAIT in ln)]
            code._lines = [self.GDC_WAIT] + lines

    TritonKernel._filter_pdl = filter_pdl
    TritonKernel._specdec_wait_first = True


def _traced_with_freezing(fn: Callable) -> Callable:
    """Inductor's ``freezing`` must also be set while dynamo traces: dynamo then keeps the weights as
    graph attributes that the freezing passes can fold and concatenate; with the option passed to
    the backend alone, they arrive as graph inputs and nothing is frozen (measured: the same GEMV
    kernels as without it)."""

    def call(model, **kwargs):
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return fn(model, **kwargs)

    return call


class _CompiledCall:
    """The target as the verifier sees it, with its call going through the compiled forward."""

    def __init__(self, model, forward: Callable):
        self._model, self._forward = model, forward

    def __call__(self, **kwargs):
        return self._forward(self._model, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def runner_for(target, verifier, step_fn: StepFn, batch_size: int, need_len: int, max_nodes: int,
               buckets: tuple[int, ...] = DEFAULT_BUCKETS, compile=False) -> CUDAGraphRunner:
    """The model's cached runner if it fits this call, else a new one (replacing it).

    ``max_len`` is rounded up to a multiple of 512 so prompts of similar length share the graphs.
    """
    r = _RUNNERS.get(target)
    if r is not None and r.fits(target, verifier, batch_size, need_len, max_nodes, compile):
        return r
    _RUNNERS.pop(target, None)
    del r
    max_bucket = max(buckets)
    max_len = _round_up(need_len + max_bucket + 2, 512)
    r = CUDAGraphRunner(target, verifier, step_fn, batch_size, max_len, buckets=buckets, capture=True, compile=compile)
    _RUNNERS[target] = r
    return r
