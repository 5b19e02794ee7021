"""A from-scratch Llama, Mistral and Qwen2 (Llama 2/3/3.1/3.2, SmolLM2, Mistral 7B, Qwen2/2.5: q/k/v biases)
for long-context inference.

Reading order: blocks -> Transformer -> weight loading; the shape and RoPE scaling come from config.py.
The model knows nothing about caching: each attention layer hands its fresh q/k/v (and its
normalised input x) to the cache — `cache.prefill(...)` for a prompt chunk, `cache.decode(...)`
for a decode step, `cache.step(...)` for a decode step on the kernels — and gets the attention
output back (see kvcache.py), so a compressed cache can run its own attention over data the
model never sees.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from config import ModelArgs, read_json_object, rope_attention_factor, rope_inv_freq, with_rope_scaling

PREFILL_CHUNK = 2048  # prompt tokens per prefill step; bounds attention memory to chunk x context


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE (HF layout): rotate pairs (x[i], x[i + hd/2]). x: (B, H, T, hd), cos/sin: (T, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


# -------------------------------------------------------------------------------------- blocks


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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.hd = layer, args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, cache, start: int, prefill: bool = False):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # (B, n_kv, T, hd)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)     # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend = cache.prefill if prefill else cache.decode
        out = attend(self.layer, q, k, v, start, x)                        # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w_gate = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w_up = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w_down = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, cache, start, prefill=False):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, start, prefill)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.rope_scale = rope_attention_factor(args)  # YaRN's; 1.0 for every other RoPE

    def rope(self, start, T: int, device):
        """cos, sin (T, hd/2) for positions start..start+T-1; start is an int, or a device tensor
        (a decode step that runs without the host knowing the position, as in a CUDA graph)."""
        pos = (torch.arange(T, device=device) + start).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        if self.rope_scale == 1.0:
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.rope_scale, freqs.sin() * self.rope_scale

    def forward(self, tokens: torch.Tensor, cache, start, logits_at: slice | None = slice(-1, None)):
        """Decode tokens (B, T) at positions start..start+T-1 (start an int), appending to `cache`: one
        token at a time for a compressed cache, any number for a full one (a prompt goes through prefill).

        Returns float32 logits (B, T', vocab) only for the positions `logits_at` selects
        (default: the last one), so a long input never materialises a T x vocab tensor.
        """
        cos, sin = self.rope(start, tokens.shape[1], tokens.device)
        x = self.embed(tokens)  # (B, T, dim)
        for block in self.layers:
            x = block(x, cos, sin, cache, start)
        if logits_at is None:
            return None
        return self.lm_head(self.norm(x[:, logits_at])).float()  # (B, T', vocab)

    def device_step(self, token: torch.Tensor, cache, pos: torch.Tensor) -> torch.Tensor:
        """One decode step (token (1, 1) at device position pos) -> logits (1, 1, vocab): forward()'s
        computation with each residual add + RMSNorm, the q/k RoPE and SiLU * up fused into one Triton
        kernel each, and no host synchronisation, so that generate.Decoder can capture it in a CUDA graph."""
        import kernels
        a = self.args
        cos, sin = self.rope(pos, 1, token.device)
        x, h = None, self.embed(token)  # h: the branch output the next norm adds to the residual stream x
        for block in self.layers:
            attn, mlp = block.attn, block.mlp
            x, xn = kernels.add_rms_norm(x, h, block.attn_norm.weight, a.norm_eps)
            q, k = kernels.rope_qk(attn.wq(xn), attn.wk(xn), cos, sin, a.n_heads, a.n_kv_heads)
            v = attn.wv(xn).view(1, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
            h = attn.wo(cache.step(attn.layer, q, k, v, pos, xn).transpose(1, 2).reshape(1, 1, -1))
            x, xn = kernels.add_rms_norm(x, h, block.mlp_norm.weight, a.norm_eps)
            h = mlp.w_down(kernels.silu_mul(mlp.w_gate(xn), mlp.w_up(xn)))
        x, xn = kernels.add_rms_norm(x, h, self.norm.weight, a.norm_eps)
        return self.lm_head(xn).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, cache, chunk_size: int = PREFILL_CHUNK, progress=None):
        """Feed a long prompt (B, T) through, layer by layer and chunk by chunk; returns the last
        position's logits (B, vocab).

        Layer-major order means a cache needs the exact K/V of only the current layer's prompt
        while prefilling (a compressed cache can then store each layer its own way), and
        attention memory per step is chunk_size x T, never T x T. `progress(f)` is called after
        each (layer, chunk) step with the fraction f of a layer it covered. Ends with
        cache.end_prefill(): decoding may follow.
        """
        B, T = tokens.shape
        assert T > 0 and chunk_size > 0
        cos, sin = self.rope(0, T, tokens.device)
        bounds = list(range(0, T, chunk_size)) + [T]
        x = self.embed(tokens)  # (B, T, dim): the whole prompt's residual stream
        for block in self.layers:
            for s, e in zip(bounds, bounds[1:]):
                x[:, s:e] = block(x[:, s:e], cos[s:e], sin[s:e], cache, s, prefill=True)
                if progress is not None:
                    progress((e - s) / T)
        cache.end_prefill()
        return self.lm_head(self.norm(x[:, -1])).float()


# ----------------------------------------------------------------------------- weight loading

def hf_name_map(n_layers: int) -> dict[str, str]:
    """HF checkpoint tensor name -> our parameter name."""
    m = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "lm_head.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm",
                 "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
                 "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "mlp.w_gate", "mlp.up_proj": "mlp.w_up",
                 "mlp.down_proj": "mlp.w_down"}
    for i in range(n_layers):
        for hf, ours in per_layer.items():
            m[f"model.layers.{i}.{hf}.weight"] = f"layers.{i}.{ours}.weight"
        for hf, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv")):  # Qwen2
            m[f"model.layers.{i}.self_attn.{hf}.bias"] = f"layers.{i}.attn.{ours}.bias"
    return m


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               rope_scaling: dict | None = None):
    """Build the model on the meta device and fill it from the directory's safetensors files.
    rope_scaling, if given, replaces the config's (e.g. {"rope_type": "yarn", "factor": 4.0})."""
    from safetensors import safe_open

    import layer_plans
    model_dir = Path(model_dir)
    cfg = read_json_object(model_dir / "config.json")
    args = ModelArgs.from_hf_config(cfg if rope_scaling is None else with_rope_scaling(cfg, rope_scaling),
                                    model_dir / "config.json")
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = read_json_object(index).get("weight_map")
        if not (isinstance(shards, dict) and all(isinstance(f, str) for f in shards.values())):
            raise ValueError(f"{index}: weight_map must map each tensor name to its file name")
        files = sorted(set(shards.values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())
    names = hf_name_map(args.n_layers)
    state, unexpected, samples = {}, [], {}
    for fname in files:
        with safe_open(str(model_dir / fname), framework="pt", device="cpu") as f:
            for key in f.keys():
                ours = names.get(key)
                if ours not in expected:
                    if "rotary_emb.inv_freq" not in key:  # old checkpoints store this derived buffer
                        unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                if t.shape != expected[ours].shape:
                    raise ValueError(f"{fname}: {key} has shape {tuple(t.shape)}, "
                                     f"the config implies {tuple(expected[ours].shape)}")
                state[ours] = t.to(device=device, dtype=dtype)
                samples[ours] = layer_plans.weight_sample(t)  # as stored, whatever dtype it is loaded in
    if args.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("embed.weight"))
        samples.setdefault("lm_head.weight", samples.get("embed.weight"))
    missing = [k for k in expected if state.get(k) is None]
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not match the config: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all), "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    model.load_state_dict(state, assign=True)
    model.inv_freq = rope_inv_freq(args).to(device)
    model.weight_samples = samples  # what layer_plans.fingerprint identifies the weights by
    return model.eval()
