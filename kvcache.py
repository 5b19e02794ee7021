"""KV caches: the full baseline and the TailorKV hybrid (arXiv 2505.19586), in plain PyTorch.

The model calls the cache once per attention layer (q: (B, H, T, hd) with RoPE, k, v: (B, n_kv, T, hd),
x: (B, T, dim) the layer's normalised input; out: (B, H, T, hd), attention over everything cached):

    out = cache.prefill(layer, q, k, v, start, x)   # a prompt chunk, exact attention (model.prefill)
    cache.end_prefill()                             # after the last chunk of the last layer
    out = cache.decode(layer, q, k, v, pos, x)      # a decode step, the position an int (PyTorch)
    out = cache.step(layer, q, k, v, pos, x)        # a decode step, the position a device tensor
    cache.advance(length)                           # after each device step: host-side bookkeeping
    snap = cache.snapshot(); cache.restore(snap)    # back to an earlier length (a document, before a question)

Each layer has one strategy, an object with the LayerCache interface:
  full    K/V in preallocated device buffers (FullLayer, the worked example).
  quant   KIVI-style codes (quant.QuantStore), keys per channel, values per token; a full-precision ring.
          Another compressor plugs in by name (QUANTIZERS, as selectors do; research/kvcomp.py's).
  sparse  K/V of every token in (pinned) host memory; on the device the `sink` first tokens, a sliding
          window of the `recent` newest and what its selector (SELECTORS) needs to pick the top-k
          offloaded tokens per KV head, which are gathered to the device each step.
  window  sinks + recent window only (StreamingLLM): a sparse layer with top-k = 0 and no host store.

Compressed caches hold batch 1; buffers are preallocated at their final size. Each strategy decodes
two ways: `decode` in PyTorch (the reference and the CPU path) and `step` on the Triton kernels of
kernels.py, with the position in a device tensor so that a CUDA graph captures the whole step.
"""
from dataclasses import dataclass
from typing import Protocol

import torch

from layer_plans import ProxyMeter
from model import apply_rope, attention
from quant import QuantStore

try:  # the Triton kernels of the GPU decode path; CUDA builds of torch bring Triton along
    import kernels as ops
except ImportError:
    ops = None

POLICIES = ("full", "tailor", "kivi", "sparse", "streaming")
DEFAULT_BITS = {"tailor": 1, "kivi": 2}  # TailorKV-1 (the paper's LongBench/latency setting), KIVI-2


class ConfigError(ValueError):
    """A CacheConfig value that cannot work; `field` names it (the CLI maps it to its flag)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class CacheConfig:
    """Every knob of every policy, with the defaults generate.py exposes as flags."""
    policy: str = "full"
    quant_layers: tuple[int, ...] | None = None  # tailor: quantized layers, the rest offloaded; None: online
    layers: tuple[str, ...] = ()          # explicit kind per layer (full|quant|sparse|window), overrides policy
    bits: int | None = None               # quant layers; None: DEFAULT_BITS[policy]
    group: int = 64                       # g: tokens per key group, channels per value group
    residual: int = 128                   # R: full-precision window of a quant layer
    budget: int = 192                     # device-resident tokens of a sparse layer: sink + recent + top-k
    layer_topk: tuple[int, ...] = ()      # each layer's top-k where offloaded (a plan's split); (): the budget's
    sink: int = 8
    recent: int = 56
    select: str = "sketch"                # sparse selector: a name in SELECTORS
    channels: int = 8                     # C: channels the `channels` selector scores on
    sketch_bits: int = 2                  # bits of the `sketch` selectors' key copy
    quantizer: str = "kivi"               # the quant layers' strategy: a name in QUANTIZERS
    alpha: float = 0.05                   # proxy: attention mass outside each query's top alpha of keys...
    tau: float = 0.2                      # ...above tau marks a layer as quantization-friendly
    proxy_queries: int = 32               # proxy: the last queries of each prefill chunk it looks at

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError("policy", f"unknown cache policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.bits is None:
            self.bits = DEFAULT_BITS.get(self.policy, 2)
        for name, value, allowed in (("bits", self.bits, (1, 2, 4, 8)), ("sketch_bits", self.sketch_bits, (1, 2, 4, 8)),
                                     ("select", self.select, tuple(SELECTORS)),
                                     ("quantizer", self.quantizer, tuple(QUANTIZERS))):
            if value not in allowed:
                raise ConfigError(name, f"{name} must be one of {allowed}, got {value!r}")
        if self.group <= 0 or self.group % 32:
            raise ConfigError("group", f"group must be a positive multiple of 32 (codes pack 32 bits per int32), "
                                       f"got {self.group}")
        if self.residual < self.group or self.residual % self.group:
            raise ConfigError("residual", f"residual must be a multiple of group ({self.group}), got {self.residual}")
        if self.sink < 0 or self.recent < 1:
            raise ConfigError("sink" if self.sink < 0 else "recent",
                              f"sink must be >= 0 and recent >= 1, got {self.sink} and {self.recent}")
        if self.policy in ("tailor", "sparse") and self.topk < 1:
            raise ConfigError("budget", f"budget {self.budget} leaves no room for retrieved tokens after sink "
                                        f"{self.sink} and recent {self.recent}; raise it above {self.sink + self.recent}")
        if self.layer_topk and min(self.layer_topk) < 1:
            raise ConfigError("layer_topk", f"every layer's top-k must be >= 1, got {list(self.layer_topk)}")
        if self.channels < 1:
            raise ConfigError("channels", f"channels must be >= 1, got {self.channels}")

    @property
    def topk(self) -> int:
        return self.budget - self.sink - self.recent

    def topk_of(self, layer: int) -> int:
        """The top-k of `layer` where it is offloaded."""
        return self.layer_topk[layer] if self.layer_topk else self.topk

    @property
    def max_topk(self) -> int:
        return max(self.layer_topk or (self.topk,))

    @property
    def online(self) -> bool:
        return self.policy == "tailor" and self.quant_layers is None and not self.layers

    def layer_kinds(self, n_layers: int) -> list[str | None]:
        """The strategy of each layer; None where it is decided online at the end of its prefill."""
        if self.layer_topk and len(self.layer_topk) != n_layers:
            raise ConfigError("layer_topk", f"layer_topk names {len(self.layer_topk)} layers; the model has {n_layers}")
        if self.layers:
            if len(self.layers) != n_layers or set(self.layers) - {"full", "quant", "sparse", "window"}:
                raise ConfigError("layers", f"layers must name full|quant|sparse|window for each of {n_layers} layers")
            return list(self.layers)
        if self.online:
            return [None] * n_layers
        if self.policy == "tailor":
            bad = [i for i in self.quant_layers if not 0 <= i < n_layers]
            if bad:
                raise ConfigError("quant_layers", f"quant_layers {bad} out of range for a {n_layers}-layer model")
            return ["quant" if i in self.quant_layers else "sparse" for i in range(n_layers)]
        return [{"full": "full", "kivi": "quant", "sparse": "sparse", "streaming": "window"}[self.policy]] * n_layers


# ---------------------------------------------------------------------------- layer strategies

class LayerCache(Protocol):
    """What every layer strategy provides (FullLayer, QuantLayer, SparseLayer; batch 1 unless full).

    load(k, v, start)     take the exact K/V (1, n_kv, T, hd) of positions start.. (the prompt, at the end
                          of the layer's prefill)
    decode(q, k, v, pos)  PyTorch: append the new token's k, v (1, n_kv, 1, hd) at position pos (an int),
                          return its attention output (1, H, 1, hd); step: the same on the kernels, pos a
                          0-dim device tensor, no host sync; advance(length): after device steps
    state()               what it holds at its length, as named views (KVCache.snapshot, cache files), of
                          which `rewritten` names those later steps overwrite in place (rings, rows): the
                          rest are append-only; set_length(n): hold n tokens (state() then views them)
    telemetry             device_tensors(), host_tensors(): what it holds; h2d_bytes moved by `steps` steps
    """
    kind: str
    h2d_bytes: int
    steps: int
    rewritten: tuple[str, ...]

    def load(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None: ...
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor: ...
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor: ...
    def advance(self, length: int) -> None: ...
    def state(self) -> dict[str, torch.Tensor]: ...
    def set_length(self, length: int) -> None: ...
    def device_tensors(self) -> list[torch.Tensor]: ...
    def host_tensors(self) -> list[torch.Tensor]: ...


class FullLayer:
    """The worked example: K and V of every position in two preallocated device buffers."""
    kind = "full"
    rewritten = ()

    def __init__(self, n_kv, hd, max_len, batch, device, dtype, n_heads=None, kernels=False):
        self.k = torch.empty(batch, n_kv, max_len, hd, device=device, dtype=dtype)  # (B, n_kv, max_len, hd)
        self.v = torch.empty_like(self.k)
        self.length, self.h2d_bytes, self.steps = 0, 0, 0
        self.split = self.ws = None
        if kernels:  # the split-K (flash-decoding) plan of the kernel path and its scratch
            self.split, n = ops.split_plan(max_len, n_kv, 64)
            self.ws = ops.Workspace(n_heads, n, hd, device)

    def load(self, k, v, start):
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end

    def decode(self, q, k, v, start):
        self.load(k, v, start)
        self.steps += 1
        return attention(q, self.k[:, :, :self.length], self.v[:, :, :self.length])

    def step(self, q, k, v, pos):
        self.k[0].index_copy_(1, pos.view(1), k[0])
        self.v[0].index_copy_(1, pos.view(1), v[0])
        return ops.dense_attend(q[0, :, 0].contiguous(), self.k[0], self.v[0], pos, self.ws, self.split)[None, :, None]

    def advance(self, length):
        self.length = length
        self.steps += 1

    def state(self) -> dict:
        return {"k": self.k[:, :, :self.length], "v": self.v[:, :, :self.length]}

    def set_length(self, length):
        self.length = length

    def device_tensors(self):
        return [self.k, self.v]

    def host_tensors(self):
        return []


class QuantLayer:
    """KIVI-style quantized K/V (see QuantStore); exact attention during prefill."""
    kind = "quant"

    @classmethod
    def describe(cls, cfg: CacheConfig) -> str:
        return f"{cfg.bits}-bit"

    def __init__(self, n_kv, hd, max_len, cfg: CacheConfig, device, dtype, n_heads=None, kernels=False):
        kw = dict(bits=cfg.bits, group=cfg.group, residual=cfg.residual, device=device, dtype=dtype, kernels=kernels)
        self.keys = QuantStore(n_kv, hd, max_len, per_channel=True, **kw)
        self.values = QuantStore(n_kv, hd, max_len, per_channel=False, **kw)
        self.h2d_bytes, self.steps = 0, 0
        self.split = self.ws = None
        if kernels:
            self.split, n = ops.split_plan(self.keys.codes.shape[2] * (32 // cfg.bits), n_kv, cfg.group)
            self.ws = ops.Workspace(n_heads, n + 1, hd, device)  # + 1: the residual ring's split

    def load(self, k, v, start):
        assert start == len(self.keys), "tokens arrive in order"
        self.keys.append(k[0])
        self.values.append(v[0])

    def decode(self, q, k, v, pos):
        self.load(k, v, pos)
        self.steps += 1
        keys, values = self.keys.dequantize(), self.values.dequantize()  # (n_kv, S, hd) fp32
        return attention(q.float(), keys[None], values[None]).to(q.dtype)

    def step(self, q, k, v, pos):
        ops.quantize_step(self.keys, k[0, :, 0].contiguous(), pos)
        ops.quantize_step(self.values, v[0, :, 0].contiguous(), pos)
        return ops.quant_attend(q[0, :, 0].contiguous(), self.keys, self.values, pos, self.ws, self.split)[None, :, None]

    def advance(self, length):
        self.set_length(length)
        self.steps += 1

    rewritten = ("k.res", "v.res")

    def state(self):
        return {f"{kv}.{name}": t for kv, store in (("k", self.keys), ("v", self.values))
                for name, t in store.state().items()}

    def set_length(self, length):
        self.keys.advance(length)
        self.values.advance(length)

    def device_tensors(self):
        return self.keys.tensors() + self.values.tensors()

    def host_tensors(self):
        return []


# --------------------------------------------------------------------------------- selectors

class Selector:
    """How a sparse layer ranks its offloaded tokens at each decode step: a subclass and one entry in
    SELECTORS. The layer owns the top-k and the rows it brings to the device; a selector only scores. The
    offloaded positions are [sink, first recent); q (H, hd) are the step's queries, one group of
    G = H / n_kv query heads per KV head. A subclass writes what it needs of:
      scores(q, lo, hi) -> (n_kv, hi - lo)   PyTorch path: a score per offloaded position lo..hi-1
      step_scores(q, pos, out, sink, recent) kernel path: into out (n_kv, width) at the offloaded
                                             positions of the step at device position pos, -inf elsewhere
      append(k) / step_append(k, pos)        keys (n_kv, T, hd) entering the layer / the step's (n_kv, hd)
      advance(length)                        after device steps: the layer holds `length` tokens
      see_previous_input(x, pos)             the layer before's normalised input (1, 1, dim), this step
      tensors(), host_tensors(), h2d_bytes(n_off)   telemetry: what it holds, what a step's scoring moves
      state(), rewritten                     what it holds at its length, as a layer's (LayerCache)
    and declares to the cache, as class methods (the cache names no selector):
      check(cfg, head_dim, kernels)           refuse a configuration it cannot serve
      shared(cfg, ...)                        working memory all layers share (they select one at a time)
      describe(cfg)                           its settings, for a one-line description of the cache
    """

    per_head = False  # how scores() ranks keys: the group's mean query, or each query head (see rank)
    predicts_query = False  # whether see_previous_input predicts this layer's query (see predicted)

    def __init__(self, layer: "SparseLayer", cfg: CacheConfig, wq: torch.nn.Linear, inv_freq: torch.Tensor):
        self.layer = layer
        self.n_kv, _, self.hd = layer.att_k.shape
        self.wq, self.inv_freq = wq, inv_freq
        self.qhat = None  # (H, hd) the predicted query: None until a layer before this one has run

    # ---- what the cache asks of a selector class, before any layer exists

    @classmethod
    def has_kernel_path(cls) -> bool:
        return cls.step_scores is not Selector.step_scores

    @classmethod
    def check(cls, cfg: CacheConfig, head_dim: int, kernels: bool):
        """Raise ConfigError for a configuration this selector cannot serve."""
        if kernels and not cls.has_kernel_path():
            raise ConfigError("select", f"the {cfg.select!r} selector has no kernel path: decode on the PyTorch "
                                        f"path (kernels off)")

    @classmethod
    def shared(cls, cfg: CacheConfig, *, max_len: int, n_kv: int, hd: int, n_heads: int | None, device, dtype,
               kernels: bool) -> dict:
        """The kernel path's working memory: the score buffer (n_kv, width), whole blocks of the sketch kernel,
        fp16 for a 16-bit model (scores only rank tokens, and the top-k's radix select over 16-bit keys takes
        half the passes), and the top-k's candidates (kernels.Candidates). Not counted as memory held, as the
        attention kernels' Workspace is not."""
        if not kernels:
            return {}
        unit = ops.SKETCH_NB * cfg.group  # the sketch kernel scores SKETCH_NB groups per program
        width = -(-max(max_len, cfg.max_topk) // unit) * unit
        scores = torch.empty(n_kv, width, device=device, dtype=torch.float32 if dtype == torch.float32 else torch.float16)
        return {"scores": scores, "candidates": ops.Candidates(n_kv, width, device, scores.dtype)}

    @classmethod
    def describe(cls, cfg: CacheConfig) -> str:
        return ""

    # ---- one layer's scoring

    def see_previous_input(self, x, pos):
        """With predicts_query: this layer's query at pos (an int or a device tensor) predicted one layer early,
        W_q of this layer (with RoPE) applied to the previous layer's normalised input x (1, 1, dim)."""
        if self.predicts_query:
            qhat = self.wq(x).view(1, 1, -1, self.hd).transpose(1, 2)  # (1, H, 1, hd)
            freqs = pos * self.inv_freq
            self.qhat = apply_rope(qhat, freqs.cos()[None], freqs.sin()[None])[0, :, 0]

    def predicted(self, q: torch.Tensor) -> torch.Tensor:
        """The predicted query where there is one, else the step's own (layer 0 has no layer before it)."""
        return q if self.qhat is None else self.qhat

    def group_queries(self, q: torch.Tensor) -> torch.Tensor:
        """(H, hd) -> (n_kv, hd): one query per KV head, the mean of its group, in fp32."""
        return q.view(self.n_kv, -1, q.shape[-1]).float().mean(1)

    def rank(self, keys: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """keys (n_kv, n, hd) fp32 against the step's queries q (H, hd) -> a score per key (n_kv, n):
        the group's mean query (one dot product per key), or with per_head each query head's own softmax
        over these keys, and the largest of them (a key one head needs is kept, whatever the others do)."""
        if not self.per_head:
            return (keys @ self.group_queries(q)[:, :, None])[..., 0]
        s = keys @ (q.view(self.n_kv, -1, q.shape[-1]).float() * self.hd ** -0.5).transpose(1, 2)  # (n_kv, n, G)
        return s.log_softmax(1).amax(-1)

    def append(self, k): pass
    def step_append(self, k, pos): pass
    def advance(self, length): pass
    def scores(self, q, lo, hi): raise NotImplementedError

    def step_scores(self, q, pos, out, sink, recent):
        raise NotImplementedError(f"{type(self).__name__} has no kernel path")

    def tensors(self) -> list: return []
    def host_tensors(self) -> list: return []
    def h2d_bytes(self, n_off: int) -> int: return 0
    rewritten = ()
    def state(self) -> dict: return {}  # as a layer's (LayerCache); advance(length) sets its length


class SketchSelector(Selector):
    """A low-bit copy of every key on the device (per channel, groups of g tokens, token-major), scored
    against each KV head's mean query: every offloaded token on every channel, no host traffic."""

    @classmethod
    def check(cls, cfg, head_dim, kernels):
        super().check(cfg, head_dim, kernels)
        if head_dim % (32 // cfg.sketch_bits):
            raise ConfigError("sketch_bits", f"a {cfg.sketch_bits}-bit sketch packs {32 // cfg.sketch_bits} channels "
                                             f"per int32, which does not divide head_dim {head_dim}")

    @classmethod
    def describe(cls, cfg):
        return f" ({cfg.sketch_bits}-bit)"

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        scores = layer.shared.get("scores")  # the kernel scores whole blocks of groups: capacity up to its width
        self.store = QuantStore(self.n_kv, self.hd, layer.max_len, bits=cfg.sketch_bits, group=cfg.group,
                                residual=cfg.group, per_channel=True, token_major=True, device=layer.att_k.device,
                                dtype=layer.att_k.dtype, kernels=layer.kernels,
                                capacity=None if scores is None else scores.shape[1])

    def append(self, k):
        self.store.append(k)

    def step_append(self, k, pos):
        ops.quantize_step(self.store, k, pos)

    def advance(self, length):
        self.store.advance(length)

    def scores(self, q, lo, hi):
        return self.rank(self.store.dequantize()[:, lo:hi], q)                # (n_kv, n_off)

    def step_scores(self, q, pos, out, sink, recent):
        ops.sketch_scores(q, self.store, pos, out, sink, recent)

    def tensors(self):
        return self.store.tensors()

    rewritten = ("res",)

    def state(self):
        return self.store.state()


class HeadwiseSketchSelector(SketchSelector):
    """The sketch, ranked by each query head of the group on its own (Selector.rank, per_head): a key that
    one head of a group attends to is not averaged away by the others. The kernel path scores every head
    into a scratch the layers share, then takes the largest log-softmax per key."""
    per_head = True

    @classmethod
    def shared(cls, cfg, *, n_heads, **kw):
        shared = super().shared(cfg, n_heads=n_heads, **kw)
        if "scores" in shared and n_heads:
            s = shared["scores"]
            shared["heads"] = ops.HeadScratch(n_heads, s.shape[1], s.device, s.dtype, ops.LAUNCH["heads"][0] * cfg.group)
        return shared

    @classmethod
    def describe(cls, cfg):
        return f" ({cfg.sketch_bits}-bit, per query head)"

    def step_scores(self, q, pos, out, sink, recent):
        ops.sketch_scores(q, self.store, pos, out, sink, recent, heads=self.head_scratch(q, out))

    def head_scratch(self, q, out):
        shared = self.layer.shared
        if "heads" not in shared:  # a layer built on its own: a scratch of its own
            shared["heads"] = ops.HeadScratch(q.shape[0], out.shape[1], out.device, out.dtype, ops.LAUNCH["heads"][0] * self.store.g)
        return shared["heads"]


class ChannelSelector(Selector):
    """The paper's: the C channels per KV head with the largest |q^_c| * max_t |K[t, c]|, where q^ is
    this layer's query predicted one layer early (W_q of this layer, with RoPE, applied to the previous
    layer's normalised input); every offloaded token is scored on those channels, read from host memory
    each step. As in the paper's code, the keys have a second, channel-major copy in host memory
    (n_kv, hd, max_len), so that a channel of every token is one contiguous read, not one 2-byte read per
    token out of the token-major store."""

    predicts_query = True

    @classmethod
    def check(cls, cfg, head_dim, kernels):
        super().check(cfg, head_dim, kernels)
        if cfg.channels > head_dim:
            raise ConfigError("channels", f"channels {cfg.channels} exceeds the model's head_dim {head_dim}: "
                                          f"choose 1..{head_dim}")

    @classmethod
    def describe(cls, cfg):
        return f" (C={cfg.channels})"

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        self.C = cfg.channels
        self.kmax = torch.zeros(self.n_kv, self.hd, device=layer.att_k.device, dtype=layer.att_k.dtype)
        host = layer.host_k
        pin = host.is_pinned() if host.device.type == "cpu" else False
        self.host_kc = torch.empty(self.n_kv, self.hd, host.shape[0], dtype=host.dtype, device=host.device,
                                   pin_memory=pin)
        self.length = 0  # keys written to host_kc by append (the PyTorch path and the prefill)

    def append(self, k):
        torch.maximum(self.kmax, k.abs().amax(1), out=self.kmax)
        n = k.shape[1]
        self.host_kc[:, :, self.length:self.length + n].copy_(k.transpose(1, 2), non_blocking=True)
        self.length += n

    def step_append(self, k, pos):
        torch.maximum(self.kmax, k.abs(), out=self.kmax)
        ops.channel_append(k, pos, self.host_kc)

    def advance(self, length):
        self.length = length

    def channels(self, q):
        """(n_kv, C) channel ids per KV head."""
        qhat = self.group_queries(self.predicted(q))
        return (qhat.abs() * self.kmax.float()).topk(self.C, dim=-1).indices

    def scores(self, q, lo, hi):
        ch = self.channels(q)
        # the paper's data path: C channels of every offloaded key cross host -> device each step
        cols = self.host_kc[torch.arange(self.n_kv)[:, None], ch.cpu(), lo:hi]              # (n_kv, C, n_off)
        kc = cols.to(q.device, non_blocking=True).float()
        return (kc * self.group_queries(q).gather(1, ch)[:, :, None]).sum(1)                # (n_kv, n_off)

    def step_scores(self, q, pos, out, sink, recent):
        ops.channel_scores(q, self.channels(q).contiguous(), self.host_kc, pos, out, sink, recent)

    def tensors(self):
        return [self.kmax]

    rewritten = ("kmax",)

    def state(self):
        return {"kmax": self.kmax, "host_kc": self.host_kc[:, :, :self.length]}

    def host_tensors(self):
        return [self.host_kc]

    def h2d_bytes(self, n_off):
        return self.n_kv * n_off * self.C * self.host_kc.element_size()



SELECTORS = {"sketch": SketchSelector, "channels": ChannelSelector, "sketch-heads": HeadwiseSketchSelector}
QUANTIZERS = {"kivi": QuantLayer}  # the quant layers' strategies; research/kvcomp.py adds its own
# research/ registers more (measurements and experiments) when imported: `import research`


class SparseLayer:
    """Offloaded K/V with top-k retrieval (topk > 0), or a plain sink + window layer (topk == 0).

    The device rows are one buffer (n_kv, sink + topk + recent, hd): positions [0, sink) in the
    sinks, the retrieved rows, then the newest `recent` positions in a ring (position p at slot
    p % recent). The positions between sinks and window are "offloaded": reachable only through
    the host store (max_len, n_kv, hd), token-major so a prompt chunk is one contiguous copy, and
    ranked by the layer's selector (SELECTORS[cfg.select]).
    """

    def __init__(self, n_kv, hd, max_len, cfg: CacheConfig, topk, device, dtype, host_device, *, kernels=False,
                 wq=None, inv_freq=None, shared: dict | None = None):
        self.sink, self.recent, self.topk, self.max_len, self.kernels = cfg.sink, cfg.recent, topk, max_len, kernels
        self.kind = "sparse" if topk else "window"
        kw = dict(device=device, dtype=dtype)
        self.att_k = torch.zeros(n_kv, cfg.sink + topk + cfg.recent, hd, **kw)
        self.att_v = torch.zeros_like(self.att_k)
        a, b = cfg.sink, cfg.sink + topk
        self.sink_k, self.sel_k, self.win_k = self.att_k[:, :a], self.att_k[:, a:b], self.att_k[:, b:]
        self.sink_v, self.sel_v, self.win_v = self.att_v[:, :a], self.att_v[:, a:b], self.att_v[:, b:]
        self.length, self.h2d_bytes, self.steps = 0, 0, 0
        self.streamed = 0  # prompt positions already copied to the host store (KVCache's copy stream)
        self.host_k = self.host_v = self.selector = None
        self.trace, self.index = None, None  # a TraceRecorder and this layer's number, when recording
        self.shared = shared  # the working memory all layers share (Selector.shared): KVCache's, or our own
        self.slots = None     # kernel path: which position each retrieved row holds, kept across steps
        if topk:
            select = SELECTORS[cfg.select]
            if shared is None:
                self.shared = select.shared(cfg, max_len=max_len, n_kv=n_kv, hd=hd, n_heads=None, device=device,
                                            dtype=dtype, kernels=kernels)
            pin = torch.device(device).type == "cuda" and torch.device(host_device).type == "cpu"
            # rows are read only once written (selection never scores a position beyond the length)
            self.host_k = torch.empty(max_len, n_kv, hd, dtype=dtype, device=host_device, pin_memory=pin)
            self.host_v = torch.empty(max_len, n_kv, hd, dtype=dtype, device=host_device, pin_memory=pin)
            self.selector = select(self, cfg, wq, inv_freq)
            if kernels:
                self.slots = ops.Slots(self.host_k, self.host_v, self.sel_k, self.sel_v, self.shared["scores"].dtype)

    def offloaded(self, length: int) -> int:
        """How many positions [sink, first recent) of `length` tokens are offloaded."""
        return max(self.sink, length - self.recent) - self.sink

    def load(self, k, v, start, to_host=True):
        """Place new tokens k, v: (1, n_kv, T, hd) at positions start.. in sinks, window and host store
        (to_host=False: the caller has streamed them to the host store already)."""
        k, v = k[0], v[0]
        T = k.shape[1]
        end = start + T
        if start < self.sink:
            n = min(end, self.sink) - start
            self.sink_k[:, start:start + n], self.sink_v[:, start:start + n] = k[:, :n], v[:, :n]
        first = max(start, self.sink, end - self.recent)  # only the newest `recent` can stay in the ring
        if first < end:
            slots = torch.arange(first, end, device=k.device) % self.recent
            self.win_k[:, slots], self.win_v[:, slots] = k[:, first - start:], v[:, first - start:]
        if self.topk:
            if to_host:
                self.host_k[start:end].copy_(k.transpose(0, 1), non_blocking=True)
                self.host_v[start:end].copy_(v.transpose(0, 1), non_blocking=True)
            self.selector.append(k)
        self.length = end

    def decode(self, q, k, v, pos):
        self.load(k, v, pos)
        L = self.length
        n_sink = min(L, self.sink)
        first_recent = min(max(self.sink, L - self.recent), L)  # L: fewer tokens than sinks, no window yet
        slots = torch.arange(first_recent, L, device=k.device) % self.recent
        parts_k, parts_v = [self.sink_k[:, :n_sink]], [self.sink_v[:, :n_sink]]
        n_off = first_recent - self.sink  # offloaded positions [sink, first_recent)
        if self.topk and n_off > 0:
            idx = self._select(q[0, :, 0], n_off)  # (n_kv, k) positions
            if self.trace is not None:
                self.trace.record(self.index, idx, pos)
            n = idx.shape[1]
            self.sel_k[:, :n], self.sel_v[:, :n] = self._gather(idx)
            if self.slots is not None:  # a kernel step after this one keeps what the rows hold
                self.slots.hold(idx)
            parts_k.append(self.sel_k[:, :n])
            parts_v.append(self.sel_v[:, :n])
        parts_k.append(self.win_k[:, slots])
        parts_v.append(self.win_v[:, slots])
        self._count_step(L)
        return attention(q, torch.cat(parts_k, 1)[None], torch.cat(parts_v, 1)[None])

    def _select(self, q, n_off):
        """q: (H, hd) real queries -> (n_kv, min(topk, n_off)) offloaded positions to fetch."""
        n_kv = self.att_k.shape[0]
        lo, hi = self.sink, self.sink + n_off
        if n_off <= self.topk:  # everything fits in the budget: take it all, exactly
            return torch.arange(lo, hi, device=q.device).expand(n_kv, n_off)
        return self.selector.scores(q, lo, hi).topk(self.topk, dim=-1).indices + lo

    def _gather(self, idx):
        """Rows idx (n_kv, k) of the host store -> device (n_kv, k, hd) K and V."""
        rows = idx.cpu()
        heads = torch.arange(rows.shape[0])[:, None]
        k, v = self.host_k[rows, heads], self.host_v[rows, heads]
        dev = self.att_k.device
        return k.to(dev, non_blocking=True), v.to(dev, non_blocking=True)

    def step(self, q, k, v, pos):
        """decode() on the device, pos a device tensor: what a CUDA graph captures. The selector scores every
        offloaded position, the top-k starts from what the rows hold (the last step's choice), and only the
        chosen positions the rows do not hold already cross PCIe."""
        kr, vr, qh = k[0, :, 0].contiguous(), v[0, :, 0].contiguous(), q[0, :, 0].contiguous()
        ops.sparse_append(kr, vr, pos, self.host_k, self.host_v, self.sink_k, self.sink_v, self.win_k, self.win_v)
        vals = None
        if self.topk:
            self.selector.step_append(kr, pos)
            scores = self.shared["scores"]
            self.selector.step_scores(qh, pos, scores, self.sink, self.recent)
            vals, idx = ops.topk(scores, self.topk, self.slots.pos, self.shared["candidates"], rows=self.slots)
            if self.trace is not None:
                self.trace.record(self.index, idx, pos)
        return ops.sparse_attend(qh, self.att_k, self.att_v, vals, pos, self.sink, self.topk, self.recent)[None, :, None]

    def advance(self, length):
        """Bookkeeping after a device step brought the layer to `length` tokens."""
        self.length = length
        if self.topk:
            self.selector.advance(length)
        self._count_step(length)

    def _count_step(self, length):
        """One decode step at `length` tokens, on either path: the H2D bytes it moved."""
        self.steps += 1
        n_off = self.offloaded(length)
        if not self.topk or n_off == 0:
            return
        n_kv, _, hd = self.att_k.shape
        # the chosen K and V rows (at most: on the kernel path a row held since the step before stays)
        self.h2d_bytes += 2 * n_kv * min(self.topk, n_off) * hd * self.att_k.element_size()
        if n_off > self.topk:  # the selector scored them
            self.h2d_bytes += self.selector.h2d_bytes(n_off)

    @property
    def rewritten(self):
        return ("rows_k", "rows_v") + tuple(f"select.{name}" for name in (self.selector.rewritten if self.topk else ()))

    def state(self):
        """The device rows (sinks, retrieved, window), the host store up to the length, the selector's state."""
        s = {"rows_k": self.att_k, "rows_v": self.att_v}
        if self.topk:
            s |= {"host_k": self.host_k[:self.length], "host_v": self.host_v[:self.length]}
            s |= {f"select.{name}": t for name, t in self.selector.state().items()}
        return s

    def set_length(self, length):
        """Hold `length` tokens. On the kernel path no row counts as retrieved: the next step fetches its top-k."""
        self.length = length
        if self.topk:
            self.selector.advance(length)
        if self.slots is not None:
            self.slots.clear()

    def device_tensors(self):
        return [self.att_k, self.att_v] + (self.selector.tensors() if self.topk else [])

    def host_tensors(self):
        return [self.host_k, self.host_v] + self.selector.host_tensors() if self.topk else []


class PrefillStage:
    """Exact K/V (1, n_kv, max_len, hd) of the layer being prefilled: the model prefills layer by layer, so
    one buffer pair serves every compressed layer in turn; it is freed when the prefill ends."""

    def __init__(self, n_kv, hd, max_len, device, dtype):
        self.shape, self.device, self.dtype = (1, n_kv, max_len, hd), device, dtype
        self.k = self.v = None
        self.length = 0

    def attend(self, q, k, v, start):
        if self.k is None:
            self.k = torch.empty(self.shape, device=self.device, dtype=self.dtype)
            self.v = torch.empty_like(self.k)
        end = start + k.shape[2]
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end
        return attention(q, self.k[:, :, :end], self.v[:, :, :end])

    def nbytes(self):
        return 2 * torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()

    def free(self):
        self.k = self.v = None


# ---------------------------------------------------------------------------------- the cache

def kernels_available(device) -> bool:
    """Whether the Triton kernel path can run on `device` (meta: planning only, always). The one check."""
    return torch.device(device).type == "meta" or (ops is not None and ops.available(device))


class KVCache:
    """One strategy per layer behind the model's calls (see the module docstring), plus telemetry.

    Prefill: a full layer keeps each chunk in its own buffers; a compressed layer answers from the
    exact K/V in the shared stage and takes the whole prompt into its store when its prefill ends (at
    the next layer's first chunk, or at end_prefill). With online identification (tailor without
    quant_layers) that hand-over is also where the layer's strategy is decided, from the proxy
    measured over its prefill. Decode: `decode` or `step` per layer, then the next layer's selector
    sees this layer's normalised input (the channel selector predicts its query from it).
    """

    def __init__(self, model, max_len: int, cfg: CacheConfig | None = None, *, batch: int = 1,
                 device="cpu", dtype=torch.float32, host_device="cpu", kernels: bool = False):
        a = model.args
        cfg = cfg or CacheConfig()
        self.cfg, self.max_len, self.dtype, self.kernels = cfg, max_len, dtype, kernels
        if kernels and not kernels_available(device):
            raise RuntimeError("the kernel path needs Triton and a CUDA device (or TRITON_INTERPRET=1 on a CPU); "
                               "pip install 'triton>=3.6,<3.9' or use the PyTorch path (kernels=False)")
        self.kinds = cfg.layer_kinds(a.n_layers)
        if batch != 1 and (kernels or any(k != "full" for k in self.kinds)):
            raise ValueError("compressed caches and the kernel path hold a batch of 1")
        if any(k in ("quant", None) for k in self.kinds) and a.head_dim % cfg.group:
            raise ConfigError("group", f"group {cfg.group} must divide head_dim {a.head_dim}: values are quantized "
                                       f"in groups of `group` channels")
        offloads = any(k in ("sparse", None) for k in self.kinds) and cfg.topk > 0
        self.select = SELECTORS[cfg.select] if offloads else None  # the offloaded layers' selector class
        self.shared = {}  # the working memory their selection shares (one layer selects at a time)
        if offloads:
            self.select.check(cfg, a.head_dim, kernels)
            self.shared = self.select.shared(cfg, max_len=max_len, n_kv=a.n_kv_heads, hd=a.head_dim,
                                             n_heads=a.n_heads, device=device, dtype=dtype, kernels=kernels)
        self.shape, self.batch, self.device, self.host_device = (a.n_kv_heads, a.head_dim, max_len), batch, device, host_device
        self.n_heads = a.n_heads
        self.wq = [b.attn.wq for b in model.layers]  # query projections, for selectors that predict a layer's query
        self.inv_freq = model.inv_freq
        self.copy_stream = None  # prompt K/V of sparse layers go to pinned host memory on this stream
        if torch.device(device).type == "cuda" and torch.device(host_device).type == "cpu":
            self.copy_stream = torch.cuda.Stream(device)
        self.layers = [None if kind is None else self._new_layer(i, kind) for i, kind in enumerate(self.kinds)]
        self.stage = PrefillStage(*self.shape, device, dtype)
        self.meter = ProxyMeter(a.n_layers, a.n_heads, cfg.alpha, cfg.proxy_queries) if cfg.online else None
        self.staged = None  # the layer whose prompt K/V sits in the stage
        self.length = 0

    def _decide(self, i, kind):
        self.kinds[i], self.layers[i] = kind, self._new_layer(i, kind)

    def _new_layer(self, i, kind) -> LayerCache:
        if kind == "full":
            return FullLayer(*self.shape, self.batch, self.device, self.dtype, self.n_heads, self.kernels)
        if kind == "quant":
            return QUANTIZERS[self.cfg.quantizer](*self.shape, self.cfg, self.device, self.dtype, self.n_heads,
                                                  self.kernels)
        topk = self.cfg.topk_of(i) if kind == "sparse" else 0
        return SparseLayer(*self.shape, self.cfg, topk, self.device, self.dtype, self.host_device, kernels=self.kernels,
                           wq=self.wq[i], inv_freq=self.inv_freq, shared=self.shared)

    # --------------------------------------------------------------------------- prefill

    def prefill(self, layer, q, k, v, start, x=None):
        """Exact attention of a prompt chunk (any length, one token included); a full layer keeps it in its
        own buffers, the others in the stage. A sparse layer's chunk also starts its way to the host store
        at once, on the copy stream."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: position {end} exceeds its {self.max_len} slots")
        if self.staged != layer:
            self._hand_over()
        cache = self.layers[layer]
        if cache is not None and cache.kind == "full":
            cache.load(k, v, start)
            out, keys = attention(q, cache.k[:, :, :end], cache.v[:, :, :end]), cache.k
        else:
            out, keys = self.stage.attend(q, k, v, start), self.stage.k
            self.staged = layer
            if cache is not None and cache.kind == "sparse" and self.copy_stream is not None:
                self._stream_to_host(cache, k, v, start)
        if self.meter is not None:
            self.meter.observe(layer, q, keys[:, :, :end])
        self.length = end
        return out

    def _stream_to_host(self, cache, k, v, start):
        end = start + k.shape[2]
        kt, vt = k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous()  # token-major, as stored
        self.copy_stream.wait_stream(torch.cuda.current_stream(k.device))
        with torch.cuda.stream(self.copy_stream):
            cache.host_k[start:end].copy_(kt, non_blocking=True)
            cache.host_v[start:end].copy_(vt, non_blocking=True)
        kt.record_stream(self.copy_stream)  # not reused by the allocator before the copy is done
        vt.record_stream(self.copy_stream)
        cache.streamed = end

    def _hand_over(self):
        """The staged layer's prefill is over: decide its kind (online identification, the one place it
        happens) and give it the prompt's K/V from the stage."""
        layer, self.staged = self.staged, None
        if layer is None:
            return
        if self.layers[layer] is None:
            score = self.meter.layer_scores()[layer].item()
            self._decide(layer, "quant" if score > self.cfg.tau else "sparse")
        n, cache = self.stage.length, self.layers[layer]
        streamed = getattr(cache, "streamed", 0) == n  # a sparse layer whose prompt went to the host chunk by chunk
        cache.load(self.stage.k[:, :, :n], self.stage.v[:, :, :n], 0, **({"to_host": False} if streamed else {}))

    def end_prefill(self):
        """After the prompt's last chunk: the last staged layer takes its prompt, the stage is freed, the
        host copies are waited for. Decoding may start."""
        self._hand_over()
        assert all(layer is not None for layer in self.layers), "every layer is prefilled before decoding"
        self.stage.free()
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.copy_stream.device).wait_stream(self.copy_stream)

    # ---------------------------------------------------------------------------- decode

    def decode(self, layer, q, k, v, pos, x=None):
        """A decode step of one layer on the PyTorch path, pos an int."""
        if pos + k.shape[2] > self.max_len:
            raise RuntimeError(f"KV cache full: position {pos + k.shape[2]} exceeds its {self.max_len} slots")
        if self.kinds[layer] != "full" and k.shape[2] != 1:
            raise ValueError("a compressed cache decodes one token at a time; feed prompts through model.prefill")
        out = self.layers[layer].decode(q, k, v, pos)
        self._show_next(layer, x, pos)
        self.length = pos + k.shape[2]
        return out

    def step(self, layer, q, k, v, pos, x=None):
        """A decode step of one layer on the kernels, pos a device tensor: no host sync (CUDA graphs)."""
        out = self.layers[layer].step(q, k, v, pos)
        self._show_next(layer, x, pos)
        return out

    def _show_next(self, layer, x, pos):
        """The next layer's selector sees this layer's normalised input (to predict its query, if it does)."""
        nxt = self.layers[layer + 1] if layer + 1 < len(self.layers) else None
        if x is not None and getattr(nxt, "selector", None) is not None:
            nxt.selector.see_previous_input(x, pos)

    def advance(self, length: int):
        """Bookkeeping after a device-side decode step (Decoder): the cache now holds `length` tokens."""
        for layer in self.layers:
            layer.advance(length)
        self.length = length

    def record(self, trace):
        """From now on every offloaded layer writes what it retrieves into `trace` (trace_page.TraceRecorder)."""
        for i, layer in enumerate(self.layers):
            if getattr(layer, "selector", None) is not None:
                layer.trace, layer.index = trace, i

    # ------------------------------------------------------------------ rolling back, saving

    def state(self) -> dict[str, torch.Tensor]:
        """Everything the cache holds at its length, as named views ("layers.3.host_k"): what a file saves."""
        assert self.staged is None and None not in self.layers, "the state of a cache whose prefill has ended"
        return {f"layers.{i}.{name}": t for i, layer in enumerate(self.layers) for name, t in layer.state().items()}

    def snapshot(self) -> tuple[int, dict]:
        """What restore() needs to bring the cache back to its length: copies of what later steps overwrite in
        place (rings, device rows, channel maxima). The stores are append-only: they need none."""
        rewritten = {f"layers.{i}.{name}" for i, layer in enumerate(self.layers) for name in layer.rewritten}
        return self.length, {name: t.clone() for name, t in self.state().items() if name in rewritten}

    def restore(self, snapshot: tuple[int, dict]):
        """Back to a snapshot's length and contents: the tokens after it are forgotten, exactly."""
        self.load_state(*snapshot)

    def load_state(self, length: int, tensors: dict[str, torch.Tensor], kinds: list[str] | None = None):
        """Hold `length` tokens: every layer's set_length, then `tensors` (state()'s names, all or some) copied
        into place. kinds: each layer's, where online identification has not decided them (a saved cache's)."""
        for i, kind in enumerate(kinds or []):
            if self.layers[i] is None:
                self._decide(i, kind)
                self.meter = None  # decided by the file, not measured here
        for layer in self.layers:
            layer.set_length(length)
        views = self.state()
        for name, t in tensors.items():
            views[name].copy_(t)
        self.length = length

    def decisions(self) -> dict | None:
        """What online identification decided: the proxy per layer and the quantized layers."""
        return None if self.meter is None else {"source": "online", "alpha": self.cfg.alpha, "tau": self.cfg.tau,
            "proxy": [round(x, 4) for x in self.meter.layer_scores().tolist()],
            "quant_layers": [i for i, k in enumerate(self.kinds) if k == "quant"]}

    def memory_report(self) -> dict:
        """Bytes counted from the tensors held, per layer kind and in total: device, host, host->device per step,
        and a full cache of the same length. Layers not decided yet (online, mid-prefill) are left out."""
        n_kv, hd, max_len = self.shape
        full_layer = 2 * n_kv * hd * max_len * self.batch * torch.empty((), dtype=self.dtype).element_size()
        by_kind = {}
        for layer in self.layers:
            if layer is None:
                continue
            r = by_kind.setdefault(layer.kind, {"layers": 0, "device_bytes": 0, "host_bytes": 0, "h2d_bytes_per_step": 0.0})
            r["layers"] += 1
            r["device_bytes"] += nbytes(layer.device_tensors())
            r["host_bytes"] += nbytes(layer.host_tensors())
            r["h2d_bytes_per_step"] += layer.h2d_bytes / max(layer.steps, 1)
        for r in by_kind.values():
            r["full_cache_bytes"] = r["layers"] * full_layer
        total = {k: sum(r[k] for r in by_kind.values())
                 for k in ("device_bytes", "host_bytes", "h2d_bytes_per_step", "full_cache_bytes")}
        return {"policy": self.cfg.policy, **total, "compression": total["full_cache_bytes"] / max(total["device_bytes"], 1),
                "prefill_stage_bytes": 0 if all(k == "full" for k in self.kinds) else self.stage.nbytes(),
                "by_kind": by_kind}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
