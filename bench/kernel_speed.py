"""Per-kernel microbenchmarks at Llama-3.1-8B shapes (32 query heads, 8 KV heads, head_dim 128), one layer.

Each kernel's time (20 calls replayed from a CUDA graph, the median of --reps), the bytes it must move, the
achieved bandwidth, and that as a fraction of the measured ceiling: HBM copy bandwidth for kernels
that read device memory, pinned host->device bandwidth for those that read host memory over PCIe.

    python bench/kernel_speed.py                      # at 128k tokens
    python bench/kernel_speed.py --length 32768
    python bench/kernel_speed.py --kvcomp --out bench/results/kvcomp_kernels_h200_128k.md   # quantized layers only:
        # quant_attend at 1/2/4 bits beside research/kvcomp.py's kvcomp_attend at several error bounds
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels as K  # noqa: E402
from kvcache import attention  # noqa: E402
from quant import QuantStore  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from latency import measure_bandwidth  # noqa: E402
from results import publish  # noqa: E402


def bench(fn, reps, n=20):
    """GPU time per call: n calls captured in a CUDA graph (no launch overhead), replayed; the median of reps."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / n)  # µs
    return statistics.median(times)


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--kvcomp", action="store_true", help="the quantized layers' kernels only, KVComp's beside KIVI's")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels.md"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_speed.py needs a CUDA GPU")
    H, n_kv, hd, L, dev, bf = 32, 8, 128, args.length, "cuda", torch.bfloat16
    bw = measure_bandwidth()
    pos = torch.tensor(L - 1, device=dev)
    q = torch.randn(H, hd, device=dev, dtype=bf)
    rows = []

    def add(name, us, moved, ceiling, what):
        gbs = moved / us / 1e3
        rows.append((name, us, moved / 2**20, gbs, 100 * gbs * 1e9 / bw[ceiling], what))

    # full cache: split-K attention over bf16 K/V
    k = torch.randn(n_kv, L, hd, device=dev, dtype=bf)
    v = torch.randn_like(k)
    split, n = K.split_plan(L, n_kv, 64)
    ws = K.Workspace(H, n, hd, dev)
    add("dense_attend", bench(lambda: K.dense_attend(q, k, v, pos, ws, split), args.reps), nbytes(k, v), "hbm",
        f"{L} tokens, {n} splits")
    add("  torch reference", bench(lambda: attention(q[None, :, None], k[None], v[None]), args.reps), nbytes(k, v),
        "hbm", "matmul + softmax + matmul")
    if args.kvcomp:
        return kvcomp_rows(args, q, k, v, pos, add, rows, bw)
    # quantized layer, 1 and 2 bits
    for bits in (1, 2):
        keys, values, split, ws = quant_layer(k, v, bits, H)
        n = ws.m.shape[1] - 1
        moved = nbytes(*keys.tensors(), *values.tensors())
        add(f"quant_attend {bits}-bit", bench(lambda: K.quant_attend(q, keys, values, pos, ws, split), args.reps),
            moved, "hbm", f"codes + scales + residual, {n} + 1 splits")
        kr = k[:, -1].contiguous()
        add(f"quantize_step {bits}-bit", bench(lambda: K.quantize_step(keys, kr, pos), args.reps), nbytes(kr),
            "hbm", "one row (+ a group when the ring is full)")
        if bits == 1:
            add("  torch reference", bench(lambda: attention(q.float()[None, :, None], keys.dequantize()[None],
                                                               values.dequantize()[None]), max(3, args.reps // 10)),
                moved, "hbm", "dequantize the store, attend")
    # sketch selector: 2-bit sketch scores + top-k
    sketch = QuantStore(n_kv, hd, L, bits=2, group=64, residual=64, per_channel=True, device=dev, dtype=bf, kernels=True,
                        token_major=True)
    sketch.append(k)
    scores = torch.empty(n_kv, L, device=dev, dtype=torch.float16)  # what KVCache scores into for a bf16 model
    moved = nbytes(*sketch.tensors()) + nbytes(scores)
    add("sketch_scores 2-bit", bench(lambda: K.sketch_scores(q, sketch, pos, scores, 8, 56), args.reps), moved, "hbm",
        "the group's mean query; codes + scales read, scores written")
    for nb, nw in ((4, 2), (4, 4), (8, 4), (2, 4)):
        add(f"  NB={nb} warps={nw}", bench(lambda: K.sketch_scores(q, sketch, pos, scores, 8, 56, None, nb, nw),
                                           args.reps), moved, "hbm", "groups per program, warps")
    for i, (nb, nw) in enumerate((K.LAUNCH["heads"], (1, 4), (2, 4), (2, 2))):
        heads = K.HeadScratch(H, L, dev, scores.dtype, block=nb * 64)
        add("sketch_scores 2-bit per head" + ("" if i == 0 else f" NB={nb} warps={nw}"),
            bench(lambda: K.sketch_scores(q, sketch, pos, scores, 8, 56, heads, nb, nw), args.reps),
            moved + 2 * nbytes(heads.raw), "hbm", "each query head: its scores written and read back, then the largest")
    half = scores.half()
    add("torch.topk k=128 fp16", bench(lambda: half.topk(128, dim=-1, sorted=False), args.reps), nbytes(half), "hbm",
        f"({n_kv}, {L}) fp16 (what a bf16 model uses)")
    order = half.topk(64 * 128 + 32, dim=-1).indices              # positions by rank, best first
    work = K.Candidates(n_kv, L, dev, half.dtype)
    none = torch.full((n_kv, 128), -1, dtype=torch.long, device=dev)
    add("kernels.topk k=128 fp16, no last choice", bench(lambda: K.topk(half, 128, none, work), args.reps), nbytes(half),
        "hbm", "the first step: every score kept, one program per head selects")
    for ratio in (1.5, 4, 16, 64):  # a last choice whose guess (its 33rd lowest) ranks ratio * 128: what is read
        r = int(ratio * 128)
        last = torch.cat([order[:, :95], order[:, r - 1:r + 32]], 1).contiguous()
        add(f"kernels.topk k=128 fp16, reads {ratio:g} k", bench(lambda: K.topk(half, 128, last, work), args.reps),
            nbytes(half), "hbm", "from the last choice: its bounds, one pass keeps what reaches them, one program "
                                 "per head selects")
        if ratio == 4:
            for block in (1024, 2048, 4096):
                add(f"  keep pass {block} scores per program", bench(lambda: K.topk(half, 128, last, work, BLOCK=block),
                                                                     args.reps), nbytes(half), "hbm", "default: 16 programs per row, 1024 to 4096")
    # host store over PCIe
    host_k = torch.empty(L, n_kv, hd, dtype=bf, pin_memory=True)
    host_v = torch.empty(L, n_kv, hd, dtype=bf, pin_memory=True)
    host_k.copy_(k.transpose(0, 1).cpu())
    host_v.copy_(v.transpose(0, 1).cpu())
    host_kc = torch.empty(n_kv, hd, L, dtype=bf, pin_memory=True)  # the channel selector's channel-major copy
    host_kc.copy_(k.transpose(1, 2).cpu())
    ch = torch.randint(0, hd, (n_kv, 8), device=dev)
    add("channel_scores C=8", bench(lambda: K.channel_scores(q, ch, host_kc, pos, scores, 8, 56), max(3, args.reps // 5)),
        n_kv * L * 8 * 2, "pcie", "8 channels of every key, from a channel-major copy in pinned host memory")
    vals, idx = scores.topk(128, dim=-1, sorted=False)
    spare = (-scores.float()).topk(128, dim=-1).indices  # 128 positions per head that idx does not hold
    for k_rows in (128, 2048):
        out_k, out_v = torch.empty(2, n_kv, k_rows, hd, device=dev, dtype=bf)
        slots = K.Slots(host_k, host_v, out_k, out_v, half.dtype)
        work = K.Candidates(n_kv, L, dev, half.dtype)
        for new in ((0, 38, 128) if k_rows == 128 else (k_rows,)):  # rows not held from the step before (38: the
            other = idx.clone()                                       # 30% measured on a model)
            other[:, :new] = spare[:, :new]
            chosen = [other, idx] if k_rows == 128 else [torch.randint(0, L, (n_kv, k_rows), device=dev) for _ in "ab"]
            both = half.scatter(1, chosen[0], 1000.0).scatter(1, chosen[1], 1000.0)
            steps = [both.scatter(1, c, 1001.0) for c in chosen]  # top-k c, the last choice close behind (as a model's)
            slots.clear()

            def two_steps():
                for x in steps:
                    K.topk(x, k_rows, slots.pos, work, rows=slots)
            add(f"topk into rows k={k_rows}, {new} new", bench(two_steps, args.reps) / 2,
                nbytes(out_k, out_v) * new / k_rows, "pcie", "the top-k, then only the rows not held from the step "
                                                             "before cross PCIe (zero-copy), in the select's program")
    att_k = torch.randn(n_kv, 192, hd, device=dev, dtype=bf)
    att_v = torch.randn_like(att_k)
    add("sparse_attend 192", bench(lambda: K.sparse_attend(q, att_k, att_v, vals, pos, 8, 128, 56), args.reps),
        nbytes(att_k, att_v), "hbm", "sinks + retrieved + window, 64 rows per program, combined")
    for split in (128, 256):
        add(f"  {split} rows per program", bench(lambda: K.sparse_attend(q, att_k, att_v, vals, pos, 8, 128, 56, split),
                                                 args.reps), nbytes(att_k, att_v), "hbm", "256: one program per head")
    kr, vr = k[:, -1].contiguous(), v[:, -1].contiguous()
    add("sparse_append", bench(lambda: K.sparse_append(kr, vr, pos, host_k, host_v, att_k[:, :8], att_v[:, :8],
                                                       att_k[:, 136:], att_v[:, 136:]), args.reps),
        nbytes(kr, vr), "pcie", "one row to host (posted writes) + window")
    write(args, rows, bw)


def quant_layer(k, v, bits, n_heads):
    """A quantized layer holding k, v (n_kv, L, hd) on the kernel path, and quant_attend's split and workspace."""
    n_kv, L, hd = k.shape
    kw = dict(bits=bits, group=64, residual=128, device=k.device, dtype=k.dtype, kernels=True)
    keys = QuantStore(n_kv, hd, L, per_channel=True, **kw)
    values = QuantStore(n_kv, hd, L, per_channel=False, **kw)
    keys.append(k)
    values.append(v)
    split, n = K.split_plan(L, n_kv, 64)
    return keys, values, split, K.Workspace(n_heads, n + 1, hd, k.device)


def write(args, rows, bw):
    table = [f"# {torch.cuda.get_device_name()}: HBM copy {bw['hbm'] / 1e12:.2f} TB/s, pinned H2D "
             f"{bw['pcie'] / 1e9:.1f} GB/s; one layer, {args.length} tokens, bf16\n",
             "| kernel | µs | MiB moved | GB/s | % of ceiling | what |", "|---|---|---|---|---|---|"]
    table += [f"| {name} | {us:.1f} | {mib:.2f} | {gbs:.1f} | {pct:.0f}% | {what} |"
              for name, us, mib, gbs, pct, what in rows]
    print("\n".join(table))
    publish(Path(args.out), "\n".join(table))


def kvcomp_rows(args, q, k, v, pos, add, rows, bw):
    """quant_attend at 1, 2, 4 bits and kvcomp_attend at several error bounds over the same K/V: Gaussian,
    each channel its own scale and offset (the widths a block takes follow from that, not from a model)."""
    from research.kernels import kvcomp_attend, kvcomp_plan
    from research.kvcomp import KVCompStore
    n_kv, L, hd = k.shape
    dev, bf = k.device, k.dtype
    g = torch.Generator(device=dev).manual_seed(0)
    scale = torch.rand(n_kv, 1, hd, device=dev, generator=g) * 3
    k = (k.float() * scale + torch.randn(n_kv, 1, hd, device=dev, generator=g)).to(bf)
    for bits in (1, 2, 4):
        keys, values, split, ws = quant_layer(k, v, bits, q.shape[0])
        add(f"quant_attend {bits}-bit", bench(lambda: K.quant_attend(q, keys, values, pos, ws, split), args.reps),
            nbytes(*keys.tensors(), *values.tensors()), "hbm", "KIVI codes + scales + ring")
        del keys, values
    kn, vn = k[:, -1].contiguous(), v[:, -1].contiguous()
    for eps in (1 / 6, 0.1, 0.05, 1 / 30):
        kw = dict(eps=eps, group=64, residual=128, device=dev, dtype=bf, bits_cap=8)
        keys = KVCompStore(n_kv, hd, L, per_channel=True, **kw)
        values = KVCompStore(n_kv, hd, L, per_channel=False, **kw)
        keys.append(k[:, :L - 1])
        values.append(v[:, :L - 1])
        split, ws = kvcomp_plan(keys, q.shape[0], dev)
        moved = nbytes(*keys.tensors(), *values.tensors())
        us = bench(lambda: kvcomp_attend(q, kn, vn, keys, values, pos, ws, split), args.reps)
        ref = attention(q.float()[None, :, None], torch.cat([keys.dequantize(), kn.float()[:, None]], 1)[None],
                        torch.cat([values.dequantize(), vn.float()[:, None]], 1)[None])[0, :, 0]
        err = (kvcomp_attend(q, kn, vn, keys, values, pos, ws, split).float() - ref).abs().max().item()
        bits = 8 * moved / (2 * n_kv * L * hd)
        add(f"kvcomp_attend eps={eps:.3g}", us, moved, "hbm",
            f"{bits:.2f} bits/value with tables and ring; max |out - reference| {err:.1e}")
        if eps == 0.1:
            for nw in (8, 16):
                us = bench(lambda: kvcomp_attend(q, kn, vn, keys, values, pos, ws, split, nw), args.reps)
                add(f"  warps={nw}", us, moved, "hbm", "the same, other warps per program (default 4)")
        del keys, values
    write(args, rows, bw)


if __name__ == "__main__":
    main()
