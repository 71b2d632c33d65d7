"""``generate()``: lossless speculative decoding with one-pass tree verification.

The loop (one screen, gpt-fast style)::

    prefill(target, prompt) -> first token          # TTFT
    repeat until EOS / stop / max_new_tokens:
        1. tree   = drafter.propose(state, budget)  # TokenTree, node 0 = last committed token
        2. logits = verifier(target, tree, cache)   # ONE forward over the whole tree
        3. res    = accept(tree, logits, sampling)  # accepted path + bonus token
        4. cache.commit(res.path)                   # accepted K/V -> contiguous slots
        5. append tokens, check EOS/stop (the one host sync per step), drafter.observe(...)

``drafter=None`` is plain autoregressive decoding through the same engine (trees of one node):
the baseline every benchmark compares against.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .acceptance import accept, sample_token, target_probs
from .cache import StaticTreeCache
from .forward import causal_chain_mask, tree_forward
from .metrics import DepthCounters, GenerateOutput, GenerateStats, StepTimer
from .state import AcceptResult, DecodeState, SamplingConfig
from .tree import TokenTree

__all__ = ["generate", "SpecDecInputError", "StopChecker"]


class SpecDecInputError(ValueError):
    """Bad input to :func:`generate` (raised before any state is touched)."""


def _eos_ids(target, eos_token_id) -> set[int]:
    if eos_token_id is None:
        gc = getattr(target, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


class StopChecker:
    """Finds where AR decoding would have stopped inside a run of newly committed tokens.

    EOS: stop right after the first EOS token. Stop sequences (token-id lists, or strings when a
    tokenizer is given): stop right after the token that completes the first match, exactly as a
    token-by-token check would.
    """

    def __init__(self, eos: set[int], stop=None, tokenizer=None):
        self.eos = eos
        self.token_seqs: list[list[int]] = []
        self.strings: list[str] = []
        self.tokenizer = tokenizer
        for s in stop or []:
            if isinstance(s, str):
                if tokenizer is None:
                    raise SpecDecInputError("string stop sequences need generate(..., tokenizer=...)")
                if not s:
                    raise SpecDecInputError("empty stop string")
                self.strings.append(s)
            else:
                seq = [int(t) for t in s]
                if not seq:
                    raise SpecDecInputError("empty stop token sequence")
                self.token_seqs.append(seq)
        # every token decodes to >= 1 character, so a stop string of c characters spans <= c tokens
        self._window = max((len(s) for s in self.strings), default=0) + 8

    def cut(self, generated: list[int], n_new: int) -> int | None:
        """``generated`` ends with ``n_new`` fresh tokens; return how many of them to keep if
        decoding must stop inside them, else None."""
        start = len(generated) - n_new
        for i in range(start, len(generated)):
            tok = generated[i]
            if tok in self.eos:
                return i - start + 1
            for seq in self.token_seqs:
                k = len(seq)
                if i + 1 >= k and generated[i + 1 - k : i + 1] == seq:
                    return i - start + 1
            if self.strings:
                # a match that ends at token i lies in the last few tokens: decode a window, not the whole text
                lo = max(0, i + 1 - self._window)
                text = self.tokenizer.decode(generated[lo : i + 1])
                prev = self.tokenizer.decode(generated[lo:i]) if i > lo else ""
                for s in self.strings:
                    if s in text and s not in prev:
                        return i - start + 1
        return None


def _validate(target, input_ids, max_new_tokens, budget) -> Tensor:
    if not isinstance(input_ids, Tensor):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise SpecDecInputError(f"input_ids must be [B, T] or [T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise SpecDecInputError("empty prompt: input_ids has no tokens")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise SpecDecInputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(budget, int) or budget < 0:
        raise SpecDecInputError(f"budget must be an int >= 0, got {budget!r}")
    cfg = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    vocab = cfg.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise SpecDecInputError(f"input_ids contain ids outside the target vocabulary [0, {vocab})")
    max_pos = getattr(cfg, "max_position_embeddings", None)
    need = input_ids.shape[1] + max_new_tokens
    if max_pos is not None and need > max_pos:
        raise SpecDecInputError(
            f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
            f"model's context length ({max_pos})"
        )
    return input_ids


def default_verifier(device: torch.device):
    """Triton tree attention on CUDA when available, the SDPA reference elsewhere."""
    from verifiers import auto_verifier

    return auto_verifier(device)


def verify_step(
    target,
    verifier,
    tree: TokenTree,
    cache: StaticTreeCache,
    view_len: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    active: Tensor,
    sequences: Tensor,
    seq_lens: Tensor,
    counters: DepthCounters,
) -> tuple[AcceptResult, Tensor]:
    """Steps 2-5a of the loop on the device: verify, accept, commit, append.

    Shared by the eager loop and the CUDA-graph runner (:mod:`specdec.cuda_graph`), which captures
    it once per tree-size bucket. With greedy acceptance it never reads the device from the host.

    Args:
        tree: ``N`` nodes; active: ``[B]`` bool rows still decoding (others commit nothing);
        sequences ``[B, W]`` / seq_lens ``[B]``: the token buffer, appended to in place.
    Returns:
        the acceptance result and ``host`` ``[B, 1 + P]`` = ``[path_len, committed tokens...]``,
        the one tensor the loop reads back.
    """
    B = tree.batch_size
    # 2. verify: ONE forward over the whole tree
    logits = verifier(target, tree, cache, view_len)
    # 3. accept
    res = accept(tree, logits, sampling, generator)
    path_len = torch.where(active, res.path_len, torch.zeros_like(res.path_len))
    # 4. commit accepted K/V (finished rows commit nothing)
    cache.commit(res.path, path_len)
    counters.update(tree.depths, tree.valid_mask, res.path_len, active)
    # 5a. append on device: accepted drafts then the bonus
    P = res.path.shape[1]
    ar = torch.arange(P, device=sequences.device)
    # node after each path entry (sliced after the cat: a [B, P - 1] slice would be [B, 1] for the
    # two-node bucket, and dynamo would compile that bucket for its exact size)
    nxt = torch.cat([res.path, res.path.new_full((B, 1), -1)], 1)[:, 1:]  # [B, P]
    new = tree.tokens.gather(1, nxt.clamp(min=0))  # [B, P]
    new = torch.where(ar.unsqueeze(0) == (res.path_len - 1).unsqueeze(1), res.bonus.unsqueeze(1), new)
    idx = (seq_lens.unsqueeze(1) + ar.unsqueeze(0)).clamp(max=sequences.shape[1] - 1)
    keep = ar.unsqueeze(0) < path_len.unsqueeze(1)
    sequences.scatter_(1, idx, torch.where(keep, new, sequences.gather(1, idx)))
    seq_lens += path_len
    return res, torch.cat([path_len.unsqueeze(1), new], 1)


def _graph_runner(cuda_graphs, target, verifier, sampling, cache, batch, need_len, budget, compile=False):
    """The CUDA-graph runner for this call (:mod:`specdec.cuda_graph`), or None for the eager loop."""
    runner = _pick_runner(cuda_graphs, target, verifier, sampling, cache, batch, need_len, budget, compile)
    if compile and runner is None:
        raise SpecDecInputError(
            "compile=True compiles the target inside the CUDA-graph steps: it needs a CUDA target, greedy "
            "decoding, no caller-provided cache and cuda_graphs not False"
        )
    return runner


def _pick_runner(cuda_graphs, target, verifier, sampling, cache, batch, need_len, budget, compile):
    if cuda_graphs is False:
        return None
    from .cuda_graph import CUDAGraphRunner, runner_for

    if isinstance(cuda_graphs, CUDAGraphRunner):  # caller-managed runner (own buckets, shared buffers)
        if compile and compile != cuda_graphs.compile:
            raise SpecDecInputError("with a caller-managed CUDAGraphRunner, set compile on the runner")
        if not cuda_graphs.fits(target, verifier, batch, need_len, budget + 1):
            raise SpecDecInputError("the given CUDAGraphRunner does not fit this call (model, verifier, batch or length)")
        if not sampling.greedy or cache is not None:
            raise SpecDecInputError("a CUDAGraphRunner needs greedy decoding and no caller-provided cache")
        return cuda_graphs
    device = next(target.parameters()).device
    why_not = (
        "needs a CUDA target" if device.type != "cuda"
        else "needs greedy decoding (sampling acceptance reads the device per depth)" if not sampling.greedy
        else "cannot use a caller-provided cache (the runner owns fixed-address buffers)" if cache is not None
        else None
    )
    if why_not is not None:
        if cuda_graphs:
            raise SpecDecInputError(f"cuda_graphs=True {why_not}")
        return None
    runner = runner_for(target, verifier, verify_step, batch, need_len, budget + 1, compile=compile)
    runner.strict = bool(cuda_graphs)  # None: a failed capture falls back to eager (with a warning)
    return runner


@torch.inference_mode()
def generate(
    target,
    input_ids,
    *,
    drafter=None,
    verifier=None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Sequence[Sequence[int] | str] | None = None,
    generator: torch.Generator | None = None,
    budget: int = 16,
    pad_token_id: int | None = None,
    tokenizer=None,
    cache: StaticTreeCache | None = None,
    on_step: Callable[[DecodeState, AcceptResult], None] | None = None,
    cuda_graphs=None,
    compile=False,
) -> GenerateOutput:
    """Decode ``max_new_tokens`` tokens from ``target``, speculatively when a drafter is given.

    Args:
        target: HF causal LM (any decoder on the transformers attention interface).
        input_ids: ``[B, T]`` (or ``[T]``) prompt ids; rows share T (no padding).
        drafter: a :class:`drafters.Drafter`, or None for plain autoregressive decoding.
        verifier: ``verifiers.SDPAVerifier()`` / ``TritonTreeVerifier()``; None picks by device.
        max_new_tokens: > 0.
        temperature, top_k, top_p: target sampling (temperature 0 = greedy).
        eos_token_id: defaults to ``target.generation_config.eos_token_id`` (as HF).
        stop: stop sequences: token-id lists, or strings (needs ``tokenizer``).
        generator: drives every random draw (drafts and acceptance).
        budget: at most this many draft nodes per tree (root excluded).
        pad_token_id: fills rows that stopped early (default: generation config's pad, else EOS, else 0).
        cache: reuse a preallocated cache (must be large enough); default allocates one per call.
        on_step: callback after each verify step (streaming, logging). No prints in the loop. The
            ``AcceptResult``'s tensors are valid until the next step (clone what you keep). With
            a callback, plain decoding in CUDA graphs no longer runs one step ahead of the host.
        cuda_graphs: replay steps 2-5a as CUDA graphs, one per tree-size bucket
            (:mod:`specdec.cuda_graph`). ``None`` (default): on for CUDA with greedy decoding and no
            ``cache`` passed in; ``True``: required (raises where unsupported); ``False``: eager; or a
            :class:`~specdec.cuda_graph.CUDAGraphRunner` to use (own buckets; ``capture=False`` runs
            the same padded static-buffer steps eagerly, e.g. on CPU).
        compile: ``True`` (or a ``torch.compile`` backend name or callable, or a dict of Inductor
            options such as ``{"freezing": True}``): the target's forward inside the captured steps is
            ``torch.compile``-d (fused norms, rotary, activations; see :mod:`specdec.cuda_graph`).
            Two compilations per model, at the first two buckets' captures (tens of seconds each for
            an 8B model); tokens equal the uncompiled steps' up to float
            rounding of the fused ops. Needs the CUDA-graph runner (CUDA target, greedy, no ``cache``).
            With Inductor on sm90+ every captured step launches its kernels with programmatic
            dependent launch; ``{"pdl": "one_token"}`` keeps it to the one-token step,
            ``{"pdl": False}`` turns it off (``docs/gpu.md``).
    Returns:
        :class:`GenerateOutput` with ``.sequences`` ``[B, T + new]`` and ``.stats``.
    """
    input_ids = _validate(target, input_ids, max_new_tokens, budget)
    sampling = SamplingConfig(float(temperature), top_k, top_p)
    if not sampling.greedy and top_p is not None and not (0.0 < top_p <= 1.0):
        raise SpecDecInputError(f"top_p must be in (0, 1], got {top_p}")
    eos = _eos_ids(target, eos_token_id)
    stopper = StopChecker(eos, stop, tokenizer)
    if drafter is None:
        budget = 0
    elif hasattr(drafter, "check"):
        drafter.check(target)  # e.g. vocabulary mismatch: raise before any state is touched
    device = next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    verifier = verifier if verifier is not None else default_verifier(device)
    max_total = T + max_new_tokens + budget + 2  # scratch for the last tree
    graphs = _graph_runner(cuda_graphs, target, verifier, sampling, cache, B, T + max_new_tokens, budget, compile)
    if graphs is not None:
        cache = graphs.cache  # reset below together with the runner's other buffers
    elif cache is None:
        cache = StaticTreeCache(target.config, B, max_total, dtype, device)
    else:
        if cache.max_len < max_total or cache.batch_size != B:
            raise SpecDecInputError(f"cache holds {cache.batch_size}x{cache.max_len}, need {B}x{max_total}")
        cache.reset()
    if pad_token_id is None:
        gc = getattr(target, "generation_config", None)
        pad_token_id = getattr(gc, "pad_token_id", None) if gc is not None else None
        if pad_token_id is None:
            pad_token_id = min(eos) if eos else 0

    timer = StepTimer(device)
    if graphs is not None:  # fixed-address buffers owned by the runner
        graphs.reset(input_ids, int(pad_token_id))
        sequences, seq_lens, counters = graphs.sequences, graphs.seq_lens, graphs.counters
    else:
        sequences = torch.full((B, max_total + budget + 2), int(pad_token_id), dtype=torch.long, device=device)
        sequences[:, :T] = input_ids
        seq_lens = torch.full((B,), T, dtype=torch.long, device=device)
        counters = DepthCounters(max(budget, 1), device)
    host_tokens = input_ids.tolist()
    state = DecodeState(
        target=target,
        cache=cache,
        sequences=sequences,
        seq_lens=seq_lens,
        host_tokens=host_tokens,
        prompt_len=T,
        sampling=sampling,
        generator=generator,
        max_total_len=max_total,
        done=[False] * B,
        host_trees_to_cpu=graphs is not None and device.type == "cuda",
    )

    # 0. prefill: the prompt as a causal chain, all of it committed; first token from the last logits
    timer.mark("prefill")
    out = tree_forward(
        target,
        cache,
        input_ids,
        causal_chain_mask(B, T, device),
        torch.arange(T, device=device).expand(B, T),
        T,
        verifier.backend,
        logits_to_keep=1,
    )
    cache.advance(T)
    last = out.logits[:, -1]
    first = last.argmax(-1) if sampling.greedy else sample_token(target_probs(last, sampling), generator)
    sequences[:, T] = first
    state.seq_lens += 1
    first_host = first.tolist()
    for b in range(B):
        host_tokens[b].append(first_host[b])
        if stopper.cut(host_tokens[b], 1) is not None or max_new_tokens == 1:
            state.done[b] = True
    # (timer segments are named by the mark that opens them: "prefill" ends here, the drafter's
    # own prefill is timed as "drafter_prefill" and counted as draft time)
    timer.mark("drafter_prefill")
    if drafter is not None and not all(state.done):
        drafter.prefill(state)

    steps = 0
    row_steps = 0  # verify steps summed over the rows that were still decoding
    # Autoregressive steps in CUDA graphs run one step ahead of the host: step k + 1 is queued
    # before step k's tokens are read back, so the device does not wait for the host's EOS / stop
    # checks and the next launch (the idea of vLLM's asynchronous output processing). Each step
    # reads only device state (it gathers its own root), a row that stopped at step k is ignored in
    # step k + 1, and no step is queued past ``max_new_tokens``; an EOS stop wastes one step.
    ahead = drafter is None and graphs is not None and on_step is None
    queued = None  # the step already running ahead, if any
    host_pinned: Tensor | None = None  # [B, 2] read-back of a one-token step
    read = torch.cuda.Event() if ahead and device.type == "cuda" else None  # that copy's completion
    while not all(state.done):
        row_steps += state.done.count(False)
        active_host = [not d for d in state.done]
        # 1. draft
        if not ahead:
            timer.mark("draft")
        if drafter is None:
            tree = None if graphs is not None else TokenTree.root_only(state.roots)  # graph gathers the root itself
        else:
            tree = drafter.propose(state, budget)
            if tree.num_nodes > budget + 1:
                raise RuntimeError(f"{type(drafter).__name__} proposed {tree.num_nodes - 1} draft nodes > budget {budget}")
        # 2.-5a. verify (ONE forward), accept, commit, append on device: see verify_step;
        # one graph replay when captured (tree padded to its bucket), else eager
        step, queued = queued, None
        if step is None:
            timer.mark("verify")
            step = graphs.step(tree, active_host) if graphs is not None else None
        if step is None:
            ahead = False  # (no graph for this step: eager from here on)
            tree = tree.to(device) if tree is not None else TokenTree.root_only(state.roots)
            active = torch.tensor(active_host, device=device)
            view_len = max(len(t) for t in host_tokens) - 1 + tree.num_nodes
            step = verify_step(target, verifier, tree, cache, view_len, sampling, generator, active, sequences,
                               state.seq_lens, counters)
        res, host_t = step  # (with graphs: the runner's static buffers, valid until the next step)
        # 5. the one host sync of the step: accepted length + tokens; EOS/stop on the host
        if ahead:
            if read is not None:  # [B, 2]: copied out asynchronously, read after queueing the next step
                if host_pinned is None:
                    host_pinned = torch.empty(host_t.shape, dtype=host_t.dtype, pin_memory=True)
                host_pinned.copy_(host_t, non_blocking=True)
                read.record()
            else:
                host_pinned = host_t.clone()
            if steps + 2 < max_new_tokens:  # (the first token came from the prefill)
                timer.mark("verify")
                queued = graphs.step(None, active_host)  # overwrites host_t: copied out above
            if read is not None:
                read.synchronize()
            host = host_pinned.tolist()
        else:
            if host_t.device.type != device.type:  # a captured tree step's pinned copy, made by its graph:
                torch.cuda.current_stream(device).synchronize()  # wait for the step, no copy call
            host = host_t.tolist()
        steps += 1
        new_lists: list[list[int]] = []
        for b in range(B):
            if state.done[b]:
                new_lists.append([])
                continue
            n = host[b][0]
            toks = host[b][1 : 1 + n]
            room = max_new_tokens - (len(host_tokens[b]) - T)
            if len(toks) >= room:
                toks = toks[:room]
                state.done[b] = True
            host_tokens[b].extend(toks)
            c = stopper.cut(host_tokens[b], len(toks))
            if c is not None:
                del host_tokens[b][len(host_tokens[b]) - len(toks) + c :]
                toks = toks[:c]
                state.done[b] = True
            new_lists.append(toks)
        res.new_tokens = new_lists
        if drafter is not None:
            drafter.observe(state, res)
        if on_step is not None:
            on_step(state, res)
    timer.mark("end")

    # stats (timings and device counters read once, here)
    tot = timer.totals()
    stats = GenerateStats()
    gen_lens = [len(t) - T for t in host_tokens]
    stats.new_tokens = sum(gen_lens)
    stats.prompt_tokens = B * T
    stats.ttft_s = tot.get("prefill", 0.0)
    stats.total_s = timer.span("prefill", "end")
    timer.release()
    stats.draft_s = tot.get("draft", 0.0) + tot.get("drafter_prefill", 0.0)
    stats.verify_s = tot.get("verify", 0.0)
    stats.verify_steps = steps
    denom = max(max(gen_lens) - 1, 1)
    stats.tpot_s = (stats.total_s - stats.ttft_s) / denom
    drafted, reached, accepted_d = (c[: max(budget, 1) + 1] for c in counters.read())  # runner's are deeper
    stats.drafted_per_depth = drafted[1:]
    stats.accepted_per_depth = accepted_d[1:]
    stats.reached_per_depth = reached[1:]
    stats.alpha_per_depth = [a / r if r else 0.0 for a, r in zip(accepted_d[1:], reached[1:])]
    stats.drafted_tokens = sum(drafted)
    stats.accepted_tokens = sum(accepted_d)
    stats.alpha = stats.accepted_tokens / stats.drafted_tokens if stats.drafted_tokens else 0.0
    committed_in_steps = sum(max(g - 1, 0) for g in gen_lens)
    stats.tau = committed_in_steps / row_steps if row_steps else 0.0
    stats.tokens_per_s = stats.new_tokens / stats.total_s if stats.total_s > 0 else 0.0

    width = T + max(gen_lens)
    out_seq = torch.full((B, width), int(pad_token_id), dtype=torch.long)
    for b in range(B):
        out_seq[b, : len(host_tokens[b])] = torch.tensor(host_tokens[b])
    return GenerateOutput(sequences=out_seq.to(device), stats=stats, new_tokens=[t[T:] for t in host_tokens])
