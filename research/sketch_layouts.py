"""The sketch kernel's launch configurations against the kernel it replaced, one layer at Llama-3.1-8B shapes
(32 query heads, 8 KV heads, head_dim 128, a 2-bit sketch), each timed as bench/kernel_speed.py times (20
calls replayed from a CUDA graph, the median of 20), and checked against the old kernel's scores (largest
difference, how many of each head's top-128 they share).

    python research/sketch_layouts.py                    # 131072 tokens: bench/results/sketch_layouts_h100.md
    python research/sketch_layouts.py --length 32768 --out /tmp/sketch.md

The old kernel (one (64, 128) tile per group, reduced across the lanes of each token) is read from the
commit before the change (`git show 4b6abfb:kernels.py`), so the comparison needs the repository's history.
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import kernels as K  # noqa: E402
from kernel_speed import bench  # noqa: E402
from quant import QuantStore  # noqa: E402
from results import publish  # noqa: E402

BEFORE = "4b6abfb"
MEAN = [(2, 2), (4, 2), (4, 4), (8, 4), (2, 4), (8, 8)]
HEADS = [(1, 2), (1, 4), (2, 4), (2, 8)]


def old_kernels():
    src = subprocess.run(["git", "show", f"{BEFORE}:kernels.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    path = Path(tempfile.mkdtemp()) / "kernels_before.py"  # Triton reads a kernel's source from its file
    path.write_text(src.stdout)
    spec = importlib.util.spec_from_file_location("kernels_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sketch_layouts_h100.md"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("research/sketch_layouts.py needs a CUDA GPU")
    OK = old_kernels()
    H, n_kv, hd, L, dev, bf = 32, 8, 128, args.length, "cuda", torch.bfloat16
    pos, q = torch.tensor(L - 1, device=dev), torch.randn(H, hd, device=dev, dtype=bf)
    sketch = QuantStore(n_kv, hd, L, bits=2, group=64, residual=64, per_channel=True, device=dev, dtype=bf,
                        kernels=True, token_major=True)
    sketch.append(torch.randn(n_kv, L, hd, device=dev, dtype=bf))
    moved = sum(t.numel() * t.element_size() for t in sketch.tensors()) + n_kv * L * 2
    ref_m, ref_h, out = (torch.empty(n_kv, L, device=dev, dtype=torch.float16) for _ in range(3))
    old_heads = OK.HeadScratch(H, L, dev, torch.float16, block=8 * 64)
    OK.sketch_scores(q, sketch, pos, ref_m, 8, 56)
    OK.sketch_scores(q, sketch, pos, ref_h, 8, 56, old_heads)

    def agree(ref):
        fin = torch.isfinite(ref.float())
        top = [set(r.tolist()) for r in ref.float().topk(128, -1).indices]
        mine = [set(r.tolist()) for r in out.float().topk(128, -1).indices]
        return (f"{(out.float() - ref.float()).abs()[fin].max().item():.1e}",
                f"{sum(len(a & b) for a, b in zip(top, mine)) / n_kv:.0f}")

    rows = [("mean", f"before ({BEFORE})", bench(lambda: OK.sketch_scores(q, sketch, pos, ref_m, 8, 56), 20), "0", "128"),
            ("per head", f"before ({BEFORE})",
             bench(lambda: OK.sketch_scores(q, sketch, pos, ref_h, 8, 56, old_heads), 20), "0", "128")]
    for ranking, configs, ref in (("mean", MEAN, ref_m), ("per head", HEADS, ref_h)):
        for nb, nw in configs:
            heads = K.HeadScratch(H, L, dev, torch.float16, block=nb * 64) if ranking == "per head" else None
            t = bench(lambda: K.sketch_scores(q, sketch, pos, out, 8, 56, heads, nb, nw), 20)
            name = f"NB={nb} warps={nw}"
            rows.append((ranking, name, t, *agree(ref)))
            print(rows[-1], flush=True)
    lines = [f"# {torch.cuda.get_device_name()}, {L} tokens, 8 KV heads x 4 query heads, head_dim 128, 2-bit sketch",
             f"# `python research/sketch_layouts.py --length {L}`; kernels.LAUNCH now: {K.LAUNCH}", "",
             "| ranking | kernel | µs | GB/s | max abs diff | top-128 shared |", "|---|---|---|---|---|---|"]
    lines += [f"| {r} | {n} | {t:.1f} | {moved / t / 1e3:.0f} | {d} | {s} |" for r, n, t, d, s in rows]
    publish(Path(args.out), "\n".join(lines))


if __name__ == "__main__":
    main()
