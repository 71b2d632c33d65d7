"""StaticTreeCache: a preallocated K/V cache with scratch slots for token trees.

Layout: one tensor ``kv`` of shape ``[L_layers, 2, B, H_kv, T_max, D]`` (2 = key, value). Every
layer's K and V are views into it, so committing an accepted path is ONE gather + ONE scatter over
all layers (or one Triton launch, see :mod:`verifiers.kernels`), never a Python loop over layers.

Per row b, slots ``[0, lengths[b])`` hold the committed tokens. A forward writes its new K/V to
the slots given by :meth:`begin_step` (tree node i of a verify pass goes to ``lengths[b] + i``);
rejected nodes need no rollback: they are simply overwritten by the next step (gpt-fast).

Implements the parts of the transformers ``Cache`` API that HF decoder models call
(``update``, ``get_seq_length``, ``get_max_length``, ``get_mask_sizes``), so unmodified HF
modeling code writes into it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

__all__ = ["StaticTreeCache", "kv_shape_from_config"]


def kv_shape_from_config(config) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a (text) model config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = cfg.num_hidden_layers
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return n_layers, n_kv, head_dim


def _kv_write(kv: Tensor, layer_idx: int, slots: Tensor, key: Tensor, value: Tensor) -> None:
    """Scatter ``[B, H_kv, n, D]`` new K/V of one layer into ``kv`` at ``slots`` ``[B, n]`` (in place).

    On CUDA one Triton launch writes K and V (:func:`verifiers.kernels.kv_write`); elsewhere two
    ``scatter_`` calls.
    """
    if kv.is_cuda:
        from verifiers.kernels.kv_write import kv_write

        kv_write(kv[layer_idx], slots, key, value)
        return
    B, H, n, D = key.shape
    idx = slots.view(B, 1, n, 1).expand(B, H, n, D)
    kv[layer_idx, 0].scatter_(2, idx, key.to(kv.dtype))  # decoding cache: no autograd
    kv[layer_idx, 1].scatter_(2, idx, value.to(kv.dtype))


# Under torch.compile the write is one custom op that mutates the cache in place: traced as plain
# scatters into a view of the cache, it is functionalised into a copy of the layer's whole K/V view
# per layer and step (the copy the Triton attention op then reads).
torch.library.custom_op("specdec::kv_write", mutates_args=("kv",))(_kv_write)


def _kv_commit(kv: Tensor, path: Tensor, path_len: Tensor, lengths: Tensor) -> None:
    """The accepted nodes' K/V of all layers into contiguous slots, in place (one Triton launch,
    :func:`verifiers.kernels.kv_commit.kv_commit`; CUDA)."""
    from verifiers.kernels.kv_commit import kv_commit

    kv_commit(kv, path, path_len, lengths)


# The same for the commit when a whole step is compiled (``compile={"compile_step": True}``): as a
# user Triton kernel in the traced graph it was functionalised into a copy of the whole cache per
# step (63 µs at 8B, H200).
torch.library.custom_op("specdec::kv_commit", mutates_args=("kv",))(_kv_commit)


class StaticTreeCache(Cache):
    """Preallocated K/V for ``batch_size`` rows of at most ``max_len`` tokens each.

    Args:
        config: the model's (text) config, used for layer count, KV heads and head dim.
        batch_size: rows.
        max_len: slots per row (committed tokens + the largest tree ever verified).
        dtype, device: of the K/V storage (match the model).
        num_layers: override the number of layers (e.g. a draft that runs only a prefix).
    """

    is_compileable = True

    def __init__(self, config, batch_size: int, max_len: int, dtype: torch.dtype, device, num_layers: int | None = None):
        super().__init__(layers=[])
        n_layers, n_kv, head_dim = kv_shape_from_config(config)
        if num_layers is not None:
            n_layers = num_layers
        self.num_layers = n_layers
        self.max_len = int(max_len)
        self._batch = int(batch_size)
        # [layers, 2, B, H_kv, T_max, D]
        self.kv = torch.zeros(n_layers, 2, batch_size, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B] committed slots
        self._write_slots: Tensor | None = None  # [B, n] slots the next forward writes to
        self._view_len = self.max_len  # keys/values handed to attention: slots [0, view_len)

    # ------------------------------------------------------------------ engine side
    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def layer_kv(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        """Full ``[B, H_kv, T_max, D]`` key and value buffers of one layer (fixed addresses)."""
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    def begin_step(self, write_slots: Tensor, view_len: int | None = None) -> None:
        """Declare where the next forward's ``n`` new tokens go.

        Args:
            write_slots: ``[B, n]`` slot index of each new token.
            view_len: attention sees slots ``[0, view_len)`` (default: all ``max_len``).
        """
        self._write_slots = write_slots
        view = self.max_len if view_len is None else int(view_len)
        if view > self.max_len:
            raise ValueError(f"step needs {view} cache slots but the cache holds {self.max_len}")
        self._view_len = view

    def commit(self, path: Tensor, path_len: Tensor) -> None:
        """Move the accepted nodes' K/V into contiguous slots after the committed prefix.

        Args:
            path: ``[B, P]`` accepted node ids, root first (node i lives in slot ``lengths + i``);
                entries at ``j >= path_len[b]`` are ignored (may be -1).
            path_len: ``[B]`` number of valid entries.
        After the call ``lengths += path_len``. One gather and one scatter over all layers.
        """
        if self.kv.is_cuda:  # one Triton launch for all layers (verifiers.kernels.kv_commit)
            if torch.compiler.is_compiling():
                torch.ops.specdec.kv_commit(self.kv, path, path_len, self.lengths)
            else:
                _kv_commit(self.kv, path, path_len, self.lengths)
            self.lengths += path_len
            return
        B, P = path.shape
        j = torch.arange(P, device=path.device).expand(B, P)
        keep = j < path_len.unsqueeze(1)
        src_node = torch.where(keep, path, j)  # ignored entries copy a slot onto itself
        base = self.lengths.unsqueeze(1)
        src = base + src_node  # [B, P]
        dst = base + j  # [B, P]
        bi = torch.arange(B, device=path.device).unsqueeze(1).expand(B, P)
        flat = self.kv.view(self.num_layers * 2, B, *self.kv.shape[3:])  # [2L, B, H, T, D]
        moved = flat[:, bi, :, src]  # [B, P, 2L, H, D]  (advanced indices go first)
        flat[:, bi, :, dst] = moved
        self.lengths += path_len

    def advance(self, n: Tensor | int) -> None:
        """Commit ``n`` tokens already written contiguously at ``[lengths, lengths + n)``."""
        self.lengths += n

    def reset(self) -> None:
        self.lengths.zero_()
        self._write_slots = None
        self._view_len = self.max_len

    # ------------------------------------------------------------------ transformers Cache API
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Write ``[B, H_kv, n, D]`` new K/V to the declared slots; return the visible K/V views."""
        if self._write_slots is None:
            raise RuntimeError("StaticTreeCache.update called without begin_step(); use specdec's forward helpers")
        if torch.compiler.is_compiling():  # one in-place op: no functional copy of the layer's K/V
            torch.ops.specdec.kv_write(self.kv, layer_idx, self._write_slots, key_states, value_states)
        else:
            _kv_write(self.kv, layer_idx, self._write_slots, key_states.detach(), value_states.detach())
        return self.kv[layer_idx, 0, :, :, : self._view_len], self.kv[layer_idx, 1, :, :, : self._view_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max())

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self._view_len, 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def max_batch_size(self) -> int:
        return self._batch

    @property
    def max_cache_len(self) -> int:
        return self.max_len

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return (
            f"StaticTreeCache(layers={self.num_layers}, batch={self._batch}, max_len={self.max_len}, "
            f"dtype={self.dtype}, device={self.device})"
        )
