"""verify(N) for N between 8 and 32 (finer buckets?), 8B bf16, PDL default; and the GEMM picks."""
import json, os, time, torch
import specdec
from specdec.cuda_graph import CUDAGraphRunner
from specdec.generate import verify_step
from specdec import gemm_pick
from verifiers import auto_verifier
from benchmarks.bench_gpu import llama3_8b_config
from transformers import AutoModelForCausalLM
torch.inference_mode().__enter__()
dev = torch.device("cuda")
cfg = llama3_8b_config()
torch.manual_seed(0)
with torch.device(dev):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
ids = torch.randint(0, cfg.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1)).to(dev)
ver = auto_verifier(dev)
B = (1, 2, 4, 8, 9, 10, 12, 16, 24, 32)
r = CUDAGraphRunner(model, ver, verify_step, 1, 1024, buckets=B, compile=True)
t0 = time.perf_counter()
specdec.generate(model, ids, max_new_tokens=8, cuda_graphs=r, verifier=ver, eos_token_id=-1)
print("first call", time.perf_counter() - t0, flush=True)
res = {}
for rep in range(2):
    for n in B:
        res.setdefault(n, []).append(r.time_bucket(n, 256, iters=30) * 1e3)
print({n: [round(x, 3) for x in v] for n, v in res.items()}, flush=True)
summ = gemm_pick.shared_picker().summary()
picks = {k: (v["pick"], {f: round(u, 1) for f, u in v["us"].items()}) for k, v in summ.items()}
for k, v in picks.items():
    print(k, v, flush=True)
json.dump({"verify_ms": res, "picks": picks}, open(os.path.join(os.environ.get("OUT", "/tmp"), "s13_buckets.json"), "w"), indent=1)
