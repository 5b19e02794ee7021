"""Kernel variants for scoring the sketch, per query head and with the group's mean query, against the
kernels in kernels.py (bench/NOTES.md, v9): each checked against them on the same sketch, then timed.
At Llama-3.1-8B shapes and 128k tokens on a GPU; on a CPU (TRITON_INTERPRET=1) at small shapes, as a
check of the variants only.

    python research/sketch_variants.py

Variants: codes unpacked by loading each word once per code (`bcast`) or by reshaping (`reshape`);
per-head dot products on tensor cores (`dot`, fp16 / tf32 / fp32) or as multiply-adds (`fma`); codes
turned into floats through the mantissa (`magic`); the next group loaded ahead by hand (`prefetch`)
or by Triton's software pipelining (`pipe=S` stages)."""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import kernels as K  # noqa: E402
from quant import QuantStore  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))  # kernel_speed
from kernel_speed import bench  # noqa: E402


@triton.jit
def _codes_bcast(kc, h, kc_h, kc_t, kc_w, t, BITS: tl.constexpr, HD: tl.constexpr):
    W: tl.constexpr = 32 // BITS
    c = tl.arange(0, HD)
    words = tl.load(kc + h * kc_h + t[:, None] * kc_t + (c // W)[None, :] * kc_w)     # each word W times
    return (words >> ((c % W) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _codes_reshape(kc, h, kc_h, kc_t, kc_w, t, GROUP: tl.constexpr, BITS: tl.constexpr, HD: tl.constexpr):
    W: tl.constexpr = 32 // BITS
    words = tl.load(kc + h * kc_h + t[:, None] * kc_t + tl.arange(0, HD // W)[None, :] * kc_w)
    code = (words[:, :, None] >> (tl.arange(0, W) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(code, (GROUP, HD))


@triton.jit
def _unit(x, BITS: tl.constexpr):
    """x: int32 codes (< 2**BITS) -> float32 1 + code / 2**BITS, by placing them in the mantissa (no I2F)."""
    return ((x << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _unit16(x, BITS: tl.constexpr):
    return ((x << (10 - BITS)) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _raw_and_partials(score, t, hi, m, l, raw, raw_h, h, G, SINK: tl.constexpr, BG: tl.constexpr):
    """A group's (GROUP, BG) per-head scores, -inf outside the offloaded range, into raw; the heads' running
    max and sum of exponentials (m, l) updated with them."""
    g = tl.arange(0, BG)
    score = tl.where(((t >= SINK) & (t < hi))[:, None], score, float("-inf"))
    tl.store(raw + (h * G + g)[None, :] * raw_h + t[:, None], score, mask=(g < G)[None, :])
    m_new = tl.maximum(m, tl.max(score, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * tl.exp(m - m_safe) + tl.sum(tl.exp(score - m_safe[None, :]), 0)


@triton.jit
def _mean_setup(q, res, r_h, r_t, pos_ptr, h, b, G, SINK: tl.constexpr, RECENT: tl.constexpr, GROUP: tl.constexpr,
                NB: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    """The offloaded range's end, the quantized length, KV head h's mean query and the ring group's exact
    scores (zero outside the program that holds it)."""
    L = tl.load(pos_ptr) + 1
    n_q = (L // GROUP) * GROUP
    c = tl.arange(0, HD)
    g = tl.arange(0, BG)
    qm = tl.sum(tl.load(q + (h * G + g)[:, None] * HD + c[None, :], mask=(g < G)[:, None], other=0.0).to(tl.float32), 0) / G
    t_r = n_q + tl.arange(0, GROUP)
    mine = (n_q >= b * NB * GROUP) & (n_q < (b + 1) * NB * GROUP)
    kr = tl.load(res + h * r_h + (t_r % GROUP)[:, None] * r_t + c[None, :], mask=mine & (t_r < L)[:, None], other=0.0)
    return tl.maximum(SINK, L - RECENT), n_q, qm, tl.sum(kr.to(tl.float32) * qm[None, :], 1)


@triton.jit
def _mean_magic_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, scores, s_h,
                       pos_ptr, G, SINK: tl.constexpr, RECENT: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    """kernels._sketch_scores_kernel with the codes turned into floats through the mantissa."""
    h, b = tl.program_id(0), tl.program_id(1)
    hi, n_q, qm, ring = _mean_setup(q, res, r_h, r_t, pos_ptr, h, b, G, SINK, RECENT, GROUP, NB, BG, HD)
    W: tl.constexpr = 32 // BITS
    c = tl.arange(0, HD)
    i = tl.arange(0, GROUP)
    shifts = tl.arange(0, W) * BITS
    for gi in tl.static_range(NB):
        grp = b * NB + gi
        t = grp * GROUP + i
        words = tl.load(kc + h * kc_h + t[:, None] * kc_t + tl.arange(0, HD // W)[None, :] * kc_w)
        code = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
        f = _unit(tl.reshape(code, (GROUP, HD)), BITS)
        s = tl.load(ks + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        mn = tl.load(km + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        w = qm * s * (1 << BITS)
        score = tl.sum(f * w[None, :], 1) + (tl.sum(qm * mn, 0) - tl.sum(w, 0))
        score = tl.where(grp * GROUP == n_q, ring, score)
        tl.store(scores + h * s_h + t, tl.where((t >= SINK) & (t < hi), score, float("-inf")))


@triton.jit
def _heads_fma_magic_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, raw, raw_h, part_m,
                         part_l, pos_ptr, sm_scale, n_parts, G, SINK: tl.constexpr, RECENT: tl.constexpr,
                         BITS: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr,
                         HD: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    hi = tl.maximum(SINK, L - RECENT)
    n_q = (L // GROUP) * GROUP
    W: tl.constexpr = 32 // BITS
    w = tl.arange(0, HD // W)
    g = tl.arange(0, BG)
    i = tl.arange(0, GROUP)
    ring = tl.zeros((GROUP, BG), tl.float32)
    t_r = n_q + i
    if (n_q >= b * NB * GROUP) & (n_q < (b + 1) * NB * GROUP):
        acc = tl.zeros((GROUP, HD // W, BG), tl.float32)
        for j in tl.static_range(W):
            kr = tl.load(res + h * r_h + (t_r % GROUP)[:, None] * r_t + (w * W + j)[None, :],
                         mask=(t_r < L)[:, None], other=0.0).to(tl.float32)
            acc += kr[:, :, None] * K._head_queries(q, h, j, sm_scale, G, BG, W, HD)[None]
        ring = tl.sum(acc, 1)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    for gi in tl.static_range(NB):
        grp = b * NB + gi
        t = grp * GROUP + i
        words = tl.load(kc + h * kc_h + t[:, None] * kc_t + w[None, :] * kc_w)
        acc = tl.zeros((GROUP, HD // W, BG), tl.float32)
        bias = tl.zeros((BG,), tl.float32)
        for j in tl.static_range(W):
            s = tl.load(ks + h * ks_h + grp * ks_g + (w * W + j) * ks_c).to(tl.float32)
            mn = tl.load(km + h * ks_h + grp * ks_g + (w * W + j) * ks_c).to(tl.float32)
            qj = K._head_queries(q, h, j, sm_scale, G, BG, W, HD)
            wj = qj * (s * (1 << BITS))[:, None]
            f = _unit((words >> (j * BITS)) & ((1 << BITS) - 1), BITS)
            acc += f[:, :, None] * wj[None]
            bias += tl.sum(qj * mn[:, None] - wj, 0)
        score = tl.where(grp * GROUP == n_q, ring, tl.sum(acc, 1) + bias[None, :])
        m, l = _raw_and_partials(score, t, hi, m, l, raw, raw_h, h, G, SINK, BG)
    tl.store(part_m + (h * G + g) * n_parts + b, m, mask=g < G)
    tl.store(part_l + (h * G + g) * n_parts + b, l, mask=g < G)


@triton.jit
def _heads_setup(q, res, r_h, r_t, pos_ptr, sm_scale, h, b, G, SINK: tl.constexpr, RECENT: tl.constexpr,
                 GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    """The offloaded range's end, the quantized length, the (HD, BG) scaled queries of KV head h and, in the
    program that holds it, the ring group's exact scores."""
    L = tl.load(pos_ptr) + 1
    n_q = (L // GROUP) * GROUP
    c = tl.arange(0, HD)
    g = tl.arange(0, BG)
    t_r = n_q + tl.arange(0, GROUP)
    qh = tl.load(q + (h * G + g)[None, :] * HD + c[:, None], mask=(g < G)[None, :], other=0.0).to(tl.float32) * sm_scale
    ring = tl.zeros((GROUP, BG), tl.float32)
    if (n_q >= b * NB * GROUP) & (n_q < (b + 1) * NB * GROUP):
        kr = tl.load(res + h * r_h + (t_r % GROUP)[:, None] * r_t + c[None, :], mask=(t_r < L)[:, None], other=0.0)
        ring = tl.dot(kr.to(tl.float32), qh, input_precision="ieee")
    return tl.maximum(SINK, L - RECENT), n_q, qh, ring


@triton.jit
def _heads_dot_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, raw, raw_h, part_m,
                      part_l, pos_ptr, sm_scale, n_parts, G, SINK: tl.constexpr, RECENT: tl.constexpr,
                      BITS: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr,
                      HD: tl.constexpr, UNPACK: tl.constexpr, DOT: tl.constexpr):
    """kernels._sketch_heads_kernel with each group's (GROUP, HD) codes against the (HD, BG) scaled queries
    as one tl.dot; the minimum adds a constant per head and group."""
    h, b = tl.program_id(0), tl.program_id(1)
    hi, n_q, qh, ring = _heads_setup(q, res, r_h, r_t, pos_ptr, sm_scale, h, b, G, SINK, RECENT, GROUP, NB, BG, HD)
    c = tl.arange(0, HD)
    g = tl.arange(0, BG)
    i = tl.arange(0, GROUP)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    for gi in tl.static_range(NB):
        grp = b * NB + gi
        t = grp * GROUP + i
        if UNPACK == 0:
            code = _codes_bcast(kc, h, kc_h, kc_t, kc_w, t, BITS, HD)
        else:
            code = _codes_reshape(kc, h, kc_h, kc_t, kc_w, t, GROUP, BITS, HD)
        s = tl.load(ks + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        mn = tl.load(km + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        qs = qh * s[:, None]
        bias = tl.sum(qh * mn[:, None], 0)
        if DOT == 1:
            acc = tl.dot(code.to(tl.float16), qs.to(tl.float16))
        elif DOT == 2:
            acc = tl.dot(code.to(tl.float32), qs, input_precision="tf32")
        elif DOT == 3:  # codes as 1 + c / 2**BITS (through the mantissa), tf32 dot
            qs = qs * (1 << BITS)
            acc = tl.dot(_unit(code, BITS), qs, input_precision="tf32") - tl.sum(qs, 0)[None, :]
        elif DOT == 4:  # the same in fp16
            qs = qs * (1 << BITS)
            acc = tl.dot(_unit16(code, BITS), qs.to(tl.float16)) - tl.sum(qs, 0)[None, :]
        else:
            acc = tl.dot(code.to(tl.float32), qs, input_precision="ieee")
        score = tl.where(grp * GROUP == n_q, ring, acc + bias[None, :])
        m, l = _raw_and_partials(score, t, hi, m, l, raw, raw_h, h, G, SINK, BG)
    tl.store(part_m + (h * G + g) * n_parts + b, m, mask=g < G)
    tl.store(part_l + (h * G + g) * n_parts + b, l, mask=g < G)


@triton.jit
def _mean_bcast_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, scores, s_h,
                       pos_ptr, G, SINK: tl.constexpr, RECENT: tl.constexpr, BITS: tl.constexpr,
                       GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    hi, n_q, qm, ring = _mean_setup(q, res, r_h, r_t, pos_ptr, h, b, G, SINK, RECENT, GROUP, NB, BG, HD)
    c = tl.arange(0, HD)
    i = tl.arange(0, GROUP)
    for gi in tl.static_range(NB):
        grp = b * NB + gi
        t = grp * GROUP + i
        code = _codes_bcast(kc, h, kc_h, kc_t, kc_w, t, BITS, HD).to(tl.float32)
        s = tl.load(ks + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        mn = tl.load(km + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        score = tl.sum(code * (qm * s)[None, :], 1) + tl.sum(qm * mn, 0)
        score = tl.where(grp * GROUP == n_q, ring, score)
        tl.store(scores + h * s_h + t, tl.where((t >= SINK) & (t < hi), score, float("-inf")))


def heads_dot(q, sketch, pos, scores, sink, recent, heads, NB, num_warps, unpack, dot):
    n_kv, R, hd = sketch.res.shape
    width, block = scores.shape[1], NB * sketch.g
    G, n_parts = q.shape[0] // n_kv, width // block
    BG = max(16, triton.next_power_of_2(G))
    store = (q, sketch.codes, *sketch.codes.stride(), sketch.scale, sketch.mn, *sketch.scale.stride(),
             sketch.res, sketch.res.stride(0), sketch.res.stride(1))
    _heads_dot_kernel[(n_kv, n_parts)](*store, heads.raw, heads.raw.stride(0), heads.m, heads.l, pos, hd ** -0.5,
                                       n_parts, G, SINK=sink, RECENT=recent, BITS=sketch.bits, GROUP=sketch.g, NB=NB,
                                       BG=BG, HD=hd, UNPACK=unpack, DOT=dot, num_warps=num_warps)
    K._head_max_kernel[(n_kv, n_parts)](heads.raw, heads.raw.stride(0), heads.m, heads.l, n_parts, scores,
                                        scores.stride(0), G, BLOCK=block, BP=min(triton.next_power_of_2(n_parts), 256),
                                        BG=triton.next_power_of_2(G))
    return scores


def heads_fma_magic(q, sketch, pos, scores, sink, recent, heads, NB, num_warps):
    n_kv, R, hd = sketch.res.shape
    width, block = scores.shape[1], NB * sketch.g
    G, n_parts = q.shape[0] // n_kv, width // block
    store = (q, sketch.codes, *sketch.codes.stride(), sketch.scale, sketch.mn, *sketch.scale.stride(),
             sketch.res, sketch.res.stride(0), sketch.res.stride(1))
    _heads_fma_magic_kernel[(n_kv, n_parts)](*store, heads.raw, heads.raw.stride(0), heads.m, heads.l, pos, hd ** -0.5,
                                       n_parts, G, SINK=sink, RECENT=recent, BITS=sketch.bits, GROUP=sketch.g, NB=NB,
                                       BG=triton.next_power_of_2(G), HD=hd, num_warps=num_warps)
    K._head_max_kernel[(n_kv, n_parts)](heads.raw, heads.raw.stride(0), heads.m, heads.l, n_parts, scores,
                                        scores.stride(0), G, BLOCK=block, BP=min(triton.next_power_of_2(n_parts), 256),
                                        BG=triton.next_power_of_2(G))
    return scores


def mean_magic(q, sketch, pos, scores, sink, recent, NB, num_warps):
    n_kv, R, hd = sketch.res.shape
    G = q.shape[0] // n_kv
    store = (q, sketch.codes, *sketch.codes.stride(), sketch.scale, sketch.mn, *sketch.scale.stride(),
             sketch.res, sketch.res.stride(0), sketch.res.stride(1))
    _mean_magic_kernel[(n_kv, scores.shape[1] // (NB * sketch.g))](*store, scores, scores.stride(0), pos, G, SINK=sink,
                        RECENT=recent, BITS=sketch.bits, GROUP=sketch.g, NB=NB, BG=triton.next_power_of_2(G), HD=hd,
                        num_warps=num_warps)
    return scores


def mean_bcast(q, sketch, pos, scores, sink, recent, NB, num_warps):
    n_kv, R, hd = sketch.res.shape
    width = scores.shape[1]
    G = q.shape[0] // n_kv
    store = (q, sketch.codes, *sketch.codes.stride(), sketch.scale, sketch.mn, *sketch.scale.stride(),
             sketch.res, sketch.res.stride(0), sketch.res.stride(1))
    _mean_bcast_kernel[(n_kv, width // (NB * sketch.g))](*store, scores, scores.stride(0), pos, G, SINK=sink, RECENT=recent,
                                                       BITS=sketch.bits, GROUP=sketch.g, NB=NB,
                                                       BG=triton.next_power_of_2(G), HD=hd, num_warps=num_warps)
    return scores


@triton.jit
def _load_group(kc, h, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, grp, GROUP: tl.constexpr, BITS: tl.constexpr,
                HD: tl.constexpr):
    W: tl.constexpr = 32 // BITS
    c = tl.arange(0, HD)
    t = grp * GROUP + tl.arange(0, GROUP)
    words = tl.load(kc + h * kc_h + t[:, None] * kc_t + (c // W)[None, :] * kc_w)
    s = tl.load(ks + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
    mn = tl.load(km + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
    return words, s, mn


@triton.jit
def _mean_pipe_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, scores, s_h,
                      pos_ptr, G, SINK: tl.constexpr, RECENT: tl.constexpr, BITS: tl.constexpr,
                      GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr, PIPE: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    hi, n_q, qm, ring = _mean_setup(q, res, r_h, r_t, pos_ptr, h, b, G, SINK, RECENT, GROUP, NB, BG, HD)
    W: tl.constexpr = 32 // BITS
    c = tl.arange(0, HD)
    i = tl.arange(0, GROUP)
    if PIPE > 0:
        for gi in tl.range(0, NB, num_stages=PIPE):
            grp = b * NB + gi
            t = grp * GROUP + i
            words, s, mn = _load_group(kc, h, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, grp, GROUP, BITS, HD)
            code = ((words >> ((c % W) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
            score = tl.sum(code * (qm * s)[None, :], 1) + tl.sum(qm * mn, 0)
            score = tl.where(grp * GROUP == n_q, ring, score)
            tl.store(scores + h * s_h + t, tl.where((t >= SINK) & (t < hi), score, float("-inf")))
    else:  # manual prefetch: the next group's loads issue before this group's store
        words, s, mn = _load_group(kc, h, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, b * NB, GROUP, BITS, HD)
        for gi in tl.static_range(NB):
            grp = b * NB + gi
            t = grp * GROUP + i
            if gi + 1 < NB:
                nwords, ns, nmn = _load_group(kc, h, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, grp + 1, GROUP, BITS, HD)
            code = ((words >> ((c % W) * BITS)[None, :]) & ((1 << BITS) - 1)).to(tl.float32)
            score = tl.sum(code * (qm * s)[None, :], 1) + tl.sum(qm * mn, 0)
            score = tl.where(grp * GROUP == n_q, ring, score)
            tl.store(scores + h * s_h + t, tl.where((t >= SINK) & (t < hi), score, float("-inf")))
            if gi + 1 < NB:
                words, s, mn = nwords, ns, nmn


@triton.jit
def _heads_group(words, s, mn, qh, ring, grp, n_q, hi, m, l, raw, raw_h, h, G, SINK: tl.constexpr,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    W: tl.constexpr = 32 // BITS
    c = tl.arange(0, HD)
    t = grp * GROUP + tl.arange(0, GROUP)
    code = (words >> ((c % W) * BITS)[None, :]) & ((1 << BITS) - 1)
    qs = qh * s[:, None]
    acc = tl.dot(code.to(tl.float16), qs.to(tl.float16))
    score = tl.where(grp * GROUP == n_q, ring, acc + tl.sum(qh * mn[:, None], 0)[None, :])
    return _raw_and_partials(score, t, hi, m, l, raw, raw_h, h, G, SINK, BG)


@triton.jit
def _heads_pipe_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, raw, raw_h, part_m,
                       part_l, pos_ptr, sm_scale, n_parts, G, SINK: tl.constexpr, RECENT: tl.constexpr,
                       BITS: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr,
                       HD: tl.constexpr, PIPE: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    hi, n_q, qh, ring = _heads_setup(q, res, r_h, r_t, pos_ptr, sm_scale, h, b, G, SINK, RECENT, GROUP, NB, BG, HD)
    g = tl.arange(0, BG)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    if PIPE > 0:
        for gi in tl.range(0, NB, num_stages=PIPE):
            grp = b * NB + gi
            words, s, mn = _load_group(kc, h, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, grp, GROUP, BITS, HD)
            m, l = _heads_group(words, s, mn, qh, ring, grp, n_q, hi, m, l, raw, raw_h, h, G, SINK, BITS, GROUP, BG, HD)
    else:
        words, s, mn = _load_group(kc, h, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, b * NB, GROUP, BITS, HD)
        for gi in tl.static_range(NB):
            grp = b * NB + gi
            if gi + 1 < NB:
                nwords, ns, nmn = _load_group(kc, h, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, grp + 1, GROUP, BITS, HD)
            m, l = _heads_group(words, s, mn, qh, ring, grp, n_q, hi, m, l, raw, raw_h, h, G, SINK, BITS, GROUP, BG, HD)
            if gi + 1 < NB:
                words, s, mn = nwords, ns, nmn
    tl.store(part_m + (h * G + g) * n_parts + b, m, mask=g < G)
    tl.store(part_l + (h * G + g) * n_parts + b, l, mask=g < G)


def _store(q, sk):
    return (q, sk.codes, *sk.codes.stride(), sk.scale, sk.mn, *sk.scale.stride(), sk.res, sk.res.stride(0), sk.res.stride(1))


def mean_pipe(q, sk, pos, scores, NB, nw, pipe):
    n_kv, _, hd = sk.res.shape
    _mean_pipe_kernel[(n_kv, scores.shape[1] // (NB * sk.g))](*_store(q, sk), scores, scores.stride(0), pos,
        q.shape[0] // n_kv, SINK=8, RECENT=56, BITS=sk.bits, GROUP=sk.g, NB=NB,
        BG=triton.next_power_of_2(q.shape[0] // n_kv), HD=hd, PIPE=pipe, num_warps=nw)


def heads_pipe(q, sk, pos, scores, hs, NB, nw, pipe):
    n_kv, _, hd = sk.res.shape
    G, width, block = q.shape[0] // n_kv, scores.shape[1], NB * sk.g
    n_parts = width // block
    _heads_pipe_kernel[(n_kv, n_parts)](*_store(q, sk), hs.raw, hs.raw.stride(0), hs.m, hs.l, pos, hd ** -0.5, n_parts, G,
        SINK=8, RECENT=56, BITS=sk.bits, GROUP=sk.g, NB=NB, BG=max(16, triton.next_power_of_2(G)), HD=hd, PIPE=pipe,
        num_warps=nw)
    K._head_max_kernel[(n_kv, n_parts)](hs.raw, hs.raw.stride(0), hs.m, hs.l, n_parts, scores, scores.stride(0), G,
        BLOCK=block, BP=min(triton.next_power_of_2(n_parts), 256), BG=triton.next_power_of_2(G))



DOTS = {0: "fp32", 1: "fp16", 2: "tf32", 3: "tf32 magic", 4: "fp16 magic"}


def main():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    big = dev == "cuda"
    H, n_kv, hd = (32, 8, 128) if big else (6, 2, 64)
    L = 131072 if big else 2048
    dt = torch.bfloat16 if big else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(n_kv, L, hd, generator=gen).to(dev, dt)
    q = torch.randn(H, hd, generator=gen).to(dev, dt)
    sk = QuantStore(n_kv, hd, L, bits=2, group=64, residual=64, per_channel=True, device=dev, dtype=dt, kernels=True,
                    token_major=True)
    sk.append(k[:, :L - 37])   # the last group partly in the ring
    pos = torch.tensor(L - 38, device=dev)
    sdt = torch.float16 if big else torch.float32   # the score buffer's dtype for a bf16 model
    ref_m = torch.empty(n_kv, L, device=dev, dtype=sdt)
    h8 = K.HeadScratch(H, L, dev, sdt, block=8 * 64)
    ref_h = torch.empty_like(ref_m)
    K.sketch_scores(q, sk, pos, ref_m, 8, 56)
    K.sketch_scores(q, sk, pos, ref_h, 8, 56, h8)
    live = torch.isfinite(ref_h)
    rows = []

    def run(name, fn, ref):
        out = torch.empty_like(ref_m)
        fn(out)
        err = (out.float() - ref.float())[live].abs().max().item()
        same = len(set(out[0].float().topk(128).indices.tolist()) & set(ref[0].float().topk(128).indices.tolist()))
        rows.append((name, bench(lambda: fn(out), 30) if big else float("nan"), err, same))

    run("mean, v4 (kernels.sketch_scores)", lambda o: K.sketch_scores(q, sk, pos, o, 8, 56), ref_m)
    run("per head, v5 (kernels.sketch_scores)", lambda o: K.sketch_scores(q, sk, pos, o, 8, 56, h8), ref_h)
    cfgs = ((8, 8), (8, 4), (4, 4))
    for nb, nw in cfgs:
        run(f"mean bcast NB={nb} w={nw}", lambda o: mean_bcast(q, sk, pos, o, 8, 56, nb, nw), ref_m)
        run(f"mean magic NB={nb} w={nw}", lambda o: mean_magic(q, sk, pos, o, 8, 56, nb, nw), ref_m)
        hs = K.HeadScratch(H, L, dev, sdt, block=nb * 64)
        run(f"per head fma magic NB={nb} w={nw}", lambda o: heads_fma_magic(q, sk, pos, o, 8, 56, hs, nb, nw), ref_h)
        for unpack in (0, 1):
            for dot in ((1, 2, 0, 3, 4) if big else (0, 3, 4)):  # fp16 operands are exact only on a GPU
                run(f"per head dot {('bcast', 'reshape')[unpack]} {DOTS[dot]} NB={nb} w={nw}",
                    lambda o: heads_dot(q, sk, pos, o, 8, 56, hs, nb, nw, unpack, dot), ref_h)
    for pipe in (0, 2, 3):
        for nb, nw in ((8, 4), (16, 4)):
            name = "prefetch" if pipe == 0 else f"pipe={pipe}"
            run(f"mean {name} NB={nb} w={nw}", lambda o: mean_pipe(q, sk, pos, o, nb, nw, pipe), ref_m)
            hs = K.HeadScratch(H, L, dev, sdt, block=nb * 64)
            run(f"per head dot fp16 {name} NB={nb} w={nw}", lambda o: heads_pipe(q, sk, pos, o, hs, nb, nw, pipe), ref_h)
    print(f"{torch.cuda.get_device_name() if big else 'CPU (interpreter)'}, {n_kv} KV heads x {H // n_kv}, "
          f"head_dim {hd}, {L} tokens, 2-bit sketch\n")
    print("| variant | µs | max abs diff | top-128 shared (head 0) |\n|---|---|---|---|")
    for name, us, err, same in rows:
        print(f"| {name} | {us:.1f} | {err:.1e} | {same} |")


if __name__ == "__main__":
    main()
