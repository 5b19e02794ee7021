"""Triton kernels of the compressed decode step, each beside the PyTorch reference it is tested against.

  quantize      quantize + pack a KV store's groups: keys per channel, values per token, 1/2/4/8 bits,
                in bulk (a prompt) or as one decode step (write the new row into the residual ring,
                quantize the oldest group when the ring is full)
  quant_attend  decode attention over a quantized layer, reading packed codes only, split over the
                sequence (flash-decoding) and combined; the residual ring is the last split
  dense_attend  the same over full-precision K/V (the full cache)
  sparse_attend attention over a sparse layer's device tokens [sinks | retrieved | window]
  sketch_scores q . dequant(sketch) for every offloaded token (the GPU-resident selector), against
                the group's mean query or each query head (then the largest log-softmax)
  channel_scores q . K on C channels of every offloaded key, read from a channel-major copy in pinned host
                memory (channel_append writes each step's key into it)
  topk          the k largest scores of each row (a radix select), for the selection
  gather_rows   the retrieved K and V rows, read straight from pinned host memory (zero-copy)
  sparse_append the new token's K/V into the host store, the window ring and the sinks

Lengths are read from a device tensor `pos` (the new token's position), never passed as Python
ints, so a whole decode step can be captured once in a CUDA graph and replayed. Every wrapper
checks its inputs. On CPU the kernels run under TRITON_INTERPRET=1 (exact, slow): the tests do.
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


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _precision(dtype):  # fp32 dot products stay fp32 (no TF32) so the fp32 path matches its reference
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
    _check(pow2(store.g) and pow2(store.res.shape[-1]),
           f"the kernels need a power-of-two --group and head_dim, got {store.g} and {store.res.shape[-1]}")


def quantize(store, x: torch.Tensor, first_group: int):
    """Bulk: quantize x (n_kv, n, hd), n a multiple of the group size, into `store` (a quant.QuantStore)
    as groups first_group, first_group + 1, ... Reference: QuantStore._quantize_into."""
    _check_store(store)
    n_kv, n, hd = x.shape
    _check(n % store.g == 0 and x.stride(-1) == 1, "quantize takes whole groups of rows with contiguous channels")
    if n == 0:
        return
    _launch_quantize(store, x, (n_kv, n // store.g), first_group, pos=store.codes.new_zeros(()), step=False)


def quantize_step(store, x: torch.Tensor, pos: torch.Tensor):
    """Decode step: the new token's row x (n_kv, hd) at device position pos goes into the residual ring;
    when the ring is full its oldest group is quantized. Reference: QuantStore.append of one token."""
    _check_store(store)
    _check(x.is_contiguous() and x.shape == (store.res.shape[0], store.res.shape[2]), "quantize_step takes (n_kv, hd)")
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
def _softmax_update(q, kT, v, valid, m, l, acc, sm_scale, PREC: tl.constexpr):
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
def _store_partial(ws_m, ws_l, ws_acc, h0, split, n_splits, m, l, acc, G, BG: tl.constexpr, HD: tl.constexpr):
    g = tl.arange(0, BG)
    rows = h0 + g
    tl.store(ws_m + rows * n_splits + split, m, mask=g < G)
    tl.store(ws_l + rows * n_splits + split, l, mask=g < G)
    tl.store(ws_acc + (rows * n_splits + split)[:, None] * HD + tl.arange(0, HD)[None, :], acc, mask=(g < G)[:, None])


@triton.jit
def _load_queries(q, h, G, BG: tl.constexpr, HD: tl.constexpr):
    g = tl.arange(0, BG)
    return tl.load(q + (h * G + g)[:, None] * HD + tl.arange(0, HD)[None, :], mask=(g < G)[:, None], other=0.0)


@triton.jit
def _ring_update(qb, rk, rv, h, r_h, r_t, n_q, L, m, l, acc, sm_scale, R: tl.constexpr, GROUP: tl.constexpr,
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
        m, l, acc = _softmax_update(qb, kT, vb, valid, m, l, acc, sm_scale, PREC)
        r0 += GROUP
    return m, l, acc


@triton.jit
def _dense_split_kernel(q, k, v, k_h, k_t, ws_m, ws_l, ws_acc, pos_ptr, sm_scale, G, n_splits,
                        SPLIT: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr,
                        PREC: tl.constexpr):
    h, split = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    qb = _load_queries(q, h, G, BG, HD)
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
        m, l, acc = _softmax_update(qb, kT, vb, valid, m, l, acc, sm_scale, PREC)
        t0 += BN
    _store_partial(ws_m, ws_l, ws_acc, h * G, split, n_splits, m, l, acc, G, BG, HD)


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
    qb = _load_queries(q, h, G, BG, HD)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, HD), tl.float32)
    c = tl.arange(0, HD)
    i = tl.arange(0, GROUP)
    W: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if split == n_splits - 1:  # the residual ring, full precision
        m, l, acc = _ring_update(qb, rk, rv, h, r_h, r_t, n_q, L, m, l, acc, sm_scale, R, GROUP, HD, PREC)
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
            m, l, acc = _softmax_update(qb, kT, vb, t < end, m, l, acc, sm_scale, PREC)
            t0 += GROUP
    _store_partial(ws_m, ws_l, ws_acc, h * G, split, n_splits, m, l, acc, G, BG, HD)


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


def _check_q(q, n_kv, hd):
    _check(q.dim() == 2 and q.is_contiguous() and q.shape[1] == hd and q.shape[0] % n_kv == 0,
           f"q must be contiguous (H, {hd}) with H a multiple of {n_kv} KV heads, got {tuple(q.shape)}")
    _check(pow2(hd), f"the kernels need a power-of-two head_dim, got {hd}")


def _combine(q, ws, n_splits):
    out = torch.empty_like(q)
    _combine_kernel[(q.shape[0],)](out, ws.m, ws.l, ws.acc, n_splits, BS=triton.next_power_of_2(n_splits),
                                   HD=q.shape[1])
    return out


def dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ws: Workspace, split: int):
    """q (H, hd) of the token at device position pos over k, v (n_kv, >= pos + 1, hd) rows 0..pos.
    Reference: model.attention over the first pos + 1 rows."""
    n_kv, S, hd = k.shape
    _check_q(q, n_kv, hd)
    _check(k.stride() == v.stride() and k.stride(-1) == 1, "k and v must share a layout with contiguous channels")
    G, n_splits = q.shape[0] // n_kv, ws.m.shape[1]
    _check(n_splits * split >= S, f"{n_splits} splits of {split} do not cover {S} rows")
    _dense_split_kernel[(n_kv, n_splits)](q, k, v, k.stride(0), k.stride(1), ws.m, ws.l, ws.acc, pos, hd ** -0.5,
                                          G, n_splits, SPLIT=split, BN=64, BG=max(16, triton.next_power_of_2(G)),
                                          HD=hd, PREC=_precision(q.dtype))
    return _combine(q, ws, n_splits)


def quant_attend(q: torch.Tensor, keys, values, pos: torch.Tensor, ws: Workspace, split: int):
    """q (H, hd) over a quantized layer (quant.QuantStore keys per channel, values per token) holding
    positions 0..pos. Reference: model.attention over keys.dequantize(), values.dequantize()."""
    n_kv, R, hd = keys.res.shape
    _check_q(q, n_kv, hd)
    _check_store(keys)
    _check(keys.per_channel and not values.per_channel and keys.bits == values.bits and keys.g == values.g
           and keys.R == values.R, "quant_attend takes per-channel keys and per-token values of one layout")
    _check(split % keys.g == 0, "splits must hold whole groups")
    G, n_splits = q.shape[0] // n_kv, ws.m.shape[1]
    cap = keys.codes.shape[2] * (32 // keys.bits)
    _check((n_splits - 1) * split >= cap, f"{n_splits - 1} splits of {split} (and one for the residual) do not cover "
                                          f"{cap} tokens")
    _quant_split_kernel[(n_kv, n_splits)](
        q, keys.codes, *keys.codes.stride(), keys.scale, keys.mn, *keys.scale.stride(),
        values.codes, *values.codes.stride(), values.scale, values.mn, *values.scale.stride(),
        keys.res, values.res, keys.res.stride(0), keys.res.stride(1), ws.m, ws.l, ws.acc, pos, hd ** -0.5, G, n_splits,
        BITS=keys.bits, GROUP=keys.g, R=keys.R, SPLIT=split, BG=max(16, triton.next_power_of_2(G)), HD=hd,
        PREC=_precision(q.dtype))
    return _combine(q, ws, n_splits)


# ------------------------------------------------------------------------------- sparse layers

@triton.jit
def _sparse_attend_kernel(q, k, v, k_h, k_t, vals, vals_h, pos_ptr, out, sm_scale, G, TOPK,
                          SINK: tl.constexpr, RECENT: tl.constexpr,
                          BN: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr, PREC: tl.constexpr):
    """Rows [0, SINK) sinks, [SINK, SINK + TOPK) retrieved (valid where their score > -inf),
    [SINK + TOPK, SINK + TOPK + RECENT) the window ring: slot w holds the newest position = w mod RECENT.
    TOPK is a plain argument: layers with different budgets share one compiled kernel."""
    h = tl.program_id(0)
    L = tl.load(pos_ptr) + 1
    qb = _load_queries(q, h, G, BG, HD)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    acc = tl.zeros((BG, HD), tl.float32)
    c = tl.arange(0, HD)
    S = SINK + TOPK + RECENT
    for t0 in range(0, S, BN):
        t = t0 + tl.arange(0, BN)
        w = t - SINK - TOPK
        newest = L - 1 - ((L - 1 - w) % RECENT + RECENT) % RECENT
        score = tl.load(vals + h * vals_h + (t - SINK), mask=(t >= SINK) & (t < SINK + TOPK), other=float("-inf"))
        valid = tl.where(t < SINK, t < L, tl.where(t < SINK + TOPK, score > float("-inf"), (t < S) & (newest >= SINK)))
        kT = tl.load(k + h * k_h + t[None, :] * k_t + c[:, None], mask=valid[None, :], other=0.0)
        vb = tl.load(v + h * k_h + t[:, None] * k_t + c[None, :], mask=valid[:, None], other=0.0)
        m, l, acc = _softmax_update(qb, kT, vb, valid, m, l, acc, sm_scale, PREC)
    g = tl.arange(0, BG)
    tl.store(out + (h * G + g)[:, None] * HD + c[None, :], (acc / l[:, None]).to(out.dtype.element_ty),
             mask=(g < G)[:, None])


def sparse_attend(q, k, v, vals, pos, sink: int, topk: int, recent: int):
    """q (H, hd) over a sparse layer's device rows k, v (n_kv, sink + topk + recent, hd); vals (n_kv, topk) the
    retrieved rows' scores (-inf: nothing retrieved there). Reference: kvcache.SparseLayer.decode's attention."""
    n_kv, S, hd = k.shape
    _check_q(q, n_kv, hd)
    _check(S == sink + topk + recent and k.stride() == v.stride() and k.stride(-1) == 1, "k, v: (n_kv, budget, hd)")
    G = q.shape[0] // n_kv
    out = torch.empty_like(q)
    vals = vals if topk else q  # a window layer retrieves nothing; the pointer is never read
    _sparse_attend_kernel[(n_kv,)](q, k, v, k.stride(0), k.stride(1), vals, vals.stride(0), pos, out,
                                   hd ** -0.5, G, topk, SINK=sink, RECENT=recent, BN=64,
                                   BG=max(16, triton.next_power_of_2(G)), HD=hd, PREC=_precision(q.dtype))
    return out


@triton.jit
def _sketch_scores_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, scores, s_h,
                          pos_ptr, G, SINK: tl.constexpr, RECENT: tl.constexpr, BITS: tl.constexpr,
                          GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr, HD: tl.constexpr):
    """NB groups of tokens per program. The sketch is token-major: a group's codes are GROUP rows of
    HD * BITS / 32 words, read in one contiguous block and unpacked by shifting; the sum over channels
    runs along each row."""
    h, b = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    hi = tl.maximum(SINK, L - RECENT)  # offloaded positions: [SINK, hi)
    n_q = (L // GROUP) * GROUP       # the sketch's ring holds one group: [n_q, L) are exact
    W: tl.constexpr = 32 // BITS
    c = tl.arange(0, HD)
    g = tl.arange(0, BG)
    i = tl.arange(0, GROUP)
    qm = tl.sum(tl.load(q + (h * G + g)[:, None] * HD + c[None, :], mask=(g < G)[:, None], other=0.0).to(tl.float32),
                0) / G                                                               # the group's mean query
    t_r = n_q + i  # the group still in the ring, exact (only the program holding it loads anything)
    mine = (n_q >= b * NB * GROUP) & (n_q < (b + 1) * NB * GROUP)
    kr = tl.load(res + h * r_h + (t_r % GROUP)[:, None] * r_t + c[None, :], mask=mine & (t_r < L)[:, None], other=0.0)
    ring = tl.sum(kr.to(tl.float32) * qm[None, :], 1)                               # (GROUP,)
    shifts = tl.arange(0, W) * BITS
    for gi in tl.static_range(NB):
        grp = b * NB + gi
        t = grp * GROUP + i
        words = tl.load(kc + h * kc_h + t[:, None] * kc_t + tl.arange(0, HD // W)[None, :] * kc_w)  # (GROUP, HD/W)
        code = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)   # (GROUP, HD/W, W), LSB first
        code = tl.reshape(code, (GROUP, HD)).to(tl.float32)
        s = tl.load(ks + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        mn = tl.load(km + h * ks_h + grp * ks_g + c * ks_c).to(tl.float32)
        score = tl.sum(code * (qm * s)[None, :], 1) + tl.sum(qm * mn, 0)
        score = tl.where(grp * GROUP == n_q, ring, score)
        tl.store(scores + h * s_h + t, tl.where((t >= SINK) & (t < hi), score, float("-inf")))


@triton.jit
def _head_queries(q, h, j, sm_scale, G, BG: tl.constexpr, W: tl.constexpr, HD: tl.constexpr):
    """(HD / W, BG): channels w * W + j of KV head h's query heads, times sm_scale."""
    g = tl.arange(0, BG)
    c = tl.arange(0, HD // W) * W + j
    return tl.load(q + (h * G + g)[None, :] * HD + c[:, None], mask=(g < G)[None, :], other=0.0).to(tl.float32) * sm_scale


@triton.jit
def _sketch_heads_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, raw, raw_h, part_m,
                         part_l, pos_ptr, sm_scale, n_parts, G, SINK: tl.constexpr, RECENT: tl.constexpr,
                         BITS: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr, BG: tl.constexpr,
                         HD: tl.constexpr):
    """Each of the G query heads of KV head h against the sketch, NB groups of tokens per program: the
    scores (times sm_scale) into raw rows h * G + g, and per program each head's max and sum of
    exponentials into part_m/part_l (_head_max_kernel finishes the ranking). Code j of every word
    (channels w * W + j) is one shift and mask away, so the dot products build up over j = 0..W-1 in the
    words' own layout, a multiply-add per step with the matching channels of the scaled queries, and one
    sum over the words at the end."""
    h, b = tl.program_id(0), tl.program_id(1)
    L = tl.load(pos_ptr) + 1
    hi = tl.maximum(SINK, L - RECENT)  # offloaded positions: [SINK, hi)
    n_q = (L // GROUP) * GROUP       # the sketch's ring holds one group: [n_q, L) are exact
    W: tl.constexpr = 32 // BITS
    w = tl.arange(0, HD // W)
    g = tl.arange(0, BG)
    i = tl.arange(0, GROUP)
    ring = tl.zeros((GROUP, BG), tl.float32)  # the group still in the ring: exact keys
    t_r = n_q + i
    if (n_q >= b * NB * GROUP) & (n_q < (b + 1) * NB * GROUP):
        acc = tl.zeros((GROUP, HD // W, BG), tl.float32)
        for j in tl.static_range(W):
            kr = tl.load(res + h * r_h + (t_r % GROUP)[:, None] * r_t + (w * W + j)[None, :],
                         mask=(t_r < L)[:, None], other=0.0).to(tl.float32)
            acc += kr[:, :, None] * _head_queries(q, h, j, sm_scale, G, BG, W, HD)[None]
        ring = tl.sum(acc, 1)
    m = tl.full((BG,), float("-inf"), tl.float32)
    l = tl.zeros((BG,), tl.float32)
    for gi in tl.static_range(NB):
        grp = b * NB + gi
        t = grp * GROUP + i
        words = tl.load(kc + h * kc_h + t[:, None] * kc_t + w[None, :] * kc_w)  # (GROUP, HD/W)
        acc = tl.zeros((GROUP, HD // W, BG), tl.float32)
        bias = tl.zeros((BG,), tl.float32)
        for j in tl.static_range(W):
            s = tl.load(ks + h * ks_h + grp * ks_g + (w * W + j) * ks_c).to(tl.float32)
            mn = tl.load(km + h * ks_h + grp * ks_g + (w * W + j) * ks_c).to(tl.float32)
            qj = _head_queries(q, h, j, sm_scale, G, BG, W, HD)
            code = ((words >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            acc += code[:, :, None] * (qj * s[:, None])[None]
            bias += tl.sum(qj * mn[:, None], 0)
        score = tl.where(grp * GROUP == n_q, ring, tl.sum(acc, 1) + bias[None, :])
        score = tl.where(((t >= SINK) & (t < hi))[:, None], score, float("-inf"))      # (GROUP, BG)
        tl.store(raw + (h * G + g)[None, :] * raw_h + t[:, None], score, mask=(g < G)[None, :])
        m_new = tl.maximum(m, tl.max(score, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(score - m_safe[None, :]), 0)
        m = m_new
    tl.store(part_m + (h * G + g) * n_parts + b, m, mask=g < G)
    tl.store(part_l + (h * G + g) * n_parts + b, l, mask=g < G)


@triton.jit
def _head_max_kernel(raw, r_h, part_m, part_l, n_parts, out, o_h, G, BLOCK: tl.constexpr, BP: tl.constexpr,
                     BG: tl.constexpr):
    """out[h, t] = max over the G heads of KV head h of (raw[h * G + g, t] - logsumexp_t raw[h * G + g]), the
    log-sum-exp of each head put together from the per-program partials of _sketch_dot_kernel."""
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


SKETCH_NB = 8  # groups of sketch tokens per program of the sketch kernels: score buffers are a multiple of NB groups


class HeadScratch:
    """What per-head sketch scoring keeps between its two kernels: each query head's raw scores (H, width)
    and per-program softmax partials (H, programs). One is shared by all layers (they score one at a time)."""

    def __init__(self, n_heads, width, device, dtype, block):  # block: SKETCH_NB (or the NB used) groups
        self.raw = torch.empty(n_heads, width, device=device, dtype=dtype)
        self.m = torch.empty(n_heads, width // block, device=device)
        self.l = torch.empty_like(self.m)


def _sketch_args(q, sketch, scores, NB):
    """Check a sketch scoring's inputs -> (n_kv, programs per KV head, the sketch's kernel arguments)."""
    n_kv, R, hd = sketch.res.shape
    _check_q(q, n_kv, hd)
    _check_store(sketch)
    _check(sketch.per_channel and sketch.token_major and sketch.R == sketch.g,
           "the sketch is per channel, token-major, with a one-group residual")
    width, block = scores.shape[1], NB * sketch.g
    _check(scores.shape[0] == n_kv and width % block == 0 and sketch.codes.shape[1] >= width,
           f"scores: (n_kv, a multiple of {block}) within the sketch's capacity")
    return n_kv, width // block, (q, sketch.codes, *sketch.codes.stride(), sketch.scale, sketch.mn,
                                  *sketch.scale.stride(), sketch.res, sketch.res.stride(0), sketch.res.stride(1))


def sketch_scores(q, sketch, pos, scores, sink: int, recent: int, heads: HeadScratch | None = None, NB: int = SKETCH_NB,
                  num_warps: int = 8):
    """Scores (n_kv, width) of every offloaded position [sink, pos + 1 - recent), -inf elsewhere, from a
    token-major, per-channel quant.QuantStore sketch whose residual is one group. heads=None: against the
    group's mean query; else each query head's log-softmax over the offloaded positions, the largest of
    the group's heads. Reference: kvcache.Selector.rank over the dequantized sketch."""
    n_kv, n_parts, store = _sketch_args(q, sketch, scores, NB)
    G, hd = q.shape[0] // n_kv, q.shape[1]
    BG = triton.next_power_of_2(G)
    shape = dict(SINK=sink, RECENT=recent, BITS=sketch.bits, GROUP=sketch.g, NB=NB, BG=BG, HD=hd, num_warps=num_warps)
    if heads is None:
        _sketch_scores_kernel[(n_kv, n_parts)](*store, scores, scores.stride(0), pos, G, **shape)
        return scores
    _check_heads(heads, q, scores, n_parts, NB * sketch.g)
    _sketch_heads_kernel[(n_kv, n_parts)](*store, heads.raw, heads.raw.stride(0), heads.m, heads.l, pos, hd ** -0.5,
                                          n_parts, G, **shape)
    return _rank_heads(heads, scores, G, n_parts, NB * sketch.g)


def _check_heads(heads, q, scores, n_parts, block):
    _check(heads.raw.shape == (q.shape[0], scores.shape[1]) and heads.m.shape == (q.shape[0], n_parts),
           f"heads: a HeadScratch({q.shape[0]}, {scores.shape[1]}, block={block})")


def _rank_heads(heads, scores, G, n_parts, block):
    """Per-head raw scores and softmax partials (a HeadScratch) -> scores: each key's largest log-softmax."""
    _head_max_kernel[(scores.shape[0], n_parts)](heads.raw, heads.raw.stride(0), heads.m, heads.l, n_parts, scores,
                                                 scores.stride(0), G, BLOCK=block,
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
    _check_q(q, n_kv, hd)
    _check(host_kc.stride(-1) == 1, "host_kc: (n_kv, hd, cap), each channel's row contiguous")
    _check(channels.shape[0] == n_kv and channels.is_contiguous(), "channels: (n_kv, C)")
    _check(scores.shape[0] == n_kv and scores.shape[1] >= cap, "scores: (n_kv, >= cap)")
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
    _check(k.shape == (n_kv, hd) and k.is_contiguous() and pow2(hd) and host_kc.stride(-1) == 1,
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


@triton.jit
def _radix_hist_kernel(x, x_h, W, hist, k, LEVEL: tl.constexpr, LEVELS: tl.constexpr, BITS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Level LEVEL of the radix select: the histogram of digit LEVEL of the keys that share the k-th largest
    key's higher digits."""
    h, b = tl.program_id(0), tl.program_id(1)
    i = b * BLOCK + tl.arange(0, BLOCK)
    key = _radix_key(tl.load(x + h * x_h + i, mask=i < W, other=float("-inf")), BITS)
    SHIFT: tl.constexpr = BITS - 8 * (LEVEL + 1)
    match = i < W
    if LEVEL > 0:
        prefix, _ = _radix_prefix(hist, h, k, LEVELS, LEVEL)
        match = match & ((key >> (SHIFT + 8)) == prefix)
    digit = tl.where(match, ((key >> SHIFT) & 255).to(tl.int32), 256)      # 256: not counted
    count = tl.histogram(digit, 512)
    bins = tl.arange(0, 512)
    tl.atomic_add(hist + (h * LEVELS + LEVEL) * 256 + bins, count, mask=(bins < 256) & (count > 0))


@triton.jit
def _radix_collect_kernel(x, x_h, W, hist, taken, k, vals, idx, LEVELS: tl.constexpr, BITS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Every key above the k-th largest, and as many keys equal to it as the top k still needs, into vals/idx
    (n_kv, k), in no particular order; taken (n_kv, 2) counts what was written, above and equal."""
    h, b = tl.program_id(0), tl.program_id(1)
    i = b * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(x + h * x_h + i, mask=i < W, other=float("-inf"))
    key = _radix_key(s, BITS)
    kth, need = _radix_prefix(hist, h, k, LEVELS, LEVELS)
    kth, need = tl.sum(kth, 0), tl.sum(need, 0)  # (1,) -> scalars
    above, equal = (i < W) & (key > kth), (i < W) & (key == kth)
    slot = tl.atomic_add(taken + h * 2, tl.sum(above.to(tl.int32), 0)) + tl.cumsum(above.to(tl.int32), 0) - 1
    tl.store(vals + h * k + slot, s, mask=above)
    tl.store(idx + h * k + slot, i.to(tl.int64), mask=above)
    rank = tl.atomic_add(taken + h * 2 + 1, tl.sum(equal.to(tl.int32), 0)) + tl.cumsum(equal.to(tl.int32), 0) - 1
    keep = equal & (rank < need)
    slot = k - need + rank
    tl.store(vals + h * k + slot, s, mask=keep)
    tl.store(idx + h * k + slot, i.to(tl.int64), mask=keep)


def topk(x: torch.Tensor, k: int, out=None, BLOCK: int = 4096):
    """The k largest of each row of x (rows, W), fp16 or fp32 -> (values, indices), each (rows, k) (into out's
    pair of tensors, if given), in no particular order; where the k-th largest value is tied, which of its
    equals are taken is unspecified. A radix select: one histogram pass per byte of the keys (2 for fp16, 4
    for fp32), then one pass that collects; every pass reads x once, with many programs per row.
    Reference: torch.topk(sorted=False)."""
    rows, W = x.shape
    _check(x.dtype in (torch.float16, torch.float32) and x.stride(-1) == 1, "x: fp16 or fp32 rows, contiguous")
    _check(0 < k <= W, f"k must be in 1..{W}, got {k}")
    bits = 8 * x.element_size()
    levels = bits // 8
    work = torch.zeros(rows * (levels * 256 + 2), dtype=torch.int32, device=x.device)
    hist, taken = work[:rows * levels * 256], work[rows * levels * 256:]
    if out is None:
        out = torch.empty(rows, k, dtype=x.dtype, device=x.device), torch.empty(rows, k, dtype=torch.long, device=x.device)
    vals, idx = out
    _check(vals.shape == idx.shape == (rows, k) and vals.dtype == x.dtype and idx.dtype == torch.long
           and vals.is_contiguous() and idx.is_contiguous(), f"out: contiguous ({rows}, {k}) values and int64 indices")
    grid = (rows, triton.cdiv(W, BLOCK))
    for level in range(levels):
        _radix_hist_kernel[grid](x, x.stride(0), W, hist, k, LEVEL=level, LEVELS=levels, BITS=bits, BLOCK=BLOCK)
    _radix_collect_kernel[grid](x, x.stride(0), W, hist, taken, k, vals, idx, LEVELS=levels, BITS=bits, BLOCK=BLOCK)
    return vals, idx


@triton.jit
def _copy_rows(host_k, host_v, row, h, hs_t, hs_h, out_k, out_v, to, o_h, o_t, live, inside, HD: tl.constexpr):
    """Host rows `row` of KV head h (where live; zeros elsewhere) into device rows `to` (where inside)."""
    c = tl.arange(0, HD)
    src = row[:, None] * hs_t + h * hs_h + c[None, :]
    kr = tl.load(host_k + src, mask=live[:, None], other=0.0)  # both reads in flight before either write:
    vr = tl.load(host_v + src, mask=live[:, None], other=0.0)  # PCIe latency, not bandwidth, bounds small k
    dst = h * o_h + to[:, None] * o_t + c[None, :]
    tl.store(out_k + dst, kr, mask=inside[:, None])
    tl.store(out_v + dst, vr, mask=inside[:, None])


@triton.jit
def _gather_kernel(idx, vals, n_h, host_k, host_v, hs_t, hs_h, out_k, out_v, o_h, o_t, K,
                   BJ: tl.constexpr, HD: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    j = b * BJ + tl.arange(0, BJ)
    inside = j < K
    live = inside & (tl.load(vals + h * n_h + j, mask=inside, other=float("-inf")) > float("-inf"))
    row = tl.load(idx + h * n_h + j, mask=live, other=0)
    _copy_rows(host_k, host_v, row, h, hs_t, hs_h, out_k, out_v, j, o_h, o_t, live, inside, HD)


def _check_rows(idx, vals, host_k, host_v, out_k, out_v):
    """Check a gather's inputs -> (n_kv, k, hd)."""
    cap, n_kv, hd = host_k.shape
    K = idx.shape[1]
    _check(idx.shape == vals.shape == (n_kv, K) and idx.stride() == vals.stride(), "idx, vals: (n_kv, k), one layout")
    _check(out_k.shape == out_v.shape == (n_kv, K, hd) and out_k.stride() == out_v.stride(), "out: (n_kv, k, hd)")
    _check(host_k.stride() == host_v.stride() and host_k.stride(-1) == 1, "host_k, host_v: one layout")
    _check(pow2(hd), f"the kernels need a power-of-two head_dim, got {hd}")
    return n_kv, K, hd


def gather_rows(idx, vals, host_k, host_v, out_k, out_v, BJ: int = 2, num_warps: int = 4):
    """out_k[h, j] = host_k[idx[h, j], h] (and V), for rows whose score vals[h, j] > -inf (zeros otherwise).
    host_k, host_v: (cap, n_kv, hd), pinned host memory on CUDA: the kernel reads it directly over PCIe
    (zero-copy), K and V in one launch. Reference: kvcache.SparseLayer._gather."""
    n_kv, K, hd = _check_rows(idx, vals, host_k, host_v, out_k, out_v)
    # many small programs: more PCIe reads outstanding at once
    _gather_kernel[(n_kv, triton.cdiv(K, BJ))](idx, vals, idx.stride(0), host_k, host_v, host_k.stride(0),
                                              host_k.stride(1), out_k, out_v, out_k.stride(0), out_k.stride(1), K,
                                              BJ=BJ, HD=hd, num_warps=num_warps)


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
    _check(k.is_contiguous() and v.is_contiguous() and pow2(hd), "k, v: contiguous (n_kv, hd), hd a power of two")
    _check(sink_k.stride() == win_k.stride() == sink_v.stride() == win_v.stride(), "sinks and window: one layout")
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
    _check(h.numel() == D and h.is_contiguous() and (x is None or x.shape == h.shape), "one token (1, 1, dim)")
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
    _check(q.is_contiguous() and k.is_contiguous() and k.shape[-1] == n_kv * hd and pow2(hd // 2),
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
    _check(g.shape == u.shape and g.is_contiguous() and u.is_contiguous(), "g, u: one contiguous shape")
    out = torch.empty_like(g)
    _silu_mul_kernel[(triton.cdiv(g.numel(), 1024),)](g, u, out, g.numel(), BLOCK=1024)
    return out
