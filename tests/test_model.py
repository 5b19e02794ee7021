"""model.py against HF transformers (test-only oracle), chunked prefill and decode consistency."""
import json

import pytest
import torch
from conftest import ROOT, TINY_LLAMA31, TINY_MISTRAL, TINY_QWEN2, write_hf_model

from kvcache import KVCache
from model import ModelArgs, load_model

# fp32 on both sides. The two implementations order reductions differently (SDPA kernels, RoPE
# in fp32 vs the input dtype), which moves logits by 4e-7 (tiny models) to 1.5e-6 (default model)
# of the largest logit. 1e-4 of it leaves room for other CPUs' kernels and still fails on any real
# bug: a wrong RoPE base moved them by 8e-3, a wrong RoPE pairing or norm by far more.
RTOL = 1e-4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the same tests run on a GPU machine


def new_cache(model, max_len):
    w = model.embed.weight
    return KVCache(model, max_len, device=w.device, dtype=w.dtype)


def full_logits(model, tokens):
    """Logits at every position from one forward pass over `tokens` (1, T)."""
    with torch.inference_mode():
        return model(tokens.to(model.embed.weight.device), new_cache(model, tokens.shape[1]), 0,
                     logits_at=slice(None))[0].cpu()


def hf_logits(model_dir, tokens):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return hf(tokens).logits[0].float()


def assert_close(ours, ref):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= RTOL * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


def test_default_model_matches_transformers(default_dir, default_model):
    tokens = torch.randint(0, default_model.args.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    assert_close(full_logits(default_model, tokens), hf_logits(default_dir, tokens))


def to_v4_layout(path):
    """Rewrite a transformers-5 config.json (rope_parameters) the way 4.x checkpoints on the hub store it."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config,v4", [(TINY_LLAMA31, False), (TINY_LLAMA31, True), (TINY_MISTRAL, False),
                                       (TINY_QWEN2, False)],
                         ids=["llama3.1-gqa4", "llama3.1-gqa4-v4-config", "mistral", "qwen2"])
def test_tiny_models_match_transformers(tmp_path, config, v4, device):
    path = write_hf_model(tmp_path, config, seed=1)
    if v4:
        to_v4_layout(path)
    model = load_model(path, device)
    assert model.args.rope_theta == config["rope_theta"] and (model.args.rope_scaling is None) == ("rope_scaling" not in config)
    # positions beyond original_max_position_embeddings exercise the llama3 frequency scaling
    tokens = torch.randint(0, config["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(1))
    assert_close(full_logits(model, tokens), hf_logits(path, tokens))
    if config is TINY_QWEN2:  # its q/k/v biases are loaded (write_hf_model set them away from zero)
        assert model.layers[1].attn.wk.bias is not None and model.layers[1].attn.wk.bias.abs().min() > 0


TINY_QWEN2_YARN = {  # a prompt of 200 tokens runs past the 64 positions it was "trained" on
    **TINY_QWEN2, "rope_theta": 10000.0, "max_position_embeddings": 64,  # the YaRN ramp spans dims 0..5 of 16
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}
TINY_QWEN2_YARN_TUNED = {  # transformers 5's spelling, every knob set
    **TINY_QWEN2_YARN, "rope_scaling": None,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 3.0, "original_max_position_embeddings": 64,
                        "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.9, "mscale_all_dim": 0.7}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [TINY_QWEN2_YARN, TINY_QWEN2_YARN_TUNED], ids=["yarn-v4-config", "yarn-knobs"])
def test_yarn_matches_transformers(tmp_path, config, device):
    """YaRN (frequencies mixed per dimension, cos/sin scaled) equals transformers' past the original
    context; the same weights with plain RoPE do not, by far (the test can fail)."""
    path = write_hf_model(tmp_path, config, seed=1)
    model = load_model(path, device)
    assert model.args.rope_scaling["rope_type"] == "yarn" and model.rope_scale != 1.0
    assert model.args.max_seq_len == int(model.args.rope_scaling["factor"] * 64)
    tokens = torch.randint(0, config["vocab_size"], (1, 200), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(path, tokens)
    assert_close(full_logits(model, tokens), ref)
    plain = load_model(path, device, rope_scaling={"rope_type": "default"})
    assert plain.args.rope_scaling is None and plain.rope_scale == 1.0
    assert (full_logits(plain, tokens) - ref).abs().max() > 100 * RTOL * ref.abs().max()


def test_rope_scaling_given_at_load_equals_the_config(tmp_path):
    """load_model(..., rope_scaling=...) (what --rope-scaling yarn --rope-scale 4 does) builds the model
    a config with that scaling builds, from either config spelling."""
    plain = write_hf_model(tmp_path / "plain", {**TINY_QWEN2_YARN, "rope_scaling": None}, seed=1)
    yarn = write_hf_model(tmp_path / "yarn", TINY_QWEN2_YARN, seed=1)
    tokens = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(2))
    given = load_model(plain, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert given.args.rope_scaling == load_model(yarn).args.rope_scaling
    torch.testing.assert_close(full_logits(given, tokens), full_logits(load_model(yarn), tokens), rtol=0, atol=0)
    to_v4_layout(plain)
    assert load_model(plain, rope_scaling={"rope_type": "yarn", "factor": 4.0}).args == given.args


@pytest.mark.parametrize("cache,kernels", [("full", False), ("sparse", False), ("full", True)],
                         ids=["full", "sparse", "full-kernels-on-cuda-or-interpreter"])
def test_yarn_greedy_ids_match_transformers(tmp_path, cache, kernels):
    """Greedy decoding of a YaRN Qwen2 past its original context: our ids equal HF's through the full
    and the offloaded cache (every token retrieved), on the PyTorch path and on the kernels' (the Triton
    RoPE, in the interpreter on a CPU)."""
    import transformers

    from generate import generate
    from kvcache import CacheConfig
    path = write_hf_model(tmp_path, TINY_QWEN2_YARN, seed=3)
    model = load_model(path, DEVICES[-1] if kernels else "cpu")  # the kernels on a GPU where there is one
    prompt = torch.randint(3, 300, (1, 120), generator=torch.Generator().manual_seed(4))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 120:]
    kv = KVCache(model, 132, CacheConfig(cache, budget=512, sink=4, recent=8), device=model.embed.weight.device,
                 kernels=kernels)
    ours, _ = generate(model, kv, prompt[0].tolist(), max_new_tokens=12)
    assert ours == theirs.tolist()


@pytest.mark.parametrize("cache", ["full", "sparse"])
def test_qwen2_greedy_ids_match_transformers(tmp_path, cache):
    """Greedy decoding through our cache (prefill, then one token at a time) picks the ids HF's generate
    picks; the offloaded cache retrieves every token here (budget above the length), so it agrees too."""
    import transformers

    from generate import generate
    from kvcache import CacheConfig
    path = write_hf_model(tmp_path, TINY_QWEN2, seed=3)
    model = load_model(path)
    prompt = torch.randint(3, 300, (1, 150), generator=torch.Generator().manual_seed(4))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 150:]
    cfg = CacheConfig(cache, budget=512, sink=4, recent=8)
    kv = KVCache(model, 170, cfg)
    ours, _ = generate(model, kv, prompt[0].tolist(), max_new_tokens=20)
    assert ours == theirs.tolist()


def test_sharded_checkpoint_loads(tmp_path, tiny_llama_dir):
    sharded = write_hf_model(tmp_path, TINY_LLAMA31, seed=0, max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    tokens = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(full_logits(load_model(sharded), tokens),
                               full_logits(load_model(tiny_llama_dir), tokens), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_equals_one_pass(default_dir, device):
    model = load_model(default_dir, device)
    tokens = torch.randint(0, model.args.vocab_size, (1, 250), generator=torch.Generator().manual_seed(3)).to(device)
    chunked = new_cache(model, 250)
    last = model.prefill(tokens, chunked, chunk_size=64)  # 4 chunks, the last one partial
    ref = full_logits(model, tokens)[-1]
    torch.testing.assert_close(last[0].cpu(), ref, rtol=1e-4, atol=1e-4)
    one = new_cache(model, 250)
    model.prefill(tokens, one, chunk_size=250)
    for a, b in zip(chunked.layers, one.layers):
        torch.testing.assert_close(a.k, b.k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.v, b.v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_after_prefill_equals_full_forward(tiny_llama_dir, device, dtype):
    model = load_model(tiny_llama_dir, device, dtype)
    tokens = torch.randint(0, model.args.vocab_size, (1, 120), generator=torch.Generator().manual_seed(4))
    ref = full_logits(model, tokens)
    cache = new_cache(model, 120)
    tokens = tokens.to(device)
    logits = [model.prefill(tokens[:, :100], cache, chunk_size=32)[0]]
    with torch.inference_mode():
        for t in range(100, 119):
            logits.append(model(tokens[:, t:t + 1], cache, t)[0, -1])
    # bf16: the two paths round differently (SDPA kernel vs the decode matmul) at ~2^-8 relative
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(torch.stack(logits).cpu(), ref[99:119], rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_tracks_fp32(tiny_llama_dir, device):
    tokens = torch.randint(0, 300, (1, 80), generator=torch.Generator().manual_seed(5))
    ref = full_logits(load_model(tiny_llama_dir, device), tokens)
    low = full_logits(load_model(tiny_llama_dir, device, torch.bfloat16), tokens)
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"bf16 logits differ from fp32 by {rel:.3g} (relative L2)"


def test_cache_overflow_is_refused(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    cache = KVCache(model, 8)
    with pytest.raises(RuntimeError, match="KV cache full"):
        model.prefill(torch.zeros(1, 9, dtype=torch.long), cache)


def test_config_errors():
    base = dict(TINY_LLAMA31)
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'.*Qwen2ForCausalLM"):
        ModelArgs.from_hf_config({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="attention_bias"):
        ModelArgs.from_hf_config({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="sliding-window"):
        ModelArgs.from_hf_config({**TINY_QWEN2, "use_sliding_window": True})
    with pytest.raises(ValueError, match="rope_scaling type 'longrope'"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    for bad, message in (({"factor": -4.0}, "factor must be a positive number, got -4.0"),
                         ({"factor": "4"}, "factor must be a positive number"),
                         ({"factor": 4.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings"),
                         ({"factor": 4.0, "extrapolation_factor": 2.0}, "yarn with extrapolation_factor"),
                         ({"factor": 4.0, "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5")):
        with pytest.raises(ValueError, match=message):
            ModelArgs.from_hf_config({**TINY_QWEN2, "rope_scaling": {"type": "yarn", **bad}})
    with pytest.raises(ValueError, match="sliding-window"):
        ModelArgs.from_hf_config({**TINY_MISTRAL, "sliding_window": 64})
    with pytest.raises(AssertionError, match="cannot be split evenly"):
        ModelArgs.from_hf_config({**base, "num_key_value_heads": 3})
    # fields that change the arithmetic are implemented or refused, never ignored
    for field, value, message in (("hidden_act", "gelu", "hidden_act 'gelu'"),
                                  ("partial_rotary_factor", 0.5, "partial_rotary_factor 0.5"),
                                  ("final_logit_softcapping", 30.0, "final_logit_softcapping"),
                                  ("layer_types", ["full_attention", "sliding_attention"], "sliding_attention")):
        with pytest.raises(ValueError, match=message):
            ModelArgs.from_hf_config({**base, field: value})
    for ok in ({"hidden_act": "silu"}, {"partial_rotary_factor": 1.0}, {"final_logit_softcapping": None},
               {"layer_types": ["full_attention"] * 3}):
        ModelArgs.from_hf_config({**base, **ok})


def test_cli_refuses_a_model_whose_config_it_would_misread(tiny_llama_dir, default_dir, tmp_path):
    """A model directory whose config.json says gelu: refused, exit status 2, no plausible garbage."""
    import shutil
    import subprocess
    import sys
    model = tmp_path / "gelu"
    shutil.copytree(tiny_llama_dir, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer: the config is refused first
        shutil.copy(default_dir / name, model / name)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(model), "--prompt", "hi",
                        "--max-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "hidden_act 'gelu' is not supported" in r.stderr and "Traceback" not in r.stderr


def test_checkpoint_mismatch_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    path = write_hf_model(tmp_path, TINY_LLAMA31)
    weights = load_file(path / "model.safetensors")
    missing = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}
    save_file(missing, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.w_up.weight'\]"):
        load_model(path)
    save_file({**weights, "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(64, 64\), the config implies \(128, 64\)"):
        load_model(path)
    save_file({**weights, "model.extra.weight": torch.randn(3)}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected \['model.extra.weight'\]"):
        load_model(path)
