"""research/kvcomp.py: the error-bounded quantizer keeps its bound (random and real tensors, constant blocks,
outliers), eps = 1/6 is KIVI's 2-bit grid, and the coders count what they claim; the store keeps its
bound, is append-only and counts its bytes; the fused kernel equals attention over the decompressed store;
kvcomp layers decode alike on both paths; the CLI and the config refuse bad bounds."""
import math

import pytest
import torch

import kvcache
from quant import quantize
from research import kvcomp


def test_every_value_is_within_its_bound_and_kivi_2_is_eps_one_sixth():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g) * 5
    x[3] = 1.25                       # a constant block: step 0, exact
    x[5, 7] = 400.0                   # an outlier: its block's range, and bound, grow with it
    for eps in (0.5, 1 / 6, 0.1, 0.01):
        codes, mn, step = kvcomp.quantize_eb(x, eps)
        err = (kvcomp.dequantize(codes, mn, step) - x).abs()
        R = x.amax(-1) - x.amin(-1)
        assert (err <= eps * R[:, None] * (1 + 1e-5) + 1e-6).all() and (err[3] == 0).all()
        assert int(codes.max()) <= round(1 / (2 * eps))
    codes, _, _ = kvcomp.quantize_eb(x, 1 / 6)
    kivi, _, _ = quantize(x, 2, torch.float32)
    assert (codes == kivi.long()).float().mean() > 0.999  # the same grid (ties may round apart)
    k = torch.randn(2, 96, 64, generator=g)  # a channel's range as the bound
    ref = (k[0].amax(0) - k[0].amin(0)).repeat_interleave(3)
    b = kvcomp.blocks(k[0], 32, per_channel=True)
    codes, mn, step = kvcomp.quantize_eb(b, 0.1, ref)
    assert ((kvcomp.dequantize(codes, mn, step) - b).abs() <= 0.1 * ref[:, None] + 1e-6).all()
    r = kvcomp.measure(k, per_channel=True, eps=0.1, mode="channel")
    assert r["worst_error_over_bound"] <= 1 + 1e-5 and r["values"] == 2 * 96 * 64


def test_the_coders_count_bits_as_claimed():
    assert kvcomp.huffman_lengths([5, 0, 1, 1, 2]) == [1, 0, 3, 3, 2]  # a Huffman code of these counts
    assert kvcomp.huffman_lengths([0, 7]) == [0, 1]
    codes = torch.tensor([0, 1, 2, 3] * 256)
    assert kvcomp.entropy_bits(codes) == 2 * 1024 and kvcomp.huffman_bits(codes) == 2 * 1024 + 4 * 4
    assert kvcomp.for_bits(torch.full((64,), 3), code_bits=2) == 2 * (2 + 3)  # constant: no code bits
    c = torch.arange(32).repeat(2)
    assert kvcomp.for_bits(c, code_bits=5) == 2 * (32 * math.ceil(math.log2(32)) + 5 + 3)


# ------------------------------------------------------------------------------ the store (second stage)

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]  # on CPU under TRITON_INTERPRET=1 (conftest.py)


def store_pair(n_kv, hd, max_len, eps, bits_cap=None, residual=128, device="cpu"):
    kw = dict(eps=eps, group=64, residual=residual, device=device, dtype=torch.float32, bits_cap=bits_cap)
    return (kvcomp.KVCompStore(n_kv, hd, max_len, per_channel=True, **kw),
            kvcomp.KVCompStore(n_kv, hd, max_len, per_channel=False, **kw))


def odd_tensor(n_kv, T, hd, seed):
    """Channels of different scales and offsets, a constant block, a constant channel, an outlier after the prompt."""
    g = torch.Generator().manual_seed(seed)
    scale, offset = torch.rand(1, 1, hd, generator=g) * 3, torch.randn(1, 1, hd, generator=g)
    x = torch.randn(n_kv, T, hd, generator=g) * scale + offset
    x[0, 64:128, 5] = 2.0
    x[:, :, 9] = -0.75
    x[-1, T - 50, 7] = 80.0
    return x


def grid_bound(x, eps, n_first):
    """eps times each channel's range over the first tokens compressed (a constant channel: the head's mean)."""
    R = x[:, :n_first].amax(1) - x[:, :n_first].amin(1)
    return eps * torch.where(R > 0, R, R.mean(1, keepdim=True))


def test_store_keeps_every_value_within_its_bound_random_and_real(default_model, default_dir):
    from accuracy import Prefilled, load_documents
    from tokenizer import Tokenizer
    x = odd_tensor(2, 700, 128, 0)
    real = Prefilled(default_model, load_documents(Tokenizer(default_dir), ["prose"])["prose"][:600])
    tensors = [(x, x)] + [(real.keys[i][0], real.values[i][0]) for i in (0, 15)]
    for eps in (0.5, 1 / 6, 0.05, 0.01):
        for k, v in tensors:
            stores = store_pair(k.shape[0], k.shape[2], 900, eps)
            for s, t in zip(stores, (k, v)):
                s.append(t[:, :400])                # the prompt: the grids come from its 320 compressed tokens
                for i in range(400, t.shape[1]):   # then token by token
                    s.append(t[:, i:i + 1])
                assert s.n_q == s.quantized(t.shape[1]) and s.length == t.shape[1]
                err = (s.dequantize() - t).abs()
                assert (err <= grid_bound(t, eps, 320)[:, None] * (1 + 1e-5) + 1e-6).all(), (eps, float(err.max()))
                assert (err[:, s.n_q:] == 0).all()  # the ring is exact
    k = x
    s = store_pair(2, 128, 900, 0.05)[0]
    s.append(k)
    meta = s.meta[:, :s.n_q // 64]
    width = meta & (2 ** kvcomp.META_W - 1)
    assert int(width[0, 1, 5]) == 0 and (width[:, :, 9] == 0).all()  # constant blocks take no bits
    assert s.used == int(width.sum()) * 64 // 32                       # the pool holds exactly the planes


def test_store_is_append_only_and_counts_its_real_bytes():
    x = odd_tensor(2, 900, 64, 1)
    for s in store_pair(2, 64, 1000, 0.1):
        s.append(x[:, :300])
        before = [t.clone() for t in s.tensors()[:3]]
        for i in range(300, 900, 7):
            s.append(x[:, i:i + 7])
            assert all(torch.equal(b, t[..., :b.shape[-1]] if t.dim() == 1 else t[:, :b.shape[1]])
                       for b, t in zip(before, s.tensors()[:3]))  # what was compressed is never touched again
        words, meta, offset = s.tensors()[:3]
        assert words.numel() == s.used and meta.shape[1] == offset.shape[1] == s.n_q // 64
        n_values = s.n_q * 2 * 64
        bits = 32 * (s.used + meta.numel() + offset.numel()) / n_values
        assert 1 < bits < 8  # a few bits per value, metadata included
    k, v = store_pair(1, 64, 200, 0.1, bits_cap=1)  # the kernel path's pool is fixed: it refuses to overflow
    with pytest.raises(RuntimeError, match="pool full"):
        k.append(torch.randn(1, 200, 64) * 100)
    for bad in (float("nan"), 1e12):  # what no block's table can say is refused, not stored wrong
        k = store_pair(1, 64, 300, 0.1, residual=64)[0]
        k.append(torch.randn(1, 200, 64))
        y = torch.randn(1, 64, 64)
        y[0, 3, 4] = bad
        with pytest.raises(ValueError, match="not finite or lies beyond"):
            k.append(y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hd,n_kv,H", [(64, 2, 6), (128, 1, 2)])  # one or two value blocks per token
def test_kvcomp_attend_equals_attention_over_the_decompressed_store(device, hd, n_kv, H):
    """The fused kernel reads the bit planes inside attention; across group and ring edges it equals attention
    over what the store decompresses."""
    from model import attention
    from research.kernels import kvcomp_attend, kvcomp_plan
    x, y = (t.to(device) for t in (odd_tensor(n_kv, 600, hd, 2), odd_tensor(n_kv, 600, hd, 3).flip(1)))
    keys, values = store_pair(n_kv, hd, 900, 0.1, bits_cap=8, device=device)
    keys.append(x[:, :440])
    values.append(y[:, :440])
    split, ws = kvcomp_plan(keys, H, device)
    g = torch.Generator().manual_seed(4)
    for pos in range(440, 451):  # 447 -> 448: a group leaves the ring
        q = torch.randn(H, hd, generator=g).to(device)
        out = kvcomp_attend(q, x[:, pos], y[:, pos], keys, values, torch.tensor(pos, device=device), ws, split)
        keys.length = values.length = pos + 1
        if pos in (440, 446, 447, 448, 450):
            ref = attention(q[None, :, None], keys.dequantize()[None], values.dequantize()[None])[0, :, 0]
            assert (out - ref).abs().max() < 1e-5, pos
        keys.advance(pos + 1)
        values.advance(pos + 1)
    assert keys.n_q == 384


@pytest.mark.parametrize("device", DEVICES)
def test_kvcomp_layers_decode_on_both_paths_and_refuse_bad_bounds(device):
    """The PyTorch path and the kernels (on CUDA in a CUDA graph) decode alike through a group's compression."""
    from generate import Decoder
    from kvcache import CacheConfig, ConfigError, KVCache
    from test_kernels import tiny_model
    model = tiny_model(device)
    prompt = torch.randint(0, 97, (1, 186), generator=torch.Generator().manual_seed(1)).to(device)
    for cfg in (CacheConfig("kivi", residual=64, quantizer=kvcomp.quantizer(0.02)),
                CacheConfig("tailor", quant_layers=(0, 2), budget=48, sink=4, recent=12, residual=64,
                            quantizer=kvcomp.quantizer(0.1))):
        caches = [KVCache(model, 200, cfg, device=device, kernels=kern) for kern in (False, True)]
        assert all(isinstance(layer, kvcomp.KVCompLayer) for c in caches for layer in c.layers
                   if layer is not None and layer.kind == "quant")
        decoders = [Decoder(model, c, cuda_graph=kern and device == "cuda") for c, kern in zip(caches, (False, True))]
        full = KVCache(model, 200, device=device)
        with torch.inference_mode():
            logits = [model.prefill(prompt, c, chunk_size=64)[0] for c in caches + [full]]
            for pos in range(186, 195):  # crosses 192, where a group is compressed
                assert (logits[0] - logits[1]).abs().max() <= 2e-4 * logits[0].abs().max(), pos
                tok = int(logits[2].argmax())
                logits = [d.step(tok, pos).clone() for d in decoders] + [model(torch.tensor([[tok]], device=device),
                                                                               full, pos)[0, -1]]
        a, b = (c.memory_report()["by_kind"]["quant"]["device_bytes"] for c in caches)
        kivi_8 = KVCache(model, 200, CacheConfig("kivi", bits=8), device=device).memory_report()["device_bytes"]
        assert a == b < 0.5 * kivi_8
    for bad in (0.0, 0.7, float("nan"), "0.1"):
        with pytest.raises(ConfigError, match=r"error bound in \(0, 0.5\]"):
            kvcomp.quantizer(bad)
    with pytest.raises(ConfigError, match="quantizer"):
        CacheConfig("kivi", quantizer="huffman")
    cfg = CacheConfig("tailor", quantizer=kvcomp.quantizer(0.05))
    assert cfg.quantizer == "kvcomp:0.05"
    assert kvcache.QUANTIZERS[cfg.quantizer].describe(cfg) == "kvcomp, error bound 0.05 of each channel's range"
