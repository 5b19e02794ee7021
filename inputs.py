"""What a run is handed and what it needs, checked before any work is done: the prompt (text, a file or
stdin, in an encoding), flag values, output paths, and the memory the KV cache will take (refused with the
numbers before anything is allocated); the machine's facts for the run report. A refusal is one line:
UsageError, printed by generate.py with exit status 2.
"""
import argparse
import codecs
import os
import platform
import re
import resource
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import torch

from kvcache import CacheConfig, KVCache
from model import PREFILL_CHUNK


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class UsageError(Exception):
    """Bad input from the user: printed as one clear message, exit status 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, systemd and schedulers send), raised wherever the program is and handled as
    Ctrl-C is: the text so far kept, the stats line and the report written; exit status 143."""


def on_sigterm(signum, frame):
    raise Terminated()


class OutputClosed(KeyboardInterrupt):
    """The reader of stdout went away (a pipe into `head` that closed): generation stops as on Ctrl-C, the text
    so far was written, the report is; exit status 141, as for a process that SIGPIPE ended."""


def guard_streams():
    """A closed stderr (2>&-) takes the log nowhere, not into stdout (where print falls back to)."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")


class Answer:
    """The generated text's way to stdout: written as it comes; a closed pipe raises OutputClosed once (later
    writes are dropped); a stdout closed from the start (>&-) takes nothing, the report holds the text."""

    def __init__(self):
        self.closed = self.absent = sys.stdout is None

    def write(self, text: str):
        if self.closed:
            return
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left for Python's exit flush
            raise OutputClosed() from None


MAX_PROMPT_BYTES = 64 << 20  # far more text than any supported context holds (~1M tokens is ~4-8 MiB)


CHARS_PER_TOKEN = 32  # more than a BPE token ever spans, in practice: a longer prompt cannot fit the context


def read_prompt(args) -> str:
    """The document: --prompt, or --prompt-file (a path, or '-' for stdin) decoded one way for both (--question
    goes after it; the prompt is empty only if both are)."""
    if args.prompt is not None:
        text = args.prompt
    else:
        if args.prompt_file == "-":
            if sys.stdin is None:
                raise UsageError("stdin is closed: --prompt-file - has nothing to read; pipe the text in, or pass a "
                                 "file or --prompt")
            data, name = read_bounded(sys.stdin.buffer, "stdin", args.encoding), "stdin"
        else:
            path, name = Path(args.prompt_file), f"prompt file {args.prompt_file}"
            if path.is_dir():
                raise UsageError(f"{name} is a directory; pass a text file")
            if not path.exists():
                raise UsageError(f"{name} does not exist")
            if path.is_file() and path.stat().st_size > MAX_PROMPT_BYTES:
                raise UsageError(f"{name} has {path.stat().st_size / 2**20:,.0f} MiB, more than any context holds "
                                 f"(the limit is {MAX_PROMPT_BYTES >> 20} MiB); pass the part you need (head -c, tail -c)")
            try:
                with open(path, "rb") as f:  # a FIFO or a device such as /dev/zero: read in bounded chunks
                    data = read_bounded(f, name, args.encoding)
            except OSError as e:
                raise UsageError(f"{name} cannot be read: {e.strerror}") from None
        text = decode_text(data, name, args.encoding, args.errors)
    if not text.strip() and not (args.question or "").strip():
        raise UsageError("the prompt is empty" + (f" ({args.prompt_file} has no text)" if args.prompt_file else ""))
    return text


def read_bounded(f, name: str, encoding: str) -> bytes:
    """All of f, refusing binary data (a NUL byte, in an encoding without them) and more than MAX_PROMPT_BYTES
    as they arrive: an endless stream (/dev/zero, a FIFO that never closes) is refused, not read forever."""
    nul_ok = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))
    chunks, n = [], 0
    while chunk := f.read(1 << 20):
        if not nul_ok and b"\x00" in chunk:
            raise UsageError(f"{name} looks like a binary file (NUL byte at offset {n + chunk.index(0)}); "
                             f"pass a text file")
        chunks.append(chunk)
        n += len(chunk)
        if n > MAX_PROMPT_BYTES:
            raise UsageError(f"{name} goes on past {MAX_PROMPT_BYTES >> 20} MiB, more than any context holds; "
                             f"pass the part you need (head -c, tail -c)")
    return b"".join(chunks)


def decode_text(data: bytes, name: str, encoding: str, errors: str) -> str:
    """Bytes -> text; refuse binary data (NUL bytes) and, unless errors='replace', undecodable bytes."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        if b"\x00" in data:
            text = "\x00"  # binary: refused below, whatever the encoding says
        elif errors == "replace":
            log(f"note: {name} is not valid {encoding} (first at byte offset {e.start}); "
                f"undecodable bytes replaced by U+FFFD (--errors replace)")
            text = data.decode(encoding, errors="replace")
        else:
            raise UsageError(f"{name} is not valid {encoding}: byte 0x{data[e.start]:02x} at offset {e.start} "
                             f"({e.reason}); pass its --encoding (e.g. latin-1), or --errors replace") from None
    if "\x00" in text:
        raise UsageError(f"{name} looks like a binary file (NUL byte at offset {data.index(0)}); pass a text file")
    return text


def fit_to_context(ids: list[int], context: int, max_new_tokens: int, truncate: str,
                   after: int = 0) -> tuple[list[int], int]:
    """Return (prompt ids, max new tokens) that fit the context with `after` tokens after them (the question after a
    document); refuse or cut the middle."""
    if max_new_tokens + after >= context:
        raise UsageError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the {context}-token context"
                         + (f" after the {after} tokens of the question" if after else ""))
    plus = f" + {after} after it" if after else ""
    if len(ids) + after + max_new_tokens > context:
        if truncate == "middle":
            keep = context - after - max_new_tokens
            log(f"truncating the prompt from {len(ids)} to {keep} tokens (middle removed)")
            ids = ids[:keep // 2] + ids[len(ids) - (keep - keep // 2):]
        elif len(ids) + after >= context:
            raise UsageError(f"the prompt is {len(ids)}{plus} tokens but the model's context is {context}; "
                             f"shorten it or pass --truncate middle")
        else:
            log(f"note: generating at most {context - after - len(ids)} tokens, where the context ends")
            max_new_tokens = context - after - len(ids)
    return ids, max_new_tokens


def make_cache(cfg: CacheConfig, model, max_len: int, *, device, dtype, chunk: int = PREFILL_CHUNK,
               kernels: bool = False) -> KVCache:
    """Build the KV cache, refusing up front (with the numbers) when device or host cannot hold it."""
    a = model.args
    plan = plan_memory(model, max_len, cfg, dtype=dtype, kernels=kernels)  # on the meta device: nothing allocated
    # headroom for one prefill chunk's activations (a handful of chunk x ffn tensors) and the logits
    headroom = 6 * chunk * max(a.ffn_dim, a.dim) * torch.empty((), dtype=dtype).element_size() + (256 << 20)
    on_gpu = torch.device(device).type == "cuda"
    host_here = 0 if on_gpu else plan["host_bytes"]  # on a CPU the "offloaded" store is the same memory
    need = plan["device_bytes"] + host_here + plan["prefill_stage_bytes"] + headroom
    free = free_memory(device)
    if need > free:
        raise UsageError(f"the {cfg.policy} KV cache for {max_len} positions needs {need / 2**30:.2f} GiB of "
                         f"{'GPU' if on_gpu else 'host'} memory (cache {(plan['device_bytes'] + host_here) / 2**30:.2f} + prefill "
                         f"{plan['prefill_stage_bytes'] / 2**30:.2f} + working {headroom / 2**30:.2f}) but only "
                         f"{free / 2**30:.2f} GiB is free; shorten the prompt, lower --max-new-tokens or pick a "
                         f"smaller cache (--cache tailor)")
    if on_gpu and plan["host_bytes"] > free_memory("cpu"):
        raise UsageError(f"the {cfg.policy} KV cache needs {plan['host_bytes'] / 2**30:.2f} GiB of pinned host memory "
                         f"but only {free_memory('cpu') / 2**30:.2f} GiB is available; shorten the prompt or "
                         f"quantize more layers (--quant-layers)")
    return KVCache(model, max_len, cfg, device=device, dtype=dtype, kernels=kernels)


def plan_memory(model, max_len: int, cfg: CacheConfig, *, batch: int = 1, dtype=torch.float32, kernels=False) -> dict:
    """The memory report of a cache that is never allocated: built on the meta device.

    With online identification the kinds are not known yet: the plan takes, per field, the larger
    of "every layer quantized" and "every layer offloaded"."""
    def report(c):
        return KVCache(model, max_len, c, batch=batch, device="meta", dtype=dtype, host_device="meta",
                       kernels=kernels).memory_report()
    if not cfg.online:
        return report(cfg)
    n = model.args.n_layers
    a, b = (report(replace(cfg, layers=(kind,) * n)) for kind in ("quant", "sparse"))
    return {**b, **{k: max(a[k], b[k]) for k in ("device_bytes", "host_bytes", "full_cache_bytes", "prefill_stage_bytes")},
            "policy": cfg.policy, "by_kind": {**a["by_kind"], **b["by_kind"]}}


def free_memory(device) -> int:
    """Bytes that can still be allocated on `device` (GPU: the driver's count; CPU: MemAvailable)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def layer_list(s):
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids such as 0,1, got {s!r}") from None


def check_writable(p, flag: str, name: str):
    """Refuse an output path (--report, --trace) that cannot be written, before any work is done."""
    path = Path(name)
    if path.is_dir():
        p.error(f"--{flag} {name} is a directory; name a file")
    folder = path.parent
    if not folder.is_dir():
        p.error(f"--{flag} {name}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        p.error(f"--{flag} {name}: not writable")


def same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (through links and relative spellings, existing or not)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def check_outputs(p, outputs: dict[str, str | None], inputs: list[tuple[str, str | None]]):
    """Refuse, before any work is done, an output (flag -> path; None: not asked for) that cannot be written,
    that names an input ((flag, path) pairs: it would be overwritten) or the file another output names."""
    given = {flag: name for flag, name in outputs.items() if name}
    for i, (flag, name) in enumerate(given.items()):
        check_writable(p, flag, name)
        for src_flag, src in inputs:
            if src and src != "-" and same_file(name, src):
                p.error(f"--{flag} {name} is the --{src_flag} file: writing it would destroy it; name another file")
        for other, other_name in list(given.items())[:i]:
            if same_file(name, other_name):
                p.error(f"--{flag} and --{other} both name {name}: one would overwrite the other; give each its own")


def check_bench_args(p, args, fractions=()):
    """What every benchmark checks before it loads anything: --device, --out (a prefix: its folder exists and
    can be written), --replot's files (each there and valid JSON -> args.runs), and fractions (flag names) in
    [0, 1]; one line naming the flag, exit 2."""
    from config import read_json_object
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device) or args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: " + ("CUDA is not available here; use --device cpu"
                                               if args.device.startswith("cuda") else "must be cpu, cuda or cuda:N"))
    folder = Path(args.out).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        p.error(f"--out {args.out}: folder {folder} " + ("is not writable" if folder.is_dir() else "does not exist"))
    for flag in fractions:
        bad = [x for x in getattr(args, flag) if not 0 <= x <= 1]
        if bad:
            p.error(f"--{flag} are fractions of the context, from 0 to 1, got {bad}")
    args.runs = []
    for f in args.replot or []:
        try:
            args.runs.append(read_json_object(f))
        except (OSError, ValueError) as e:
            p.error(f"--replot {f}: {e.strerror if isinstance(e, OSError) else e}")


def write_output(flag: str, path: str, text: str) -> bool:
    """Write one output file; on failure say so in one line and return False (the caller's exit status says it),
    so that one output's failure loses no other."""
    try:
        Path(path).write_text(text)
        return True
    except OSError as e:
        log(f"error: --{flag} {path}: {e.strerror or e}")
        return False


def peak_memory(device) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{os.cpu_count()}-core {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return platform.processor() or "CPU"


def versions() -> dict:
    v = {"python": platform.python_version()}
    for pkg in ("torch", "triton", "tokenizers", "safetensors", "huggingface-hub", "gguf"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return v


def set_threads(requested: int | None) -> int:
    """CPU threads for PyTorch: --threads, else its default capped at the CPUs this process may run on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(requested or min(torch.get_num_threads(), usable))
    return torch.get_num_threads()
