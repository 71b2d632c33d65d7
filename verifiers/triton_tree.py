"""Triton tree verifier: the SDPA verifier's forward with a fused tree-attention kernel.

Same single target forward as :class:`verifiers.SDPAVerifier` (and the same transformers
attention-interface plumbing); only the attention backend differs: it reads the tree's
bit-packed ancestor mask (``TokenTree.packed_ancestor_mask``, ``[B, N, ceil(N/64)]`` int64) and
never the dense ``[B, 1, n, L]`` mask. See :mod:`verifiers.kernels.tree_attention` for the kernel.

Calls the kernel does not cover go to the SDPA reference, per call (so per layer): sliding-window
layers, logit soft-capping, more than 128 tree nodes (e.g. a long prompt's prefill chain),
head_dim > 256, or tensors Triton cannot run on (CPU without the interpreter).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from specdec.attention import TreeAttentionMeta, sdpa_tree_attention
from specdec.tree import pack_bits

from .kernels.tree_attention import MAX_TREE_NODES, tree_attention
from .sdpa import SDPAVerifier

__all__ = ["TritonTreeVerifier", "triton_tree_attention", "pack_tree_mask"]


def pack_tree_mask(tree_mask: Tensor) -> Tensor:
    """``[B, n, N]`` bool -> ``[B, n, ceil(N/64)]`` int64 bitset (see :func:`specdec.tree.pack_bits`)."""
    return pack_bits(tree_mask)


def _triton_can_run(t: Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_tree_attention(module, query, key, value, meta: TreeAttentionMeta, scaling=None, sliding_window=None, softcap=None):
    """Attention backend: query ``[B, Hq, n, D]``, key/value ``[B, Hkv, L_view, D]`` -> ``([B, n, Hq, D], None)``."""
    n_tree = meta.tree_mask.shape[-1]
    D = query.shape[-1]
    if (
        sliding_window is not None
        or softcap is not None
        or n_tree > MAX_TREE_NODES
        or D > 256
        or query.shape[1] % key.shape[1]
        or not _triton_can_run(query)
    ):
        return sdpa_tree_attention(module, query, key, value, meta, scaling=scaling, sliding_window=sliding_window, softcap=softcap)
    packed = meta.packed_mask
    if packed is None:  # e.g. prefill's causal chain: pack once here (N <= 128 bits per row)
        packed = pack_tree_mask(meta.tree_mask)
        meta.packed_mask = packed  # shared by every layer of this forward
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():  # torch.compile: one opaque op in the traced graph
        return torch.ops.specdec.tree_attention(query, key, value, meta.prefix_lens, packed, n_tree, scale), None
    return tree_attention(query, key, value, meta.prefix_lens, packed, n_tree, scaling=scale), None


# The kernel as a PyTorch custom op, so that ``torch.compile`` (``generate(..., compile=True)``)
# traces a whole target forward with the kernel in it as one opaque node instead of breaking the
# graph at every layer. Eager calls bypass the op (no dispatcher overhead).
@torch.library.custom_op("specdec::tree_attention", mutates_args=())
def _tree_attention_op(q: Tensor, k: Tensor, v: Tensor, prefix_lens: Tensor, packed_mask: Tensor,
                       n_tree: int, scale: float) -> Tensor:
    return tree_attention(q, k, v, prefix_lens, packed_mask, n_tree, scaling=scale)


@_tree_attention_op.register_fake
def _(q, k, v, prefix_lens, packed_mask, n_tree, scale):
    B, Hq, n, D = q.shape
    return q.new_empty(B, n, Hq, D)  # [B, n, Hq, D]


class TritonTreeVerifier(SDPAVerifier):
    """ONE target forward over all N tree nodes, attention by the Triton tree kernel.

    Drop-in for :class:`~verifiers.SDPAVerifier` (same call, same logits up to float rounding);
    ``generate(verifier=None)`` picks it on CUDA.
    """

    name = "triton"
    backend = staticmethod(triton_tree_attention)
    uses_packed_mask = True
