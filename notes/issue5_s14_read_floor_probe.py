"""Issue #5 probe (fourteenth session): how fast can *any* kernel read the K/V bytes of one
attention call, timed the way ``benchmarks/bench_tree_attention.py`` times the tree attention?

The target is >= 70 % of the measured device copy bandwidth at prefix >= 8k (Llama-3-8B heads:
8 KV heads, D = 128, bf16, B = 1). This probe times, per prefix, with the bench's own ``bench()``
(CUDA-graph replays of the call over distinct K/V buffers >= 4x L2, median, per call):

- ``read1``: one launch that only reads K and V (sums them; one fp32 per program), best of a
  sweep of tile sizes and programs; the floor of any one-launch attention;
- ``read1+tiny``: the same read followed by a one-program kernel (what a second-launch merge
  costs at the least);
- ``copy``: ``torch`` copy of the K/V bytes to another buffer (reads + writes);
- the shipped tree attention at N = 1 and N = 16 (default config), side by side.

    PYTHONPATH=. python notes/issue5_s14_read_floor_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

import benchmarks.bench_tree_attention as bta
from verifiers.kernels import tree_attention


@triton.jit
def _read_tiles(k_ptr, v_ptr, out_ptr, L, stride_h, stride_t,
                BLOCK_T: tl.constexpr, D: tl.constexpr, TILES: tl.constexpr):
    """Program (h, s) reads TILES tiles of BLOCK_T keys of K and V of head h; one fp32 out."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_T, D], dtype=tl.float32)
    for i in range(TILES):
        offs_t = (s * TILES + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        m = offs_t[:, None] < L
        p = h * stride_h + offs_t[:, None] * stride_t + offs_d[None, :]
        kk = tl.load(k_ptr + p, mask=m, other=0.0)
        vv = tl.load(v_ptr + p, mask=m, other=0.0)
        acc += kk.to(tl.float32) + vv.to(tl.float32)
    tl.store(out_ptr + h * tl.num_programs(1) + s, tl.sum(acc))


@triton.jit
def _tiny(x_ptr, out_ptr):
    tl.store(out_ptr, tl.load(x_ptr) + 1.0)


def read_fn(k, v, out, L, block_t, tiles, warps):
    H, D = k.shape[1], k.shape[3]
    n_tiles = triton.cdiv(L, block_t)
    grid = (H, triton.cdiv(n_tiles, tiles))

    def f():
        _read_tiles[grid](k, v, out, L, k.stride(1), k.stride(2), BLOCK_T=block_t, D=D, TILES=tiles, num_warps=warps)
    return f


def probe_setup(prefixes: str, **extra):
    """The fourteenth-session #5 probes' common start: ``--out``, ``--prefixes``, ``--smoke`` (CPU +
    TRITON_INTERPRET=1, tiny heads: checks a script only) and ``extra`` string options; inference
    mode; a seeded generator; the measured copy bandwidth. Returns ``(args, gen, copy_GBps)``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--prefixes", default=prefixes)
    ap.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny sizes: checks the script only")
    for name, default in extra.items():
        ap.add_argument(f"--{name}", default=default)
    args = ap.parse_args()
    if args.smoke:
        bta.DEV, bta.HKV, bta.HQ, bta.D, bta.L2_BYTES = "cpu", 2, 8, 16, 1 << 16
    torch.inference_mode().__enter__()
    copy_bw = bta.copy_bandwidth()
    print(f"copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    return args, torch.Generator().manual_seed(0), copy_bw


def save_rows(args, name: str, **payload):
    """Write ``payload`` as ``$OUT/name`` (after every row, so a run cut short keeps what it has)."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(payload, f, indent=1)


def main():
    args, gen, copy_bw = probe_setup("512,2048,4096,8192,16384,32768")
    rows = []
    shapes = [(bt, tiles, w) for bt in (32, 64, 128) for tiles in (1, 2, 4, 8) for w in (4, 8)]
    if args.smoke:
        shapes = shapes[:2]
    for prefix in [int(p) for p in args.prefixes.split(",")]:
        tree, sets, pl, L = bta.setup_point(1, prefix, gen)
        kv_bytes = 2 * bta.HKV * (prefix + 1) * bta.D * 2
        outs = [torch.empty(bta.HKV * 4096, device=bta.DEV) for _ in sets]
        tiny_out = torch.empty(1, device=bta.DEV)
        best = None
        sweep = {}
        for bt, tiles, w in shapes:
            fns = [read_fn(k, v, o, prefix + 1, bt, tiles, w) for (q, k, v), o in zip(sets, outs)]
            t = bta.bench(fns) * 1e3
            sweep[f"{bt}x{tiles}w{w}"] = t
            if best is None or t < best[0]:
                best = (t, (bt, tiles, w))
        bt, tiles, w = best[1]
        pairs = []
        for (q, k, v), o in zip(sets, outs):
            r = read_fn(k, v, o, prefix + 1, bt, tiles, w)

            def both(r=r, o=o):
                r()
                _tiny[(1,)](o, tiny_out)
            pairs.append(both)
        t_pair = bta.bench(pairs) * 1e3
        dst = torch.empty_like(sets[0][1])
        t_copy = bta.bench([lambda k=k, v=v: (dst.copy_(k), dst.copy_(v)) for q, k, v in sets]) * 1e3
        packed = tree.packed_ancestor_mask
        t_n1 = bta.bench([lambda q=q, k=k, v=v: tree_attention(q, k, v, pl, packed, 1) for q, k, v in sets]) * 1e3
        tree16, sets16, pl16, _ = bta.setup_point(16, prefix, gen)
        p16 = tree16.packed_ancestor_mask
        t_n16 = bta.bench([lambda q=q, k=k, v=v: tree_attention(q, k, v, pl16, p16, 16) for q, k, v in sets16]) * 1e3
        del sets16
        frac = (lambda us: kv_bytes / (us * 1e-6) / 1e9 / copy_bw)
        row = dict(prefix=prefix, kv_bytes=kv_bytes, hbm_us=kv_bytes / copy_bw / 1e3, read1_us=best[0], read1_cfg=best[1],
                   read1_frac=frac(best[0]), read1_tiny_us=t_pair, read1_tiny_frac=frac(t_pair), copy_us=t_copy,
                   tree_n1_us=t_n1, tree_n1_frac=frac(t_n1), tree_n16_us=t_n16, tree_n16_frac=frac(t_n16),
                   us_for_70pct=kv_bytes / (0.7 * copy_bw * 1e9) * 1e6, sweep=sweep)
        rows.append(row)
        print(f"prefix {prefix:6d}: HBM {row['hbm_us']:.1f} us; 70% needs <= {row['us_for_70pct']:.1f}; "
              f"read-only {best[0]:.1f} us ({100 * row['read1_frac']:.0f}%, {best[1]}); +tiny launch {t_pair:.1f} "
              f"({100 * row['read1_tiny_frac']:.0f}%); copy {t_copy:.1f}; tree N=1 {t_n1:.1f} ({100 * row['tree_n1_frac']:.0f}%), "
              f"N=16 {t_n16:.1f} ({100 * row['tree_n16_frac']:.0f}%)", flush=True)
        del sets
        save_rows(args, "read_floor.json", device=torch.cuda.get_device_name() if bta.DEV == "cuda" else "cpu",
                  copy_GBps=copy_bw, rows=rows)


if __name__ == "__main__":
    main()
