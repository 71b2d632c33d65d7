"""specdec: lossless speculative and parallel decoding for Hugging Face causal LMs."""

from .acceptance import accept, greedy_accept, sample_accept, target_probs
from .cache import StaticTreeCache
from .generate import SpecDecInputError, generate
from .metrics import GenerateOutput, GenerateStats
from .models import load_model
from .state import AcceptResult, DecodeState, SamplingConfig
from .tree import TokenTree

__all__ = [
    "generate",
    "load_model",
    "TokenTree",
    "StaticTreeCache",
    "GenerateOutput",
    "GenerateStats",
    "DecodeState",
    "AcceptResult",
    "SamplingConfig",
    "SpecDecInputError",
    "accept",
    "greedy_accept",
    "sample_accept",
    "target_probs",
]
