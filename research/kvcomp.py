"""KVComp's compressor (Jiang et al., 2025, arXiv 2509.00579), first stage: what an error-bounded
quantizer and an entropy coder give in bits per value on real keys and values, before any kernel.

  quantize_eb  codes of each block to an error bound: |x - x_hat| <= eps * R, the step 2 eps R. Keys
               in blocks of g tokens of one channel, values in blocks of g channels of one token (the
               engine's quantized-layer groups). R is the block's own range ("block": each block stores
               its minimum and range, as KIVI does) or its channel's range over the whole prompt
               ("channel": one range per key channel / per value token, so a block whose values
               span little of it needs few levels and its codes few bits)
  coders       what the codes cost, per value, metadata included:
                 fixed    ceil(log2 levels) bits per code (KIVI's packing)
                 entropy  the codes' empirical entropy per chunk: a bound no symbol coder beats
                 huffman  canonical Huffman per chunk of 1024 codes (KVComp), each chunk's code-length
                          table counted (4 bits per used level)
                 for      frame of reference per 32 codes (PackKV's direction): the sub-block's minimum
                          and width, then each code minus the minimum in that width
               plus each block's minimum and range in bf16 ("block": 32 bits per block) or each
               channel's ("channel": 32 bits per channel and prompt, and a block's minimum as a code)

eps = 1/6 on the block range is KIVI's 2-bit grid exactly (the step is range / 3): the same codes, so the
same accuracy as kivi-2, and what a coder saves is saved at no accuracy cost.

    python research/kvcomp.py --docs prose code --context 2048 --out bench/results/kvcomp_bits_default.md
    python research/kvcomp.py --model qwen2.5-coder-0.5b --docs stdlib --context 2048 \\
        --out bench/results/kvcomp_bits_qwen05.md
"""
import argparse
import heapq
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KIVI = {1: 1 / 2, 2: 1 / 6, 4: 1 / 30}  # eps of KIVI's b-bit grid: step = range / (2^b - 1)


def blocks(x: torch.Tensor, g: int, per_channel: bool) -> torch.Tensor:
    """One head's (T, hd) keys or values -> (n_blocks, g): g tokens of a channel (per_channel) or g channels
    of a token; T and hd multiples of g."""
    T, hd = x.shape
    if per_channel:
        return x.T.reshape(hd, T // g, g).reshape(-1, g)
    return x.reshape(T, hd // g, g).reshape(-1, g)


def quantize_eb(b: torch.Tensor, eps: float, ref_range: torch.Tensor | None = None):
    """Blocks (n, g) -> codes (n, g) int64, minima (n,), step (n,) with |b - (mn + codes * step)| <= eps * R,
    R the block's range, or ref_range (n,) where given (each block's channel range). A constant block gets
    step 0 and codes 0."""
    b = b.float()
    mn = b.amin(-1)
    R = (b.amax(-1) - mn) if ref_range is None else ref_range.float()
    step = 2 * eps * R
    codes = torch.where(step[:, None] > 0, ((b - mn[:, None]) / step.clamp_min(1e-30)[:, None]).round(), 0)
    return codes.long(), mn, step


def dequantize(codes, mn, step):
    return mn[:, None] + codes * step[:, None]


def entropy_bits(codes: torch.Tensor, chunk: int = 1024) -> float:
    """Sum over chunks of the chunk's empirical entropy times its length."""
    flat = codes.reshape(-1)
    total = 0.0
    for c in flat.split(chunk):
        p = torch.bincount(c).float()
        p = p[p > 0] / c.numel()
        total += float(-(p * p.log2()).sum()) * c.numel()
    return total


def huffman_lengths(counts: list[int]) -> list[int]:
    """Code length of each symbol of a Huffman code for these counts (0 for unused symbols)."""
    used = [(c, i) for i, c in enumerate(counts) if c > 0]
    if len(used) == 1:
        return [1 if c > 0 else 0 for c in counts]
    heap = [(c, i, [i]) for c, i in used]
    heapq.heapify(heap)
    lengths = [0] * len(counts)
    while len(heap) > 1:
        c1, i1, s1 = heapq.heappop(heap)
        c2, i2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(i1, i2), s1 + s2))
    return lengths


def huffman_bits(codes: torch.Tensor, chunk: int = 1024) -> float:
    """Canonical Huffman per chunk of `chunk` codes: the coded bits plus a table of 4 bits per level up to
    the largest code used (canonical codes are rebuilt from the lengths alone)."""
    total = 0
    for c in codes.reshape(-1).split(chunk):
        counts = torch.bincount(c).tolist()
        lengths = huffman_lengths(counts)
        total += sum(n * l for n, l in zip(counts, lengths)) + 4 * len(counts)
    return float(total)


def for_bits(codes: torch.Tensor, sub: int = 32, code_bits: int = 8) -> float:
    """Frame of reference per `sub` codes: the minimum (code_bits) and the width (3 bits), then each code
    minus the minimum in that width."""
    c = codes.reshape(-1, sub)
    spread = (c.amax(-1) - c.amin(-1)).float()
    width = torch.where(spread > 0, torch.floor(torch.log2(spread.clamp_min(1))) + 1, 0)
    return float((width * sub).sum() + c.shape[0] * (code_bits + 3))


def measure(x: torch.Tensor, per_channel: bool, eps: float, mode: str, g: int = 32) -> dict:
    """Bits per value of each coder for one layer's keys or values x (n_kv, T, hd), and the largest error
    as a fraction of the bound (<= 1)."""
    n_kv, T, hd = x.shape
    T -= T % g
    n = 0
    out = {"fixed": 0.0, "entropy": 0.0, "huffman": 0.0, "for": 0.0}
    meta = 0.0
    worst = 0.0
    for h in range(n_kv):
        xh = x[h, :T].float()
        b = blocks(xh, g, per_channel)
        if mode == "channel":  # each key channel's (or value token's) range over the prompt
            R = (xh.amax(0) - xh.amin(0)) if per_channel else (xh.amax(1) - xh.amin(1))
            ref = R.repeat_interleave(T // g) if per_channel else R.repeat_interleave(hd // g)
            codes, mn, step = quantize_eb(b, eps, ref)
            levels = int(codes.max()) + 1
            meta += 32 * R.numel() + b.shape[0] * max(1, math.ceil(math.log2(1 / (2 * eps) + 1)))  # block minimum
            bound = eps * ref
        else:
            codes, mn, step = quantize_eb(b, eps)
            levels = int(codes.max()) + 1
            meta += 32 * b.shape[0]  # minimum and range in bf16
            bound = eps * (b.amax(-1) - b.amin(-1))
        err = (dequantize(codes, mn, step) - b.float()).abs()
        worst = max(worst, float((err / bound.clamp_min(1e-30)[:, None]).amax()))
        out["fixed"] += codes.numel() * max(1, math.ceil(math.log2(max(levels, 2))))
        out["entropy"] += entropy_bits(codes)
        out["huffman"] += huffman_bits(codes)
        out["for"] += for_bits(codes, code_bits=max(1, math.ceil(math.log2(max(levels, 2)))))
        n += codes.numel()
    return {k: (v + meta) / n for k, v in out.items()} | {"worst_error_over_bound": worst, "values": n}


def main(argv=None) -> int:
    from accuracy import DOCUMENTS, Prefilled, display_name, load_documents
    from checkpoint import resolve_model
    from model import load_model
    from tokenizer import Tokenizer
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--docs", nargs="+", default=["prose"], help=" ".join(DOCUMENTS))
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--eps", type=float, nargs="+", default=[KIVI[2], 0.1, 0.05, KIVI[4]])
    p.add_argument("--layers", type=int, nargs="+", help="layers to measure (default: every fourth)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kvcomp_bits.md"))
    args = p.parse_args(argv)
    from results import publish
    model_dir = resolve_model(args.model)
    model, tok = load_model(model_dir), Tokenizer(model_dir)
    layers = args.layers or list(range(0, model.args.n_layers, 4))
    name = display_name(model_dir.name)
    lines = [f"{name}, fp32 prefill of {args.context} tokens: bits per value, metadata included, over "
             f"layers {', '.join(map(str, layers))} (kivi-2 packs 2 + 1: a bf16 scale and minimum per 32 values)", "",
             "| doc | eps | mode | tensor | fixed | entropy | huffman | for | worst error / bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, doc in load_documents(tok, args.docs).items():
        pre = Prefilled(model, doc[:args.context])
        for eps in args.eps:
            for mode in ("block", "channel"):
                for tensor, xs, per_channel in (("K", pre.keys, True), ("V", pre.values, False)):
                    rs = [measure(xs[i][0], per_channel, eps, mode) for i in layers]
                    n = sum(r["values"] for r in rs)
                    avg = {k: sum(r[k] * r["values"] for r in rs) / n for k in ("fixed", "entropy", "huffman", "for")}
                    worst = max(r["worst_error_over_bound"] for r in rs)
                    lines.append(f"| {name} | {eps:.4g} | {mode} | {tensor} | {avg['fixed']:.2f} | "
                                 f"{avg['entropy']:.2f} | {avg['huffman']:.2f} | {avg['for']:.2f} | {worst:.3f} |")
                    print(lines[-1], flush=True)
    publish(Path(args.out), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
