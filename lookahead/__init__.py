"""Model-free n-gram lookahead caches (Raw: per request; Turbo: global, frequency-ranked, bounded)."""

from .raw import RawLookaheadCache
from .trie import Proposal, merge_proposals
from .turbo import TurboLookaheadCache

__all__ = ["RawLookaheadCache", "TurboLookaheadCache", "Proposal", "merge_proposals"]
