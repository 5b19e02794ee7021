"""Accuracy of every cache policy, read against the device memory it keeps.

Three tasks (protocol: the document-repeat recall test, fidelity to the full cache, passkey):

  repeat    prefill a document D, then decode teacher-forced through the start of D again, so every
            copied token is predicted through the compressed cache: top-1 accuracy and NLL on the
            copy. A model that still sees D copies it; a policy that lost D falls toward the NLL of
            reading D for the first time (`first_nll`).
  fidelity  prefill `context` tokens of a document, decode teacher-forced over the next 256:
            mean and p99 KL(full || policy) per step and top-1 agreement with the full cache.
  passkey   a five-digit key hidden at several depths of filler text; greedy answer. Small models
            fail it at long contexts even with a full cache: the full row says whether they can.

Every row states its device-resident KV bytes and the compression vs a full cache of the same
dtype, so accuracy is read against memory. A sweep of the budget (sink + recent + top-k tokens
per layer) covers tailor, sparse and streaming at one context.

    python bench/accuracy.py                                   # default model, CPU fp32, 1k and 2k
    python bench/accuracy.py --device cuda --dtype bfloat16 --contexts 1024 2048 4096 7500
    python bench/accuracy.py --model meta-llama/Llama-3.1-8B-Instruct --device cuda --dtype bfloat16 \\
        --contexts 8192 32768 --docs my_long_document.txt

Policies are written name[-bits][+split][/selector[:Nb]][@budget]: tailor-2/channels, kivi-1,
sparse@512, streaming@192, tailor-2/sketch:1b@432 (a 1-bit sketch), tailor-2/exact-heads (research/
registers the selectors kept for measurement), kvcomp:0.05 (research/kvcomp.py). tailor takes its quantized
layers from the model's plan in plans/ (online identification without one) and the bits from the spec.
"""
import argparse
import json
import platform
import random
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from checkpoint import resolve_model  # noqa: E402
from generate import Decoder, compare  # noqa: E402
from inputs import check_bench_args  # noqa: E402
import research  # noqa: E402,F401  (registers the research selectors: every spec of the results files runs)
from kvcache import SELECTORS, CacheConfig, KVCache  # noqa: E402
from model import load_model  # noqa: E402
from plots import try_plot  # noqa: E402
from results import publish  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

DOCS = ROOT / "examples" / "documents"
STDLIB = Path(sysconfig.get_paths()["stdlib"])  # the running Python's: meta["python"] names its version


def python_reference() -> str:
    """The Python Language Reference as pydoc shows it (every Python ships it in pydoc_data)."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


DOCUMENTS = {  # none of them is used by profile_layers.py (its calibration texts are in examples/calibration)
    "prose": [ROOT / "examples" / "lighthouse.txt", DOCS / "salt_road.txt"],     # ~8k tokens each
    "code": [DOCS / "tidegauge.py.txt"],
    "table": [DOCS / "observations_table.txt"],
    "stdlib": [STDLIB / "argparse.py", STDLIB / "inspect.py"],                 # >= 33k tokens each
    "reference": python_reference,
    "ledger": [DOCS / "ledger_long.txt"],
}
LONG_DOCUMENTS = ["stdlib", "reference", "ledger"]
POLICIES = ["full", "tailor-1", "tailor-2", "tailor-1/channels", "tailor-2/channels", "kivi-1", "kivi-2",
            "sparse", "sparse/channels", "streaming"]
SWEEP = ["tailor-2", "sparse", "streaming"]
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


# ------------------------------------------------------------------------------------ policies

def budget_knobs(budget: int, sink: int = 8) -> dict:
    """Split a per-layer device budget into sink + recent + top-k: 192 -> 8 + 56 + 128 (the paper's),
    64 -> 8 + 24 + 32, 1024 -> 8 + 56 + 960."""
    return {"budget": budget, "sink": sink, "recent": max(1, min(56, budget - sink - budget // 2))}


def selector_knobs(select: str) -> dict:
    """'sketch-heads' -> {'select': 'sketch-heads'}; 'sketch:1b' -> {'select': 'sketch', 'sketch_bits': 1}."""
    name, *options = select.split(":")
    knobs = {"select": name} if name else {}
    for option in options:
        if not (option.endswith("b") and option[:-1].isdigit()):
            raise ValueError(f"selector {name!r}: ':{option}' is not a sketch's bits (':1b', ':2b', ...)")
        knobs["sketch_bits"] = int(option[:-1])
    return knobs


def parse_policy(spec: str, model=None) -> CacheConfig:
    """'tailor-2/channels@512' -> CacheConfig. streaming@B keeps sink + a window of B - sink tokens, the
    same device token budget as a sparse layer with budget B; plain 'streaming' means streaming@192.
    'tailor-2[0,1]' quantizes layers 0 and 1 whatever the model's plan says ('tailor-2[]': none).
    'kvcomp:EPS' quantizes every layer with research/kvcomp.py's compressor at error bound EPS,
    'tailor+kvcomp:EPS' tailor's quantized layers."""
    spec, _, budget = spec.partition("@")
    spec, _, select = spec.partition("/")
    spec, split = spec.removesuffix("+split"), spec.endswith("+split")  # tailor-2+split: the plan's top-k split
    spec, _, listed = spec.removesuffix("]").partition("[")  # tailor-2[0,1]: these layers quantized, not the plan's
    layers = tuple(int(x) for x in listed.split(",") if x) if _ else None
    knobs = selector_knobs(select)
    spec, _, bound = spec.partition(":")  # kvcomp:0.1, tailor+kvcomp:0.1: research/kvcomp.py's compressor
    if spec == "kvcomp" or spec.endswith("+kvcomp"):
        from research.kvcomp import quantizer
        knobs.update(quantizer=quantizer(float(bound or 1 / 6)))
        spec = "kivi" if spec == "kvcomp" else spec.removesuffix("+kvcomp")
    elif bound:
        raise ValueError(f"':{bound}' follows kvcomp only (kvcomp:EPS, tailor+kvcomp:EPS)")
    name, _, bits = spec.partition("-")
    if bits:
        knobs["bits"] = int(bits)
    if name in ("tailor", "sparse") and budget:
        knobs.update(budget_knobs(int(budget)))
    if name == "streaming":
        b = int(budget or CacheConfig.budget)
        knobs.update(sink=CacheConfig.sink, recent=b - CacheConfig.sink, budget=b)  # no top-k
    if name == "tailor" and model is not None:
        from layer_plans import find_plan, load_plan, split_topk
        path = find_plan(model)
        if path is not None:
            plan = load_plan(path, model)
            knobs = {"quant_layers": tuple(plan["quant_layers"]), "bits": plan["parameters"]["bits"], **knobs}
            if split:
                knobs["layer_topk"] = split_topk(plan, CacheConfig(name, **knobs).topk)
    if layers is not None:
        if name != "tailor" or split:
            raise ValueError(f"[{listed}] names tailor's quantized layers (tailor-2[0,1]), without +split")
        knobs["quant_layers"] = layers
    if split and "layer_topk" not in knobs:
        raise ValueError(f"{spec}+split needs tailor and a layer plan with a split for this model (profile_layers.py)")
    return CacheConfig(name, **knobs)


# ------------------------------------------------------------------------------- task builders

def repeat_task(doc: list[int], context: int, n_copy: int) -> tuple[list[int], list[int]]:
    """(prefix, targets): prefix = D = doc[:context - n_copy], targets = the first n_copy tokens of D again."""
    n = context - n_copy
    if n_copy < 1 or n < n_copy or len(doc) < n:
        raise ValueError(f"document repeat at context {context} needs a document of {n} tokens and 0 < n_copy <= {n}")
    return doc[:n], doc[:n_copy]


def fidelity_task(doc: list[int], context: int, n_next: int) -> tuple[list[int], list[int]]:
    """(prefix, targets): the first `context` tokens, then the next n_next of the same document."""
    if len(doc) < context + n_next:
        raise ValueError(f"fidelity at context {context} needs a document of {context + n_next} tokens, got {len(doc)}")
    return doc[:context], doc[context:context + n_next]


def passkey_task(tok: Tokenizer, context: int, depth: float, key: int) -> list[int]:
    """A prompt of about `context` tokens: filler with the key sentence at `depth` (0..1), then the question.
    The answer is str(key)."""
    head = tok.encode("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
                      "memorize it.\n\n", add_special_tokens=False)
    needle = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)
    tail = tok.encode("\n\nWhat is the pass key? The pass key is", add_special_tokens=False)
    unit = tok.encode(FILLER, add_special_tokens=False)
    n_fill = max(context - len(head) - len(needle) - len(tail), 0)
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    at = int(depth * n_fill)
    return head + filler[:at] + needle + filler[at:] + tail


# ------------------------------------------------------------------------------------- metrics

def token_metrics(logits: torch.Tensor, target: int) -> tuple[float, bool]:
    """(NLL of target, whether it is the top-1) for one position's logits (vocab,)."""
    lp = logits.float().log_softmax(-1)
    return -lp[target].item(), int(lp.argmax()) == target


def recall(nll: list[float], top1: list[bool]) -> dict:
    return {"top1": sum(top1) / len(top1), "nll": sum(nll) / len(nll)}


def fidelity(kl: list[float], agree: list[bool]) -> dict:
    """Mean and p99 of the per-step KL(full || policy), top-1 agreement with the full cache."""
    q = sorted(kl)
    return {"kl_mean": sum(kl) / len(kl), "kl_p99": q[min(len(q) - 1, int(0.99 * len(q)))],
            "agreement": sum(agree) / len(agree)}


def passkey_found(answer: str, key: int) -> bool:
    return str(key) in answer.replace(" ", "")


# ------------------------------------------------------------------------------------- running

class Prefilled:
    """A prompt prefilled once, through a full cache: its K/V per layer and last logits. Prefill attention
    is exact in every policy, so each policy's cache loads these (load_into) instead of
    prefilling again: one prefill per prompt, not one per policy (bench/test_accuracy.py checks that
    the logits that follow are the same bits)."""

    @torch.inference_mode()
    def __init__(self, model, prompt: list[int]):
        dev, dtype = model.embed.weight.device, model.embed.weight.dtype
        cache = KVCache(model, len(prompt), CacheConfig(), device=dev, dtype=dtype)
        self.ids = prompt
        self.logits = model.prefill(torch.tensor([prompt], device=dev), cache)[0]
        self.keys = [layer.k for layer in cache.layers]      # (1, n_kv, len(prompt), hd) each
        self.values = [layer.v for layer in cache.layers]

    def load_into(self, cache: KVCache):
        """Give every layer of `cache` the prompt's K/V, as its own prefill would have (prefill attention is
        exact in every policy). Online identification measures the prefill's queries: it prefills itself."""
        if cache.meter is not None:
            raise ValueError("online identification measures the prefill's queries: prefill through the model")
        for layer, k, v in zip(cache.layers, self.keys, self.values, strict=True):
            layer.load(k, v, 0)
        cache.length = len(self.ids)
        cache.end_prefill()


@torch.inference_mode()
def decode(model, cfg: CacheConfig, prompt: list[int] | Prefilled, n: int, choose) -> dict:
    """Prefill prompt (or load an already prefilled one), then up to n decode steps; choose(i, logits) sees
    the prediction for position len(prompt) + i and returns the token fed there (None: stop). Returns the
    cache's memory report. On CUDA the decode steps run on the kernel path, replayed from a CUDA graph."""
    dev, dtype = model.embed.weight.device, model.embed.weight.dtype
    ids = prompt.ids if isinstance(prompt, Prefilled) else prompt
    kernels = dev.type == "cuda" and SELECTORS[cfg.select].has_kernel_path()  # the PyTorch path for the others
    cache = KVCache(model, len(ids) + n, cfg, device=dev, dtype=dtype, kernels=kernels)
    if isinstance(prompt, Prefilled) and not cfg.online:
        prompt.load_into(cache)
        logits = prompt.logits
    else:
        logits = model.prefill(torch.tensor([ids], device=dev), cache)[0]
    decoder = Decoder(model, cache)
    for i in range(n):
        token = choose(i, logits)
        if token is None:
            break
        if i + 1 < n:
            logits = decoder.step(token, len(ids) + i)
    return cache.memory_report()


def teacher_force(model, cfg: CacheConfig, prefix: list[int], targets: list[int], on_logits) -> dict:
    """Decode targets after prefix whatever the model predicts; on_logits(i, logits) sees the
    prediction of targets[i]. Returns the cache's memory report."""
    def choose(i, logits):
        on_logits(i, logits)
        return targets[i]
    return decode(model, cfg, prefix, len(targets), choose)


def greedy(model, cfg: CacheConfig, prompt: list[int], n_new: int) -> list[int]:
    out = []

    def choose(i, logits):
        out.append(int(logits.argmax()))
        return out[-1]
    decode(model, cfg, prompt, n_new, choose)
    return out


def first_pass_nll(model, ids: list[int]) -> float:
    """Mean NLL of reading ids for the first time (full cache, teacher-forced)."""
    nll = []
    teacher_force(model, CacheConfig(), ids[:1], ids[1:], lambda i, lg: nll.append(token_metrics(lg, ids[1 + i])[0]))
    return sum(nll) / len(nll)


def memory_fields(mem: dict) -> dict:
    return {"device_kv_bytes": mem["device_bytes"], "compression": mem["compression"],
            "h2d_bytes_per_step": mem["h2d_bytes_per_step"]}


def run_repeat(model, cfg, prefix, targets) -> dict:
    nll, top1 = [], []

    def score(i, logits):
        a, b = token_metrics(logits, targets[i])
        nll.append(a)
        top1.append(b)
    mem = teacher_force(model, cfg, prefix, targets, score)
    return {**recall(nll, top1), **memory_fields(mem)}


def run_fidelity(model, cfg, prefix, targets, reference: list[torch.Tensor]) -> dict:
    """reference: the full cache's logits at each step (recorded when cfg is the full cache)."""
    kl, agree = [], []

    def score(i, logits):
        if cfg.policy == "full" and len(reference) < len(targets):
            reference.append(logits.float().clone())
        c = compare(reference[i], logits)
        kl.append(c["kl"])
        agree.append(c["top1"])
    mem = teacher_force(model, cfg, prefix, targets, score)
    return {**fidelity(kl, agree), **memory_fields(mem)}


def run_doc(args, model, tok, context: int, specs: list[tuple[str, bool]], name: str, doc: list[int],
            passkey: bool) -> list[dict]:
    """Every policy of `specs` ((spec, in the budget sweep), the full cache first if there) at one context
    on one document: a record each. Each task's prompt is prefilled once, for all of them (Prefilled).
    passkey: run the passkey task too (it does not depend on the document)."""
    cfgs = [parse_policy(spec, model) for spec, _ in specs]
    records = [{"context": context, "policy": spec, "sweep": sweep, "doc": name, "quant_layers": cfg.quant_layers,
                "bits": cfg.bits if cfg.policy in ("tailor", "kivi") else None}
               for (spec, sweep), cfg in zip(specs, cfgs)]
    if "repeat" in args.tasks:
        prefix, targets = repeat_task(doc, context, args.copy)
        prompt = Prefilled(model, prefix)
        for r, cfg in zip(records, cfgs):
            r.update(run_repeat(model, cfg, prompt, targets))
    if "fidelity" in args.tasks:
        prefix, targets = fidelity_task(doc, context, args.next)
        prompt, reference = Prefilled(model, prefix), []
        if cfgs[0].policy != "full" or cfgs[0].layers:
            run_fidelity(model, CacheConfig(), prompt, targets, reference)
        for r, cfg in zip(records, cfgs):
            r.update(run_fidelity(model, cfg, prompt, targets, reference))
    if "passkey" in args.tasks and passkey:
        rng, found = random.Random(context), [[] for _ in specs]
        for depth in args.depths:
            key = rng.randrange(10000, 100000)
            prompt = Prefilled(model, passkey_task(tok, context, depth, key))
            for hits, (_, sweep), cfg in zip(found, specs, cfgs):
                if not sweep:
                    hits.append(passkey_found(tok.decode(greedy(model, cfg, prompt, 8)), key))
        for r, hits in zip(records, found):
            if hits:
                r["passkey"] = sum(hits) / len(hits)
    return records


def load_documents(tok, names: list[str]) -> dict[str, list[int]]:
    docs = {}
    for name in names:
        source = DOCUMENTS.get(name) or [Path(name)]
        if callable(source):
            text = source()
        else:
            missing = [f for f in source if not f.is_file()]
            if missing:
                raise SystemExit(f"error: document {missing[0]} not found; name one of {', '.join(DOCUMENTS)} or a text file")
            text = "\n\n".join(f.read_text() for f in source)
        docs[name if name in DOCUMENTS else Path(name).stem] = tok.encode(text, add_special_tokens=False)
    return docs


# -------------------------------------------------------------------------------------- report

def summarize(records: list[dict]) -> list[dict]:
    """Mean and spread (standard deviation) over documents, per context and policy."""
    groups = {}
    for r in records:
        groups.setdefault((r["context"], r["policy"], r.get("sweep", False)), []).append(r)
    rows = []
    for (context, policy, sweep), rs in groups.items():
        row = {"context": context, "policy": policy, "sweep": sweep, "docs": len(rs)}
        for key in ("top1", "nll", "kl_mean", "kl_p99", "agreement", "passkey", "device_kv_bytes", "compression",
                    "h2d_bytes_per_step"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key] = statistics.fmean(vals)
                row[key + "_sd"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
                row[key + "_n"] = len(vals)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(r, key, fmt):
        if key not in r:
            return "–"
        return f"{r[key]:{fmt}} ± {r[key + '_sd']:{fmt}}" if r[key + "_n"] > 1 else f"{r[key]:{fmt}}"
    out = ["| context | policy | copy top-1 | copy NLL | KL mean | KL p99 | top-1 agree | passkey | device KV MiB "
           "| vs full |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [str(r["context"]), r["policy"], cell(r, "top1", ".3f"), cell(r, "nll", ".2f"), cell(r, "kl_mean", ".3f"),
                 cell(r, "kl_p99", ".2f"), cell(r, "agreement", ".3f"), cell(r, "passkey", ".2f"),
                 f"{r['device_kv_bytes'] / 2**20:.2f}", f"{r['compression']:.1f}x"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], context: int, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # the exact selectors are measurements (their device bytes leave out the keys they read from the host)
    sel = [r for r in rows if r["context"] == context and "top1" in r and "/exact" not in r["policy"]]
    for r in sel:
        if not r["sweep"]:
            ax.scatter(r["device_kv_bytes"] / 2**20, r["top1"], zorder=3)
            ax.annotate(r["policy"], (r["device_kv_bytes"] / 2**20, r["top1"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
    for base in SWEEP:
        pts = sorted((r["device_kv_bytes"] / 2**20, r["top1"], r["policy"]) for r in sel
                     if r["sweep"] and r["policy"].split("@")[0] == base)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", marker=".", alpha=0.6, label=f"{base}, budget 64…1024")
    ax.set_xscale("log")
    ax.set_xlabel("device-resident KV cache (MiB, log scale)")
    ax.set_ylabel("document repeat: top-1 on the copy")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir, .gguf or hub repo id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--docs", nargs="+", default=["prose", "code", "table"],
                   help=f"{' '.join(DOCUMENTS)} or text files (default: the three that fit an 8k context; "
                        f"{', '.join(LONG_DOCUMENTS)} hold >= 33k tokens)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--tasks", nargs="+", default=["repeat", "fidelity", "passkey"],
                   choices=["repeat", "fidelity", "passkey"])
    p.add_argument("--copy", type=int, default=256, help="copied tokens decoded in the repeat task")
    p.add_argument("--next", type=int, default=256, help="tokens decoded in the fidelity task")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey depths")
    p.add_argument("--sweep-budgets", type=int, nargs="*", default=[64, 128, 256, 512, 1024])
    p.add_argument("--sweep-context", type=int, help="context of the budget sweep (default: the largest)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "accuracy"), help="prefix of .json/.md/.png")
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="rewrite the table and plot of earlier runs' JSON (several: their rows merged into --out, "
                        "the first run's row kept where two have the same one); runs nothing")
    args = p.parse_args(argv)
    for spec in args.policies:  # refused before anything loads (the split needs the model's plan: checked below)
        try:
            parse_policy(spec.replace("+split", ""))
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--policies {spec}: {e} (written name[-bits][+split][/selector[:Nb]][@budget])")
    if min(args.contexts) < 2 or args.copy < 1 or args.next < 1:
        p.error("--contexts must be >= 2 tokens, --copy and --next >= 1")
    if min(args.sweep_budgets or [2]) < 2 or (args.sweep_context or 2) < 2:
        p.error("--sweep-budgets and --sweep-context must be >= 2 tokens")
    check_bench_args(p, args, fractions=("depths",))
    if args.replot:
        runs = args.runs
        if len(runs) == 1:
            report(runs[0]["meta"], runs[0]["records"], Path(args.replot[0]).with_suffix(""))
        else:
            report(*merge(runs), Path(args.out))
        return 0

    model_dir = resolve_model(args.model)
    model = load_model(model_dir, args.device, getattr(torch, args.dtype))
    tok = Tokenizer(model_dir)
    docs = load_documents(tok, args.docs)
    for spec in args.policies:
        try:
            parse_policy(spec, model)
        except ValueError as e:
            p.error(f"--policies {spec}: {e}")
    ctx = max(args.contexts + [args.sweep_context or 0])
    needs = {"repeat": ctx - args.copy, "fidelity": ctx + args.next}  # passkey writes its own filler
    need = max((needs[t] for t in args.tasks if t in needs), default=0)
    short = {n: len(d) for n, d in docs.items() if len(d) < need}
    if short:
        p.error(f"documents too short for context {ctx}: " + ", ".join(f"{n} has {k} tokens" for n, k in short.items())
                + f"; the tasks need {need} (repeat: context - --copy, fidelity: context + --next): pass longer "
                "documents or smaller contexts")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = f"{model_dir.name}, {device_name}, {args.dtype}"
    sweep_context = args.sweep_context or max(args.contexts)
    runs = [(c, spec, False) for c in args.contexts for spec in args.policies]
    runs += [(sweep_context, f"{base}@{b}", True) for base in SWEEP for b in args.sweep_budgets]
    print(f"# {header}; documents {', '.join(f'{n} ({len(d)} tokens)' for n, d in docs.items())}", flush=True)
    first = {n: first_pass_nll(model, d[:1024]) for n, d in docs.items()}
    print(f"# first-pass NLL of each document's first 1024 tokens: "
          f"{', '.join(f'{n} {v:.2f}' for n, v in first.items())}", flush=True)
    meta = {"model": model_dir.name, "device": device_name, "dtype": args.dtype, "documents": {n: len(d) for n, d in docs.items()},
            "first_pass_nll": first, "python": platform.python_version(), "copy": args.copy, "next": args.next, "depths": args.depths,
            "sweep_context": sweep_context}
    t0 = time.perf_counter()

    def one(context, name, records):
        specs = sorted([(spec, sweep) for c, spec, sweep in runs if c == context], key=lambda r: r[0] != "full")
        for r in run_doc(args, model, tok, context, specs, name, docs[name], name == next(iter(docs))):
            records.append(r)
            print(f"{time.perf_counter() - t0:7.0f}s  {context:>6} {r['policy']:<20} {name:<6} "
                  + "  ".join(f"{k} {r[k]:.3f}" for k in ("top1", "nll", "kl_mean", "agreement", "passkey") if k in r)
                  + f"  device KV {r['device_kv_bytes'] / 2**20:.2f} MiB", flush=True)
    return run_all([(c, name) for c in sorted({c for c, _, _ in runs}) for name in docs], one, meta, Path(args.out))


def run_all(runs, one, meta: dict, out: Path, *, save_fn=None, report_fn=None, records=None) -> int:
    """one(*run, records) for every run, the records saved after each: Ctrl-C keeps every finished row.
    save_fn, report_fn: another benchmark's own (bench/ruler.py's), instead of this one's; records: those an
    earlier run of the same arguments finished."""
    save_fn, report_fn = save_fn or save, report_fn or report
    records, meta["complete"] = list(records or []), False
    try:
        for run in runs:
            one(*run, records)
            save_fn(meta, records, out)
    except KeyboardInterrupt:
        print(f"# interrupted: {len(records)} rows kept in {out.with_suffix('.json')}", flush=True)
        if records:
            report_fn(meta, records, out)
        return 130
    meta["complete"] = True
    report_fn(meta, records, out)
    return 0


def merge(runs: list[dict]) -> tuple[dict, list[dict]]:
    """The records of several runs of the same model and hardware as one run: the first run's meta (its
    sweep context the largest of theirs), each (context, policy, sweep, document) row once."""
    meta, records, seen = dict(runs[0]["meta"]), [], set()
    if len({(run["meta"]["model"], run["meta"]["device"], run["meta"]["dtype"]) for run in runs}) > 1:
        raise SystemExit("--replot merges runs of one model, device and dtype only")
    meta["sweep_context"] = max(run["meta"].get("sweep_context") or 0 for run in runs)
    for run in runs:
        for r in run["records"]:
            key = (r["context"], r["policy"], r.get("sweep", False), r["doc"])
            if key not in seen:
                seen.add(key)
                records.append(r)
    return meta, records


def write_json(out: Path, data: dict):
    """Write data to <out>.json, replacing it whole (a crash leaves the last complete file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out.with_suffix(".json"))


def display_name(model: str) -> str:
    return re.sub(r"-[0-9a-f]{12}$", "", model)  # a converted GGUF's cache dir ends in its hash


def save(meta: dict, records: list[dict], out: Path) -> list[dict]:
    """Write the records (and their summary) to <out>.json; returns the summary."""
    rows = summarize(records)
    write_json(out, {"meta": meta, "records": records, "summary": rows})
    return rows


def report(meta: dict, records: list[dict], out: Path):
    if not records:
        raise SystemExit(f"{out.with_suffix('.json')}: no finished rows to report")
    rows = save(meta, records, out)
    model = display_name(meta["model"])
    header = f"{model}, {meta['device']}, {meta['dtype']}"
    partial = "" if meta.get("complete", True) else " (an interrupted run: the rows that finished)"
    table = f"{header}; mean ± sd over {len({r['doc'] for r in records})} documents{partial}\n\n" + markdown(rows)
    ctx = meta.get("sweep_context") or max(r["context"] for r in records)
    try_plot(lambda: plot(rows, ctx, out.with_suffix(".png"), f"{header}, context {ctx}: recall vs device KV memory"))
    publish(out.with_suffix(".md"), table)
    print("\n" + table)


if __name__ == "__main__":
    sys.exit(main())
