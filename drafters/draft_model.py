"""A separate draft model (any HF causal LM with the target's tokenizer).

Classic speculative decoding (Leviathan et al., 2023, https://arxiv.org/abs/2211.17192; Chen et
al., 2023, https://arxiv.org/abs/2302.01318) with chain drafts, or token trees grown level by level
(SpecInfer, https://arxiv.org/abs/2305.09781; EAGLE-2's confidence-ranked expansion,
https://arxiv.org/abs/2406.16858, for greedy decoding).

The draft keeps its own :class:`~specdec.StaticTreeCache`. ``prefill`` runs the prompt through
the draft as one chain (its K/V committed in the draft cache). Each ``propose``:
  1. catch-up: one forward of the tokens committed since the last call (accepted drafts + bonus,
     the root last) as a chain; they are committed in the draft cache;
  2. expand: ``depth - 1`` more forwards, one per tree level, each over that level's frontier with
     the tree mask, writing to scratch slots that the next catch-up overwrites.

CUDA graphs (``cuda_graphs``, default on when the draft model is on CUDA; :mod:`specdec.draft_graphs`):
with a greedy target, every propose (its catch-up chain is at most ``depth + 1`` tokens long, the
prompt having been caught up in ``prefill``) is ONE graph replay per chain length ``n``: catch-up
forward + the ``depth - 1`` level forwards + the tree growing, all over a fixed view of every draft-cache slot
(masked on the device). The draft cache then has ``max_len`` rounded up to 512 and is kept across
``generate`` calls that fit, so the graphs are reused; a new cache drops them. Sampling targets run
the eager path.

Greedy target: children are the draft's top-``branching`` tokens and the frontier keeps the
``width`` most probable paths. Sampling target: children are drawn from the draft distribution
without replacement (Gumbel-top-k), and each child records the renormalised remainder it was drawn
from, so recursive rejection sampling stays lossless; the frontier keeps the first-drawn children
(a choice that does not look at the drawn values, which would bias them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from specdec.acceptance import target_probs
from specdec.attention import sdpa_tree_attention
from specdec.cache import StaticTreeCache
from specdec.draft_graphs import DraftGraphs, graph_mode, round_up
from specdec.forward import causal_chain_mask, tree_forward
from specdec.generate import SpecDecInputError
from specdec.state import AcceptResult, DecodeState
from specdec.tree import TokenTree

__all__ = ["DraftModel", "check_same_vocab", "grow_tree"]


def _vocab(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return cfg.vocab_size


def check_same_vocab(draft, target, draft_tokenizer=None, target_tokenizer=None) -> None:
    """Raise :class:`~specdec.SpecDecInputError` unless draft and target share a vocabulary."""
    vd, vt = _vocab(draft), _vocab(target)
    if vd != vt:
        raise SpecDecInputError(f"draft vocabulary ({vd}) differs from the target's ({vt}): they must share a tokenizer")
    if draft_tokenizer is not None and target_tokenizer is not None:
        if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
            raise SpecDecInputError("draft and target tokenizers map tokens to different ids")


class DraftModel:
    """Draft with a smaller (or the same) HF model.

    Args:
        model: HF causal LM sharing the target's tokenizer.
        depth: draft levels per step (chain length for ``branching=1``).
        branching: children per expanded node (1 = chain).
        width: frontier nodes kept per level (default ``branching``).
        tokenizer, target_tokenizer: optional, to check the two tokenizers agree id for id.
        backend: attention backend for the draft's forwards; default (None): the default verifier's
            for the draft model's device (the Triton tree kernel on CUDA, SDPA elsewhere).
        cuda_graphs: replay each greedy draft step as a CUDA graph (:mod:`specdec.draft_graphs`).
            ``None`` (default): on when the draft model is on CUDA (a failed capture warns once and
            drafts eagerly); ``True``: required (CUDA only; a failed capture raises); ``False``: the
            eager path; ``"static"``: the graphs' fixed-view static-buffer path run eagerly (any
            device; what CPU tests check against the eager path).
    """

    def __init__(self, model, depth: int = 4, branching: int = 1, width: int | None = None, tokenizer=None,
                 target_tokenizer=None, backend=None, cuda_graphs: bool | str | None = None):
        if depth < 1 or branching < 1:
            raise ValueError("depth and branching must be >= 1")
        self.model = model
        self.depth = depth
        self.branching = branching
        self.width = width if width is not None else branching
        self.tokenizer = tokenizer
        self.target_tokenizer = target_tokenizer
        self.backend = backend
        self._backend = backend or sdpa_tree_attention  # resolved per device in prefill when None
        self.cache: StaticTreeCache | None = None
        self._host_len: list[int] = []
        if not (cuda_graphs is None or isinstance(cuda_graphs, bool) or cuda_graphs == "static"):
            raise ValueError(f"cuda_graphs must be None, True, False or 'static', got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.graphs: DraftGraphs | None = None  # per-shape graphs over the current draft cache
        self._g_in: Tensor | None = None  # [3, B] int64 static inputs: chain start, chain length, commit

    def __repr__(self) -> str:
        return f"DraftModel(depth={self.depth}, branching={self.branching}, width={self.width})"

    # ------------------------------------------------------------------ Drafter API
    def check(self, target) -> None:
        check_same_vocab(self.model, target, self.tokenizer, self.target_tokenizer)

    def prefill(self, state: DecodeState) -> None:
        self.check(state.target)
        p = next(self.model.parameters())
        B, need = state.batch_size, state.max_total_len + 1
        if self.backend is None:
            from specdec.generate import default_verifier

            self._backend = default_verifier(p.device).backend
        mode = graph_mode(self.cuda_graphs, p.device)
        if mode == "eager":
            self.cache = StaticTreeCache(self.model.config, B, need, p.dtype, state.device)
            self.graphs = None
        else:  # keep the cache (and the graphs over it) across calls that fit
            c = self.cache
            if (c is None or self.graphs is None or c.batch_size != B or c.max_len < need or c.dtype != p.dtype
                    or c.device != state.device):
                self.cache = StaticTreeCache(self.model.config, B, round_up(need), p.dtype, state.device)
                self.graphs = DraftGraphs(capture=mode == "capture", strict=self.cuda_graphs is True)
                self._g_in = torch.zeros(3, B, dtype=torch.long, device=state.device)
            else:
                self.cache.reset()
        self._host_len = [0] * B
        self._catch_up_prompt(state)

    def _catch_up_prompt(self, state: DecodeState) -> None:
        """0. The prompt's K/V into the draft cache now (one eager chain forward), so that every
        propose of the call feeds at most ``depth + 1`` tokens: with graphs, every propose is a
        replay (without this, the first one fed the whole prompt eagerly)."""
        B, T = state.batch_size, state.prompt_len
        t = torch.full((B,), T, dtype=torch.long, device=state.device)  # [B]
        self._catch_up(state, t - T, t, t, T, T)
        self._host_len = [T] * B

    def observe(self, state: DecodeState, accepted: AcceptResult) -> None:
        pass  # the next catch-up forward feeds what was committed

    def propose(self, state: DecodeState, budget: int) -> TokenTree:
        B = state.batch_size
        dev = state.device
        roots = state.roots
        if budget <= 0:
            return TokenTree.root_only(roots)

        # 1. catch-up: committed tokens the draft has not seen, the root last, as one chain
        # finished rows feed their last token again and commit nothing (their drafts are ignored)
        seq_host = [h if done else len(t) for t, h, done in zip(state.host_tokens, self._host_len, state.done)]
        counts = [max(s - h, 1) for s, h in zip(seq_host, self._host_len)]
        commit = [s - h for s, h in zip(seq_host, self._host_len)]
        n = max(counts)
        # (a row finished before the draft saw anything, e.g. EOS as its first token, has h = 0: clamp)
        starts = [max(h - (c > s - h), 0) for h, c, s in zip(self._host_len, counts, seq_host)]
        if self.graphs is not None and state.sampling.greedy and n <= self.depth + 1:
            return self._propose_graphed(state, budget, n, starts, counts, commit, seq_host)
        start, cnt, com = torch.tensor([starts, counts, commit], device=dev)  # [B] each
        last = self._catch_up(state, start, cnt, com, n, max(self._host_len) + n)  # [B, V]
        self._host_len = seq_host

        # 2. expand level by level; draft node i (> 0) sits at slot cache.lengths + i - 1 (root committed)
        view_base = max(seq_host)
        forward_level = self._level_forward(B, lambda n_draft: view_base + n_draft)

        return grow_tree(
            roots, last, forward_level, depth=self.depth, branching=self.branching, width=self.width,
            budget=budget, sampling=state.sampling, generator=state.generator,
        )

    # ------------------------------------------------------------------ forwards shared by both paths
    def _catch_up(self, state: DecodeState, start: Tensor, cnt: Tensor, com: Tensor, n: int, view_len: int) -> Tensor:
        """One chain forward of ``n`` tokens per row from ``sequences[start]`` (``cnt [B]`` real ones, the
        root last), committing ``com [B]`` of them in the draft cache; returns the logits at each row's
        root ``[B, V]``."""
        B, dev, cache = state.batch_size, state.device, self.cache
        ar = torch.arange(n, device=dev)
        idx = (start.unsqueeze(1) + ar).clamp(max=state.sequences.shape[1] - 1)
        chain = state.sequences.gather(1, idx)  # [B, n] (rows with fewer tokens carry padding at the end)
        out = tree_forward(self.model, cache, chain, causal_chain_mask(B, n, dev), ar.expand(B, n), view_len,
                           self._backend)
        cache.advance(com)
        V = out.logits.shape[-1]
        return out.logits.gather(1, (cnt - 1).view(B, 1, 1).expand(B, 1, V)).squeeze(1)

    def _level_forward(self, B: int, view_len_of: Callable[[int], int]):
        """``forward_level`` for :func:`grow_tree` over the draft cache; ``view_len_of(M)`` gives the key
        slots visible with ``M`` draft nodes (root committed, node i > 0 at slot lengths + i - 1)."""
        cache = self.cache

        def forward_level(tree: TokenTree, new_tok: Tensor, frontier: Tensor) -> Tensor:
            M = tree.num_nodes - 1
            keep = new_tok.shape[1]
            anc = tree.ancestor_mask[:, 1:, 1:]  # [B, M, M] ancestry among draft nodes
            return tree_forward(
                self.model, cache, new_tok, anc.gather(1, (frontier - 1).unsqueeze(-1).expand(B, keep, M)),
                tree.depths[:, 1:] - 1, view_len_of(M), self._backend, query_nodes=frontier - 1,
            ).logits  # [B, keep, V]

        return forward_level

    # ------------------------------------------------------------------ graphed (fixed view) path
    def _propose_graphed(self, state: DecodeState, budget: int, n: int, starts: list[int], counts: list[int],
                         commit: list[int], seq_host: list[int]) -> TokenTree:
        """The same draft step as the eager path, with a fixed view (all ``cache.max_len`` slots,
        masked on the device) and host values passed in through ``_g_in``, replayed as ONE graph
        per catch-up length ``n`` (static mode: run eagerly). Greedy, fixed depth: no host read."""
        B, cache = state.batch_size, self.cache
        seq, seq_lens = state.sequences, state.seq_lens
        g = self.graphs
        g.bind([cache.kv, cache.lengths, seq, seq_lens, self._g_in])
        self._g_in.copy_(torch.tensor([starts, counts, commit], dtype=torch.long), non_blocking=True)  # [3, B]
        view = cache.max_len
        depth, branching, width, sampling = self.depth, self.branching, self.width, state.sampling

        def body() -> tuple[Tensor, Tensor]:
            last = self._catch_up(state, self._g_in[0], self._g_in[1], self._g_in[2], n, view)  # [B, V]
            roots = seq.gather(1, (seq_lens - 1).unsqueeze(1)).squeeze(1)  # [B]
            forward_level = self._level_forward(B, lambda n_draft: view)

            tree = grow_tree(roots, last, forward_level, depth=depth, branching=branching, width=width,
                             budget=budget, sampling=sampling, generator=None)
            return tree.tokens, tree.parents  # [B, N] each

        key = (n, budget, depth, branching, width)
        restore = None
        if g.will_capture(key):  # capture's warm-up runs advance the committed lengths: put them back
            saved = cache.lengths.clone()  # [B]

            def restore() -> None:
                cache.lengths.copy_(saved)

        tok, par = g.run(key, body, restore)
        self._host_len = seq_host
        return TokenTree(tokens=tok, parents=par)  # static buffers: valid until the next propose


def grow_tree(
    roots: Tensor,
    first_logits: Tensor,
    forward_level: Callable[[TokenTree, Tensor, Tensor], Tensor],
    *,
    depth: int,
    branching: int,
    width: int,
    budget: int,
    sampling,
    generator: torch.Generator | None,
    threshold: float | None = None,
) -> TokenTree:
    """Grow a draft tree level by level from a model's next-token logits (shared by model drafters).

    Args:
        roots: ``[B]`` last committed tokens (node 0).
        first_logits: ``[B, V]`` draft logits at the root (predicting depth 1).
        forward_level: ``(tree so far, new_tok [B, n], node ids [B, n]) -> logits [B, n, V]``: runs
            the draft on the newest level (its nodes are the last n of the tree).
        depth: maximum draft levels; branching: children per frontier node; width: frontier kept.
        budget: at most this many draft nodes.
        sampling, generator: the target's sampling config and the random source.
        threshold: dynamic draft length (Draft&Verify, https://arxiv.org/abs/2309.08168; Kangaroo,
            https://arxiv.org/abs/2404.18911): when every row's most probable child on the newest
            level is below ``threshold``, that level is the last one (its forward is already paid
            for; a verify slot is cheap) and no further draft forward runs. Costs one host read
            per level; ``None`` = fixed depth, no host read.
    Returns:
        the :class:`TokenTree` (``draft_probs`` set only for sampling).
    """
    B = roots.shape[0]
    dev = roots.device
    greedy = sampling.greedy
    probs_rows: list[Tensor] = []
    frontier = torch.zeros(B, 1, dtype=torch.long, device=dev)  # node ids
    f_score = torch.zeros(B, 1, device=dev)
    level_logits = first_logits.unsqueeze(1)  # [B, f, V]
    used = 0
    all_tok = roots.view(B, 1).long()
    all_par = torch.full((B, 1), -1, dtype=torch.long, device=dev)
    for d in range(1, depth + 1):
        f = frontier.shape[1]
        k = min(branching, budget - used)
        if k <= 0:
            break
        if greedy:
            logp = torch.log_softmax(level_logits.float(), -1)
            top = torch.topk(logp, k, dim=-1)
            cand_tok, cand_lp = top.indices, top.values  # [B, f, k]
            cand_q = None
            conf = cand_lp.amax((-1, -2)).exp() if threshold is not None else None  # [B]
        else:
            q = target_probs(level_logits, sampling)  # [B, f, V]
            g = -torch.log(-torch.log(torch.rand(q.shape, device=dev, generator=generator).clamp_(1e-20, 1.0)))
            cand_tok = torch.topk(torch.log(q) + g, k, dim=-1).indices  # draws without replacement, in order
            # q_j: q with the earlier draws removed, renormalised
            removed = torch.zeros_like(q)
            qs = []
            for j in range(k):
                rem = q * (1 - removed)
                rem = rem / rem.sum(-1, keepdim=True).clamp(min=1e-30)
                qs.append(rem)
                removed = removed.scatter(-1, cand_tok[..., j : j + 1], 1.0)
            cand_q = torch.stack(qs, 2)  # [B, f, k, V]
            cand_lp = torch.zeros(cand_tok.shape, device=dev)
            conf = q.amax((-1, -2)) if threshold is not None else None  # [B]
        cand_par = frontier.unsqueeze(2).expand(B, f, k)
        score = (f_score.unsqueeze(2) + cand_lp).reshape(B, f * k)
        keep = min(f * k, budget - used, width if d < depth else f * k)
        if greedy and keep < f * k:
            sel = torch.topk(score, keep, dim=-1).indices.sort(-1).values  # keep BFS order
        else:
            sel = torch.arange(keep, device=dev).expand(B, keep)
        new_tok = cand_tok.reshape(B, f * k).gather(1, sel)
        new_par = cand_par.reshape(B, f * k).gather(1, sel)
        new_ids = torch.arange(all_tok.shape[1], all_tok.shape[1] + keep, device=dev).expand(B, keep)
        if cand_q is not None:
            V = cand_q.shape[-1]
            probs_rows.append(cand_q.reshape(B, f * k, V).gather(1, sel.unsqueeze(-1).expand(B, keep, V)))
        all_tok = torch.cat([all_tok, new_tok], 1)
        all_par = torch.cat([all_par, new_par], 1)
        used += keep
        f_score = score.gather(1, sel)
        frontier = new_ids
        if d == depth or used >= budget:
            break
        if conf is not None and not bool((conf >= threshold).any()):  # the one host read per level
            break
        level_logits = forward_level(TokenTree(tokens=all_tok, parents=all_par), new_tok, frontier)
    draft_probs = None
    if probs_rows:
        pr = torch.cat(probs_rows, 1)
        draft_probs = torch.cat([torch.zeros_like(pr[:, :1]), pr], 1)
    return TokenTree(tokens=all_tok, parents=all_par, draft_probs=draft_probs)
