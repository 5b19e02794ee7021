"""Many questions about one document, measured through generate.py itself: per document and cache policy, the time
to the first token of a first question (the document prefilled), of a second one (the cache rolled back to the
document), and of a run that loads the saved cache in place of the prefill; the file's size against a full cache's.

    python bench/session.py --out bench/results/session_cpu             # the default model, 2 documents, 5 policies

Each (document, policy) is two runs of generate.main: --interactive with two questions and --save-cache, then
--question (the second) with --load-cache. Rows go to OUT.jsonl as they finish; a rerun skips those there.
"""
import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
from checkpoint import resolve_model  # noqa: E402
from inputs import check_bench_args  # noqa: E402
from results import publish  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

EX = ROOT / "examples"
DOCS = {"story": ([EX / "lighthouse.txt"], None),  # the bundled story, whole (~3.2k tokens)
        "ledger-7.5k": ([EX / "documents" / "ledger_long.txt"], 7500),  # its first 7,500 tokens
        "mixed-31k": ([EX / "lighthouse.txt", *sorted((EX / "documents").glob("*.txt"))], 31000)}  # a 32k model's
QUESTIONS = {"story": ["In which year did the new keeper arrive?", "How many litres of mercury did they drain?"],
             "ledger-7.5k": ["At which station was the first observation made?", "Who was the observer on 03-08?"],
             "mixed-31k": ["In which year did the new keeper arrive?", "How many litres of mercury did they drain?"]}
POLICIES = ["full", "tailor", "kivi", "sparse", "streaming"]


def document(name: str, model: str | None, folder: Path) -> Path:
    """The document's text: its files one after another, cut to the first N tokens where the table says so."""
    paths, n = DOCS[name]
    if n is None:
        return paths[0]
    tok = Tokenizer(resolve_model(model))
    out = folder / f"{name}.txt"
    text = "\n\n".join(p.read_text() for p in paths)
    out.write_text(tok.decode(tok.encode(text, add_special_tokens=False)[:n]))
    return out


def run(argv: list[str], stdin: str = "") -> dict:
    """generate.main in this process with stdin given and stdout taken; its report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        old, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                rc = generate.main(argv + ["--report", str(report)])
        finally:
            sys.stdin = old
        if rc != 0:
            raise SystemExit(f"generate.py {' '.join(argv)} failed with exit status {rc}")
        return json.loads(report.read_text())


def measure(doc_name: str, doc: Path, policy: str, args, folder: Path) -> dict:
    common = ["--prompt-file", str(doc), "--cache", policy, "--max-new-tokens", str(args.max_new_tokens),
              "--device", args.device, *(["--model", args.model] if args.model else []),
              *(["--no-kernels"] if args.no_kernels else [])]
    saved = folder / f"{doc_name}-{policy}.kv"
    first, second = QUESTIONS[doc_name]
    session = run(common + ["--interactive", "--save-cache", str(saved)], stdin=f"{first}\n{second}\n")
    loaded = run(common + ["--question", second, "--load-cache", str(saved)])
    t1, t2 = session["turns"]
    assert loaded["generated_ids"] == t2["generated_ids"], "a loaded cache must answer as the rolled-back one"
    return {"document": doc_name, "policy": policy, "document_tokens": session["document_tokens"],
            "device": session["device"], "cpu": session["cpu"], "threads": session["cpu_threads"],
            "gpu": session.get("gpu"), "kernels": session["kernels"],
            "ttft_first_s": t1["first_token_s"], "prefill_s": t1["prefill_s"], "ttft_second_s": t2["first_token_s"],
            "read_tokens_second": t2["read_tokens"], "load_s": loaded["cache_file"]["load_s"],
            "ttft_loaded_s": loaded["cache_file"]["load_s"] + loaded["first_token_s"],
            "file_bytes": session["cache_file"]["bytes"], "full_cache_bytes": session["cache_file"]["full_cache_bytes"],
            "device_kv_bytes": session["kv_cache"]["device_bytes"]}


def table(rows: list[dict]) -> str:
    first = rows[0]
    hw = first["gpu"] or f"{first['cpu']}, {first['threads']} threads"
    lines = [f"Many questions about one document (`bench/session.py`): {hw}, {first['device']}. Time to the first token of the first question (the document "
             f"prefilled), of the second (the cache rolled back to the document, the question read through it), and of a "
             f"run that loads the saved cache (load included); the cache file against a full cache's K/V of the document.",
             "", "| document | tokens | policy | path | 1st question | 2nd question | loaded cache | file MiB | full cache MiB "
                 "| file / full |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['document']} | {r['document_tokens']} | {r['policy']} | {'kernels' if r['kernels'] else 'PyTorch'} "
                     f"| {r['ttft_first_s']:.2f} s | "
                     f"{r['ttft_second_s']:.2f} s | {r['ttft_loaded_s']:.2f} s | {r['file_bytes'] / 2**20:.1f} | "
                     f"{r['full_cache_bytes'] / 2**20:.1f} | {r['file_bytes'] / r['full_cache_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "session_cpu"), help="OUT.jsonl and OUT.md")
    p.add_argument("--docs", nargs="+", choices=list(DOCS), default=["story", "ledger-7.5k"])
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=POLICIES)
    p.add_argument("--model", help="as generate.py's (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--no-kernels", action="store_true", help="on CUDA: decode on the PyTorch path")
    args = p.parse_args(argv)
    args.replot = None
    check_bench_args(p, args)
    out = Path(args.out)
    done = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()] \
        if out.with_suffix(".jsonl").exists() else []
    kernels = args.device.startswith("cuda") and not args.no_kernels  # generate.py's default path
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.docs:
            doc = document(name, args.model, folder)
            for policy in args.policies:
                if any((r["document"], r["policy"], r["kernels"], r["device"]) == (name, policy, kernels, args.device)
                       for r in done):
                    continue
                row = measure(name, doc, policy, args, folder)
                done.append(row)
                with out.with_suffix(".jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(table([row]).splitlines()[-1], flush=True)
    publish(out.with_suffix(".md"), table(done))
    print(table(done))


if __name__ == "__main__":
    main()
