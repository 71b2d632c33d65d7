"""Verifiers: check a whole token tree with ONE target forward pass.

* :class:`SDPAVerifier` — reference, PyTorch SDPA with an explicit tree mask; runs anywhere.
* :class:`TritonTreeVerifier` — Triton tree-attention kernel with a bit-packed ancestor mask.
"""

from importlib import import_module

from .sdpa import SDPAVerifier

_LAZY = {"TritonTreeVerifier": ".triton_tree"}

__all__ = ["SDPAVerifier", "auto_verifier", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'verifiers' has no attribute {name!r}")


def auto_verifier(device):
    """What ``generate(verifier=None)`` uses: Triton on CUDA when it loads, the SDPA reference elsewhere."""
    import torch

    if torch.device(device).type == "cuda":
        try:
            return import_module(".triton_tree", __name__).TritonTreeVerifier()
        except ImportError:
            pass
    return SDPAVerifier()
