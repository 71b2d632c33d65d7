"""Acceptance: which drafted nodes the target keeps, and the bonus token.

* Greedy (temperature 0): walk from the root; a node survives iff its token equals the target's
  argmax at its parent, and so do all its ancestors; the deepest surviving node ends the path and
  the bonus is the target's argmax there. Fully vectorised over the tree (no loop over nodes).
* Sampling: multi-draft recursive rejection sampling over the children of each node, as in
  SpecInfer (Miao et al., 2023, https://arxiv.org/abs/2305.09781) and Recursive Speculative
  Decoding (Jeon et al., 2024, https://arxiv.org/abs/2402.14160), with the single-draft rule of
  Leviathan et al. (2023, https://arxiv.org/abs/2211.17192) / Chen et al. (2023,
  https://arxiv.org/abs/2302.01318) as the one-child case. Child x drawn from q is accepted with
  probability min(1, p(x) / q(x)); on rejection p <- normalise(max(p - q, 0)) and the next child is
  tried; if all are rejected the bonus is sampled from the residual p. Deterministic drafts use
  q = one-hot(x). Lossless for any q as long as each child was drawn from the q recorded for it
  (given the siblings before it), which is what :class:`~specdec.TokenTree` stores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels.argmax import fast_argmax
from .state import AcceptResult, SamplingConfig
from .tree import TokenTree

__all__ = ["target_probs", "sample_token", "greedy_accept", "sample_accept", "accept"]


def target_probs(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """Logits ``[..., V]`` -> the target's sampling distribution ``[..., V]`` (float32).

    Same order and semantics as HF's warpers: temperature, then top-k, then top-p (nucleus; the
    smallest set whose mass reaches ``top_p``, at least one token kept).
    """
    x = logits.float() / sampling.temperature
    V = x.shape[-1]
    if sampling.top_k is not None and 0 < sampling.top_k < V:
        kth = torch.topk(x, sampling.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1.0 - sampling.top_p)
        remove_sorted[..., -1] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        x = x.masked_fill(remove, float("-inf"))
    return torch.softmax(x, dim=-1)


def sample_token(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row of ``probs`` ``[B, V]`` -> ``[B]``."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _path_from_end(tree: TokenTree, end: Tensor) -> tuple[Tensor, Tensor]:
    """Root-to-``end`` node ids ``[B, N]`` (padded with -1) and their count ``[B]``."""
    B, N = tree.tokens.shape
    anc_row = tree.ancestor_mask.gather(1, end.view(B, 1, 1).expand(B, 1, N)).squeeze(1)  # [B, N]
    depth = tree.depths
    key = torch.where(anc_row, depth, torch.full_like(depth, N + 1))
    order = torch.sort(key, dim=-1, stable=True).indices  # ancestors first, by depth
    path_len = anc_row.sum(-1)
    j = torch.arange(N, device=end.device).expand(B, N)
    path = torch.where(j < path_len.unsqueeze(1), order, torch.full_like(order, -1))
    return path, path_len


def greedy_accept(tree: TokenTree, logits: Tensor) -> AcceptResult:
    """Longest path of drafts that match the target's argmax, plus the bonus token.

    Args:
        tree: the verified tree, ``N`` nodes.
        logits: ``[B, N, V]`` target logits at every node.
    """
    g = fast_argmax(logits)  # [B, N] target's token after each node (= argmax(-1); see kernels/argmax.py)
    par = tree.parents.clamp(min=0)
    correct = (tree.tokens == g.gather(1, par)) & tree.valid_mask  # [B, N]
    correct[:, 0] = True
    ok = ~(tree.ancestor_mask & ~correct.unsqueeze(1)).any(-1)  # every ancestor-or-self correct
    score = torch.where(ok, tree.depths, torch.full_like(tree.depths, -1))
    end = score.argmax(-1)  # [B] deepest surviving node (lowest id on ties)
    path, path_len = _path_from_end(tree, end)
    bonus = g.gather(1, end.unsqueeze(1)).squeeze(1)
    return AcceptResult(path=path, path_len=path_len, bonus=bonus)


def sample_accept(tree: TokenTree, logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> AcceptResult:
    """Lossless stochastic acceptance over a tree (see module docstring).

    The loops run over tree depth and over the children of one node (both bounded by the tree's
    shape), each iteration vectorised over the batch; never over tokens of the vocabulary.
    """
    B, N = tree.tokens.shape
    dev = tree.tokens.device
    p_all = target_probs(logits, sampling)  # [B, N, V]
    V = p_all.shape[-1]
    rows = torch.arange(B, device=dev)
    is_real = tree.valid_mask.clone()
    is_real[:, 0] = False  # the root is nobody's child
    max_children = int(tree.children_count.max()) if N > 1 else 0

    cur = torch.zeros(B, dtype=torch.long, device=dev)  # current node
    alive = torch.ones(B, dtype=torch.bool, device=dev)  # still walking down
    p = p_all[rows, cur]  # [B, V] residual target distribution at cur
    for _ in range(N):
        children = is_real & (tree.parents == cur.unsqueeze(1))  # [B, N]
        rank = children.long().cumsum(-1) - 1
        chosen = torch.full((B,), -1, dtype=torch.long, device=dev)
        for r in range(max_children):
            sel = children & (rank == r)
            has = sel.any(-1) & alive & (chosen < 0)
            c = sel.long().argmax(-1)  # [B]
            x = tree.tokens[rows, c]
            if tree.draft_probs is None:
                q = torch.nn.functional.one_hot(x, V).to(p.dtype)
            else:
                q = tree.draft_probs[rows, c].to(p.dtype)
            px = p.gather(1, x.unsqueeze(1)).squeeze(1)
            qx = q.gather(1, x.unsqueeze(1)).squeeze(1)
            u = torch.rand(B, device=dev, generator=generator)
            acc = has & (u * qx < px)
            chosen = torch.where(acc, c, chosen)
            rej = has & ~acc
            resid = (p - q).clamp(min=0)
            z = resid.sum(-1, keepdim=True)
            resid = torch.where(z > 0, resid / z.clamp(min=1e-30), p)
            p = torch.where(rej.unsqueeze(1), resid, p)
        moved = alive & (chosen >= 0)
        cur = torch.where(moved, chosen, cur)
        p = torch.where(moved.unsqueeze(1), p_all[rows, cur], p)
        alive = moved
        if not bool(alive.any()):
            break
    bonus = sample_token(p, generator)
    path, path_len = _path_from_end(tree, cur)
    return AcceptResult(path=path, path_len=path_len, bonus=bonus)


def accept(tree: TokenTree, logits: Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> AcceptResult:
    """Greedy or stochastic acceptance, by ``sampling.greedy``."""
    if sampling.greedy:
        return greedy_accept(tree, logits)
    return sample_accept(tree, logits, sampling, generator)
