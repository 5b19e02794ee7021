"""KVComp's compressor (Jiang et al., 2025, arXiv 2509.00579) for the quantized layers.

Second stage, the store the engine runs (quantizer(eps) registers it: CacheConfig(quantizer="kvcomp:EPS")):

  KVCompStore   append-only, as quant.QuantStore: the newest tokens wait in a full-precision ring, and
                a group of g tokens is compressed once, when it leaves it. Every channel c of a head has
                a grid lo_c + n * step_c, step_c = 2 eps R_c, R_c the channel's range over the first
                tokens compressed (the prompt), so |x - x_hat| <= eps R_c for every value, later ones
                included (a constant channel: R_c the head's mean channel range). A block is g values
                (keys: g tokens of one channel; values: g channels of one token); it stores its
                smallest grid index `base` and a bit width w, then each index minus base in w bits as w
                bit planes of g bits (plane p holds bit p of every code): a quiet block takes few
                bits, a constant one none. Blocks sit back to back in one int32 word pool; a group's
                first word is in a table, a block's is that plus the widths before it, so nothing
                compressed is ever moved or touched again.
  KVCompLayer   a quant layer on it (kvcache.QUANTIZERS, by quantizer()): PyTorch decode, and the kernel step
                through research/kernels.kvcomp_attend, which reads the planes inside attention.

First stage: what an error-bounded quantizer and an entropy coder give in bits per value on real keys
and values, before any kernel.

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

import kvcache  # noqa: E402
from kvcache import CacheConfig, ConfigError  # noqa: E402
from quant import QuantStore  # noqa: E402
from model import attention  # noqa: E402

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


# ------------------------------------------------------------------------------ the store

META_W = 5  # a block's meta word: base << META_W | width


def plane_words(d: torch.Tensor, width: int) -> torch.Tensor:
    """Codes d (..., g) >= 0 -> bit planes (..., width, g / 32) int32: word j of plane p holds bit p of codes
    32 j .. 32 j + 31, code 32 j + b at bit b."""
    g = d.shape[-1]
    bits = (d[..., None, :] >> torch.arange(width, device=d.device)[:, None]) & 1        # (..., width, g)
    w = (bits.view(*bits.shape[:-1], g // 32, 32) << torch.arange(32, device=d.device)).sum(-1)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


class KVCompStore(QuantStore):
    """One layer's keys (per_channel) or values, error-bounded and bit-plane packed (module docstring). The
    ring and what leaves it when are QuantStore's (append, quantized); what is stored is this class's.

    Tables, all on the device: lo, step (n_kv, hd) fp32, the channel grids; meta (n_kv, cap / g, hd) int32,
    each block's base and width (keys: block j is channel j of the group; values: token j // (hd / g) of the
    group, channels g (j % (hd / g)) ..); offset (n_kv, cap / g) int32, a group's first word in `pool`.
    pool grows on the PyTorch path (by reallocation: the words keep their offsets); on the kernel path it
    is sized up front for `bits_cap` bits per value (a CUDA graph holds its address) and refuses to overflow.
    """

    def __init__(self, n_kv, hd, max_len, *, eps, group, residual, per_channel, device, dtype, bits_cap=None):
        if not 0 < eps <= 0.5:
            raise ConfigError("error_bound", f"error_bound must be in (0, 0.5] (a fraction of each channel's range), "
                                             f"got {eps}")
        assert group % 32 == 0 and residual % group == 0 and hd % group == 0
        self.eps, self.g, self.R, self.per_channel, self.grow = eps, group, residual, per_channel, bits_cap is None
        cap = -(-max_len // group) * group
        self.lo = torch.zeros(n_kv, hd, device=device)
        self.step = torch.zeros(n_kv, hd, device=device)
        self.meta = torch.zeros(n_kv, cap // group, hd, dtype=torch.int32, device=device)
        self.offset = torch.zeros(n_kv, cap // group, dtype=torch.int32, device=device)
        words = n_kv * cap * hd * (bits_cap or 4) // 32 + 1
        self.pool = torch.zeros(words, dtype=torch.int32, device=device)
        self.res = torch.zeros(n_kv, residual, hd, dtype=dtype, device=device)
        self.length = self.n_q = self.used = 0  # tokens stored, of which compressed; words of pool in use

    def tensors(self):
        """What the store holds on the device: the pool's words in use, the tables of the groups stored."""
        ng = self.n_q // self.g
        return [self.pool[:self.used], self.meta[:, :ng], self.offset[:, :ng], self.lo, self.step, self.res]

    def advance(self, length: int):
        """The kernel path: tokens up to `length` are in the ring (kvcomp_attend's step wrote them); compress
        the groups that leave it. The one host sync: the words they take, once per g tokens."""
        n_q1 = self.quantized(length)
        if n_q1 > self.n_q:
            self._store_groups(self.res[:, self._slots(self.n_q, n_q1)])
        self.length, self.n_q = length, n_q1

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(n_kv, n, hd), n a multiple of g -> (n_kv, n / g, hd, g): the blocks of each group, in pool order."""
        n_kv, n, hd = x.shape
        g = self.g
        if self.per_channel:
            return x.view(n_kv, n // g, g, hd).transpose(2, 3)
        return x.reshape(n_kv, n // g, hd, g)  # token j // (hd / g), channels g (j % (hd / g)) ..

    def block_grid(self, t: torch.Tensor) -> torch.Tensor:
        """A per-channel table (n_kv, hd) laid out as blocks: (n_kv, 1, hd, 1) or (n_kv, 1, hd, g)."""
        if self.per_channel:
            return t[:, None, :, None]
        n_kv, hd = t.shape
        g = self.g
        return t.view(n_kv, 1, 1, hd // g, g).expand(n_kv, 1, g, hd // g, g).reshape(n_kv, 1, hd, g)

    def _store_groups(self, x: torch.Tensor):
        """Append groups x (n_kv, n, hd) (tokens n_q .. n_q + n - 1, n a multiple of g) to the pool; the caller
        counts them into n_q."""
        n_kv, n, hd = x.shape
        g = self.g
        x = x.float()
        if self.n_q == 0:  # the grids, from the first tokens compressed
            lo, R = x.amin(1), x.amax(1) - x.amin(1)
            R = torch.where(R > 0, R, R.mean(1, keepdim=True).clamp_min(1e-6))
            self.lo.copy_(lo)
            self.step.copy_(2 * self.eps * R)
        b = self.blocks(x)
        code = ((b - self.block_grid(self.lo)) / self.block_grid(self.step)).round().long()  # grid index
        base = code.amin(-1)
        d = code - base[..., None]
        top = d.amax(-1)
        width = torch.where(top > 0, torch.floor(torch.log2(top.double().clamp_min(1))).long() + 1, 0)
        W = int(width.max())
        far = max(int(base.max()), -int(base.min()))
        if not torch.isfinite(x).all() or W >= 2 ** META_W or far >= 2 ** (31 - META_W):
            raise ValueError(f"kvcomp: a key or value is not finite or lies beyond what a block's table can say "
                             f"({W}-bit width, {far} grid steps from its channel's minimum); raise the error bound")
        planes = plane_words(d, max(W, 1))                                  # (n_kv, ng, hd, W, g / 32)
        take = torch.arange(max(W, 1), device=x.device) < width[..., None]  # (n_kv, ng, hd, W)
        words = planes.transpose(0, 1)[take.transpose(0, 1)].reshape(-1)    # group-major, then head, block, plane
        sizes = (width.sum(-1) * (g // 32)).transpose(0, 1).reshape(-1)     # words per (group, head)
        starts = self.used + torch.cumsum(sizes, 0) - sizes
        need = self.used + words.numel()
        if need > self.pool.numel():
            if not self.grow:
                raise RuntimeError(f"kvcomp pool full: {need} words needed, {self.pool.numel()} allocated for the "
                                   f"kernel path; raise bits_cap or the error bound")
            self.pool = torch.cat([self.pool, torch.zeros(max(need, 2 * self.pool.numel()) - self.pool.numel(),
                                                          dtype=torch.int32, device=self.pool.device)])
        self.pool[self.used:need] = words
        a = self.n_q // g
        self.offset[:, a:a + n // g] = starts.view(n // g, n_kv).T.to(torch.int32)
        self.meta[:, a:a + n // g] = ((base << META_W) | width).to(torch.int32)
        self.used = need

    def decompress(self) -> torch.Tensor:
        """The compressed tokens in fp32, (n_kv, n_q, hd): read back from the pool alone."""
        n_kv, _, hd = self.res.shape
        g, ng = self.g, self.n_q // self.g
        meta = self.meta[:, :ng].long()
        width, base = meta & (2 ** META_W - 1), meta >> META_W                   # (n_kv, ng, hd)
        W = max(int(width.max()), 1) if ng else 1
        first = self.offset[:, :ng].long()[..., None] + (g // 32) * (torch.cumsum(width, -1) - width)
        p, j = torch.arange(W, device=meta.device), torch.arange(g // 32, device=meta.device)
        idx = first[..., None, None] + (g // 32) * p[:, None] + j                 # (n_kv, ng, hd, W, g / 32)
        live = (p[:, None] < width[..., None, None]).expand_as(idx)
        words = torch.where(live, self.pool[idx.clamp(max=max(self.used - 1, 0))].long(), 0)
        bits = (words[..., None] >> torch.arange(32, device=meta.device)) & 1      # (..., W, g / 32, 32)
        d = (bits.flatten(-2) << p[:, None]).sum(-2)                              # (n_kv, ng, hd, g)
        b = self.block_grid(self.lo) + (base[..., None] + d).float() * self.block_grid(self.step)
        if self.per_channel:
            return b.transpose(2, 3).reshape(n_kv, self.n_q, hd)
        return b.reshape(n_kv, self.n_q, hd)

    def dequantize(self) -> torch.Tensor:
        """All stored tokens in fp32, oldest first: (n_kv, length, hd) (QuantStore.dequantize's contract).
        The PyTorch path's reference: compressed groups never change, so what it decompressed once it keeps."""
        if getattr(self, "_seen", None) is None or self._seen.shape[1] != self.n_q:
            self._seen = self.decompress()
        return torch.cat([self._seen, self.res[:, self._slots(self.n_q, self.length)].float()], dim=1)


def quantizer(error_bound: float) -> str:
    """Register KVCompLayer at this error bound into kvcache.QUANTIZERS -> its name there ("kvcomp:0.05"), for
    CacheConfig(quantizer=...). The bound is a fraction of each channel's range, in (0, 0.5] (1/6 is kivi-2's
    step)."""
    if not isinstance(error_bound, (int, float)) or not 0 < error_bound <= 0.5:
        raise ConfigError("quantizer", f"the kvcomp quantizer needs an error bound in (0, 0.5] (a fraction of "
                                       f"each channel's range; 1/6 is kivi-2's step), got {error_bound!r}")
    name = f"kvcomp:{error_bound:.4g}"
    kvcache.QUANTIZERS[name] = type("KVCompLayer", (KVCompLayer,), {"error_bound": float(error_bound)})
    return name


class KVCompLayer(kvcache.QuantLayer):
    """A quant layer whose keys and values are KVCompStores, at the class's error bound (see quantizer())."""
    error_bound: float

    @classmethod
    def describe(cls, cfg: CacheConfig) -> str:
        return f"kvcomp, error bound {cls.error_bound:.4g} of each channel's range"

    def __init__(self, n_kv, hd, max_len, cfg: CacheConfig, device, dtype, n_heads=None, kernels=False):
        kw = dict(eps=self.error_bound, group=cfg.group, residual=cfg.residual, device=device,
                  dtype=dtype, bits_cap=8 if kernels else None)
        self.keys = KVCompStore(n_kv, hd, max_len, per_channel=True, **kw)
        self.values = KVCompStore(n_kv, hd, max_len, per_channel=False, **kw)
        self.h2d_bytes, self.steps = 0, 0
        self.split = self.ws = None
        if kernels:
            from research.kernels import kvcomp_plan
            self.split, self.ws = kvcomp_plan(self.keys, n_heads, device)

    def decode(self, q, k, v, pos):
        """Attend, then store: the groups that leave the ring with this token are compressed after its attention,
        as on the kernel path (whose step cannot size a compressed group; advance does it)."""
        assert pos == len(self.keys), "tokens arrive in order"
        K_ = torch.cat([self.keys.dequantize(), k[0].float()], 1)
        V_ = torch.cat([self.values.dequantize(), v[0].float()], 1)
        out = attention(q.float(), K_[None], V_[None]).to(q.dtype)
        self.load(k, v, pos)
        self.steps += 1
        return out

    def step(self, q, k, v, pos):
        from research.kernels import kvcomp_attend
        return kvcomp_attend(q[0, :, 0].contiguous(), k[0, :, 0], v[0, :, 0], self.keys, self.values, pos,
                             self.ws, self.split)[None, :, None]




def store_bits(x: torch.Tensor, per_channel: bool, eps: float, g: int = 64) -> tuple[float, float]:
    """(bits per value of a KVCompStore holding x (n_kv, T, hd), pool + tables, the ring left out; the largest
    error over its bound)."""
    n_kv, T, hd = x.shape
    T -= T % g
    s = KVCompStore(n_kv, hd, T, eps=eps, group=g, residual=g, per_channel=per_channel, device=x.device,
                    dtype=torch.float32)
    s.append(x[:, :T].float())  # a ring of g: every group compressed
    err = (s.decompress() - x[:, :T].float()).abs() / (s.step / 2)[:, None, :].clamp_min(1e-30)
    return 8 * sum(t.numel() * t.element_size() for t in s.tensors()[:5]) / (n_kv * T * hd), float(err.max())


def store_table(model, tok, name, args, publish) -> int:
    from accuracy import Prefilled, load_documents
    lines = [f"{name}, fp32 prefill of {args.context} tokens, every layer: bits per value a KVCompStore holds "
             f"(bit planes + each block's base and width + each group's offset + the channel grids; g = 64), and "
             f"the largest error over its bound; kivi-2 at g = 64 holds 2 + 0.5 (a bf16 scale and minimum per "
             f"64 values)", "", "| doc | eps | K bits | V bits | K and V | vs kivi-2 | worst error / bound |",
             "|---|---|---|---|---|---|---|"]
    for doc_name, doc in load_documents(tok, args.docs).items():
        pre = Prefilled(model, doc[:args.context])
        for eps in args.eps:
            ks = [store_bits(x[0], True, eps) for x in pre.keys]
            vs = [store_bits(x[0], False, eps) for x in pre.values]
            kb, vb = (sum(b for b, _ in r) / len(r) for r in (ks, vs))
            worst = max(e for _, e in ks + vs)
            lines.append(f"| {doc_name} | {eps:.4g} | {kb:.2f} | {vb:.2f} | {(kb + vb) / 2:.2f} | "
                         f"{(kb + vb) / 2 / 2.5:.2f}x | {worst:.3f} |")
            print(lines[-1], flush=True)
    publish(Path(args.out), "\n".join(lines))
    return 0


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
    p.add_argument("--store", action="store_true",
                   help="the second stage instead: what a KVCompStore holds per value on every layer, against kivi-2")
    args = p.parse_args(argv)
    from results import publish
    model_dir = resolve_model(args.model)
    model, tok = load_model(model_dir), Tokenizer(model_dir)
    layers = args.layers or list(range(0, model.args.n_layers, 4))
    name = display_name(model_dir.name)
    if args.store:
        return store_table(model, tok, name, args, publish)
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
