#!/usr/bin/env python3
"""W8A16 / W4A16 Triton kernels vs bf16 cuBLAS (``x @ w.T``) at Llama-3-8B linear shapes (GPU).

One script, one call on the GPU machine:
  1. environment + the copy-bandwidth ceiling;
  2. correctness: ragged shapes (K, N not multiples of any block), fp16/bf16/fp32, M in {1,3,16,64,100},
     against the fp32 dequantized reference (relative Frobenius error);
  3. end-to-end: QuantizedCopy int8/int4 (chain and tree) through ``specdec.generate`` on CUDA
     reproduces plain greedy decoding of a tiny fp32 Llama token for token;
  4. timing: for each shape and M in {1, 16, 64}, bf16 cuBLAS, then a small sweep of tile
     configs of each kernel (every candidate is checked against the reference before it is
     timed) plus the library's default config. Times: a CUDA graph of back-to-back calls over
     rotating weight copies (> 2x L2), so every call streams its weights from HBM as in a
     captured decode step (launch gaps included, host overhead not); the bf16 baseline likewise.
The markdown table is printed last. Targets (M = 1): int4 >= 2.5x and int8 >= 1.6x bf16;
M = 64: no slower than bf16.

Usage: python benchmarks/bench_quant_kernels.py [--out DIR] [--budget-s 200] [--no-sweep]
       TRITON_INTERPRET=1 python benchmarks/bench_quant_kernels.py --smoke   # CPU dry run of the script
       python benchmarks/bench_quant_kernels.py --compile-check               # compile every variant for sm_90, no GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from drafters.kernels.quant_matmul import (  # noqa: E402
    QuantConfig,
    default_config,
    dequantize_int4,
    dequantize_int8,
    quant_matmul,
    quantize_int4,
    quantize_int8,
)

SHAPES = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]  # (name, N, K)
MS = (1, 16, 64)
GROUP = 128
DEV = "cuda"


def candidates(bits: int, M: int) -> list[QuantConfig]:
    """The sweep: CUDA-core GEMV tiles (M = 1) and tensor-core tiles, swapped (W @ x.T) or not,
    each with and without the register prefetch (and, int4 tensor-core, with the inline-PTX
    dequantization). int4 ``block_k`` <= the group (128) keeps one scale per tile row."""
    R = dataclasses.replace
    out = []
    if M == 1:
        if bits == 8:
            raw = [(4, 1024, 1, 4, 3), (4, 1024, 1, 4, 4), (2, 2048, 1, 8, 3), (16, 512, 1, 8, 3), (8, 512, 1, 4, 3),
                   (2, 1024, 1, 4, 3), (8, 1024, 1, 8, 3), (16, 256, 1, 4, 3), (32, 256, 4, 4, 3)]
        else:
            raw = [(64, 128, 4, 4, 3), (64, 128, 4, 4, 1), (2, 1024, 1, 4, 3), (32, 128, 2, 4, 3), (128, 128, 4, 8, 3),
                   (4, 512, 1, 4, 3), (1, 2048, 1, 4, 3), (2, 2048, 1, 8, 3), (4, 1024, 1, 4, 3), (4, 1024, 1, 8, 3),
                   (8, 512, 1, 4, 3), (8, 1024, 1, 8, 3), (16, 256, 1, 4, 3), (2, 1024, 2, 4, 3), (4, 512, 2, 4, 3),
                   (1, 4096, 1, 8, 3)]
        base = [QuantConfig(gemv=True, block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=st)
                for bn, bk, sk, w, st in raw]
        out += base + [R(c, prefetch=True) for c in base]
        raw = [(64, 128, 1, 4, 4), (64, 128, 2, 4, 4), (128, 128, 1, 4, 3), (32, 128, 2, 4, 4), (32, 128, 4, 4, 4),
               (16, 128, 4, 4, 4), (128, 128, 2, 8, 3), (64, 128, 4, 4, 4)]
        base = [QuantConfig(gemv=False, block_m=16, block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=st,
                            swap=True) for bn, bk, sk, w, st in raw]
        out += base + [R(c, prefetch=True) for c in base]
        if bits == 4:
            out += [R(c, asm=True) for c in base] + [R(c, asm=True, prefetch=True) for c in base]
        return out
    bm = 16 if M <= 16 else 64
    raw = [(64, 128, 1, 4, 4, True), (64, 128, 2, 4, 4, True), (128, 128, 1, 4, 3, True), (128, 128, 2, 8, 3, True),
           (32, 128, 2, 4, 4, True), (128, 128, 4, 8, 3, True), (32, 128, 4, 4, 4, True),
           (64, 128, 1, 4, 4, False), (64, 128, 2, 4, 4, False), (32, 128, 4, 4, 4, False), (32, 128, 2, 4, 4, False)]
    if M > 16:  # wider weight tiles: fewer re-reads of the [M, K] activations
        raw += [(128, 128, 8, 8, 3, True), (128, 64, 8, 4, 4, True), (256, 64, 4, 8, 3, True), (256, 64, 8, 8, 3, True),
                (128, 128, 8, 8, 3, False), (128, 64, 4, 4, 4, False), (128, 64, 8, 4, 4, False), (64, 64, 4, 4, 4, False),
                (64, 128, 4, 4, 4, False), (128, 128, 4, 8, 3, False), (256, 64, 8, 8, 3, False)]
    base = [QuantConfig(gemv=False, block_m=bm, block_n=bn, block_k=bk, split_k=sk, num_warps=w, num_stages=st, swap=sw)
            for bn, bk, sk, w, st, sw in raw]
    out = base + [R(c, prefetch=True) for c in base]
    if bits == 4:
        out += [R(c, asm=True) for c in base] + [R(c, asm=True, prefetch=True) for c in base]
    # tensor descriptors (TMA): 64 weight rows per program, the pipeline depth and split-K of the
    # fifteenth session's sweep (notes/issue4_s15_tma_sweep.py)
    out += [QuantConfig(gemv=False, block_n=64, block_k=bk, split_k=sk, num_stages=st, swap=True, asm=bits == 4, tma=True)
            for bk in (128, 256) for sk in (1, 4, 8) for st in ((3, 4) if bk == 128 else (3,))]  # (int8 256 x 4: 176 KiB)
    return out


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def make_weight(bits: int, N: int, K: int, gen: torch.Generator):
    w = torch.randn(N, K, device=DEV, generator=gen, dtype=torch.float32) * 0.02
    if bits == 8:
        q, s = quantize_int8(w)
        deq = dequantize_int8(q, s)
    else:
        q, s = quantize_int4(w, GROUP)
        deq = dequantize_int4(q, s, K, GROUP)
    return q, s, deq


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


RAGGED_SIZES = [(1000, 1000), (77, 3001), (4099, 4101), (1000, 1040)]  # K = 1040: TMA-aligned, no block multiple
RAGGED_FORCED = [QuantConfig(gemv=True, block_n=16, block_k=64, split_k=3),
                 QuantConfig(gemv=False, block_m=16, block_n=32, block_k=32, split_k=2),
                 QuantConfig(gemv=False, block_m=32, block_n=64, block_k=256, split_k=1, num_stages=2)]  # per-element scales
RAGGED_TMA = [QuantConfig(gemv=False, block_n=64, block_k=128, split_k=3, swap=True, asm=True, tma=True),
              QuantConfig(gemv=False, block_n=64, block_k=256, split_k=2, num_stages=2, tma=True)]  # K % 16 == 0, M <= 64 only


def forced_configs(K: int, M: int) -> list:
    """The forced configs a ragged bf16 case runs (the TMA ones where TMA's alignment rules allow)."""
    return RAGGED_FORCED + (RAGGED_TMA if K % 16 == 0 and M <= 64 else [])


def check_ragged(log) -> bool:
    """Ragged shapes, all dtypes, default configs and a few forced ones."""
    gen = torch.Generator(device=DEV).manual_seed(1)
    ok = True
    sizes = RAGGED_SIZES if DEV == "cuda" else [(37, 150)]
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if DEV == "cuda" else (torch.float32,)
    for bits, (N, K), dtype, M in itertools.product((8, 4), sizes, dtypes, (1, 3, 16, 64, 100) if DEV == "cuda" else (1, 17)):
        q, s, deq = make_weight(bits, N, K, gen)
        x = torch.randn(M, K, device=DEV, generator=gen).to(dtype)
        ref = x.float() @ deq.t()
        for cfg in [None] + (forced_configs(K, M) if dtype == torch.bfloat16 else []):
            try:
                y = quant_matmul(x, q, s, bits, GROUP, cfg)
            except Exception as ex:  # e.g. a tile that needs more shared memory than this Triton allots
                ok = False
                log(f"FAIL ragged bits={bits} N={N} K={K} M={M} {dtype} cfg={cfg}: {type(ex).__name__}: {str(ex)[:150]}")
                continue
            e = rel_err(y, ref)
            if not (e <= tolerance(dtype)) or y.shape != (M, N) or y.dtype != dtype:
                ok = False
                log(f"FAIL ragged bits={bits} N={N} K={K} M={M} {dtype} cfg={cfg}: rel err {e:.2e}")
    log(f"ragged-shape correctness ({sizes}, {dtypes}, M in 1,3,16,64,100; forced configs on bf16): "
        f"{'PASS' if ok else 'FAIL'}")
    return ok


def check_e2e(log) -> bool:
    """QuantizedCopy through generate() on CUDA equals plain greedy (tiny fp32 Llama)."""
    try:
        import specdec
        from drafters import QuantizedCopy
        from tests.helpers import tiny_model

        ok = True
        model = tiny_model("llama", vocab=256).to(DEV)
        ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2)).to(DEV)
        ref = specdec.generate(model, ids, drafter=None, max_new_tokens=48, eos_token_id=[]).sequences
        for bits, kw in itertools.product((8, 4), (dict(depth=4), dict(depth=3, branching=2, width=4))):
            d = QuantizedCopy(model, bits=bits, group_size=32, **kw)
            out = specdec.generate(model, ids, drafter=d, max_new_tokens=48, eos_token_id=[], budget=8)
            same = out.sequences.tolist() == ref.tolist()
            ok &= same
            log(f"e2e QuantizedCopy(bits={bits}, {kw}) on {DEV} == plain greedy: {same}; tau={out.stats.tau:.2f}")
        if DEV == "cuda":  # bf16: the 16-bit kernels (TMA on sm_90) draft; near-ties may flip between
            # kernels, so no equality here, but a broken draft kernel shows as tau ~ 1 (sixth-session bug)
            m16 = tiny_model("llama", vocab=256).to(DEV, torch.bfloat16)
            for bits, kw in itertools.product((8, 4), (dict(depth=4), dict(depth=3, branching=4, width=24))):
                d = QuantizedCopy(m16, bits=bits, group_size=32, **kw)
                out = specdec.generate(m16, ids, drafter=d, max_new_tokens=48, eos_token_id=[], budget=32)
                ok &= out.stats.tau >= 1.5
                log(f"e2e bf16 QuantizedCopy(bits={bits}, {kw}): tau={out.stats.tau:.2f} (needs >= 1.5)")
        return ok
    except Exception as e:  # report, keep benchmarking
        log(f"e2e FAILED with {type(e).__name__}: {e}")
        return False


def _warm_task(task) -> str:
    """Child process: one call of one config, so its compiled kernel lands in Triton's disk cache."""
    bits, cfg, dtype_name, N, K, M, dev = task
    try:
        dtype = getattr(torch, dtype_name)
        w = torch.randn(N, K, device=dev) * 0.02
        q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, GROUP)
        x = torch.randn(M, K, device=dev).to(dtype)
        quant_matmul(x, q, s, bits, GROUP, cfg)
        if dev == "cuda":
            torch.cuda.synchronize()
        return ""
    except Exception as e:  # the main process meets (and reports) the same error
        return f"{task}: {type(e).__name__}: {str(e)[:200]}"


def prewarm(tasks, jobs: int, log) -> None:
    """Compile every kernel variant in parallel processes (Triton compiles one at a time per process)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t = time.time()
    tasks = sorted(set(tasks), key=str)
    try:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            errs = [e for e in ex.map(_warm_task, tasks) if e]
    except Exception as e:  # compiling in the main process is only slower
        log(f"pre-compilation failed ({type(e).__name__}: {e}); compiling serially")
        return
    log(f"pre-compiled {len(tasks)} kernel variants with {jobs} processes in {time.time() - t:.0f} s"
        + (f"; {len(errs)} failed, e.g. {errs[0]}" if errs else ""))


def warm_tasks(args) -> list:
    """Every (bits, config, dtype, shape class) the run will launch; shapes share Triton's specialisation
    (all dims multiples of 16 for the Llama shapes, none for the ragged ones)."""
    tasks = []
    for bits in (8, 4):
        for M in MS:
            dev = DEV if DEV == "cuda" and torch.cuda.is_available() else None  # (--compile-check: no GPU)
            cands = {default_config(M, N, K, bits, GROUP, dev, dtype=torch.bfloat16) for _, N, K in SHAPES}
            if not args.no_sweep:
                cands |= set(candidates(bits, M))
            tasks += [(bits, c, "bfloat16", N, K, M) for c in cands for N, K in ((1024, 4096), (4096, 14336))]
        for M in (1, 3, 16, 64, 100):
            for dt in ("bfloat16", "float16", "float32"):
                tasks += [(bits, None, dt, N, K, M) for N, K in RAGGED_SIZES]
            tasks += [(bits, c, "bfloat16", 77, 3001, M) for c in RAGGED_FORCED]
            tasks += [(bits, c, "bfloat16", 1000, 1040, M) for c in forced_configs(1040, M)]
    return [t + (DEV,) for t in tasks]


def compile_check(args) -> int:
    """Compile every variant the GPU run launches, offline for sm_90 (no GPU; needs Triton's bundled
    ptxas), and flag shared memory near the H100/H200 limit (227 KiB). Other Triton versions may
    need more (3.6 asked 256 KiB for a tile that 3.9 fit in 224 KiB), so warn above 160 KiB."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    qm = importlib.import_module("drafters.kernels.quant_matmul")
    qm.tma_device = lambda device: True  # the defaults of an sm_90 device (the target compiled for)
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    seen, bad = set(), 0
    for bits, cfg, dt, N, K, M, _ in warm_tasks(args):
        cfg = cfg or default_config(M, N, K, bits, GROUP, "cuda", dtype=getattr(torch, dt), cuda=False)  # (no nvcc here)
        if cfg.tma and (K % 16 or dt == "float32"):
            cfg = default_config(M, N, K, bits, GROUP, "cuda", dtype=getattr(torch, dt), tma=False)
        if cfg.tma:
            bad += _compile_tma(qm, bits, cfg, names[dt], N, K, M, seen)
            continue
        KB = K if bits == 8 else -(-K // GROUP) * GROUP // 2
        bkb = cfg.block_k if bits == 8 else cfg.block_k // 2
        kps = -(-(-(-KB // max(1, cfg.split_k))) // bkb) * bkb
        split = -(-KB // kps)
        key = (bits, cfg, dt, split)
        if key in seen:
            continue
        seen.add(key)
        xdt = names[dt]
        sig = dict(x_ptr="*" + xdt, w_ptr="*i8" if bits == 8 else "*u8", s_ptr="*fp32", y_ptr="*" + xdt,
                   ws_ptr="*fp32", wsi_ptr="*i32", cnt_ptr="*i32")
        ce = dict(BITS=bits, GROUP=GROUP if bits == 4 else 1 << 30, BLOCK_N=cfg.block_n, BLOCK_KB=bkb, SPLIT=split,
                  MAGIC=cfg.magic, EVICT=cfg.evict_first, PREFETCH=cfg.prefetch)
        if cfg.gemv:
            ce["ACC_W"] = bkb // (GROUP // 2) if bits == 4 and bkb > GROUP // 2 else bkb
            ce["HALF"] = ce["ASM"] = cfg.half and bits == 4 and xdt != "fp32"
        if cfg.gemv:
            fn = qm._qgemv_kernel
            ints = ["N", "K", "KB", "kb_per_split", "stride_xm", "stride_wn", "stride_ym"]
        else:
            fn = qm._qgemm_kernel
            ints = ["M", "N", "K", "KB", "kb_per_split", "stride_xm", "stride_wn", "stride_ym"]
            ce.update(BLOCK_M=cfg.block_m, FP32=xdt == "fp32", SWAP=cfg.swap, ASM=cfg.asm and bits == 4 and xdt != "fp32")
        sig.update({k: "i32" for k in ints})
        sig.update({k: "constexpr" for k in ce})
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            shared = k.metadata.shared
            if shared > 160 * 1024:
                bad += 1
                print(f"WARN shared {shared >> 10} KiB: bits={bits} {dt} split={split} {cfg}")
        except Exception as e:
            bad += 1
            print(f"FAIL bits={bits} {dt} split={split} {cfg}: {type(e).__name__}: {str(e)[:300]}")
    print(f"compile check: {len(seen)} variants, {bad} failed or near the shared-memory limit")
    return 1 if bad else 0


def _compile_tma(qm, bits: int, cfg: QuantConfig, xdt: str, N: int, K: int, M: int, seen: set) -> int:
    """compile_check for one tensor-descriptor launch (``QuantConfig.tma``): 1 if it fails or nears
    the shared-memory limit, else 0 (also 0 for a launch already compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    KB = K if bits == 8 else -(-K // GROUP) * GROUP // 2
    sh = qm.tma_shape(M, KB, bits, GROUP, cfg)  # the library's own launch shape
    split, bm, box = sh.split, sh.bm, sh.box
    key = (bits, cfg, xdt, sh)
    if key in seen:
        return 0
    seen.add(key)
    sig = dict(x_desc=f"tensordesc<{xdt}[{bm}, {box}]>", w_desc=f"tensordesc<{'i8' if bits == 8 else 'u8'}[{cfg.block_n}, {box}]>",
               s_ptr="*fp32", y_ptr="*" + xdt, ws_ptr="*fp32", cnt_ptr="*i32", M="i32", N="i32")
    ce = dict(BLOCK_M=bm, BLOCK_N=cfg.block_n, SPLIT=split, STAGES=cfg.num_stages, SWAP=cfg.swap)
    if bits == 8:
        fn = qm._q8_tma_kernel
        sig.update(K="i32", stride_ym="i32")
        ce.update(BLOCK_K=cfg.block_k, KPS=sh.kb_per_split, FIXED=sh.fixed)
    else:
        fn = qm._q4_tma_kernel
        sig.update(KB="i32", kb_per_split="i32", stride_ym="i32")
        ce.update(GROUP=GROUP, GROUPS=cfg.block_k // GROUP, ASM=cfg.asm, BF16=xdt == "bf16")
    sig.update({k: "constexpr" for k in ce})
    try:
        k = triton.compile(ASTSource(fn, sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps))
        if k.metadata.shared > 160 * 1024:
            print(f"WARN shared {k.metadata.shared >> 10} KiB: bits={bits} {xdt} M={M} split={split} {cfg}")
            return 1
    except Exception as e:
        print(f"FAIL bits={bits} {xdt} M={M} split={split} {cfg}: {type(e).__name__}: {str(e)[:300]}")
        return 1
    return 0


def bench(fns, warmup: int, rep: int) -> float:
    """Median ms of one call: a CUDA graph of back-to-back calls cycling through ``fns`` (different
    weight copies, together > 2x L2, so every call streams its weights from HBM as one layer after
    another does in a decode step), replayed ``rep`` times; launch gaps are those of a captured step."""
    if DEV != "cuda":  # --smoke: host timer, no meaning beyond exercising the script
        t = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - t) * 1e3
    calls = max(32, 2 * len(fns))
    seq = [fns[i % len(fns)] for i in range(calls)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # compile, allocate split-K workspaces before capture
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in seq:
            f()
    for _ in range(max(1, warmup // 5)):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(3, rep // 8)):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop sweeping configs after this long")
    ap.add_argument("--no-sweep", action="store_true", help="time only the library's default configs")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rep", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=12, help="processes that pre-compile the kernels (0: none)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run under TRITON_INTERPRET=1 (tiny shapes)")
    ap.add_argument("--compile-check", action="store_true", help="compile all variants offline for sm_90, no GPU")
    ap.add_argument("--ms", default="1,16,64", help="comma-separated M values to time (default 1,16,64)")
    args = ap.parse_args()
    global DEV, SHAPES, MS
    MS = tuple(int(m) for m in args.ms.split(","))
    if args.compile_check:
        return compile_check(args)
    if args.smoke:
        DEV, SHAPES, MS = "cpu", [("tiny", 100, 300)], (1, 16)
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_f = open(out_dir / "quant_bench.log", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    t0 = time.time()
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        log(f"device {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MB; torch {torch.__version__}, "
            f"triton {triton.__version__}")
    else:
        l2 = 1 << 20
    a = torch.empty(1 << (30 if DEV == "cuda" else 20), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    a.random_(0, 255)
    ms = bench([lambda: b.copy_(a)], 5, 30)
    copy_bw = 2 * a.numel() / ms / 1e6
    log(f"device-to-device copy: {copy_bw:.0f} GB/s (read + write)")
    del a, b

    if DEV == "cuda" and args.jobs > 0:
        prewarm(warm_tasks(args), args.jobs, log)
    all_ok = check_ragged(log)
    all_ok &= check_e2e(log)

    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    tuned: dict[str, dict] = {}
    for name, N, K in SHAPES:
        wq = {bits: make_weight(bits, N, K, gen) for bits in (8, 4)}
        w16 = wq[8][2].to(torch.bfloat16 if DEV == "cuda" else torch.float16)  # bf16 baseline weight (any values of the right size)
        n16 = max(2, min(8, math.ceil(2.5 * l2 / (N * K * 2))))
        w16s = [w16] + [w16.clone() for _ in range(n16 - 1)]
        copies = {}
        for bits in (8, 4):
            q, s, _ = wq[bits]
            nb = q.numel() * q.element_size() + s.numel() * 4
            n = max(2, min(32, math.ceil(2.5 * l2 / nb)))
            copies[bits] = [(q, s)] + [(q.clone(), s.clone()) for _ in range(n - 1)]
        for M in MS:
            # bf16 activations (fp16 in --smoke: the Triton interpreter mishandles bf16 tl.dot)
            x = torch.randn(M, K, device=DEV, generator=gen).to(torch.bfloat16 if DEV == "cuda" else torch.float16)
            t16 = bench([lambda w=w: torch.matmul(x, w.t()) for w in w16s], args.warmup, args.rep)
            row = dict(layer=name, N=N, K=K, M=M, bf16_us=t16 * 1e3)
            for bits in (8, 4):
                q, s, deq = wq[bits]
                ref = x.float() @ deq.t()
                nbytes = q.numel() * q.element_size() + s.numel() * 4 + x.numel() * 2 + M * N * 2
                dflt = default_config(M, N, K, bits, GROUP, x.device, dtype=x.dtype)
                cands = [dflt] + ([] if args.no_sweep else [c for c in candidates(bits, M) if c != dflt])
                if args.smoke:
                    cands = cands[:3]
                best = None
                t_default = None
                for cfg in cands:
                    if cfg is not dflt and time.time() - t0 > args.budget_s:
                        break
                    try:
                        e = rel_err(quant_matmul(x, q, s, bits, GROUP, cfg), ref)
                    except Exception as ex:  # a config that does not compile on this Triton
                        log(f"  skip {cfg}: {type(ex).__name__}: {str(ex)[:120]}")
                        continue
                    if not e <= 1e-2:
                        all_ok = False
                        log(f"FAIL {name} M={M} bits={bits} {cfg}: rel err {e:.2e}")
                        continue
                    try:
                        t = bench([lambda q=q, s=s, c=cfg: quant_matmul(x, q, s, bits, GROUP, c) for q, s in copies[bits]],
                                  args.warmup, args.rep)
                    except Exception as ex:
                        log(f"  skip {cfg} (timing): {type(ex).__name__}: {str(ex)[:120]}")
                        continue
                    log_f.write(f"  t {name} M={M} w{bits} {t * 1e3:.2f} us {cfg}\n")
                    if cfg is dflt:
                        t_default = t
                    if best is None or t < best[0]:
                        best = (t, cfg, e)
                if best is None:
                    all_ok = False
                    log(f"FAIL {name} M={M} bits={bits}: no config passed")
                    best = (float("nan"), dflt, float("nan"))
                t, cfg, e = best
                row[f"w{bits}_us"] = t * 1e3
                row[f"w{bits}_default_us"] = t_default * 1e3 if t_default else float("nan")
                row[f"w{bits}_speedup"] = t16 / t
                row[f"w{bits}_GBs"] = nbytes / (t * 1e-3) / 1e9
                row[f"w{bits}_err"] = e
                row[f"w{bits}_cfg"] = cfg.__dict__
                tuned[f"{name} M={M} w{bits}"] = cfg.__dict__
            row["bf16_GBs"] = (N * K * 2 + x.numel() * 2 + M * N * 2) / (t16 * 1e-3) / 1e9
            rows.append(row)
            log(json.dumps(row))
        del wq, w16, w16s, copies
        torch.cuda.empty_cache()

    (out_dir / "quant_bench.json").write_text(json.dumps(dict(rows=rows, copy_GBs=copy_bw, ok=all_ok), indent=1))
    log("\nbest configs: " + json.dumps(tuned))
    # ---- summary table (printed last)
    hdr = ("| layer | N x K | M | bf16 us | W8A16 us (default) | W8A16 x | W8 GB/s | W4A16 us (default) | W4A16 x | W4 GB/s |")
    lines = [hdr, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['N']}x{r['K']} | {r['M']} | {r['bf16_us']:.1f} | {r['w8_us']:.1f} ({r['w8_default_us']:.1f}) | "
            f"{r['w8_speedup']:.2f} | {r['w8_GBs']:.0f} | {r['w4_us']:.1f} ({r['w4_default_us']:.1f}) | {r['w4_speedup']:.2f} | "
            f"{r['w4_GBs']:.0f} |"
        )
    for M in MS:
        sel = [r for r in rows if r["M"] == M]
        if not sel:
            continue
        g8 = math.exp(sum(math.log(r["w8_speedup"]) for r in sel) / len(sel))
        g4 = math.exp(sum(math.log(r["w4_speedup"]) for r in sel) / len(sel))
        tot16 = sum(r["bf16_us"] for r in sel)
        lines.append(f"\nM={M}: speedup geo-mean int8 {g8:.2f}x, int4 {g4:.2f}x; over the 4 shapes' summed time "
                     f"int8 {tot16 / sum(r['w8_us'] for r in sel):.2f}x, int4 {tot16 / sum(r['w4_us'] for r in sel):.2f}x")
    lines.append(f"\ncorrectness (ragged, e2e, every timed config vs fp32 reference): {'PASS' if all_ok else 'FAIL'}; "
                 f"copy ceiling {copy_bw:.0f} GB/s; total {time.time() - t0:.0f} s")
    table = "\n".join(lines)
    (out_dir / "quant_bench.md").write_text(table + "\n")
    log("\n" + table)
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
