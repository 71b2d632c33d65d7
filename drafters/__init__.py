"""Draft sources behind one small interface (:class:`drafters.base.Drafter`).

One file per draft source; names are imported lazily so that a drafter's optional dependencies
(Triton kernels, ...) load only when it is used.
"""

from importlib import import_module

from .base import Drafter

_LAZY = {
    "DraftModel": ".draft_model",
    "Replay": ".replay",
    "RawLookahead": ".lookahead",
    "TurboLookahead": ".lookahead",
    "HybridLookahead": ".lookahead",
    "EarlyExit": ".early_exit",
    "QuantizedCopy": ".quantized",
}

__all__ = ["Drafter", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'drafters' has no attribute {name!r}")
