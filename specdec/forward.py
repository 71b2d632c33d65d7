"""One model forward over a (partial) token tree into a StaticTreeCache.

Used by the verifiers (all nodes of the tree), by prefill (the prompt as a chain) and by
model-based drafters (one tree level at a time into their own cache).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .attention import TreeAttentionMeta, bind_model, build_tree_meta
from .cache import StaticTreeCache

__all__ = ["tree_forward", "causal_chain_mask"]


def causal_chain_mask(batch: int, n: int, device) -> Tensor:
    """``[B, n, n]`` lower-triangular ancestor mask of a chain (built directly, no closure)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)


def tree_forward(
    model,
    cache: StaticTreeCache,
    tokens: Tensor,
    tree_mask: Tensor,
    node_depths: Tensor,
    view_len: int,
    backend: Callable,
    query_nodes: Tensor | None = None,
    packed_mask: Tensor | None = None,
    logits_to_keep: int | Tensor = 0,
    model_call: Callable | None = None,
):
    """Run ``model`` on ``n`` tree tokens; their K/V land in slots ``cache.lengths + node``.

    Args:
        model: HF causal LM (bound to the ``"specdec"`` attention on first use).
        cache: the model's :class:`StaticTreeCache`; committed lengths are ``cache.lengths``.
        tokens: ``[B, n]`` query tokens.
        tree_mask: ``[B, n, N]`` bool, query may see tree node j (ancestor-or-self).
        node_depths: ``[B, N]`` depth of each tree node.
        view_len: key slots visible to attention (host int, >= max committed length + N).
        backend: attention backend (e.g. :func:`specdec.attention.sdpa_tree_attention`).
        query_nodes: ``[B, n]`` tree node of each query (default: node i = query i).
        packed_mask: bit-packed ``tree_mask`` for kernels that read it.
        logits_to_keep: passed to HF (0 = all).
        model_call: alternative callable with the HF forward signature (e.g. a truncated model).
    Returns:
        the HF model output (``.logits`` ``[B, n, V]``).
    """
    B, n = tokens.shape
    prefix = cache.lengths
    meta: TreeAttentionMeta = build_tree_meta(prefix, tree_mask, node_depths, query_nodes, view_len, backend, packed_mask)
    q_nodes = query_nodes if query_nodes is not None else torch.arange(n, device=tokens.device).expand(B, n)
    cache.begin_step(prefix.unsqueeze(1) + q_nodes, view_len)
    if model_call is None:
        bind_model(model)
        model_call = model
    # The dense mask goes in as a ready 4D mask (HF returns it as-is, no mask building); the
    # meta travels as a per-call kwarg down to the "specdec" attention function.
    return model_call(
        input_ids=tokens,
        position_ids=meta.query_pos,
        attention_mask=meta.mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        specdec_tree=meta,
    )
