"""Decode latency at long context: Llama-3.1-8B shapes, random bf16 weights, batch 1, one GPU.

Speed does not depend on weight values, so the model is built with random weights (no download).
Every compressed policy runs with GPU memory capped at --cap-gib (24: a 24 GB card); the full cache
runs uncapped (it does not fit beside the weights at long context). The peer is HF transformers'
own Llama with its offloaded cache (DynamicCache(offloading=True)), prefilled in chunks, capped too.

Per run: prefill seconds, decode ms/token (median of --steps steps after warm-up, min and max),
peak GPU memory, host->device bytes per token, and the ratio to a floor: the bytes a step must
read from HBM (weights + the device-resident KV it reads) at the measured HBM bandwidth, plus the
host->device bytes at the measured pinned-copy bandwidth.

    python bench/latency.py                                  # 16k 32k 64k 128k, every policy
    python bench/latency.py --contexts 131072 --policies tailor full
"""
import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accuracy import selector_knobs  # noqa: E402
from generate import Decoder  # noqa: E402
from inputs import plan_memory  # noqa: E402
from kvcache import CacheConfig, KVCache  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from plots import try_plot  # noqa: E402
from results import publish  # noqa: E402

LLAMA31_8B = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256,
                       norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072 + 1024,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
POLICIES = {  # label -> CacheConfig; tailor quantizes layer 0 (the paper's identification for Llama-3.1-8B)
    "full": CacheConfig("full"),
    "tailor-1": CacheConfig("tailor", quant_layers=(0,), bits=1),
    "kivi-2": CacheConfig("kivi", bits=2),
    "sparse": CacheConfig("sparse"),
    "sparse/channels": CacheConfig("sparse", select="channels"),
    "streaming": CacheConfig("streaming", recent=184),  # 8 + 184: the device tokens of a 192 budget
}
GiB = 2 ** 30


def policy(label: str) -> CacheConfig:
    """A label of POLICIES, or one with another selector, its options and a budget: "tailor-1/sketch-heads",
    "tailor-1/shortlist:2", "tailor-1/sketch:1b@448" (as bench/accuracy.py writes them); "tailor-1+split": the
    top-k split by layer like the default model's plan (split_like_the_default_plan); "kvcomp:0.1": every layer
    on research/kvcomp.py's compressor at that error bound."""
    if label in POLICIES:
        return POLICIES[label]
    if label.startswith("kvcomp:"):
        from research.kvcomp import quantizer
        return CacheConfig("kivi", quantizer=quantizer(float(label[7:])))
    label, _, budget = label.partition("@")
    base, _, select = label.partition("/")
    base, split = base.removesuffix("+split"), base.endswith("+split")
    cfg = replace(POLICIES[base], **selector_knobs(select), **({"budget": int(budget)} if budget else {}))
    return replace(cfg, layer_topk=split_like_the_default_plan(LLAMA31_8B.n_layers, cfg.topk)) if split else cfg


def split_like_the_default_plan(n_layers: int, topk: int) -> tuple[int, ...]:
    """The shipped plan's split of the default model's retrieved tokens, stretched over n_layers by depth and
    scaled to topk on average: a split as uneven as a real one (the speed depends on the spread of the top-k,
    not on which layer gets which)."""
    from layer_plans import PLANS, read_plan, split_topk
    shares = [r.get("topk", 0) for r in read_plan(PLANS / "SmolLM2-135M-Instruct.Q4_1.json")["layers"]]
    stretched = [shares[round(i * (len(shares) - 1) / (n_layers - 1))] for i in range(n_layers)]
    return split_topk({"layers": [{"topk": k} for k in stretched]}, topk)


def sync():
    torch.cuda.synchronize()


def measure_bandwidth() -> dict:
    """HBM copy (read + write) and pinned host->device copy bandwidths, bytes/s."""
    def best(fn, nbytes, reps=5):
        fn()
        sync()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return nbytes / min(times)
    a = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    hbm = best(lambda: b.copy_(a), 2 * GiB)
    h = torch.empty(GiB // 2, dtype=torch.uint8, pin_memory=True)
    pcie = best(lambda: a[:GiB // 2].copy_(h, non_blocking=True), GiB // 2)
    return {"hbm": hbm, "pcie": pcie}


def on_gpu_in_bf16(build):
    """Build a module with its parameters created on the GPU in bf16 (random init, no host copy)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return build().eval()
    finally:
        torch.set_default_dtype(torch.float32)


def weight_bytes_read(model) -> int:
    """Bytes of weights a decode step reads: all of them but the embedding table (one row)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed"))


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return times


@torch.inference_mode()
def run_ours(model, label, cfg, context, steps, warmup, chunk, bw, cuda_graph=True) -> dict:
    a = model.args
    max_len = context + warmup + steps + 1
    plan = plan_memory(model, max_len, cfg, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    prompt = torch.randint(0, a.vocab_size, (1, context), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    n = min(context, 2 * chunk)  # compile the prefill's kernels first: compilation is not prefill time
    model.prefill(prompt[:, :n], KVCache(model, n, cfg, device="cuda", dtype=torch.bfloat16, kernels=True), chunk)
    torch.cuda.reset_peak_memory_stats()
    cache = KVCache(model, max_len, cfg, device="cuda", dtype=torch.bfloat16, kernels=True)
    sync()
    t = time.perf_counter()
    logits = model.prefill(prompt, cache, chunk)
    sync()
    prefill_s = time.perf_counter() - t
    dec = Decoder(model, cache, cuda_graph=cuda_graph)
    pos = [context]
    tok = int(logits[0].argmax())

    def step():
        dec.step(tok, pos[0])
        pos[0] += 1
    times = time_steps(step, warmup, steps)
    mem = cache.memory_report()
    if cfg.policy == "full":  # reads the K/V of the context, not the whole buffer
        kv_read = 2 * a.n_layers * a.n_kv_heads * a.head_dim * (context + warmup + steps) * 2
    else:
        kv_read = mem["device_bytes"]
    floor_ms = 1e3 * ((weight_bytes_read(model) + kv_read) / bw["hbm"] + mem["h2d_bytes_per_step"] / bw["pcie"])
    med = statistics.median(times)
    out = {"policy": label, "context": context, "prefill_s": prefill_s, "ms_median": med, "ms_min": min(times),
           "ms_max": max(times), "steps": steps, "peak_gib": torch.cuda.max_memory_allocated() / GiB,
           "device_kv_gib": mem["device_bytes"] / GiB, "host_kv_gib": mem["host_bytes"] / GiB,
           "h2d_mib_per_token": mem["h2d_bytes_per_step"] / 2**20, "floor_ms": floor_ms, "x_floor": med / floor_ms,
           "planned_device_gib": plan["device_bytes"] / GiB, "cuda_graph": cuda_graph}
    return out


@torch.inference_mode()
def run_hf(context, steps, warmup, chunk, bw) -> dict:
    """transformers' LlamaForCausalLM (random bf16 weights, same shapes) with its offloaded DynamicCache."""
    import os
    os.environ.setdefault("USE_HUB_KERNELS", "0")  # transformers >= 5 would import the hub's `kernels` package,
    import transformers                             # and kernels.py answers to that name here
    import transformers.utils.import_utils
    transformers.utils.is_kernels_available = transformers.utils.import_utils.is_kernels_available = lambda *a, **k: False
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    a = LLAMA31_8B
    config = LlamaConfig(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads, intermediate_size=a.ffn_dim, vocab_size=a.vocab_size,
                         rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, rope_scaling=dict(a.rope_scaling),
                         max_position_embeddings=a.max_seq_len, attn_implementation="sdpa")
    model = on_gpu_in_bf16(lambda: LlamaForCausalLM(config))
    torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache(config=config, offloading=True)
    prompt = torch.randint(0, a.vocab_size, (1, context), device="cuda")
    sync()
    t = time.perf_counter()
    for s in range(0, context, chunk):  # one pass would hold a context x 14336 MLP activation: chunk it
        out = model(input_ids=prompt[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    sync()
    prefill_s = time.perf_counter() - t
    tok = out.logits[:, -1:].argmax(-1)

    def step():
        model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
    times = time_steps(step, warmup, steps)
    kv_bytes = 2 * a.n_layers * a.n_kv_heads * a.head_dim * context * 2
    wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
    floor_ms = 1e3 * ((wbytes + kv_bytes) / bw["hbm"] + kv_bytes / bw["pcie"])  # each step brings every layer back
    med = statistics.median(times)
    res = {"policy": f"HF offloaded (transformers {transformers.__version__})", "context": context,
           "prefill_s": prefill_s, "ms_median": med, "ms_min": min(times), "ms_max": max(times), "steps": steps,
           "peak_gib": torch.cuda.max_memory_allocated() / GiB, "device_kv_gib": None, "host_kv_gib": kv_bytes / GiB,
           "h2d_mib_per_token": kv_bytes / 2**20, "floor_ms": floor_ms, "x_floor": med / floor_ms, "cuda_graph": False}
    return res


@torch.inference_mode()
def profile(model, label, cfg, context, chunk, steps=5):
    """Where a decode step's GPU time goes: the eager kernel path under torch.profiler, per kernel name."""
    cache = KVCache(model, context + steps + 8, cfg, device="cuda", dtype=torch.bfloat16, kernels=True)
    prompt = torch.randint(0, model.args.vocab_size, (1, context), device="cuda")
    tok = int(model.prefill(prompt, cache, chunk)[0].argmax())
    dec = Decoder(model, cache, cuda_graph=False)
    for i in range(3):
        dec.step(tok, context + i)
    sync()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(3, 3 + steps):
            dec.step(tok, context + i)
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) / steps / 1e3
    print(f"\n# {label} at {context}: {sum(e.count for e in kernels) / steps:.0f} kernels per step, "
          f"{total:.2f} ms of GPU time per step (eager)")
    print("| kernel | per step | µs per step | share |\n|---|---|---|---|")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:18]:
        us = e.self_device_time_total / steps
        print(f"| {e.key[:70]} | {e.count / steps:.0f} | {us:.0f} | {us / 10 / total:.0f}% |")


def markdown(rows, gpu, cap) -> str:
    out = [f"{gpu}; Llama-3.1-8B shapes, random bf16 weights, batch 1; compressed policies and HF capped at "
           f"{cap:g} GiB of GPU memory, full uncapped\n",
           "| context | policy | prefill s | decode ms/token (min–max) | peak GPU GiB | H2D MiB/token | floor ms | × floor |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['context']} | {r['policy']} | {r['error']} | | | | | |")
            continue
        out.append(f"| {r['context']} | {r['policy']} | {r['prefill_s']:.1f} | {r['ms_median']:.2f} "
                   f"({r['ms_min']:.2f}–{r['ms_max']:.2f}) | {r['peak_gib']:.1f} | {r['h2d_mib_per_token']:.1f} "
                   f"| {r['floor_ms']:.2f} | {r['x_floor']:.2f} |")
    return "\n".join(out)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["context"], r["ms_median"]) for r in rows if r["policy"] == label and "error" not in r)
        if pts:
            ax.plot([p[0] // 1024 for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (k tokens)")
    ax.set_ylabel("decode ms/token (median, log scale)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--policies", nargs="+", default=list(POLICIES) + ["hf"],
                   help=f"{' '.join(POLICIES)} hf; POLICY/SELECTOR for another selector")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--eager", action="store_true", help="no CUDA graph (the kernels launched one by one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency"))
    p.add_argument("--profile", action="store_true", help="per-kernel GPU time of one decode step, then exit")
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="merge the rows of earlier runs' JSON files into --out (.json, .md, .png); runs nothing")
    args = p.parse_args()
    if args.replot:
        runs = [json.loads(Path(f).read_text()) for f in args.replot]
        meta, rows = runs[0]["meta"], [r for run in runs for r in run["rows"]]
        return write(rows, meta, Path(args.out))
    if not torch.cuda.is_available():
        raise SystemExit("bench/latency.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory
    bw = measure_bandwidth()
    print(f"# {gpu}: HBM copy {bw['hbm'] / 1e12:.2f} TB/s, pinned H2D {bw['pcie'] / 1e9:.1f} GB/s", flush=True)
    rows = []
    if args.profile:
        model = on_gpu_in_bf16(lambda: Transformer(LLAMA31_8B))
        for context in args.contexts:
            for label in args.policies:
                profile(model, label, policy(label), context, args.chunk)
        return

    def cap(on):
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GiB / total) if on else 1.0)

    meta = {"gpu": gpu, "bandwidth": bw, "cap_gib": args.cap_gib, "torch": torch.__version__, "args": vars(args)}

    def done(r):  # every finished row is written at once: an interrupted run keeps what it measured
        rows.append(r)
        print(json.dumps(r), flush=True)
        write(rows, meta, Path(args.out))
        gc.collect()
        torch.cuda.empty_cache()

    ours = [x for x in args.policies if x != "hf"]
    if ours:
        model = on_gpu_in_bf16(lambda: Transformer(LLAMA31_8B))
        assert model.inv_freq.dtype == torch.float32
        for context in args.contexts:
            for label in ours:
                cap(label != "full")
                try:
                    r = run_ours(model, label, policy(label), context, args.steps, args.warmup, args.chunk, bw,
                                 not args.eager)
                except torch.OutOfMemoryError as e:
                    r = {"policy": label, "context": context, "error": f"out of memory: {str(e).splitlines()[0][:80]}"}
                done(r)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if "hf" in args.policies:
        for context in args.contexts:
            cap(True)
            try:
                r = run_hf(context, args.steps, args.warmup, args.chunk, bw)
            except torch.OutOfMemoryError as e:
                r = {"policy": "HF offloaded", "context": context, "error": f"out of memory: {str(e).splitlines()[0][:80]}"}
            done(r)


def write(rows, meta, out: Path):
    rows = sorted(rows, key=lambda r: (r["context"], r["policy"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta["gpu"], meta["cap_gib"])
    try_plot(lambda: plot(rows, out.with_suffix(".png"), f"{meta['gpu']}, Llama-3.1-8B shapes, bf16, batch 1"))
    publish(out.with_suffix(".md"), table)
    print("\n" + table)


if __name__ == "__main__":
    main()
