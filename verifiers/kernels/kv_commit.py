"""KV-commit kernel: move the accepted tree nodes' K/V of all layers into contiguous slots, one launch.

After verification, node ``path[b, j]`` of row b (slot ``lengths[b] + path[b, j]``) must end up in
slot ``lengths[b] + j`` for ``j < path_len[b]``, in every layer, for both K and V. The cache is one
tensor ``kv [layers, 2, B, H_kv, T_max, D]`` (see :class:`specdec.cache.StaticTreeCache`), so one
grid over ``(layers * 2 * B * H_kv)`` programs covers everything; rows already in place
(``path[b, j] == j``, e.g. an accepted chain prefix) are neither read nor written.

In-place safety: a path is root-first along ancestors and node ids grow with depth, so
``path[j] >= j`` and destinations never lie above their sources, but a destination slot j can be
the *source* of an earlier entry (``path[j'] == j`` with ``j' < j``). Each program therefore
loads all its rows, waits on a barrier (all loads of the program done), then stores — the same
gather-then-scatter order as the torch reference, without a staging buffer in device memory.
(gpt-fast and Medusa/EAGLE implementations do this with one indexed copy per layer; here it is
one launch for all layers.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["kv_commit"]


@triton.jit
def _kv_commit(
    KV, PATH, PATH_LEN, LENGTHS,
    B, H,
    stride_lk, stride_b, stride_h, stride_t, stride_d,
    stride_pb, stride_pj,
    P,
    HEAD_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # over (layer * 2 + kv) * B * H + b * H + h
    h = pid % H
    b = (pid // H) % B
    lk = pid // (H * B)
    base = KV + lk.to(tl.int64) * stride_lk + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h

    j = tl.arange(0, BLOCK_P)  # [BLOCK_P] path entries
    n_valid = tl.load(PATH_LEN + b)
    length = tl.load(LENGTHS + b)
    node = tl.load(PATH + b * stride_pb + j * stride_pj, mask=j < P, other=0)  # [BLOCK_P]
    move = (j < n_valid) & (j < P) & (node != j)
    src = (length + node).to(tl.int64)
    dst = (length + j).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m2 = move[:, None] & (d[None, :] < HEAD_D)
    rows = tl.load(base + src[:, None] * stride_t + d[None, :] * stride_d, mask=m2, other=0.0)  # [BLOCK_P, BLOCK_D]
    tl.debug_barrier()  # every load of this program is done before any store (in-place gather/scatter)
    tl.store(base + dst[:, None] * stride_t + d[None, :] * stride_d, rows, mask=m2)


def kv_commit(kv: Tensor, path: Tensor, path_len: Tensor, lengths: Tensor) -> None:
    """In place: ``kv[..., lengths[b] + j, :] = kv[..., lengths[b] + path[b, j], :]`` for ``j < path_len[b]``.

    Args:
        kv: ``[layers, 2, B, H_kv, T_max, D]`` cache storage (first two dims mergeable).
        path: ``[B, P]`` accepted node ids, root first; entries at ``j >= path_len[b]`` ignored.
        path_len: ``[B]`` valid entries per row.
        lengths: ``[B]`` committed slots before this commit (not modified here).
    """
    n_layers, two, B, H, T, D = kv.shape
    P = path.shape[1]
    if P == 0:
        return
    flat = kv.view(n_layers * two, B, H, T, D)  # [2L, B, H, T, D]
    BLOCK_P = max(2, triton.next_power_of_2(P))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    num_warps = 4 if BLOCK_P * BLOCK_D <= 4096 else 8
    _kv_commit[(n_layers * two * B * H,)](
        flat, path, path_len, lengths,
        B, H,
        *flat.stride(),
        *path.stride(),
        P,
        HEAD_D=D, BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
        num_warps=num_warps,
    )
