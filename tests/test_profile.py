"""profile_layers.py: the proxy on known attention, the direct measure, plan files, online identification."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import layer_plans as lp
import profile_layers as pl
from kvcache import CacheConfig, KVCache
from layer_plans import ProxyMeter
from model import ModelArgs, Transformer


def test_proxy_on_known_attention():
    H, n_kv, hd, S, n = 4, 2, 64, 400, 32
    meter = ProxyMeter(2, H, alpha=0.05, n_queries=n)
    k = torch.randn(1, n_kv, S, hd)
    # layer 0: every query scores every key alike -> uniform attention, 95% of it outside the top 5%
    meter.observe(0, torch.zeros(1, H, 50, hd), k)
    # layer 1: each query sees one key far above the rest -> one-hot attention, nothing outside
    q = torch.zeros(1, H, 50, hd)
    q[..., 0] = 1.0
    k1 = k.clone()
    k1[..., 0] = 0
    k1[:, :, 10, 0] = 1000.0
    meter.observe(1, q, k1)
    uniform, onehot = meter.layer_scores().tolist()
    expect = sum(1 - torch.ceil(torch.tensor(0.05 * (p + 1))).item() / (p + 1) for p in range(S - n, S)) / n
    assert uniform == pytest.approx(expect, abs=1e-6) and uniform > 0.9
    assert onehot < 1e-6
    tau = CacheConfig().tau
    assert (uniform > tau, onehot > tau) == (True, False)  # quantize the first, offload the second


def brute_tails(q, k, sink, recent, grid, n):
    """TailMeter by loops: per query and KV head, the group's attention, what is offloaded, its top-k."""
    H, S, n_kv = q.shape[1], k.shape[2], k.shape[1]
    G, total = H // n_kv, torch.zeros(len(grid), dtype=torch.float64)
    for p in range(S - n, S):
        for h in range(n_kv):
            w = torch.stack([(q[0, h * G + g, p - S + q.shape[2]] @ k[0, h, :p + 1].T / 8).softmax(-1) for g in range(G)]).mean(0)
            off = w[sink:max(sink, p + 1 - recent)].double().sort(descending=True).values
            for j, kk in enumerate(grid):
                total[j] += off[kk:].sum()
    return total / (n * n_kv)


def test_tail_meter_equals_the_loops_and_falls_with_k():
    H, n_kv, hd, S = 4, 2, 64, 70
    cfg = CacheConfig("sparse", sink=4, recent=8, budget=4 + 8 + 16)
    meter = pl.TailMeter(1, cfg, n_queries=10)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, H, 30, hd, generator=g), torch.randn(1, n_kv, S, hd, generator=g) * 2
    meter.observe(0, q, k)
    tails = meter.tails()[0]
    assert meter.grid == list(range(0, 65, 8))
    torch.testing.assert_close(tails, brute_tails(q, k, 4, 8, meter.grid, 10), atol=1e-6, rtol=0)
    assert tails[0] > 0.5 and (tails[:-1] >= tails[1:]).all() and tails[-1] < 1e-6  # 64 cover the <= 58 offloaded


def test_split_is_the_best_allocation_of_the_total():
    import itertools
    g = torch.Generator().manual_seed(1)
    # 4 layers, falling convex tails (sorted weights' remainders), random costs; topk 32 -> 8 each + 12 steps of 8
    tails = [(torch.rand(16, generator=g) ** 3).sort(descending=True).values for _ in range(4)]
    tails = [(t.sum() - torch.cat([torch.zeros(1), t.cumsum(0)])).tolist() for t in tails]
    weights = torch.rand(4, generator=g).tolist()
    got = pl.allocate_topk(tails, weights, topk=32)
    assert sum(got) == 4 * 32 and min(got) >= 8 and all(k % 8 == 0 for k in got)
    cost = lambda ks: sum(w * t[k // 8] for t, w, k in zip(tails, weights, ks))  # noqa: E731
    best = min(cost([8 + 8 * a for a in c]) for c in itertools.product(range(13), repeat=4) if sum(c) == 12)
    assert cost(got) == pytest.approx(best) and cost(got) < cost([32] * 4)
    floored = pl.allocate_topk(tails, weights, topk=32, floor=24)
    assert sum(floored) == 4 * 32 and min(floored) == 24 and cost(got) <= cost(floored) <= cost([32] * 4)


def test_a_plans_split_scales_to_any_budget():
    plan = {"layers": [{"topk": 0}, {"topk": 64}, {"topk": 192}, {"topk": 128}]}
    assert lp.split_topk(plan, 128) == (128, 64, 192, 128)   # layer 0 is quantized: its entry is not read
    assert lp.split_topk(plan, 64) == (64, 32, 96, 64)
    assert lp.split_topk({"layers": [{"topk": 0}, {}]}, 128) == ()


def test_spearman():
    assert pl.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pl.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def tiny():
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=128,
                                 vocab_size=97, max_seq_len=1024)).eval()


def test_direct_measure_sees_lossless_and_lossy_variants():
    model = tiny()
    docs = [torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    room = pl.measure_direct(model, docs, CacheConfig("tailor", sink=4, recent=8, budget=1024), heldout=20, chunk=64)
    assert all(r["kl_sparse"] < 1e-9 and r["top1_sparse"] == 1.0 for r in room)  # everything fits: exact
    assert all(r["kl_quant1"] > r["kl_quant2"] > 0 for r in room)                  # 1 bit hurts more than 2
    tight = pl.measure_direct(model, docs, CacheConfig("tailor", sink=2, recent=4, budget=8), heldout=20, chunk=64)
    assert all(t["kl_sparse"] > 0 for t in tight)


def test_plan_round_trips_and_is_refused_for_another_model(tmp_path):
    model = tiny()
    heads = torch.rand(3, 4)
    cfg = CacheConfig("tailor", bits=1)
    direct = [{"kl_quant1": 0.01 * (i + 1), "kl_quant2": 0.001, "kl_sparse": 0.02, "top1_quant1": 0.9,
               "top1_quant2": 0.95, "top1_sparse": 0.9} for i in range(3)]
    src = tmp_path / "calib.txt"
    tails = torch.linspace(1, 0, 65)[None] ** 2 * torch.tensor([[0.5], [0.4], [0.1]])  # a layer's tail per 8 tokens
    plan = pl.make_plan(model, tmp_path, [src], [[1] * 10], cfg, "direct", heads, tails, direct, 2048, 64)
    assert plan["quant_layers"] == [0] and [r["decision"] for r in plan["layers"]] == ["quant", "sparse", "sparse"]
    split = [r["topk"] for r in plan["layers"]]  # same KL per layer, layer 1's tail 4x layer 2's: same weighted tail
    assert split[0] == 0 and sum(split) == 2 * cfg.topk and split[1] == split[2]
    two_bit = pl.redecide(plan, CacheConfig("tailor", bits=2), "direct")  # 2-bit KL 0.001 < sparse 0.02 everywhere
    assert two_bit["quant_layers"] == [0, 1, 2] and two_bit["parameters"]["bits"] == 2
    with pytest.raises(ValueError, match="no direct measurement at 4 bits"):
        pl.redecide(plan, CacheConfig("tailor", bits=4), "direct")
    path = tmp_path / "plans" / "tiny.json"
    lp.save_plan(plan, path)
    assert lp.load_plan(path, model) == json.loads(json.dumps(plan))
    assert lp.find_plan(model, path.parent) == path
    other = tiny()
    with torch.no_grad():
        other.layers[1].attn.wq.weight.mul_(1.01)
    assert lp.find_plan(other, path.parent) is None
    with pytest.raises(ValueError, match="was made for .* not for the loaded model"):
        lp.load_plan(path, other)
    pl.plot(plan, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_a_plan_holds_for_the_same_weights_with_yarn():
    """--rope-scaling yarn stretches the positions, not where each layer's attention goes: the model's plan
    (made at its native context) is still found and accepted; other RoPE changes are another model."""
    d = pl.resolve_model(None)
    shipped = lp.find_plan(pl.load_model(d))
    yarn = pl.load_model(d, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert shipped is not None and lp.find_plan(yarn) == shipped and lp.load_plan(shipped, yarn)
    assert lp.fingerprint(yarn) != lp.fingerprint(pl.load_model(d))
    llama3 = pl.load_model(d, rope_scaling={"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": 2048})
    assert lp.find_plan(llama3) is None


def test_fingerprint_ignores_dtype():
    model = tiny()
    assert lp.fingerprint(model) == lp.fingerprint(tiny().to(torch.bfloat16))


def test_the_shipped_plan_is_found_in_every_dtype(default_dir, default_model):
    """fp32 -> fp16 rounds some weights across a bf16 step where fp32 -> bf16 does not: the fingerprint reads
    the weights as stored, so the shipped plan is found for a float16 model too (not decided online)."""
    shipped = lp.find_plan(default_model)
    for dtype in (torch.float16, torch.bfloat16):
        model = pl.load_model(default_dir, "cpu", dtype)
        assert lp.fingerprint(model) == lp.fingerprint(default_model) and lp.find_plan(model) == shipped, dtype


def test_model_name():
    from pathlib import Path
    assert lp.model_name(Path("/c/hub/models--meta-llama--Llama-3.1-8B/snapshots/abc")) == "Llama-3.1-8B"
    assert lp.model_name(Path("/c/tailorkv/SmolLM2-135M-Instruct.Q4_1-026282014e0f")) == "SmolLM2-135M-Instruct.Q4_1"
    assert lp.model_name(Path("/models/my-llama")) == "my-llama"


def test_online_equals_offline_proxy_and_shipped_plan(default_dir, default_model, capsys):
    """Online identification computes the same proxy as profile_layers.py on the same text; on
    another document its decisions may differ only for layers near the threshold."""
    from tokenizer import Tokenizer
    tok = Tokenizer(default_dir)
    results = {}
    for path in pl.DEFAULT_CALIB + [ROOT / "examples" / "lighthouse.txt"]:
        doc = tok.encode(path.read_text(), add_special_tokens=False)[:2048]
        cache = KVCache(default_model, len(doc) + 1, CacheConfig("tailor"))
        default_model.prefill(torch.tensor([doc]), cache, chunk_size=512)
        offline = pl.measure_proxy(default_model, [doc], CacheConfig("tailor"), chunk=512)[0].mean(1)
        torch.testing.assert_close(torch.tensor(cache.decisions()["proxy"]), offline.float(), atol=1e-4, rtol=0)
        results[path.name] = cache.decisions()
    shipped = lp.load_plan(lp.find_plan(default_model), default_model)
    tau = shipped["parameters"]["tau"]
    with capsys.disabled():
        print(f"\nshipped plan ({shipped['parameters']['method']}): quantize {shipped['quant_layers']}")
        for name, d in results.items():
            print(f"  online on {name:<20} quantize {d['quant_layers']}  proxy of layers 0-3: {d['proxy'][:4]}")
    for d in results.values():  # every layer far from the threshold is decided the same way as the shipped proxy
        for layer, (x, row) in enumerate(zip(d["proxy"], shipped["layers"])):
            if abs(row["proxy"] - tau) > 0.05 and abs(x - tau) > 0.05:
                assert (x > tau) == (row["proxy"] > tau), (layer, x, row["proxy"])


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_generate_uses_the_shipped_plan_and_refuses_a_foreign_one(tmp_path):
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    shipped = lp.find_plan(pl.load_model(pl.resolve_model(None)))
    bits = json.loads(shipped.read_text())["parameters"]["bits"]
    assert f"layer plan {shipped}: quantize layers" in r.stderr and f"to {bits} bits" in r.stderr
    assert "top-128 by sketch" in r.stderr and "split" not in r.stderr                # an even top-k by default
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--max-new-tokens", "4", "--bits", "4",
            "--topk-split", "plan")
    split = lp.split_topk(json.loads(shipped.read_text()), CacheConfig().topk)
    assert r.returncode == 0 and "running them at --bits 4" in r.stderr and "top-k split by the plan" in r.stderr
    assert f"top-{min(split[1:])}..{max(split)} (split by layer" in r.stderr
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--select", "exact-heads")  # research/ only
    assert r.returncode == 2 and "invalid choice: 'exact-heads'" in r.stderr
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--quant-layers", "0", "--topk-split", "plan")
    assert r.returncode == 2 and "drop --quant-layers or the split" in r.stderr
    unsplit = json.loads(shipped.read_text())
    for row in unsplit["layers"]:
        row.pop("topk")
    (tmp_path / "unsplit.json").write_text(json.dumps(unsplit))
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--plan", str(tmp_path / "unsplit.json"),
            "--topk-split", "plan")
    assert r.returncode == 2 and "has no top-k split" in r.stderr
    foreign = json.loads(shipped.read_text())
    foreign["model"] = {"name": "some-other-model", "fingerprint": "0123456789abcdef"}
    (tmp_path / "other.json").write_text(json.dumps(foreign))
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--plan", str(tmp_path / "other.json"))
    assert r.returncode == 2 and "was made for 'some-other-model'" in r.stderr
    r = cli("--prompt", "Name a colour.", "--cache", "kivi", "--plan", str(tmp_path / "other.json"))
    assert r.returncode == 2 and "--plan applies to --cache tailor, not kivi" in r.stderr
    bad = json.loads(shipped.read_text())
    bad["quant_layers"] = [0, 99]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--plan", str(tmp_path / "bad.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"plan {tmp_path / 'bad.json'}: field 'quant_layers' names layers [99]" in r.stderr
    assert "--quant-layers" not in r.stderr                   # the user did not pass it: the plan is to blame


@pytest.mark.parametrize("content,message", [
    ('{"model": "SmolLM2", "parameters": {"bits": 2}, "layers": [], "quant_layers": []}', "field 'model' must be"),
    ('[1, 2, 3]', "expected a JSON object, found a list"),
    ('{"model": {"fingerprint": "x"}, "parameters": {"bits": 3}}', "field 'parameters' must be an object whose 'bits'"),
    ('{"model": {"fingerprint": "x"}, "parameters": {"bits": 2}, "layers": 5}', "field 'layers' must be a list"),
    ('{"model": {"fingerprint": "x"}, "parameters": {"bits": 2}, "layers": [], "quant_layers": ["0"]}',
     "field 'quant_layers' must be a list of layer numbers"),
    ('{"model": {"fingerprint": "x", "name": "unterminated', "is not valid JSON"),
])
def test_malformed_plans_are_refused_naming_the_file_and_field(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"plan {path}"):
        lp.load_plan(path, tiny())
    with pytest.raises(ValueError, match=re.escape(message)):
        lp.load_plan(path, tiny())
    assert lp.find_plan(tiny(), tmp_path) is None  # passed over while looking for a model's plan


@pytest.mark.parametrize("args,message", [
    (["--bits", "3"], "--bits: bits must be one of (1, 2, 4, 8), got 3"),
    (["--budget", "10"], "--budget: budget 10 leaves no room for retrieved tokens"),
    (["--max-tokens", "-5"], "--max-tokens: must be a positive integer, got -5"),
    (["--max-tokens", "0"], "--max-tokens: must be a positive integer, got 0"),
    (["--alpha", "2"], "--alpha must be in (0, 1)"),
    (["--device", "tpu"], "--device tpu: must be cpu, cuda or cuda:N"),
    (["--calib", "/no/such.txt"], "calibration files not found: /no/such.txt"),
    (["--from-plan", "/no/such.json"], "--from-plan /no/such.json: no such file"),
    (["--from-plan", "/tmp"], "--from-plan /tmp: is a directory"),
    (["--out", "/no/such/folder/p.json"], "--out /no/such/folder/p.json: folder /no/such/folder does not exist"),
    (["--out", str(ROOT / "examples" / "calibration" / "harbour_notes.txt"), "--calib",
      str(ROOT / "examples" / "calibration" / "harbour_notes.txt")], "is the --calib file: writing it would destroy it"),
    (["--model", "/no/such/model"], "no such file or directory"),
])
def test_profile_layers_refuses_in_one_line_before_measuring(args, message):
    """Every bad argument of profile_layers.py: exit 2, one line naming the flag, no traceback, nothing measured."""
    r = subprocess.run([sys.executable, str(ROOT / "profile_layers.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)  # a refusal comes at once: one that measured first would time out
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "proxy:" not in r.stderr  # no measuring started
