"""Triton kernels of the tree verifier: tree attention (prefix + bit-packed tree mask) and KV commit."""

from .kv_commit import kv_commit
from .tree_attention import MAX_TREE_NODES, pick_config, tree_attention

__all__ = ["tree_attention", "kv_commit", "pick_config", "MAX_TREE_NODES"]
