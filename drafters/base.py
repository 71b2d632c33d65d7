"""The drafter interface: every draft source implements these three methods."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from specdec.state import AcceptResult, DecodeState
from specdec.tree import TokenTree

__all__ = ["Drafter"]


@runtime_checkable
class Drafter(Protocol):
    """A draft source.

    * ``prefill`` is called once per ``generate()`` call after the target's prefill (the prompt
      is in ``state.host_tokens`` / ``state.sequences``, the first new token is the root).
    * ``propose`` returns a :class:`~specdec.TokenTree` whose node 0 is ``state.roots`` and that
      has at most ``budget + 1`` nodes (``budget`` counts draft nodes, the root excluded).
    * ``observe`` is called after each verify step with what was committed. The tensors of
      ``accepted`` may be the CUDA-graph runner's static output buffers, overwritten by the next
      step: clone what must outlive the call (``on_step`` callbacks get the same object).

    A drafter must never change the target's committed cache contents.
    """

    def prefill(self, state: DecodeState) -> None: ...

    def propose(self, state: DecodeState, budget: int) -> TokenTree: ...

    def observe(self, state: DecodeState, accepted: AcceptResult) -> None: ...
