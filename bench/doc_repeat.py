"""Long-range recall by document repeat: does a cache policy still "see" a document it was fed?

Context = document D followed by the start of D again. The model prefills D, then decodes
teacher-forced through the copy, so every copy token is predicted through the (compressed)
cache. A model that can look back copies almost perfectly (low NLL, high top-1); a policy
that has lost D falls toward the NLL of reading D for the first time.

    python bench/doc_repeat.py --context 2048 4096 --policies full tailor sparse sparse:channels kivi streaming
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import resolve_model  # noqa: E402
from kvcache import CacheConfig, KVCache  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


@torch.inference_mode()
def first_pass_nll(model, ids: list[int]) -> float:
    """Mean NLL of reading `ids` for the first time (full cache, one prefill)."""
    dev = model.embed.weight.device
    cache = KVCache(model, len(ids), device=dev, dtype=model.embed.weight.dtype)
    logits = model(torch.tensor([ids], device=dev), cache, 0, logits_at=slice(None))[0]
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:], device=dev)).item()


@torch.inference_mode()
def document_repeat(model, cfg: CacheConfig, doc: list[int], context: int, n_copy: int | None = None) -> dict:
    """Prefill doc[:n], then decode teacher-forced through doc[:n_copy] again; n + n_copy = context.

    n_copy defaults to a quarter of the context (bounded by the document's length)."""
    n_copy = n_copy or context // 4
    n = min(len(doc), context - n_copy)
    n_copy = context - n
    dev, dtype = model.embed.weight.device, model.embed.weight.dtype
    cache = KVCache(model, context, cfg, device=dev, dtype=dtype)
    logits = model.prefill(torch.tensor([doc[:n]], device=dev), cache)[0]
    nll, top1 = [], []
    t0 = time.perf_counter()
    for i, target in enumerate(doc[:n_copy]):
        lp = logits.float().log_softmax(-1)
        nll.append(-lp[target].item())
        top1.append(int(lp.argmax()) == target)
        logits = model(torch.tensor([[target]], device=dev), cache, n + i)[0, -1]
    mem = cache.memory_report()
    return {"policy": label(cfg), "context": context, "prefill": n, "copy": n_copy,
            "top1": sum(top1) / len(top1), "nll": sum(nll) / len(nll),
            "device_kv_bytes": mem["device_bytes"], "compression": mem["compression"],
            "h2d_bytes_per_step": mem["h2d_bytes_per_step"], "s_per_step": (time.perf_counter() - t0) / len(nll)}


def label(cfg: CacheConfig) -> str:
    if cfg.policy == "tailor":
        layers = "online" if cfg.quant_layers is None else ",".join(map(str, cfg.quant_layers)) or "none"
        extra = f"-{cfg.bits}bit[{layers}]/{cfg.select}"
    elif cfg.policy == "kivi":
        extra = f"-{cfg.bits}bit"
    elif cfg.policy == "sparse":
        extra = f"/{cfg.select}"
    else:
        extra = ""
    return cfg.policy + extra


def parse_policy(spec: str, model=None, **knobs) -> CacheConfig:
    """'tailor', 'sparse:channels', 'kivi:1' (bits) -> CacheConfig. tailor takes its layers and bits
    from the model's plan in plans/, as generate.py does (online identification without one)."""
    name, _, opt = spec.partition(":")
    if opt in ("sketch", "channels"):
        knobs["select"] = opt
    elif opt:
        knobs["bits"] = int(opt)
    if name == "tailor" and model is not None:
        from profile_layers import find_plan, load_plan
        path = find_plan(model)
        if path is not None:
            plan = load_plan(path, model)
            knobs = {"quant_layers": tuple(plan["quant_layers"]), "bits": plan["parameters"]["bits"], **knobs}
    return CacheConfig(name, **knobs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--doc", default=str(ROOT / "examples" / "lighthouse.txt"))
    p.add_argument("--context", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--policies", nargs="+", default=["full", "tailor", "tailor:channels", "tailor:1", "sparse",
                                                     "sparse:channels", "kivi", "kivi:1", "streaming"],
                   help="policy[:sketch|channels|BITS]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args()
    model_dir = resolve_model(args.model)
    model = load_model(model_dir, args.device, getattr(torch, args.dtype))
    doc = Tokenizer(model_dir).encode(Path(args.doc).read_text(), add_special_tokens=False)
    print(f"# {model_dir.name} on {args.device} ({args.dtype}); document {Path(args.doc).name}, {len(doc)} tokens; "
          f"first-pass NLL {first_pass_nll(model, doc[:1024]):.2f} (its first 1024 tokens)", flush=True)
    print(f"| context | policy | top-1 | NLL | device KV MiB | vs full | H2D KiB/step |\n|---|---|---|---|---|---|---|")
    for context in args.context:
        for spec in args.policies:
            r = document_repeat(model, parse_policy(spec, model), doc, context)
            print(f"| {context} | {r['policy']} | {r['top1']:.3f} | {r['nll']:.3f} | {r['device_kv_bytes'] / 2**20:.2f} "
                  f"| {r['compression']:.1f}x | {r['h2d_bytes_per_step'] / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
