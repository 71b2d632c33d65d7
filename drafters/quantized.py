"""A weight-only quantized copy of the target as its own drafter (int8 / int4).

Self-speculation without trained weights: the draft is the target itself with its linear layers
stored in 8 or 4 bits (weight-only quantization as in LLM.int8(), https://arxiv.org/abs/2208.07339,
for per-channel int8, and GPTQ / AWQ, https://arxiv.org/abs/2210.17323 /
https://arxiv.org/abs/2306.00978, for group-wise int4; QSpec, https://arxiv.org/abs/2410.11305,
and "quantized self-speculative decoding" drafters use such a copy). Decoding is memory-bound, so a
4-bit copy reads ~1/4 of the bytes of a bf16 step and agrees with the target on most tokens.

What the copy holds (start-up builds it in memory; the target is never modified):

* every ``nn.Linear`` (attention and MLP projections and, by default, the LM head) becomes a
  :class:`QuantLinear` holding only the integer weights + scales (+ the float bias if any); the
  float weights of those layers are never duplicated -- the structure is deep-copied with those
  parameters swapped for empty placeholders, then each layer is quantized straight from the target;
* the token embedding is **shared** with the target (same tensor, read-only: a lookup, not a
  matmul), so it costs no memory; when the LM head is tied to it, the head is still quantized
  (``quantize_head=True``) or shares the float weight (``quantize_head=False``);
* norms, rotary buffers and biases are small float copies.

Kernels: on CUDA, :class:`QuantLinear` calls the Triton W8A16 / W4A16 kernels of
:mod:`drafters.kernels.quant_matmul` (dequantization in registers). Elsewhere it runs the PyTorch
reference (dequantize in fp32, then ``F.linear``); on CPU the dequantized weight is cached on first
use by default (``cache_dequantized``) -- a speed convenience for CPU benchmarks that gives back the
memory saving; it is reported separately by :meth:`QuantizedCopy.memory_report`.

The draft keeps its own static KV cache and drafting logic: this class is a
:class:`~drafters.draft_model.DraftModel` over the quantized copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


from .draft_model import DraftModel
from .kernels.quant_matmul import (
    check_quant_args,
    dequantize_int4,
    dequantize_int8,
    quant_matmul,
    quantize_int4,
    quantize_int8,
    triton_available,
)

__all__ = ["QuantLinear", "QuantizedCopy", "QuantMemory", "quantize_model_copy"]


class QuantLinear(nn.Module):
    """Weight-only quantized replacement of ``nn.Linear`` (``y = x @ dequant(W).T + b``).

    Buffers: ``qweight`` int8 ``[N, K]`` (bits=8) or uint8 ``[N, Kp/2]`` (bits=4, two nibbles per
    byte), ``scales`` fp32 ``[N]`` (bits=8) or ``[Kp/G, N]`` (bits=4), ``bias`` ``[N]`` or None.
    """

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None, in_features: int, out_features: int,
                 bits: int, group_size: int | None, cache_dequantized: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.cache_dequantized = cache_dequantized
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._dense: Tensor | None = None  # lazily dequantized weight for the non-CUDA path (not a buffer)

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, bits: int, group_size: int | None = 128,
                    cache_dequantized: bool = True) -> "QuantLinear":
        check_quant_args(bits, group_size)
        N, K = weight.shape
        if bits == 8:
            q, s = quantize_int8(weight)
        else:
            q, s = quantize_int4(weight, group_size)
        return cls(q, s, bias, K, N, bits, group_size if bits == 4 else None, cache_dequantized)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{g}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float weight ``[N, K]`` (fp32 math, cast to ``dtype``)."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.in_features, self.group_size, dtype)

    def storage_bytes(self) -> int:
        b = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()
        if self.bias is not None:
            b += self.bias.numel() * self.bias.element_size()
        return b

    def cache_bytes(self) -> int:
        return 0 if self._dense is None else self._dense.numel() * self._dense.element_size()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if x2.is_cuda and triton_available():
            y = quant_matmul(x2, self.qweight, self.scales, self.bits, self.group_size)  # [M, N]
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            w = self._dense
            if w is None or w.dtype != x.dtype:
                w = self.dequantize(x.dtype)
                if self.cache_dequantized:
                    self._dense = w
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*lead, self.out_features)


@dataclass(frozen=True)
class QuantMemory:
    """Bytes of a quantized copy (model weights only; the draft KV cache is separate).

    Attributes:
        copy_bytes: everything the copy owns (quantized linears + its float norms/biases/buffers).
        quantized_bytes: integer weights + scales (+ biases) of the :class:`QuantLinear` layers.
        float_linear_bytes: the same layers' weights in the target (what they replace).
        shared_bytes: tensors the copy reads from the target without copying (the embedding).
        target_bytes: the target's parameters + buffers.
        cpu_cache_bytes: dequantized weights cached by the non-CUDA path (0 on CUDA).
    """

    copy_bytes: int
    quantized_bytes: int
    float_linear_bytes: int
    shared_bytes: int
    target_bytes: int
    cpu_cache_bytes: int

    @property
    def ratio(self) -> float:
        """``copy_bytes / target_bytes``."""
        return self.copy_bytes / max(1, self.target_bytes)

    def __str__(self) -> str:
        mb = 1 << 20
        return (
            f"copy {self.copy_bytes / mb:.1f} MiB ({self.ratio:.1%} of the target's {self.target_bytes / mb:.1f} MiB); "
            f"quantized linears {self.quantized_bytes / mb:.1f} MiB vs {self.float_linear_bytes / mb:.1f} MiB float; "
            f"shared with the target {self.shared_bytes / mb:.1f} MiB; CPU dequant cache {self.cpu_cache_bytes / mb:.1f} MiB"
        )


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@torch.no_grad()
def quantize_model_copy(target: nn.Module, bits: int, group_size: int | None = 128, quantize_head: bool = True,
                        cache_dequantized: bool | None = None) -> nn.Module:
    """A copy of ``target`` whose ``nn.Linear`` layers are :class:`QuantLinear` (target untouched).

    Linear weights are never duplicated in float: ``deepcopy`` gets empty placeholders for them
    (through its memo) and each layer is quantized from the target's tensor. Input embeddings are
    shared with the target (same tensor).
    """
    check_quant_args(bits, group_size)
    head = target.get_output_embeddings() if hasattr(target, "get_output_embeddings") else None
    emb = target.get_input_embeddings() if hasattr(target, "get_input_embeddings") else None
    linears = {name: mod for name, mod in target.named_modules() if type(mod) is nn.Linear}
    if not quantize_head and head is not None:
        linears = {n: m for n, m in linears.items() if m is not head}
    if not linears:
        raise ValueError("the model has no nn.Linear layers to quantize")
    memo: dict[int, object] = {}
    for mod in linears.values():
        w = mod.weight
        memo[id(w)] = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
    shared = []
    if emb is not None:
        memo[id(emb.weight)] = emb.weight  # share the embedding table (tied heads too: the head is replaced below)
        shared.append(emb.weight)
    if not quantize_head and head is not None and head.weight is not (emb.weight if emb is not None else None):
        memo[id(head.weight)] = head.weight
        shared.append(head.weight)
    qmodel = copy.deepcopy(target, memo)
    on_cuda = next(target.parameters()).is_cuda
    cache = (not on_cuda) if cache_dequantized is None else cache_dequantized
    for name, mod in linears.items():
        parent_name, _, attr = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        bias = mod.bias
        setattr(parent, attr, QuantLinear.from_weight(mod.weight, bias, bits, group_size, cache))
    qmodel.eval()
    qmodel.requires_grad_(False)
    qmodel._specdec_shared = [id(t) for t in shared]  # noqa: SLF001 - read by memory accounting
    return qmodel


class QuantizedCopy(DraftModel):
    """Draft with an int8 / int4 weight-only quantized copy of the target.

    Args:
        target: the HF causal LM being decoded (left untouched).
        bits: 8 (per output channel) or 4 (group-wise along K, symmetric).
        group_size: int4 group length along K (power of two >= 16; ignored for int8).
        depth, branching, width: drafting shape (see :class:`DraftModel`).
        quantize_head: also quantize the LM head (default; it is the largest matrix of small models).
        cache_dequantized: non-CUDA path caches the dequantized weights (default: on when the target
            is not on CUDA).
        backend: attention backend for the draft's forwards (default: by device, see :class:`DraftModel`).
        cuda_graphs: replay each greedy draft step as a CUDA graph (see :class:`DraftModel`;
            the Triton W8A16 / W4A16 kernels are captured with the rest of the forward).
    """

    def __init__(self, target, bits: int = 8, group_size: int = 128, depth: int = 4, branching: int = 1,
                 width: int | None = None, *, quantize_head: bool = True, cache_dequantized: bool | None = None,
                 backend=None, cuda_graphs: bool | str | None = None):
        check_quant_args(bits, group_size)
        model = quantize_model_copy(target, bits, group_size, quantize_head, cache_dequantized)
        super().__init__(model, depth=depth, branching=branching, width=width, backend=backend, cuda_graphs=cuda_graphs)
        self.bits = bits
        self.group_size = group_size if bits == 4 else None
        self._target_bytes = sum(_nbytes(t) for t in _tensors(target))
        self._float_linear_bytes = sum(
            _nbytes(m.weight) for m in target.modules() if type(m) is nn.Linear and (quantize_head or m is not target.get_output_embeddings())
        )

    def __repr__(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"QuantizedCopy(bits={self.bits}{g}, depth={self.depth}, branching={self.branching}, width={self.width})"

    def memory_report(self) -> QuantMemory:
        shared_ids = set(getattr(self.model, "_specdec_shared", []))
        own = shared = 0
        seen: set[int] = set()
        for t in _tensors(self.model):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in shared_ids:
                shared += _nbytes(t)
            else:
                own += _nbytes(t)
        qlin = [m for m in self.model.modules() if isinstance(m, QuantLinear)]
        return QuantMemory(
            copy_bytes=own,
            quantized_bytes=sum(m.storage_bytes() for m in qlin),
            float_linear_bytes=self._float_linear_bytes,
            shared_bytes=shared,
            target_bytes=self._target_bytes,
            cpu_cache_bytes=sum(m.cache_bytes() for m in qlin),
        )

    def memory_bytes(self) -> int:
        """Bytes the quantized copy owns (weights only; excludes shared embedding, CPU cache, KV cache)."""
        return self.memory_report().copy_bytes
