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
from kvcache import CacheConfig, KVCache, ProxyMeter
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
    plan = pl.make_plan(model, tmp_path, [src], [[1] * 10], cfg, "direct", heads, direct, 2048, 64)
    assert plan["quant_layers"] == [0] and [r["decision"] for r in plan["layers"]] == ["quant", "sparse", "sparse"]
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


def test_fingerprint_ignores_dtype():
    model = tiny()
    assert lp.fingerprint(model) == lp.fingerprint(tiny().to(torch.bfloat16))


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
        offline = pl.measure_proxy(default_model, [doc], CacheConfig("tailor"), chunk=512).mean(1)
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
    r = cli("--prompt", "Name a colour.", "--cache", "tailor", "--max-new-tokens", "4", "--bits", "4")
    assert r.returncode == 0 and "running them at --bits 4" in r.stderr
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
