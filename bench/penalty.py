"""Does the repetition penalty keep the default model's greedy answers from looping? One generate.py run per
document and penalty (the CLI itself, with --report), the answers and how much of each repeats itself.

    python bench/penalty.py                                   # writes bench/results/penalty.md and penalty.json
    python bench/penalty.py --penalties 1.1 1.2 1.3 --last-n 64  # llama.cpp's window (runs of other settings stay)

Repeated 4-grams: the fraction of the answer's token 4-grams that already occurred earlier in the answer
(0 for text that never repeats a phrase; a loop drives it toward 1). An answer that ends before the token
limit ended at the model's end-of-turn token.
"""
import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import generate  # noqa: E402
from results import publish  # noqa: E402

DOCS = [("examples/lighthouse.txt", "Summarise this story in three sentences."),
        ("examples/documents/salt_road.txt", "Summarise this story in three sentences."),
        ("examples/documents/tidegauge.py.txt", "Summarise what this module does in three sentences.")]


def repeated_4grams(ids: list[int]) -> float:
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return sum(g in set(grams[:i]) for i, g in enumerate(grams)) / max(len(grams), 1)


def run(doc: str, question: str, penalty: float, last_n: int, max_new: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "run.json"
        with contextlib.redirect_stdout(io.StringIO()):
            rc = generate.main(["--prompt-file", str(ROOT / doc), "--question", question, "--max-new-tokens",
                                str(max_new), "--repetition-penalty", str(penalty), "--repeat-last-n", str(last_n or 0),
                                "--report", str(report)])
        if rc != 0:
            raise SystemExit(f"generate.py failed on {doc} (exit status {rc})")
        rep = json.loads(report.read_text())
    ids = rep["generated_ids"]
    return {"doc": doc, "penalty": penalty, "last_n": last_n, "tokens": len(ids), "ended": len(ids) < max_new,
            "repeated_4grams": round(repeated_4grams(ids), 3), "text": rep["generated_text"].strip(),
            "prompt_tokens": rep["prompt_tokens"], "cpu": rep.get("gpu") or rep["cpu"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.1, 1.2, 1.3])
    p.add_argument("--last-n", type=int, nargs="+", default=[generate.Sampling.repeat_last_n],
                   help="--repeat-last-n values (default: generate.py's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "penalty")
    p.add_argument("--replot", action="store_true", help="only rebuild the table from the JSON")
    args = p.parse_args(argv)
    out = args.out.with_suffix(".json")
    rows = json.loads(out.read_text()) if out.exists() else []  # runs of other settings are kept
    for doc, question in DOCS if not args.replot else []:
        for penalty in args.penalties:
            for last_n in args.last_n if penalty != 1.0 else [None]:  # no penalty: no window
                rows = [r for r in rows if (r["doc"], r["penalty"], r["last_n"]) != (doc, penalty, last_n)]
                rows.append(run(doc, question, penalty, last_n, args.max_new_tokens))
                r = rows[-1]
                print(f"{doc} {penalty}@{last_n}: {r['tokens']} tokens, repeated 4-grams {r['repeated_4grams']}",
                      file=sys.stderr)
    rows.sort(key=lambda r: (r["doc"] != DOCS[0][0], r["doc"], r["penalty"], r["last_n"] or 0))
    out.write_text(json.dumps(rows, indent=1))
    lines = [f"generate.py, default model, greedy, full cache, at most {args.max_new_tokens} new tokens; {rows[0]['cpu']}\n",
             "| document | prompt tokens | --repetition-penalty | --repeat-last-n | tokens | ended at end-of-turn | "
             "repeated 4-grams |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {Path(r['doc']).name} | {r['prompt_tokens']} | {r['penalty']} | {'–' if r['last_n'] is None else r['last_n']} | {r['tokens']} | "
              f"{'yes' if r['ended'] else 'no'} | {r['repeated_4grams']:.3f} |" for r in rows]
    lines += ["", "The answers:", ""]
    lines += [f"- {Path(r['doc']).name}, {r['penalty']}" + ("" if r["last_n"] is None else f" over {r['last_n']}") +
              f": {r['text'][:600]}" for r in rows]
    publish(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines[:len(rows) + 3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
