"""Tree attention through the transformers attention interface.

specdec registers one attention function, ``"specdec"``, in transformers' ``AttentionInterface``
(and the SDPA mask builder under the same name in ``AttentionMaskInterface``). A model is switched
to it once with the public ``model.set_attn_implementation("specdec")`` (see :func:`bind_model`).

* Called **without** specdec's per-call kwarg, the function is plain SDPA attention with HF's
  own masks: ``model.generate`` and ordinary forwards behave exactly as with ``"sdpa"``.
* Called **with** ``specdec_tree=TreeAttentionMeta(...)`` (a per-call kwarg that HF passes
  through ``**kwargs`` down to every attention call), it computes attention of the n new query
  tokens over the committed prefix plus the tree, with the tree mask, and per-layer sliding
  windows (Gemma3, Mistral, Qwen2) applied from the ``sliding_window`` argument HF passes.

The backend that does the work (SDPA reference, Triton kernel) is carried by the meta object,
so verifiers choose it per call; no module attribute and no modeling file is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TreeAttentionMeta", "build_tree_meta", "bind_model", "sdpa_tree_attention", "ATTN_NAME"]

ATTN_NAME = "specdec"


@dataclass
class TreeAttentionMeta:
    """Per-forward description of where the n query tokens sit. Built once per step, shared by all layers.

    Attributes:
        prefix_lens: ``[B]`` committed slots per row (all visible, no mask).
        query_pos: ``[B, n]`` position ids of the queries.
        key_pos: ``[B, L_view]`` position id of every visible key slot (for sliding windows).
        mask: ``[B, 1, n, L_view]`` bool, True = may attend (dense form, SDPA backend).
        tree_mask: ``[B, n, N]`` bool, query vs tree node ancestry (node j sits at slot prefix + j).
        packed_mask: ``[B, n, W]`` int64 bit-packed ``tree_mask`` (Triton backend) or None.
        backend: the attention function ``(module, q, k, v, meta, scaling, sliding_window, softcap)``.
    """

    prefix_lens: Tensor
    query_pos: Tensor
    key_pos: Tensor
    mask: Tensor
    tree_mask: Tensor
    packed_mask: Tensor | None
    backend: Callable

    def window_mask(self, sliding_window: int) -> Tensor:
        """``[B, 1, n, L_view]``: HF semantics, key kept iff ``q_pos - k_pos < sliding_window``."""
        diff = self.query_pos.unsqueeze(-1) - self.key_pos.unsqueeze(1)  # [B, n, L]
        return (diff < sliding_window).unsqueeze(1)


def build_tree_meta(
    prefix_lens: Tensor,
    tree_mask: Tensor,
    node_depths: Tensor,
    query_nodes: Tensor | None,
    view_len: int,
    backend: Callable,
    packed_mask: Tensor | None = None,
) -> TreeAttentionMeta:
    """Build the mask and positions for one forward over (part of) a tree.

    Args:
        prefix_lens: ``[B]`` committed length per row; tree node j sits at slot ``prefix + j``.
        tree_mask: ``[B, n, N]`` bool: query q may see tree node j (ancestor-or-self).
        node_depths: ``[B, N]`` depth of every tree node (root = 0).
        query_nodes: ``[B, n]`` tree node index of each query (None: queries are nodes 0..N-1).
        view_len: number of key slots attention reads (>= max(prefix) + N).
        backend: attention backend (see :class:`TreeAttentionMeta`).
    """
    B, n, N = tree_mask.shape
    dev = tree_mask.device
    s = torch.arange(view_len, device=dev)
    j = s.unsqueeze(0) - prefix_lens.unsqueeze(1)  # [B, L] tree-node index of each slot
    in_prefix = j < 0
    in_tree = (j >= 0) & (j < N)
    jc = j.clamp(0, N - 1)
    tree_part = tree_mask.gather(2, jc.unsqueeze(1).expand(B, n, view_len)) & in_tree.unsqueeze(1)
    mask = (in_prefix.unsqueeze(1) | tree_part).unsqueeze(1)  # [B, 1, n, L]
    key_pos = torch.where(in_prefix, s.unsqueeze(0), prefix_lens.unsqueeze(1) + node_depths.gather(1, jc))
    if query_nodes is None:
        q_depth = node_depths
    else:
        q_depth = node_depths.gather(1, query_nodes)
    query_pos = prefix_lens.unsqueeze(1) + q_depth
    return TreeAttentionMeta(
        prefix_lens=prefix_lens,
        query_pos=query_pos,
        key_pos=key_pos,
        mask=mask,
        tree_mask=tree_mask,
        packed_mask=packed_mask,
        backend=backend,
    )


def sdpa_tree_attention(module, query, key, value, meta: TreeAttentionMeta, scaling=None, sliding_window=None, softcap=None):
    """Reference tree attention with PyTorch SDPA and an explicit boolean mask.

    query ``[B, Hq, n, D]``, key/value ``[B, Hkv, L_view, D]`` -> ``[B, n, Hq, D]``.
    """
    mask = meta.mask
    if sliding_window is not None:
        mask = mask & meta.window_mask(sliding_window)
    hq, hkv = query.shape[1], key.shape[1]
    if softcap is None:
        if hq != hkv:
            key = key.repeat_interleave(hq // hkv, dim=1)
            value = value.repeat_interleave(hq // hkv, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    else:  # logit soft-capping (Gemma2-style): eager math
        if hq != hkv:
            key = key.repeat_interleave(hq // hkv, dim=1)
            value = value.repeat_interleave(hq // hkv, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), None


def _specdec_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, softcap=None, **kwargs):
    meta: TreeAttentionMeta | None = kwargs.pop("specdec_tree", None)
    if meta is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        extra = {} if sliding_window is None else {"sliding_window": sliding_window}
        if softcap is not None:
            extra["softcap"] = softcap
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
    return meta.backend(module, query, key, value, meta, scaling=scaling, sliding_window=sliding_window, softcap=softcap)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _specdec_attention)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    _registered = True


def bind_model(model) -> None:
    """Switch ``model`` to the ``"specdec"`` attention function (idempotent, permanent, public API).

    Without specdec's per-call kwarg the function *is* SDPA, so the model's other uses
    (``model.generate``, training forwards) are unchanged.
    """
    _register()
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
