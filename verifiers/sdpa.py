"""Reference verifier: PyTorch SDPA with an explicit tree mask. Runs on any device."""

from __future__ import annotations

from torch import Tensor

from specdec.attention import sdpa_tree_attention
from specdec.cache import StaticTreeCache
from specdec.forward import tree_forward
from specdec.tree import TokenTree

__all__ = ["SDPAVerifier"]


class SDPAVerifier:
    """ONE target forward over all N tree nodes.

    Node i is fed at position ``prefix_len + depth[i]``, its K/V written to slot
    ``prefix_len + i``; it attends to the whole committed prefix and to its ancestors in the tree.
    The mask reaches attention through the transformers attention interface (see
    :mod:`specdec.attention`), so any HF decoder built on that interface works unchanged
    (tested: Llama, Qwen2, Mistral, Gemma3).
    """

    name = "sdpa"
    backend = staticmethod(sdpa_tree_attention)
    uses_packed_mask = False

    def __call__(self, target, tree: TokenTree, cache: StaticTreeCache, view_len: int) -> Tensor:
        """Returns target logits ``[B, N, V]`` at every node (the prediction *after* that node)."""
        packed = tree.packed_ancestor_mask if self.uses_packed_mask else None
        out = tree_forward(
            target,
            cache,
            tree.tokens,
            tree.ancestor_mask,
            tree.depths,
            view_len,
            self.backend,
            packed_mask=packed,
        )
        return out.logits

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
