"""A document's KV cache in a file: written after its prefill (--save-cache), read in place of it (--load-cache).

The file is safetensors: every tensor of KVCache.state() under its name ("layers.3.host_k"), and in its header
one JSON entry, "kvcache", with what must match for the cache to serve a run (the format, the model's
fingerprint, the tokenizer's and the document's hashes, the cache configuration, dtype and device kind), what
the cache holds (length, each layer's kind) and a SHA-256 of every tensor. The header is read and checked before
anything is allocated; each tensor is checked as it is copied in. A compressed cache's file holds what it holds:
a kivi cache's codes, a sparse layer's host store (the exact K/V of every token) and its sketch.
"""
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

FORMAT = 1
KEY = "kvcache"


class CacheFileError(ValueError):
    """A cache file that cannot serve this run; the message names the field that differs."""


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def facts(model, tokenizer_dir: Path, document: list[int], cfg, dtype: torch.dtype, device) -> dict:
    """What a saved cache must share with the run that loads it."""
    from layer_plans import fingerprint
    tok = hashlib.sha256((Path(tokenizer_dir) / "tokenizer.json").read_bytes()).hexdigest()[:16]
    doc = hashlib.sha256(torch.tensor(document, dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {"format": FORMAT, "model": fingerprint(model), "tokenizer": tok,
            "document": {"tokens": len(document), "sha256": doc}, "cache": json.loads(json.dumps(asdict(cfg))),
            "dtype": str(dtype).removeprefix("torch."), "device": torch.device(device).type}


def save(cache, path: str | Path, run_facts: dict) -> int:
    """Write the cache (after its prefill) to path: a temporary name first, renamed once whole. Returns its bytes."""
    from safetensors.torch import save_file
    if torch.device(cache.device).type == "cuda":
        torch.cuda.synchronize(cache.device)  # the prompt's copies into pinned host memory are done
    tensors = {name: t.detach().cpu().contiguous() for name, t in cache.state().items()}
    header = {**run_facts, "length": cache.length, "kinds": cache.kinds,
              "sha256": {name: sha256(t) for name, t in tensors.items()}}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata={KEY: json.dumps(header)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def read_header(path: str | Path) -> dict:
    """The file's header, without reading a tensor; refuses a file that is not a cache file."""
    from safetensors import safe_open
    name = f"cache file {path}"
    if not Path(path).is_file():
        raise CacheFileError(f"{name} " + ("is a directory" if Path(path).is_dir() else "does not exist"))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise CacheFileError(f"{name} is not a safetensors file, or is damaged ({e}); save it again") from None
    try:
        header = json.loads(meta[KEY])
    except (KeyError, ValueError):
        header = None
    if not (isinstance(header, dict) and {"format", "length", "kinds", "sha256"} <= set(header)):
        raise CacheFileError(f"{name} is a safetensors file but not a saved KV cache (no '{KEY}' header)")
    return header


def check(header: dict, run_facts: dict, path) -> None:
    """Refuse a file whose facts differ from this run's, naming the first field that does."""
    for field, want in run_facts.items():
        got = header.get(field)
        if got == want:
            continue
        if field == "cache":  # name the configuration fields that differ
            diff = [f"{k} {got.get(k)!r} in the file, {v!r} here" for k, v in want.items() if got.get(k) != v] \
                if isinstance(got, dict) else [f"{got!r} in the file"]
            raise CacheFileError(f"cache file {path} holds another cache configuration: {'; '.join(diff)}")
        what = {"format": "was written in another format", "model": "was made by another model (or RoPE scaling)",
                "tokenizer": "was made with another tokenizer", "document": "holds another document",
                "dtype": "holds another dtype", "device": "was made on another kind of device"}[field]
        raise CacheFileError(f"cache file {path} {what}: {got} in the file, {want} here")


def load(cache, path: str | Path, header: dict) -> None:
    """Fill a fresh cache (built for this run) from the file whose header check() accepted: its layers' kinds,
    length and every tensor, each against its shape, dtype and checksum."""
    from safetensors import safe_open
    cache.load_state(header["length"], {}, header["kinds"])
    views = cache.state()
    if set(views) != set(header["sha256"]):
        odd = sorted(set(views) ^ set(header["sha256"]))[:3]
        raise CacheFileError(f"cache file {path} does not hold the tensors this cache has (e.g. {', '.join(odd)}): "
                             f"save it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            for name, view in views.items():
                t = f.get_tensor(name)
                if t.shape != view.shape or t.dtype != view.dtype or sha256(t) != header["sha256"][name]:
                    raise CacheFileError(f"cache file {path} is damaged: tensor {name} does not match its checksum, "
                                         f"shape or dtype; save it again")
                view.copy_(t)
    except CacheFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated file fails inside safetensors
        raise CacheFileError(f"cache file {path} is damaged ({e}); save it again") from None
