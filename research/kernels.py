"""The kernel of research/kvcomp.py's compressor, beside its PyTorch reference.

  kvcomp_attend     decode attention over a KVComp layer (research/kvcomp.py): the new token into the
                    rings, then q . K and p . V read from the bit planes, split as kernels.quant_attend

Built on the public helpers of kernels.py (the online softmax, the split plan and its workspace).
"""
import torch
import triton
import triton.language as tl

from kernels import (Workspace, check, check_q, combine, load_queries, pow2, precision, ring_update, softmax_update,
                     split_plan, store_partial)


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
    qb = load_queries(q, h, G, BG, HD)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, HD), tl.float32)
    c = tl.arange(0, HD)
    i = tl.arange(0, GROUP)
    G32: tl.constexpr = GROUP // 32  # words of a block's plane
    NCB: tl.constexpr = HD // GROUP  # value blocks per token
    if split == n_splits - 1:  # the residual ring, full precision
        m, l, acc = ring_update(qb, rk, rv, h, r_h, r_t, n_q, L, m, l, acc, sm_scale, R, GROUP, HD, PREC)
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
            m, l, acc = softmax_update(qb, kT, vb, (t0 + i) < end, m, l, acc, sm_scale, PREC)
            t0 += GROUP
    store_partial(ws_m, ws_l, ws_acc, h * G, split, n_splits, m, l, acc, G, BG, HD)


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
    check_q(q, n_kv, hd)
    check(keys.per_channel and not values.per_channel and keys.g == values.g and keys.R == values.R
           and keys.meta.stride() == values.meta.stride() and hd % keys.g == 0 and pow2(keys.g),
           "kvcomp_attend takes per-channel keys and per-token values of one layout")
    G, n_splits = q.shape[0] // n_kv, ws.m.shape[1]
    check((n_splits - 1) * split >= keys.meta.shape[1] * keys.g and split % keys.g == 0,
           f"{n_splits - 1} splits of {split} do not cover the store")
    slot = (pos % R).view(1)
    keys.res.index_copy_(1, slot, k[:, None].to(keys.res.dtype))
    values.res.index_copy_(1, slot, v[:, None].to(values.res.dtype))
    from research.kvcomp import META_W
    _kvcomp_split_kernel[(n_kv, n_splits)](
        q, keys.pool, keys.meta, keys.offset, keys.lo, keys.step, values.pool, values.meta, values.offset, values.lo,
        values.step, keys.meta.stride(0), keys.offset.stride(0), keys.res, values.res, keys.res.stride(0),
        keys.res.stride(1), ws.m, ws.l, ws.acc, pos, hd ** -0.5, G, n_splits, GROUP=keys.g, R=R, SPLIT=split,
        META_W=META_W, BG=max(16, triton.next_power_of_2(G)), HD=hd, PREC=precision(q.dtype), num_warps=num_warps)
    return combine(q, ws, n_splits)
