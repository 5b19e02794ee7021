"""Decide per layer between quantization and offloading; write the decision as a plan file.

TailorKV (arXiv 2505.19586) quantizes the layers whose attention is spread out and offloads the
layers where a few tokens dominate. This tool measures both ways of telling them apart, on
calibration text that is not used for the accuracy numbers:

  proxy   the paper's: over the last 32 queries of each prefill chunk, the attention mass outside
          each query's top alpha (5%) keys, averaged over queries and heads; > tau (0.2) -> quant.
  direct  the damage itself: replace only layer l by quant (1 and 2 bits) or by sparse (the chosen
          budget), every other layer full, decode teacher-forced over held-out tokens and record
          KL(full || that) and top-1 agreement; quant wins where its KL is the smaller.

It also splits the offloaded layers' retrieved tokens between them (the same total as top-k on
each): per layer, the attention mass that k retrieved tokens leave out (the tail, below), weighted
by what that mass costs the layer (its direct KL per unit of tail at the plan's budget), tokens
handed out 8 at a time where they remove the most.

    python profile_layers.py                          # default model, bundled calibration text
    python profile_layers.py --model DIR --calib a.txt b.txt --method proxy

Writes plans/<model>.json (and a PNG beside it with matplotlib); generate.py --cache tailor finds
the plan by the model's fingerprint.
"""
import argparse
import copy
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch

from checkpoint import resolve_model
from inputs import check_outputs, positive_int
from kvcache import SELECTORS, CacheConfig, ConfigError, KVCache
from layer_plans import PLANS, ProxyMeter, fingerprint, model_name, read_plan, save_plan
from model import PREFILL_CHUNK, load_model
from tokenizer import Tokenizer

VERSION = 1
ROOT = Path(__file__).resolve().parent
DEFAULT_CALIB = sorted((ROOT / "examples" / "calibration").glob("*"))


# -------------------------------------------------------------------------------- measuring

SPLIT_STEP = 8  # the split hands out retrieved tokens in steps of 8, from top-k / 8 up to 4 x top-k a layer


class TailMeter:
    """Per layer, the attention mass a sparse layer leaves out when it retrieves k tokens, k = 0, 8, ..., kmax:
    for the last `n_queries` queries of each prefill chunk, each KV head's attention (the mean over its group
    of query heads) minus what the sinks and the window hold, minus its k largest offloaded weights (ranked
    exactly: the best any selector can do). Same interface as layer_plans.ProxyMeter."""

    def __init__(self, n_layers, cfg: CacheConfig, n_queries=64):
        self.sink, self.recent, self.n_queries = cfg.sink, cfg.recent, n_queries
        self.grid = list(range(0, 4 * cfg.topk + 1, SPLIT_STEP))
        self.sum = torch.zeros(n_layers, len(self.grid), dtype=torch.float64)
        self.count = torch.zeros(n_layers, dtype=torch.float64)

    def observe(self, layer, q, k):
        """q: (1, H, T, hd) a chunk's queries; k: (1, n_kv, S, hd) every key up to the chunk's end."""
        H, T, hd = q.shape[1:]
        n_kv, S = k.shape[1:3]
        n, G, dev = min(self.n_queries, T), H // n_kv, q.device
        scores = (q[0, :, -n:].float().reshape(n_kv, G * n, hd) @ k[0].float().transpose(1, 2)).view(n_kv, G, n, S)
        pos, keys = torch.arange(S - n, S, device=dev)[:, None], torch.arange(S, device=dev)
        p = scores.mul(hd ** -0.5).masked_fill(keys > pos, float("-inf")).softmax(-1).mean(1)   # (n_kv, n, S)
        offloaded = (keys >= self.sink) & (keys <= pos - self.recent)                             # (n, S)
        held = (p * ~offloaded).sum(-1, keepdim=True)                                             # sinks + window
        top = (p * offloaded).sort(-1, descending=True).values.cumsum(-1)
        at = torch.tensor(self.grid[1:], device=dev).clamp(max=S) - 1
        got = torch.cat([torch.zeros_like(held), top[..., at]], -1)                               # (n_kv, n, grid)
        self.sum[layer] += (1 - held - got).clamp(min=0).sum((0, 1)).double().cpu() / n_kv
        self.count[layer] += n

    def tails(self) -> torch.Tensor:  # (n_layers, len(grid))
        return self.sum / self.count.clamp(min=1)[:, None]


def allocate_topk(tails: list[list[float]], weights: list[float], topk: int, step: int = SPLIT_STEP,
               floor: int | None = None) -> list[int]:
    """Top-k per layer, summing to topk x layers: tails[l][j] the mass layer l leaves out with j x step tokens
    (falling, and flatter as j grows), weights[l] what a unit of it costs. Every layer starts at `floor` (default
    topk / 8); each further step of tokens goes where it removes the most weighted tail (greedy, which is optimal
    for convex tails)."""
    k = [max(step, (topk // 8 if floor is None else floor) // step * step)] * len(tails)
    for _ in range((topk * len(tails) - sum(k)) // step):
        gain = [w * (t[j // step] - t[j // step + 1]) if j // step + 1 < len(t) else -1.0
                for t, w, j in zip(tails, weights, k)]
        k[max(range(len(k)), key=gain.__getitem__)] += step
    return k

@torch.inference_mode()
def measure_proxy(model, docs: list[list[int]], cfg: CacheConfig, chunk: int, progress=None) -> tuple:
    """The proxy per layer and head (n_layers, H) and the tails per layer (n_layers, grid) (TailMeter),
    accumulated over every document's prefill."""
    a, dev, dtype = model.args, model.embed.weight.device, model.embed.weight.dtype
    proxy, tail = ProxyMeter(a.n_layers, a.n_heads, cfg.alpha, cfg.proxy_queries), TailMeter(a.n_layers, cfg)
    for doc in docs:
        for meter in (proxy, tail):
            cache = KVCache(model, len(doc), device=dev, dtype=dtype)
            cache.meter = meter
            model.prefill(torch.tensor([doc], device=dev), cache, chunk)
        if progress:
            progress(1)
    return proxy.head_scores(), tail.tails()


@torch.inference_mode()
def measure_direct(model, docs: list[list[int]], cfg: CacheConfig, heldout: int, chunk: int, progress=None) -> list:
    """Per layer, KL(full || variant) and top-1 agreement with only that layer compressed.

    Each document is prefilled once with a full cache; every variant reuses that prefill (it is
    exact in every policy) and swaps in one compressed layer loaded with the prompt's K/V.
    """
    from generate import compare
    a, dev, dtype = model.args, model.embed.weight.device, model.embed.weight.dtype
    variants = {**{f"quant{b}": replace(cfg, bits=b) for b in sorted({1, 2, cfg.bits})}, "sparse": cfg}
    sums = [{f"{m}_{v}": 0.0 for v in variants for m in ("kl", "top1")} for _ in range(a.n_layers)]
    steps = 0
    for doc in docs:
        prompt, target = doc[:-heldout], doc[-heldout:]
        full = KVCache(model, len(doc), device=dev, dtype=dtype)
        first = model.prefill(torch.tensor([prompt], device=dev), full, chunk)
        ref = teacher_forced(model, full, first, target, len(prompt))
        for layer in range(a.n_layers):
            for name, vcfg in variants.items():
                cache = swap_layer(full, layer, "sparse" if name == "sparse" else "quant", vcfg, len(prompt))
                got = teacher_forced(model, cache, first, target, len(prompt))
                for r, g in zip(ref, got):
                    c = compare(r, g)
                    sums[layer][f"kl_{name}"] += c["kl"]
                    sums[layer][f"top1_{name}"] += c["top1"]
            if progress:
                progress(1 / len(docs))
        steps += len(target) - 1
    return [{k: v / steps for k, v in s.items()} for s in sums]


def teacher_forced(model, cache, first_logits, target, pos) -> list[torch.Tensor]:
    """Logits predicting target[1:], feeding target[:-1] one by one from position pos."""
    out = []
    for i, tok in enumerate(target[:-1]):
        out.append(model(torch.tensor([[tok]], device=first_logits.device), cache, pos + i)[0, -1])
    return out


def swap_layer(full: KVCache, layer: int, kind: str, cfg: CacheConfig, n: int) -> KVCache:
    """A cache that shares the full cache's prompt K/V in every layer but `layer`, which is `kind`.

    Decoding only writes positions >= n, so the shared full layers stay valid across variants."""
    cache = copy.copy(full)
    cache.cfg, cache.kinds, cache.layers = cfg, list(full.kinds), list(full.layers)
    cache.kinds[layer] = kind
    cache.layers[layer] = cache._new_layer(layer, kind)
    cache.layers[layer].load(full.layers[layer].k[:, :, :n], full.layers[layer].v[:, :, :n], 0)
    return cache


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


# -------------------------------------------------------------------------------------- plan

def make_plan(model, model_dir, sources, docs, cfg, method, heads, tails, direct, chunk, heldout,
              split_floor=None) -> dict:
    proxy = heads.mean(1).tolist()
    layers = [{"layer": i, "proxy": round(proxy[i], 5), "proxy_heads": [round(x, 5) for x in heads[i].tolist()],
               "tail": [round(x, 5) for x in tails[i].tolist()],
               **({k: round(v, 6) for k, v in direct[i].items()} if direct else {})} for i in range(len(proxy))]
    plan = {
        "tool": "profile_layers.py", "version": VERSION,
        "model": {"name": model_name(model_dir), "fingerprint": fingerprint(model)},
        "calibration": {"sources": [{"file": s.name, "tokens": len(d)} for s, d in zip(sources, docs)],
                        "tokens": sum(len(d) for d in docs)},
        "parameters": {"alpha": cfg.alpha, "proxy_queries": cfg.proxy_queries, "prefill_chunk": chunk, "split_step": SPLIT_STEP,
                       **({"split_floor": split_floor} if split_floor is not None else {}),
                       "budget": cfg.budget, "sink": cfg.sink, "recent": cfg.recent, "select": cfg.select,
                       "heldout": heldout if direct else None,
                       "dtype": str(model.embed.weight.dtype).removeprefix("torch.")},
        "layers": layers,
    }
    return redecide(plan, cfg, method)


def table(plan: dict) -> str:
    has_direct = "kl_sparse" in plan["layers"][0]
    bits = plan["parameters"]["bits"]
    head = f"{'layer':>5} {'proxy':>7} " + (f"{'KL q1':>8} {'KL q2':>8} {'KL sparse':>9} {'top1 q' + str(bits):>8} "
                                           f"{'top1 sp':>8} " if has_direct else "") + "decision"
    rows = [head]
    for r in plan["layers"]:
        line = f"{r['layer']:>5} {r['proxy']:>7.3f} "
        if has_direct:
            line += (f"{r['kl_quant1']:>8.4f} {r['kl_quant2']:>8.4f} {r['kl_sparse']:>9.4f} "
                     f"{r[f'top1_quant{bits}']:>8.3f} {r['top1_sparse']:>8.3f} ")
        rows.append(line + r["decision"] + (f" top-{r['topk']}" if r.get("topk") else ""))
    rows.append(f"quantized layers: {plan['quant_layers']}")
    if "proxy_vs_direct" in plan:
        p = plan["proxy_vs_direct"]
        rows.append(f"proxy vs direct: Spearman {p['spearman']:+.3f}; decisions agree on {p['decisions_agree']}"
                    f"/{len(plan['layers'])} layers")
    return "\n".join(rows)


def plot(plan: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = plan["layers"]
    n = len(layers)
    x = list(range(n))
    has_direct, has_split = "kl_sparse" in layers[0], any(r.get("topk") for r in layers)
    fig, axes = plt.subplots(2 + has_direct + has_split, 1, sharex=True,
                             figsize=(max(8, n * 0.32), 6 + 3 * has_direct + 2 * has_split),
                             gridspec_kw={"height_ratios": [2] + [2] * has_direct + [1.4] * has_split + [1.6]})
    ax = axes[0]
    colors = ["tab:orange" if r["decision"] == "quant" else "tab:blue" for r in layers]
    ax.bar(x, [r["proxy"] for r in layers], color=colors)
    ax.axhline(plan["parameters"]["tau"], color="k", ls="--", lw=1, label=f"tau = {plan['parameters']['tau']}")
    ax.set_ylabel("mass outside top 5%")
    ax.set_title(f"{plan['model']['name']}: orange = quantize to {plan['parameters']['bits']} bits, blue = offload "
                 f"({plan['parameters']['method']} method)")
    ax.legend(loc="upper right")
    if has_direct:
        ax = axes[1]
        for key, label, style in (("kl_quant1", "quant 1-bit", "o-"), ("kl_quant2", "quant 2-bit", "s-"),
                                  ("kl_sparse", f"sparse, budget {plan['parameters']['budget']}", "^-")):
            ax.plot(x, [max(r[key], 1e-6) for r in layers], style, ms=4, label=label)
        ax.set_yscale("log")
        ax.set_ylabel("KL(full || layer compressed)")
        ax.legend(loc="upper right", fontsize=8)
    if has_split:
        ax = axes[-2]
        par = plan["parameters"]
        even = par["budget"] - par["sink"] - par["recent"]
        ax.bar(x, [r.get("topk", 0) for r in layers], color="tab:blue")
        ax.axhline(even, color="k", ls="--", lw=1, label=f"even: top-{even}")
        ax.set_ylabel("retrieved tokens")
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[-1]
    heads = torch.tensor([r["proxy_heads"] for r in layers]).T
    im = ax.imshow(heads.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_ylabel("head")
    ax.set_xlabel("layer")
    ax.set_xticks(x)
    fig.colorbar(im, ax=axes, shrink=0.5, pad=0.01, label="proxy per head")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    """The command: every argument checked before any measuring (exit 2, one line naming the flag), every later
    failure one line (exit 2; Ctrl-C 130)."""
    try:
        return run(argv)
    except (ValueError, OSError) as e:  # a model, plan or calibration file that cannot be used
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[interrupted]", file=sys.stderr)
        return 130


def run(argv=None) -> int:
    d = CacheConfig("tailor")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="as in generate.py (default: SmolLM2-135M-Instruct)")
    p.add_argument("--calib", nargs="+", type=Path, default=DEFAULT_CALIB, help="calibration documents")
    p.add_argument("--max-tokens", type=positive_int, default=4096, help="tokens per document, at most")
    p.add_argument("--method", choices=["direct", "proxy"], default="direct")
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--tau", type=float, default=d.tau)
    p.add_argument("--bits", type=int, default=d.bits, help="the quantized layers' bits the decision is for")
    p.add_argument("--budget", type=int, default=d.budget)
    p.add_argument("--sink", type=int, default=d.sink)
    p.add_argument("--recent", type=int, default=d.recent)
    p.add_argument("--select", choices=list(SELECTORS), default=d.select)
    p.add_argument("--heldout", type=positive_int, default=64, help="direct: tokens decoded at the end of each document")
    p.add_argument("--split-floor", type=positive_int, help="the fewest retrieved tokens the split leaves a layer "
                                                   "(default: top-k / 8)")
    p.add_argument("--prefill-chunk", type=positive_int, default=PREFILL_CHUNK)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", type=Path, help="plan path (default: plans/<model name>.json)")
    p.add_argument("--from-plan", type=Path, help="re-decide from this plan's measurements (e.g. for other --bits "
                                                   "or --tau) instead of measuring again")
    args = p.parse_args(argv)
    try:
        cfg = CacheConfig("tailor", bits=args.bits, budget=args.budget, sink=args.sink, recent=args.recent,
                          select=args.select, alpha=args.alpha, tau=args.tau)
    except ConfigError as e:
        p.error(f"--{e.field.replace('_', '-')}: {e}")
    if not (0 < args.alpha < 1 and math.isfinite(args.tau)):
        p.error(f"--alpha must be in (0, 1) and --tau a number, got {args.alpha} and {args.tau}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: " + ("CUDA is not available here; use --device cpu" if
                                               args.device.startswith("cuda") else "must be cpu, cuda or cuda:N"))
    missing = [str(f) for f in args.calib if not f.is_file()]
    if missing:
        p.error(f"calibration files not found: {', '.join(missing)}")
    if args.from_plan and not args.from_plan.is_file():
        p.error(f"--from-plan {args.from_plan}: " + ("is a directory; pass a plan file" if args.from_plan.is_dir()
                                                     else "no such file"))
    check_outputs(p, {"out": str(args.out) if args.out else None}, [("calib", str(f)) for f in args.calib])
    if args.from_plan:
        plan = read_plan(args.from_plan)
        if args.split_floor is not None:
            plan["parameters"]["split_floor"] = args.split_floor
        plan = redecide(plan, cfg, args.method)
        write(plan, args.out or args.from_plan)
        return 0
    model_dir = resolve_model(args.model)
    tok = Tokenizer(model_dir)
    model = load_model(model_dir, args.device, getattr(torch, args.dtype))
    docs = [tok.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)[:args.max_tokens]
            for f in args.calib]
    if args.method == "direct" and min(len(doc) for doc in docs) <= 2 * args.heldout:
        p.error(f"each calibration document needs more than {2 * args.heldout} tokens for --heldout {args.heldout}")
    print(f"# {model_name(model_dir)} on {args.device} ({args.dtype}); calibration: "
          f"{', '.join(f'{f.name} ({len(d)} tok)' for f, d in zip(args.calib, docs))}", file=sys.stderr)
    from tqdm import tqdm
    with tqdm(total=len(docs), desc="proxy", unit="doc", file=sys.stderr) as bar:
        heads, tails = measure_proxy(model, docs, cfg, args.prefill_chunk, bar.update)
    direct = None
    if args.method == "direct":
        with tqdm(total=model.args.n_layers, desc="direct", unit="layer", file=sys.stderr,
                  bar_format="{l_bar}{bar}| {n:.1f}/{total} layers [{elapsed}<{remaining}]") as bar:
            direct = measure_direct(model, docs, cfg, args.heldout, args.prefill_chunk, bar.update)
    plan = make_plan(model, model_dir, args.calib, docs, cfg, args.method, heads, tails, direct, args.prefill_chunk,
                     args.heldout, args.split_floor)
    write(plan, args.out or PLANS / f"{plan['model']['name']}.json")
    return 0


def redecide(plan: dict, cfg: CacheConfig, method: str) -> dict:
    """The same measurements, decided again for cfg's bits and tau."""
    if method == "direct" and "kl_sparse" not in plan["layers"][0]:
        raise ValueError("--from-plan: that plan has no direct measurements; use --method proxy")
    if method == "direct" and f"kl_quant{cfg.bits}" not in plan["layers"][0]:
        raise ValueError(f"the plan has no direct measurement at {cfg.bits} bits; measure again with --bits {cfg.bits}")
    plan = copy.deepcopy(plan)
    plan["parameters"].update(method=method, bits=cfg.bits, tau=cfg.tau)
    for r in plan["layers"]:
        r["proxy_decision"] = "quant" if r["proxy"] > cfg.tau else "sparse"
        if "kl_sparse" in r:
            r["direct_decision"] = "quant" if r[f"kl_quant{cfg.bits}"] < r["kl_sparse"] else "sparse"
        r["decision"] = r[f"{method}_decision"]
    plan["quant_layers"] = [r["layer"] for r in plan["layers"] if r["decision"] == "quant"]
    split(plan)
    if "kl_sparse" in plan["layers"][0]:
        score = [math.log(r["kl_sparse"] + 1e-9) - math.log(r[f"kl_quant{cfg.bits}"] + 1e-9) for r in plan["layers"]]
        plan["proxy_vs_direct"] = {
            "spearman": round(spearman([r["proxy"] for r in plan["layers"]], score), 4),
            "decisions_agree": sum(r["proxy_decision"] == r["direct_decision"] for r in plan["layers"])}
    return plan


def split(plan: dict):
    """Each offloaded layer's share of the retrieved tokens (its "topk" at the plan's budget; 0 where quantized),
    from its tail weighted by its direct KL per unit of tail (without direct measurements, the tail alone)."""
    sparse = [r for r in plan["layers"] if r["decision"] == "sparse"]
    if not sparse or "tail" not in sparse[0]:
        return
    par = plan["parameters"]
    topk, step = par["budget"] - par["sink"] - par["recent"], par["split_step"]
    at = min(topk // step, len(sparse[0]["tail"]) - 1)
    weights = [max(r["kl_sparse"], 1e-6) / max(r["tail"][at], 1e-6) if "kl_sparse" in r else 1.0 for r in sparse]
    shares = dict(zip((r["layer"] for r in sparse), allocate_topk([r["tail"] for r in sparse], weights, topk, step,
                                                               par.get("split_floor"))))
    for r in plan["layers"]:
        r["topk"] = shares.get(r["layer"], 0)


def write(plan: dict, out: Path):
    save_plan(plan, out)
    print(table(plan))
    try:
        plot(plan, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)
    except ImportError:
        print(f"wrote {out} (pip install matplotlib for the plot)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
