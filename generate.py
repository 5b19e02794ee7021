"""Answer over a long document: python generate.py --prompt-file doc.txt [--question "..."]

Generated text streams to stdout; everything else (model, device, progress, stats) goes to stderr.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from checkpoint import resolve_model
from kvcache import FullCache
from model import PREFILL_CHUNK, load_model
from tokenizer import StreamDecoder, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Bad input from the user: printed as one clear message, exit status 2."""


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ prompt

def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"prompt file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
    if args.question:
        text = f"{text.rstrip()}\n\n{args.question}" if text.strip() else args.question
    if not text.strip():
        raise UsageError("the prompt is empty" + (f" ({args.prompt_file} has no text)" if args.prompt_file else ""))
    return text


def fit_to_context(ids: list[int], context: int, max_new_tokens: int, truncate: str) -> tuple[list[int], int]:
    """Return (prompt ids, max new tokens) that fit the context; refuse or cut the middle."""
    if max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the {context}-token context")
    if len(ids) + max_new_tokens > context:
        if truncate == "middle":
            keep = context - max_new_tokens
            log(f"truncating the prompt from {len(ids)} to {keep} tokens (middle removed)")
            ids = ids[:keep // 2] + ids[len(ids) - (keep - keep // 2):]
        elif len(ids) >= context:
            raise UsageError(f"the prompt is {len(ids)} tokens but the model's context is {context}; "
                             f"shorten it or pass --truncate middle")
        else:
            log(f"note: generating at most {context - len(ids)} tokens, where the context ends")
            max_new_tokens = context - len(ids)
    return ids, max_new_tokens


# ----------------------------------------------------------------------------------- caching

def make_cache(policy: str, model, max_len: int, device, dtype):
    """Build the KV cache for `policy`, refusing up front when the device cannot hold it."""
    a = model.args
    if policy != "full":
        raise UsageError(f"unknown --cache {policy!r}")
    need = FullCache.bytes_needed(a.n_layers, a.n_kv_heads, a.head_dim, max_len, dtype=dtype)
    # headroom for one prefill chunk's activations (a handful of chunk x ffn tensors) and the logits
    headroom = 6 * PREFILL_CHUNK * max(a.ffn_dim, a.dim) * torch.empty((), dtype=dtype).element_size() + (256 << 20)
    free = free_memory(device)
    if need + headroom > free:
        where = "GPU" if torch.device(device).type == "cuda" else "host"
        raise UsageError(f"the full KV cache for {max_len} positions needs {need / 2**30:.2f} GiB "
                         f"(+{headroom / 2**30:.2f} GiB working memory) but only {free / 2**30:.2f} GiB of {where} "
                         f"memory is free; shorten the prompt or lower --max-new-tokens")
    return FullCache(a.n_layers, a.n_kv_heads, a.head_dim, max_len, device=device, dtype=dtype)


def free_memory(device) -> int:
    """Bytes that can still be allocated on `device` (GPU: the driver's count; CPU: MemAvailable)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------- sampling

def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """logits (vocab,) -> token id. temperature 0 is greedy; top_p keeps the smallest nucleus >= top_p."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= top_p  # mass before this token already reaches top_p
        sorted_p[outside] = 0
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model, cache, prompt_ids: list[int], max_new_tokens: int, stop_ids, temperature=0.0, top_p=1.0,
             seed=0, on_token=None, progress=None, chunk_size=PREFILL_CHUNK):
    """Prefill the prompt, then decode up to max_new_tokens. Returns (new ids, stats dict).

    A KeyboardInterrupt stops generation and returns what was made so far (stats["interrupted"]).
    """
    device = model.embed.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(seed)
    out, stats = [], {"prompt_tokens": len(prompt_ids), "interrupted": False}
    t0 = time.perf_counter()
    try:
        logits = model.prefill(torch.tensor([prompt_ids], device=device), cache, chunk_size, progress)
        sync()
        t1 = time.perf_counter()
        stats["prefill_s"] = t1 - t0
        pos = len(prompt_ids)
        for _ in range(max_new_tokens):
            tok = sample(logits[0], temperature, top_p, gen)
            if tok in stop_ids:
                break
            out.append(tok)
            if on_token:
                on_token(tok)
            if len(out) == max_new_tokens:
                break
            logits = model(torch.tensor([[tok]], device=device), cache, pos)[:, -1]
            pos += 1
    except KeyboardInterrupt:
        stats["interrupted"] = True
    sync()
    t2 = time.perf_counter()
    stats.setdefault("prefill_s", t2 - t0)
    steps = max(len(out) - 1, 0)  # forward passes after the prefill
    stats["decode_ms_per_token"] = 1e3 * (t2 - t0 - stats["prefill_s"]) / steps if steps else None
    stats["prefill_tok_per_s"] = len(prompt_ids) / stats["prefill_s"]
    return out, stats


# ---------------------------------------------------------------------------------------- CLI

def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", help="text file with the prompt or document; '-' reads stdin")
    src.add_argument("--prompt", help="the prompt text itself")
    p.add_argument("--question", help="appended after the document (e.g. 'Summarise this text.')")
    p.add_argument("--model", help="HF-layout directory, HF repo id, or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--cache", choices=["full"], default="full", help="KV-cache policy")
    p.add_argument("--prefill-chunk", type=positive_int, default=PREFILL_CHUNK, help="prompt tokens per prefill step")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the model's chat template (default: on when it has one)")
    p.add_argument("--truncate", choices=["none", "middle"], default="none",
                   help="what to do with a prompt longer than the context")
    p.add_argument("--report", help="write a JSON run report to this path")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    return args


def peak_memory(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def versions() -> dict:
    v = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "tokenizers", "safetensors", "huggingface-hub", "gguf"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return v


def run(args) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    text = read_prompt(args)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model_dir = resolve_model(args.model)
    tok = Tokenizer(model_dir)
    model = load_model(model_dir, args.device, dtype)
    chat = args.chat if args.chat is not None else bool(tok.chat_template)
    ids = tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text)
    ctx = model.args.max_seq_len
    ids, max_new = fit_to_context(ids, ctx, args.max_new_tokens, args.truncate)
    stop_ids = set(tok.eos_ids)
    n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())  # tied weights once
    log(f"model {model_dir.name} ({n_params / 1e6:.0f}M params) "
        f"on {args.device} in {str(dtype).removeprefix('torch.')}; prompt {len(ids)} tokens of {ctx} context; "
        f"cache {args.cache}")
    cache = make_cache(args.cache, model, len(ids) + max_new, args.device, dtype)

    from tqdm import tqdm
    bar = tqdm(total=len(ids), unit="tok", desc="prefill", file=sys.stderr, leave=False)
    stream = StreamDecoder(tok)

    def on_token(t):
        bar.close()  # the first token ends the prefill; closing again is a no-op
        sys.stdout.write(stream.push(t))
        sys.stdout.flush()

    out, stats = generate(model, cache, ids, max_new, stop_ids, args.temperature, args.top_p, args.seed,
                          on_token, bar.update, args.prefill_chunk)
    bar.close()
    sys.stdout.write("\n")
    mem = cache.memory_report()
    decode = stats["decode_ms_per_token"]
    log(("[interrupted] " if stats["interrupted"] else "") +
        f"prefill {len(ids)} tok in {stats['prefill_s']:.2f} s ({stats['prefill_tok_per_s']:.0f} tok/s); "
        f"decode {len(out)} tok" + (f" at {decode:.1f} ms/tok" if decode else "") +
        f"; KV cache {mem['device_bytes'] / 2**20:.1f} MiB on device; peak memory {peak_memory(args.device) / 2**30:.2f} GiB")
    if args.report:
        report = {"model": str(model_dir), "device": args.device, "dtype": str(dtype).removeprefix("torch."),
                  "policy": {"cache": args.cache, "prefill_chunk": args.prefill_chunk},
                  "sampling": {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "chat": chat},
                  "prompt_tokens": len(ids), "generated_ids": out, "generated_text": tok.decode(out, skip_special_tokens=True),
                  **{k: stats[k] for k in ("prefill_s", "prefill_tok_per_s", "decode_ms_per_token", "interrupted")},
                  "kv_cache": mem, "peak_memory_bytes": peak_memory(args.device), "versions": versions()}
        if torch.device(args.device).type == "cuda":
            report["gpu"] = torch.cuda.get_device_name(args.device)
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 130 if stats["interrupted"] else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, FileNotFoundError, ValueError, ConnectionError) as e:
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:  # during loading; generation handles its own
        log("[interrupted]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
