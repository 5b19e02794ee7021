"""A model's shape and RoPE, read from a HF config.json (model.py builds the model from them).

ModelArgs.from_hf_config reads Llama, Mistral and Qwen2 configs (GGUF metadata becomes one in
checkpoint.py) and refuses every field that would change the arithmetic without being implemented;
rope_scaling_of checks a config's RoPE scaling (Llama 3.1's or YaRN), rope_inv_freq and
rope_attention_factor turn it into the frequencies and the attention scale model.Transformer uses.
"""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, generation_config.json, tokenizer_config.json, a shard
    index, a plan): a damaged one is refused naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or restore it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found a {type(data).__name__}")
    return data


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_fields(cfg: dict, source, ints=(), numbers=(), flags=(), ids=()):
    """Refuse, naming the file and the field, a value of the wrong type or range: ints (a whole number >= 1),
    numbers (finite, > 0), flags (true or false), ids (a token id, a list of them, or null). Absent: fine."""
    for key in ints:
        if cfg.get(key) is not None and not (is_int(cfg[key]) and cfg[key] >= 1):
            raise ValueError(f"{source}: {key} must be a whole number >= 1, got {cfg[key]!r}")
    for key in numbers:
        v = cfg.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ValueError(f"{source}: {key} must be a number > 0, got {v!r}")
    for key in flags:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ValueError(f"{source}: {key} must be true or false, got {cfg[key]!r}")
    for key in ids:
        v = cfg.get(key)
        if v is not None and not (is_int(v) and v >= 0 or isinstance(v, list) and all(is_int(i) and i >= 0 for i in v)):
            raise ValueError(f"{source}: {key} must be a token id or a list of them, got {v!r}")


CONFIG_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "vocab_size", "head_dim", "max_position_embeddings")


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3" | "yarn", ...} (rope_scaling_of)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on the q, k and v projections (Llama and Mistral have none)
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.head_dim == 0:
            assert self.dim % self.n_heads == 0, f"hidden size {self.dim} is not a multiple of {self.n_heads} heads"
            self.head_dim = self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, (
            f"{self.n_heads} query heads cannot be split evenly over {self.n_kv_heads} KV heads")
        assert self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}"

    @property
    def n_groups(self) -> int:  # query heads per KV head (GQA)
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: dict, source="config.json") -> "ModelArgs":
        check_fields(cfg, source, ints=CONFIG_INTS, numbers=("rms_norm_eps", "rope_theta"), flags=("tie_word_embeddings",),
                     ids=("eos_token_id", "bos_token_id"))
        arch = (cfg.get("architectures") or ["<none given>"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}: this engine runs "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints only")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError(f"{arch} with attention_bias or mlp_bias (biases on every projection) is not supported")
        # every other field that changes the arithmetic is implemented below or refused here, never ignored
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{arch} with hidden_act {act!r} is not supported: the MLP here is SwiGLU (silu)")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"partial_rotary_factor {cfg['partial_rotary_factor']} (RoPE on part of each head) "
                             "is not supported")
        odd = [k for k in ("attn_logit_softcapping", "final_logit_softcapping", "logit_scale", "embedding_multiplier",
                           "residual_multiplier", "attention_multiplier", "logits_scaling", "qk_layernorm",
                           "use_qk_norm") if cfg.get(k)]
        if odd:
            raise ValueError(f"{arch} with {', '.join(odd)} is not supported (this engine would ignore it)")
        kinds = set(cfg.get("layer_types") or []) - {"full_attention"}
        if kinds and cfg.get("use_sliding_window", True):
            raise ValueError(f"layer_types {sorted(kinds)} are not supported: every layer here attends to the "
                             "whole context")
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None  # Qwen2 has the switch
        if window not in (None, 0) and window < cfg.get("max_position_embeddings", 0):
            raise ValueError(f"sliding-window attention (window {window}) is not supported; "
                             "use a checkpoint whose config.json has \"sliding_window\": null")
        # RoPE: transformers >= 5 writes {"rope_parameters": {rope_theta, rope_type, ...}}, older
        # checkpoints {"rope_theta": ..., "rope_scaling": {rope_type|type, ...} | null}
        scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        theta = cfg.get("rope_theta", (scaling or {}).get("rope_theta", 10000.0))
        check_fields({"rope_theta": theta}, source, numbers=("rope_theta",))
        max_pos = cfg.get("max_position_embeddings", 4096)
        scaling = rope_scaling_of(scaling, max_pos)
        if scaling is not None and scaling["rope_type"] == "yarn":  # Qwen2.5 keeps 32768 and says "factor 4"
            max_pos = max(max_pos, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
        eos = cfg.get("eos_token_id")
        return cls(
            dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"], head_dim=cfg.get("head_dim") or 0,
            norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=theta,
            rope_scaling=scaling, max_seq_len=max_pos,
            tie_embeddings=cfg.get("tie_word_embeddings", False), qkv_bias=arch == "Qwen2ForCausalLM",
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)))


# ------------------------------------------------------------------------------- RoPE scaling

YARN_KEYS = {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"}
LLAMA3_KEYS = {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}


def rope_scaling_of(s: dict | None, max_pos: int) -> dict | None:
    """A config's RoPE scaling, checked and in one spelling ({"rope_type": ..., ...}), or None for plain RoPE.
    Fields this engine does not implement are refused, never ignored."""
    if s is None:
        return None
    if s.get("partial_rotary_factor", 1.0) != 1.0:  # transformers 5 may keep it here
        raise ValueError(f"partial_rotary_factor {s['partial_rotary_factor']} (RoPE on part of each head) is not supported")
    s = {k: v for k, v in s.items() if v is not None and k not in ("rope_theta", "type", "partial_rotary_factor")} | \
        {"rope_type": s.get("rope_type", s.get("type", "default"))}
    kind = s["rope_type"]
    if kind == "default":
        return None
    if kind not in ("llama3", "yarn"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}: 'llama3' and 'yarn' (and none) are supported")
    unknown = set(s) - {"rope_type"} - (YARN_KEYS if kind == "yarn" else LLAMA3_KEYS)
    if unknown:
        raise ValueError(f"rope_scaling {kind} with {', '.join(sorted(unknown))} is not supported")
    s.setdefault("original_max_position_embeddings", max_pos)  # as transformers does
    if "factor" not in s and kind == "yarn":  # transformers' rule (DeepSeek-V3 writes no factor)
        s["factor"] = max_pos / s["original_max_position_embeddings"]
    for key in ("factor", "original_max_position_embeddings"):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"rope_scaling {kind}: {key} must be a positive number, got {v!r}")
    return s


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,): plain, or rescaled for a long context as Llama 3.1 or YaRN do."""
    hd = args.head_dim
    inv_freq = 1.0 / args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    if s["rope_type"] == "yarn":
        # NTK-by-parts (YaRN, arXiv 2309.00071): a frequency that turns more than beta_fast times over the
        # original context keeps its value, one that turns fewer than beta_slow times is divided by `factor`,
        # and between those two dimensions the mix ramps linearly (dimension bounds rounded outwards)
        def dim_of(rotations):  # the dimension whose frequency turns `rotations` times over old_len
            return hd * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))
        lo, hi = dim_of(s.get("beta_fast", 32)), dim_of(s.get("beta_slow", 1))
        if s.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, hd - 1)
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        return (inv_freq / factor * ramp + inv_freq * (1 - ramp)).float()
    lo, hi = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv_freq
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return scaled.float()


def rope_attention_factor(args: ModelArgs) -> float:
    """What YaRN multiplies cos and sin by (so q.k by its square): sharper attention over a longer context,
    0.1 ln(factor) + 1 unless the config gives attention_factor (or DeepSeek's mscale pair). 1 otherwise."""
    s = args.rope_scaling
    if s is None or s["rope_type"] != "yarn":
        return 1.0
    if "attention_factor" in s:
        return float(s["attention_factor"])

    def m(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
    if s.get("mscale") and s.get("mscale_all_dim"):
        return m(s["factor"], s["mscale"]) / m(s["factor"], s["mscale_all_dim"])
    return m(s["factor"])


def with_rope_scaling(cfg: dict, scaling: dict) -> dict:
    """config.json's fields with its RoPE scaling replaced by `scaling` ({"rope_type": "default"}: none),
    in either config spelling; the theta stays. What --rope-scaling does to a model."""
    old = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "original_max_position_embeddings" not in scaling and old.get("original_max_position_embeddings"):
        scaling = {**scaling, "original_max_position_embeddings": old["original_max_position_embeddings"]}
    cfg = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    return cfg | {"rope_theta": cfg.get("rope_theta", old.get("rope_theta", 10000.0)), "rope_scaling": scaling}
