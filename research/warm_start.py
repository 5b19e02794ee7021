"""How much of a step's selection the step before already knew, per offloaded layer of a real model: the
fidelity task of bench/accuracy.py (a document's first `context` tokens, then its next ones, teacher-forced),
every layer offloaded (policy sparse), on the PyTorch path (its scores rank as the kernels' do).

  kept       of a step's top-k positions, the fraction chosen the step before: what kernels.retrieve
             leaves in place (1 - kept crosses PCIe)
  kept of 4  the fraction among the four steps before (what a larger slot cache could hold)
  cand / k   the positions that score at or above the lowest new score of the last choice (the floor), per k
             (1.0: the top-k alone)
  read / k, guess q   what kernels.topk's select reads with its guess at quantile q of the last
             choice's new scores: those reaching the guess where they are k or more, else cand (it uses 0.25)

    python research/warm_start.py                    # default model, CPU fp32: bench/results/warm_start_cpu.md
    python research/warm_start.py --docs prose --contexts 2048 --steps 16 --out /tmp/warm
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import DOCUMENTS, Prefilled, fidelity_task, load_documents, parse_policy  # noqa: E402
from checkpoint import resolve_model  # noqa: E402
from generate import Decoder  # noqa: E402
from kvcache import KVCache, SparseLayer  # noqa: E402
from model import load_model  # noqa: E402
from results import publish  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


GUESSES = (0.1, 0.25, 0.5)  # quantiles of the last choice's new scores tried as a higher floor


class Watch:
    """Per offloaded layer and step: the top-k its selector's scores give, and how many positions kernels.topk
    would keep from them given the step before's top-k."""

    def __init__(self, cache: KVCache):
        self.chosen, self.kept = {}, {}   # layer -> [(n_kv, k) positions per step], [(n_kv,) counts per step]
        for index, layer in enumerate(cache.layers):
            if isinstance(layer, SparseLayer) and layer.topk:
                self.patch(layer, index)

    def patch(self, layer: SparseLayer, index: int):
        select = layer.selector.scores

        def scores(q, lo, hi):
            s = select(q, lo, hi)                                          # (n_kv, hi - lo)
            top = s.topk(layer.topk, dim=-1).indices + lo
            steps = self.chosen.setdefault(index, [])
            if steps:
                last = s.gather(1, steps[-1] - lo).sort(1).values          # the last choice, rescored
                every = (s >= last[:, :1]).sum(1)                           # at or above its lowest
                reads = [every]
                for q in GUESSES:  # a guess at a higher floor, kept apart: read alone where it holds k or more
                    above = (s >= last[:, int(q * last.shape[1]):][:, :1]).sum(1)
                    reads.append(torch.where(above >= layer.topk, above, every))
                self.kept.setdefault(index, []).append(torch.stack(reads))
            steps.append(top)
            return s
        layer.selector.scores = scores


@torch.inference_mode()
def watched(model, cfg, prompt: Prefilled, targets: list[int]) -> Watch:
    """bench/accuracy.py's decode, teacher-forced, with every offloaded layer's choices watched."""
    cache = KVCache(model, len(prompt.ids) + len(targets), cfg, device="cpu", dtype=torch.float32)
    prompt.load_into(cache)
    watch, decoder = Watch(cache), Decoder(model, cache)
    for i, token in enumerate(targets[:-1]):
        decoder.step(token, len(prompt.ids) + i)
    return watch


def overlap(now: torch.Tensor, before: list[torch.Tensor]) -> float:
    """The fraction of now's positions (n_kv, k) found, head by head, among those of the `before` steps."""
    held = [set().union(*(b[h].tolist() for b in before)) for h in range(now.shape[0])]
    return sum(len(set(now[h].tolist()) & held[h]) for h in range(now.shape[0])) / now.numel()


def layer_rows(watches: list[Watch], k: int) -> list[dict]:
    """Per layer, over the steps of every watched decode: kept, kept of 4 (means), cand / k (every step's)."""
    rows = []
    for index in sorted(watches[0].chosen):
        steps = [(s[t], s[:t]) for w in watches for s in (w.chosen[index],) for t in range(1, len(s))]
        rows.append({"layer": index,
                     "kept": statistics.mean(overlap(now, before[-1:]) for now, before in steps),
                     "kept4": statistics.mean(overlap(now, before[-4:]) for now, before in steps),
                     "cand": torch.stack([c.float().mean(1) / k for w in watches for c in w.kept[index]])})
    return rows


def table(name: str, rows: list[dict]) -> list[str]:
    """cand: (steps, 1 + len(GUESSES)) per layer: what the lowest floor keeps, then what is read with each guess."""
    out = [f"| {name} | layer | kept | kept of 4 | cand / k mean | cand / k max | "
           + " | ".join(f"read / k, guess {q:g}" for q in GUESSES) + " |", "|---|" + "---|" * (5 + len(GUESSES))]
    for r in rows + [{"layer": "all", "kept": statistics.mean(r["kept"] for r in rows),
                      "kept4": statistics.mean(r["kept4"] for r in rows), "cand": torch.cat([r["cand"] for r in rows])}]:
        c = r["cand"]
        out.append(f"| | {r['layer']} | {r['kept']:.2f} | {r['kept4']:.2f} | {c[:, 0].mean():.2f} | {c[:, 0].max():.2f} | "
                   + " | ".join(f"{c[:, 1 + i].mean():.2f}" for i in range(len(GUESSES))) + " |")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir, .gguf or hub repo id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--docs", nargs="+", default=["prose", "code", "table"], help=" ".join(DOCUMENTS))
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 7680])
    p.add_argument("--selectors", nargs="+", default=["sketch", "sketch-heads"])
    p.add_argument("--steps", type=int, default=64, help="decode steps per document")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "warm_start_cpu"), help="prefix of the .md")
    args = p.parse_args(argv)
    path = resolve_model(args.model)
    model, tok = load_model(path, device="cpu", dtype=torch.float32), Tokenizer(path)
    docs = load_documents(tok, args.docs)
    lines = [f"{path.name}, CPU fp32, policy sparse (every layer offloaded, default budget), {args.steps} "
             f"teacher-forced steps after each document's first `context` tokens; documents: {', '.join(docs)}", ""]
    for context in args.contexts:
        for select in args.selectors:
            cfg = parse_policy(f"sparse/{select}", model)
            watches = []
            for doc in docs.values():
                prefix, targets = fidelity_task(doc, context, args.steps)
                watches.append(watched(model, cfg, Prefilled(model, prefix), targets))
            rows = layer_rows(watches, cfg.topk)
            lines += [f"context {context}, `{select}`, top-k {cfg.topk}:", ""] + table(select, rows) + [""]
            print("\n".join(lines[-len(rows) - 5:]), flush=True)
    publish(Path(args.out).with_suffix(".md"), "\n".join(lines))


if __name__ == "__main__":
    main()
