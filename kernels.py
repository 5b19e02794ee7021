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
  retrieve      the same across steps: only the rows a layer does not hold already (Slots)
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
def _sketch_kernel(q, kc, kc_h, kc_t, kc_w, ks, km, ks_h, ks_g, ks_c, res, r_h, r_t, out, o_h, part_m, part_l,
                   pos_ptr, sm_scale, n_parts, G, SINK: tl.constexpr, RECENT: tl.constexpr, BITS: tl.constexpr,
                   MASK: tl.constexpr, GROUP: tl.constexpr, NB: tl.constexpr, HEADS: tl.constexpr, BG: tl.constexpr,
                   BQ: tl.constexpr, HD: tl.constexpr, ASM: tl.constexpr):
    """The sketch against KV head h's queries (BQ of them: each head's with HEADS, else the group's mean), NB
    groups of tokens per program. A word holds W codes, LSB first; shifted right by j * BITS and masked, its
    four bytes are codes j, j + E, j + 2E, j + 3E (E = 8 / BITS): four codes in two instructions, dotted
    with the matching channels of the query in one dp4a. The query is brought to int8 per group: its
    product with the group's scales (q_c * s_c), over the largest |q_c * s_c|; the minima add a constant
    per group (sum_c q_c * mn_c); within a group, equal dot products (small integers) are ordered newest
    first by a fraction of a step. Scores -inf outside the offloaded positions; with HEADS each head's
    scores go to rows h * G + g of out and per program each head's max and sum of exponentials to
    part_m/part_l (_head_max_kernel finishes the ranking); else one row per KV head."""
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


@triton.jit
def _head_max_kernel(raw, r_h, part_m, part_l, n_parts, out, o_h, G, BLOCK: tl.constexpr, BP: tl.constexpr,
                     BG: tl.constexpr):
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


SKETCH_NB = 8  # groups of sketch tokens per program of the sketch kernels: score buffers are a multiple of NB groups


class HeadScratch:
    """What per-head sketch scoring keeps between its two kernels: each query head's raw scores (H, width)
    and per-program softmax partials (H, programs). One is shared by all layers (they score one at a time)."""

    def __init__(self, n_heads, width, device, dtype, block):  # block: SKETCH_NB (or the NB used) groups
        self.raw = torch.empty(n_heads, width, device=device, dtype=dtype)
        self.m = torch.empty(n_heads, width // block, device=device)
        self.l = torch.empty_like(self.m)


def sketch_scores(q, sketch, pos, scores, sink: int, recent: int, heads: HeadScratch | None = None, NB: int = SKETCH_NB,
                  num_warps: int = 8):
    """Scores (n_kv, width) of every offloaded position [sink, pos + 1 - recent), -inf elsewhere, from a
    token-major, per-channel quant.QuantStore sketch whose residual is one group. heads=None: against the
    group's mean query; else each query head's log-softmax over the offloaded positions, the largest of
    the group's heads. Reference: kvcache.Selector.rank over the dequantized sketch."""
    n_kv, R, hd = sketch.res.shape
    _check_q(q, n_kv, hd)
    _check_store(sketch)
    _check(sketch.per_channel and sketch.token_major and sketch.R == sketch.g,
           "the sketch is per channel, token-major, with a one-group residual")
    width, block = scores.shape[1], NB * sketch.g
    _check(scores.shape[0] == n_kv and width % block == 0 and sketch.codes.shape[1] >= width,
           f"scores: (n_kv, a multiple of {block}) within the sketch's capacity")
    G, n_parts = q.shape[0] // n_kv, width // block
    BG = triton.next_power_of_2(G)
    mask = ((1 << sketch.bits) - 1) * 0x01010101  # a code in every byte of a word, as an int32
    store = (q, sketch.codes, *sketch.codes.stride(), sketch.scale, sketch.mn, *sketch.scale.stride(),
             sketch.res, sketch.res.stride(0), sketch.res.stride(1))
    shape = dict(SINK=sink, RECENT=recent, BITS=sketch.bits, MASK=mask - (mask >> 31 << 32), GROUP=sketch.g, NB=NB,
                 BG=BG, HD=hd, ASM=not INTERPRET, num_warps=num_warps)
    if heads is None:
        _sketch_kernel[(n_kv, n_parts)](*store, scores, scores.stride(0), scores, scores, pos, 1.0, n_parts, G,
                                        HEADS=False, BQ=1, **shape)
        return scores
    _check(heads.raw.shape == (q.shape[0], width) and heads.m.shape == (q.shape[0], n_parts),
           f"heads: a HeadScratch({q.shape[0]}, {width}, block={block})")
    _sketch_kernel[(n_kv, n_parts)](*store, heads.raw, heads.raw.stride(0), heads.m, heads.l, pos, hd ** -0.5, n_parts,
                                    G, HEADS=True, BQ=BG, **shape)
    _head_max_kernel[(n_kv, n_parts)](heads.raw, heads.raw.stride(0), heads.m, heads.l, n_parts, scores,
                                      scores.stride(0), G, BLOCK=block, BP=min(triton.next_power_of_2(n_parts), 256),
                                      BG=BG)
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
def _gather_kernel(idx, vals, n_h, dest, count, host_k, host_v, hs_t, hs_h, out_k, out_v, o_h, o_t, K,
                   PLANNED: tl.constexpr, BJ: tl.constexpr, HD: tl.constexpr):
    """Rows idx[h, j] of the host store into device rows: PLANNED, the first count[h] of them into rows
    dest[h, j] (nothing else is written); else each into row j, where vals[h, j] > -inf (zeros elsewhere)."""
    h, b = tl.program_id(0), tl.program_id(1)
    j = b * BJ + tl.arange(0, BJ)
    c = tl.arange(0, HD)
    if PLANNED:
        inside = j < tl.load(count + h)
        live = inside
        to = tl.load(dest + h * n_h + j, mask=inside, other=0)
    else:
        inside = j < K
        live = inside & (tl.load(vals + h * n_h + j, mask=inside, other=float("-inf")) > float("-inf"))
        to = j
    row = tl.load(idx + h * n_h + j, mask=live, other=0)
    src = row[:, None] * hs_t + h * hs_h + c[None, :]
    kr = tl.load(host_k + src, mask=live[:, None], other=0.0)  # both reads in flight before either write:
    vr = tl.load(host_v + src, mask=live[:, None], other=0.0)  # PCIe latency, not bandwidth, bounds small k
    dst = h * o_h + to[:, None] * o_t + c[None, :]
    tl.store(out_k + dst, kr, mask=inside[:, None])
    tl.store(out_v + dst, vr, mask=inside[:, None])


def _check_gather(idx, host_k, host_v, out_k, out_v):
    cap, n_kv, hd = host_k.shape
    K = idx.shape[1]
    _check(idx.shape == (n_kv, K) and idx.dtype == torch.long and idx.is_contiguous(), "idx: contiguous (n_kv, k) int64")
    _check(out_k.shape == out_v.shape == (n_kv, K, hd) and out_k.stride() == out_v.stride(), "out: (n_kv, k, hd)")
    _check(host_k.stride() == host_v.stride() and host_k.stride(-1) == 1, "host_k, host_v: one layout")
    _check(pow2(hd), f"the kernels need a power-of-two head_dim, got {hd}")
    return n_kv, K, hd


def gather_rows(idx, vals, host_k, host_v, out_k, out_v, BJ: int = 2, num_warps: int = 4):
    """out_k[h, j] = host_k[idx[h, j], h] (and V), for rows whose score vals[h, j] > -inf (zeros otherwise).
    host_k, host_v: (cap, n_kv, hd), pinned host memory on CUDA: the kernel reads it directly over PCIe
    (zero-copy), K and V in one launch. Reference: kvcache.SparseLayer._gather."""
    n_kv, K, hd = _check_gather(idx, host_k, host_v, out_k, out_v)
    _check(vals.shape == idx.shape and vals.is_contiguous(), "vals: contiguous (n_kv, k), as idx")
    # many small programs: more PCIe reads outstanding at once
    _gather_kernel[(n_kv, triton.cdiv(K, BJ))](idx, vals, K, idx, idx, host_k, host_v, host_k.stride(0),
                                              host_k.stride(1), out_k, out_v, out_k.stride(0), out_k.stride(1), K,
                                              PLANNED=False, BJ=BJ, HD=hd, num_warps=num_warps)


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


def retrieve(idx, vals, slots: Slots, host_k, host_v, out_k, out_v, BJ: int = 2, num_warps: int = 4):
    """The step's top-k (idx, vals: (n_kv, k), any order; vals -inf: nothing chosen) into the device rows
    out_k, out_v (n_kv, k, hd), fetching from the host store only the positions the rows do not hold
    already: the rows end up holding exactly the chosen positions (slots.pos, slots.vals say which row holds
    which), and a row that holds a position holds its exact K and V, as gather_rows would have fetched
    them. -> (slots.vals, slots.pos). Reference: the same rows, gathered whole (gather_rows)."""
    n_kv, K, hd = _check_gather(idx, host_k, host_v, out_k, out_v)
    _check(vals.shape == idx.shape and vals.is_contiguous(), "vals: contiguous (n_kv, k), as idx")
    _check(slots.pos.shape == (n_kv, K) and slots.vals.dtype == vals.dtype, f"slots: Slots({n_kv}, {K}, {vals.dtype})")
    BK = max(16, triton.next_power_of_2(K))
    _slot_plan_kernel[(n_kv,)](idx, vals, slots.pos, slots.vals, slots.fetch, slots.dest, slots.count, K, BK=BK,
                               BC=max(1, min(BK, 4096 // BK)))
    _gather_kernel[(n_kv, triton.cdiv(K, BJ))](slots.fetch, vals, K, slots.dest, slots.count, host_k, host_v,
                                              host_k.stride(0), host_k.stride(1), out_k, out_v, out_k.stride(0),
                                              out_k.stride(1), K, PLANNED=True, BJ=BJ, HD=hd, num_warps=num_warps)
    return slots.vals, slots.pos


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
