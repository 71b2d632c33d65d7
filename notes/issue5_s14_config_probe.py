"""Issue #5 probe (fourteenth session): the shipped tree-attention kernel under launch configs
suggested by ``issue5_s14_decode_probe.py`` (64- or 32-key tiles, so two or more programs fit on
an SM, and longer splits), at N = 1 and 16, prefixes 8k-32k; bench's ``bench()`` timing; outputs
checked against an fp32 reference.

    PYTHONPATH=. python notes/issue5_s14_config_probe.py --out $OUT
"""

from __future__ import annotations


import torch

import benchmarks.bench_tree_attention as bta
from notes.issue5_s14_read_floor_probe import probe_setup, save_rows
from verifiers.kernels import pick_config, tree_attention


def reference(q, k, v, prefix, tree):
    """fp32 tree attention: prefix keys all visible, tree keys by the ancestor mask."""
    G = q.shape[1] // k.shape[1]
    n = q.shape[2]
    L = prefix + n
    ke = k[:, :, :L].float().repeat_interleave(G, 1)
    ve = v[:, :, :L].float().repeat_interleave(G, 1)
    s = q.float() @ ke.transpose(-1, -2) * q.shape[-1] ** -0.5  # [1, Hq, n, L]
    vis = torch.ones(n, L, dtype=torch.bool, device=q.device)
    vis[:, prefix:] = tree.ancestor_mask[0]
    s = s.masked_fill(~vis, float("-inf"))
    return (torch.softmax(s, -1) @ ve).transpose(1, 2)  # [1, n, Hq, D]


def variants(N):
    out = {"default": ({}, None)}
    if N == 1:
        for bn, st in ((64, 3), (64, 4), (32, 4), (32, 6)):
            for keys in (256, 512, 1024):
                out[f"bn{bn}s{st}k{keys}"] = (dict(BLOCK_N=bn, num_stages=st, min_tiles=keys // bn, max_splits=128, waves=4), None)
    else:
        for bm, bn, st in ((64, 32, 3), (64, 64, 2), (64, 64, 3), (32, 64, 3), (16, 64, 3)):
            for keys in (256, 512, 1024):
                out[f"bm{bm}bn{bn}s{st}k{keys}"] = (dict(BLOCK_M=bm, BLOCK_N=bn, num_stages=st, min_tiles=keys // bn,
                                                         max_splits=128, waves=4), None)
    return out


def main():
    args, gen, copy_bw = probe_setup("4096,8192,16384,32768", ns="1,16")
    rows = []
    for N in [int(x) for x in args.ns.split(",")]:
        for prefix in [int(p) for p in args.prefixes.split(",")]:
            tree, sets, pl, L = bta.setup_point(N, prefix, gen)
            packed = tree.packed_ancestor_mask
            kv_bytes = 2 * bta.HKV * (prefix + N) * bta.D * 2
            q0, k0, v0 = sets[0]
            ref = reference(q0, k0, v0, prefix, tree)
            res = {}
            for name, (cfg, splits) in variants(N).items():
                if args.smoke and name != "default" and len(res) > 1:
                    continue
                full = dict(pick_config(N, bta.HQ // bta.HKV, bta.D, torch.bfloat16, view_len=L), **cfg)
                try:
                    out = tree_attention(q0, k0, v0, pl, packed, N, config=full, num_splits=splits).float()
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                    t = bta.bench([lambda q=q, k=k, v=v: tree_attention(q, k, v, pl, packed, N, config=full, num_splits=splits)
                                   for q, k, v in sets]) * 1e3
                except Exception as e:
                    print(f"  {name}: {type(e).__name__} {str(e)[:80]}", flush=True)
                    continue
                res[name] = dict(us=t, err=err, frac=kv_bytes / (t * 1e-6) / 1e9 / copy_bw)
            best = min((k_ for k_ in res if res[k_]["err"] < 2e-2), key=lambda k_: res[k_]["us"], default="default")
            rows.append(dict(N=N, prefix=prefix, results=res, best=best))
            top = sorted(res.items(), key=lambda x: x[1]["us"])[:5]
            print(f"N={N:3d} prefix {prefix:6d}: default {res['default']['us']:.1f} us ({100 * res['default']['frac']:.0f}%); "
                  f"best {best} {res[best]['us']:.1f} ({100 * res[best]['frac']:.0f}%); "
                  f"top {[(k_, round(r['us'], 1)) for k_, r in top]}; max err {max(r['err'] for r in res.values()):.1e}", flush=True)
            del sets
            save_rows(args, "config_probe.json", copy_GBps=copy_bw, rows=rows)


if __name__ == "__main__":
    main()
