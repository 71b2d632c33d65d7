"""Self-speculative drafting with the target's own first layers (early exit), sharing its K/V cache.

The draft is the target truncated after ``exit_layer`` decoder layers, followed by the target's
final norm and LM head: no extra weights (self-speculative decoding / Draft&Verify, Zhang et al.,
2023, https://arxiv.org/abs/2309.08168; LayerSkip, Elhoushi et al., 2024,
https://arxiv.org/abs/2404.16710). Optionally a set of layers is skipped instead of cutting a
suffix (SWIFT, Xia et al., 2024, https://arxiv.org/abs/2410.06916), and the draft length adapts
to the draft's confidence (Kangaroo, Liu et al., 2024, https://arxiv.org/abs/2404.18911).

K/V sharing (why there is no draft cache)
----------------------------------------
The decoder layers of the truncated view are the target's own layer objects, so each keeps its
``layer_idx`` and reads/writes layer ``layer_idx`` of the *target's* :class:`StaticTreeCache`.
For a prefix draft (layers ``0..k-1``) the committed K/V of those layers are exactly what the
draft would have computed itself (layer l only depends on layers < l), so the draft needs no
catch-up pass and no cache of its own. Draft tree node i sits at slot ``lengths + i``, the very
slot the verify pass gives it: the draft only ever writes scratch slots ``>= lengths`` (and only in
the layers it runs), and the verify pass overwrites them with the full model's K/V. The committed
prefix is never touched (tested bit for bit).

With ``skip_layers`` a kept layer l that comes after a skipped one reads the target's committed
K/V of layer l, which were computed from the *full* model's hidden states, not from the draft's.
That is the same approximation SWIFT makes; it can only change draft quality, never the output,
because every draft token is verified by the full target.

Never mutates the model: the truncated view is a shallow copy of the model shells with their own
``_modules`` dicts, a new ``ModuleList`` of the kept layer objects and a deep-copied config
(``num_hidden_layers``, ``layer_types`` restricted to the kept layers). The HF model class's own
``forward`` runs on it, so per-layer-type details (Gemma3's local/global rotary embeddings,
sliding windows) keep working. HF's built-in early exit mutates ``config`` temporarily; we don't.

Per ``propose``: 1 forward of the root (1 token), then one forward per further tree level (the
frontier, with the tree mask). With ``threshold`` set, each level costs one host read (the
confidence test); with ``threshold=None`` the depth is fixed and there is no host read.

CUDA graphs (``cuda_graphs``, default on when the target is on CUDA; :mod:`specdec.draft_graphs`):
with a greedy target and ``threshold=None`` the whole propose (root forward + level forwards +
tree growing) is ONE graph replay per budget, with a fixed view of all the target cache's slots
(masked on the device). The graph reads the root from the engine's token buffer and writes only
scratch slots of the target cache, so it has no host input at all; it is reused while the engine
hands over the same cache and token buffer (the verify runner's buffers persist across calls) and
re-captured when they change. Sampling and the threshold (a host read per level) run eagerly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from specdec.attention import sdpa_tree_attention
from specdec.draft_graphs import DraftGraphs, graph_mode
from specdec.forward import tree_forward
from specdec.generate import SpecDecInputError
from specdec.state import AcceptResult, DecodeState
from specdec.tree import TokenTree

from .draft_model import grow_tree

__all__ = ["EarlyExit", "decoder_stack", "truncated_view"]


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_stack(model) -> tuple[str, nn.Module]:
    """``(attribute name, inner model)`` of a causal LM whose inner model holds ``layers``."""
    name = getattr(model, "base_model_prefix", "model") or "model"
    inner = getattr(model, name, None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise SpecDecInputError(
            f"{type(model).__name__}: expected a causal LM whose `.{name}.layers` is the decoder ModuleList "
            "(Llama / Qwen2 / Mistral / Gemma3 style); early exit cannot find the decoder layers"
        )
    return name, inner


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing parameters/submodules, with its OWN ``_modules`` dict."""
    view = copy.copy(module)
    view.__dict__["_modules"] = dict(module._modules)
    return view


def truncated_view(model, layers: Iterable[int]) -> nn.Module:
    """A causal LM that runs only the decoder ``layers`` of ``model`` (then its final norm + head).

    Shares every parameter and layer object with ``model`` (no copy of weights, nothing of
    ``model`` is modified). Each kept layer keeps its original ``layer_idx``, so it reads and writes
    that layer of whatever cache is passed in.

    Args:
        model: HF causal LM (``model.<base_model_prefix>.layers`` is the decoder stack).
        layers: indices of the layers to run, in order.
    """
    kept = list(layers)
    name, inner = decoder_stack(model)
    cfg = copy.deepcopy(inner.config)
    cfg.num_hidden_layers = len(kept)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:
        cfg.layer_types = [layer_types[i] for i in kept]
    inner_view = _shallow(inner)
    inner_view._modules["layers"] = nn.ModuleList([inner.layers[i] for i in kept])
    inner_view.__dict__["config"] = cfg
    view = _shallow(model)
    view._modules[name] = inner_view
    if model.config is inner.config:
        view.__dict__["config"] = cfg
    return view


class EarlyExit:
    """Draft with the target's first ``exit_layer`` layers (or all but ``skip_layers``).

    Args:
        target: the HF causal LM being decoded (the same object passed to ``generate``).
        exit_layer: run decoder layers ``0 .. exit_layer - 1`` (1 <= exit_layer <= num layers).
            Default: all layers (only meaningful together with ``skip_layers``).
        depth: maximum draft levels per step (chain length for ``branching=1``).
        branching: children per expanded node (1 = chain); width: frontier kept per level
            (default ``branching``).
        threshold: dynamic draft length: stop expanding once the draft's most probable child on
            the newest level is below this probability (one host read per level). ``None``: fixed
            ``depth``.
        skip_layers: layer indices (< exit_layer) skipped by the draft (SWIFT-style). At least one
            layer must remain.
        backend: attention backend for the draft forwards; default (None): the backend of the
            default verifier for the device (Triton tree attention on CUDA, SDPA elsewhere). The
            draft runs the same attention modules as the target, so a slow backend here costs
            as much per layer as it would in the verify pass.
        cuda_graphs: replay each greedy fixed-depth draft step as a CUDA graph. ``None``
            (default): on when the target is on CUDA (a failed capture warns once, then eager);
            ``True``: required (CUDA only; a failed capture raises); ``False``: eager;
            ``"static"``: the graph's fixed-view path run eagerly (any device; CPU tests).
    """

    def __init__(
        self,
        target,
        exit_layer: int | None = None,
        depth: int = 4,
        branching: int = 1,
        width: int | None = None,
        threshold: float | None = None,
        skip_layers: Iterable[int] | None = None,
        backend: Callable | None = None,
        cuda_graphs: bool | str | None = None,
    ):
        n_layers = _text_config(target).num_hidden_layers
        if exit_layer is None:
            if not skip_layers:
                raise SpecDecInputError("EarlyExit needs exit_layer=k (1..num layers) or a set of skip_layers")
            exit_layer = n_layers
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= n_layers:
            raise SpecDecInputError(f"exit_layer must be an int in [1, {n_layers}] for this model, got {exit_layer!r}")
        skip = set()
        for s in skip_layers or ():
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < exit_layer:
                raise SpecDecInputError(f"skip_layers entries must be ints in [0, {exit_layer}), got {s!r}")
            skip.add(s)
        kept = [i for i in range(exit_layer) if i not in skip]
        if not kept:
            raise SpecDecInputError("skip_layers removes every layer below exit_layer: the draft would have no layers")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise SpecDecInputError(f"depth must be an int >= 1, got {depth!r}")
        if isinstance(branching, bool) or not isinstance(branching, int) or branching < 1:
            raise SpecDecInputError(f"branching must be an int >= 1, got {branching!r}")
        if width is not None and (not isinstance(width, int) or width < 1):
            raise SpecDecInputError(f"width must be an int >= 1, got {width!r}")
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise SpecDecInputError(f"threshold must be in (0, 1) or None, got {threshold!r}")
        self.target = target
        self.num_layers = n_layers
        self.exit_layer = exit_layer
        self.skip_layers = frozenset(skip)
        self.layers: tuple[int, ...] = tuple(kept)  # decoder layers the draft runs
        self.depth = depth
        self.branching = branching
        self.width = width if width is not None else branching
        self.threshold = None if threshold is None else float(threshold)
        self.backend = backend
        self._backend: Callable = backend or sdpa_tree_attention
        self.view = truncated_view(target, kept)  # validates the architecture now; rebuilt in prefill
        if not (cuda_graphs is None or isinstance(cuda_graphs, bool) or cuda_graphs == "static"):
            raise SpecDecInputError(f"cuda_graphs must be None, True, False or 'static', got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.graphs: DraftGraphs | None = None  # per-budget graphs (kept across calls: same view object)

    def __repr__(self) -> str:
        skip = f", skip_layers={sorted(self.skip_layers)}" if self.skip_layers else ""
        return (
            f"EarlyExit(exit_layer={self.exit_layer}/{self.num_layers}{skip}, depth={self.depth}, "
            f"branching={self.branching}, width={self.width}, threshold={self.threshold})"
        )

    @property
    def layer_fraction(self) -> float:
        """Decoder layers the draft runs / the target's (a first guess of the relative draft cost)."""
        return len(self.layers) / self.num_layers

    # ------------------------------------------------------------------ Drafter API
    def check(self, target) -> None:
        if target is not self.target:
            raise SpecDecInputError("EarlyExit drafts with the model it was built from: pass the same target to generate()")

    def prefill(self, state: DecodeState) -> None:
        self.check(state.target)
        if state.cache.num_layers != self.num_layers:
            raise SpecDecInputError(
                f"target cache has {state.cache.num_layers} layers, the model {self.num_layers}: EarlyExit shares it"
            )
        # generate() has bound the target to the "specdec" attention by now; copy its config again
        # so the view's config matches (cheap: one config deepcopy and two module shells)
        self.view = truncated_view(self.target, self.layers)  # captured graphs only hold its tensors
        if self.backend is None:
            from specdec.generate import default_verifier

            self._backend = default_verifier(state.device).backend
        mode = graph_mode(self.cuda_graphs, state.device)
        if mode == "eager":
            self.graphs = None
        elif self.graphs is None or self.graphs.capture != (mode == "capture"):
            self.graphs = DraftGraphs(capture=mode == "capture", strict=self.cuda_graphs is True)

    def observe(self, state: DecodeState, accepted: AcceptResult) -> None:
        pass  # nothing to trim: the verify pass already wrote the committed K/V of every layer

    def propose(self, state: DecodeState, budget: int) -> TokenTree:
        cache = state.cache  # the TARGET's cache: committed slots are read, scratch slots written
        roots = state.roots  # [B]
        if budget <= 0:
            return TokenTree.root_only(roots)
        if self.graphs is not None and state.sampling.greedy and self.threshold is None:
            return self._propose_graphed(state, budget)
        base = max(len(t) for t in state.host_tokens) - 1  # committed slots of the longest active row

        # 1. the root (its K/V is not committed yet): node 0 at slot lengths + 0
        first = self._root_logits(cache, roots, base + 1)  # [B, V]
        # 2. one forward per level; tree node i sits at slot lengths + i, as in the verify pass
        forward_level = self._level_forward(cache, lambda n_nodes: base + n_nodes)

        return grow_tree(
            roots, first, forward_level, depth=self.depth, branching=self.branching, width=self.width,
            budget=budget, sampling=state.sampling, generator=state.generator, threshold=self.threshold,
        )

    # ------------------------------------------------------------------ forwards shared by both paths
    def _root_logits(self, cache, roots: Tensor, view_len: int) -> Tensor:
        """Draft logits at the root ``[B, V]``: one truncated forward of ``roots [B]`` at slot lengths + 0."""
        B, dev = roots.shape[0], roots.device
        out = tree_forward(
            self.target, cache, roots.view(B, 1), torch.ones(B, 1, 1, dtype=torch.bool, device=dev),
            torch.zeros(B, 1, dtype=torch.long, device=dev), view_len, self._backend,
            logits_to_keep=1, model_call=self.view,
        )
        return out.logits[:, -1]

    def _level_forward(self, cache, view_len_of: Callable[[int], int]):
        """``forward_level`` for :func:`grow_tree`: the truncated model on the newest level; tree node i
        sits at slot lengths + i; ``view_len_of(N)`` gives the key slots visible for an N-node tree."""

        def forward_level(tree: TokenTree, new_tok: Tensor, frontier: Tensor) -> Tensor:
            B, n = new_tok.shape
            N = tree.num_nodes
            mask = tree.ancestor_mask.gather(1, frontier.unsqueeze(-1).expand(B, n, N))  # [B, n, N]
            return tree_forward(
                self.target, cache, new_tok, mask, tree.depths, view_len_of(N), self._backend,
                query_nodes=frontier, model_call=self.view,
            ).logits  # [B, n, V]

        return forward_level

    # ------------------------------------------------------------------ graphed (fixed view) path
    def _propose_graphed(self, state: DecodeState, budget: int) -> TokenTree:
        """The eager step with a fixed view (all ``cache.max_len`` slots of the target cache,
        masked on the device) and the root gathered on the device: ONE graph per budget, no
        host input, no host read. Writes only scratch slots ``>= lengths`` (nothing to restore)."""
        cache = state.cache
        seq, seq_lens = state.sequences, state.seq_lens
        g = self.graphs
        g.bind([cache.kv, cache.lengths, seq, seq_lens])
        view = cache.max_len
        depth, branching, width, sampling = self.depth, self.branching, self.width, state.sampling

        def body() -> tuple[Tensor, Tensor]:
            roots = seq.gather(1, (seq_lens - 1).unsqueeze(1)).squeeze(1)  # [B]
            first = self._root_logits(cache, roots, view)  # [B, V]
            forward_level = self._level_forward(cache, lambda n_nodes: view)

            tree = grow_tree(roots, first, forward_level, depth=depth, branching=branching, width=width,
                             budget=budget, sampling=sampling, generator=None)
            return tree.tokens, tree.parents  # [B, N] each

        tok, par = g.run((budget, depth, branching, width), body)
        return TokenTree(tokens=tok, parents=par)  # static buffers: valid until the next propose
