"""Answer over a long document: python generate.py --prompt-file doc.txt [--question "..."] [--interactive]

Generated text streams to stdout; everything else (model, device, progress, stats) goes to stderr.
Read in order: sampling, the decode step (Decoder: eager, or one CUDA graph per step), generate() (prefill,
the question read through the cache, decode), the command line: one document, then one question or many,
each from the document's cache (KVCache.restore; cachefile.py saves and loads it). inputs.py reads and
refuses what the command is handed.
"""
import argparse
import codecs
import json
import math
import re
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import cachefile
from checkpoint import NAMED_MODELS, is_converted, resolve_model
from config import check_fields, read_json_object
from inputs import (CHARS_PER_TOKEN, Answer, OutputClosed, Terminated, UsageError, check_outputs, cpu_name, fit_to_context,
                    guard_streams, layer_list, log, make_cache, on_sigterm, peak_memory, positive_int, read_prompt,
                    set_threads, versions, write_output)
from kvcache import POLICIES, QUANTIZERS, SELECTORS, CacheConfig, ConfigError, kernels_available
from model import PREFILL_CHUNK, load_model
from tokenizer import StreamDecoder, Tokenizer

QUESTION_ROOM = 512  # --interactive: cache positions kept after the document for each question
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteLogits(ValueError):
    """The model's logits hold NaN or inf: no token can be chosen from them (damaged weights, or overflow)."""


# ---------------------------------------------------------------------------------- sampling

@dataclass
class Sampling:
    """How each next token is chosen from the logits; the flags of the same names set it."""
    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0                # nucleus: the smallest set of tokens of this mass
    seed: int = 0
    repetition_penalty: float = 1.0   # > 1: a token among the last repeat_last_n is less likely again
    repeat_last_n: int = -1           # the tokens it looks back over: -1 all of them (HF's); llama.cpp's is 64


def sample(logits: torch.Tensor, s: Sampling, history: list[int], generator) -> int:
    """logits (vocab,) -> token id, history the ids so far (prompt and generated).

    The repetition penalty (as in HF transformers and llama.cpp) divides a positive logit of a token seen
    in the window by the penalty and multiplies a negative one by it; then temperature 0 is greedy, and
    top_p keeps the smallest nucleus of that mass."""
    if s.repetition_penalty != 1.0 and s.repeat_last_n != 0 and history:
        seen = torch.tensor(sorted(set(history if s.repeat_last_n < 0 else history[-s.repeat_last_n:])),
                            device=logits.device)
        logits = logits.float().clone()  # the caller's logits may be a CUDA graph's static output
        x = logits[seen]
        logits[seen] = torch.where(x > 0, x / s.repetition_penalty, x * s.repetition_penalty)
    if s.temperature == 0:
        return int(logits.argmax())
    scaled = logits.float() / s.temperature
    if not bool(torch.isfinite(scaled).all()):  # a temperature so small the logits overflow: its limit, greedy
        return int(logits.argmax())
    probs = torch.softmax(scaled, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= s.top_p  # mass before this token already reaches top_p
        sorted_p[outside] = 0
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def compare(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    """KL(ref || policy) in nats and whether the top-1 tokens agree, for one position's logits (vocab,)."""
    ref_lp, lp = ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum().item()
    return {"kl": max(kl, 0.0), "top1": bool(ref_logits.argmax() == logits.argmax())}


class Decoder:
    """One decode step at a time: token at position pos -> next-token logits (vocab,), float32.

    With a cache on the kernel path (KVCache(kernels=True)) the step runs with the position in a
    device tensor and no host synchronisation, so on CUDA it is captured once into a CUDA graph
    (cuda_graph=True) and replayed: all layers' launches in one. The returned logits are then a
    static buffer, overwritten by the next step: clone them to keep them.
    """

    def __init__(self, model, cache, cuda_graph: bool | None = None):
        self.model, self.cache, self.steps = model, cache, 0
        self.device = model.embed.weight.device
        self.device_step = bool(getattr(cache, "kernels", False))
        if cuda_graph is None:
            cuda_graph = self.device_step and self.device.type == "cuda"
        if cuda_graph and not (self.device_step and self.device.type == "cuda"):
            raise ValueError("a CUDA graph needs a CUDA device and a cache on the kernel path (kernels=True)")
        self.cuda_graph, self.graph = cuda_graph, None
        if self.device_step:
            self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.pos = torch.zeros((), dtype=torch.long, device=self.device)

    def _forward(self):
        return self.model.device_step(self.token, self.cache, self.pos)[0, -1]

    def step(self, token: int, pos: int) -> torch.Tensor:
        self.steps += 1
        if not self.device_step:
            return self.model(torch.tensor([[token]], device=self.device), self.cache, pos)[0, -1]
        if pos >= self.cache.max_len:
            raise RuntimeError(f"KV cache full: position {pos + 1} exceeds its {self.cache.max_len} slots")
        self.token.fill_(token)
        self.pos.fill_(pos)
        if not self.cuda_graph:
            logits = self._forward()
        elif self.graph is None:  # warm up on a side stream (compiles the kernels), then capture
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._forward()  # a step is idempotent: rewriting position pos with the same token changes nothing
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._forward()
            self.graph.replay()
            logits = self.logits
        else:
            self.graph.replay()
            logits = self.logits
        self.cache.advance(pos + 1)
        return logits


@torch.inference_mode()
def generate(model, cache, prompt_ids: list[int], *, max_new_tokens: int, stop_ids=frozenset(),
             sampling: Sampling | None = None, on_token=None, progress=None, chunk_size: int = PREFILL_CHUNK,
             check_cache=None, cuda_graph: bool | None = None, record: bool = False, prefill: int | None = None,
             decoder: Decoder | None = None, on_prefill=None):
    """Prefill prompt_ids[:prefill] (default: all), read the rest one token at a time through the cache, as
    decoding does, then decode up to max_new_tokens. Returns (new ids, stats dict).

    A document prefilled and a question read after it: the document's cache can serve another question (restored
    to a snapshot on_prefill() took) or a later run (saved to a file). A cache that holds `prefill` tokens already
    (cache.length == prefill: restored or loaded) is not prefilled again: it must hold prompt_ids[:prefill].
    decoder: the cache's Decoder, kept across calls (its CUDA graph is captured once).
    stop_ids: ids that end generation (not emitted); on_token(id) sees each new id; progress(fraction of
    a layer) follows the prefill.
    check_cache: a full cache run alongside on the same tokens; each step's logits are compared
    (stats["check"]) and its time is left out of the timings.
    cuda_graph: see Decoder (default: on for a cache on the kernel path on CUDA).
    record: keep what the offloaded layers retrieve at each step (stats["trace"], a trace_page.TraceRecorder;
    stats["steps"] decode steps).
    A KeyboardInterrupt stops generation and returns what was made so far (stats["interrupted"]).
    """
    if not len(prompt_ids):
        raise ValueError("the prompt is empty: generate() needs at least one token id")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    n = len(prompt_ids) if prefill is None else prefill
    if not 0 < n <= len(prompt_ids):
        raise ValueError(f"prefill must be 1..{len(prompt_ids)} (the prompt's length), got {prefill}")
    held = cache.length == n  # the document is in the cache already
    if held and n == len(prompt_ids):
        raise ValueError(f"the cache holds all {n} tokens of the prompt already: nothing gives the next one's logits")
    for c in (cache, check_cache):
        if c is not None and c.length and not (c is cache and held):
            raise ValueError(f"this KVCache already holds {c.length} positions of another sequence: build a new "
                             f"KVCache for each prompt, or restore it to the {n} it shares with this one")
    device = model.embed.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sampling = sampling or Sampling()  # greedy
    gen = torch.Generator(device=device).manual_seed(sampling.seed)
    out, steps, history = [], [], list(prompt_ids)  # history: what the repetition penalty looks back over
    stats = {"prompt_tokens": len(prompt_ids), "prefill_tokens": 0 if held else n, "read_tokens": len(prompt_ids) - n,
             "interrupted": False, "prefilled": False, "prefill_s": 0.0, "read_s": 0.0, "first_step_s": 0.0,
             "decode_s": 0.0, "first_token_s": None}
    start = time.perf_counter()
    prompt = torch.tensor([prompt_ids], device=device)

    def timed(key, fn, *a):
        t = time.perf_counter()
        try:
            r = fn(*a)
            sync()
            return r
        finally:  # an interrupted step's time counts too
            stats[key] += time.perf_counter() - t

    decoder = decoder or Decoder(model, cache, cuda_graph)

    def step(key, tok, pos):
        return timed(key, decoder.step, tok, pos)[None]

    n_decode = 0  # decode steps timed in decode_s
    try:
        if not held:
            logits = timed("prefill_s", model.prefill, prompt[:, :n], cache, chunk_size, progress)
            if on_prefill:
                on_prefill()
        ref = model.prefill(prompt[:, :n], check_cache, chunk_size) if check_cache is not None else None
        stats["prefilled"], stats["steps"] = True, 0
        for pos in range(n, len(prompt_ids)):  # the question after the document
            logits = step("read_s", prompt_ids[pos], pos)
            if check_cache is not None:
                ref = model(prompt[:, pos:pos + 1], check_cache, pos)[:, -1]
        if record:
            from trace_page import TraceRecorder
            stats["trace"] = TraceRecorder.of(cache, len(prompt_ids), max_new_tokens)
        stats["cuda_graph"] = decoder.cuda_graph
        pos = len(prompt_ids)
        for _ in range(max_new_tokens):
            if not bool(torch.isfinite(logits[0]).all()):  # both paths: the prefill's logits and each step's
                raise NonFiniteLogits(f"the logits for position {pos} are not finite (NaN or inf)")
            if ref is not None:
                steps.append(compare(ref[0], logits[0]))
            tok = sample(logits[0], sampling, history, gen)
            if stats["first_token_s"] is None:
                stats["first_token_s"] = time.perf_counter() - start
            if tok in stop_ids:
                break
            out.append(tok)
            history.append(tok)
            if on_token:
                on_token(tok)
            if len(out) == max_new_tokens:
                break
            # the decoder's first step compiles the kernels and captures the CUDA graph: timed apart
            timed_apart = not decoder.steps
            logits = step("first_step_s" if timed_apart else "decode_s", tok, pos)
            stats["steps"] += 1
            n_decode += not timed_apart
            if check_cache is not None:
                ref = model(torch.tensor([[tok]], device=device), check_cache, pos)[:, -1]
            pos += 1
    except KeyboardInterrupt as e:
        stats["interrupted"], stats["signal"] = True, signal_of(e)
    stats["decode_ms_per_token"] = 1e3 * stats["decode_s"] / n_decode if n_decode else None
    stats["prefill_tok_per_s"] = n / stats["prefill_s"] if stats["prefilled"] and not held else None
    if steps:
        stats["check"] = {"steps": steps, "mean_kl": sum(r["kl"] for r in steps) / len(steps),
                          "max_kl": max(r["kl"] for r in steps),
                          "top1_agreement": sum(r["top1"] for r in steps) / len(steps)}
    return out, stats


# ---------------------------------------------------------------------------------------- CLI


# which --cache policies each cache flag applies to: given for another policy, it is refused, not ignored
CACHE_FLAGS = {"quant_layers": ("tailor",), "plan": ("tailor",), "topk_split": ("tailor",), "bits": ("tailor", "kivi"),
               "group": ("tailor", "kivi"), "residual": ("tailor", "kivi"),
               "budget": ("tailor", "sparse"), "select": ("tailor", "sparse"), "channels": ("tailor", "sparse"),
               "sink": ("tailor", "sparse", "streaming"), "recent": ("tailor", "sparse", "streaming")}


def cache_config(args) -> CacheConfig:
    given = {k: getattr(args, k) for k in CACHE_FLAGS if k not in ("plan", "topk_split") and getattr(args, k) is not None}
    return CacheConfig(policy=args.cache, **given)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help names every default: the value, or (for a default that depends on something) the help text's words."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "default" not in h and action.option_strings:
            h += " (default: %(default)s)"
        return h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-file", help="text file with the prompt or document; '-' reads stdin")
    src.add_argument("--prompt", help="the prompt text itself")
    p.add_argument("--question", help="appended after the document (e.g. 'Summarise this text.')")
    p.add_argument("--encoding", default="utf-8", help="of --prompt-file (and stdin)")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict",
                   help="undecodable bytes in the prompt: refuse (strict) or replace them by U+FFFD")
    p.add_argument("--model", help="HF-layout directory, HF repo id, .gguf file, or a named model: "
                                   f"{', '.join(NAMED_MODELS)} (32k context; 128k with --rope-scaling yarn "
                                   "--rope-scale 4, as their model cards say) (default: SmolLM2-135M-Instruct)")
    p.add_argument("--rope-scaling", choices=["none", "yarn"],
                   help="replace the model's RoPE scaling: yarn stretches its context --rope-scale times "
                        "(default: the model's config)")
    p.add_argument("--rope-scale", type=float,
                   help="with --rope-scaling yarn: the factor, 4 for 32k -> 128k (default: none; it must be given)")
    p.add_argument("--yarn-orig-ctx", type=positive_int,
                   help="with --rope-scaling yarn: the context the model was trained on (default: its config's)")
    p.add_argument("--verify-model", action="store_true",
                   help="check every byte of a converted GGUF's cache entry against its manifest (default: sizes "
                        "and sampled blocks)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="generation stops earlier at an EOS token")
    d = Sampling()
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling: the smallest set of tokens of this mass")
    p.add_argument("--seed", type=int, default=d.seed, help="of the sampler")
    p.add_argument("--repetition-penalty", "--repeat-penalty", type=float,
                   help="> 1 makes tokens among the last --repeat-last-n less likely again: a positive logit is "
                        "divided by it, a negative one multiplied, as in HF transformers and llama.cpp (default: the "
                        f"model's generation_config.json, else {d.repetition_penalty}, off)")
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n,
                   help="tokens the repetition penalty looks back over, prompt included: -1 all of them, as HF "
                        "transformers does (and a generation_config.json means); llama.cpp's default is 64; 0: none")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads (default: PyTorch's, at most the CPUs this process may use)")
    d = CacheConfig()
    c = p.add_argument_group("KV cache (a flag given for a policy it does not apply to is refused)")
    c.add_argument("--cache", choices=POLICIES, default=d.policy,
                   help="full; tailor: quantize --quant-layers, offload the rest; kivi: quantize all; "
                        "sparse: offload all; streaming: sinks + recent window only")
    c.add_argument("--quant-layers", type=layer_list,
                   help="tailor: comma-separated layer ids to quantize (default: from the model's plan, else online)")
    c.add_argument("--plan", help="tailor: a plan file from profile_layers.py (default: the plans/ entry for this model)")
    c.add_argument("--topk-split", choices=["even", "plan"],
                   help="tailor: each offloaded layer's top-k, the same on every layer, or the plan's split of the same "
                        "total (profile_layers.py; better at 4k, worse at 7.5k on the default model) (default: even)")
    c.add_argument("--bits", type=int, help="tailor, kivi: quantized layers' bits, 1, 2, 4 or 8 (default: tailor the "
                                            "plan's, else 1; kivi 2)")
    c.add_argument("--group", type=int, help=f"tailor, kivi: quantization group size g (default: {d.group})")
    c.add_argument("--residual", type=int,
                   help=f"tailor, kivi: full-precision recent tokens R of a quantized layer (default: {d.residual})")
    c.add_argument("--budget", type=int,
                   help=f"tailor, sparse: device tokens per offloaded layer, sink + recent + top-k (default: {d.budget})")
    c.add_argument("--sink", type=int, help=f"tailor, sparse, streaming: first tokens kept (default: {d.sink})")
    c.add_argument("--recent", type=int, help=f"tailor, sparse, streaming: newest tokens kept (default: {d.recent})")
    c.add_argument("--select", choices=list(SELECTORS),
                   help=f"tailor, sparse: top-k selector: sketch, a {d.sketch_bits}-bit copy of every key on the device, "
                        f"against each KV head's mean query; sketch-heads, the same ranked per query head; channels, the "
                        f"paper's C channels of a query predicted one layer early (default: {d.select})")
    c.add_argument("--channels", type=int, help=f"tailor, sparse: C for --select channels (default: {d.channels})")
    c.add_argument("--check", action="store_true",
                   help="run a full cache alongside; print top-1 agreement and KL(full || policy) per step")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction,
                   help="decode with the Triton kernels (default: on CUDA); --no-kernels: the PyTorch reference path")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                   help="capture the decode step in one CUDA graph and replay it (default: on with --kernels on CUDA)")
    p.add_argument("--prefill-chunk", type=positive_int, default=PREFILL_CHUNK, help="prompt tokens per prefill step")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                   help="wrap the prompt in the model's chat template (default: on when it has one)")
    p.add_argument("--special-tokens", action="store_true",
                   help="let special-token text in the prompt (e.g. '<|im_end|>') become control tokens; by default "
                        "the document and question are plain text and only the chat template's markup is special")
    p.add_argument("--truncate", choices=["none", "middle"], default="none",
                   help="what to do with a prompt longer than the context")
    s = p.add_argument_group("many questions about one document (the question is read through the document's cache)")
    s.add_argument("--interactive", action="store_true",
                   help="after --question (if given), read questions from stdin, one per line, each answered from the "
                        "document's cache, prefilled once ('/quit' or end of input stops; Ctrl-C stops an answer)")
    s.add_argument("--save-cache", metavar="PATH",
                   help="write the document's KV cache to PATH after its prefill (default: none)")
    s.add_argument("--load-cache", metavar="PATH",
                   help="read the document's KV cache from PATH (--save-cache's, for the same model, document and "
                        "cache settings) in place of the prefill (default: none)")
    p.add_argument("--report", help="write a JSON run report to this path (default: none)")
    p.add_argument("--trace", help="write an HTML page of what the cache retrieved, layer by layer (default: none)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for flag, policies in CACHE_FLAGS.items():
        if getattr(args, flag) is not None and args.cache not in policies:
            p.error(f"--{flag.replace('_', '-')} applies to --cache {' / '.join(policies)}, not {args.cache}")
    try:
        cache_config(args)
    except ConfigError as e:  # CacheConfig names its fields; the command line knows them as flags
        p.error(f"--{e.field.replace('_', '-')}: {e}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # false for nan too
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0):
        p.error(f"--repetition-penalty must be a finite number > 0 (1 is off), got {args.repetition_penalty}")
    if (args.rope_scale is not None or args.yarn_orig_ctx is not None) and args.rope_scaling != "yarn":
        p.error("--rope-scale and --yarn-orig-ctx go with --rope-scaling yarn")
    if args.rope_scaling == "yarn" and not (args.rope_scale is not None and 1 <= args.rope_scale <= 1024):
        p.error(f"--rope-scaling yarn needs --rope-scale F, a number from 1 to 1024 (4 turns a 32k model into a "
                f"128k one), got {args.rope_scale}")
    if args.repeat_last_n < -1:
        p.error(f"--repeat-last-n must be -1 (all tokens), 0 (none) or a count, got {args.repeat_last_n}")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    try:
        text_encoding = codecs.lookup(args.encoding)._is_text_encoding  # rot13, base64: codecs, not encodings of text
    except LookupError:
        text_encoding = None
    if not text_encoding:
        p.error(f"--encoding {args.encoding!r} is not " + ("an encoding Python knows" if text_encoding is None else
                "a text encoding") + " (e.g. utf-8, latin-1, utf-16)")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        p.error(f"--seed must be an integer of at most 64 bits (0 to {2 ** 64 - 1}), got {args.seed}")
    if args.interactive and args.prompt_file == "-":
        p.error("--interactive reads the questions from stdin: pass the document as a file, not --prompt-file -")
    for flag in ("check", "trace"):
        if args.interactive and getattr(args, flag):
            p.error(f"--{flag} follows one answer: it does not go with --interactive")
    if args.save_cache and args.load_cache:
        p.error("--save-cache and --load-cache: the loaded cache is the saved one; give one of them")
    if args.load_cache and not Path(args.load_cache).is_file():
        p.error(f"--load-cache {args.load_cache}: " + ("a directory" if Path(args.load_cache).is_dir() else "no such file")
                + " (--save-cache writes one)")
    check_outputs(p, {"report": args.report, "trace": args.trace, "save-cache": args.save_cache},
                  [("prompt-file", args.prompt_file), ("plan", args.plan), ("load-cache", args.load_cache)])
    return args


def rope_override(args) -> dict | None:
    """--rope-scaling as a config's rope_scaling (None: keep the config's)."""
    if args.rope_scaling is None:
        return None
    if args.rope_scaling == "none":
        return {"rope_type": "default"}
    s = {"rope_type": "yarn", "factor": args.rope_scale}
    return s if args.yarn_orig_ctx is None else s | {"original_max_position_embeddings": args.yarn_orig_ctx}


def load(args, device, dtype):
    """Model directory, tokenizer and model. A converted GGUF that fails to load is converted again, once."""
    model_dir = resolve_model(args.model, verify=args.verify_model)
    rope = rope_override(args)
    try:
        return model_dir, Tokenizer(model_dir), load_model(model_dir, device, dtype, rope)
    except Exception as e:  # noqa: BLE001 - any failure of a cache entry we wrote ourselves means: rebuild it
        if not is_converted(model_dir):
            if isinstance(e, (OSError, ValueError)):
                raise
            raise ValueError(f"the model in {model_dir} does not load: {type(e).__name__}: {e}") from None
        log(f"the converted model in {model_dir} does not load ({type(e).__name__}: {e}): converting it again")
        model_dir = resolve_model(args.model, rebuild=True)
        return model_dir, Tokenizer(model_dir), load_model(model_dir, device, dtype, rope)


def run(args, report: dict) -> int:
    """The whole command; `report` collects what is known as it goes (main writes it, even on Ctrl-C)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.startswith("cuda") and torch.device(device).index is not None \
            and torch.device(device).index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    text, question = read_prompt(args), args.question
    if not text.strip():
        text, question = question, None  # a question alone is the whole prompt
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    threads = set_threads(args.threads)
    report.update(device=device, dtype=str(dtype).removeprefix("torch."), cpu=cpu_name(), cpu_threads=threads,
                  stage="loading the model")
    model_dir, tok, model = load(args, device, dtype)
    chat = args.chat if args.chat is not None else bool(tok.chat_template)
    ctx = model.args.max_seq_len
    if len(text) > CHARS_PER_TOKEN * ctx:  # far more than the context: no need to tokenize it all to know
        if args.truncate == "none":
            raise UsageError(f"the prompt has {len(text):,} characters, far more than the model's {ctx:,}-token "
                             f"context holds; shorten it or pass --truncate middle")
        keep = CHARS_PER_TOKEN * ctx // 2
        text = text[:keep] + text[-keep:]  # the middle goes anyway: fit_to_context cuts the rest by tokens
    # the document's ids (the chat template's markup before it included), then, tokenized on their own, the
    # question and the markup that ends the turn: a document's cache serves whatever question follows it
    before, after = tok.chat_markup([{"role": "user"}]) if chat else ([], [])
    doc = before + tok.encode(text, add_special_tokens=not chat, special_text=args.special_tokens)

    def tail(q):
        return (tok.encode(f"\n\n{q}", add_special_tokens=False, special_text=args.special_tokens) if q else []) + after

    # a question after a document is read through the document's cache (which can then serve the next one);
    # a prompt alone is prefilled whole
    split = bool(question or args.interactive or args.save_cache or args.load_cache)
    room = max(len(tail(question)), QUESTION_ROOM if args.interactive else 0)  # cache positions after the document
    doc, max_new = fit_to_context(doc, ctx, args.max_new_tokens, args.truncate, after=room)
    if max(doc + tail(question)) >= model.args.vocab_size:
        raise UsageError(f"the tokenizer gives id {max(doc + tail(question))}, but the model's embedding has "
                         f"{model.args.vocab_size} rows: the tokenizer in {model_dir} does not belong to these weights")
    stop_ids = set(tok.eos_ids)
    sampling = sampling_of(args, model_dir)
    n_params = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())  # tied weights once
    cfg, plan_info = tailor_layers(cache_config(args), args.plan, model, bits_given=args.bits is not None,
                                   split=args.topk_split)
    rope = model.args.rope_scaling
    yarn = (f" (YaRN x{rope['factor']:g} of {rope['original_max_position_embeddings']})"
            if rope and rope["rope_type"] == "yarn" else "")
    n_prompt = len(doc) + len(tail(question))
    log(f"model {model_dir.name} ({n_params / 1e6:.0f}M params) "
        f"on {device} in {str(dtype).removeprefix('torch.')}; prompt {n_prompt} tokens of {ctx} context{yarn}"
        f"{f' (the document {len(doc)})' if split else ''}; cache {describe(cfg, model.args.n_layers)}")
    on_cuda = torch.device(device).type == "cuda"
    kernels = on_cuda if args.kernels is None else args.kernels
    if args.kernels is None and kernels and not kernels_available(device):
        kernels = False  # a CUDA torch without Triton: the PyTorch path
        log("Triton is not installed: decoding on the PyTorch path (pip install 'triton>=3.6,<3.9' for the kernels)")
    if args.kernels is None and kernels and cfg.policy in ("tailor", "sparse") and not SELECTORS[cfg.select].has_kernel_path():
        kernels = False
        log(f"the {cfg.select} selector has no kernel path: decoding on the PyTorch path")
    if kernels and not kernels_available(device):
        raise UsageError("--kernels needs Triton and a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter)")
    if args.cuda_graph and not (kernels and on_cuda):
        raise UsageError("--cuda-graph needs a CUDA device and the kernel path (drop --no-kernels)")
    report.update(model=str(model_dir), rope_scaling=rope, context=ctx, kernels=kernels, prompt_tokens=n_prompt,
                  document_tokens=len(doc) if split else None, stage="allocating the cache",
                  policy={"cache": args.cache, **vars(cfg), "prefill_chunk": args.prefill_chunk, "layer_plan": plan_info},
                  sampling={**vars(sampling), "chat": chat})
    facts = cachefile.facts(model, model_dir, doc, cfg, dtype, device) if args.save_cache or args.load_cache else None
    if args.load_cache:  # checked before the cache is allocated
        header = cachefile.read_header(args.load_cache)
        cachefile.check(header, facts, args.load_cache)
    max_len = len(doc) + room + max_new
    chunk = min(args.prefill_chunk, len(doc))  # the largest chunk this prompt makes: what the headroom is for
    cache = make_cache(cfg, model, max_len, device=device, dtype=dtype, chunk=chunk, kernels=kernels)
    check = make_cache(CacheConfig(), model, max_len, device=device, dtype=dtype, chunk=chunk) if args.check else None
    decoder, saved = Decoder(model, cache, args.cuda_graph), {}
    if args.load_cache:
        t = time.perf_counter()
        cachefile.load(cache, args.load_cache, header)
        report["cache_file"] = {"path": args.load_cache, "bytes": Path(args.load_cache).stat().st_size,
                                "load_s": time.perf_counter() - t}
        log(f"the document's cache ({len(doc)} tokens) loaded from {args.load_cache} in {report['cache_file']['load_s']:.2f} s")
        saved["snapshot"] = cache.snapshot()

    def on_prefill():  # the document is in the cache: save it, keep a snapshot for the next question
        if args.save_cache:
            report["cache_file"] = save_cache(cache, args.save_cache, facts, model)
            saved["ok"] = report["cache_file"] is not None
        if args.interactive:
            saved["snapshot"] = cache.snapshot()

    from tqdm import tqdm
    answer = Answer()
    if answer.absent:
        log("note: stdout is closed: the answer goes to the --report only")

    def ask(q):
        """One answer: the document prefilled (the first time) or restored, the question read, the answer decoded."""
        if cache.length not in (0, len(doc)):
            cache.restore(saved["snapshot"])
        ids = doc + tail(q)
        bar = tqdm(total=model.args.n_layers, unit="layer", desc="prefill", file=sys.stderr, leave=False,
                   disable=cache.length > 0,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} layers [{elapsed}<{remaining}]")
        stream = StreamDecoder(tok)

        def on_token(t):
            bar.close()  # the first token ends the prefill; closing again is a no-op
            answer.write(stream.push(t))

        try:
            out, stats = generate(model, cache, ids, max_new_tokens=max_new, stop_ids=stop_ids, sampling=sampling,
                                  on_token=on_token, progress=lambda f: bar.update(min(f, bar.total - bar.n)),
                                  chunk_size=args.prefill_chunk, check_cache=check, record=bool(args.trace),
                                  prefill=len(doc) if split else None, decoder=decoder,
                                  on_prefill=lambda: (bar.close(), on_prefill()))
        except NonFiniteLogits as e:
            raise UsageError(f"{e}: the model in {model_dir} is broken or overflows in {report['dtype']}; check its "
                             f"files with --verify-model, convert it again (delete that folder), or try --dtype float32") from None
        finally:
            bar.close()  # before any message: a line of its own
        try:
            answer.write("\n")
        except OutputClosed:
            stats["interrupted"], stats["signal"] = True, "SIGPIPE"
        if stats.get("signal") == "SIGPIPE":
            log(f"stdout closed after {len(out)} generated tokens: stopped")
        log(stats_line(stats, len(out), threads if not on_cuda else None) +
            f"; peak memory {peak_memory(device) / 2**30:.2f} GiB")
        turn = {"question": q, "generated_ids": out, "generated_text": tok.decode(out, skip_special_tokens=True),
                **{k: stats[k] for k in ("prompt_tokens", "prefill_tokens", "read_tokens", "prefilled", "prefill_s",
                                         "prefill_tok_per_s", "read_s", "first_step_s", "first_token_s",
                                         "decode_ms_per_token", "interrupted")}, "signal": stats.get("signal")}
        report.setdefault("turns", []).append(turn)
        report.update({k: v for k, v in turn.items() if k != "question"}, cuda_graph=stats.get("cuda_graph", False),
                      check=stats.get("check"), peak_memory_bytes=peak_memory(device))
        return stats

    def questions():  # --question (or none), then with --interactive those of stdin
        if question or not args.interactive:
            yield question
        while args.interactive:
            report["stage"] = "waiting for a question"
            q = next_question(room, tail)
            if q is None:
                return
            yield q

    def stops(stats):  # a signal ends the run, except Ctrl-C in an --interactive answer: the next question comes
        return stats["interrupted"] and not (args.interactive and stats["signal"] == "SIGINT" and stats["prefilled"])

    stats, written = None, True
    for q in questions():
        report["stage"] = "generating"
        stats = ask(q)
        if len(report["turns"]) == 1:
            written = summary(args, stats, cache, tok, doc + tail(q), report, plan_info, model_dir, describe(cfg, model.args.n_layers))
        if stops(stats):
            break
    if on_cuda:
        report["gpu"] = torch.cuda.get_device_name(device)
    if stats and stops(stats):
        report["stage"] = "decoding" if stats["prefilled"] else "prefilling"
        return EXIT[stats["signal"]]
    report["stage"] = "done"
    return 0 if written and saved.get("ok", True) else 1


def summary(args, stats, cache, tok, ids, report, plan_info, model_dir, title) -> bool:
    """After the first answer: what the cache holds, what online identification decided, the --check and --trace
    results; False if the trace could not be written."""
    mem = cache.memory_report() if stats["prefilled"] else None  # an interrupted prefill holds no cache yet
    if mem:
        log(memory_table(mem))
    if cache.decisions() and mem:
        log(f"online layer plan: quantized layers {cache.decisions()['quant_layers']} "
            f"(proxy per layer: {' '.join(f'{x:.2f}' for x in cache.decisions()['proxy'])})")
    if "check" in stats:
        c = stats["check"]
        log("check vs full cache, per step (KL nats / top-1): " +
            " ".join(f"{r['kl']:.3f}{'' if r['top1'] else '*'}" for r in c["steps"][:64]) +
            (" ..." if len(c["steps"]) > 64 else "") + "  (* = top-1 differs)")
        log(f"check summary: {len(c['steps'])} steps, top-1 agreement {c['top1_agreement']:.3f}, "
            f"mean KL {c['mean_kl']:.4f}, max KL {c['max_kl']:.4f}")
    report["policy"].update(kinds=cache.kinds, layer_plan=(cache.decisions() if mem else None) or plan_info)
    report.update(kv_cache=mem)
    if args.trace and mem:
        return write_trace(args.trace, tok, ids, cache, stats, mem, f"{model_dir.name}: {title}")
    return True


def next_question(room: int, tail) -> str | None:
    """--interactive: the next line of stdin that holds a question ('> ' first on a terminal); None at the end of
    input or '/quit'. A question longer than the room the cache keeps for one is refused, and the next read."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return None
        q = line.strip()
        if q and len(tail(q)) > room:
            log(f"this question is {len(tail(q))} tokens; the cache keeps room for {room} after the document: ask it "
                f"in fewer words")
        elif q:
            return q


def save_cache(cache, path: str, facts: dict, model) -> dict | None:
    """--save-cache: the document's cache to a file, its size against a full cache's; None (said) if it failed."""
    t = time.perf_counter()
    try:
        size = cachefile.save(cache, path, facts)
    except OSError as e:
        log(f"error: --save-cache {path}: {e.strerror or e}")
        return None
    a = model.args
    full = 2 * a.n_layers * a.n_kv_heads * a.head_dim * cache.length * torch.empty((), dtype=cache.dtype).element_size()
    log(f"the document's cache ({cache.length} tokens) saved to {path} in {time.perf_counter() - t:.2f} s: "
        f"{size / 2**20:.2f} MiB (a full cache of it: {full / 2**20:.2f} MiB)")
    return {"path": path, "bytes": size, "full_cache_bytes": full, "save_s": time.perf_counter() - t}


def sampling_of(args, model_dir: Path) -> Sampling:
    """The sampling flags; a repetition penalty not given comes from the model's generation_config.json."""
    penalty = args.repetition_penalty
    config = model_dir / "generation_config.json"
    if penalty is None and config.is_file():
        gen = read_json_object(config)
        check_fields(gen, config, numbers=("repetition_penalty",))
        penalty = gen.get("repetition_penalty")
        if penalty is not None:
            log(f"repetition penalty {penalty} from the model's generation_config.json (--repetition-penalty 1: off)")
    return Sampling(args.temperature, args.top_p, args.seed, float(penalty or Sampling.repetition_penalty),
                    args.repeat_last_n)


def write_trace(path: str, tok, ids: list[int], cache, stats: dict, mem: dict, title: str) -> bool:
    """generate.py --trace: the page of trace_page.py, from the recorder read back once, here. -> written."""
    import trace_page
    tokens = [tok.decode([i]) for i in ids]
    data = trace_page.page_data(tokens, cache.kinds, cache.cfg, stats["trace"].positions.cpu(), stats["steps"], mem,
                                title)
    if not write_output("trace", path, trace_page.render(data)):
        return False
    log(f"trace: {path}")
    return True


def stats_line(stats: dict, n_out: int, threads: int | None) -> str:
    """One line of what a run did, whatever point it reached (Ctrl-C may stop it anywhere)."""
    on = f" on {threads} CPU thread{'s' if threads != 1 else ''}" if threads else ""
    if not stats["prefilled"]:
        return (f"[interrupted] in the prefill of {stats['prefill_tokens']} tok after {stats['prefill_s']:.2f} s{on}; "
                f"nothing generated")
    decode = stats["decode_ms_per_token"]
    parts = [f"prefill {stats['prefill_tokens']} tok in {stats['prefill_s']:.2f} s ({stats['prefill_tok_per_s']:.0f} tok/s){on}"
             if stats["prefill_tokens"] else f"the document's {stats['prompt_tokens'] - stats['read_tokens']} tok from its cache"]
    if stats["read_tokens"]:
        parts.append(f"read {stats['read_tokens']} tok in {stats['read_s']:.2f} s")
    if stats["first_token_s"] is not None:
        parts.append(f"first token after {stats['first_token_s']:.2f} s")
    parts.append(f"decode {n_out} tok" + (f" at {decode:.1f} ms/tok" if decode else "") +
                 (f" after a first step of {1e3 * stats['first_step_s']:.0f} ms" if stats["first_step_s"] else ""))
    return ("[interrupted] " if stats["interrupted"] else "") + "; ".join(parts)


def tailor_layers(cfg: CacheConfig, plan_path, model, *, bits_given=False, split=None) -> tuple[CacheConfig, dict | None]:
    """Which layers tailor quantizes: --quant-layers, else the plan (--plan, or found by fingerprint),
    else decided online during the prefill. A plan's decisions hold for its bit width, which is
    used unless --bits says otherwise. With split "plan", the offloaded layers' top-k is the plan's split
    of the same total (layer_plans.split_topk); else the same on every layer."""
    from layer_plans import PLANS, find_plan, load_plan, split_topk
    if cfg.policy != "tailor":
        if plan_path:
            raise UsageError("--plan applies to --cache tailor only")
        return cfg, None
    if split == "plan" and cfg.quant_layers is not None:
        raise UsageError("--topk-split plan splits the plan's offloaded layers; drop --quant-layers or the split")
    if cfg.quant_layers is not None:
        return cfg, {"source": "--quant-layers", "quant_layers": list(cfg.quant_layers)}
    path = Path(plan_path) if plan_path else find_plan(model)
    if plan_path and not path.is_file():
        raise UsageError(f"plan file {path} " + ("is a directory; pass a plan file (plans/<model>.json)" if path.is_dir()
                                                 else "does not exist"))
    if path is None:
        if split == "plan":
            raise UsageError(f"--topk-split plan: no layer plan for this model in {PLANS}; make one with: "
                             f"python profile_layers.py --model <model>")
        log(f"no layer plan for this model in {PLANS}: deciding online from the prompt's prefill "
            f"(mass outside the top {cfg.alpha:.0%} keys > {cfg.tau} -> quantize); "
            f"make one with: python profile_layers.py --model <model>")
        return cfg, None
    plan = load_plan(path, model)
    bits = cfg.bits if bits_given else plan["parameters"]["bits"]
    layer_topk = split_topk(plan, cfg.topk) if split == "plan" else ()
    if split == "plan" and not layer_topk:
        raise UsageError(f"plan {path} has no top-k split (made before profile_layers.py measured the tails); "
                         f"make a new one, or drop --topk-split")
    log(f"layer plan {path}: quantize layers {plan['quant_layers']} to {plan['parameters']['bits']} bits "
        f"({plan['parameters'].get('method', 'unknown')} method)" + (f"; running them at --bits {bits}" if bits != plan["parameters"]["bits"] else "")
        + ("; the offloaded layers' top-k split by the plan" if layer_topk else ""))
    return (replace(cfg, quant_layers=tuple(plan["quant_layers"]), bits=bits, layer_topk=layer_topk),
            {"source": str(path), "quant_layers": plan["quant_layers"], "bits": plan["parameters"]["bits"],
             "layer_topk": list(layer_topk)})


def describe(cfg: CacheConfig, n_layers: int) -> str:
    quant = QUANTIZERS[cfg.quantizer].describe(cfg)
    if cfg.online:
        return (f"tailor [online: quant {quant} where the proxy > {cfg.tau}, else offload: sink {cfg.sink} + "
                f"recent {cfg.recent} + top-{cfg.topk} by {cfg.select}]")
    kinds = cfg.layer_kinds(n_layers)
    parts = []
    if "quant" in kinds:
        parts.append(f"quant {quant} g={cfg.group} R={cfg.residual} on layers "
                     f"{','.join(str(i) for i, k in enumerate(kinds) if k == 'quant') if len(set(kinds)) > 1 else 'all'}")
    if "sparse" in kinds:
        ks = [cfg.topk_of(i) for i, kind in enumerate(kinds) if kind == "sparse"]
        topk = f"{min(ks)}..{max(ks)} (split by layer, {sum(ks)} in all)" if len(set(ks)) > 1 else ks[0]
        parts.append(f"offload {kinds.count('sparse')} layers: sink {cfg.sink} + recent {cfg.recent} + top-{topk} "
                     f"by {cfg.select}" + SELECTORS[cfg.select].describe(cfg))
    if "window" in kinds:
        parts.append(f"sink {cfg.sink} + recent {cfg.recent} only")
    return f"{cfg.policy}" + (f" [{'; '.join(parts)}]" if parts else "")


def memory_table(mem: dict) -> str:
    mib = lambda b: f"{b / 2**20:9.2f}"  # noqa: E731
    rows = [f"{'KV cache':<9}{'layers':>7}{'device MiB':>12}{'host MiB':>10}{'H2D KiB/step':>14}{'vs full':>9}"]
    for kind, r in mem["by_kind"].items():
        rows.append(f"{kind:<9}{r['layers']:>7}{mib(r['device_bytes']):>12}{mib(r['host_bytes']):>10}"
                    f"{r['h2d_bytes_per_step'] / 1024:>14.1f}{r['full_cache_bytes'] / r['device_bytes']:>8.1f}x")
    rows.append(f"{'total':<9}{sum(r['layers'] for r in mem['by_kind'].values()):>7}{mib(mem['device_bytes']):>12}"
                f"{mib(mem['host_bytes']):>10}{mem['h2d_bytes_per_step'] / 1024:>14.1f}{mem['compression']:>8.1f}x")
    return "\n".join(rows)


EXIT = {"SIGINT": 130, "SIGTERM": 143, "SIGPIPE": 141}  # as a shell reports a process that signal ended


def signal_of(e: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(e, Terminated) else "SIGPIPE" if isinstance(e, OutputClosed) else "SIGINT"


def main(argv=None) -> int:
    """The command: any failure is one line on stderr and an exit status (2: what was asked cannot be done; 1: an
    output could not be written; 130/143/141: Ctrl-C, SIGTERM, stdout closed); the report is written in every case."""
    guard_streams()
    args = parse_args(argv)
    report = {"interrupted": False, "stage": "reading the prompt"}
    before = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        rc = run(args, report)
    except ConfigError as e:
        report["error"] = f"--{e.field.replace('_', '-')}: {e}"
        rc = 2
    except (UsageError, FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        report["error"], rc = str(e), 2
    except KeyboardInterrupt as e:  # loading or converting the model; generation handles its own
        log(f"[interrupted] while {report['stage']}")
        report["interrupted"], report["signal"] = True, signal_of(e)
        rc = EXIT[report["signal"]]
    finally:
        signal.signal(signal.SIGTERM, before)
    if "error" in report:
        log(f"error: {report['error']}")
    if args.report:
        report["versions"] = versions()
        if not write_output("report", args.report, json.dumps(report, indent=2)) and rc == 0:
            rc = 1  # the answer was given; the report it was asked for is not there
    return rc


if __name__ == "__main__":
    sys.exit(main())
