"""Token trees: what every drafter proposes and every verifier checks.

Glossary (used across the package)
----------------------------------
root       node 0 of every tree: the last committed token. Its K/V is *not* in the cache yet;
           the verify pass computes it together with the draft nodes (gpt-fast style), so a tree
           with N nodes costs one forward of N query tokens.
draft node any node i > 0: a proposed token whose parent is ``parents[i]``.
depth      distance from the root (root = 0). Position id of node i = prefix_len + depth[i].
path       the accepted nodes, root first: ``[0, a1, a2, ...]``; committed tokens of a step are
           ``tokens[a1], tokens[a2], ...`` followed by the bonus token (target's own choice).

Nodes are in BFS-compatible order: ``parents[:, i] < i`` and ``parents[:, 0] == -1``.
Trees of a batch share N; a row that needs fewer nodes pads with ``pad`` nodes (see
:meth:`TokenTree.pad_to`), which hang off the root and are never accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class cached_property:  # noqa: N801 (functools.cached_property without its lock, as in Python 3.12)
    """Computed on first access, then stored in the instance: Python 3.11's functools version takes a
    lock that torch.compile cannot trace through (a compiled decode step reads these masks)."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value

__all__ = ["TokenTree", "pack_bits"]


def pack_bits(mask: Tensor) -> Tensor:
    """``[..., N]`` bool -> ``[..., ceil(N / 64)]`` int64 bitset: bit (j % 64) of word j // 64.

    Bit 63 lands on the int64 sign bit (two's complement), which is what the kernels read.
    """
    N = mask.shape[-1]
    W = (N + 63) // 64
    if W * 64 != N:
        mask = torch.nn.functional.pad(mask, (0, W * 64 - N))
    bits = mask.reshape(*mask.shape[:-1], W, 64).long()
    weights = torch.ones(64, dtype=torch.long, device=mask.device) << torch.arange(64, device=mask.device)
    return (bits * weights).sum(-1)


@dataclass(frozen=True, eq=False)
class TokenTree:
    """A batch of token trees, node 0 = root = last committed token.

    Attributes:
        tokens: ``[B, N]`` int64 token ids.
        parents: ``[B, N]`` int64 parent node index, ``-1`` for the root, ``parents[i] < i``.
        draft_probs: ``[B, N, V]`` float or ``None``. Row i is the distribution node i was drawn
            from *given its parent and the siblings drawn before it* (for sampling without
            replacement this is the renormalised remainder). ``None`` means every node is a
            deterministic draft (q = one-hot), as n-gram drafts and greedy top-k drafts are.
            Only used by stochastic acceptance.
        valid: ``[B, N]`` bool or ``None``; ``False`` marks padding nodes that must never be accepted.
    """

    tokens: Tensor  # [B, N]
    parents: Tensor  # [B, N]
    draft_probs: Tensor | None = None  # [B, N, V]
    valid: Tensor | None = None  # [B, N]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def root_only(root_tokens: Tensor) -> "TokenTree":
        """The trivial tree (plain autoregressive step): just the root. ``root_tokens``: ``[B]``."""
        tokens = root_tokens.reshape(-1, 1).long()
        return TokenTree(tokens=tokens, parents=torch.full_like(tokens, -1))

    @staticmethod
    def chain(root_tokens: Tensor, draft: Tensor, draft_probs: Tensor | None = None) -> "TokenTree":
        """A chain root -> d1 -> d2 -> ...

        Args:
            root_tokens: ``[B]`` last committed tokens.
            draft: ``[B, K]`` proposed continuation.
            draft_probs: ``[B, K, V]`` distributions the drafts were sampled from, or ``None``.
        """
        B, K = draft.shape
        tokens = torch.cat([root_tokens.reshape(B, 1), draft], dim=1).long()  # [B, K+1]
        parents = torch.arange(-1, K, device=draft.device).expand(B, K + 1).contiguous()
        probs = None
        if draft_probs is not None:
            root_row = torch.zeros_like(draft_probs[:, :1])
            probs = torch.cat([root_row, draft_probs], dim=1)  # [B, K+1, V]
        return TokenTree(tokens=tokens, parents=parents, draft_probs=probs)

    @staticmethod
    def from_paths(root_tokens: Tensor, paths: list[list[list[int]]], max_nodes: int | None = None) -> "TokenTree":
        """Build a (deterministic) tree from root-to-leaf token paths, merging shared prefixes.

        Args:
            root_tokens: ``[B]``.
            paths: per batch row, a list of token paths (each a list of token ids, root excluded).
                Earlier paths get lower node ids (so rank paths best first).
            max_nodes: pad every row to this many nodes (default: the largest row).
        """
        B = root_tokens.shape[0]
        rows_tok: list[list[int]] = []
        rows_par: list[list[int]] = []
        for b in range(B):
            # Build a trie, then lay it out level by level (BFS) so parents[i] < i.
            children: list[dict[int, int]] = [{}]
            tok = [int(root_tokens[b])]
            for path in paths[b] if b < len(paths) else []:
                node = 0
                for t in path:
                    nxt = children[node].get(int(t))
                    if nxt is None:
                        nxt = len(tok)
                        tok.append(int(t))
                        children.append({})
                        children[node][int(t)] = nxt
                    node = nxt
            order, par_of, frontier = [0], {0: -1}, [0]
            while frontier:
                nxt_frontier = []
                for u in frontier:
                    for v in children[u].values():
                        par_of[v] = u
                        order.append(v)
                        nxt_frontier.append(v)
                frontier = nxt_frontier
            new_id = {old: i for i, old in enumerate(order)}
            rows_tok.append([tok[o] for o in order])
            rows_par.append([-1 if par_of[o] < 0 else new_id[par_of[o]] for o in order])
        n = max(len(r) for r in rows_tok)
        if max_nodes is not None:
            if n > max_nodes:
                raise ValueError(f"paths need {n} nodes, more than max_nodes={max_nodes}")
            n = max_nodes
        return TokenTree._from_rows(rows_tok, rows_par, n, root_tokens.device)

    @staticmethod
    def _from_rows(rows_tok: list[list[int]], rows_par: list[list[int]], n: int, device) -> "TokenTree":
        """A tree from host lists (rows shorter than ``n`` are padded with invalid nodes off the
        root). Built with one ``torch.tensor`` per field; copied to ``device`` unless it is the CPU
        (the CUDA-graph runner stages host trees itself, in one copy: see ``DecodeState.tree_device``)."""
        B = len(rows_tok)
        lens = [len(r) for r in rows_tok]
        needs_pad = any(k != n for k in lens)
        both = torch.tensor([[r + [0] * (n - len(r)) for r in rows_tok],
                             [[-1] + list(r[1:]) + [0] * (n - len(r)) for r in rows_par]], dtype=torch.long)  # [2, B, n]
        tokens, parents = both[0], both[1]  # [B, n] each (contiguous views: one tensor built, not two)
        valid = None
        if needs_pad:
            valid = torch.tensor([[True] * k + [False] * (n - k) for k in lens], dtype=torch.bool)  # [B, n]
        return TokenTree(tokens=tokens, parents=parents, valid=valid).to(device)

    def pad_to(self, n: int) -> "TokenTree":
        """Pad to ``n`` nodes with invalid nodes hanging off the root (for fixed-size buckets)."""
        B, N = self.tokens.shape
        if n == N:
            return self
        if n < N:
            raise ValueError(f"cannot pad a tree of {N} nodes down to {n}")
        extra = n - N
        tokens = torch.cat([self.tokens, self.tokens[:, :1].expand(B, extra)], 1)
        parents = torch.cat([self.parents, torch.zeros(B, extra, dtype=self.parents.dtype, device=self.parents.device)], 1)
        valid = self.valid_mask
        valid = torch.cat([valid, torch.zeros(B, extra, dtype=torch.bool, device=valid.device)], 1)
        probs = None
        if self.draft_probs is not None:
            probs = torch.cat([self.draft_probs, self.draft_probs.new_zeros(B, extra, self.draft_probs.shape[-1])], 1)
        return TokenTree(tokens=tokens, parents=parents, draft_probs=probs, valid=valid)

    # ------------------------------------------------------------------ derived (computed once)
    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @cached_property
    def valid_mask(self) -> Tensor:
        """``[B, N]`` bool, True for real nodes."""
        if self.valid is not None:
            return self.valid
        return torch.ones_like(self.tokens, dtype=torch.bool)

    @cached_property
    def ancestor_mask(self) -> Tensor:
        """``[B, N, N]`` bool: ``m[b, i, j]`` iff j is i or an ancestor of i (root included).

        Transitive closure of the parent relation by repeated squaring: log2(N) batched matmuls,
        no Python loop over nodes.
        """
        B, N = self.tokens.shape
        dev = self.tokens.device
        eye = torch.eye(N, dtype=torch.bool, device=dev).expand(B, N, N)
        step = torch.zeros(B, N, N, dtype=torch.float32, device=dev)
        par = self.parents.clamp(min=0)
        step.scatter_(2, par.unsqueeze(-1), 1.0)
        step[:, 0, 0] = 0.0
        m = (step > 0) | eye
        hops = 1
        while hops < N:
            mf = m.float()
            m = torch.bmm(mf, mf) > 0
            hops *= 2
        return m

    @cached_property
    def depths(self) -> Tensor:
        """``[B, N]`` int64, root = 0."""
        return self.ancestor_mask.sum(-1) - 1

    def position_ids(self, prefix_lens: Tensor) -> Tensor:
        """``[B, N]``: ``prefix_len[b] + depth[b, i]`` (the root sits at the first free position)."""
        return prefix_lens.reshape(-1, 1) + self.depths

    @cached_property
    def packed_ancestor_mask(self) -> Tensor:
        """``[B, N, W]`` int64 with W = ceil(N / 64): bit (j % 64) of word j // 64 of row i is set
        iff j is i or an ancestor of i. This is the form the Triton kernel reads."""
        return pack_bits(self.ancestor_mask)

    @cached_property
    def children_count(self) -> Tensor:
        """``[B, N]`` number of (valid) children per node."""
        B, N = self.tokens.shape
        cnt = torch.zeros(B, N, dtype=torch.long, device=self.tokens.device)
        src = self.valid_mask[:, 1:].long()
        cnt.scatter_add_(1, self.parents[:, 1:].clamp(min=0), src)
        return cnt

    def leaf_paths(self) -> list[list[list[int]]]:
        """Per row, the node-id paths root -> leaf (host lists; for inspection and tests)."""
        anc = self.ancestor_mask.cpu()
        cnt = self.children_count.cpu()
        valid = self.valid_mask.cpu()
        depth = self.depths.cpu()
        out = []
        for b in range(self.batch_size):
            rows = []
            for i in range(self.num_nodes):
                if valid[b, i] and cnt[b, i] == 0:
                    nodes = anc[b, i].nonzero().flatten().tolist()
                    rows.append(sorted(nodes, key=lambda j: int(depth[b, j])))
            out.append(rows)
        return out

    def to(self, device) -> "TokenTree":
        """This tree on ``device`` (itself when it is already there)."""
        d = torch.device(device)
        if self.tokens.device.type == d.type and d.index in (None, self.tokens.device.index):
            return self
        return TokenTree(
            tokens=self.tokens.to(device),
            parents=self.parents.to(device),
            draft_probs=None if self.draft_probs is None else self.draft_probs.to(device),
            valid=None if self.valid is None else self.valid.to(device),
        )
