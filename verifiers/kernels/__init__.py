"""Triton kernels of the tree verifier: tree attention (prefix + bit-packed tree mask), KV commit and KV write."""

from .kv_commit import kv_commit
from .kv_write import kv_write
from .tree_attention import MAX_TREE_NODES, pick_config, tree_attention

__all__ = ["tree_attention", "kv_commit", "kv_write", "pick_config", "MAX_TREE_NODES"]
