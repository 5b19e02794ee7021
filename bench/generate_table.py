"""The table of generate.py runs in the README, from their --report files.

    python bench/generate_table.py bench/results/generate/*.json    # writes bench/results/generate.md
    python bench/generate_table.py --out bench/results/generate_qwen.md bench/results/generate_qwen/*.json

Each report names its hardware (GPU, or the CPU and its threads), dtype, cache policy and path; the
rows give prefill speed, decode ms/token, the first decode step (timed apart: on CUDA it compiles
the kernels and captures the graph), the KV cache held on the device (and on the host) and peak memory.
"""
import argparse
import json
import sys
from pathlib import Path

from results import publish


def row(rep: dict) -> str:
    mib = 2 ** 20
    kv = rep["kv_cache"]
    hw = rep.get("gpu") or f"{rep['cpu']} ({rep['cpu_threads']} threads)"
    path = ("kernels + CUDA graph" if rep["cuda_graph"] else "kernels") if rep["kernels"] else "PyTorch"
    host = f" (+ {kv['host_bytes'] / mib:.0f} MiB host)" if kv["host_bytes"] else ""
    peak = f"{rep['peak_memory_bytes'] / 2**30:.2f} GiB" + (" (RSS)" if rep["device"] == "cpu" else "")
    return (f"| {hw} | {rep['dtype']} | {rep['policy']['cache']} | {path} | {rep['prefill_tok_per_s']:,.0f} tok/s "
            f"| {rep['decode_ms_per_token']:.2f} ms/token | {1e3 * rep['first_step_s']:,.0f} ms "
            f"| {kv['device_bytes'] / mib:.0f} MiB{host} | {peak} |")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="the table of generate.py runs, from their --report files")
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "generate.md")
    args = p.parse_args(argv)
    reports = [json.loads(Path(f).read_text()) for f in args.reports]
    table = [f"generate.py on {reports[0]['prompt_tokens']:,} prompt tokens, {len(reports[0]['generated_ids'])} generated\n",
             "| hardware | dtype | cache | path | prefill | decode | first step | KV cache | peak memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [row(rep) for rep in sorted(reports, key=lambda r: (r["device"] != "cpu", not r["kernels"], r["policy"]["cache"]))]
    print("\n".join(table))
    publish(args.out, "\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
