"""KV caches: the full baseline and the TailorKV hybrid (arXiv 2505.19586), in plain PyTorch.

The model calls the cache once per attention layer, through one of three entry points:

    out = cache.prefill(layer, q, k, v, start, x)   # a prompt chunk, exact attention (model.prefill)
    cache.end_prefill()                             # after the last chunk of the last layer
    out = cache.decode(layer, q, k, v, pos, x)      # a decode step, the position an int (PyTorch)
    out = cache.step(layer, q, k, v, pos, x)        # a decode step, the position a device tensor
    cache.advance(length)                           # after each device step: host-side bookkeeping

    q: (B, H, T, hd)       queries of T new tokens at positions start..start+T-1, RoPE applied
    k, v: (B, n_kv, T, hd) their keys (RoPE applied) and values
    x: (B, T, dim)         the layer's normalised input (lets a selector predict the next layer's query)
    out: (B, H, T, hd)     attention of the new tokens over everything cached plus themselves

Each layer has one strategy, an object with the LayerCache interface below:

  full    K/V in preallocated device buffers.
  quant   KIVI-style: keys quantized per channel over groups of g tokens, values per token over
          groups of g channels, codes packed LSB-first into int32; the newest R-g..R-1 tokens stay
          in full precision and each group is quantized exactly once.
  sparse  K/V of every token in (pinned) host memory; on the device only `sink` first tokens, a
          sliding window of the `recent` newest, and what its selector needs. Each decode step the
          selector scores the offloaded tokens, the top-k per KV head are gathered to the device.
  window  sinks + recent window only (StreamingLLM): a sparse layer with top-k = 0 and no host store.

Compressed caches hold batch 1. Buffers are preallocated at their final size (no growth by
torch.cat). Each strategy decodes two ways: `decode` in PyTorch with the position as an int (the
reference, and the CPU path), and `step` on the Triton kernels of kernels.py with the position in
a device tensor, so that a whole decode step can be captured in a CUDA graph (generate.Decoder).
Selectors (how a sparse layer ranks its offloaded tokens) are classes registered in SELECTORS.
"""
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from model import apply_rope

try:  # the Triton kernels of the GPU decode path; CUDA builds of torch bring Triton along
    import kernels as K
except ImportError:
    K = None

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
    quant_layers: tuple[int, ...] | None = None  # tailor: quantized layers, the rest offloaded; None: decide
    #                                              online from the prompt's own prefill (the proxy below)
    layers: tuple[str, ...] = ()          # explicit kind per layer (full|quant|sparse|window), overrides policy
    bits: int | None = None               # quant layers; None: DEFAULT_BITS[policy]
    group: int = 64                       # g: tokens per key group, channels per value group
    residual: int = 128                   # R: full-precision window of a quant layer
    budget: int = 192                     # device-resident tokens of a sparse layer: sink + recent + top-k
    layer_topk: tuple[int, ...] = ()      # top-k of each layer (read where it is offloaded) instead of the budget's,
    #                                       e.g. a plan's split of the same total (layer_plans.split_topk); () = even
    sink: int = 8
    recent: int = 56
    select: str = "sketch"                # sparse selector: a name in SELECTORS
    channels: int = 8                     # C: channels the `channels` selector scores on
    shortlist: int = 4                    # the `shortlist` selector fetches shortlist x top-k candidates ahead
    sketch_bits: int = 2
    alpha: float = 0.05                   # proxy: attention mass outside each query's top alpha of keys...
    tau: float = 0.2                      # ...above tau marks a layer as quantization-friendly
    proxy_queries: int = 32               # proxy: the last queries of each prefill chunk it looks at

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError("policy", f"unknown cache policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.bits is None:
            self.bits = DEFAULT_BITS.get(self.policy, 2)
        for name, value, allowed in (("bits", self.bits, (1, 2, 4, 8)), ("sketch_bits", self.sketch_bits, (1, 2, 4, 8)),
                                     ("select", self.select, tuple(SELECTORS))):
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
        if self.shortlist < 1:
            raise ConfigError("shortlist", f"shortlist must be >= 1 (candidates per retrieved token), got {self.shortlist}")

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


# ------------------------------------------------------------------------------- attention

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of T queries over S >= T keys, the queries being the last T positions.

    q: (B, H, T, hd); k, v: (B, n_kv, S, hd). GQA is handled without repeating K/V.
    Prefill (T > 1) uses SDPA with a lower-right causal mask (flash/memory-efficient kernels
    on CUDA, a tiled kernel on CPU); decode (T == 1) folds the query group into one matmul
    and takes the softmax in fp32. The result has q's dtype.
    """
    B, H, T, hd = q.shape
    n_kv = k.shape[1]
    if T > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, k.shape[2]),
                                              enable_gqa=H != n_kv)
    qg = q.view(B, n_kv, H // n_kv, hd).to(k.dtype)                      # (B, n_kv, G, hd)
    scores = (qg @ k.transpose(-1, -2)).float() * hd ** -0.5              # (B, n_kv, G, S)
    out = scores.softmax(-1).to(v.dtype) @ v                             # (B, n_kv, G, hd)
    return out.view(B, H, 1, hd).to(q.dtype)


# ---------------------------------------------------------------------------- layer strategies

class LayerCache(Protocol):
    """What every layer strategy provides (FullLayer, QuantLayer, SparseLayer; batch 1 unless full).

    kind                        "full" | "quant" | "sparse" | "window"
    load(k, v, start)           take the exact K/V (1, n_kv, T, hd) of positions start..start+T-1
                                (the prompt, at the end of the layer's prefill)
    decode(q, k, v, pos)        PyTorch: append the new token's k, v (1, n_kv, 1, hd) at position pos
                                (an int) and return its attention output (1, H, 1, hd)
    step(q, k, v, pos)          the same on the kernels, pos a 0-dim device tensor, no host sync
    advance(length)             after device steps: the layer now holds `length` tokens
    device_tensors(), host_tensors()   what it holds on the device / in host memory (telemetry)
    h2d_bytes                   host->device bytes moved by its decode steps so far
    steps                       decode steps taken
    """
    kind: str
    h2d_bytes: int
    steps: int

    def load(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None: ...
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor: ...
    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor: ...
    def advance(self, length: int) -> None: ...
    def device_tensors(self) -> list[torch.Tensor]: ...
    def host_tensors(self) -> list[torch.Tensor]: ...


class FullLayer:
    """The worked example: K and V of every position in two preallocated device buffers."""
    kind = "full"

    def __init__(self, n_kv, hd, max_len, batch, device, dtype, n_heads=None, kernels=False):
        self.k = torch.empty(batch, n_kv, max_len, hd, device=device, dtype=dtype)  # (B, n_kv, max_len, hd)
        self.v = torch.empty_like(self.k)
        self.length, self.h2d_bytes, self.steps = 0, 0, 0
        self.split = self.ws = None
        if kernels:  # the split-K (flash-decoding) plan of the kernel path and its scratch
            self.split, n = K.split_plan(max_len, n_kv, 64)
            self.ws = K.Workspace(n_heads, n, hd, device)

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
        return K.dense_attend(q[0, :, 0].contiguous(), self.k[0], self.v[0], pos, self.ws, self.split)[None, :, None]

    def advance(self, length):
        self.length = length
        self.steps += 1

    def device_tensors(self):
        return [self.k, self.v]

    def host_tensors(self):
        return []


# ---------------------------------------------------------------------------- quantization

def quantize(x: torch.Tensor, bits: int, store_dtype: torch.dtype):
    """Asymmetric min/max quantization of each group along the last dim.

    x: (..., g) -> codes uint8 (..., g), scale (...), mn (...) with x ~= codes * scale + mn.
    scale and mn are rounded to store_dtype before the codes are computed, so the stored
    triple reconstructs every element within scale / 2. A constant group gets scale 0.
    """
    xf = x.float()
    mn, mx = xf.amin(-1), xf.amax(-1)
    scale = ((mx - mn) * (1 / (2 ** bits - 1))).to(store_dtype)  # times the reciprocal, as the kernel does
    mn = mn.to(store_dtype)
    s = scale.float()
    codes = ((xf - mn.float()[..., None]) / torch.where(s == 0, 1.0, s)[..., None]).round_()
    return codes.clamp_(0, 2 ** bits - 1).to(torch.uint8), scale, mn


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., N) of `bits` each -> int32 (..., N * bits / 32), LSB first."""
    per = 32 // bits
    c = codes.view(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.int64)
    shifts = torch.arange(0, 32, bits, device=codes.device, dtype=torch.int64)
    word = (c << shifts).sum(-1)                                  # in [0, 2^32)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (..., M) -> uint8 codes (..., M * 32 / bits); inverse of pack."""
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    codes = (words[..., None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * (32 // bits)).to(torch.uint8)


class QuantStore:
    """Append-only quantized token store with a full-precision residual (one layer, batch 1).

    Three layouts, for three readers:
      per_channel=True (keys of a quant layer): a group is g consecutive tokens of one channel, codes
          packed along the tokens, (n_kv, hd, cap * bits / 32), scales and minima (n_kv, hd, cap / g):
          the attention kernel reads a block of tokens of every channel.
      per_channel=True, token_major=True (a sparse layer's key sketch): the same groups, codes packed
          along the channels of each token, (n_kv, cap, hd * bits / 32), scales (n_kv, cap / g, hd): the
          scoring kernel reads every token's channels in one row.
      per_channel=False (values): a group is g consecutive channels of one token; codes
          (n_kv, cap, hd * bits / 32), scales (n_kv, cap, hd / g).
    The newest tokens wait in the ring `res` (n_kv, R, hd), token t at slot t % R; when it would
    hold R, its oldest full groups are quantized, so R - g .. R - 1 tokens stay exact and no token is
    quantized twice. What is quantized is a function of the length alone (`quantized`), which lets
    a decode step run on the device without the host knowing the length (kernels.quantize_step).
    """

    def __init__(self, n_kv, hd, max_len, *, bits, group, residual, per_channel, device, dtype, kernels=False,
                 capacity=None, token_major=False):
        assert (group * bits) % 32 == 0 and residual % group == 0 and (per_channel or hd % group == 0)
        assert per_channel or not token_major
        self.bits, self.g, self.R, self.per_channel, self.kernels = bits, group, residual, per_channel, kernels
        self.token_major = token_major
        cap = capacity or -(-max_len // group) * group  # token capacity, whole groups
        assert cap % group == 0 and cap >= max_len
        w = 32 // bits
        if token_major:
            self.codes = torch.zeros(n_kv, cap, hd // w, dtype=torch.int32, device=device)
            self.scale = torch.zeros(n_kv, cap // group, hd, dtype=dtype, device=device)
        elif per_channel:
            self.codes = torch.zeros(n_kv, hd, cap // w, dtype=torch.int32, device=device)
            self.scale = torch.zeros(n_kv, hd, cap // group, dtype=dtype, device=device)
        else:
            self.codes = torch.zeros(n_kv, cap, hd // w, dtype=torch.int32, device=device)
            self.scale = torch.zeros(n_kv, cap, hd // group, dtype=dtype, device=device)
        self.mn = torch.zeros_like(self.scale)
        self.res = torch.zeros(n_kv, residual, hd, dtype=dtype, device=device)
        self.length = 0  # tokens stored
        self.n_q = 0     # of which quantized (a multiple of g)

    def quantized(self, length: int) -> int:
        """How many of the first `length` tokens are quantized."""
        return ((length - self.R) // self.g + 1) * self.g if length >= self.R else 0

    def __len__(self):
        return self.length

    @property
    def n_r(self):  # tokens waiting in the residual ring
        return self.length - self.n_q

    def tensors(self):
        return [self.codes, self.scale, self.mn, self.res]

    def _slots(self, a, b):
        return torch.arange(a, b, device=self.res.device) % self.R

    def append(self, x: torch.Tensor):
        """x: (n_kv, T, hd) new tokens, oldest first."""
        x = x.to(self.res.dtype)
        L0, L1 = self.length, self.length + x.shape[1]
        n_q1 = self.quantized(L1)
        if n_q1 > self.n_q:
            pending = x if L0 == self.n_q else torch.cat([self.res[:, self._slots(self.n_q, L0)], x], dim=1)
            pending = pending[:, :n_q1 - self.n_q]
            if self.kernels:
                K.quantize(self, pending, self.n_q // self.g)
            else:
                self._quantize_into(pending, self.n_q)
        first = max(n_q1, L0)
        if first < L1:
            self.res[:, self._slots(first, L1)] = x[:, first - L0:]
        self.length, self.n_q = L1, n_q1

    def advance(self, length: int):
        """Record that device-side steps (kernels.quantize_step) brought the store to `length` tokens."""
        self.length, self.n_q = length, self.quantized(length)

    def _quantize_into(self, x, a):  # x: (n_kv, n, hd), tokens a..a+n-1, n a multiple of g
        n_kv, n, hd = x.shape
        g, w = self.g, 32 // self.bits
        b = a + n
        if self.per_channel:
            codes, scale, mn = quantize(x.transpose(1, 2).reshape(n_kv, hd, n // g, g), self.bits, self.scale.dtype)
            if self.token_major:
                self.codes[:, a:b] = pack(codes.reshape(n_kv, hd, n).transpose(1, 2).contiguous(), self.bits)
                self.scale[:, a // g:b // g], self.mn[:, a // g:b // g] = scale.transpose(1, 2), mn.transpose(1, 2)
            else:
                self.codes[:, :, a // w:b // w] = pack(codes.reshape(n_kv, hd, n), self.bits)
                self.scale[:, :, a // g:b // g], self.mn[:, :, a // g:b // g] = scale, mn
        else:
            codes, scale, mn = quantize(x.reshape(n_kv, n, hd // g, g), self.bits, self.scale.dtype)
            self.codes[:, a:b] = pack(codes.reshape(n_kv, n, hd), self.bits)
            self.scale[:, a:b], self.mn[:, a:b] = scale, mn

    def dequantize(self) -> torch.Tensor:
        """All stored tokens in fp32, oldest first: (n_kv, length, hd)."""
        g, w, n = self.g, 32 // self.bits, self.n_q
        if self.token_major:
            codes = unpack(self.codes[:, :n], self.bits).float()                             # (n_kv, n, hd)
            n_kv, _, hd = codes.shape
            x = codes.view(n_kv, n // g, g, hd) * self.scale[:, :n // g, None].float() + self.mn[:, :n // g, None].float()
            x = x.reshape(n_kv, n, hd)
        elif self.per_channel:
            codes = unpack(self.codes[:, :, :n // w], self.bits).float()                    # (n_kv, hd, n)
            n_kv, hd = codes.shape[:2]
            x = codes.view(n_kv, hd, n // g, g) * self.scale[:, :, :n // g, None].float() \
                + self.mn[:, :, :n // g, None].float()
            x = x.reshape(n_kv, hd, n).transpose(1, 2)
        else:
            codes = unpack(self.codes[:, :n], self.bits).float()                             # (n_kv, n, hd)
            n_kv, _, hd = codes.shape
            x = codes.view(n_kv, n, hd // g, g) * self.scale[:, :n, :, None].float() + self.mn[:, :n, :, None].float()
            x = x.reshape(n_kv, n, hd)
        return torch.cat([x, self.res[:, self._slots(n, self.length)].float()], dim=1)


class QuantLayer:
    """KIVI-style quantized K/V (see QuantStore); exact attention during prefill."""
    kind = "quant"

    def __init__(self, n_kv, hd, max_len, cfg: CacheConfig, device, dtype, n_heads=None, kernels=False):
        kw = dict(bits=cfg.bits, group=cfg.group, residual=cfg.residual, device=device, dtype=dtype, kernels=kernels)
        self.keys = QuantStore(n_kv, hd, max_len, per_channel=True, **kw)
        self.values = QuantStore(n_kv, hd, max_len, per_channel=False, **kw)
        self.h2d_bytes, self.steps = 0, 0
        self.split = self.ws = None
        if kernels:
            self.split, n = K.split_plan(self.keys.codes.shape[2] * (32 // cfg.bits), n_kv, cfg.group)
            self.ws = K.Workspace(n_heads, n + 1, hd, device)  # + 1: the residual ring's split

    def load(self, k, v, start):
        assert start == len(self.keys), "tokens arrive in order"
        self.keys.append(k[0])
        self.values.append(v[0])

    def decode(self, q, k, v, pos):
        self.load(k, v, pos)
        self.steps += 1
        K_, V_ = self.keys.dequantize(), self.values.dequantize()  # (n_kv, S, hd) fp32
        return attention(q.float(), K_[None], V_[None]).to(q.dtype)

    def step(self, q, k, v, pos):
        K.quantize_step(self.keys, k[0, :, 0].contiguous(), pos)
        K.quantize_step(self.values, v[0, :, 0].contiguous(), pos)
        return K.quant_attend(q[0, :, 0].contiguous(), self.keys, self.values, pos, self.ws, self.split)[None, :, None]

    def advance(self, length):
        self.keys.advance(length)
        self.values.advance(length)
        self.steps += 1

    def device_tensors(self):
        return self.keys.tensors() + self.values.tensors()

    def host_tensors(self):
        return []


# --------------------------------------------------------------------------------- selectors

class Selector:
    """How a sparse layer ranks its offloaded tokens at each decode step. A new selector is a subclass
    and one entry in SELECTORS; the base class does nothing, so a subclass writes only what it needs.

    The offloaded positions are [sink, first recent); q (H, hd) are the step's queries, one group of
    G = H / n_kv query heads per KV head:
      scores(q, lo, hi) -> (n_kv, hi - lo)   PyTorch path: a score per offloaded position lo..hi-1
      step_scores(q, pos, out)               kernel path: into out (n_kv, >= max_len) at every
                                             offloaded position of the step at device position pos,
                                             -inf elsewhere (kernels.sketch_scores shows how)
      step_select(q, pos)                    kernel path: the whole selection, scores -> top-k -> rows
                                             gathered into the layer's device rows (the default
                                             composes step_scores, kernels.topk, kernels.gather_rows)
    and it sees what it needs:
      append(k)                 keys (n_kv, T, hd) entering the layer, in position order (PyTorch path)
      step_append(k, pos)       the step's key (n_kv, hd) at device position pos (kernel path)
      advance(length)           after device steps: the layer holds `length` tokens
      see_previous_input(x, pos)  the normalised input (1, 1, dim) of the layer before, at this step
    Telemetry: tensors() it keeps on the device, host_tensors() in host memory; h2d_bytes(n_off)
    host->device bytes one step's scoring of n_off offloaded tokens moves.
    """

    per_head = False  # how scores() ranks keys: the group's mean query, or each query head (see rank)
    predicts_query = False  # whether see_previous_input predicts this layer's query (see predicted)

    def __init__(self, layer: "SparseLayer", cfg: CacheConfig, wq: torch.nn.Linear, inv_freq: torch.Tensor):
        self.layer = layer
        self.n_kv, _, self.hd = layer.att_k.shape
        self.wq, self.inv_freq = wq, inv_freq
        self.qhat = None  # (H, hd) the predicted query: None until a layer before this one has run

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
            return (keys @ self.group_queries(q)[..., None])[..., 0]
        s = keys @ q.view(self.n_kv, -1, q.shape[-1]).float().transpose(1, 2)   # (n_kv, n, G)
        return s.mul(self.hd ** -0.5).log_softmax(1).amax(-1)

    def append(self, k): pass
    def step_append(self, k, pos): pass
    def advance(self, length): pass

    def scores(self, q, lo, hi):
        raise NotImplementedError

    def step_scores(self, q, pos, out, sink, recent):
        raise NotImplementedError(f"{type(self).__name__} has no kernel path")

    def step_select(self, q, pos):
        """Kernel path: choose this step's top-k offloaded rows and gather them into the layer's device rows
        (sel_k, sel_v) -> (scores, positions), each (n_kv, topk); a score of -inf where nothing was chosen."""
        L = self.layer
        self.step_scores(q, pos, L.scores, L.sink, L.recent)
        vals, idx = K.topk(L.scores, L.topk)
        K.gather_rows(idx, vals, L.host_k, L.host_v, L.sel_k, L.sel_v)
        return vals, idx

    def tensors(self) -> list:
        return []

    def host_tensors(self) -> list:
        return []

    def h2d_bytes(self, n_off: int) -> int:
        return 0


class SketchSelector(Selector):
    """A low-bit copy of every key on the device (per channel, groups of g tokens, token-major), scored
    against each KV head's mean query: every offloaded token on every channel, no host traffic."""

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        scores = layer.scores  # the kernel scores whole blocks of groups: capacity up to the buffer's width
        self.store = QuantStore(self.n_kv, self.hd, layer.max_len, bits=cfg.sketch_bits, group=cfg.group,
                                residual=cfg.group, per_channel=True, token_major=True, device=layer.att_k.device,
                                dtype=layer.att_k.dtype, kernels=layer.kernels,
                                capacity=None if scores is None else scores.shape[1])

    def append(self, k):
        self.store.append(k)

    def step_append(self, k, pos):
        K.quantize_step(self.store, k, pos)

    def advance(self, length):
        self.store.advance(length)

    def scores(self, q, lo, hi):
        return self.rank(self.store.dequantize()[:, lo:hi], q)                # (n_kv, n_off)

    def step_scores(self, q, pos, out, sink, recent):
        K.sketch_scores(q, self.store, pos, out, sink, recent)

    def tensors(self):
        return self.store.tensors()


class ChannelSelector(Selector):
    """The paper's: the C channels per KV head with the largest |q^_c| * max_t |K[t, c]|, where q^ is
    this layer's query predicted one layer early (W_q of this layer, with RoPE, applied to the previous
    layer's normalised input); every offloaded token is scored on those channels, read from host memory
    each step. As in the paper's code, the keys have a second, channel-major copy in host memory
    (n_kv, hd, max_len), so that a channel of every token is one contiguous read, not one 2-byte read per
    token out of the token-major store."""

    predicts_query = True

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        self.C = min(cfg.channels, self.hd)
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
        K.channel_append(k, pos, self.host_kc)

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
        K.channel_scores(q, self.channels(q).contiguous(), self.host_kc, pos, out, sink, recent)

    def tensors(self):
        return [self.kmax]

    def host_tensors(self):
        return [self.host_kc]

    def h2d_bytes(self, n_off):
        return self.n_kv * n_off * self.C * self.host_kc.element_size()


class HeadwiseSketchSelector(SketchSelector):
    """The sketch, ranked by each query head of the group on its own (Selector.rank, per_head): a key that
    one head of a group attends to is not averaged away by the others. The kernel path scores every head
    into a scratch the layers share (KVCache.head_scratch), then takes the largest log-softmax per key."""
    per_head = True

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        self.scratch = layer.head_scratch

    def step_scores(self, q, pos, out, sink, recent):
        if self.scratch is None:  # a layer built on its own: a scratch of its own
            self.scratch = K.HeadScratch(q.shape[0], out.shape[1], out.device, out.dtype, K.SKETCH_NB * self.store.g)
        K.sketch_scores(q, self.store, pos, out, sink, recent, heads=self.scratch)


class NeighbourSketchSelector(SketchSelector):
    """The sketch, where a token also scores as high as the token before it: the top-k then takes the
    successor of a strong hit (the next token of a passage being read or copied) in place of a weaker
    token elsewhere, within the same budget. PyTorch path only."""
    step_scores = Selector.step_scores

    def scores(self, q, lo, hi):
        s = super().scores(q, lo, hi)
        return torch.cat([s[:, :1], torch.maximum(s[:, 1:], s[:, :-1])], dim=1)


class PredictedSketchSelector(SketchSelector):
    """The sketch, ranked against this layer's query predicted one layer early (Selector.predicted, as the
    channel selector predicts it): its selection need not wait for the layer's own query, so it could run
    while the layer before reads its weights. For measuring what the prediction costs; PyTorch path only."""
    predicts_query = True
    step_scores = Selector.step_scores

    def scores(self, q, lo, hi):
        return super().scores(self.predicted(q), lo, hi)


class Shortlist:
    """The candidates a shortlist selector fetched for one layer's step: positions (n_kv, M), their sketch
    scores (-inf: no candidate) and their K/V rows (n_kv, M, hd), on the device. One serves every layer, the
    next layer's being fetched after this one has read its own. With the kernels on CUDA the fetch runs on
    its own `stream`, from a copy `x` of the previous layer's normalised input."""

    def __init__(self, n_kv, M, hd, dim, device, dtype, score_dtype, stream=False):
        self.pos = torch.zeros(n_kv, M, dtype=torch.long, device=device)
        self.vals = torch.full((n_kv, M), float("-inf"), dtype=score_dtype, device=device)
        self.exact = torch.empty_like(self.vals)   # the candidates ranked with the step's own query
        self.k = torch.zeros(n_kv, M, hd, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.x = torch.zeros(1, 1, dim, dtype=dtype, device=device) if stream else None
        self.before = torch.zeros((), dtype=torch.long, device=device)  # the device position of the step before
        self.stream = torch.cuda.Stream(device) if stream else None

    def tensors(self):
        return [self.k, self.v]


class ShortlistSelector(SketchSelector):
    """Selection moved off the layer's critical path. One layer early, with the query predicted from the
    previous layer's input (Selector.predicted), the sketch picks M = shortlist x top-k candidates among the
    step's offloaded positions and their K/V rows are fetched to the device; at the layer's own step only the
    candidates are ranked, on their exact keys with the step's own query, and the top-k kept. On CUDA the
    early part runs on a stream of its own while the layer before reads its weights (a CUDA graph captures
    the fork and the join). A layer with no layer before it fetches at its own step, with its own query."""
    predicts_query = True

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        self.sink, self.recent, self.topk = layer.sink, layer.recent, layer.topk
        self.M = cfg.shortlist * layer.topk
        self.shortlist = layer.shortlist or Shortlist(self.n_kv, self.M, self.hd, None, layer.att_k.device,
                                                      layer.att_k.dtype, torch.float32 if layer.scores is None
                                                      else layer.scores.dtype)
        self.ahead = None  # the step the shortlist was fetched for early (its position; True on the kernel path)

    def see_previous_input(self, x, pos):
        """The early part, for the step at position pos: this step's token has not reached the layer yet."""
        lst = self.shortlist
        if not self.layer.kernels:
            super().see_previous_input(x, pos)
            self._fetch(self.qhat, self.sink, max(self.sink, pos + 1 - self.recent))
            self.ahead = pos
            return
        side = nullcontext()
        if lst.stream is not None:  # fork: the layer before goes on with its MLP while this runs
            x = lst.x.copy_(x)  # a buffer of the fork's own: the allocator may reuse x's memory meanwhile
            lst.stream.wait_stream(torch.cuda.current_stream(x.device))
            side = torch.cuda.stream(lst.stream)
        with side:  # the sketch holds the positions before pos: score them as the step before, window one shorter
            super().see_previous_input(x, pos)
            torch.sub(pos, 1, out=lst.before)
            self._step_fetch(self.qhat, lst.before, self.recent - 1)
        self.ahead = True

    def _fetch(self, q, lo, hi):
        """PyTorch path: the top-M of the sketch against q over positions [lo, hi), rows and all."""
        lst = self.shortlist
        lst.vals.fill_(float("-inf"))
        m = min(self.M, hi - lo)
        if m > 0:
            vals, idx = self.rank(self.store.dequantize()[:, lo:hi], q).topk(m, dim=-1)
            lst.vals[:, :m], lst.pos[:, :m] = vals, idx + lo
            rows, heads = lst.pos[:, :m].cpu(), torch.arange(self.n_kv)[:, None]
            lst.k[:, :m] = self.layer.host_k[rows, heads].to(lst.k.device)
            lst.v[:, :m] = self.layer.host_v[rows, heads].to(lst.v.device)

    def _step_fetch(self, q, pos, recent):
        """Kernel path: the same, over the offloaded positions of a step at device position pos."""
        lst, L = self.shortlist, self.layer
        K.sketch_scores(q, self.store, pos, L.scores, self.sink, recent)
        K.topk(L.scores, self.M, out=(lst.vals, lst.pos))
        K.gather_rows(lst.pos, lst.vals, L.host_k, L.host_v, lst.k, lst.v)

    def scores(self, q, lo, hi):
        if self.ahead != hi - 1 + self.recent:  # not fetched early for this step
            self._fetch(q, lo, hi)
        self.ahead = None
        lst = self.shortlist
        m = int((lst.vals[0] > float("-inf")).sum())  # the PyTorch path fills the first m slots
        out = torch.full((self.n_kv, hi - lo), float("-inf"), device=q.device)
        out.scatter_(1, lst.pos[:, :m] - lo, self.rank(lst.k[:, :m].float(), q))  # (n_kv, m) candidates ranked
        return out

    def step_select(self, q, pos):
        lst, L = self.shortlist, self.layer
        if self.ahead is None:
            self._step_fetch(q, pos, self.recent)
        elif lst.stream is not None:  # join
            torch.cuda.current_stream(q.device).wait_stream(lst.stream)
        self.ahead = None
        K.shortlist_scores(q, lst.k, lst.vals, lst.exact)
        vals, j = lst.exact.topk(self.topk, dim=-1, sorted=False)
        K.gather_rows(j, vals, lst.k.transpose(0, 1), lst.v.transpose(0, 1), L.sel_k, L.sel_v)
        return vals, lst.pos.gather(1, j)

    def tensors(self):
        return self.store.tensors()  # the shared Shortlist is counted once, by the cache

    def h2d_bytes(self, n_off):  # the candidates' rows beyond the top-k the layer counts as gathered
        return 2 * self.n_kv * (min(self.M, n_off) - min(self.topk, n_off)) * self.hd * self.layer.host_k.element_size()


class HeadwiseShortlistSelector(ShortlistSelector):
    """The shortlist ranked per query head at both stages (Selector.rank, per_head): the predicted queries'
    softmax over the sketch picks the candidates, the step's own queries' softmax over their exact keys the
    top-k, the largest over the group's heads each time. PyTorch path only."""
    per_head = True
    step_scores = Selector.step_scores


class ExactSelector(Selector):
    """For measurement, not a method (the oracle): every offloaded key in full precision, from the host
    store, ranked as the sketch ranks them (the group's mean query). What it loses against the full cache
    is what the budget and single-token selection lose; the sketch's further loss is its ranking."""

    def __init__(self, layer, cfg, wq, inv_freq):
        super().__init__(layer, cfg, wq, inv_freq)
        self.host_k = layer.host_k

    def scores(self, q, lo, hi):
        keys = self.host_k[lo:hi].to(q.device).float().transpose(0, 1)        # (n_kv, n_off, hd)
        return self.rank(keys, q)

    def h2d_bytes(self, n_off):
        return n_off * self.n_kv * self.hd * self.host_k.element_size()


class HeadwiseExactSelector(ExactSelector):
    """The oracle ranked by each query head on its own (Selector.rank, per_head)."""
    per_head = True


def has_kernel_path(select: str) -> bool:
    return SELECTORS[select].step_scores is not Selector.step_scores


SELECTORS = {"sketch": SketchSelector, "channels": ChannelSelector, "sketch-heads": HeadwiseSketchSelector,
             "sketch-next": NeighbourSketchSelector, "sketch-predicted": PredictedSketchSelector,
             "exact": ExactSelector, "exact-heads": HeadwiseExactSelector, "shortlist": ShortlistSelector,
             "shortlist-heads": HeadwiseShortlistSelector}


class SparseLayer:
    """Offloaded K/V with top-k retrieval (topk > 0), or a plain sink + window layer (topk == 0).

    The device rows are one buffer (n_kv, sink + topk + recent, hd): positions [0, sink) in the
    sinks, the retrieved rows, then the newest `recent` positions in a ring (position p at slot
    p % recent). The positions between sinks and window are "offloaded": reachable only through
    the host store (max_len, n_kv, hd), token-major so a prompt chunk is one contiguous copy, and
    ranked by the layer's selector (SELECTORS[cfg.select]).
    """

    def __init__(self, n_kv, hd, max_len, cfg: CacheConfig, topk, device, dtype, host_device, scores=None,
                 kernels=False, wq=None, inv_freq=None, head_scratch=None, shortlist=None):
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
        self.scores = scores  # (n_kv, >= max_len) scratch of the kernel path, shared by the layers
        self.head_scratch = head_scratch  # kernels.HeadScratch of per-head selectors, shared too
        self.shortlist = shortlist  # the Shortlist of the shortlist selector, shared too
        self.host_k = self.host_v = self.selector = None
        self.trace, self.index = None, None  # a TraceRecorder and this layer's number, when recording
        if topk:
            pin = torch.device(device).type == "cuda" and torch.device(host_device).type == "cpu"
            # rows are read only once written (selection never scores a position beyond the length)
            self.host_k = torch.empty(max_len, n_kv, hd, dtype=dtype, device=host_device, pin_memory=pin)
            self.host_v = torch.empty(max_len, n_kv, hd, dtype=dtype, device=host_device, pin_memory=pin)
            self.selector = SELECTORS[cfg.select](self, cfg, wq, inv_freq)

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
        first_recent = max(self.sink, L - self.recent)
        slots = torch.arange(first_recent, L, device=k.device) % self.recent
        parts_k, parts_v = [self.sink_k[:, :n_sink]], [self.sink_v[:, :n_sink]]
        n_off = first_recent - self.sink  # offloaded positions [sink, first_recent)
        if self.topk and n_off > 0:
            idx = self._select(q[0, :, 0], n_off)  # (n_kv, k) positions
            if self.trace is not None:
                self.trace.record(self.index, idx, pos)
            n = idx.shape[1]
            self.sel_k[:, :n], self.sel_v[:, :n] = self._gather(idx)
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
        """decode() on the device, pos a device tensor: what a CUDA graph captures."""
        kr, vr, qh = k[0, :, 0].contiguous(), v[0, :, 0].contiguous(), q[0, :, 0].contiguous()
        K.sparse_append(kr, vr, pos, self.host_k, self.host_v, self.sink_k, self.sink_v, self.win_k, self.win_v)
        vals = None
        if self.topk:
            self.selector.step_append(kr, pos)
            vals, idx = self.selector.step_select(qh, pos)
            if self.trace is not None:
                self.trace.record(self.index, torch.where(vals > float("-inf"), idx, -1), pos)
        return K.sparse_attend(qh, self.att_k, self.att_v, vals, pos, self.sink, self.topk, self.recent)[None, :, None]

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
        self.h2d_bytes += 2 * n_kv * min(self.topk, n_off) * hd * self.att_k.element_size()  # gathered K and V rows
        if n_off > self.topk:  # the selector scored them
            self.h2d_bytes += self.selector.h2d_bytes(n_off)

    def device_tensors(self):
        return [self.att_k, self.att_v] + (self.selector.tensors() if self.topk else [])

    def host_tensors(self):
        return [self.host_k, self.host_v] + self.selector.host_tensors() if self.topk else []


# ------------------------------------------------------------------- prefill helpers

class ProxyMeter:
    """The paper's identification proxy, per layer and head: for the last `n_queries` queries of
    each prefill chunk, the attention mass outside that query's top `alpha` fraction of keys.
    A high value means attention is spread out (quantization-friendly), a low one that a few
    tokens dominate (sparsity-friendly)."""

    def __init__(self, n_layers, n_heads, alpha=0.05, n_queries=32):
        self.alpha, self.n_queries = alpha, n_queries
        self.sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.count = torch.zeros(n_layers, dtype=torch.float64)

    def observe(self, layer, q, k):
        """q: (1, H, T, hd) a chunk's queries; k: (1, n_kv, S, hd) every key up to the chunk's end."""
        H, T, hd = q.shape[1:]
        n_kv, S = k.shape[1:3]
        n = min(self.n_queries, T)
        qg = q[0, :, -n:].float().reshape(n_kv, H // n_kv * n, hd)                # (n_kv, G*n, hd)
        scores = (qg @ k[0].float().transpose(1, 2)).view(H, n, S) * hd ** -0.5  # (H, n, S)
        pos = torch.arange(S - n, S, device=q.device)
        scores.masked_fill_(torch.arange(S, device=q.device) > pos[:, None], float("-inf"))
        p = scores.softmax(-1)
        k_top = torch.ceil(self.alpha * (pos + 1)).long()                          # (n,) per query
        top = p.topk(int(k_top.max()), dim=-1).values.cumsum(-1)                   # (H, n, k_max)
        inside = top.gather(-1, (k_top - 1).expand(H, n)[..., None])[..., 0]       # (H, n)
        self.sum = self.sum.to(q.device)  # accumulate where the attention is: no sync per chunk
        self.sum[layer] += (1 - inside).sum(1).double()
        self.count[layer] += n

    def head_scores(self) -> torch.Tensor:  # (n_layers, H)
        return self.sum.cpu() / self.count.clamp(min=1)[:, None]

    def layer_scores(self) -> torch.Tensor:  # (n_layers,)
        return self.head_scores().mean(1)


class PrefillStage:
    """Exact K/V of the layer being prefilled, shared by all compressed layers.

    The model prefills layer by layer, so one (n_kv, max_len, hd) buffer pair serves every
    layer in turn; it is freed at the first decode step.
    """

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


class TraceRecorder:
    """What the offloaded layers retrieved at each decode step, for generate.py --trace.

    positions (steps, n_layers, n_kv, topk): the offloaded positions each layer fetched per KV head at
    decode step i (position first + i), -1 where nothing was. It is preallocated on the device and
    written inside the step (index_copy_ at the step's own position: no host sync, so a CUDA graph
    records too); read it back once, at the end. A cache without a recorder records nothing.
    """

    def __init__(self, n_layers: int, n_kv: int, topk: int, first: int, steps: int, device):
        self.first = first
        self.positions = torch.full((steps, n_layers, n_kv, topk), -1, dtype=torch.int32, device=device)

    def record(self, layer: int, idx: torch.Tensor, pos):
        """idx (n_kv, <= topk) positions fetched by `layer` at decode position pos (an int or a device tensor)."""
        row = torch.full_like(self.positions[0, layer], -1)
        row[:, :idx.shape[1]] = idx
        step = (pos - self.first) if torch.is_tensor(pos) else torch.tensor(pos - self.first, device=row.device)
        self.positions[:, layer].index_copy_(0, step.view(1).clamp(0, self.positions.shape[0] - 1), row[None])


# ---------------------------------------------------------------------------------- the cache

def kernels_available(device) -> bool:
    """Whether the Triton kernel path can run on `device` (meta: planning only, always). The one check."""
    return torch.device(device).type == "meta" or (K is not None and K.available(device))


class KVCache:
    """One strategy per layer behind the model's calls (see the module docstring), plus telemetry.

    Prefill: a full layer keeps each chunk in its own buffers; a compressed layer answers from the
    exact K/V in the shared stage and takes the whole prompt into its store when its prefill ends (at
    the next layer's first chunk, or at end_prefill). With online identification (tailor without
    quant_layers) that hand-over is also where the layer's strategy is decided, from the proxy
    measured over its prefill. Decode: `decode` or `step` per layer, then the next layer's selector
    sees this layer's normalised input (the channel selector predicts its query from it).
    """

    def __init__(self, model, max_len: int, cfg: CacheConfig | None = None, batch: int = 1,
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
        if offloads and cfg.layer_topk and issubclass(SELECTORS[cfg.select], ShortlistSelector):
            raise ConfigError("layer_topk", f"the {cfg.select!r} selector shares one candidate buffer across layers and "
                                            f"takes one top-k for all: drop layer_topk (or the plan's split)")
        if kernels and offloads and not has_kernel_path(cfg.select):
            raise ConfigError("select", f"the {cfg.select!r} selector has no kernel path: decode on the PyTorch "
                                        f"path (kernels off)")
        if offloads and issubclass(SELECTORS[cfg.select], SketchSelector) and a.head_dim % (32 // cfg.sketch_bits):
            raise ConfigError("sketch_bits", f"a {cfg.sketch_bits}-bit sketch packs {32 // cfg.sketch_bits} channels per "
                                             f"int32, which does not divide head_dim {a.head_dim}")
        self.shape, self.batch, self.device, self.host_device = (a.n_kv_heads, a.head_dim, max_len), batch, device, host_device
        self.n_heads = a.n_heads
        self.wq = [b.attn.wq for b in model.layers]  # query projections, for selectors that predict a layer's query
        self.inv_freq = model.inv_freq
        self.scores = None  # selection scores of the sparse layers' kernel path, shared (one layer at a time)
        self.head_scratch = None  # and what per-head scoring keeps between its kernels
        self.shortlist = None  # and the candidates of the shortlist selector
        shortlists = offloads and issubclass(SELECTORS[cfg.select], ShortlistSelector)
        if kernels and offloads:
            unit = K.SKETCH_NB * cfg.group  # the sketch kernels score SKETCH_NB groups per program
            width = -(-max(max_len, cfg.max_topk * (cfg.shortlist if shortlists else 1)) // unit) * unit
            # half-precision scores for a half-precision model: they only rank tokens, and top-k over 16-bit
            # keys takes half the radix passes of float32
            self.scores = torch.empty(a.n_kv_heads, width, device=device,
                                      dtype=torch.float32 if dtype == torch.float32 else torch.float16)
            if SELECTORS[cfg.select].per_head:
                self.head_scratch = K.HeadScratch(a.n_heads, width, device, self.scores.dtype, unit)
        if shortlists:
            self.shortlist = Shortlist(a.n_kv_heads, cfg.shortlist * cfg.topk, a.head_dim, a.dim, device, dtype,
                                       torch.float32 if self.scores is None else self.scores.dtype,
                                       stream=kernels and torch.device(device).type == "cuda")
        self.copy_stream = None  # prompt K/V of sparse layers go to pinned host memory on this stream
        if torch.device(device).type == "cuda" and torch.device(host_device).type == "cpu":
            self.copy_stream = torch.cuda.Stream(device)
        self.layers = [None if kind is None else self._new_layer(i, kind) for i, kind in enumerate(self.kinds)]
        self.stage = PrefillStage(*self.shape, device, dtype)
        self.meter = ProxyMeter(a.n_layers, a.n_heads, cfg.alpha, cfg.proxy_queries) if cfg.online else None
        self.staged = None  # the layer whose prompt K/V sits in the stage
        self.length = 0

    def _new_layer(self, i, kind) -> LayerCache:
        if kind == "full":
            return FullLayer(*self.shape, self.batch, self.device, self.dtype, self.n_heads, self.kernels)
        if kind == "quant":
            return QuantLayer(*self.shape, self.cfg, self.device, self.dtype, self.n_heads, self.kernels)
        topk = self.cfg.topk_of(i) if kind == "sparse" else 0
        return SparseLayer(*self.shape, self.cfg, topk, self.device, self.dtype, self.host_device, self.scores,
                           self.kernels, self.wq[i], self.inv_freq, self.head_scratch, self.shortlist)

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
            self.kinds[layer] = "quant" if score > self.cfg.tau else "sparse"
            self.layers[layer] = self._new_layer(layer, self.kinds[layer])
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

    def load_prompt(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        """Take a prompt's K/V, (1, n_kv, T, hd) per layer, as another cache's prefill computed them, in
        place of prefilling it: prefill attention is exact in every policy, so every layer stores what its
        own prefill would have (bench/accuracy.py prefills each prompt once for all policies). Online
        identification measures the prefill's queries, so it prefills through the model."""
        if self.meter is not None:
            raise ValueError("online identification measures the prefill's queries: prefill through the model")
        if keys[0].shape[2] > self.max_len:
            raise RuntimeError(f"KV cache full: position {keys[0].shape[2]} exceeds its {self.max_len} slots")
        for layer, k, v in zip(self.layers, keys, values, strict=True):
            layer.load(k, v, 0)
        self.length = keys[0].shape[2]
        self.end_prefill()

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

    def record_retrievals(self, first: int, steps: int) -> TraceRecorder:
        """From decode position `first` on, for `steps` steps, record what every offloaded layer retrieves."""
        trace = TraceRecorder(len(self.layers), self.shape[0], max(self.cfg.max_topk, 1), first, steps, self.device)
        for i, layer in enumerate(self.layers):
            if getattr(layer, "selector", None) is not None:
                layer.trace, layer.index = trace, i
        return trace

    def decisions(self) -> dict | None:
        """What online identification decided: the proxy per layer and the quantized layers."""
        if self.meter is None:
            return None
        return {"source": "online", "alpha": self.cfg.alpha, "tau": self.cfg.tau,
                "proxy": [round(x, 4) for x in self.meter.layer_scores().tolist()],
                "quant_layers": [i for i, k in enumerate(self.kinds) if k == "quant"]}

    def memory_report(self) -> dict:
        """Bytes held, per layer kind and in total (see memory_report below); changes nothing."""
        return memory_report(self)


# ------------------------------------------------------------------------------ telemetry

def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_report(cache: KVCache) -> dict:
    """Bytes held, counted from the tensors themselves, per layer kind and in total: on the device, in
    host memory, moved host->device per decode step, and what a full cache of the same length would hold.
    Layers not decided yet (online identification, mid-prefill) are left out."""
    n_kv, hd, max_len = cache.shape
    full_layer = 2 * n_kv * hd * max_len * cache.batch * torch.empty((), dtype=cache.dtype).element_size()
    by_kind = {}
    for layer in cache.layers:
        if layer is None:
            continue
        r = by_kind.setdefault(layer.kind, {"layers": 0, "device_bytes": 0, "host_bytes": 0, "h2d_bytes_per_step": 0.0})
        r["layers"] += 1
        r["device_bytes"] += nbytes(layer.device_tensors())
        r["host_bytes"] += nbytes(layer.host_tensors())
        r["h2d_bytes_per_step"] += layer.h2d_bytes / max(layer.steps, 1)
    if cache.shortlist is not None and "sparse" in by_kind:  # shared by the sparse layers: counted once
        by_kind["sparse"]["device_bytes"] += nbytes(cache.shortlist.tensors())
    for r in by_kind.values():
        r["full_cache_bytes"] = r["layers"] * full_layer
    total = {k: sum(r[k] for r in by_kind.values())
             for k in ("device_bytes", "host_bytes", "h2d_bytes_per_step", "full_cache_bytes")}
    return {"policy": cache.cfg.policy, **total, "compression": total["full_cache_bytes"] / max(total["device_bytes"], 1),
            "prefill_stage_bytes": 0 if all(k == "full" for k in cache.kinds) else cache.stage.nbytes(),
            "by_kind": by_kind}


def plan_memory(model, max_len: int, cfg: CacheConfig, batch: int = 1, dtype=torch.float32, kernels=False) -> dict:
    """The memory report of a cache that is never allocated: built on the meta device.

    With online identification the kinds are not known yet: the plan takes, per field, the larger
    of "every layer quantized" and "every layer offloaded"."""
    def report(c):
        return KVCache(model, max_len, c, batch, device="meta", dtype=dtype, host_device="meta",
                       kernels=kernels).memory_report()
    if not cfg.online:
        return report(cfg)
    n = model.args.n_layers
    a, b = (report(replace(cfg, layers=(kind,) * n)) for kind in ("quant", "sparse"))
    return {**b, **{k: max(a[k], b[k]) for k in ("device_bytes", "host_bytes", "full_cache_bytes", "prefill_stage_bytes")},
            "policy": cfg.policy, "by_kind": {**a["by_kind"], **b["by_kind"]}}
