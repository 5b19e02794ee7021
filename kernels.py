"""Triton kernels of the compressed decode step, each beside the PyTorch reference it is tested against.

  quantize      quantize + pack a KV store's groups: keys per channel, values per token, 1/2/4/8 bits,
                in bulk (a prompt) or as one decode step (write the new row into the residual ring,
                quantize the oldest group when the ring is full)
  quant_attend  decode attention over a quantized layer, reading packed codes only, split over the
                sequence (flash-decoding) and combined; the residual ring is the last split
  dense_attend  the same over full-precision K/V (the full cache)
  sparse_attend attention over a sparse layer's device tokens [sinks | retrieved | window], split over programs
  sketch_scores q . dequant(sketch) for every offloaded token (the GPU-resident selector), against
                the group's mean query or each query head (then the largest log-softmax)
  channel_scores q . K on C channels of every offloaded key, read from a channel-major copy in pinned host
                memory (channel_append writes each step's key into it)
  topk          the k largest scores of each row, started from the positions chosen the step before
                (what reaches their new scores, then a radix select); for a sparse layer, the same program
                then brings the chosen K and V rows into its device rows: only the positions its rows do
                not hold already, read straight from pinned host memory (zero-copy)
  sparse_append the new token's K/V into the host store, the window ring and the sinks

Lengths are read from a device tensor `pos` (the new token's position), never passed as Python
ints, so a whole decode step can be captured once in a CUDA graph and replayed. Every wrapper
checks its inputs. On CPU the kernels run under TRITON_INTERPRET=1 (exact, slow): the tests do.

Public helpers for other kernels (research/kernels.py builds on them): check, check_q, precision, pow2;
the split attention's softmax_update, load_queries, ring_update, store_partial, combine, split_plan and
Workspace. Names with an underscore are private to this file.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device) -> bool:
    """Whether the kernels can run for tensors on `device`."""
    return torch.device(device).type == "cuda" or INTERPRET


def pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check(cond, msg):
    if not cond:
        raise ValueError(msg)


def precision(dtype):  # fp32 dot products stay fp32 (no TF32) so the fp32 path matches its reference
    return "ieee" if dtype == torch.float32 else "tf32"


TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ------------------------------------------------------------------------------- quantize

@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & (r % 2 != 0), r - 1, r)


@triton.jit
def _quantize_kernel(src, s_h, s_t,                 # bulk: rows (n_kv, n, HD); step: the new rows (n_kv, HD)
                     ring, r_h, r_t,                # residual ring (n_kv, R, HD)
                     codes, c_h, c_a, c_b, scale, mn, q_h, q_a, q_b,
                     pos_ptr, first_group,
                     BITS: tl.constexpr, G: tl.constexpr, HD: tl.constexpr, R: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, TOKEN_MAJOR: tl.constexpr, STEP: tl.constexpr, STORE: tl.constexpr):
    h = tl.program_id(0)
    c = tl.arange(0, HD)
    t = tl.arange(0, G)
    W: tl.constexpr = 32 // BITS
    if STEP:  # write the new token into its ring slot; quantize the ring's oldest group when it is full
        pos = tl.load(pos_ptr)
        row = tl.load(src + h * s_h + c)
        tl.store(ring + h * r_h + (pos % R) * r_t + c, row)
        tl.debug_barrier()
        L = pos + 1
        due = (L >= R) & ((L - R) % G == 0)
        grp = (L - R) // G
        x_ptr = ring + h * r_h + ((grp * G) % R + t)[:, None] * r_t + c[None, :]
    else:
        due = True
        grp = first_group + tl.program_id(1)
        x_ptr = src + h * s_h + (tl.program_id(1) * G + t)[:, None] * s_t + c[None, :]
    if due:
        x = tl.load(x_ptr).to(tl.float32)                                        # (G tokens, HD)
        levels = (1 << BITS) - 1
        if PER_CHANNEL:  # a group: G tokens of one channel; codes packed along tokens
            lo, hi = tl.min(x, 0), tl.max(x, 0)                                  # (HD,)
            s = ((hi - lo) * (1.0 / levels)).to(STORE).to(tl.float32)
            m = lo.to(STORE).to(tl.float32)
            q = tl.math.div_rn(x - m[None, :], tl.where(s == 0, 1.0, s)[None, :])
            code = tl.minimum(tl.maximum(_round_half_even(q), 0), levels).to(tl.uint32)
            shifts = (tl.arange(0, W) * BITS).to(tl.uint32)
            if TOKEN_MAJOR:  # packed along the channels of each token
                words = tl.sum(tl.reshape(code, (G, HD // W, W)) << shifts[None, None, :], 2)  # (G, HD/W)
                tl.store(codes + h * c_h + (grp * G + t)[:, None] * c_a + tl.arange(0, HD // W)[None, :] * c_b,
                         words.to(tl.int32, bitcast=True))
            else:            # packed along the tokens of each channel
                words = tl.sum(tl.reshape(code, (G // W, W, HD)) << shifts[None, :, None], 1)  # (G/W, HD)
                i = tl.arange(0, G // W)
                tl.store(codes + h * c_h + c[None, :] * c_a + (grp * (G // W) + i)[:, None] * c_b,
                         words.to(tl.int32, bitcast=True))
            tl.store(scale + h * q_h + c * q_a + grp * q_b, s.to(STORE))
            tl.store(mn + h * q_h + c * q_a + grp * q_b, m.to(STORE))
        else:  # a group: G channels of one token; codes packed along channels
            NG: tl.constexpr = HD // G
            xg = tl.reshape(x, (G, NG, G))
            lo, hi = tl.min(xg, 2), tl.max(xg, 2)                                # (G tokens, NG)
            s = ((hi - lo) * (1.0 / levels)).to(STORE).to(tl.float32)
            m = lo.to(STORE).to(tl.float32)
            q = tl.math.div_rn(xg - m[:, :, None], tl.where(s == 0, 1.0, s)[:, :, None])
            code = tl.minimum(tl.maximum(_round_half_even(q), 0), levels).to(tl.uint32)
            shifts = (tl.arange(0, W) * BITS).to(tl.uint32)
            words = tl.sum(tl.reshape(code, (G, HD // W, W)) << shifts[None, None, :], 2)  # (G, HD/W)
            tok = grp * G + t
            tl.store(codes + h * c_h + tok[:, None] * c_a + tl.arange(0, HD // W)[None, :] * c_b,
                     words.to(tl.int32, bitcast=True))
            j = tl.arange(0, NG)
            tl.store(scale + h * q_h + tok[:, None] * q_a + j[None, :] * q_b, s.to(STORE))
            tl.store(mn + h * q_h + tok[:, None] * q_a + j[None, :] * q_b, m.to(STORE))


def _check_store(store):
    check(pow2(store.g) and pow2(store.res.shape[-1]),
           f"the kernels need a power-of-two --group and head_dim, got {store.g} and {store.res.shape[-1]}")


def quantize(store, x: torch.Tensor, first_group: int):
    """Bulk: quantize x (n_kv, n, hd), n a multiple of the group size, into `store` (a quant.QuantStore)
    as groups first_group, first_group + 1, ... Reference: QuantStore._quantize_into."""
    _check_store(store)
    n_kv, n, hd = x.shape
    check(n % store.g == 0 and x.stride(-1) == 1, "quantize takes whole groups of rows with contiguous channels")
    if n == 0:
        return
    _launch_quantize(store, x, (n_kv, n // store.g), first_group, pos=store.codes.new_zeros(()), step=False)


def quantize_step(store, x: torch.Tensor, pos: torch.Tensor):
    """Decode step: the new token's row x (n_kv, hd) at device position pos goes into the residual ring;
    when the ring is full its oldest group is quantized. Reference: QuantStore.append of one token."""
    _check_store(store)
    check(x.is_contiguous() and x.shape == (store.res.shape[0], store.res.shape[2]), "quantize_step takes (n_kv, hd)")
    _launch_quantize(store, x, (x.shape[0], 1), 0, pos=pos, step=True)


def _launch_quantize(store, x, grid, first_group, pos, step):
    res = store.res
    _quantize_kernel[grid](
        x, x.stride(0), x.stride(1) if x.dim() == 3 else 0, res, res.stride(0), res.stride(1),
        store.codes, *store.codes.stride(), store.scale, store.mn, *_scale_strides(store), pos, first_group,
        BITS=store.bits, G=store.g, HD=res.shape[2], R=store.R, PER_CHANNEL=store.per_channel,
        TOKEN_MAJOR=store.token_major, STEP=step, STORE=TL[res.dtype])


def _scale_strides(store):
    """(head, channel, group) strides of a per-channel store's scales, whichever way they are laid out."""
    s0, s1, s2 = store.scale.stride()
    return (s0, s2, s1) if store.token_major else (s0, s1, s2)


# ------------------------------------------------------------------------------- attention

@triton.jit
def softmax_update(q, kT, v, valid, m, l, acc, sm_scale, PREC: tl.constexpr):
    """One block of the online softmax: q (BG, HD), kT (HD, N), v (N, HD), valid (N,)."""
    s = tl.dot(q, kT.to(q.dtype), input_precision=PREC) * sm_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing valid yet changes nothing
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PREC)
    return m_new, l, acc


@triton.jit
def store_partial(ws_m, ws_l, ws_acc, h0, split, n_splits, m, l, acc, G, BG: tl.constexpr, HD: tl.constexpr):
    g = tl.arange(0, BG)
    rows = h0 + g
    tl.store(ws_m + rows * n_splits + split, m, mask=g < G)
    tl.store(ws_l + rows * n_splits + split, l, mask=g < G)
    tl.store(ws_acc + (rows * n_splits + split)[:, None] * HD + tl.arange(0, HD)[None, :], acc, mask=(g < G)[:, None])


@triton.jit
def load_queries(q, h, G, BG: tl.constexpr, HD: tl.constexpr):
    g = tl.arange(0, BG)
    return tl.load(q + (h * G + g)[:, None] * HD + tl.arange(0, HD)[None, :], mask=(g < G)[:, None], other=0.0)


@triton.jit
def ring_update(qb, rk, rv, h, r_h, r_t, n_q, L, m, l, acc, sm_scale, R: tl.constexpr, GROUP: tl.constexpr,
                 HD: tl.constexpr, PREC: tl.constexpr):
    """The online softmax over a quantized layer's residual ring: positions [n_q, L), position t in slot t % R."""
    c = tl.arange(0, HD)
    r0 = n_q
    while r0 < L:
        t = r0 + tl.arange(0, GROUP)
        valid = t < L
        slot = t % R
        kT = tl.load(rk + h * r_h + slot[None, :] * r_t + c[:, None], mask=valid[None, :], other=0.0)
        vb = tl.load(rv + h * r_h + slot[:, None] * r_t + c[None, :], mask=valid[:, None], other=0.0)
        m, l, acc = softmax_update(qb, kT, vb, valid, m, l, acc, sm_scale, PREC)
        r0 += GROUP
    return m, l, acc


@triton.jit
def _dense_split_kernel(q, k, v, k_h, k_t, ws_m, ws_l, ws_acc, pos_ptr, sm_scale, G, n_splits,
                        SPLIT: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr,
                        PREC: tl.constexpr):
    h, split = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    qb = load_queries(q, h, G, BG, HD)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, HD), tl.float32)
    c = tl.arange(0, HD)
    end = tl.minimum(L, (split + 1) * SPLIT)
    t0 = split * SPLIT
    while t0 < end:
        t = t0 + tl.arange(0, BN)
        valid = t < end
        kT = tl.load(k + h * k_h + t[None, :] * k_t + c[:, None], mask=valid[None, :], other=0.0)
        vb = tl.load(v + h * k_h + t[:, None] * k_t + c[None, :], mask=valid[:, None], other=0.0)
        m, l, acc = softmax_update(qb, kT, vb, valid, m, l, acc, sm_scale, PREC)
        t0 += BN
    store_partial(ws_m, ws_l, ws_acc, h * G, split, n_splits, m, l, acc, G, BG, HD)


@triton.jit
def _quant_split_kernel(q, kc, kc_h, kc_c, kc_t, ks, km, ks_h, ks_c, ks_t,      # keys: per channel
                        vc, vc_h, vc_t, vc_c, vs, vm, vs_h, vs_t, vs_c,          # values: per token
                        rk, rv, r_h, r_t,                                        # residual rings
                        ws_m, ws_l, ws_acc, pos_ptr, sm_scale, G, n_splits,
                        BITS: tl.constexpr, GROUP: tl.constexpr, R: tl.constexpr, SPLIT: tl.constexpr,
                        BG: tl.constexpr, HD: tl.constexpr, PREC: tl.constexpr):
    h, split = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    n_q = tl.maximum(L - R + GROUP, 0) // GROUP * GROUP  # quantized tokens (QuantStore.quantized); [n_q, L) in the ring
    qb = load_queries(q, h, G, BG, HD)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, HD), tl.float32)
    c = tl.arange(0, HD)
    i = tl.arange(0, GROUP)
    W: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if split == n_splits - 1:  # the residual ring, full precision
        m, l, acc = ring_update(qb, rk, rv, h, r_h, r_t, n_q, L, m, l, acc, sm_scale, R, GROUP, HD, PREC)
    else:
        end = tl.minimum(n_q, (split + 1) * SPLIT)
        t0 = split * SPLIT
        while t0 < end:  # one group of tokens per block: one key scale per channel
            t = t0 + i
            gk = t0 // GROUP
            words = tl.load(kc + h * kc_h + c[:, None] * kc_c + (t // W)[None, :] * kc_t)         # (HD, GROUP)
            code = (words >> ((t % W) * BITS)[None, :]) & MASK
            kT = code.to(tl.float32) * tl.load(ks + h * ks_h + c * ks_c + gk * ks_t).to(tl.float32)[:, None] \
                + tl.load(km + h * ks_h + c * ks_c + gk * ks_t).to(tl.float32)[:, None]
            words = tl.load(vc + h * vc_h + t[:, None] * vc_t + (c // W)[None, :] * vc_c)         # (GROUP, HD)
            code = (words >> ((c % W) * BITS)[None, :]) & MASK
            sidx = h * vs_h + t[:, None] * vs_t + (c // GROUP)[None, :] * vs_c
            vb = code.to(tl.float32) * tl.load(vs + sidx).to(tl.float32) + tl.load(vm + sidx).to(tl.float32)
            m, l, acc = softmax_update(qb, kT, vb, t < end, m, l, acc, sm_scale, PREC)
            t0 += GROUP
    store_partial(ws_m, ws_l, ws_acc, h * G, split, n_splits, m, l, acc, G, BG, HD)


@triton.jit
def _combine_kernel(out, ws_m, ws_l, ws_acc, n_splits, BS: tl.constexpr, HD: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, BS)
    m = tl.load(ws_m + row * n_splits + s, mask=s < n_splits, other=float("-inf"))
    l = tl.load(ws_l + row * n_splits + s, mask=s < n_splits, other=0.0)
    acc = tl.load(ws_acc + (row * n_splits + s)[:, None] * HD + tl.arange(0, HD)[None, :], mask=(s < n_splits)[:, None],
                  other=0.0)
    mx = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out + row * HD + tl.arange(0, HD), o.to(out.dtype.element_ty))


def split_plan(max_len: int, n_kv: int, block: int, target_programs: int = 264) -> tuple[int, int]:
    """(tokens per split, number of splits) so that n_kv x splits programs fill the GPU at max_len."""
    per = max(block, -(-max_len * n_kv // target_programs))
    per = -(-per // block) * block
    return per, max(1, -(-max_len // per))


class Workspace:
    """Partial results of the split attention: max, sum and accumulator per (query head, split)."""

    def __init__(self, n_heads, n_splits, hd, device):
        self.m = torch.empty(n_heads, n_splits, device=device)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(n_heads, n_splits, hd, device=device)


def check_q(q, n_kv, hd):
    check(q.dim() == 2 and q.is_contiguous() and q.shape[1] == hd and q.shape[0] % n_kv == 0,
           f"q must be contiguous (H, {hd}) with H a multiple of {n_kv} KV heads, got {tuple(q.shape)}")
    check(pow2(hd), f"the kernels need a power-of-two head_dim, got {hd}")


def combine(q, ws, n_splits):
    out = torch.empty_like(q)
    _combine_kernel[(q.shape[0],)](out, ws.m, ws.l, ws.acc, n_splits, BS=triton.next_power_of_2(n_splits),
                                   HD=q.shape[1])
    return out


def dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ws: Workspace, split: int):
    """q (H, hd) of the token at device position pos over k, v (n_kv, >= pos + 1, hd) rows 0..pos.
    Reference: model.attention over the first pos + 1 rows."""
    n_kv, S, hd = k.shape
    check_q(q, n_kv, hd)
    check(k.stride() == v.stride() and k.stride(-1) == 1, "k and v must share a layout with contiguous channels")
    G, n_splits = q.shape[0] // n_kv, ws.m.shape[1]
    check(n_splits * split >= S, f"{n_splits} splits of {split} do not cover {S} rows")
    _dense_split_kernel[(n_kv, n_splits)](q, k, v, k.stride(0), k.stride(1), ws.m, ws.l, ws.acc, pos, hd ** -0.5,
                                          G, n_splits, SPLIT=split, BN=64, BG=max(16, triton.next_power_of_2(G)),
                                          HD=hd, PREC=precision(q.dtype))
    return combine(q, ws, n_splits)


def quant_attend(q: torch.Tensor, keys, values, pos: torch.Tensor, ws: Workspace, split: int):
    """q (H, hd) over a quantized layer (quant.QuantStore keys per channel, values per token) holding
    positions 0..pos. Reference: model.attention over keys.dequantize(), values.dequantize()."""
    n_kv, R, hd = keys.res.shape
    check_q(q, n_kv, hd)
    _check_store(keys)
    check(keys.per_channel and not values.per_channel and keys.bits == values.bits and keys.g == values.g
           and keys.R == values.R, "quant_attend takes per-channel keys and per-token values of one layout")
    check(split % keys.g == 0, "splits must hold whole groups")
    G, n_splits = q.shape[0] // n_kv, ws.m.shape[1]
    cap = keys.codes.shape[2] * (32 // keys.bits)
    check((n_splits - 1) * split >= cap, f"{n_splits - 1} splits of {split} (and one for the residual) do not cover "
                                          f"{cap} tokens")
    _quant_split_kernel[(n_kv, n_splits)](
        q, keys.codes, *keys.codes.stride(), keys.scale, keys.mn, *keys.scale.stride(),
        values.codes, *values.codes.stride(), values.scale, values.mn, *values.scale.stride(),
        keys.res, values.res, keys.res.stride(0), keys.res.stride(1), ws.m, ws.l, ws.acc, pos, hd ** -0.5, G, n_splits,
        BITS=keys.bits, GROUP=keys.g, R=keys.R, SPLIT=split, BG=max(16, triton.next_power_of_2(G)), HD=hd,
        PREC=precision(q.dtype))
    return combine(q, ws, n_splits)


# ------------------------------------------------------------------------------- sparse layers

@triton.jit
def _sparse_attend_kernel(q, k, v, k_h, k_t, vals, vals_h, pos_ptr, ws_m, ws_l, ws_acc, sm_scale, G, TOPK, n_splits,
                          SINK: tl.constexpr, RECENT: tl.constexpr, SPLIT: tl.constexpr,
                          BN: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr, PREC: tl.constexpr):
    """Rows [split * SPLIT, (split + 1) * SPLIT) of KV head h's device rows: [0, SINK) sinks, [SINK, SINK + TOPK)
    retrieved (valid where their score > -inf), [SINK + TOPK, SINK + TOPK + RECENT) the window ring: slot w
    holds the newest position = w mod RECENT. TOPK is a plain argument: layers with different budgets share
    one compiled kernel."""
    h, split = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    qb = load_queries(q, h, G, BG, HD)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, HD), tl.float32)
    c = tl.arange(0, HD)
    S = SINK + TOPK + RECENT
    for t0 in range(split * SPLIT, tl.minimum(S, (split + 1) * SPLIT), BN):
        t = t0 + tl.arange(0, BN)
        w = t - SINK - TOPK
        newest = L - 1 - ((L - 1 - w) % RECENT + RECENT) % RECENT
        score = tl.load(vals + h * vals_h + (t - SINK), mask=(t >= SINK) & (t < SINK + TOPK), other=float("-inf"))
        valid = tl.where(t < SINK, t < L, tl.where(t < SINK + TOPK, score > float("-inf"), (t < S) & (newest >= SINK)))
        kT = tl.load(k + h * k_h + t[None, :] * k_t + c[:, None], mask=valid[None, :], other=0.0)
        vb = tl.load(v + h * k_h + t[:, None] * k_t + c[None, :], mask=valid[:, None], other=0.0)
        m, l, acc = softmax_update(qb, kT, vb, valid, m, l, acc, sm_scale, PREC)
    store_partial(ws_m, ws_l, ws_acc, h * G, split, n_splits, m, l, acc, G, BG, HD)


def sparse_attend(q, k, v, vals, pos, sink: int, topk: int, recent: int, split: int = 64):
    """q (H, hd) over a sparse layer's device rows k, v (n_kv, sink + topk + recent, hd); vals (n_kv, topk) the
    retrieved rows' scores (-inf: nothing retrieved there). The rows are split `split` at a time over programs
    (a handful of rows per KV head: one program each would read them one block after another), then combined.
    Reference: kvcache.SparseLayer.decode's attention."""
    n_kv, S, hd = k.shape
    check_q(q, n_kv, hd)
    check(S == sink + topk + recent and k.stride() == v.stride() and k.stride(-1) == 1, "k, v: (n_kv, budget, hd)")
    check(split % 64 == 0, f"split: a multiple of 64 rows, got {split}")
    G, n_splits = q.shape[0] // n_kv, triton.cdiv(S, split)
    ws = Workspace(q.shape[0], n_splits, hd, q.device)
    vals = vals if topk else q  # a window layer retrieves nothing; the pointer is never read
    _sparse_attend_kernel[(n_kv, n_splits)](q, k, v, k.stride(0), k.stride(1), vals, vals.stride(0), pos, ws.m, ws.l,
                                            ws.acc, hd ** -0.5, G, topk, n_splits, SINK=sink, RECENT=recent,
                                            SPLIT=split, BN=64, BG=max(16, triton.next_power_of_2(G)), HD=hd,
                                            PREC=precision(q.dtype))
    return combine(q, ws, n_splits)


@triton.jit
def _sketch_queries(q, h, c, sm_scale, G: tl.constexpr, HEADS: tl.constexpr, BQ: tl.constexpr, HD: tl.constexpr):
    """KV head h's queries on channels c (1, 1, 1, N): (BQ, 1, 1, N), each query head's times sm_scale with HEADS
    (rows past G zero), else (1, 1, 1, N), the group's mean."""
    if HEADS:
        e = tl.arange(0, BQ)[:, None, None, None]
        x = tl.load(q + (h * G + e) * HD + c, mask=e < G, other=0.0).to(tl.float32) * sm_scale
    else:
        x = tl.load(q + h * G * HD + c).to(tl.float32)
        for g in tl.static_range(1, G):
            x += tl.load(q + (h * G + g) * HD + c).to(tl.float32)
        x = x / G
    return x


@triton.jit
def _sketch_kernel(q, kc, kc_h, kc_t, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, out, o_h, part_m, part_l, pos_ptr,
                   sm_scale, n_parts, SINK: tl.constexpr, RECENT: tl.constexpr, BITS: tl.constexpr,
                   GROUP: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, HEADS: tl.constexpr, BQ: tl.constexpr,
                   HD: tl.constexpr):
    """NB groups of GROUP tokens of KV head h against its BQ queries (each query head's with HEADS, else the
    group's mean). Every thread keeps its tokens' partial dot products in registers, in the layout the packed
    words arrive in, (query, token, group, word): code j of each word (channels w * W + j) is masked in place
    inside the mantissa of 2^23 (no shift, no int-to-float conversion: the float minus 2^23 is the code times
    2^(j * BITS) exactly) and multiplied into the accumulator with that channel's query times its group's
    scale, scaled back by 2^-(j * BITS); codes in a word's high half go through one shift of the word by 16.
    One sum over each token's words at the end: no reduction per code. Scores -inf outside the offloaded
    positions; with HEADS each head's scores go to rows h * G + e of out and per program each head's max and
    sum of exponentials to part_m/part_l (_head_max_kernel finishes the ranking); else one row per KV head."""
    h, b = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    hi = tl.maximum(SINK, L - RECENT)  # offloaded positions: [SINK, hi)
    n_q = (L // GROUP) * GROUP       # the sketch's ring holds one group: [n_q, L) are exact
    W: tl.constexpr = 32 // BITS     # codes per word
    HALF: tl.constexpr = (W + 1) // 2  # codes per 16-bit half (8-bit codes: 2)
    NW: tl.constexpr = HD // W
    MASK: tl.constexpr = (1 << BITS) - 1
    i = tl.arange(0, GROUP)[None, :, None, None]
    grp = b * NB + tl.arange(0, NB)[None, None, :, None]
    w = tl.arange(0, NW)[None, None, None, :]
    t = grp * GROUP + i                                                    # (1, GROUP, NB, 1)
    words = tl.load(kc + h * kc_h + t * kc_t + w)                          # (1, GROUP, NB, NW)
    acc = tl.zeros((BQ, GROUP, NB, NW), tl.float32)
    bias = tl.zeros((BQ, 1, NB, NW), tl.float32)
    for j in tl.static_range(W):
        c = w * W + j
        qj = _sketch_queries(q, h, c, sm_scale, G, HEADS, BQ, HD)
        meta = h * ks_h + grp * ks_g + c * ks_c
        s = tl.load(ks + meta).to(tl.float32)                              # (1, 1, NB, NW)
        if j == HALF:
            words = words >> 16                                            # the high half's codes
        sh = (j % HALF) * BITS
        x = ((words & (MASK << sh)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        acc += x * (qj * s * (1.0 / (1 << sh)))
        bias += qj * tl.load(km + meta).to(tl.float32)
    score = tl.sum(acc, 3) + tl.sum(bias, 3)                               # (BQ, GROUP, NB)
    t3 = (b * NB + tl.arange(0, NB))[None, None, :] * GROUP + tl.arange(0, GROUP)[None, :, None]
    if (n_q >= b * NB * GROUP) & (n_q < (b + 1) * NB * GROUP):  # the group still in the ring: exact keys
        ring = tl.zeros((BQ, GROUP, NB, NW), tl.float32)
        for jr in range(W):  # a loop, not unrolled: it runs in one program, and unrolled it costs every one registers
            c = w * W + jr
            kr = tl.load(res + h * r_h + (t % GROUP) * r_t + c, mask=(t >= n_q) & (t < L), other=0.0)
            ring += kr.to(tl.float32) * _sketch_queries(q, h, c, sm_scale, G, HEADS, BQ, HD)
        score = tl.where(t3 >= n_q, tl.sum(ring, 3), score)
    score = tl.where((t3 >= SINK) & (t3 < hi), score, float("-inf"))
    if HEADS:
        e = tl.arange(0, BQ)[:, None, None]
        tl.store(out + (h * G + e) * o_h + t3, score, mask=e < G)
        m = tl.max(tl.max(score, 2), 1)                                    # (BQ,)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(tl.sum(tl.exp(score - m_safe[:, None, None]), 2), 1)
        e = tl.arange(0, BQ)
        tl.store(part_m + (h * G + e) * n_parts + b, m, mask=e < G)
        tl.store(part_l + (h * G + e) * n_parts + b, l, mask=e < G)
    else:
        tl.store(out + h * o_h + t3, score)


@triton.jit
def _head_max_kernel(raw, r_h, part_m, part_l, n_parts, out, o_h, G: tl.constexpr, BLOCK: tl.constexpr,
                     BP: tl.constexpr, BG: tl.constexpr):
    """out[h, t] = max over the G heads of KV head h of (raw[h * G + g, t] - logsumexp_t raw[h * G + g]), the
    log-sum-exp of each head put together from the per-program partials of _sketch_kernel."""
    h, b = tl.program_id(0), tl.program_id(1)
    g = tl.arange(0, BG)
    rows = h * G + g
    M = tl.full((BG,), float("-inf"), tl.float32)
    S = tl.zeros((BG,), tl.float32)
    for j0 in range(0, n_parts, BP):
        j = j0 + tl.arange(0, BP)
        ok = (g < G)[:, None] & (j < n_parts)[None, :]
        pm = tl.load(part_m + rows[:, None] * n_parts + j[None, :], mask=ok, other=float("-inf"))
        pl = tl.load(part_l + rows[:, None] * n_parts + j[None, :], mask=ok, other=0.0)
        M_new = tl.maximum(M, tl.max(pm, 1))
        M_safe = tl.where(M_new == float("-inf"), 0.0, M_new)
        S = S * tl.exp(M - M_safe) + tl.sum(pl * tl.exp(pm - M_safe[:, None]), 1)
        M = M_new
    lse = tl.where(S > 0, M + tl.log(tl.where(S > 0, S, 1.0)), 0.0)  # a head with no offloaded token: nothing to rank
    t = b * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(raw + rows[:, None] * r_h + t[None, :], mask=(g < G)[:, None], other=float("-inf")).to(tl.float32)
    s = tl.where(s == float("-inf"), float("-inf"), s - lse[:, None])  # outside the offloaded range: -inf
    tl.store(out + h * o_h + t, tl.max(s, 0))


SKETCH_NB = 8  # the most groups of sketch tokens a program scores: score buffers are a multiple of SKETCH_NB groups
# how sketch_scores launches, by ranking (the group's mean / each query head): groups per program and warps,
# the fastest measured on an H100 at 128k (bench/results/sketch_layouts_h100.md; kernel_speed.py times others)
LAUNCH = {"mean": (2, 2), "heads": (1, 2)}


class HeadScratch:
    """What per-head sketch scoring keeps between its two kernels: each query head's raw scores (H, width)
    and per-program softmax partials (H, programs). One is shared by all layers (they score one at a time)."""

    def __init__(self, n_heads, width, device, dtype, block):  # block: the tokens a program of the sketch scores
        self.raw = torch.empty(n_heads, width, device=device, dtype=dtype)
        self.m = torch.empty(n_heads, width // block, device=device)
        self.l = torch.empty_like(self.m)


def sketch_scores(q, sketch, pos, scores, sink: int, recent: int, heads: HeadScratch | None = None,
                  NB: int | None = None, num_warps: int | None = None):
    """Scores (n_kv, width) of every offloaded position [sink, pos + 1 - recent), -inf elsewhere, from a
    token-major, per-channel quant.QuantStore sketch whose residual is one group. heads=None: against the
    group's mean query; else each query head's log-softmax over the offloaded positions, the largest of
    the group's heads. NB (groups per program) and num_warps: LAUNCH's unless given. Reference:
    kvcache.Selector.rank over the dequantized sketch."""
    nb, nw = LAUNCH["mean" if heads is None else "heads"]
    NB, num_warps = NB or nb, num_warps or nw
    n_kv, R, hd = sketch.res.shape
    check_q(q, n_kv, hd)
    _check_store(sketch)
    check(sketch.per_channel and sketch.token_major and sketch.R == sketch.g and sketch.codes.stride(-1) == 1,
           "the sketch is per channel, token-major, with a one-group residual")
    width, block = scores.shape[1], NB * sketch.g
    check(scores.shape[0] == n_kv and width % block == 0 and sketch.codes.shape[1] >= width,
           f"scores: (n_kv, a multiple of {block}) within the sketch's capacity")
    G, n_parts = q.shape[0] // n_kv, width // block
    args = (q, sketch.codes, sketch.codes.stride(0), sketch.codes.stride(1), sketch.scale, sketch.mn,
            *sketch.scale.stride(), sketch.res, sketch.res.stride(0), sketch.res.stride(1))
    shape = dict(SINK=sink, RECENT=recent, BITS=sketch.bits, GROUP=sketch.g, NB=NB, G=G, HD=hd, num_warps=num_warps)
    if heads is None:
        _sketch_kernel[(n_kv, n_parts)](*args, scores, scores.stride(0), scores, scores, pos, 1.0, n_parts,
                                        HEADS=False, BQ=1, **shape)
        return scores
    check(heads.raw.shape == (q.shape[0], width) and heads.m.shape == (q.shape[0], n_parts),
           f"heads: a HeadScratch({q.shape[0]}, {width}, block={block})")
    _sketch_kernel[(n_kv, n_parts)](*args, heads.raw, heads.raw.stride(0), heads.m, heads.l, pos, hd ** -0.5,
                                    n_parts, HEADS=True, BQ=triton.next_power_of_2(G), **shape)
    BLOCK = min(2048, width & -width)  # a power of two that divides the width
    _head_max_kernel[(n_kv, width // BLOCK)](heads.raw, heads.raw.stride(0), heads.m, heads.l, n_parts, scores,
                                             scores.stride(0), G, BLOCK=BLOCK,
                                             BP=min(triton.next_power_of_2(n_parts), 256),
                                             BG=triton.next_power_of_2(G))
    return scores

@triton.jit
def _channel_scores_kernel(q, ch, host, hs_h, hs_c, scores, s_h, width, pos_ptr, G, C,
                           SINK: tl.constexpr, RECENT: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                           BG: tl.constexpr, HD: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    hi = tl.maximum(SINK, L - RECENT)
    j = tl.arange(0, BC)
    chan = tl.load(ch + h * C + j, mask=j < C, other=0)
    g = tl.arange(0, BG)
    qm = tl.sum(tl.load(q + (h * G + g)[:, None] * HD + chan[None, :], mask=(g < G)[:, None] & (j < C)[None, :],
                        other=0.0).to(tl.float32), 0) / G                             # (BC,) on the chosen channels
    t = b * BN + tl.arange(0, BN)
    live = (t >= SINK) & (t < hi)
    kc = tl.load(host + h * hs_h + chan[:, None] * hs_c + t[None, :], mask=(j < C)[:, None] & live[None, :],
                 other=0.0)                                                          # (BC, BN): C contiguous rows
    score = tl.sum(kc.to(tl.float32) * qm[:, None], 0)
    tl.store(scores + h * s_h + t, tl.where(live, score, float("-inf")), mask=t < width)


def channel_scores(q, channels, host_kc, pos, scores, sink: int, recent: int, BN: int = 1024):
    """The paper's selector: scores (n_kv, >= cap) of offloaded positions on C channels (n_kv, C) of each head,
    reading those channels of every offloaded key from the channel-major host copy host_kc (n_kv, hd, cap) —
    pinned memory on CUDA, read over PCIe, one contiguous row per channel. Reference:
    kvcache.ChannelSelector.scores."""
    n_kv, hd, cap = host_kc.shape
    check_q(q, n_kv, hd)
    check(host_kc.stride(-1) == 1, "host_kc: (n_kv, hd, cap), each channel's row contiguous")
    check(channels.shape[0] == n_kv and channels.is_contiguous(), "channels: (n_kv, C)")
    check(scores.shape[0] == n_kv and scores.shape[1] >= cap, "scores: (n_kv, >= cap)")
    G, C = q.shape[0] // n_kv, channels.shape[1]
    _channel_scores_kernel[(n_kv, triton.cdiv(scores.shape[1], BN))](
        q, channels, host_kc, host_kc.stride(0), host_kc.stride(1), scores, scores.stride(0), scores.shape[1], pos, G,
        C, SINK=sink, RECENT=recent, BN=BN, BC=max(2, triton.next_power_of_2(C)), BG=triton.next_power_of_2(G), HD=hd)
    return scores


@triton.jit
def _channel_append_kernel(k, pos_ptr, host, hs_h, hs_c, HD: tl.constexpr):
    h = tl.program_id(0)
    c = tl.arange(0, HD)
    tl.store(host + h * hs_h + c * hs_c + tl.load(pos_ptr), tl.load(k + h * HD + c))


def channel_append(k, pos, host_kc):
    """The step's key k (n_kv, hd) into column pos of the channel-major host copy host_kc (n_kv, hd, cap),
    written over PCIe without stalling the stream. Reference: kvcache.ChannelSelector.append of one token."""
    n_kv, hd, cap = host_kc.shape
    check(k.shape == (n_kv, hd) and k.is_contiguous() and pow2(hd) and host_kc.stride(-1) == 1,
           "k: contiguous (n_kv, hd), hd a power of two; host_kc: (n_kv, hd, cap)")
    _channel_append_kernel[(n_kv,)](k, pos, host_kc, host_kc.stride(0), host_kc.stride(1), HD=hd)


@triton.jit
def _radix_key(x, BITS: tl.constexpr):
    """Scores -> unsigned keys in the same order (float bits, the sign bit flipped, every bit if negative)."""
    if BITS == 16:
        b = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        key = (b ^ tl.where(b >= 0x8000, 0xFFFF, 0x8000)).to(tl.uint32)
    else:
        u = x.to(tl.uint32, bitcast=True)
        key = u ^ tl.where((u >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)
    return key


@triton.jit
def _radix_prefix(hist, h, k, LEVELS: tl.constexpr, UPTO: tl.constexpr):
    """From the digit histograms of levels 0..UPTO-1 of head h: the k-th largest key's top UPTO digits, and
    how many of the keys that start with them still belong to the top k."""
    d = tl.arange(0, 256)
    prefix = tl.zeros((1,), tl.uint32)
    need = tl.zeros((1,), tl.int32) + k
    for lev in tl.static_range(UPTO):
        count = tl.load(hist + (h * LEVELS + lev) * 256 + d)
        above = tl.sum(count, 0) - tl.cumsum(count, 0)                     # keys of a larger digit
        digit = tl.min(tl.where(above[None, :] < need[:, None], d[None, :], 256), 1)  # the smallest digit with
        need -= tl.sum(tl.where(d[None, :] == digit[:, None], above[None, :], 0), 1)  # fewer than `need` above it
        prefix = (prefix << 8) | digit.to(tl.uint32)
    return prefix, need


class Candidates:
    """topk's working memory for rows of width W: the scores kept (vals, their positions idx: those that
    reach the guess from the front, those that reach only the floor from the back), how many of each per row
    (count (rows, 2); zero between calls), and the select's histograms."""

    def __init__(self, rows, W, device, dtype):
        self.vals = torch.empty(rows, W, dtype=dtype, device=device)
        self.idx = torch.empty(rows, W, dtype=torch.int32, device=device)
        self.count = torch.zeros(rows, 2, dtype=torch.int32, device=device)
        self.hist = torch.empty(rows * 4 * 256, dtype=torch.int32, device=device)


@triton.jit
def _bounds(x, x_h, h, last, K, guess_at, BK: tl.constexpr):
    """Row h's scores at the positions last chosen, ranked: the lowest (the floor) and the guess_at-th lowest
    (the guess). A -1 in last (none) counts as -inf."""
    j = tl.arange(0, BK)
    p = tl.load(last + h * K + j, mask=j < K, other=0)
    ranked = tl.sort(tl.where(j < K, tl.load(x + h * x_h + p, mask=(j < K) & (p >= 0), other=float("-inf")),
                              float("inf")).to(tl.float32))
    return tl.min(ranked, 0), tl.sum(tl.where(j == guess_at, ranked, 0.0), 0)


@triton.jit
def _warm_keep_kernel(x, x_h, W, last, K, guess_at, c_vals, c_idx, count, BLOCK: tl.constexpr, BK: tl.constexpr):
    """Row h's scores at or above its guess, appended to the front of the row's candidates, and those between
    its floor and the guess to the back, in no particular order. Every program ranks the last choice's k
    scores itself (a few hundred loads beside its BLOCK): no kernel of its own for them."""
    h, b = tl.program_id(0), tl.program_id(1)
    floor, guess = _bounds(x, x_h, h, last, K, guess_at, BK)
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
def _copy_rows(host_k, host_v, row, h, hs_t, hs_h, out_k, out_v, to, o_h, o_t, live, HD: tl.constexpr):
    """Host rows `row` of KV head h into device rows `to`, where live."""
    c = tl.arange(0, HD)
    src = row[:, None] * hs_t + h * hs_h + c[None, :]
    kr = tl.load(host_k + src, mask=live[:, None], other=0.0)  # both reads in flight before either write:
    vr = tl.load(host_v + src, mask=live[:, None], other=0.0)  # PCIe latency, not bandwidth, bounds small k
    dst = h * o_h + to[:, None] * o_t + c[None, :]
    tl.store(out_k + dst, kr, mask=live[:, None])
    tl.store(out_v + dst, vr, mask=live[:, None])


@triton.jit
def _search(ranked, key, BK: tl.constexpr):
    """For each key: the last of the BK ascending values at `ranked` whose top 48 bits are at most the key's
    (a branchless binary search, BK a power of two; the first if none is)."""
    at = tl.zeros(key.shape, tl.int32)
    for b in tl.static_range(1, 17):
        if (BK >> b) > 0:
            at = tl.where((tl.load(ranked + at + (BK >> b)) >> 16) <= key, at + (BK >> b), at)
    return tl.load(ranked + at)


@triton.jit
def _plan_rows(idx, vals, pos, pvals, fetch, dest, count, scratch, h, K, BK: tl.constexpr):
    """KV head h's new top-k (idx, vals; in any order) against the positions its rows hold (pos): a chosen
    position already held stays in its row; the others (misses) go, in rank order, to the rows whose
    position was not chosen again, in row order. Writes the new pos and pvals, and the misses as a
    fetch list (fetch, dest, count). Both sides are sorted (a position and its place packed in one int64)
    and each looks the other up by binary search: no k x k comparison."""
    i = tl.arange(0, BK)
    val = tl.load(vals + h * K + i, mask=i < K, other=float("-inf"))
    new = tl.where(val > float("-inf"), tl.load(idx + h * K + i, mask=i < K, other=-1), -1)   # -1: nothing chosen
    old = tl.load(pos + h * K + i, mask=i < K, other=-1)                                       # -1: holds nothing
    none = 1 << 62
    s = scratch + h * 4 * BK          # [chosen, ranked | held, ranked | the free rows in order | the misses' values]
    tl.store(s + i, tl.sort(tl.where(new >= 0, (new << 16) | i, none)))
    tl.store(s + BK + i, tl.sort(tl.where(old >= 0, (old << 16) | i, none)))
    tl.debug_barrier()                                  # both ranked lists are read by every thread
    miss = (new >= 0) & ((_search(s + BK, new, BK) >> 16) != new)
    found = _search(s, old, BK)
    kept = (old >= 0) & ((found >> 16) == old)          # the row's position is chosen again
    free = (i < K) & ~kept
    rank = tl.cumsum(miss.to(tl.int32), 0) - 1          # a miss's place in the fetch list
    order = tl.cumsum(free.to(tl.int32), 0) - 1         # a free row's place among the free rows
    n_miss = tl.sum(miss.to(tl.int32), 0)
    tl.store(fetch + h * K + rank, new, mask=miss)
    tl.store(s + 3 * BK + rank, val.to(tl.float32).to(tl.int32, bitcast=True).to(tl.int64), mask=miss)
    tl.store(s + 2 * BK + order, i.to(tl.int64), mask=free)
    tl.debug_barrier()                                  # the lists are read back by other threads
    tl.store(dest + h * K + rank, tl.load(s + 2 * BK + rank, mask=miss, other=0), mask=miss)
    gets = free & (order < n_miss)                      # a free row receives the order-th miss
    p = tl.where(kept, old, tl.where(gets, tl.load(fetch + h * K + order, mask=gets, other=-1), -1))
    took = tl.load(s + 3 * BK + order, mask=gets, other=0).to(tl.int32).to(tl.float32, bitcast=True)
    again = tl.load(vals + h * K + (found & 0xFFFF), mask=kept, other=float("-inf")).to(tl.float32)
    v = tl.where(kept, again, tl.where(gets, took, float("-inf")))
    tl.store(pos + h * K + i, p, mask=i < K)
    tl.store(pvals + h * K + i, v.to(pvals.dtype.element_ty), mask=i < K)
    tl.store(count + h, n_miss)


@triton.jit
def _fetch_rows(fetch, dest, count, h, K, host_k, host_v, hs_t, hs_h, out_k, out_v, o_h, o_t, BJ: tl.constexpr,
                HD: tl.constexpr):
    """The first count[h] positions of head h's fetch list into its device rows dest[h, j], BJ rows at a time."""
    n = tl.load(count + h)
    for j0 in range(0, n, BJ):
        j = j0 + tl.arange(0, BJ)
        live = j < n
        row = tl.load(fetch + h * K + j, mask=live, other=0)
        to = tl.load(dest + h * K + j, mask=live, other=0)
        _copy_rows(host_k, host_v, row, h, hs_t, hs_h, out_k, out_v, to, o_h, o_t, live, HD)


class Slots:
    """A sparse layer's k retrieved device rows out_k, out_v (n_kv, k, hd), the host store they are fetched from
    (host_k, host_v: (cap, n_kv, hd), pinned on CUDA), and which offloaded position each row holds (pos; -1:
    none) with its score (vals; -inf: none), kept across steps so that a row chosen again is not fetched again;
    and a step's plan: the positions to fetch (fetch), the rows they go to (dest), how many (count), and the
    plan's working memory (scratch)."""

    def __init__(self, host_k, host_v, out_k, out_v, dtype):
        cap, n_kv, hd = host_k.shape
        k = out_k.shape[1]
        check(out_k.shape == out_v.shape == (n_kv, k, hd) and out_k.stride() == out_v.stride(), "out: (n_kv, k, hd)")
        check(host_k.shape == host_v.shape and host_k.stride() == host_v.stride() and host_k.stride(-1) == 1,
               "host_k, host_v: one layout, contiguous channels")
        check(pow2(hd) and k < 1 << 16, f"the kernels need a power-of-two head_dim and k < 65536, got {hd}, {k}")
        self.host_k, self.host_v, self.out_k, self.out_v = host_k, host_v, out_k, out_v
        device = out_k.device
        self.pos = torch.full((n_kv, k), -1, dtype=torch.long, device=device)
        self.vals = torch.full((n_kv, k), float("-inf"), dtype=dtype, device=device)
        self.fetch, self.dest = torch.empty_like(self.pos), torch.empty_like(self.pos)
        self.count = torch.zeros(n_kv, dtype=torch.int32, device=device)
        self.scratch = torch.empty(n_kv, 4 * max(16, triton.next_power_of_2(k)), dtype=torch.long, device=device)

    def clear(self):
        """No row holds anything."""
        self.pos.fill_(-1)
        self.vals.fill_(float("-inf"))

    def hold(self, idx):
        """The PyTorch path wrote positions idx (n_kv, n) into rows 0..n-1: the rows hold them, the rest nothing."""
        n = idx.shape[1]
        self.clear()
        self.pos[:, :n] = idx
        self.vals[:, :n] = 0


@triton.jit
def _warm_select_kernel(c_vals, c_idx, count, hist, W, K, vals, idx,
                        pos, pvals, fetch, dest, n_fetch, scratch, host_k, host_v, hs_t, hs_h, out_k, out_v, o_h, o_t,
                        LEVELS: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                        ROWS: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, HD: tl.constexpr):
    """The K largest of row h's candidates into vals/idx (h, K), in no particular order: a radix select (one
    byte of the keys per level) in one program, its histograms through memory (read back by _radix_prefix),
    over the front's candidates if they are K or more, else over both; then the counts to zero. With ROWS,
    the same program then brings the choice into a sparse layer's rows (Slots): _plan_rows, _fetch_rows."""
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
    if ROWS:
        tl.debug_barrier()                                   # the choice, written by every thread, is read whole
        _plan_rows(idx, vals, pos, pvals, fetch, dest, n_fetch, scratch, h, K, BK)
        tl.debug_barrier()                                   # and so is the fetch list
        _fetch_rows(fetch, dest, n_fetch, h, K, host_k, host_v, hs_t, hs_h, out_k, out_v, o_h, o_t, BJ, HD)


def topk(x: torch.Tensor, k: int, last: torch.Tensor, work: Candidates, guess: float = 0.25, BLOCK: int | None = None,
         SELECT: int = 1024, num_warps: int = 8, rows: Slots | None = None, BJ: int = 32):
    """The k largest of each row of x (rows, W), fp16 or fp32, started from the positions chosen last step
    (last: (rows, k) int64, -1: none) -> (values, indices), each (rows, k), in no particular order; where the
    k-th largest is tied, which of its equals are taken is unspecified. The k new scores at the last choice
    are k scores at or above their lowest (the floor), so the k largest all reach it; since one position
    that fell far drags the floor down (7-14 k reach it on a real model), the scores that reach a guess, the
    `guess` quantile of the last choice's new scores, are kept apart. One pass keeps both; where k or more
    reach the guess, the k largest are among them and one program per row selects from those alone, else
    from all it kept. Exact for any `last` of distinct positions: a poor one only keeps more (the whole row,
    where last holds a -1). Reference: torch.topk(sorted=False). BLOCK: the scores a program of the keep pass
    reads, by default enough programs for 16 per row (1024 to 4096: the fastest on an H100 at 16k and at 128k).

    rows: a sparse layer's retrieved rows (last is rows.pos; x's rows are its KV heads): the same program then
    brings the choice into them, fetching from the host store only the positions they do not hold already
    (BJ rows at a time, straight from pinned host memory on CUDA: zero-copy), so that they hold exactly the
    chosen positions (a -inf value: nothing chosen), each its exact K and V -> (rows.vals, rows.pos), which
    row holds which. Reference: the chosen rows gathered whole (kvcache.SparseLayer._gather)."""
    n, W = x.shape
    check(x.dtype in (torch.float16, torch.float32) and x.is_contiguous(), "x: fp16 or fp32 rows, contiguous")
    check(0 < k <= W and last.shape == (n, k) and last.dtype == torch.long and last.is_contiguous(),
           f"k in 1..{W}; last: contiguous int64 ({n}, {k})")
    check(work.vals.shape == (n, W) and work.vals.dtype == x.dtype, f"work: Candidates({n}, {W}, {x.dtype})")
    check(0 <= guess < 1, f"guess is a quantile in [0, 1), got {guess}")
    check(rows is None or (last is rows.pos and rows.pos.shape == (n, k) and rows.vals.dtype == x.dtype),
          f"rows: the Slots of {n} KV heads and {k} rows whose pos is `last`, scores {x.dtype}")
    vals = torch.empty(n, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    bits = 8 * x.element_size()
    BLOCK = BLOCK or min(4096, max(1024, triton.next_power_of_2(W // 16)))
    _warm_keep_kernel[(n, triton.cdiv(W, BLOCK))](x, W, W, last, k, int(guess * k), work.vals, work.idx, work.count,
                                                   BLOCK=BLOCK, BK=max(16, triton.next_power_of_2(k)))
    if rows is None:
        plan, BK, BJ, HD = (x,) * 14, 16, 16, 16  # the rows' arguments: not read without ROWS
    else:
        hk, out = rows.host_k, rows.out_k
        plan = (rows.pos, rows.vals, rows.fetch, rows.dest, rows.count, rows.scratch, hk, rows.host_v, hk.stride(0),
                hk.stride(1), out, rows.out_v, out.stride(0), out.stride(1))
        BK, HD = rows.scratch.shape[1] // 4, hk.shape[-1]
    _warm_select_kernel[(n,)](work.vals, work.idx, work.count, work.hist, W, k, vals, idx, *plan, LEVELS=bits // 8,
                              BITS=bits, BLOCK=SELECT, ROWS=rows is not None, BK=BK, BJ=BJ, HD=HD, num_warps=num_warps)
    return (vals, idx) if rows is None else (rows.vals, rows.pos)


@triton.jit
def _sparse_append_kernel(k, v, pos_ptr, host_k, host_v, hs_t, hs_h, sink_k, sink_v, win_k, win_v, d_h, d_t,
                          SINK: tl.constexpr, RECENT: tl.constexpr, HOST: tl.constexpr, HD: tl.constexpr):
    h = tl.program_id(0)
    pos = tl.load(pos_ptr)
    c = tl.arange(0, HD)
    kr, vr = tl.load(k + h * HD + c), tl.load(v + h * HD + c)
    if HOST:
        tl.store(host_k + pos * hs_t + h * hs_h + c, kr)
        tl.store(host_v + pos * hs_t + h * hs_h + c, vr)
    if pos < SINK:
        tl.store(sink_k + h * d_h + pos * d_t + c, kr)
        tl.store(sink_v + h * d_h + pos * d_t + c, vr)
    else:
        slot = pos % RECENT
        tl.store(win_k + h * d_h + slot * d_t + c, kr)
        tl.store(win_v + h * d_h + slot * d_t + c, vr)


def sparse_append(k, v, pos, host_k, host_v, sink_k, sink_v, win_k, win_v):
    """The new token's k, v (n_kv, hd) at device position pos: into the host store (when there is one,
    written over PCIe, no stall of the stream), the sinks if pos < sink, else the window ring.
    Reference: kvcache.SparseLayer.load of one token."""
    n_kv, hd = k.shape
    check(k.is_contiguous() and v.is_contiguous() and pow2(hd), "k, v: contiguous (n_kv, hd), hd a power of two")
    check(sink_k.stride() == win_k.stride() == sink_v.stride() == win_v.stride(), "sinks and window: one layout")
    host = host_k is not None
    _sparse_append_kernel[(n_kv,)](k, v, pos, host_k if host else k, host_v if host else v,
                                   host_k.stride(0) if host else 0, host_k.stride(1) if host else 0,
                                   sink_k, sink_v, win_k, win_v, win_k.stride(0), win_k.stride(1),
                                   SINK=sink_k.shape[1], RECENT=win_k.shape[1], HOST=host, HD=hd)


# ------------------------------------------------------------------------------- the rest of a decode step

@triton.jit
def _add_rms_norm_kernel(x, h, w, x_out, y, eps, D, HAS_X: tl.constexpr, BD: tl.constexpr):
    d = tl.arange(0, BD)
    m = d < D
    xs = tl.load(h + d, mask=m, other=0.0)
    if HAS_X:
        xs = (tl.load(x + d, mask=m, other=0.0).to(tl.float32) + xs.to(tl.float32)).to(x_out.dtype.element_ty)
    tl.store(x_out + d, xs, mask=m)
    xf = xs.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / D + eps)
    wt = tl.load(w + d, mask=m, other=0.0).to(tl.float32)
    tl.store(y + d, ((xf * r).to(y.dtype.element_ty).to(tl.float32) * wt).to(y.dtype.element_ty), mask=m)


def add_rms_norm(x, h, weight, eps: float):
    """(x + h, RMSNorm(x + h)) for one token, rounded as model.RMSNorm after a residual add does;
    x None: (h, RMSNorm(h)). x, h: (1, 1, dim)."""
    D = h.shape[-1]
    check(h.numel() == D and h.is_contiguous() and (x is None or x.shape == h.shape), "one token (1, 1, dim)")
    x_out, y = torch.empty_like(h), torch.empty_like(h)
    _add_rms_norm_kernel[(1,)](h if x is None else x, h, weight, x_out, y, eps, D, HAS_X=x is not None,
                               BD=triton.next_power_of_2(D), num_warps=8)
    return x_out, y


@triton.jit
def _rope_kernel(q, k, cos, sin, q_out, k_out, H, HALF: tl.constexpr):
    p = tl.program_id(0)
    i = tl.arange(0, HALF)
    c, s = tl.load(cos + i), tl.load(sin + i)
    if p < H:
        src, dst = q + p * 2 * HALF, q_out + p * 2 * HALF
    else:
        src, dst = k + (p - H) * 2 * HALF, k_out + (p - H) * 2 * HALF
    x1, x2 = tl.load(src + i).to(tl.float32), tl.load(src + HALF + i).to(tl.float32)
    tl.store(dst + i, (x1 * c - x2 * s).to(q_out.dtype.element_ty))
    tl.store(dst + HALF + i, (x2 * c + x1 * s).to(q_out.dtype.element_ty))


def rope_qk(q, k, cos, sin, n_heads: int, n_kv: int):
    """Half-split RoPE of one token's q (1, 1, H * hd) and k (1, 1, n_kv * hd) in one launch, with cos, sin
    (1, hd / 2) float32 -> q (1, H, 1, hd), k (1, n_kv, 1, hd). Reference: model.apply_rope."""
    hd = q.shape[-1] // n_heads
    check(q.is_contiguous() and k.is_contiguous() and k.shape[-1] == n_kv * hd and pow2(hd // 2),
           "one token's contiguous q and k, with a power-of-two head_dim")
    q_out, k_out = torch.empty(1, n_heads, 1, hd, device=q.device, dtype=q.dtype), torch.empty(
        1, n_kv, 1, hd, device=k.device, dtype=k.dtype)
    _rope_kernel[(n_heads + n_kv,)](q, k, cos.contiguous(), sin.contiguous(), q_out, k_out, n_heads, HALF=hd // 2)
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(g, u, out, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    gf = tl.load(g + i, mask=m, other=0.0).to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + i, (s * tl.load(u + i, mask=m, other=0.0).to(tl.float32)).to(out.dtype.element_ty), mask=m)


def silu_mul(g, u):
    """silu(g) * u, rounded as F.silu(g) * u is. Reference: model.MLP."""
    check(g.shape == u.shape and g.is_contiguous() and u.is_contiguous(), "g, u: one contiguous shape")
    out = torch.empty_like(g)
    _silu_mul_kernel[(triton.cdiv(g.numel(), 1024),)](g, u, out, g.numel(), BLOCK=1024)
    return out
