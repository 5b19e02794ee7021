"""Kernels of the research selectors and compressors, each beside its PyTorch reference.

  shortlist_scores  q . K of the shortlist selector's candidates, their exact keys on the device
  kvcomp_attend     decode attention over a KVComp layer (research/kvcomp.py): the new token into the
                    rings, then q . K and p . V read from the bit planes, split as kernels.quant_attend
  int8_sketch_scores  kernels.sketch_scores with the query in int8 per group, four codes per dp4a
  retrieve          kernels.gather_rows across steps: a sparse layer's rows keep what was chosen again,
                    only the rest crosses PCIe (Slots)
  warm_topk         kernels.topk started from the last step's choice: one pass keeps the scores that reach
                    bounds read from the last choice's new scores, one program per head selects among those
"""
import torch
import triton
import triton.language as tl

from kernels import (INTERPRET, SKETCH_NB, HeadScratch, Workspace, _check, _check_heads, _check_q, _check_rows,
                     _combine, _copy_rows, _load_queries, _precision, _radix_key, _radix_prefix, _rank_heads,
                     _ring_update, _round_half_even, _sketch_args, _softmax_update, _store_partial, pow2, split_plan)


@triton.jit
def _shortlist_scores_kernel(q, k, k_h, k_m, vals, out, M, G, BM: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BG)
    c = tl.arange(0, HD)
    qm = tl.sum(tl.load(q + (h * G + g)[:, None] * HD + c[None, :], mask=(g < G)[:, None], other=0.0).to(tl.float32),
                0) / G                                                               # the group's mean query
    j = b * BM + tl.arange(0, BM)
    inside = j < M
    kr = tl.load(k + h * k_h + j[:, None] * k_m + c[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
    live = tl.load(vals + h * M + j, mask=inside, other=float("-inf")) > float("-inf")
    tl.store(out + h * M + j, tl.where(live, tl.sum(kr * qm[None, :], 1), float("-inf")), mask=inside)


def shortlist_scores(q, k, vals, out, BM: int = 64):
    """out[h, j] = k[h, j] . the mean query of KV head h's group, for the candidates whose vals[h, j] > -inf,
    -inf elsewhere: the shortlist selector ranking its candidates on their exact keys k (n_kv, M, hd) on the
    device. vals, out: (n_kv, M). Reference: kvcache.Selector.rank."""
    n_kv, M, hd = k.shape
    _check_q(q, n_kv, hd)
    _check(k.stride(-1) == 1 and pow2(hd), f"k: (n_kv, M, hd), rows contiguous, hd a power of two, got {hd}")
    _check(vals.shape == out.shape == (n_kv, M) and vals.is_contiguous() and out.is_contiguous(), "vals, out: (n_kv, M)")
    G = q.shape[0] // n_kv
    _shortlist_scores_kernel[(n_kv, triton.cdiv(M, BM))](q, k, k.stride(0), k.stride(1), vals, out, M, G, BM=BM,
                                                         BG=triton.next_power_of_2(G), HD=hd)
    return out


@triton.jit
def _planes(pool, first, width, G32: tl.constexpr, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """Codes of a (ROWS, 32 WORDS) tile from bit planes: (first, width) (ROWS, WORDS) give each word's place in
    plane 0 and its block's width; plane p is G32 words further. Word j of a row holds its codes 32 j ..
    32 j + 31, one bit each. Each word is loaded once and its 32 bits spread along the row."""
    d = tl.zeros((ROWS, WORDS, 32), tl.int32)
    b = tl.arange(0, 32)
    for p in range(0, tl.max(tl.max(width, 1), 0)):
        w = tl.load(pool + first + p * G32, mask=p < width, other=0)
        d = d | (((w[:, :, None] >> b[None, None, :]) & 1) << p)
    return tl.reshape(d, (ROWS, WORDS * 32))


@triton.jit
def _spread(x, GROUP: tl.constexpr, NCB: tl.constexpr, G32: tl.constexpr):
    """(GROUP * NCB,) per value block, in pool order -> (GROUP, NCB * G32) per (token, word of its row)."""
    return tl.reshape(tl.broadcast_to(tl.reshape(x, (GROUP, NCB, 1)), (GROUP, NCB, G32)), (GROUP, NCB * G32))


@triton.jit
def _kvcomp_split_kernel(q, pool_k, meta_k, off_k, lo_k, step_k, pool_v, meta_v, off_v, lo_v, step_v, m_h, o_h,
                         rk, rv, r_h, r_t, ws_m, ws_l, ws_acc, pos_ptr, sm_scale, G, n_splits,
                         GROUP: tl.constexpr, R: tl.constexpr, SPLIT: tl.constexpr, META_W: tl.constexpr,
                         BG: tl.constexpr, HD: tl.constexpr, PREC: tl.constexpr):
    h, split = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    n_q = tl.maximum(L - 1 - R + GROUP, 0) // GROUP * GROUP  # compressed before this step; [n_q, L) in the ring
    qb = _load_queries(q, h, G, BG, HD)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, HD), tl.float32)
    c = tl.arange(0, HD)
    i = tl.arange(0, GROUP)
    G32: tl.constexpr = GROUP // 32  # words of a block's plane
    NCB: tl.constexpr = HD // GROUP  # value blocks per token
    if split == n_splits - 1:  # the residual ring, full precision
        m, l, acc = _ring_update(qb, rk, rv, h, r_h, r_t, n_q, L, m, l, acc, sm_scale, R, GROUP, HD, PREC)
    else:
        end = tl.minimum(n_q, (split + 1) * SPLIT)
        t0 = split * SPLIT
        j = tl.arange(0, G32)
        jv = tl.arange(0, NCB * G32) % G32
        while t0 < end:  # one group per block; block r of a group's keys is channel r, of its values token r // NCB
            gk = t0 // GROUP
            mk = tl.load(meta_k + h * m_h + gk * HD + c)
            wk, bk = mk & ((1 << META_W) - 1), mk >> META_W
            fk = tl.load(off_k + h * o_h + gk) + G32 * (tl.cumsum(wk, 0) - wk)
            d = _planes(pool_k, fk[:, None] + j[None, :], wk[:, None] + 0 * j[None, :], G32, HD, G32)  # (HD, GROUP)
            step = tl.load(step_k + h * HD + c)
            kT = tl.load(lo_k + h * HD + c)[:, None] + (bk[:, None] + d).to(tl.float32) * step[:, None]
            mv = tl.load(meta_v + h * m_h + gk * HD + c)
            wv, bv = mv & ((1 << META_W) - 1), mv >> META_W
            fv = tl.load(off_v + h * o_h + gk) + G32 * (tl.cumsum(wv, 0) - wv)
            d = _planes(pool_v, _spread(fv, GROUP, NCB, G32) + jv[None, :], _spread(wv, GROUP, NCB, G32), G32, GROUP,
                        NCB * G32)                                                                       # (GROUP, HD)
            base = tl.reshape(tl.broadcast_to(tl.reshape(bv, (GROUP, NCB, 1)), (GROUP, NCB, GROUP)), (GROUP, HD))
            vb = tl.load(lo_v + h * HD + c)[None, :] + (base + d).to(tl.float32) * tl.load(step_v + h * HD + c)[None, :]
            m, l, acc = _softmax_update(qb, kT, vb, (t0 + i) < end, m, l, acc, sm_scale, PREC)
            t0 += GROUP
    _store_partial(ws_m, ws_l, ws_acc, h * G, split, n_splits, m, l, acc, G, BG, HD)


def kvcomp_plan(keys, n_heads: int, device) -> tuple[int, Workspace]:
    """(tokens per split, workspace) of kvcomp_attend for a store of this capacity."""
    n_kv, R, hd = keys.res.shape
    split, n = split_plan(keys.meta.shape[1] * keys.g, n_kv, keys.g)
    return split, Workspace(n_heads, n + 1, hd, device)  # + 1: the residual ring's split


def kvcomp_attend(q, k, v, keys, values, pos: torch.Tensor, ws: Workspace, split: int, num_warps: int = 4):
    """q (H, hd) of the token at device position pos, its k, v (n_kv, hd) written into the stores' rings, over a
    KVComp layer holding positions 0..pos (groups compressed up to quantized(pos), the host's advance
    after the step does the next). Reference: model.attention over keys.dequantize(), values.dequantize().
    num_warps: 4 measured best at 128k on an H200 (bench/kernel_speed.py --kvcomp times 8 and 16 beside it)."""
    n_kv, R, hd = keys.res.shape
    _check_q(q, n_kv, hd)
    _check(keys.per_channel and not values.per_channel and keys.g == values.g and keys.R == values.R
           and keys.meta.stride() == values.meta.stride() and hd % keys.g == 0 and pow2(keys.g),
           "kvcomp_attend takes per-channel keys and per-token values of one layout")
    G, n_splits = q.shape[0] // n_kv, ws.m.shape[1]
    _check((n_splits - 1) * split >= keys.meta.shape[1] * keys.g and split % keys.g == 0,
           f"{n_splits - 1} splits of {split} do not cover the store")
    slot = (pos % R).view(1)
    keys.res.index_copy_(1, slot, k[:, None].to(keys.res.dtype))
    values.res.index_copy_(1, slot, v[:, None].to(values.res.dtype))
    from research.kvcomp import META_W
    _kvcomp_split_kernel[(n_kv, n_splits)](
        q, keys.pool, keys.meta, keys.offset, keys.lo, keys.step, values.pool, values.meta, values.offset, values.lo,
        values.step, keys.meta.stride(0), keys.offset.stride(0), keys.res, values.res, keys.res.stride(0),
        keys.res.stride(1), ws.m, ws.l, ws.acc, pos, hd ** -0.5, G, n_splits, GROUP=keys.g, R=R, SPLIT=split,
        META_W=META_W, BG=max(16, triton.next_power_of_2(G)), HD=hd, PREC=_precision(q.dtype), num_warps=num_warps)
    return _combine(q, ws, n_splits)


# ---------------------------------------- selection: an int8 query and dp4a; rows kept across steps

@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + the dot product of a's four unsigned bytes with b's four signed bytes, elementwise: PTX dp4a (one
    instruction); the interpreter runs no inline assembly, so there the same sum is spelled out."""
    if ASM:
        c = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        for i in tl.static_range(4):
            c += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
    return c


@triton.jit
def _sketch_queries(q, h, chan, G, sm_scale, HEADS: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    """The queries of KV head h on channels chan (A, B): (BG, A, B), each query head's times sm_scale with
    HEADS, else (1, A, B), the group's mean."""
    g = tl.arange(0, BG)[:, None, None]
    x = tl.load(q + (h * G + g) * HD + chan[None], mask=(g < G) & (chan >= 0)[None], other=0.0).to(tl.float32)
    if HEADS:
        x = x * sm_scale
    else:
        x = tl.sum(x, 0, keep_dims=True) / G
    return x


@triton.jit
def _int8_sketch_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, out, o_h, part_m,
                        part_l, pos_ptr, sm_scale, n_parts, G, SINK: tl.constexpr, RECENT: tl.constexpr,
                        BITS: tl.constexpr, MASK: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr,
                        HEADS: tl.constexpr, BG: tl.constexpr, BQ: tl.constexpr, HD: tl.constexpr, ASM: tl.constexpr):
    """The sketch against KV head h's queries (BQ of them: each head's with HEADS, else the group's mean), NB
    groups of tokens per program. A word holds W codes, LSB first; shifted right by j * BITS and masked, its
    four bytes are codes j, j + E, j + 2E, j + 3E (E = 8 / BITS): four codes in two instructions, dotted
    with the matching channels of the query in one dp4a. The query is brought to int8 per group: its
    product with the group's scales (q_c * s_c), over the largest |q_c * s_c|; the minima add a constant
    per group (sum_c q_c * mn_c); within a group, equal dot products (small integers) are ordered newest
    first by a fraction of a step. Scores -inf outside the offloaded positions; with HEADS each head's
    scores go to rows h * G + g of out and per program each head's max and sum of exponentials to
    part_m/part_l (kernels._rank_heads finishes the ranking); else one row per KV head."""
    h, b = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    hi = tl.maximum(SINK, L - RECENT)  # offloaded positions: [SINK, hi)
    n_q = (L // GROUP) * GROUP       # the sketch's ring holds one group: [n_q, L) are exact
    W: tl.constexpr = 32 // BITS
    E: tl.constexpr = 8 // BITS
    w = tl.arange(0, HD // W)
    i = tl.arange(0, GROUP)
    c = w[:, None] * W + tl.arange(0, W)[None, :]         # (HD / W, W): every channel, word by word
    chan = w[:, None] * W + E * tl.arange(0, 4)[None, :]  # (HD / W, 4): the channels of extract j = 0
    shift = 8 * tl.arange(0, 4)[None, None, :]
    qn = _sketch_queries(q, h, c, G, sm_scale, HEADS, BG, HD)                           # (BQ, HD / W, W)
    ring = tl.zeros((GROUP, BQ), tl.float32)  # the group still in the ring: exact keys
    t_r = n_q + i
    if (n_q >= b * NB * GROUP) & (n_q < (b + 1) * NB * GROUP):
        CB: tl.constexpr = 16
        for c0 in tl.static_range(0, HD, CB):
            cc = c0 + tl.arange(0, CB)
            kr = tl.load(res + h * r_h + (t_r % GROUP)[:, None] * r_t + cc[None, :], mask=(t_r < L)[:, None],
                         other=0.0).to(tl.float32)
            qc = tl.reshape(_sketch_queries(q, h, cc[None, :], G, sm_scale, HEADS, BG, HD), (BQ, CB))
            ring += tl.sum(kr[:, None, :] * qc[None, :, :], 2)
    m = tl.full((BQ,), float("-inf"), tl.float32)
    l = tl.zeros((BQ,), tl.float32)
    for gi in tl.static_range(NB):
        grp = b * NB + gi
        t = grp * GROUP + i
        meta = h * ks_h + grp * ks_g
        words = tl.load(kc + h * kc_h + t[:, None] * kc_t + w[None, :] * kc_w)              # (GROUP, HD / W)
        qs = qn * tl.load(ks + meta + c * ks_c).to(tl.float32)[None]
        top = tl.max(tl.max(tl.abs(qs), 2), 1)                                              # (BQ,)
        inv, unit = 127 / tl.maximum(top, 1e-30), top / 127                                 # unit: the int8 step
        bias = tl.sum(tl.sum(qn * tl.load(km + meta + c * ks_c).to(tl.float32)[None], 2), 1)
        acc = tl.zeros((GROUP, BQ, HD // W), tl.int32)
        for j in tl.static_range(E):
            s = tl.load(ks + meta + (chan + j) * ks_c).to(tl.float32)                     # (HD / W, 4)
            qj = _sketch_queries(q, h, chan + j, G, sm_scale, HEADS, BG, HD)               # (BQ, HD / W, 4)
            qi = _round_half_even(qj * s[None] * inv[:, None, None]).to(tl.int32)
            packed = tl.sum((qi & 0xFF) << shift, 2)                                    # (BQ, HD / W) int8 x 4
            codes = (words >> (j * BITS)) & MASK                                         # (GROUP, HD / W) u8 x 4
            acc = _dp4a(tl.broadcast_to(codes[:, None, :], (GROUP, BQ, HD // W)),
                        tl.broadcast_to(packed[None, :, :], (GROUP, BQ, HD // W)), acc, ASM)
        tie = i[:, None] * (0.5 / GROUP)  # equal dot products: the newer token first (half an int8 step at most)
        score = (tl.sum(acc, 2).to(tl.float32) + tie) * unit[None, :] + bias[None, :]    # (GROUP, BQ)
        score = tl.where(grp * GROUP == n_q, ring, score)
        score = tl.where(((t >= SINK) & (t < hi))[:, None], score, float("-inf"))
        if HEADS:
            g = tl.arange(0, BQ)
            tl.store(out + (h * G + g)[None, :] * o_h + t[:, None], score, mask=(g < G)[None, :])
            m_new = tl.maximum(m, tl.max(score, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(score - m_safe[None, :]), 0)
            m = m_new
        else:
            tl.store(out + h * o_h + t, tl.sum(score, 1))
    if HEADS:
        g = tl.arange(0, BQ)
        tl.store(part_m + (h * G + g) * n_parts + b, m, mask=g < G)
        tl.store(part_l + (h * G + g) * n_parts + b, l, mask=g < G)


def int8_sketch_scores(q, sketch, pos, scores, sink: int, recent: int, heads: HeadScratch | None = None,
                       NB: int = SKETCH_NB, num_warps: int = 8):
    """kernels.sketch_scores with the query in int8 per group of the sketch and the codes dotted with it by
    dp4a, four at a time. Reference: selection.Int8SketchSelector.rank_int8 (PyTorch)."""
    n_kv, n_parts, store = _sketch_args(q, sketch, scores, NB)
    G, hd = q.shape[0] // n_kv, q.shape[1]
    BG = triton.next_power_of_2(G)
    mask = ((1 << sketch.bits) - 1) * 0x01010101  # a code in every byte of a word, as an int32
    shape = dict(SINK=sink, RECENT=recent, BITS=sketch.bits, MASK=mask - (mask >> 31 << 32), GROUP=sketch.g, NB=NB,
                 BG=BG, HD=hd, ASM=not INTERPRET, num_warps=num_warps)
    if heads is None:
        _int8_sketch_kernel[(n_kv, n_parts)](*store, scores, scores.stride(0), scores, scores, pos, 1.0, n_parts, G,
                                             HEADS=False, BQ=1, **shape)
        return scores
    _check_heads(heads, q, scores, n_parts, NB * sketch.g)
    _int8_sketch_kernel[(n_kv, n_parts)](*store, heads.raw, heads.raw.stride(0), heads.m, heads.l, pos, hd ** -0.5,
                                         n_parts, G, HEADS=True, BQ=BG, **shape)
    return _rank_heads(heads, scores, G, n_parts, NB * sketch.g)


class Slots:
    """Which offloaded position each of a sparse layer's k retrieved device rows holds (pos; -1: none) and
    its score (vals; -inf: none), kept across steps so that a row chosen again is not fetched again; and
    a step's plan: the positions to fetch (fetch), the rows they go to (dest), how many (count)."""

    def __init__(self, n_kv, k, device, dtype):
        self.pos = torch.full((n_kv, k), -1, dtype=torch.long, device=device)
        self.vals = torch.full((n_kv, k), float("-inf"), dtype=dtype, device=device)
        self.fetch, self.dest = torch.empty_like(self.pos), torch.empty_like(self.pos)
        self.count = torch.zeros(n_kv, dtype=torch.int32, device=device)

    def clear(self):
        """The device rows were written by someone else: nothing is known to be there."""
        self.pos.fill_(-1)
        self.vals.fill_(float("-inf"))


@triton.jit
def _slot_plan_kernel(idx, vals, pos, pvals, fetch, dest, count, K, BK: tl.constexpr, BC: tl.constexpr):
    """KV head h's new top-k (idx, vals; in any order) against the positions its rows hold (pos): a chosen
    position already held stays in its row; the others (misses) go, in rank order, to the rows whose
    position was not chosen again, in row order. Writes the new pos and pvals, and the misses as a
    fetch list (fetch, dest, count). Slots are compared BC at a time: first which chosen positions are held,
    then, slot block by slot block, which rows keep theirs and which miss each freed row receives."""
    h = tl.program_id(0)
    i = tl.arange(0, BK)
    val = tl.load(vals + h * K + i, mask=i < K, other=float("-inf"))
    new = tl.where(val > float("-inf"), tl.load(idx + h * K + i, mask=i < K, other=-1), -1)   # -1: nothing chosen
    hit = tl.zeros((BK,), tl.int32)
    for j0 in range(0, K, BC):
        j = j0 + tl.arange(0, BC)
        old = tl.load(pos + h * K + j, mask=j < K, other=-1)
        eq = (new[:, None] == old[None, :]) & (new >= 0)[:, None]
        hit = tl.maximum(hit, tl.max(eq.to(tl.int32), 1))
    miss = (new >= 0) & (hit == 0)
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1          # a miss's place in the fetch list
    to = tl.zeros((BK,), tl.int32)
    freed = tl.sum(tl.zeros((BC,), tl.int32), 0)          # freed rows in the blocks before this one
    for j0 in range(0, K, BC):
        j = j0 + tl.arange(0, BC)
        old = tl.load(pos + h * K + j, mask=j < K, other=-1)
        eq = (new[:, None] == old[None, :]) & (new >= 0)[:, None]
        kept = tl.max(eq.to(tl.int32), 0) > 0
        free = (j < K) & ~kept
        order = freed + tl.cumsum(free.to(tl.int32), 0) - 1
        gets = miss[:, None] & free[None, :] & (rank[:, None] == order[None, :])   # miss i -> row j
        to += tl.sum(tl.where(gets, j[None, :], 0), 1)
        into = tl.max(gets.to(tl.int32), 0) > 0
        p = tl.where(kept, old, tl.where(into, tl.sum(tl.where(gets, new[:, None], 0), 0), -1))
        v = tl.sum(tl.where(eq | gets, val[:, None].to(tl.float32), 0.0), 0)
        tl.store(pos + h * K + j, p, mask=j < K)
        tl.store(pvals + h * K + j, tl.where(kept | into, v, float("-inf")).to(pvals.dtype.element_ty), mask=j < K)
        freed += tl.sum(free.to(tl.int32), 0)
    tl.store(fetch + h * K + rank, new, mask=miss)
    tl.store(dest + h * K + rank, to.to(tl.int64), mask=miss)
    tl.store(count + h, tl.sum(miss.to(tl.int32), 0))


@triton.jit
def _fetch_kernel(fetch, dest, count, K, host_k, host_v, hs_t, hs_h, out_k, out_v, o_h, o_t, BJ: tl.constexpr,
                  HD: tl.constexpr):
    """The first count[h] positions of the fetch list into device rows dest[h, j]; nothing else is written."""
    h, b = tl.program_id(0), tl.program_id(1)
    j = b * BJ + tl.arange(0, BJ)
    live = j < tl.load(count + h)
    row = tl.load(fetch + h * K + j, mask=live, other=0)
    to = tl.load(dest + h * K + j, mask=live, other=0)
    _copy_rows(host_k, host_v, row, h, hs_t, hs_h, out_k, out_v, to, o_h, o_t, live, live, HD)


def retrieve(idx, vals, slots: Slots, host_k, host_v, out_k, out_v, BJ: int = 2, num_warps: int = 4):
    """The step's top-k (idx, vals: (n_kv, k), any order; vals -inf: nothing chosen) into the device rows
    out_k, out_v (n_kv, k, hd), fetching from the host store only the positions the rows do not hold
    already: the rows end up holding exactly the chosen positions (slots.pos, slots.vals say which row holds
    which), and a row that holds a position holds its exact K and V, as gather_rows would have fetched
    them. -> (slots.vals, slots.pos). Reference: the same rows, gathered whole (gather_rows)."""
    n_kv, k, hd = _check_rows(idx, vals, host_k, host_v, out_k, out_v)
    _check(idx.dtype == torch.long and idx.is_contiguous(), "idx: contiguous int64 (n_kv, k)")
    _check(slots.pos.shape == (n_kv, k) and slots.vals.dtype == vals.dtype, f"slots: Slots({n_kv}, {k}, {vals.dtype})")
    BK = max(16, triton.next_power_of_2(k))
    _slot_plan_kernel[(n_kv,)](idx, vals, slots.pos, slots.vals, slots.fetch, slots.dest, slots.count, k, BK=BK,
                               BC=max(1, min(BK, 4096 // BK)))
    _fetch_kernel[(n_kv, triton.cdiv(k, BJ))](slots.fetch, slots.dest, slots.count, k, host_k, host_v, host_k.stride(0),
                                             host_k.stride(1), out_k, out_v, out_k.stride(0), out_k.stride(1), BJ=BJ,
                                             HD=hd, num_warps=num_warps)
    return slots.vals, slots.pos


class Candidates:
    """warm_topk's working memory for rows of width W: the scores kept (vals, their positions idx: those that
    reach the guess from the front, those that reach only the floor from the back), how many of each per row
    (count (rows, 2); zero between calls), each row's floor and guess (bounds), and the select's histograms."""

    def __init__(self, rows, W, device, dtype):
        self.vals = torch.empty(rows, W, dtype=dtype, device=device)
        self.idx = torch.empty(rows, W, dtype=torch.int32, device=device)
        self.count = torch.zeros(rows, 2, dtype=torch.int32, device=device)
        self.bounds = torch.empty(rows, 2, dtype=torch.float32, device=device)
        self.hist = torch.empty(rows * 4 * 256, dtype=torch.int32, device=device)


@triton.jit
def _warm_bounds_kernel(x, x_h, last, K, guess_at, bounds, BK: tl.constexpr):
    """Row h's scores at the positions last chosen, ranked: the lowest (the floor) and the guess_at-th lowest
    (the guess) into bounds[h]. A -1 in last (none) counts as -inf."""
    h = tl.program_id(0)
    j = tl.arange(0, BK)
    p = tl.load(last + h * K + j, mask=j < K, other=0)
    ranked = tl.sort(tl.where(j < K, tl.load(x + h * x_h + p, mask=(j < K) & (p >= 0), other=float("-inf")),
                              float("inf")).to(tl.float32))
    tl.store(bounds + 2 * h, tl.min(ranked, 0))
    tl.store(bounds + 2 * h + 1, tl.sum(tl.where(j == guess_at, ranked, 0.0), 0))


@triton.jit
def _warm_keep_kernel(x, x_h, W, bounds, c_vals, c_idx, count, BLOCK: tl.constexpr):
    """Row h's scores at or above its guess, appended to the front of the row's candidates, and those between
    its floor and the guess to the back, in no particular order."""
    h, b = tl.program_id(0), tl.program_id(1)
    floor, guess = tl.load(bounds + 2 * h), tl.load(bounds + 2 * h + 1)
    i = b * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(x + h * x_h + i, mask=i < W, other=float("-inf"))
    front = (i < W) & (s.to(tl.float32) >= guess)
    back = (i < W) & (s.to(tl.float32) >= floor) & ~front
    at = tl.atomic_add(count + 2 * h, tl.sum(front.to(tl.int32), 0)) + tl.cumsum(front.to(tl.int32), 0) - 1
    tl.store(c_vals + h * W + at, s, mask=front)
    tl.store(c_idx + h * W + at, i, mask=front)
    at = W - tl.atomic_add(count + 2 * h + 1, tl.sum(back.to(tl.int32), 0)) - tl.cumsum(back.to(tl.int32), 0)
    tl.store(c_vals + h * W + at, s, mask=back)
    tl.store(c_idx + h * W + at, i, mask=back)


@triton.jit
def _warm_select_kernel(c_vals, c_idx, count, hist, W, K, vals, idx, LEVELS: tl.constexpr, BITS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """The K largest of row h's candidates into vals/idx (h, K), in no particular order: kernels.topk's radix
    select in one program (the histograms through memory, read back by _radix_prefix) over the front's
    candidates if they are K or more, else over both; then the counts to zero."""
    h = tl.program_id(0)
    front, back = tl.load(count + 2 * h), tl.load(count + 2 * h + 1)
    n = tl.where(front >= K, front, front + back)  # the guess held k or more: they hold the top k
    bins = tl.arange(0, 512)
    for level in tl.static_range(LEVELS):
        shift = BITS - 8 * (level + 1)
        prefix = tl.zeros((1,), tl.uint32)
        if level > 0:
            prefix, _ = _radix_prefix(hist, h, K, LEVELS, level)
        acc = tl.zeros((512,), tl.int32)
        for b in range(0, n, BLOCK):
            i = b + tl.arange(0, BLOCK)
            at = tl.where(i < front, i, W - 1 - (i - front))     # the front's candidates, then the back's
            key = _radix_key(tl.load(c_vals + h * W + at, mask=i < n, other=float("-inf")), BITS)
            match = i < n
            if level > 0:
                match = match & ((key >> (shift + 8)) == prefix)
            acc += tl.histogram(tl.where(match, ((key >> shift) & 255).to(tl.int32), 256), 512)
        tl.store(hist + (h * LEVELS + level) * 256 + bins, acc, mask=bins < 256)
        tl.debug_barrier()                                   # the histogram is read back by every thread
    kth, need = _radix_prefix(hist, h, K, LEVELS, LEVELS)
    kth, need = tl.sum(kth, 0), tl.sum(need, 0)
    above_n = tl.sum(tl.zeros((1,), tl.int32), 0)
    equal_n = tl.sum(tl.zeros((1,), tl.int32), 0)
    for b in range(0, n, BLOCK):
        i = b + tl.arange(0, BLOCK)
        at = tl.where(i < front, i, W - 1 - (i - front))
        s = tl.load(c_vals + h * W + at, mask=i < n, other=float("-inf"))
        at = tl.load(c_idx + h * W + at, mask=i < n, other=0).to(tl.int64)
        key = _radix_key(s, BITS)
        above, equal = (i < n) & (key > kth), (i < n) & (key == kth)
        slot = above_n + tl.cumsum(above.to(tl.int32), 0) - 1
        tl.store(vals + h * K + slot, s, mask=above)
        tl.store(idx + h * K + slot, at, mask=above)
        rank = equal_n + tl.cumsum(equal.to(tl.int32), 0) - 1
        keep = equal & (rank < need)
        tl.store(vals + h * K + K - need + rank, s, mask=keep)
        tl.store(idx + h * K + K - need + rank, at, mask=keep)
        above_n += tl.sum(above.to(tl.int32), 0)
        equal_n += tl.sum(equal.to(tl.int32), 0)
    tl.store(count + 2 * h + tl.arange(0, 2), tl.zeros((2,), tl.int32))


def warm_topk(x: torch.Tensor, k: int, last: torch.Tensor, work: Candidates, guess: float = 0.25, BLOCK: int = 4096,
              SELECT: int = 1024, num_warps: int = 8):
    """kernels.topk(x, k) started from the positions chosen last (last: (rows, k) int64, -1: none). The k
    new scores at the last choice are k scores at or above their lowest (the floor), so the k largest are all
    at or above it. One pass keeps the scores that reach the floor; but one position that fell far drags the
    floor down (keeping 7-14 k on a real model), so it keeps those that reach a guess apart: the `guess`
    quantile of the last choice's new scores. Where k or more reach the guess, the k largest are among them
    and one program per row selects from those alone; else from all it kept. Exact for any `last` of
    distinct positions: a poor one only keeps more (all, where last holds a -1). -> (values, indices), each
    (rows, k), in no particular order. Reference: torch.topk(sorted=False)."""
    rows, W = x.shape
    _check(x.dtype in (torch.float16, torch.float32) and x.is_contiguous(), "x: fp16 or fp32 rows, contiguous")
    _check(0 < k <= W and last.shape == (rows, k) and last.dtype == torch.long and last.is_contiguous(),
           f"k in 1..{W}; last: contiguous int64 ({rows}, {k})")
    _check(work.vals.shape == (rows, W) and work.vals.dtype == x.dtype, f"work: Candidates({rows}, {W}, {x.dtype})")
    _check(0 <= guess < 1, f"guess is a quantile in [0, 1), got {guess}")
    vals = torch.empty(rows, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(rows, k, dtype=torch.long, device=x.device)
    bits = 8 * x.element_size()
    _warm_bounds_kernel[(rows,)](x, W, last, k, int(guess * k), work.bounds, BK=max(16, triton.next_power_of_2(k)))
    _warm_keep_kernel[(rows, triton.cdiv(W, BLOCK))](x, W, W, work.bounds, work.vals, work.idx, work.count,
                                                      BLOCK=BLOCK)
    _warm_select_kernel[(rows,)](work.vals, work.idx, work.count, work.hist, W, k, vals, idx, LEVELS=bits // 8,
                                 BITS=bits, BLOCK=SELECT, num_warps=num_warps)
    return vals, idx
