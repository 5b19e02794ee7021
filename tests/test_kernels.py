"""kernels.py against its PyTorch references (kvcache.py) on random data, across group, split and
residual edges, every bit width; on CPU under TRITON_INTERPRET=1, natively where CUDA exists."""
import pytest
import torch

import kernels as K
import research  # noqa: F401  (registers the research selectors)
from kvcache import SELECTORS, CacheConfig, KVCache, Selector, SparseLayer, attention
from model import ModelArgs, Transformer
from quant import QuantStore

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]  # on CPU only under TRITON_INTERPRET=1
DTYPES = [torch.float32] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def rand(*shape, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * torch.rand(shape[-1], generator=g) * 3).to(device, dtype)


LAYOUTS = {"keys": (True, False), "sketch": (True, True), "values": (False, False)}  # per_channel, token_major


def store_pair(n_kv, hd, max_len, bits, layout, device, dtype, group=64, residual=128):
    per_channel, token_major = LAYOUTS[layout]
    kw = dict(bits=bits, group=group, residual=residual, per_channel=per_channel, device=device, dtype=dtype,
              token_major=token_major)
    ref = QuantStore(n_kv, hd, max_len, **kw)
    ker = QuantStore(n_kv, hd, max_len, kernels=True, **kw)
    return ref, ker


def assert_same_store(a, b):
    """Same codes, scales, minima, and the same tokens in the live slots of the residual ring."""
    assert a.length == b.length and a.n_q == b.n_q
    for x, y in zip(a.tensors()[:3], b.tensors()[:3]):
        assert torch.equal(x, y)
    live = a._slots(a.n_q, a.length)
    assert torch.equal(a.res[:, live], b.res[:, live])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantize_bulk_and_step_equal_the_reference_bit_for_bit(device, bits, layout):
    n_kv, hd = 2, 64
    for dtype in DTYPES:
        ref, ker = store_pair(n_kv, hd, 600, bits, layout, device, dtype)
        x = rand(n_kv, 600, hd, seed=bits, device=device, dtype=dtype)
        x[0, :64, 5] = 1.5                                # a constant group: scale 0, exact values
        ref.append(x[:, :333])                            # a prompt: 192 quantized in bulk, 141 in the ring
        ker.append(x[:, :333])
        assert_same_store(ref, ker)
        pos = torch.zeros((), dtype=torch.long, device=device)
        for t in range(333, 333 + 140):                   # decode steps across two ring flushes
            ref.append(x[:, t:t + 1])
            pos.fill_(t)
            K.quantize_step(ker, x[:, t].contiguous(), pos)
            ker.advance(t + 1)
        assert_same_store(ref, ker)
        d = ref.dequantize() - x[:, :ker.length].float()
        assert ker.n_q == 384 and d[:, ker.n_q:].abs().max() == 0   # the ring is exact
        if layout == "sketch":  # the same per-channel groups as keys, only laid out token by token
            keys = QuantStore(n_kv, hd, 600, bits=bits, group=64, residual=128, per_channel=True, device=device,
                              dtype=dtype)
            keys.append(x[:, :ker.length])
            assert torch.equal(keys.dequantize(), ker.dequantize())


def quant_layer_pair(n_kv, hd, L, bits, device, dtype, group=64, residual=128):
    kw = dict(bits=bits, group=group, residual=residual, device=device, dtype=dtype)
    keys = QuantStore(n_kv, hd, 1024, per_channel=True, **kw)
    values = QuantStore(n_kv, hd, 1024, per_channel=False, **kw)
    k, v = rand(n_kv, L, hd, seed=1, device=device, dtype=dtype), rand(n_kv, L, hd, seed=2, device=device, dtype=dtype)
    keys.append(k)
    values.append(v)
    return keys, values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("heads", [(4, 2, 64), (3, 1, 128)])
def test_quant_attention_equals_attention_over_the_dequantized_store(device, bits, heads):
    H, n_kv, hd = heads
    for L in (1, 64, 127, 128, 200, 390):                 # ring only, group and residual edges, several splits
        for dtype in DTYPES:
            keys, values = quant_layer_pair(n_kv, hd, L, bits, device, dtype)
            q = rand(H, hd, seed=L, device=device, dtype=dtype)
            split, n = K.split_plan(1024, n_kv, 64, target_programs=8)   # 256-token splits: 4 + the ring
            ws = K.Workspace(H, n + 1, hd, device)
            out = K.quant_attend(q, keys, values, torch.tensor(L - 1, device=device), ws, split)
            ref = attention(q.float()[None, :, None], keys.dequantize()[None], values.dequantize()[None])[0, :, 0]
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            assert torch.allclose(out.float(), ref, atol=tol, rtol=tol), (L, dtype, (out.float() - ref).abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_dense_attention_across_split_edges(device):
    H, n_kv, hd, S = 8, 2, 64, 300
    k, v = rand(n_kv, S, hd, seed=3, device=device), rand(n_kv, S, hd, seed=4, device=device)
    split, n = K.split_plan(S, n_kv, 64, target_programs=8)
    assert n > 1 and split % 64 == 0
    ws = K.Workspace(H, n, hd, device)
    for L in (1, 63, 64, 65, split + 1, S):
        q = rand(H, hd, seed=L, device=device)
        out = K.dense_attend(q, k, v, torch.tensor(L - 1, device=device), ws, split)
        ref = attention(q[None, :, None], k[None, :, :L], v[None, :, :L])[0, :, 0]
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), L


def sketch_cases(device, bits, per_head, n_kv=2, G=3, hd=64, g=32, sink=4, recent=8, width=256):
    """A sketch at lengths across group, ring and 2-group block edges, a group of 3 query heads (padded to
    4): per length, (store, q, hi, scores, heads), hi the end of the offloaded range [sink, hi)."""
    x = rand(n_kv, width, hd, seed=bits, device=device)
    scores = torch.empty(n_kv, width, device=device)
    heads = K.HeadScratch(n_kv * G, width, device, torch.float32, block=2 * g) if per_head else None
    for L in (9, 33, 64, 65, 140, 256):
        store = QuantStore(n_kv, hd, width, bits=bits, group=g, residual=g, per_channel=True, token_major=True,
                           device=device, dtype=torch.float32, kernels=True, capacity=width)
        store.append(x[:, :L])
        yield store, rand(n_kv * G, hd, seed=L, device=device), max(sink, L - recent), scores, heads


def layerless(cls, per_head=False, n_kv=2, hd=64):
    """A selector of class cls without a layer: rank() and, given a store, scores()."""
    from types import SimpleNamespace
    sel = cls.__new__(cls)
    Selector.__init__(sel, SimpleNamespace(att_k=torch.empty(n_kv, 1, hd)), CacheConfig(), None, None)
    sel.per_head = per_head
    return sel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_head,bits", [(False, 1), (False, 2), (False, 4), (True, 1), (True, 2), (True, 4)])
def test_sketch_scores_equal_the_selector_ranking(device, per_head, bits):
    """Scores over the sketch as Selector.rank computes them on the dequantized store (the group's mean
    query, or each head's log-softmax and the largest), -inf outside the offloaded range (sketch_cases)."""
    rank, sink = layerless(Selector, per_head), 4
    for store, q, hi, scores, heads in sketch_cases(device, bits, per_head):
        K.sketch_scores(q, store, torch.tensor(store.length - 1, device=device), scores, sink, 8, heads, NB=2)
        ref = rank.rank(store.dequantize()[:, sink:hi], q)
        assert torch.allclose(scores[:, sink:hi], ref, atol=1e-4, rtol=1e-4), store.length
        assert (scores[:, :sink] == float("-inf")).all() and (scores[:, hi:] == float("-inf")).all(), store.length


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("W,k,block,select", [(300, 5, 128, 64), (1100, 128, 256, 256), (255, 255, 128, 64),
                                              (513, 1, 128, 64), (4096, 512, 1024, 1024)])
def test_topk_takes_what_torch_topk_takes_from_any_last_choice(device, dtype, W, k, block, select):
    """The same values as torch.topk (the indices may differ only among equal values), the candidates kept in
    passes of `block` and selected `select` at a time: rows with -inf in half of them, with ties, with few
    distinct values; k of one, of the whole row; rows within a block and across. From last choices of every
    kind, one working memory for all: none (-1), the top-k of slightly different scores (most of it still
    in), random positions, one -1 among them, the top-k itself (then fewer than k reach the guess: the select
    reads the candidates below it too), and a guess at the floor."""
    x = rand(3, W, seed=W + k).to(dtype)
    x[0, :W // 2] = float("-inf")
    x[1, ::7] = x[1, 3]
    x[2] = x[2].round()
    gen = torch.Generator().manual_seed(k)
    near = (x.float() + 0.2 * torch.randn(3, W, generator=gen)).topk(k, -1).indices
    anywhere = torch.stack([torch.randperm(W, generator=gen)[:k] for _ in range(3)])
    hole = anywhere.clone()
    hole[1, k // 2] = -1
    work = K.Candidates(3, W, device, dtype)
    same = x.float().topk(k, -1).indices
    for last, guess in ((torch.full((3, k), -1), 0.25), (near, 0.25), (anywhere, 0.25), (hole, 0.25), (same, 0.25),
                        (near, 0.0)):
        vals, idx = K.topk(x.to(device), k, last.to(device), work, guess, BLOCK=block, SELECT=select)
        vals, idx = vals.cpu(), idx.cpu()
        assert torch.equal(vals.sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values)
        assert torch.equal(x.gather(1, idx), vals) and all(len(set(r.tolist())) == k for r in idx)
        assert not work.count.any()                    # ready for the next step


def test_wrappers_refuse_bad_inputs():
    keys, values = quant_layer_pair(2, 64, 100, 2, "cpu", torch.float32)
    ws = K.Workspace(4, 2, 64, "cpu")
    with pytest.raises(ValueError, match="do not cover"):
        K.quant_attend(torch.randn(4, 64), keys, values, torch.tensor(99), ws, 64)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        K.quant_attend(torch.randn(3, 64), keys, values, torch.tensor(99), ws, 1024)
    odd = QuantStore(2, 96, 256, bits=2, group=32, residual=64, per_channel=True, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        K.quantize(odd, torch.randn(2, 64, 96), 0)


class Choice:
    """A kernel-path layer's trace: the positions it retrieved at its last step (-1: none)."""

    def record(self, index, idx, pos):
        self.idx = idx.cpu()


def pin_to(ref: SparseLayer, choice: Choice):
    """Make ref's PyTorch decode retrieve what the kernel path chose, once that is checked to be a top-k of
    ref's own scores: the sketch's scores can tie (small integer codes), and which of tied scores a top-k
    takes is unspecified."""
    scores, select, seen = ref.selector.scores, ref._select, {}

    def scored(q, lo, hi):
        seen["s"], seen["lo"] = scores(q, lo, hi), lo
        return seen["s"]

    def pinned(q, n_off):
        mine = select(q, n_off)
        theirs = torch.stack([row[row >= 0].sort().values for row in choice.idx])
        if torch.equal(mine.sort(-1).values.cpu(), theirs):
            return mine
        assert "s" in seen, "everything fit in the budget, yet the kernel path chose otherwise"
        s = seen["s"].cpu()
        kth = s.topk(mine.shape[1], -1).values[:, -1:]
        assert (s.gather(1, theirs - seen["lo"]) >= kth).all(), "the kernel path's choice is not a top-k"
        return theirs.to(mine.device)

    ref.selector.scores, ref._select = scored, pinned


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("select,prompt,steps", [(s, p, 70) for s in ("sketch", "channels") for p in (5, 40, 300)]
                         + [("sketch", 2, 12)]  # decoding while the sinks still fill
                         + [("sketch-heads", 300, 10), ("sketch-heads", 40, 30)])
def test_sparse_step_equals_the_reference_decode(device, select, prompt, steps):
    """Prompts shorter than the sinks, than the budget, longer; the rows kept across steps and the top-k
    started from the last choice, with one step in the middle on the PyTorch path (the rows it writes are
    what the next kernel step starts from)."""
    from test_kvcache import identity_prediction
    H, n_kv, hd = 6, 2, 64
    cfg = CacheConfig("sparse", budget=48, sink=4, recent=12, select=select, channels=8)
    wq, inv_freq = (x.to(device) for x in identity_prediction(H, hd))
    kw = dict(wq=wq, inv_freq=inv_freq)
    ker = SparseLayer(n_kv, hd, 400, cfg, cfg.topk, device, torch.float32, "cpu", kernels=True, **kw)
    ref = SparseLayer(n_kv, hd, 400, cfg, cfg.topk, device, torch.float32, "cpu", shared={"scores":
                      ker.shared["scores"]}, **kw)  # the score buffer's width sizes the sketch: the same layout
    k = rand(1, n_kv, prompt + steps, hd, seed=5, device=device)
    v = rand(1, n_kv, prompt + steps, hd, seed=6, device=device)
    ref.load(k[:, :, :prompt], v[:, :, :prompt], 0)
    ker.load(k[:, :, :prompt], v[:, :, :prompt], 0)
    ker.trace = Choice()
    pin_to(ref, ker.trace)
    pos = torch.zeros((), dtype=torch.long, device=device)
    for t in range(prompt, prompt + steps):
        q = rand(1, H, 1, hd, seed=100 + t, device=device)
        pos.fill_(t)
        if t == prompt + steps // 2:  # the rows written by the PyTorch path in between
            b = ker.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1], t)
        else:
            b = ker.step(q, k[:, :, t:t + 1], v[:, :, t:t + 1], pos)
            ker.advance(t + 1)
        a = ref.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1], t)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), t
    assert ker.h2d_bytes == ref.h2d_bytes                 # the same bytes cross to the device
    if select != "channels":
        assert_same_store(ref.selector.store, ker.selector.store)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("select", ["sketch", "channels", "sketch-heads"])
@pytest.mark.parametrize("prompt", [135, 136])  # the last offloaded position quantized in the sketch, or exact
def test_needles_at_the_edges_of_the_offloaded_range_are_retrieved(device, select, prompt):
    """The kernel path's twin of the test in test_kvcache.py: needles at the first and last offloaded
    positions of the first step after the prompt (and two inside), many more offloaded tokens than top-k."""
    from test_kvcache import plant_needles, selected_positions
    H, n_kv, hd, sink, recent, topk = 6, 2, 64, 4, 8, 4
    needles = [sink, 50, 51, prompt - recent]
    q, k, v = (x.to(device) for x in plant_needles(H, n_kv, hd, prompt + 1, needles))
    cfg = CacheConfig("sparse", sink=sink, recent=recent, budget=sink + recent + topk, select=select)
    layer = SparseLayer(n_kv, hd, prompt + 1, cfg, topk, device, torch.float32, "cpu", kernels=True)
    layer.load(k[:, :, :prompt], v[:, :, :prompt], 0)
    layer.step(q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], torch.tensor(prompt, device=device))
    layer.advance(prompt + 1)
    assert selected_positions(layer) == [needles] * n_kv


@pytest.mark.parametrize("device", DEVICES)
def test_window_step_equals_the_reference_decode(device):
    H, n_kv, hd = 4, 1, 64
    cfg = CacheConfig("streaming", sink=3, recent=10)
    ref = SparseLayer(n_kv, hd, 100, cfg, 0, device, torch.float32, "cpu")
    ker = SparseLayer(n_kv, hd, 100, cfg, 0, device, torch.float32, "cpu", kernels=True)
    k, v = rand(1, n_kv, 60, hd, seed=7, device=device), rand(1, n_kv, 60, hd, seed=8, device=device)
    ref.load(k[:, :, :2], v[:, :, :2], 0)
    ker.load(k[:, :, :2], v[:, :, :2], 0)
    for t in range(2, 60):                                # through the sinks, then around the ring
        q = rand(1, H, 1, hd, seed=t, device=device)
        a = ref.decode(q, k[:, :, t:t + 1], v[:, :, t:t + 1], t)
        b = ker.step(q, k[:, :, t:t + 1], v[:, :, t:t + 1], torch.tensor(t, device=device))
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), t


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_attend_across_its_splits_equals_attention_over_the_live_rows(device):
    """124 rows (sinks, retrieved, window) split 64 at a time, the last split partial, some retrieved rows empty
    (-inf): the same as attention over the rows that hold a token."""
    n_kv, G, hd, sink, topk, recent = 2, 3, 64, 4, 100, 20
    k, v = rand(n_kv, sink + topk + recent, hd, seed=30), rand(n_kv, sink + topk + recent, hd, seed=31)
    vals = rand(n_kv, topk, seed=32)
    vals[0, 70:], vals[1, ::3] = float("-inf"), float("-inf")
    q = rand(n_kv * G, hd, seed=33)
    got = K.sparse_attend(q.to(device), k.to(device), v.to(device), vals.to(device), torch.tensor(999, device=device),
                          sink, topk, recent).cpu()
    for h in range(n_kv):
        live = torch.cat([torch.ones(sink, dtype=torch.bool), vals[h] > float("-inf"), torch.ones(recent, dtype=torch.bool)])
        ref = attention(q[h * G:(h + 1) * G][None, :, None], k[h][live][None, None], v[h][live][None, None])
        assert torch.allclose(got[h * G:(h + 1) * G], ref[0, :, 0], atol=1e-5, rtol=1e-5), h


@pytest.mark.parametrize("device", DEVICES)
def test_topk_into_rows_fetches_only_new_rows_and_attends_as_a_full_gather_bit_for_bit(device):
    """topk into a sparse layer's rows over steps whose top-k shares some positions with the step before (in
    another order, some chosen scores -inf: nothing chosen there): the rows hold exactly the chosen positions, each its exact host row, only those not held
    before cross (the fetch list), the rest of a row that holds nothing is zeros on the first step; attention
    over them equals attention over the same rows gathered whole, bit for bit. k = 100 crosses the plan's
    blocks of slots."""
    cap, n_kv, hd, k, sink, recent, G = 400, 3, 64, 100, 4, 8, 2
    host_k, host_v = rand(cap, n_kv, hd, seed=11), rand(cap, n_kv, hd, seed=12)
    if device == "cuda":
        host_k, host_v = host_k.pin_memory(), host_v.pin_memory()
    gen = torch.Generator().manual_seed(5)
    att = torch.zeros(2, n_kv, sink + k + recent, hd, device=device)
    att[:, :, :sink], att[:, :, sink + k:] = rand(2, n_kv, sink, hd, seed=13), rand(2, n_kv, recent, hd, seed=14)
    whole = att.clone()
    slots = K.Slots(host_k, host_v, att[0, :, sink:sink + k], att[1, :, sink:sink + k], torch.float32)
    work = K.Candidates(n_kv, cap, device, torch.float32)
    held = [set() for _ in range(n_kv)]
    idx = torch.stack([torch.randperm(cap - 20, generator=gen)[:k] + 10 for _ in range(n_kv)])
    for step in range(6):
        rows = []
        for r in idx:                                   # ~70% of last step's positions again, the rest new
            kept = r[torch.rand(k, generator=gen) < 0.7].tolist()
            fresh = [x for x in (torch.randperm(cap - 20, generator=gen) + 10).tolist() if x not in set(kept)]
            rows.append(torch.tensor(kept + fresh[:k - len(kept)])[torch.randperm(k, generator=gen)])
        idx = torch.stack(rows)
        vals = torch.randn(n_kv, k, generator=gen)
        vals[step % n_kv, step * 7:] = float("-inf")                        # fewer chosen on one head
        chosen = [set(r[v > float("-inf")].tolist()) for r, v in zip(idx, vals)]
        x = torch.full((n_kv, cap), float("-inf")).scatter(1, idx, vals)   # scores whose top-k is idx
        got_vals, got_pos = K.topk(x.to(device), k, slots.pos, work, rows=slots, BJ=16)
        pos, gv = got_pos.cpu(), got_vals.cpu()
        for h in range(n_kv):
            live = gv[h] > float("-inf")
            assert set(pos[h][live].tolist()) == chosen[h] and (pos[h][~live] == -1).all(), (step, h)
            by_pos = dict(zip(idx[h].tolist(), vals[h].tolist()))
            assert [by_pos[p] for p in pos[h][live].tolist()] == gv[h][live].tolist(), (step, h)
            n = int(slots.count[h])
            assert sorted(slots.fetch[h, :n].tolist()) == sorted(chosen[h] - held[h]), (step, h)   # only the new
            rows = pos[h][live]
            assert torch.equal(att[0, h, sink:][:k][live.to(device)].cpu(), host_k[rows, h])
            assert torch.equal(att[1, h, sink:][:k][live.to(device)].cpu(), host_v[rows, h])
            held[h] = chosen[h]
        heads, live = torch.arange(n_kv)[:, None], (got_vals > float("-inf"))[..., None]
        for i, host in enumerate((host_k, host_v)):   # the same rows gathered whole (SparseLayer._gather's way)
            whole[i, :, sink:sink + k] = torch.where(live, host[got_pos.cpu().clamp(min=0), heads].to(device), 0.0)
        q = rand(n_kv * G, hd, seed=20 + step, device=device)
        p = torch.tensor(cap - 1, device=device)
        assert torch.equal(K.sparse_attend(q, att[0], att[1], got_vals, p, sink, k, recent),
                           K.sparse_attend(q, whole[0], whole[1], got_vals, p, sink, k, recent)), step


TINY = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=256, head_dim=64,
                 max_seq_len=2048, rope_theta=10000.0)


def tiny_model(device, dtype=torch.float32):
    torch.manual_seed(0)
    m = Transformer(TINY)
    for p in m.parameters():
        p.data.normal_(0, 0.3 if p.dim() > 1 else 1.0)
    return m.to(device, dtype).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [CacheConfig("full"), CacheConfig("kivi", bits=2, residual=64),
                                 CacheConfig("tailor", quant_layers=(0,), bits=1, sink=4, recent=12,
                                             layer_topk=(1, 8, 56, 32)),  # each offloaded layer its own top-k
                                 CacheConfig("sparse", budget=48, sink=4, recent=12, select="channels"),
                                 CacheConfig("tailor", quant_layers=(0,), budget=48, sink=4, recent=12,
                                             select="sketch-heads"),
                                 CacheConfig("streaming", sink=4, recent=12)],
                         ids=lambda c: c.policy + "-" + c.select + ("-split" if c.layer_topk else ""))
def test_model_decode_on_the_kernel_path_equals_the_reference(device, cfg):
    from generate import Decoder
    model = tiny_model(device)
    prompt = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(1)).to(device)
    caches = [KVCache(model, 230, cfg, device=device, kernels=kern) for kern in (False, True)]
    decoders = [Decoder(model, c, cuda_graph=False) for c in caches]
    # Both paths compute in fp32 (the kernels' dots in IEEE precision, not TF32) and differ only in the order
    # of their sums: split-K attention and its combine, blocked dots, the fused norms and RoPE. That moves
    # each op's result by ~sqrt(n) * 2^-24 relative (n <= 256 terms); through 4 layers with weights of std 0.3
    # the logits move by 1e-5 of the largest one (full, sparse, streaming) and, where a quantized store's
    # code sits on a rounding edge and flips by one step, by up to 8e-5 (kivi). 2e-4 leaves 2.5x room; a
    # wrong scale, index or mask moves them by 1e-2 and more.
    with torch.inference_mode():
        logits = [model.prefill(prompt, c, chunk_size=64)[0] for c in caches]
        # the quantized stores and the sketch take a group at 128 tokens; the per-head sketch is slow to interpret
        for pos in range(120, 132 if cfg.select == "sketch-heads" and device == "cpu" else 160):
            err = (logits[0] - logits[1]).abs().max().item()
            assert err <= 2e-4 * logits[0].abs().max().item(), (pos, err)
            tok = int(logits[0].argmax())
            logits = [d.step(tok, pos).clone() for d in decoders]
    a, b = (c.memory_report() for c in caches)
    assert a["h2d_bytes_per_step"] == b["h2d_bytes_per_step"]
    assert a["device_bytes"] <= b["device_bytes"] <= 1.1 * a["device_bytes"]  # the kernels' sketch: whole 8-group blocks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["tailor"] + (["kivi", "sparse-heads", "streaming"] if torch.cuda.is_available() else []))
def test_a_rolled_back_cache_reads_a_question_as_a_fresh_one_on_the_kernel_path(device, policy):
    """test_kvcache's rollback on the kernels (in a CUDA graph on CUDA): the quantized layer's ring and the sketch's
    take a group at 160, the windows wrap, and the offloaded layers retrieve rows of the first question (from
    159 on), which they must forget with it; tailor's layers are all three kinds (the interpreter is slow)."""
    from test_kvcache import ROLLBACK, read_after_rollback
    got, fresh = read_after_rollback(tiny_model(device), ROLLBACK[policy], device, kernels=True, first=12, second=4)
    assert torch.equal(got, fresh)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.py)")


@pytest.mark.gpu
@needs_cuda
def test_prompt_streams_to_pinned_host_memory_during_prefill():
    """On CUDA a sparse layer's prompt K/V go to pinned host memory chunk by chunk on a copy stream:
    after the prefill the host store holds exactly the keys and values a full cache holds."""
    model = tiny_model("cuda", torch.bfloat16)
    prompt = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(4)).cuda()
    full = KVCache(model, 300, device="cuda", dtype=torch.bfloat16)
    cache = KVCache(model, 300, CacheConfig("tailor", quant_layers=(0,), budget=48, sink=4, recent=12), device="cuda",
                    dtype=torch.bfloat16, kernels=True)
    assert cache.copy_stream is not None
    with torch.inference_mode():
        model.prefill(prompt, full, chunk_size=64)
        model.prefill(prompt, cache, chunk_size=64)
    torch.cuda.synchronize()
    for ref, layer in zip(full.layers[1:], cache.layers[1:]):
        assert layer.kind == "sparse" and layer.host_k.is_pinned() and layer.host_v.is_pinned()
        assert torch.equal(layer.host_k[:300], ref.k[0].transpose(0, 1).cpu())
        assert torch.equal(layer.host_v[:300], ref.v[0].transpose(0, 1).cpu())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("select", ["sketch", "channels", "sketch-heads"])
def test_half_precision_scores_retrieve_the_needles(select):
    """A bf16 cache scores in an fp16 buffer (KVCache does this for half-precision models): the needles at
    the edges of the offloaded range still win."""
    from test_kvcache import plant_needles, selected_positions
    H, n_kv, hd, sink, recent, topk, prompt = 6, 2, 64, 4, 8, 4, 600
    needles = [sink, 300, 301, prompt - recent]
    q, k, v = (x.cuda().bfloat16() for x in plant_needles(H, n_kv, hd, prompt + 1, needles))
    cfg = CacheConfig("sparse", sink=sink, recent=recent, budget=sink + recent + topk, select=select)
    layer = SparseLayer(n_kv, hd, prompt + 1, cfg, topk, "cuda", torch.bfloat16, "cpu", kernels=True)
    assert layer.shared["scores"].dtype == torch.float16  # half-precision scores for a half-precision model
    layer.load(k[:, :, :prompt], v[:, :, :prompt], 0)
    layer.step(q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], torch.tensor(prompt, device="cuda"))
    torch.cuda.synchronize()
    assert selected_positions(layer) == [needles] * n_kv


def traced_decode(model, device, dtype, kernels, cuda_graph, steps=20):
    """Prefill 150 tokens into a tailor cache, then decode `steps` fixed tokens recording the retrievals."""
    from generate import Decoder
    from trace_page import TraceRecorder
    cfg = CacheConfig("tailor", quant_layers=(0,), budget=48, sink=4, recent=12)
    cache = KVCache(model, 150 + steps, cfg, device=device, dtype=dtype, kernels=kernels)
    prompt = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(3)).to(device)
    tokens = torch.randint(0, 97, (steps,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.inference_mode():
        model.prefill(prompt, cache, chunk_size=64)
        trace = TraceRecorder.of(cache, 150, steps)
        dec = Decoder(model, cache, cuda_graph=cuda_graph)
        for i, tok in enumerate(tokens):
            dec.step(tok, 150 + i)
    return trace.positions.cpu().sort(-1).values  # the kernel path's top-k comes unsorted


@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_path_records_the_same_retrievals(device):
    model = tiny_model(device)
    ref = traced_decode(model, device, torch.float32, kernels=False, cuda_graph=False)
    got = traced_decode(model, device, torch.float32, kernels=True, cuda_graph=False)
    assert (ref[:, 1:] >= 0).all() and torch.equal(got, ref)


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_graph_records_its_retrievals_like_eager():
    model = tiny_model("cuda", torch.bfloat16)
    eager = traced_decode(model, "cuda", torch.bfloat16, kernels=True, cuda_graph=False)
    graph = traced_decode(model, "cuda", torch.bfloat16, kernels=True, cuda_graph=True)
    assert (eager[:, 1:] >= 0).all() and torch.equal(graph, eager)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("policy", ["full", "tailor", "kivi", "sparse", "streaming", "sparse/sketch-heads",
                                    "tailor+split", "tailor/sketch-heads"])
def test_cuda_graph_decode_equals_eager_token_for_token(policy):
    from generate import Decoder
    model = tiny_model("cuda", torch.bfloat16)
    policy, _, select = policy.partition("/")
    policy, split = policy.removesuffix("+split"), policy.endswith("+split")
    cfg = CacheConfig(policy, budget=48, sink=4, recent=12, **({"quant_layers": (0,)} if policy == "tailor" else {}),
                      **({"select": select} if select else {}), **({"layer_topk": (1, 8, 56, 32)} if split else {}))
    prompt = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(2)).cuda()
    runs = []
    for graph in (False, True):
        cache = KVCache(model, 300, cfg, device="cuda", dtype=torch.bfloat16, kernels=True)
        dec = Decoder(model, cache, cuda_graph=graph)
        with torch.inference_mode():
            logits, toks, outs = model.prefill(prompt, cache, chunk_size=64)[0], [], []
            for pos in range(150, 290):
                toks.append(int(logits.argmax()))
                logits = dec.step(toks[-1], pos).clone()
                outs.append(logits)
        runs.append((toks, torch.stack(outs)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])            # the same kernels, replayed: bit for bit


@pytest.mark.parametrize("device", DEVICES)
def test_fused_norm_rope_and_silu_equal_the_model_ops(device):
    import torch.nn.functional as F
    from model import RMSNorm, apply_rope
    for dtype in DTYPES:
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        x, h = rand(1, 1, 300, seed=1, device=device, dtype=dtype), rand(1, 1, 300, seed=2, device=device, dtype=dtype)
        norm = RMSNorm(300, 1e-5).to(device, dtype)
        norm.weight.data = rand(300, seed=3, device=device, dtype=dtype)
        s, y = K.add_rms_norm(x, h, norm.weight, 1e-5)
        assert torch.equal(s, x + h) and torch.allclose(y, norm(x + h), atol=tol, rtol=tol)
        s, y = K.add_rms_norm(None, h, norm.weight, 1e-5)
        assert torch.equal(s, h) and torch.allclose(y, norm(h), atol=tol, rtol=tol)
        H, n_kv, hd = 6, 2, 64
        q, k = rand(1, 1, H * hd, seed=4, device=device, dtype=dtype), rand(1, 1, n_kv * hd, seed=5, device=device, dtype=dtype)
        freqs = 1234.0 * torch.rand(1, hd // 2, generator=torch.Generator().manual_seed(6)).to(device)
        qr, kr = K.rope_qk(q, k, freqs.cos(), freqs.sin(), H, n_kv)
        ref_q = apply_rope(q.view(1, 1, H, hd).transpose(1, 2), freqs.cos(), freqs.sin())
        ref_k = apply_rope(k.view(1, 1, n_kv, hd).transpose(1, 2), freqs.cos(), freqs.sin())
        assert torch.allclose(qr, ref_q, atol=tol, rtol=tol) and torch.allclose(kr, ref_k, atol=tol, rtol=tol)
        g, u = rand(1, 1, 3000, seed=7, device=device, dtype=dtype), rand(1, 1, 3000, seed=8, device=device, dtype=dtype)
        assert torch.allclose(K.silu_mul(g, u), F.silu(g) * u, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["full", "tailor"])
def test_default_model_greedy_on_the_kernel_path_equals_the_pytorch_path(default_dir, policy):
    """End to end on the default model: the golden answer, token for token, on both paths."""
    from generate import generate
    from model import load_model
    from tokenizer import Tokenizer
    tok = Tokenizer(default_dir)
    model = load_model(default_dir, DEVICES[0], torch.float32)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    cfg = CacheConfig(policy, **({"quant_layers": (0,), "bits": 2, "budget": 24, "sink": 4, "recent": 8}
                                 if policy == "tailor" else {}))
    outs = []
    for kernels in (False, True):
        cache = KVCache(model, len(ids) + 10, cfg, device=DEVICES[0], kernels=kernels)
        out, _ = generate(model, cache, ids, max_new_tokens=10, stop_ids=set(tok.eos_ids))
        outs.append(out)
    assert outs[0] == outs[1]
    if policy == "full":
        assert tok.decode(outs[1], skip_special_tokens=True) == "The capital of France is Paris."
