"""KV-write kernel: one layer's new K **and** V rows into their cache slots, one launch.

Every forward writes ``n`` new tokens per row into the static cache (a verify step: the tree
nodes; a decode step: one token). The torch path is two ``scatter_`` calls per layer (K, then V),
each a generic gather/scatter kernel over an expanded index; here one program per
``(b, kv head, block of tokens)`` loads the slots once and stores both rows, casting to the
cache dtype on the way (HF hands ``key_states`` as a transposed, non-contiguous view: any
strides are accepted). Slots outside ``[0, T_max)`` are skipped, where ``scatter_`` would fault.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from specdec.kernels import pdl

__all__ = ["kv_write"]


@triton.jit
def _kv_write(
    KV, SLOTS, K_NEW, V_NEW,
    H, n, T,
    stride_kv, stride_b, stride_h, stride_t, stride_d,
    stride_sb, stride_sn,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,  # launched early (programmatic dependent launch): wait for the previous kernel
):
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid = tl.program_id(0)  # over b * H + h
    h = pid % H
    b = pid // H
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] new tokens
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    slot = tl.load(SLOTS + b * stride_sb + i * stride_sn, mask=i < n, other=-1).to(tl.int64)
    ok = (i < n) & (slot >= 0) & (slot < T)
    m2 = ok[:, None] & (d[None, :] < HEAD_D)  # [BLOCK_N, BLOCK_D]
    b64, h64, i64 = b.to(tl.int64), h.to(tl.int64), i.to(tl.int64)
    k = tl.load(K_NEW + b64 * stride_kb + h64 * stride_kh + i64[:, None] * stride_kn + d[None, :] * stride_kd, mask=m2)
    v = tl.load(V_NEW + b64 * stride_vb + h64 * stride_vh + i64[:, None] * stride_vn + d[None, :] * stride_vd, mask=m2)
    dst = KV + b64 * stride_b + h64 * stride_h + slot[:, None] * stride_t + d[None, :] * stride_d
    tl.store(dst, k.to(KV.dtype.element_ty), mask=m2)
    tl.store(dst + stride_kv, v.to(KV.dtype.element_ty), mask=m2)


def kv_write(kv_layer: Tensor, slots: Tensor, key: Tensor, value: Tensor) -> None:
    """In place: ``kv_layer[0, b, h, slots[b, i]] = key[b, h, i]`` and the same for ``value`` into ``kv_layer[1]``.

    Args:
        kv_layer: ``[2, B, H_kv, T_max, D]`` one layer of the cache (K then V).
        slots: ``[B, n]`` destination slot of each new token (out-of-range slots are skipped).
        key, value: ``[B, H_kv, n, D]`` new rows, any strides and float dtype.
    """
    _, B, H, T, D = kv_layer.shape
    n = key.shape[2]
    if n == 0 or B == 0:
        return
    BLOCK_N = min(32, max(2, triton.next_power_of_2(n)))
    BLOCK_D = max(16, triton.next_power_of_2(D))

    def launch(pdl: bool):
        _kv_write[(B * H, triton.cdiv(n, BLOCK_N))](
            kv_layer, slots, key, value,
            H, n, T,
            *kv_layer.stride(),
            *slots.stride(),
            *key.stride(),
            *value.stride(),
            HEAD_D=D, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PDL=pdl,
            num_warps=4 if BLOCK_N * BLOCK_D <= 2048 else 8,
            **(dict(launch_pdl=True) if pdl else {}),
        )

    pdl.launch(launch, kv_layer.device)
