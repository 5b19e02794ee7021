"""kvcache.py: quantization, every layer strategy against exact attention, boundaries, telemetry."""
import math
from dataclasses import replace

import pytest
import torch
from conftest import ROOT

import research  # noqa: F401  (registers the research selectors, measured here too)
from inputs import plan_memory
from kvcache import (CacheConfig, ConfigError, KVCache, PrefillStage, QuantLayer, Selector, SparseLayer, attention, nbytes)
from model import ModelArgs, Transformer
from quant import QuantStore, pack, quantize, unpack


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GQA_SHAPES = [(4, 4, 64), (9, 3, 64), (8, 2, 128), (8, 1, 128)]  # (heads, kv heads, head_dim): ratios 1, 3, 4, 8


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_round_trips(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 128), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 5, 128 * bits // 32)
    assert torch.equal(unpack(words, bits), codes)
    if bits == 1:  # LSB first: code i of a word is bit i
        assert pack(torch.tensor([[1] + [0] * 31], dtype=torch.uint8), 1).item() == 1


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_error_within_half_step(bits):
    x = rand(4, 6, 64, seed=bits) * torch.linspace(0.1, 10, 64)  # groups of very different ranges
    x[0, 0] = 3.25  # a constant group: max == min must not divide by zero
    codes, scale, mn = quantize(x, bits, torch.float32)
    assert codes.max() <= 2 ** bits - 1 and torch.isfinite(scale).all()
    err = (codes.float() * scale[..., None] + mn[..., None] - x).abs()
    assert (err <= scale[..., None] / 2 + 1e-5).all()
    assert scale[0, 0] == 0 and err[0, 0].max() == 0


@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quant_store_flush_groups_and_residual(per_channel, bits):
    n_kv, hd, g, R = 2, 64, 64, 128
    x = rand(n_kv, 700, hd, seed=bits) * 3
    store = QuantStore(n_kv, hd, 700, bits=bits, group=g, residual=R, per_channel=per_channel, device="cpu",
                       dtype=torch.float32)
    frozen = None
    pos = 0
    for size in [1, 5, 63, 1, 64, 130, 1, 1, 200, 2, 232]:  # crosses group and residual edges, sums to 700
        store.append(x[:, pos:pos + size])
        pos += size
        assert store.n_q % g == 0 and len(store) == pos
        assert (store.n_r < R) and (pos < R or store.n_r >= R - g)  # R-g .. R-1 newest tokens stay exact
        assert torch.equal(store.res[:, store._slots(store.n_q, pos)], x[:, store.n_q:pos])  # the ring, oldest first
        deq = store.dequantize()
        if frozen is not None:  # tokens quantized earlier are never quantized again
            assert torch.equal(deq[:, :frozen.shape[1]], frozen)
        frozen = deq[:, :store.n_q]
    # per-group error bound with the stored scales
    n = store.n_q
    if per_channel:
        step = store.scale[:, :, :n // g].repeat_interleave(g, dim=2).transpose(1, 2)  # (n_kv, n, hd)
    else:
        step = store.scale[:, :n].repeat_interleave(g, dim=2)
    assert ((deq[:, :n] - x[:, :n]).abs() <= step / 2 + 1e-5).all()


# ------------------------------------------------------------------------ layers, exact attention

def run_layer(layer, q, k, v, prompt):
    """Prefill `prompt` positions, then decode the rest one by one; returns (1, H, N, hd) outputs."""
    stage = PrefillStage(k.shape[1], k.shape[3], k.shape[2], "cpu", k.dtype)
    outs = []
    if prompt > 1:  # what KVCache does: exact attention from the stage, then the layer takes the prompt
        outs.append(stage.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], 0))
        layer.load(k[:, :, :prompt], v[:, :, :prompt], 0)
    for t in range(prompt if prompt > 1 else 0, q.shape[2]):
        outs.append(layer.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t))
    return torch.cat(outs, dim=2)


def reference(q, k, v, keep):
    """Per position t, attention of q_t over the positions keep(t) returns (a list of indices)."""
    outs = []
    for t in range(q.shape[2]):
        idx = torch.tensor(sorted(keep(t)))
        outs.append(attention(q[:, :, t:t + 1], k[:, :, idx], v[:, :, idx]))
    return torch.cat(outs, dim=2)


def qkv(H, n_kv, hd, N, seed=0):
    return rand(1, H, N, hd, seed=seed), rand(1, n_kv, N, hd, seed=seed + 1), rand(1, n_kv, N, hd, seed=seed + 2)


@pytest.mark.parametrize("H,n_kv,hd", GQA_SHAPES)
@pytest.mark.parametrize("prompt", [2, 3, 20, 100])  # shorter than the sink (2: decoding inside it), than the
def test_window_layer_keeps_sinks_and_recent(H, n_kv, hd, prompt):  # budget, longer than both
    cfg = CacheConfig("streaming", sink=4, recent=16)
    q, k, v = qkv(H, n_kv, hd, prompt + 40)  # generation runs far past the window
    out = run_layer(SparseLayer(n_kv, hd, prompt + 40, cfg, 0, "cpu", torch.float32, "cpu"), q, k, v, prompt)

    def keep(t):
        return set(range(min(4, t + 1))) | set(range(max(4, t + 1 - 16), t + 1)) if t >= prompt else range(t + 1)
    torch.testing.assert_close(out, reference(q, k, v, keep), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("select", ["sketch", "channels", "sketch-heads", "exact", "exact-heads"])
@pytest.mark.parametrize("H,n_kv,hd", GQA_SHAPES)
def test_sparse_layer_with_room_for_everything_is_exact(select, H, n_kv, hd):
    N, prompt = 90, 30
    cfg = CacheConfig("sparse", sink=4, recent=8, budget=4 + 8 + N, select=select)
    q, k, v = qkv(H, n_kv, hd, N)
    out = run_layer(SparseLayer(n_kv, hd, N, cfg, cfg.topk, "cpu", torch.float32, "cpu"), q, k, v, prompt)
    torch.testing.assert_close(out, reference(q, k, v, lambda t: range(t + 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("select", ["sketch", "channels", "sketch-heads", "exact", "exact-heads"])
@pytest.mark.parametrize("H,n_kv,hd", GQA_SHAPES)
def test_sparse_layer_retrieves_the_dominant_tokens(select, H, n_kv, hd):
    """Plant k keys aligned with every query of a KV head: top-k must fetch exactly those."""
    N, prompt, topk = 300, 250, 6
    cfg = CacheConfig("sparse", sink=4, recent=8, budget=4 + 8 + topk, select=select, sketch_bits=2)
    q, k, v = qkv(H, n_kv, hd, N, seed=3)
    direction = rand(n_kv, hd, seed=9)
    G = H // n_kv
    q[0] = 0.3 * q[0] + direction.repeat_interleave(G, 0)[:, None, :]           # all queries share a direction
    needles = {h: sorted(torch.randperm(prompt - 20, generator=torch.Generator().manual_seed(h))[:topk] + 4)
               for h in range(n_kv)}
    for h, pos in needles.items():
        k[0, h, pos] = 4 * direction[h] + 0.1 * rand(topk, hd, seed=h)
    layer = SparseLayer(n_kv, hd, N, cfg, topk, "cpu", torch.float32, "cpu")
    out = run_layer(layer, q, k, v, prompt)
    for h in range(n_kv):  # the last step's selection, per KV head
        got = sorted(layer.host_k[:, h].eq(layer.sel_k[h].cpu()[:, None]).all(-1).nonzero()[:, 1].tolist())
        assert got == [int(p) for p in needles[h]], f"head {h}: fetched {got}, planted {needles[h]}"
    # and the decode outputs are attention over exactly sinks + needles + recent window, per KV head
    for h in range(n_kv):
        heads = slice(h * G, (h + 1) * G)
        ref = reference(q[:, heads, prompt:], k[:, h:h + 1], v[:, h:h + 1],
                        lambda t: set(range(4)) | set(needles[h]) | set(range(prompt + t + 1 - 8, prompt + t + 1)))
        torch.testing.assert_close(out[:, heads, prompt:], ref, rtol=1e-5, atol=1e-5)


def sketch_scores(layer, q, lo, hi):
    """The sketch selector's scores, recomputed: dequantized sketch keys [lo, hi) against each KV head's
    mean query. (n_kv, hi - lo)"""
    n_kv = layer.att_k.shape[0]
    qk = q.view(n_kv, -1, q.shape[-1]).float().mean(1)
    return torch.einsum("htd,hd->ht", layer.selector.store.dequantize()[:, lo:hi], qk)


def channel_scores(layer, q, keys, lo, hi):
    """The paper's selector, recomputed from every key seen so far (keys: (n_kv, n, hd)): the C channels with
    the largest |q_c| * max_t |K[t, c]| per KV head, then each offloaded token's partial dot product on them."""
    n_kv = layer.att_k.shape[0]
    qk = q.view(n_kv, -1, q.shape[-1]).float().mean(1)                               # (n_kv, hd)
    ch = (qk.abs() * keys.abs().amax(1)).topk(layer.selector.C, dim=-1).indices       # (n_kv, C)
    kc = keys[:, lo:hi].gather(2, ch[:, None, :].expand(-1, hi - lo, -1))           # (n_kv, n_off, C)
    return (kc * qk.gather(1, ch)[:, None, :]).sum(-1)


def headwise_scores(keys, q, lo, hi):
    """Each query head's softmax over keys [lo, hi) (n_kv, n, hd), the largest over the group's heads."""
    n_kv, hd = keys.shape[0], keys.shape[-1]
    s = torch.einsum("htd,hgd->htg", keys[:, lo:hi].float(), q.view(n_kv, -1, hd).float())
    return (s / hd ** 0.5).log_softmax(1).amax(-1)


@pytest.mark.parametrize("select", ["sketch", "channels", "sketch-heads", "exact", "exact-heads"])
def test_sparse_layer_attends_over_the_top_k_of_its_scores(select):
    """Budget far below the context, random data: every decode step attends over exactly the sinks, the
    recent window and the top-k of the selector's scores recomputed here over [sink, first recent)."""
    H, n_kv, hd, N, prompt, sink, recent, topk = 6, 2, 64, 260, 200, 4, 8, 10
    cfg = CacheConfig("sparse", sink=sink, recent=recent, budget=sink + recent + topk, select=select)
    q, k, v = qkv(H, n_kv, hd, N, seed=11)
    layer = SparseLayer(n_kv, hd, N, cfg, topk, "cpu", torch.float32, "cpu")
    stage = PrefillStage(n_kv, hd, N, "cpu", torch.float32)
    stage.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], 0)
    layer.load(k[:, :, :prompt], v[:, :, :prompt], 0)
    G = H // n_kv
    for t in range(prompt, N):
        out = layer.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], t)
        lo, hi = sink, t + 1 - recent                      # offloaded positions [lo, hi): always more than topk
        keys = layer.selector.store.dequantize() if select.startswith("sketch") else k[0, :, :t + 1]
        if select == "channels":
            scores = channel_scores(layer, q[0, :, t], k[0, :, :t + 1], lo, hi)
        elif select.endswith("heads"):
            scores = headwise_scores(keys, q[0, :, t], lo, hi)
        elif select == "sketch":
            scores = sketch_scores(layer, q[0, :, t], lo, hi)
        else:  # exact: the full-precision keys against the group's mean query
            scores = torch.einsum("htd,hd->ht", keys[:, lo:hi], q[0, :, t].view(n_kv, -1, hd).mean(1))
        top = scores.topk(topk, dim=-1).indices + lo
        for h in range(n_kv):
            keep = sorted(set(range(sink)) | set(top[h].tolist()) | set(range(hi, t + 1)))
            heads = slice(h * G, (h + 1) * G)
            ref = attention(q[:, heads, t:t + 1], k[:, h:h + 1, keep], v[:, h:h + 1, keep])
            torch.testing.assert_close(out[:, heads], ref, rtol=1e-5, atol=1e-5)


def plant_needles(H, n_kv, hd, N, needles, seed=3):
    """q, k, v where every query of a KV head points one way and the keys at `needles` point that way too."""
    q, k, v = qkv(H, n_kv, hd, N, seed=seed)
    direction = rand(n_kv, hd, seed=9)
    q[0] = 0.3 * q[0] + direction.repeat_interleave(H // n_kv, 0)[:, None, :]
    for h in range(n_kv):
        k[0, h, needles] = 4 * direction[h] + 0.1 * rand(len(needles), hd, seed=h)
    return q, k, v


def selected_positions(layer):
    """Per KV head, the sorted host positions whose rows sit in the layer's retrieved slots."""
    return [sorted(layer.host_k[:, h].eq(layer.sel_k[h].cpu()[:, None]).all(-1).nonzero()[:, 1].tolist())
            for h in range(layer.att_k.shape[0])]


@pytest.mark.parametrize("select", ["sketch", "channels", "sketch-heads", "exact", "exact-heads"])
@pytest.mark.parametrize("prompt", [135, 136])  # the last offloaded position quantized in the sketch, or exact
def test_needles_at_the_edges_of_the_offloaded_range_are_retrieved(select, prompt):
    """The first step after the prompt offloads [sink, prompt + 1 - recent); needles at its first and last
    positions (and two inside), many more offloaded tokens than top-k."""
    H, n_kv, hd, sink, recent, topk = 6, 2, 64, 4, 8, 4
    first, last = sink, prompt - recent
    needles = [first, 50, 51, last]
    q, k, v = plant_needles(H, n_kv, hd, prompt + 1, needles)
    cfg = CacheConfig("sparse", sink=sink, recent=recent, budget=sink + recent + topk, select=select)
    layer = SparseLayer(n_kv, hd, prompt + 1, cfg, topk, "cpu", torch.float32, "cpu")
    layer.load(k[:, :, :prompt], v[:, :, :prompt], 0)
    layer.decode(q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], prompt)
    assert selected_positions(layer) == [needles] * n_kv


@pytest.mark.parametrize("policy", ["full", "tailor", "kivi", "sparse", "streaming"])
@pytest.mark.parametrize("prompt", [65, 64, 129])  # chunk 32: one token past a chunk, whole chunks, 1 (mod 32)
def test_prompts_at_chunk_edges_equal_the_full_cache(policy, prompt):
    """Every policy, with room for every token, equals the full cache at prompt lengths where the last
    prefill chunk would hold one token (which a cache must not mistake for a decode step)."""
    model = tiny_model(8, 2, 64)
    tokens = torch.randint(0, 97, (1, prompt + 12), generator=torch.Generator().manual_seed(prompt)).cpu()
    n = tokens.shape[1]
    cfg = CacheConfig(policy, quant_layers=(0,), sink=4, recent=n if policy == "streaming" else 8, budget=4 + 8 + n,
                      residual=256)  # quant layers: the residual holds every token, so they are exact too
    ref = logits_through(model, KVCache(model, n), tokens, prompt)
    got = logits_through(model, KVCache(model, n, cfg), tokens, prompt)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("H,n_kv,hd", GQA_SHAPES)
def test_quant_layer_residual_only_is_exact_and_8bit_is_close(H, n_kv, hd):
    # prompt shorter than g and R, generation crossing R: exact until the first flush
    cfg = CacheConfig("kivi", bits=8, group=64, residual=128)
    q, k, v = qkv(H, n_kv, hd, 300, seed=5)
    out = run_layer(QuantLayer(n_kv, hd, 300, cfg, "cpu", torch.float32), q, k, v, prompt=10)
    ref = reference(q, k, v, lambda t: range(t + 1))
    torch.testing.assert_close(out[:, :, :127], ref[:, :, :127], rtol=1e-5, atol=1e-5)  # the 128th token flushes
    # 8 bits: keys and values each within range/510 per element; on unit-variance data that moves the
    # attention output by well under 2% of its scale
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.02 * ref.abs().max().item(), err


def half_steps(store: QuantStore) -> torch.Tensor:
    """Per stored element, the largest error quantization may leave: scale / 2 over its group, 0 in the
    full-precision residual. (n_kv, length, hd), oldest first, like store.dequantize()."""
    g, n = store.g, store.n_q
    if store.per_channel:
        step = store.scale[:, :, :n // g].float().repeat_interleave(g, dim=2).transpose(1, 2)  # (n_kv, n, hd)
    else:
        step = store.scale[:, :n].float().repeat_interleave(g, dim=2)                          # (n_kv, n, hd)
    res = torch.zeros(step.shape[0], store.length - n, step.shape[2])
    return torch.cat([step / 2, res], dim=1)


def on_grid(shape, bits, per_channel, g=64, seed=0):
    """Random data on 2^bits levels of step 1/2 over an offset per row (a channel of keys, a token of
    values), each quantization group holding its lowest and highest level: such data quantizes without
    error (keys per channel over g tokens, values per token over g channels). shape: (1, n_kv, N, hd)."""
    gen = torch.Generator().manual_seed(seed)
    L = 2 ** bits - 1
    codes = torch.randint(0, L + 1, shape, generator=gen).float()
    if per_channel:
        codes[:, :, ::g], codes[:, :, 1::g] = 0, L        # the first two tokens of every group
        offset = torch.randint(-8, 8, (*shape[:2], 1, shape[3]), generator=gen)
    else:
        codes[..., ::g], codes[..., 1::g] = 0, L
        offset = torch.randint(-8, 8, (*shape[:3], 1), generator=gen)
    return (offset + codes) / 2


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("lossy", ["values", "keys"])
def test_quant_layer_error_within_the_half_step_bound(bits, lossy):
    """Absolute bounds on the attention output from each element being within s/2 of its value.

    lossy values (keys on a grid, so exact): out_c moves by at most max_t dv[t, c], dv its s/2.
    lossy keys (values exact): a score moves by at most e = max_t sum_c |q_c| dk[t, c] / sqrt(hd), the
    softmax weights by at most min(2, e^(2e) - 1) in L1, so out_c by that times (max_t v - min_t v) / 2.
    """
    H, n_kv, hd, N, prompt = 8, 2, 64, 400, 300
    q, k, v = qkv(H, n_kv, hd, N, seed=6)
    if lossy == "values":
        k = on_grid(k.shape, bits, per_channel=True)
    else:
        v = on_grid(v.shape, bits, per_channel=False)
    layer = QuantLayer(n_kv, hd, N, CacheConfig("kivi", bits=bits), "cpu", torch.float32)
    out = run_layer(layer, q, k, v, prompt)
    ref = reference(q, k, v, lambda t: range(t + 1))
    exact = {"values": layer.keys, "keys": layer.values}[lossy]
    torch.testing.assert_close(exact.dequantize()[None], (k if lossy == "values" else v).float(), rtol=0, atol=0)
    dk, dv = half_steps(layer.keys), half_steps(layer.values)       # (n_kv, N, hd), final state
    G, worst = H // n_kv, 0.0
    for t in range(prompt, N):  # tokens quantized by step t are quantized, with the same scales, at the end
        n = t + 1
        for h in range(H):
            kv = h // G
            if lossy == "values":
                bound = dv[kv, :n].amax(0)
            else:
                eps = ((q[0, h, t].abs() * dk[kv, :n]).sum(-1).max() * hd ** -0.5).item()
                vv = v[0, kv, :n]
                bound = min(2.0, math.expm1(2 * eps)) * (vv.amax(0) - vv.amin(0)) / 2
            err = (out[0, h, t] - ref[0, h, t]).abs()
            assert (err <= bound + 1e-5).all(), (t, h, (err - bound).max().item())
            worst = max(worst, (err / bound).max().item())
    assert worst > 0.01, worst  # the layer did quantize, and the bound is not vacuous


# ------------------------------------------------------------------------------ the whole cache

def tiny_model(H, n_kv, hd, layers=3, seed=0, qkv_bias=False):
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=layers, n_heads=H, n_kv_heads=n_kv, head_dim=hd, ffn_dim=128,
                                 vocab_size=97, max_seq_len=4096, qkv_bias=qkv_bias)).eval()


def logits_through(model, cache, tokens, prompt, chunk=32):
    """Prefill tokens[:prompt] in chunks, then decode the rest teacher-forced; logits per decode step."""
    with torch.inference_mode():
        out = [model.prefill(tokens[:, :prompt], cache, chunk)]
        for t in range(prompt, tokens.shape[1] - 1):
            out.append(model(tokens[:, t:t + 1], cache, t)[:, -1])
    return torch.cat(out)


@pytest.mark.parametrize("H,n_kv,hd", GQA_SHAPES)
@pytest.mark.parametrize("cfg", [CacheConfig("sparse", sink=4, recent=8, budget=4096),
                                 CacheConfig("tailor", quant_layers=(), sink=4, recent=8, budget=4096, select="channels"),
                                 CacheConfig("sparse", sink=4, recent=8, budget=40, layer_topk=(200, 150, 4096)),
                                 CacheConfig("streaming", sink=4, recent=4096)], ids=["sparse-sketch", "sparse-channels",
                                                                                    "sparse-split", "streaming"])
@pytest.mark.parametrize("device", DEVICES)
def test_policies_with_room_for_everything_equal_full(H, n_kv, hd, cfg, device):
    model = tiny_model(H, n_kv, hd).to(device)
    tokens = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(1)).to(device)
    ref = logits_through(model, KVCache(model, 150, device=device), tokens, 70)
    got = logits_through(model, KVCache(model, 150, cfg, device=device), tokens, 70)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["tailor", "kivi", "sparse", "streaming"])
def test_policies_run_in_bf16(policy, device):
    """Every policy in bf16 on every device, against the fp32 full cache.

    bf16 keeps 8 significant bits (2^-9 relative rounding per operation); through these 3 layers the
    bf16 full cache's logits land within 0.5% of the largest fp32 logit. A policy that holds every token
    (quant layers: in their residual) must stay within 2% of it at every decode step, like the bf16 full
    cache; with a 40-token budget it must stay, on average, within 2% of the same policy in fp32."""
    m32 = tiny_model(8, 2, 128).to(device)
    model = tiny_model(8, 2, 128).to(device, torch.bfloat16)
    tokens = torch.randint(0, 97, (1, 300), generator=torch.Generator().manual_seed(3)).to(device)
    ref = logits_through(m32, KVCache(m32, 300, device=device), tokens, 250)
    scale = ref.abs().max()
    room = CacheConfig(policy, quant_layers=(0,), sink=4, recent=300 if policy == "streaming" else 8,
                       budget=4 + 8 + 300, residual=384)
    got = logits_through(model, KVCache(model, 300, room, device=device, dtype=torch.bfloat16), tokens, 250)
    assert (got.float() - ref).abs().max() <= 0.02 * scale
    cfg = CacheConfig(policy, sink=4, recent=8, budget=40, select="channels" if policy == "tailor" else "sketch")
    cache = KVCache(model, 300, cfg, device=device, dtype=torch.bfloat16)
    got = logits_through(model, cache, tokens, 250)
    full16 = logits_through(model, KVCache(model, 300, device=device, dtype=torch.bfloat16), tokens, 250)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], full16[0], rtol=0, atol=0)  # the prefill is exact in every policy
    same32 = logits_through(m32, KVCache(m32, 300, cfg, device=device), tokens, 250)
    assert (got.float() - same32).abs().mean() <= 0.02 * scale
    if device == "cuda" and policy in ("tailor", "sparse"):
        assert all(layer.host_k.is_pinned() for layer in cache.layers if layer.kind == "sparse")


def test_channel_selector_predicts_each_layers_query_from_the_layer_before():
    """Through a real prefill and decode: layer l's predicted query is W_q of layer l (with RoPE at the
    step's position) applied to the normalised input of layer l - 1, captured as the model ran; with
    q/k/v biases (Qwen2), so the prediction must go through the whole projection."""
    from model import apply_rope
    model = tiny_model(8, 2, 64, layers=4, qkv_bias=True)
    assert model.layers[1].attn.wq.bias.abs().min() > 0
    cache = KVCache(model, 64, CacheConfig("sparse", sink=2, recent=4, budget=10, select="channels"))
    normed = {}
    for i, block in enumerate(model.layers):
        block.attn_norm.register_forward_hook(lambda m, inp, out, i=i: normed.__setitem__(i, out))
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    logits_through(model, cache, tokens, 30)           # the last step decodes position 38
    cos, sin = model.rope(38, 1, "cpu")
    for layer in range(1, 4):
        with torch.inference_mode():
            q = model.layers[layer].attn.wq(normed[layer - 1]).view(1, 1, 8, 64).transpose(1, 2)
            torch.testing.assert_close(cache.layers[layer].selector.qhat, apply_rope(q, cos, sin)[0, :, 0])


def test_channel_selector_predicts_the_next_layers_query():
    model = tiny_model(8, 2, 64)
    cache = KVCache(model, 64, CacheConfig("sparse", sink=2, recent=4, budget=10, select="channels"))
    x = torch.randn(1, 1, 64)
    q_true = model.layers[2].attn.wq(x).view(1, 1, 8, 64).transpose(1, 2)
    cos, sin = model.rope(17, 1, "cpu")
    from model import apply_rope
    selector = cache.layers[2].selector
    selector.see_previous_input(x, 17)
    torch.testing.assert_close(selector.qhat, apply_rope(q_true, cos, sin)[0, :, 0])
    cache = KVCache(model, 64, CacheConfig("sparse", sink=2, recent=4, budget=10, select="channels"))
    tokens = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    logits_through(model, cache, tokens, 30)
    assert cache.layers[0].selector.qhat is None  # layer 0 has no predecessor: it selects with its own query
    assert all(layer.selector.qhat is not None for layer in cache.layers[1:])


def identity_prediction(H, hd):
    """A query projection and RoPE frequencies under which see_previous_input(x, pos) predicts x itself."""
    wq = torch.nn.Linear(H * hd, H * hd, bias=False)
    wq.weight.data = torch.eye(H * hd)
    return wq, torch.zeros(hd // 2)


def tensors_of(obj):
    """Every tensor reachable from a layer's attributes (one level into stores and selectors), for counting
    bytes; views (a sparse layer's sinks, retrieved rows and window inside one buffer) are counted once, as
    their base."""
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor) and value._base is None:
            yield value
        elif isinstance(value, (QuantStore, Selector)):
            yield from tensors_of(value)


@pytest.mark.parametrize("policy", ["full", "tailor", "kivi", "sparse", "streaming"])
def test_telemetry_counts_the_tensors_held(policy):
    model = tiny_model(8, 2, 64, layers=4)
    cfg = CacheConfig(policy, quant_layers=(0, 2), sink=4, recent=8, budget=20)
    cache = KVCache(model, 200, cfg)
    tokens = torch.randint(0, 97, (1, 120), generator=torch.Generator().manual_seed(2))
    logits_through(model, cache, tokens, 100)
    rep = cache.memory_report()
    host = [t for layer in cache.layers if getattr(layer, "host_k", None) is not None for t in (layer.host_k, layer.host_v)]
    selectors = [layer.selector for layer in cache.layers if getattr(layer, "selector", None) is not None]
    not_kv = [t for s in selectors for t in (getattr(s, "qhat", None), getattr(s, "wq", None), getattr(s, "inv_freq", None))
              if t is not None]  # a predicted query row, the model's own weights
    skip = {id(t) for t in host + not_kv}
    device = sum(t.numel() * t.element_size() for layer in cache.layers for t in tensors_of(layer) if id(t) not in skip)
    host = nbytes(host)
    assert rep["device_bytes"] == device and rep["host_bytes"] == host
    full = 4 * 2 * 2 * 200 * 64 * 4  # layers x K,V x kv heads x positions x head_dim x fp32
    assert rep["full_cache_bytes"] == full and rep["compression"] == pytest.approx(full / device)
    n_sparse = cache.kinds.count("sparse")
    # each of 19 decode steps gathers top-k (8) rows of K and V per KV head per sparse layer
    assert rep["h2d_bytes_per_step"] == n_sparse * 2 * 2 * 8 * 64 * 4
    assert plan_memory(model, 200, cfg) == {**rep, "by_kind": {k: {**r, "h2d_bytes_per_step": 0.0}
                                                                for k, r in rep["by_kind"].items()},
                                            "h2d_bytes_per_step": 0.0}


def test_a_split_budget_gives_each_layer_its_own_top_k():
    model = tiny_model(8, 2, 64, layers=4)
    even = CacheConfig("tailor", quant_layers=(0,), sink=4, recent=8, budget=44)               # top-32 each
    split = replace(even, layer_topk=(1, 8, 56, 32))                                           # the same 96 in all
    caches = [KVCache(model, 200, c) for c in (even, split)]
    assert [layer.att_k.shape[1] for layer in caches[1].layers[1:]] == [4 + 8 + 8, 4 + 56 + 8, 4 + 32 + 8]
    tokens = torch.randint(0, 97, (1, 150), generator=torch.Generator().manual_seed(2))
    for cache in caches:
        logits_through(model, cache, tokens, 120)
    a, b = (c.memory_report() for c in caches)
    assert a["device_bytes"] == b["device_bytes"] and a["h2d_bytes_per_step"] == b["h2d_bytes_per_step"]
    assert plan_memory(model, 200, split)["device_bytes"] == b["device_bytes"]
    with pytest.raises(ValueError, match="layer_topk names 3 layers; the model has 4"):
        KVCache(model, 200, replace(even, layer_topk=(8, 8, 8)))
    with pytest.raises(ValueError, match="top-k must be >= 1"):
        replace(even, layer_topk=(8, 0, 8, 8))


ROLLBACK = {"full": CacheConfig("full"),
            "kivi": CacheConfig("kivi", bits=2, group=32, residual=64),
            "tailor": CacheConfig("tailor", quant_layers=(0,), bits=1, group=32, residual=64, sink=4, recent=8, budget=40),
            "sparse": CacheConfig("sparse", sink=4, recent=8, budget=40, select="channels"),
            "sparse-heads": CacheConfig("sparse", sink=4, recent=8, budget=40, select="sketch-heads", group=32),
            "streaming": CacheConfig("streaming", sink=4, recent=8)}


def read_after_rollback(model, cfg, device="cpu", kernels=False, doc=150, first=80, second=60):
    """The logits of a second question read after a first one and a rollback to the document, and those of
    the same question read by a fresh cache over the same document (teacher-forced, one token a step)."""
    from generate import Decoder
    g = torch.Generator().manual_seed(4)
    tokens = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (doc, first, second)]

    def after_document():
        cache = KVCache(model, doc + first + second, cfg, device=device, kernels=kernels)
        model.prefill(torch.tensor([tokens[0]], device=device), cache, 32)
        return cache, Decoder(model, cache)

    def read(decoder, question):
        return torch.stack([decoder.step(t, doc + i).clone() for i, t in enumerate(question)])

    with torch.inference_mode():
        cache, decoder = after_document()
        snap = cache.snapshot()
        read(decoder, tokens[1])
        cache.restore(snap)
        assert cache.length == doc
        return read(decoder, tokens[2]), read(after_document()[1], tokens[2])


@pytest.mark.parametrize("policy", list(ROLLBACK))
def test_a_rolled_back_cache_reads_a_question_as_a_fresh_one_bit_for_bit(policy):
    """80 tokens after a 150-token document move every ring (the quantized stores take the document's last
    groups out of theirs, the windows wrap) and the channel maxima; restored, the cache reads another question
    exactly as a cache that never saw the first."""
    got, fresh = read_after_rollback(tiny_model(8, 2, 64), ROLLBACK[policy])
    assert torch.equal(got, fresh)


def test_a_saved_cache_loads_as_it_was_and_any_mismatch_is_refused(tmp_path):
    import cachefile
    from cachefile import CacheFileError
    model, cfg = tiny_model(8, 2, 64), ROLLBACK["tailor"]
    (tmp_path / "tokenizer.json").write_text("{}")
    doc = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(5)).tolist()
    facts = cachefile.facts(model, tmp_path, doc, cfg, torch.float32, "cpu")
    cache = KVCache(model, 200, cfg)
    with torch.inference_mode():
        model.prefill(torch.tensor([doc]), cache, 32)
    path = tmp_path / "doc.kv"
    assert cachefile.save(cache, path, facts) == path.stat().st_size and not list(tmp_path.glob(".*tmp"))
    header = cachefile.read_header(path)
    cachefile.check(header, facts, path)
    loaded = KVCache(model, 300, cfg)  # room for another question: a larger cache takes it
    cachefile.load(loaded, path, header)
    assert loaded.length == 150 and all(torch.equal(a, b) for a, b in zip(cache.state().values(), loaded.state().values()))
    from generate import Decoder
    with torch.inference_mode():  # and it reads a question as the cache it was saved from
        a, b = ([Decoder(model, c).step(t, 150 + i).clone() for i, t in enumerate(doc[:20])] for c in (cache, loaded))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for field, value, message in [("format", 0, "written in another format"), ("model", "x", "another model"),
                                  ("tokenizer", "x", "another tokenizer"), ("dtype", "bfloat16", "another dtype"),
                                  ("device", "cuda", "another kind of device"),
                                  ("document", {**facts["document"], "tokens": 151}, "holds another document"),
                                  ("cache", {**facts["cache"], "sink": 8}, "configuration: sink 4 in the file, 8 here")]:
        with pytest.raises(CacheFileError, match=message):
            cachefile.check(header, {**facts, field: value}, path)
    data = path.read_bytes()
    for name, damage in [("cut.kv", data[:-10]), ("flip.kv", data[:-3] + bytes([data[-3] ^ 4]) + data[-2:]),
                         ("text.kv", b"not a cache"), ("plain.kv", None)]:
        bad = tmp_path / name
        if damage is None:
            from safetensors.torch import save_file
            save_file({"x": torch.zeros(2)}, bad)
        else:
            bad.write_bytes(damage)
        with pytest.raises(CacheFileError, match="damaged|not a safetensors|not a saved KV cache"):
            cachefile.load(KVCache(model, 200, cfg), bad, cachefile.read_header(bad))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="budget 60 leaves no room"):
        CacheConfig("tailor", budget=60)
    with pytest.raises(ValueError, match="bits must be one of"):
        CacheConfig("kivi", bits=3)
    with pytest.raises(ValueError, match="multiple of group"):
        CacheConfig("kivi", residual=100)
    with pytest.raises(ValueError, match=r"quant_layers \[40\] out of range"):
        CacheConfig("tailor", quant_layers=(40,)).layer_kinds(30)
    with pytest.raises(ValueError, match="group 64 must divide head_dim 16"):
        KVCache(tiny_model(4, 4, 16), 10, CacheConfig("kivi"))
    with pytest.raises(ValueError, match="batch of 1"):
        KVCache(tiny_model(4, 4, 64), 10, CacheConfig("kivi"), batch=2)
    with pytest.raises(ConfigError, match="channels 65 exceeds the model's head_dim 64"):  # not silently C = 64
        KVCache(tiny_model(4, 4, 64), 10, CacheConfig("sparse", select="channels", channels=65))


def test_the_core_registers_the_method_and_research_the_rest():
    """kvcache alone holds the method's selectors; `import research` adds the ones kept for measurement, and
    the cache serves them through the Selector hooks alone (its source names none of them)."""
    import subprocess
    import sys
    code = "import kvcache; a = list(kvcache.SELECTORS); import research; print(a, list(kvcache.SELECTORS))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    core, everything = (eval(part + "]") for part in out.strip()[:-1].split("] "))
    assert core == ["sketch", "channels", "sketch-heads"]
    assert everything == core + ["exact", "exact-heads"]
    from research import selection
    core_source = "".join((ROOT / f).read_text() for f in ("kvcache.py", "generate.py", "kernels.py"))
    own = [name for name, obj in vars(selection).items() if getattr(obj, "__module__", None) == selection.__name__]
    assert "HeadwiseExactSelector" in own and not [name for name in own if name in core_source]


# ------------------------------------------------------------------------- default model, recall

def copy_recall(model, cfg, doc, n_copy):
    """Prefill doc, then decode teacher-forced through its first n_copy tokens again: top-1 accuracy and
    mean NLL of those tokens, and the cache's device bytes."""
    tokens, prompt = torch.tensor([doc + doc[:n_copy]]), len(doc)
    cache = KVCache(model, tokens.shape[1], cfg)
    logits = logits_through(model, cache, tokens, prompt, chunk=512)   # logits[j] predicts tokens[prompt + j]
    target = tokens[0, prompt:]
    lp = logits.float().log_softmax(-1)
    return {"top1": (lp.argmax(-1) == target).float().mean().item(),
            "nll": -lp.gather(1, target[:, None]).mean().item(), "device_kv_bytes": cache.memory_report()["device_bytes"]}


def test_document_repeat_on_the_default_model(default_dir, default_model, capsys):
    from tokenizer import Tokenizer
    doc = Tokenizer(default_dir).encode((ROOT / "examples" / "lighthouse.txt").read_text(), add_special_tokens=False)
    import layer_plans
    plan = layer_plans.load_plan(layer_plans.find_plan(default_model), default_model)  # as generate.py does
    tailor = CacheConfig("tailor", quant_layers=tuple(plan["quant_layers"]), bits=plan["parameters"]["bits"])
    results = {}
    for name, cfg in [("full", CacheConfig()), ("tailor", tailor),
                      ("sparse/sketch", CacheConfig("sparse")), ("sparse/channels", CacheConfig("sparse", select="channels")),
                      ("streaming", CacheConfig("streaming"))]:
        results[name] = copy_recall(default_model, cfg, doc[:1952], n_copy=96)
    with torch.inference_mode():  # reading the first 1024 tokens for the first time: one pass, every position's logits
        tokens = torch.tensor([doc[:1024]])
        lp = default_model(tokens, KVCache(default_model, 1024), 0, logits_at=slice(None))[0, :-1].log_softmax(-1)
        first = -lp.gather(1, tokens[0, 1:, None]).mean().item()
    with capsys.disabled():
        print(f"\ndocument repeat, 1952 + 96 tokens (first-pass NLL {first:.2f}); tailor quantizes "
              f"{tailor.quant_layers} to {tailor.bits} bits:")
        for name, r in results.items():
            print(f"  {name:<16} top-1 {r['top1']:.3f}  NLL {r['nll']:.3f}  device KV {r['device_kv_bytes'] / 2**20:6.2f} MiB")
    full, stream = results["full"], results["streaming"]
    assert full["top1"] > 0.85 and full["nll"] < 0.5 * first           # the model copies with a full cache
    assert stream["top1"] < full["top1"] - 0.3 and stream["nll"] > 0.5 * first  # a 64-token window cannot
    for name in ("tailor", "sparse/sketch", "sparse/channels"):
        r = results[name]
        assert r["top1"] > stream["top1"] + 0.3 and r["nll"] < stream["nll"] / 2, name
        assert r["device_kv_bytes"] < full["device_kv_bytes"] / 3, name


class RecentOnlySelector(Selector):
    """A fork's first selector, as a test fixture: rank the offloaded tokens by position, newest first.
    One class and one registry entry; the layer does the rest (top-k, gather, attention, telemetry)."""

    def scores(self, q, lo, hi):
        return torch.arange(lo, hi, device=q.device, dtype=torch.float32).expand(self.n_kv, hi - lo)


def test_a_new_selector_is_one_class_and_one_registry_entry(monkeypatch):
    import kvcache
    monkeypatch.setitem(kvcache.SELECTORS, "recent-only", RecentOnlySelector)
    H, n_kv, hd, N, prompt, sink, recent, topk = 6, 2, 64, 120, 100, 4, 8, 10
    cfg = CacheConfig("sparse", sink=sink, recent=recent, budget=sink + recent + topk, select="recent-only")
    q, k, v = qkv(H, n_kv, hd, N, seed=12)
    out = run_layer(SparseLayer(n_kv, hd, N, cfg, topk, "cpu", torch.float32, "cpu"), q, k, v, prompt)
    # the newest topk offloaded tokens just before the window: a window of topk + recent
    ref = reference(q, k, v, lambda t: set(range(sink)) | set(range(max(sink, t + 1 - recent - topk), t + 1))
                    if t >= prompt else range(t + 1))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    model = tiny_model(8, 2, 64)
    tokens = torch.randint(0, 97, (1, 80), generator=torch.Generator().manual_seed(5))
    cache = KVCache(model, 80, cfg)
    logits_through(model, cache, tokens, 60)
    assert cache.memory_report()["h2d_bytes_per_step"] == 3 * 2 * n_kv * topk * 64 * 4  # K, V rows per layer


def test_the_trace_records_what_each_offloaded_layer_retrieved(monkeypatch, tmp_path):
    """generate(record=True) keeps, per decode step and offloaded layer, exactly the positions the cache
    fetched (captured here from SparseLayer._select), and the --trace page holds them."""
    import json
    import re

    import generate
    import trace_page
    made = {}
    select = SparseLayer._select

    def spy(layer, q, n_off):
        idx = select(layer, q, n_off)
        made[(layer.index, layer.length - 1)] = idx.clone()
        return idx
    monkeypatch.setattr(SparseLayer, "_select", spy)
    model = tiny_model(8, 2, 64, layers=3)
    prompt = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(6)).tolist()
    cfg = CacheConfig("tailor", quant_layers=(0,), sink=4, recent=8, budget=4 + 8 + 6)
    cache = KVCache(model, 60 + 12, cfg)
    out, stats = generate.generate(model, cache, prompt, max_new_tokens=12, record=True)
    pos = stats["trace"].positions
    assert stats["steps"] == 11 and pos.shape == (12, 3, 2, 6)
    assert (pos[:, 0] == -1).all() and (pos[11:] == -1).all()   # the quantized layer, the unused last row
    assert len(made) == 2 * 11
    for (layer, p), idx in made.items():
        assert torch.equal(pos[p - 60, layer].long(), idx), (layer, p)
    page = tmp_path / "trace.html"
    page.write_text(trace_page.render(trace_page.page_data([str(t) for t in prompt], cache.kinds, cfg, pos,
                                                           stats["steps"], cache.memory_report(), "tiny")))
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page.read_text(),
                                re.S).group(1))
    assert [x["kind"] for x in data["layers"]] == ["quant", "sparse", "sparse"] and data["layers"][0]["counts"] is None
    for layer in (1, 2):
        expect = torch.bincount(torch.cat([idx.flatten() for (lay, _), idx in made.items() if lay == layer]),
                                minlength=60)[:60]  # the page shows the prompt
        assert data["layers"][layer]["counts"] == expect.tolist()


def test_headwise_ranking_keeps_a_key_that_one_head_of_the_group_wants():
    """One query head of each group points at the needles, the group's other heads away from them: the
    group's mean query does not see them, each head's own softmax does."""
    H, n_kv, hd, sink, recent, topk, prompt = 8, 2, 64, 4, 8, 4, 160
    G, needles = H // n_kv, [20, 70, 71, 140]
    q, k, v = qkv(H, n_kv, hd, prompt + 1, seed=5)
    d, r = rand(n_kv, hd, seed=6), rand(n_kv, hd, seed=7)
    r -= (r * d).sum(-1, keepdim=True) / (d * d).sum(-1, keepdim=True) * d  # r orthogonal to d
    for h in range(n_kv):  # head 0 of the group: 3d + r; the other three: -d + r; their mean: r
        q[0, h * G:(h + 1) * G, prompt] = torch.stack([3 * d[h]] + [-d[h]] * (G - 1)) + r[h]
        k[0, h, needles] = 4 * d[h] + 0.1 * rand(len(needles), hd, seed=h)
    got = {}
    for select in ("exact", "exact-heads", "sketch", "sketch-heads"):  # the sketch at 8 bits: close to the keys
        cfg = CacheConfig("sparse", sink=sink, recent=recent, budget=sink + recent + topk, select=select,
                          sketch_bits=8)
        layer = SparseLayer(n_kv, hd, prompt + 1, cfg, topk, "cpu", torch.float32, "cpu")
        layer.load(k[:, :, :prompt], v[:, :, :prompt], 0)
        layer.decode(q[:, :, prompt:], k[:, :, prompt:], v[:, :, prompt:], prompt)
        got[select] = selected_positions(layer)
    assert got["exact-heads"] == got["sketch-heads"] == [needles] * n_kv
    assert all(set(heads) != set(needles) for heads in got["exact"] + got["sketch"])


def test_a_selector_without_a_kernel_path_is_refused_on_the_kernels():
    model = tiny_model(8, 2, 64)
    with pytest.raises(ConfigError, match="'exact' selector has no kernel path"):
        KVCache(model, 64, CacheConfig("sparse", select="exact"), kernels=True)
    KVCache(model, 64, CacheConfig("streaming", select="exact"), kernels=True)  # selects nothing: fine


@pytest.mark.parametrize("select", ["sketch", "sketch-heads"])
def test_a_sketch_that_cannot_pack_the_head_is_refused(select):
    model = tiny_model(4, 2, 24)  # 24 channels: not a multiple of the 16 a 2-bit int32 holds
    with pytest.raises(ConfigError, match="2-bit sketch packs 16 channels per int32, which does not divide head_dim 24"):
        KVCache(model, 64, CacheConfig("sparse", select=select, sketch_bits=2))
    KVCache(model, 64, CacheConfig("sparse", select="exact"))  # keeps no sketch
