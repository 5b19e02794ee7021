"""RULER's synthetic long-context tasks on every cache policy, read against the device memory it keeps.

RULER (Hsieh et al., 2024, arXiv 2404.06654) judges a long-context model with generated prompts, so it
needs no download. The task families, written here from the paper's definitions:

  niah_single_1..3     one needle ("The special magic number for <key> is <value>.") in a haystack of
                       repeated noise sentences (1), of long text (2), or with a UUID value (3)
  niah_multikey_1..3   the needle among 3 distractor needles of other keys in long text (1); a haystack
                       made of distractor needles, number values (2) or UUID keys and values (3)
  niah_multivalue      4 values for the one key, all asked for
  niah_multiquery      4 keys asked for at once
  vt                   variable tracking: VAR A = 12345, VAR B = VAR A, ... (4 hops) in noise; name every
                       variable that holds the value
  cwe                  common words: a numbered list in which 10 words appear 30 times and the others 3
                       times; name the 10
  fwe                  frequent words: coded words drawn from a Zipf distribution (alpha 2); name the 3
                       most frequent

The long text is the Python Language Reference as pydoc ships it (the running Python's, repeated where a
length needs more); words come from it too. RULER's two question-answering tasks need SQuAD and HotpotQA,
which are not here. Every prompt has exactly the target length in the model's tokenizer (its chat
template, the question, and the start of the answer included: the haystack is cut to fit), and is built
from a seed made of its task, length and sample index. Each prompt is prefilled once and every policy
decodes greedily from that prefill (bench/accuracy.Prefilled). Score: recall, the fraction of the expected
strings found in the answer (case-insensitive), as RULER's; a policy's average is the mean over tasks, shown
with a 95% interval (a paired bootstrap over the prompts, `interval`). Every answer goes to OUT.jsonl as it
finishes, and a rerun of the same model, device and dtype skips those there. The oracle rows (exact-heads: an
exact top-k per query head at the same budget) bound what any selector can do; `oracle_recall` says how much
of the oracle's choice each selector makes.

    python bench/ruler.py --model qwen2.5-coder-0.5b --lengths 4096 --samples 1       # CPU, ~4 min a policy
    python bench/ruler.py --model qwen2.5-coder-1.5b --device cuda --dtype bfloat16 \\
        --lengths 4096 8192 16384 32768 65536 131072 --rope-scaling yarn --rope-scale 4

Policies are bench/accuracy.py's specs (name[-bits][/selector][@budget]); @1024 is the paper's RULER budget
per offloaded layer (64 sink + 64 recent there; 8 + 56 + 960 here), plain specs the default 192.
"""
import argparse
import json
import math
import platform
import random
import re
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from accuracy import FILLER, Prefilled, decode, display_name, parse_policy, run_all, write_json  # noqa: E402
from checkpoint import resolve_model  # noqa: E402
from kvcache import CacheConfig, KVCache, SparseLayer  # noqa: E402
from inputs import check_bench_args  # noqa: E402
from model import load_model  # noqa: E402
from plots import try_plot  # noqa: E402
from results import publish  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
         "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]
NEW_TOKENS = {"niah": 64, "vt": 40, "cwe": 120, "fwe": 50}  # answer lengths, as RULER's (niah: 128 there)
SATURATED = TASKS[:4]  # 1.00 for every policy but streaming at every length on Qwen2.5-Coder-1.5B (ruler_qwen15_h200)
GROUPS = {"discriminating": [t for t in TASKS if t not in SATURATED], "all": TASKS}
POLICIES = ["full", "tailor-2", "tailor-2@1024", "kivi-2", "streaming@1024",
            "tailor-2/exact-heads", "tailor-2/exact-heads@1024"]  # exact-heads: the oracle, at the same budgets
BOOTSTRAP = 2000  # resamples of the prompts for each interval


def reference_text() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def words() -> list[str]:
    """Lower-case words of 4 to 9 letters that the reference uses at least three times, sorted."""
    counts = {}
    for w in re.findall(r"(?<![\w.])[a-z]{4,9}(?![\w(])", reference_text()):
        counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= 3)


@dataclass
class Prompt:
    task: str
    ids: list[int]
    answers: list[str]  # every one of them should be in the answer
    n_new: int


class Builder:
    """Builds one task's prompt of exactly `length` tokens: [chat template start] instruction, haystack
    with the needles between its sentences, question [template end] answer start."""

    def __init__(self, tok: Tokenizer, chat: bool = True):
        self.tok, self.words = tok, words()
        if chat and tok.chat_template:  # the template's markup as its special tokens, everything else as plain text
            self.before, self.after = tok.chat_markup([{"role": "user"}])
        else:
            self.before, self.after = tok.encode("", add_special_tokens=True), []
        self._essay = None

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False, special_text=False)

    def essay(self) -> list[list[int]]:
        """The reference, a token list per sentence (cached)."""
        if self._essay is None:
            sentences = re.split(r"(?<=[.!?:])\s+|\n\s*\n", reference_text())
            self._essay = [self.enc(" " + s.strip()) for s in sentences if s.strip()]
        return self._essay

    def assemble(self, length: int, instruction: str, sentences, needles: list[str], depths: list[float],
                 question: str, answer_start: str) -> list[int]:
        """Haystack sentences (a list, used cyclically) cut to the tokens left over, each needle put in
        at the sentence boundary nearest its depth (0: first, 1: last)."""
        head = self.before + self.enc(instruction + "\n\n")
        tail = self.enc("\n\n" + question) + self.after + self.enc(answer_start)
        needle_ids = [self.enc(" " + n) for n in needles]
        room = length - len(head) - len(tail) - sum(map(len, needle_ids))
        if room < 16 * max(1, len(needles)):
            raise ValueError(f"{length} tokens leave {room} for the haystack: too short for this task")
        hay, used, i = [], 0, 0
        while used < room:
            s = sentences[i % len(sentences)][:room - used]
            hay.append(s)
            used, i = used + len(s), i + 1
        starts = [0]
        for s in hay:
            starts.append(starts[-1] + len(s))
        at = {}  # boundary index -> needles put there, in order
        for n, d in zip(needle_ids, depths):
            j = min(range(len(hay)), key=lambda b: abs(starts[b] - d * room))
            at.setdefault(j, []).append(n)
        body = []
        for j, s in enumerate(hay):
            for n in at.get(j, []):
                body += n
            body += s
        ids = head + body + tail
        assert len(ids) == length, (len(ids), length)
        return ids

    # ------------------------------------------------------------------------- the tasks

    def key(self, rng) -> str:
        return "-".join(rng.sample(self.words, 2))

    @staticmethod
    def number(rng) -> str:
        return str(rng.randrange(1_000_000, 10_000_000))

    @staticmethod
    def uuid(rng) -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def niah(self, task: str, length: int, rng) -> Prompt:
        variant = task.removeprefix("niah_")
        uuids = variant in ("single_3", "multikey_3")
        kind = "UUID" if uuids else "number"
        value = self.uuid if uuids else self.number
        keys = [self.uuid(rng) if variant == "multikey_3" else self.key(rng)
                for _ in range(4 if variant == "multiquery" else 1)]
        values = [[value(rng) for _ in range(4 if variant == "multivalue" else 1)] for _ in keys]
        needles = [(k, v) for k, vs in zip(keys, values) for v in vs]
        if variant == "multikey_1":  # three distractors: other keys, other values
            needles += [(self.key(rng), value(rng)) for _ in range(3)]
        rng.shuffle(needles)
        text = [f"The special magic {kind} for {k} is {v}." for k, v in needles]
        if variant in ("single_1",):
            hay = [self.enc(" " + s.strip() + ".") for s in FILLER.split(".") if s.strip()]
        elif variant in ("multikey_2", "multikey_3"):  # the haystack is distractor needles
            n = length // 12 + 1  # about as many as fit
            hay = [self.enc(f" The special magic {kind} for {self.uuid(rng) if uuids else self.key(rng)} is "
                            f"{value(rng)}.") for _ in range(n)]
        else:
            hay = self.essay()
            skip = rng.randrange(len(hay))  # each sample starts the text somewhere else
            hay = hay[skip:] + hay[:skip]
        plural = f"{kind}s" if len(keys) * len(values[0]) > 1 else kind
        query = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
        ids = self.assemble(
            length, f"Some special magic {kind}s are hidden in the following text. Remember them: you will be "
                    f"asked about them afterwards.", hay, text, [rng.random() for _ in text],
            f"What {'are all the' if plural != kind else 'is the'} special magic {plural} for {query} in the text "
            f"above?", f"The special magic {plural} for {query} in the text above {'are' if plural != kind else 'is'}")
        return Prompt(task, ids, [v for vs in values for v in vs], NEW_TOKENS["niah"])

    def vt(self, length: int, rng, hops: int = 4) -> Prompt:
        names = ["".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)) for _ in range(hops + 1)]
        value = str(rng.randrange(10_000, 100_000))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        hay = [self.enc(" " + s.strip() + ".") for s in FILLER.split(".") if s.strip()]
        depths = sorted(rng.random() for _ in chain)
        ids = self.assemble(length, "Memorize and track the chain(s) of variable assignments hidden in the "
                                    "following text.", hay, chain, depths,
                            f"Find all variables that are assigned the value {value} in the text above.",
                            f"Answer: The variables that are assigned the value {value} are:")
        return Prompt("vt", ids, names, NEW_TOKENS["vt"])

    def fill_list(self, length: int, instruction: str, make_items, question: str, answer_start: str) -> list[int]:
        """A list (as text) cut to exactly the tokens left over; make_items(n) gives a list of about n items,
        asked for more until it is long enough."""
        head = self.before + self.enc(instruction + "\n\n")
        tail = self.enc("\n\n" + question) + self.after + self.enc(answer_start)
        room, n = length - len(head) - len(tail), max(16, length // 4)
        for _ in range(20):
            body = self.enc(" ".join(make_items(n)))
            if len(body) >= room:
                return head + body[:room] + tail
            n = int(n * 1.1 * room / max(len(body), 1)) + 1
        raise ValueError(f"could not fill {length} tokens with list items")

    def cwe(self, length: int, rng, common: int = 10) -> Prompt:
        """10 words 30 times each, the others 3 times, as many as fill the length (where that needs more
        words than there are, each of the others more often, always under a third of the common ones'
        count), shuffled, numbered, cut to fit."""
        pool = rng.sample(self.words, len(self.words))
        top, rest = pool[:common], pool[common:]

        def items(n):
            rare = max(3, math.ceil((n - 30 * common) / len(rest)))
            listed = top * max(30, 3 * rare + 3) + rest[:max(1, (n - 30 * common) // rare)] * rare
            random.Random(n).shuffle(listed)
            return [f"{i + 1}. {w}" for i, w in enumerate(listed)]
        ids = self.fill_list(length, "Below is a numbered list of words. Some of them appear more often than the "
                                     "others: remember which.", items,
                             f"Question: What are the {common} most common words in the list above?",
                             f"Answer: The {common} words that appear most often in the list are:")
        return Prompt("cwe", ids, top, NEW_TOKENS["cwe"])

    def fwe(self, length: int, rng, alpha: float = 2.0, vocab: int = 1000) -> Prompt:
        coded = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6)) for _ in range(vocab)]
        weights = [1 / (r + 1) ** alpha for r in range(vocab)]
        ids = self.fill_list(length, "Read the following coded text and keep track of how often each coded word "
                                     "appears.", lambda n: rng.choices(coded, weights, k=n),
                             "Question: Do not explain. What are the three most frequent coded words in the text "
                             "above?", "Answer: The three most frequent coded words in the text above are:")
        counts, vocabulary = {}, set(coded)
        for w in self.tok.decode(ids).split():  # the words as they survived the cut
            if w in vocabulary:
                counts[w] = counts.get(w, 0) + 1
        top = sorted(counts, key=lambda w: -counts[w])[:3]
        return Prompt("fwe", ids, top, NEW_TOKENS["fwe"])

    def build(self, task: str, length: int, sample: int) -> Prompt:
        rng = random.Random(f"{task}:{length}:{sample}")
        if task.startswith("niah_"):
            return self.niah(task, length, rng)
        return getattr(self, task)(length, rng)


def plan(tasks: list[str], lengths: list[int], samples: int, long_samples: int) -> list[tuple[int, str, int]]:
    """(length, task, prompts) to run: --tasks names and groups, in TASKS order; a saturated task that only a
    group named runs once per length, any other `samples` times (`long_samples` past 32k)."""
    named = [t for t in tasks if t in TASKS]
    wanted = set(named).union(*(GROUPS[g] for g in tasks if g in GROUPS))
    return [(n, t, 1 if t in SATURATED and t not in named else long_samples if n > 32768 else samples)
            for n in lengths for t in TASKS if t in wanted]


def score(answer: str, expected: list[str]) -> float:
    """RULER's recall: the fraction of the expected strings found in the answer, case-insensitive."""
    a = answer.lower()
    return sum(e.lower() in a for e in expected) / len(expected)


@torch.inference_mode()
def answer(model, cfg, pre: Prefilled, n_new: int, stop_ids: set[int]) -> tuple[list[int], dict]:
    out = []

    def choose(i, logits):
        out.append(int(logits.argmax()))
        return None if out[-1] in stop_ids else out[-1]
    mem = decode(model, cfg, pre, n_new, choose)
    return out, mem


@torch.inference_mode()
def oracle_recall(model, pre: Prefilled, cfgs: dict) -> dict[str, float]:
    """How much of the oracle's choice each policy's selector makes at the answer's first step, from the same
    queries and keys (the full cache's: the ranking alone, not what a policy's earlier layers changed). Per
    offloaded layer and KV head: the true attention mass (each query head's softmax over every key, the group's
    mean) of the offloaded positions that both the oracle (exact-heads: an exact top-k per query head) and the
    selector chose, over that of the oracle's; the mean over layers and heads. Only policies with offloaded layers
    decided before the prefill (not online identification)."""
    dev, dtype = model.embed.weight.device, model.embed.weight.dtype
    cache, queries = KVCache(model, len(pre.ids) + 1, CacheConfig(), device=dev, dtype=dtype), {}
    pre.load_into(cache)

    class Seen:  # the model's call at each layer, passed to the full cache, the layer's query kept
        def decode(self, layer, q, k, v, pos, x=None):
            queries[layer] = q[0, :, 0]
            return cache.decode(layer, q, k, v, pos, x)
    model(torch.tensor([[int(pre.logits.argmax())]], device=dev), Seen(), len(pre.ids))
    a, n = model.args, len(pre.ids) + 1
    out = {}
    for spec, cfg in cfgs.items():
        kinds = cfg.layer_kinds(a.n_layers)
        layers = [i for i, kind in enumerate(kinds) if kind == "sparse"]
        recalls = []
        for i in layers:
            k, v, q = cache.layers[i].k[:, :, :n], cache.layers[i].v[:, :, :n], queries[i]
            lo, hi = cfg.sink, max(cfg.sink, n - cfg.recent)
            if hi - lo <= cfg.topk_of(i):
                continue  # every offloaded token is retrieved: nothing to miss
            chosen = []
            for select in (cfg.select, "exact-heads"):
                c = CacheConfig(**{**vars(cfg), "select": select})
                layer = SparseLayer(a.n_kv_heads, a.head_dim, n, c, cfg.topk_of(i), dev, dtype, "cpu",
                                    wq=model.layers[i].attn.wq, inv_freq=model.inv_freq)
                layer.load(k, v, 0)
                chosen.append(layer.selector.scores(q, lo, hi).topk(cfg.topk_of(i), dim=-1).indices)
            G = a.n_heads // a.n_kv_heads
            att = (q.float().view(a.n_kv_heads, G, -1) @ k[0].float().transpose(1, 2) * a.head_dim ** -0.5).softmax(-1)
            mass = att.mean(1)[:, lo:hi]                                                   # (n_kv, offloaded)
            mine = torch.zeros_like(mass).scatter_(1, chosen[0], 1.0)
            oracle = torch.zeros_like(mass).scatter_(1, chosen[1], 1.0)
            recalls += ((mass * mine * oracle).sum(1) / (mass * oracle).sum(1)).tolist()
        if recalls:
            out[spec] = statistics.fmean(recalls)
    return out


# -------------------------------------------------------------------------------------- report

def summarize(records: list[dict]) -> list[dict]:
    """Per (length, policy): each task's mean score, their average (the mean over tasks), the device KV bytes and
    the prompts per task; the ratio to the full cache's average; and 95% intervals of both (`interval`)."""
    scores = {}  # (length, policy) -> task -> sample -> score
    for r in records:
        scores.setdefault((r["length"], r["policy"]), {}).setdefault(r["task"], {})[r["sample"]] = r["score"]
    rows = []
    for (length, policy), tasks in scores.items():
        rs = [r for r in records if (r["length"], r["policy"]) == (length, policy)]
        row = {"length": length, "yarn": rs[0].get("yarn"), "policy": policy,
               "tasks": {t: statistics.fmean(v.values()) for t, v in tasks.items()},
               "samples": {t: len(v) for t, v in tasks.items()},
               "device_kv_bytes": statistics.fmean(r["device_kv_bytes"] for r in rs)}
        row["average"] = statistics.fmean(row["tasks"].values())
        recalls = [r["oracle_recall"] for r in rs if r.get("oracle_recall") is not None]
        if recalls:
            row["oracle_recall"] = statistics.fmean(recalls)
        rows.append(row)
    full = {r["length"]: r for r in rows if r["policy"] == "full"}
    for r in rows:
        f = full.get(r["length"])
        if f and f["average"] > 0 and set(f["tasks"]) == set(r["tasks"]):
            r["vs_full"] = r["average"] / f["average"]
    for length in {r["length"] for r in rows}:
        interval([r for r in rows if r["length"] == length], {p: s for (n, p), s in scores.items() if n == length})
    return rows


def interval(rows: list[dict], scores: dict, level: float = 0.95):
    """A paired bootstrap over the prompts of one length: each of BOOTSTRAP resamples draws every task's prompts
    with replacement, the same draw for every policy (they answered the same prompts), and takes each policy's
    average and its ratio to the full cache's; row["ci"], row["vs_full_ci"]: the central `level` of them. Only
    over the prompts every policy answered; a row with other tasks than those gets none."""
    tasks = set.intersection(*(set(s) for s in scores.values()))
    common = {t: sorted(set.intersection(*(set(s[t]) for s in scores.values()))) for t in sorted(tasks)}
    common = {t: ids for t, ids in common.items() if ids}
    rng = random.Random(0)
    draws = [{t: [rng.choice(ids) for _ in ids] for t, ids in common.items()} for _ in range(BOOTSTRAP)]

    def averages(policy):
        s = scores[policy]
        return [statistics.fmean(statistics.fmean(s[t][i] for i in d[t]) for t in d) for d in draws]

    def central(xs):
        xs = sorted(xs)
        cut = int((1 - level) / 2 * len(xs))
        return [xs[cut], xs[len(xs) - 1 - cut]]

    full = averages("full") if "full" in scores and common else None
    for r in rows:
        if not common or set(r["tasks"]) != set(common):
            continue
        mine = averages(r["policy"])
        r["ci"] = central(mine)
        if full and all(f > 0 for f in full):
            r["vs_full_ci"] = central([m / f for m, f in zip(mine, full)])


def markdown(rows: list[dict]) -> str:
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in rows)]
    short = [t.replace("niah_", "").replace("single_", "s").replace("multikey_", "mk").replace("multivalue", "mv")
             .replace("multiquery", "mq") for t in tasks]
    out = ["| length | policy | " + " | ".join(short) + " | prompts | average [95% CI] | vs full [95% CI] | oracle recall "
           "| device KV MiB |", "|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["length"], r["policy"] != "full", r["policy"])):
        cells = [f"{r['tasks'][t]:.2f}" if t in r["tasks"] else "–" for t in tasks]
        ci = f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if "ci" in r else ""
        vs = f"{r['vs_full']:.2f}x" if "vs_full" in r else "–"
        vs += f" [{r['vs_full_ci'][0]:.2f}, {r['vs_full_ci'][1]:.2f}]" if "vs_full_ci" in r else ""
        length = f"{r['length']} (YaRN x{r['yarn']:g})" if r.get("yarn") else str(r["length"])
        recall = f"{r['oracle_recall']:.3f}" if "oracle_recall" in r else "–"
        out.append(f"| {length} | {r['policy']} | " + " | ".join(cells) + f" | {sum(r['samples'].values())} | "
                   f"**{r['average']:.3f}**{ci} | {vs} | {recall} | {r['device_kv_bytes'] / 2**20:.1f} |")
    return "\n".join(out)


def averages(rows: list[dict]) -> str:
    """The averages alone, a policy a row and a length a column, each with its device KV MiB."""
    lengths = sorted({(r["length"], r.get("yarn")) for r in rows})
    cells = {(r["policy"], r["length"]): f"{r['average']:.3f}" + (f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if "ci" in r else "")
             + f" ({r['device_kv_bytes'] / 2**20:.0f})" for r in rows}
    policies = sorted({r["policy"] for r in rows}, key=lambda p: (p != "full", p))
    head = [f"{n // 1024}k" + (f" (YaRN x{y:g})" if y else "") for n, y in lengths]
    out = ["| policy | " + " | ".join(head) + " |", "|---|" + "---|" * len(lengths)]
    for p in policies:
        out.append(f"| {p} | " + " | ".join(cells.get((p, n), "–") for n, _ in lengths) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for length in sorted({r["length"] for r in rows}):
        here = sorted((r for r in rows if r["length"] == length), key=lambda r: r["device_kv_bytes"])
        sel = [(r["device_kv_bytes"] / 2**20, r["average"], r["policy"]) for r in here]
        pts = ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=f"{length // 1024}k", zorder=3)
        bars = [(x, r) for (x, _, _), r in zip(sel, here) if "ci" in r]
        if bars:  # the 95% interval of each average
            ax.errorbar([x for x, _ in bars], [r["average"] for _, r in bars], fmt="none", alpha=0.5, capsize=2,
                        yerr=[[r["average"] - r["ci"][0] for _, r in bars], [r["ci"][1] - r["average"] for _, r in bars]],
                        ecolor=pts.get_facecolor()[0])
        for x, y, name in sel:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points", color=pts.get_facecolor()[0])
    ax.set_xscale("log")
    ax.set_xlabel("device-resident KV cache (MiB, log scale)")
    ax.set_ylabel("RULER average (recall), 95% CI")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="length", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(meta: dict, records: list[dict], out: Path) -> list[dict]:
    """Write the answers (and their summary) to <out>.json; returns the summary."""
    rows = summarize(records)
    write_json(out, {"meta": meta, "records": records, "summary": rows})
    return rows


def report(meta: dict, records: list[dict], out: Path):
    rows = save(meta, records, out)
    model = display_name(meta["model"])
    samples = sorted({n for r in rows for n in r["samples"].values()})
    header = (f"{model}, {meta['device']}, {meta['dtype']}; RULER recall per task, "
              f"{'/'.join(map(str, samples))} sample(s) per task and length"
              f"{'' if meta.get('complete', True) else ' (an interrupted run: the rows that finished)'}")
    table = (header + "\n\n" + markdown(rows) + "\n\nAverage over the tasks (device KV MiB) per policy and length:\n\n"
             + averages(rows))
    try_plot(lambda: plot(rows, out.with_suffix(".png"), f"{model}, {meta['device']}: RULER average vs device KV"))
    publish(out.with_suffix(".md"), table)
    print("\n" + table, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir, .gguf, hub repo id or named model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--tasks", nargs="+", default=["discriminating"], choices=TASKS + list(GROUPS),
                   help="task names, or groups: discriminating (all but the four every policy but streaming passes: "
                        f"{', '.join(SATURATED)}), all (those four once per length) (default: discriminating)")
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--samples", type=int, default=5, help="prompts per task and length, to 32k (default: 5)")
    p.add_argument("--long-samples", type=int, default=3, help="prompts per task at lengths above 32k (default: 3)")
    p.add_argument("--rope-scaling", choices=["yarn"], help="YaRN for lengths past the model's context")
    p.add_argument("--rope-scale", type=float, default=4.0, help="with --rope-scaling yarn (default: 4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "ruler"), help="prefix of .json/.md/.png")
    p.add_argument("--replot", nargs="+", metavar="JSON",
                   help="rewrite the table and plot of earlier runs' JSON (several: merged into --out, e.g. the "
                        "lengths run with YaRN beside those without); runs nothing")
    args = p.parse_args(argv)
    check_bench_args(p, args)
    if args.replot:
        runs = args.runs
        meta, records, seen = dict(runs[0]["meta"]), [], set()
        for run in runs:  # each (length, task, sample, policy) once, the first run's
            for r in run["records"]:
                if (r["length"], r["task"], r["sample"], r["policy"]) not in seen:
                    seen.add((r["length"], r["task"], r["sample"], r["policy"]))
                    records.append(r)
        meta["complete"] = all(run["meta"].get("complete", True) for run in runs)
        report(meta, records, Path(args.out) if len(runs) > 1 else Path(args.replot[0]).with_suffix(""))
        return 0
    for spec in args.policies:
        try:
            parse_policy(spec)
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--policies {spec}: {e} (written name[-bits][/selector[:N]][@budget])")
    if min(args.lengths) < 512 or min(args.samples, args.long_samples) < 1 or not 1 <= args.rope_scale <= 1024:
        p.error("--lengths must be >= 512 tokens, --samples and --long-samples >= 1, --rope-scale in [1, 1024]")
    model_dir = resolve_model(args.model)
    rope = {"rope_type": "yarn", "factor": args.rope_scale} if args.rope_scaling else None
    model = load_model(model_dir, args.device, getattr(torch, args.dtype), rope)
    if max(args.lengths) > model.args.max_seq_len:
        p.error(f"--lengths {max(args.lengths)} exceeds the model's {model.args.max_seq_len}-token context "
                f"(--rope-scaling yarn --rope-scale F stretches it F times)")
    tok = Tokenizer(model_dir)
    builder, stop = Builder(tok), set(tok.eos_ids)
    cfgs = {}
    for spec in args.policies:
        try:
            cfgs[spec] = parse_policy(spec, model)
        except ValueError as e:
            p.error(f"--policies {spec}: {e}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    meta = {"model": model_dir.name, "device": device, "dtype": args.dtype, "python": platform.python_version(),
            "rope_scaling": rope, "tasks": args.tasks, "policies": args.policies, "new_tokens": NEW_TOKENS}
    runs = plan(args.tasks, args.lengths, args.samples, args.long_samples)
    journal = Path(args.out).with_suffix(".jsonl")
    try:
        done = resume(journal, {k: meta[k] for k in ("model", "device", "dtype", "rope_scaling")})
    except ValueError as e:
        p.error(f"--out {args.out}: {e}")
    wanted = {(n, t, i, spec) for n, t, k in runs for i in range(k) for spec in cfgs}
    done = [r for r in done if (r["length"], r["task"], r["sample"], r["policy"]) in wanted]
    have = {(r["length"], r["task"], r["sample"], r["policy"]) for r in done}
    if done:
        print(f"# {len(done)} answers already in {journal}: not run again", flush=True)
    t0 = time.perf_counter()

    def one(length, task, n, records):
        for i in range(n):
            todo = [spec for spec in cfgs if (length, task, i, spec) not in have]
            if not todo:
                continue
            prompt = builder.build(task, length, i)
            pre = Prefilled(model, prompt.ids)
            recall = oracle_recall(model, pre, {spec: cfgs[spec] for spec in todo if not cfgs[spec].online})
            for spec in todo:
                ids, mem = answer(model, cfgs[spec], pre, prompt.n_new, stop)
                text = tok.decode(ids, skip_special_tokens=True)
                records.append({"length": length, "yarn": rope and args.rope_scale, "task": task, "sample": i,
                                "policy": spec, "score": score(text, prompt.answers), "answers": prompt.answers,
                                "output": text, "device_kv_bytes": mem["device_bytes"], "oracle_recall": recall.get(spec)})
                with journal.open("a") as f:  # as it goes: an interrupted run loses at most this prompt's prefill
                    f.write(json.dumps(records[-1]) + "\n")
                print(f"{time.perf_counter() - t0:7.0f}s {length:>6} {task:<16} {i} {spec:<28} "
                      f"{records[-1]['score']:.2f}  {text[:60]!r}", flush=True)
    return run_all(runs, one, meta, Path(args.out), save_fn=save, report_fn=report, records=done)


def resume(journal: Path, run: dict) -> list[dict]:
    """The answers a journal of this run holds (its first line names the model, device, dtype and RoPE; a run of
    another refuses it); a new journal is started where there is none. A last line cut short is dropped."""
    if not journal.exists():
        journal.parent.mkdir(parents=True, exist_ok=True)
        journal.write_text(json.dumps({"run": run}) + "\n")
        return []
    lines = journal.read_text().splitlines()
    try:
        head = json.loads(lines[0])["run"] if lines else None
    except (ValueError, KeyError, TypeError):
        head = None
    if head != run:
        raise ValueError(f"{journal} holds answers of another run ({head}, not {run}): name another --out")
    records = []
    for k, line in enumerate(lines[1:], 2):
        try:
            records.append(json.loads(line))
        except ValueError:
            if k < len(lines):
                raise ValueError(f"{journal} line {k} is not JSON: delete that line or the file") from None
    return records


if __name__ == "__main__":
    sys.exit(main())
