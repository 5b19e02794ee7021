"""KV caches. The model calls exactly one method per attention layer:

    out = cache.attend(layer, q, k, v, start)

    q: (B, H, T, hd)      queries of T new tokens at positions start..start+T-1, RoPE applied
    k, v: (B, n_kv, T, hd) their keys (RoPE applied) and values
    out: (B, H, T, hd)    attention of the new tokens over everything cached so far plus themselves

The cache appends k/v and computes the attention itself, so a policy that stores keys
quantized or in host memory never has to hand full K/V back to the model. Every cache also
reports its memory (`memory_report`), counted from the tensors it actually holds.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of T queries over S >= T keys, the queries being the last T positions.

    q: (B, H, T, hd); k, v: (B, n_kv, S, hd). GQA is handled without repeating K/V.
    Prefill (T > 1) uses SDPA with a lower-right causal mask (flash/memory-efficient kernels
    on CUDA, a tiled kernel on CPU); decode (T == 1) folds the query group into one matmul.
    """
    B, H, T, hd = q.shape
    n_kv = k.shape[1]
    if T > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, k.shape[2]),
                                              enable_gqa=H != n_kv)
    qg = q.view(B, n_kv, H // n_kv, hd)                                  # (B, n_kv, G, hd)
    scores = (qg @ k.transpose(-1, -2)).float() * hd ** -0.5              # (B, n_kv, G, S)
    out = scores.softmax(-1).to(v.dtype) @ v                             # (B, n_kv, G, hd)
    return out.view(B, H, 1, hd)


class FullCache:
    """The uncompressed baseline: K/V of every layer in preallocated device buffers."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int,
                 batch: int = 1, device="cpu", dtype=torch.float32):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)  # (L, B, n_kv, max_len, hd)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens held (all layers agree once a forward pass has finished)

    @staticmethod
    def bytes_needed(n_layers, n_kv_heads, head_dim, max_len, batch=1, dtype=torch.float32) -> int:
        return 2 * n_layers * batch * n_kv_heads * max_len * head_dim * torch.empty((), dtype=dtype).element_size()

    def attend(self, layer, q, k, v, start):
        T = k.shape[2]
        end = start + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: position {end} exceeds its {self.max_len} slots")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        self.length = end
        return attention(q, self.k[layer, :, :, :end], self.v[layer, :, :, :end])

    def memory_report(self) -> dict:
        held = self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return {"policy": "full", "device_bytes": held, "host_bytes": 0, "h2d_bytes_per_step": 0}
