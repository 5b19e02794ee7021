"""KIVI-style quantization of a KV cache (Liu et al., 2024, arXiv 2402.02750), in plain PyTorch.

  quantize   asymmetric min/max codes of each group along the last dim
  pack       codes of 1/2/4/8 bits -> int32 words, LSB first (unpack: the inverse)
  QuantStore an append-only store of one layer's keys or values: groups quantized once, when they leave
             a full-precision residual ring; kvcache.QuantLayer holds two, the sketch selector one

kernels.quantize / quantize_step write the same codes on the GPU (tests/test_kernels.py compares them).
"""
import torch

try:
    import kernels as K
except ImportError:
    K = None


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

    def state(self) -> dict:
        """The quantized tokens (views of their codes, scales and minima; append-only) and the ring `res`, which
        later tokens overwrite in place: what advance(length) and these bring back."""
        n, g = self.n_q, self.g
        if self.per_channel and not self.token_major:  # packed along the tokens
            cut = dict(codes=self.codes[:, :, :n * self.bits // 32], scale=self.scale[:, :, :n // g], mn=self.mn[:, :, :n // g])
        else:
            per = g if self.per_channel else 1  # token-major sketch: a scale per group; values: per token
            cut = dict(codes=self.codes[:, :n], scale=self.scale[:, :n // per], mn=self.mn[:, :n // per])
        return cut | {"res": self.res}

    def _slots(self, a, b):
        return torch.arange(a, b, device=self.res.device) % self.R

    def append(self, x: torch.Tensor):
        """x: (n_kv, T, hd) new tokens, oldest first."""
        x = x.to(self.res.dtype)
        L0, L1 = self.length, self.length + x.shape[1]
        n_q1 = self.quantized(L1)
        if n_q1 > self.n_q:
            pending = x if L0 == self.n_q else torch.cat([self.res[:, self._slots(self.n_q, L0)], x], dim=1)
            self._store_groups(pending[:, :n_q1 - self.n_q])
        first = max(n_q1, L0)
        if first < L1:
            self.res[:, self._slots(first, L1)] = x[:, first - L0:]
        self.length, self.n_q = L1, n_q1

    def _store_groups(self, x):
        """Quantize x (n_kv, n, hd), tokens n_q .. n_q + n - 1 (n a multiple of g), into the store."""
        if self.kernels:
            K.quantize(self, x, self.n_q // self.g)
        else:
            self._quantize_into(x, self.n_q)

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
