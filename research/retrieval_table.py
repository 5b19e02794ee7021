"""The retrieval comparison of research/README.md from the benchmarks' own JSON: what each selector keeps of the
full cache's copy accuracy at the same device memory, and what it costs per token at 128k.

    python research/retrieval_table.py          # writes bench/results/retrieval_summary.md

Inputs (bench/results/): shortlist_cpu.json, shortlist4k_cpu.json with onebit4k_cpu.json, oracle4k_cpu.json
and split4k_cpu.json, and onebit7k_cpu.json with oracle7k_cpu.json and split7k_cpu.json (default model, 2k,
4k and 7.5k, CPU), split_h200.json (the split on an H200, six documents at 4k and 7.5k), retrieval_heads_h100.json
(default model, six documents, 4k and 7.5k), retrieval_default_h100.json (default model, three documents, 4k),
accuracy_qwen05_h100.json (Qwen2.5-Coder-0.5B at 32k), latency.json and latency_heads.json (Llama-3.1-8B
shapes at 128k, H100), latency_h200.json, latency_h200_channels.json, latency_h200_onebit.json and
latency_h200_split.json (the same on an H200).
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from results import publish  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def summary(name: str) -> dict:
    """(context, policy) -> summary row of an accuracy run."""
    return {(r["context"], r["policy"]): r for r in json.loads((RESULTS / name).read_text())["summary"]}


def latency(name: str) -> dict:
    """(context, policy) -> row of a latency run."""
    return {(r["context"], r["policy"]): r for r in json.loads((RESULTS / name).read_text())["rows"] if "ms_median" in r}


def recovered(rows: dict, context: int, policy: str) -> float:
    """The fraction of what the window (streaming) loses against the full cache that `policy` gets back."""
    full, window = rows[context, "full"]["top1"], rows[context, "streaming"]["top1"]
    return (rows[context, policy]["top1"] - window) / (full - window)


def per_context(rows: dict) -> str:
    out = ["| context | policy | copy top-1 | vs full | window's loss recovered | KL mean | device KV MiB |",
           "|---|---|---|---|---|---|---|"]
    for context, policy in sorted(k for k in rows if k[1] not in ("full", "streaming")):
        r = rows[context, policy]
        out.append(f"| {context} | {policy} | {r['top1']:.3f} | {r['top1'] / rows[context, 'full']['top1']:.2f}x | "
                   f"{100 * recovered(rows, context, policy):.0f}% | {r['kl_mean']:.3f} | "
                   f"{r['device_kv_bytes'] / 2**20:.2f} |")
    return "\n".join(out)


def docs(rows: dict) -> str:
    n = max(r["docs"] for r in rows.values())
    return f"{n} doc{'s' if n > 1 else ''}"


def tried(cpu: dict, cpu4k: dict, cpu7k: dict, heads: dict, three: dict, qwen: dict, h100: dict, h200: dict) -> str:
    """One row per selector: copy top-1 / full at each measured setting, ms/token at 128k on each GPU. A
    selector's policy may be a tuple: the first that a run has (a budget that follows the context)."""
    runs = [(cpu, 2048), (cpu4k, 4096), (cpu7k, 7680), (heads, 4096), (heads, 7680), (three, 4096), (qwen, 32768)]
    selectors = [("`sketch` (default): 2-bit sketch, group-mean query, the same top-k on every layer", "tailor-2",
                  "tailor-1"),
                 ("`sketch-heads`: each query head's softmax, the largest", "tailor-2/sketch-heads", "tailor-1/sketch-heads"),
                 ("`sketch`, top-k split by layer as the plan says, the same total", "tailor-2+split", "tailor-1+split"),
                 ("`sketch-heads`, top-k split by layer", "tailor-2+split/sketch-heads", None),
                 ("`exact`: full-precision keys (a measurement)", "tailor-2/exact", None),
                 ("`exact-heads`: the same, per query head (a measurement)", "tailor-2/exact-heads", None),
                 ("`sketch-next`: a token scores as its predecessor", "tailor-2/sketch-next", None),
                 ("`sketch-predicted`: ranked with the query predicted one layer early", "tailor-2/sketch-predicted", None),
                 ("`shortlist`: 4 x 128 candidates fetched one layer early, exact re-rank", "tailor-2/shortlist",
                  "tailor-1/shortlist"),
                 ("`shortlist:2`: the same, 2 x 128 candidates", "tailor-2/shortlist:2", None),
                 ("`shortlist-heads`: the shortlist ranked per query head at both stages", "tailor-2/shortlist-heads",
                  None),
                 ("`sketch:1b`: a 1-bit sketch, the freed memory spent on top-k (budget 256 at 4k, 312 at 7.5k in "
                  "fp32; 448 in bf16)", ("tailor-2/sketch:1b@256", "tailor-2/sketch:1b@312"),
                  "tailor-1/sketch:1b@448"),
                 ("`sketch-heads:1b`: the same, ranked per query head",
                  ("tailor-2/sketch-heads:1b@256", "tailor-2/sketch-heads:1b@312"), None),
                 ("`sketch`, 512 tokens instead of 192 (more device memory)", "tailor-2@512", None),
                 ("`channels`: the paper's, C channels read from the host", None, "sparse/channels")]
    out = [f"| selector | default 2k, CPU ({docs(cpu)}) | default 4k, CPU ({docs(cpu4k)}) | default 7.5k, CPU "
           f"({docs(cpu7k)}) | default 4k ({docs(heads)}) | default 7.5k ({docs(heads)}) | default 4k ({docs(three)}) "
           f"| Qwen 0.5B 32k ({docs(qwen)}) | ms/token at 128k, H100 | H200 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for label, policies, timed in selectors:
        cells = []
        for rows, c in runs:
            policy = next((p for p in (policies if isinstance(policies, tuple) else (policies,)) if (c, p) in rows), None)
            cells.append("–" if policy is None else f"{rows[c, policy]['top1'] / rows[c, 'full']['top1']:.2f}x")
        for speed in (h100, h200):
            ms = speed.get((131072, timed), {}).get("ms_median")
            cells.append("–" if ms is None else f"{ms:.2f}")
        out.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(out)


def merged(*names: str) -> dict:
    """Summary rows of several runs with the same settings (their full and streaming rows are the same)."""
    return {k: r for name in names for k, r in summary(name).items()}


def build() -> str:
    heads = summary("retrieval_heads_h100.json")
    cpu4k = merged("shortlist4k_cpu.json", "onebit4k_cpu.json", "oracle4k_cpu.json", "split4k_cpu.json")
    cpu7k = merged("onebit7k_cpu.json", "oracle7k_cpu.json", "split7k_cpu.json")
    speed = {**latency("latency.json"), **latency("latency_heads.json")}
    return ("Default model, H100 bf16, six documents, the same device memory per row pair:\n\n" + per_context(heads)
            + f"\n\nDefault model, CPU fp32, {docs(cpu4k)} at 4k and {docs(cpu7k)} at 7.5k (`tailor-2` and its variants at "
              "the same device memory, 1-bit rows with their memory-matched budgets):\n\n"
            + per_context({**cpu4k, **cpu7k})
            + "\n\nThe top-k split on the kernel path, default model, H200 bf16, six documents at 4k and 7.5k:\n\n"
            + per_context(summary("split_h200.json"))
            + "\n\nCopy top-1 against the full cache of the same run, and decode speed (Llama-3.1-8B shapes):\n\n"
            + tried(summary("shortlist_cpu.json"), cpu4k, cpu7k, heads, summary("retrieval_default_h100.json"),
                    summary("accuracy_qwen05_h100.json"), speed,
                    {**latency("latency_h200_split.json"), **latency("latency_h200_onebit.json"),
                     **latency("latency_h200.json"),  # tailor-1: the 20-step run of latency_h200.json
                     **latency("latency_h200_channels.json")}))


def main():
    text = build()
    publish(RESULTS / "retrieval_summary.md", text)
    print(text)


if __name__ == "__main__":
    main()
