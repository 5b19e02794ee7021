"""Layer plans: which layers tailor quantizes, as a JSON file made by profile_layers.py.

A plan names the model it was made for by a fingerprint of its config and weights, so generate.py
finds the plan of a loaded model in plans/ and refuses one made for another. Reading a plan checks
its structure and names the file and field at fault.
"""
import dataclasses
import hashlib
import json
from pathlib import Path

import torch

PLANS = Path(__file__).resolve().parent / "plans"


def model_name(model_dir: Path) -> str:
    """A readable name: the HF repo (from a hub cache path) or the directory, without a cache hash."""
    parts = model_dir.resolve().parts
    if "snapshots" in parts:
        repo = parts[parts.index("snapshots") - 1]
        return repo.removeprefix("models--").split("--", 1)[-1]
    name = model_dir.name
    stem, _, suffix = name.rpartition("-")
    return stem if stem and len(suffix) == 12 and all(c in "0123456789abcdef" for c in suffix) else name


def weight_sample(t: torch.Tensor) -> torch.Tensor:
    """The values of a weight its fingerprint reads: up to 4096 of them, evenly spaced, in bf16."""
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)][:4096].to(torch.bfloat16)


def fingerprint(model, args=None) -> str:
    """Identity of a model's config (args, default its own) and weights, independent of the dtype it was loaded
    in: the weights are sampled as the checkpoint stores them (model.weight_samples, kept by model.load_model;
    a model built otherwise, from its parameters), so fp32 -> fp16 rounding cannot change it."""
    # qkv_bias is left to the parameter names below (so plans made before that field existed still match)
    args = args or model.args
    h = hashlib.sha256(json.dumps({k: v for k, v in vars(args).items() if k not in ("eos_token_ids", "qkv_bias")},
                                  sort_keys=True).encode())
    stored = getattr(model, "weight_samples", {})
    for name, p in sorted(model.named_parameters()):
        sample = stored[name] if name in stored else weight_sample(p)
        h.update(name.encode() + bytes(str(tuple(p.shape)), "ascii"))
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_plan(plan: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1))


def read_plan(path: Path) -> dict:
    """A plan file's content, its structure checked; errors name the file and the field."""
    try:
        plan = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"plan {path} cannot be read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"plan {path} is not valid JSON ({e})") from None
    problem = plan_problem(plan)
    if problem:
        raise ValueError(f"plan {path}: {problem}; make a new one with: python profile_layers.py --model <the model>")
    return plan


def plan_problem(plan) -> str | None:
    """What is structurally wrong with a plan (None: nothing)."""
    if not isinstance(plan, dict):
        return f"expected a JSON object, found a {type(plan).__name__}"
    model, params = plan.get("model"), plan.get("parameters")
    if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
        return "field 'model' must be an object with a string 'fingerprint'"
    if not isinstance(params, dict) or type(params.get("bits")) is not int or params["bits"] not in (1, 2, 4, 8):
        return "field 'parameters' must be an object whose 'bits' is 1, 2, 4 or 8"
    if not isinstance(plan.get("layers"), list) or not all(isinstance(r, dict) for r in plan["layers"]):
        return "field 'layers' must be a list of objects, one per layer"
    ql = plan.get("quant_layers")
    if not isinstance(ql, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ql):
        return "field 'quant_layers' must be a list of layer numbers"
    shares = [r["topk"] for r in plan["layers"] if "topk" in r]
    if shares and not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in shares):
        return "a layer's 'topk' must be a whole number >= 0"
    return None


def fingerprints(model) -> list[str]:
    """The fingerprints a plan for `model` may carry: its own, and with YaRN that of the same weights at their
    native context (a plan measures where each layer's attention goes; stretching RoPE does not move that)."""
    fps, s = [fingerprint(model)], model.args.rope_scaling
    if s is not None and s["rope_type"] == "yarn":
        native = dataclasses.replace(model.args, rope_scaling=None, max_seq_len=s["original_max_position_embeddings"])
        fps.append(fingerprint(model, native))
    return fps


def load_plan(path: Path, model) -> dict:
    """Read a plan and check that it was made for `model`; refuse it otherwise."""
    plan = read_plan(path)
    fp, made_for = fingerprint(model), plan["model"]
    if made_for["fingerprint"] not in fingerprints(model):
        raise ValueError(f"plan {path} was made for {made_for.get('name')!r} (fingerprint {made_for['fingerprint']}), "
                         f"not for the loaded model (fingerprint {fp}); "
                         f"make one with: python profile_layers.py --model <the model>")
    n = model.args.n_layers
    if len(plan["layers"]) != n:
        raise ValueError(f"plan {path}: field 'layers' has {len(plan['layers'])} entries, the model {n} layers")
    bad = [i for i in plan["quant_layers"] if not 0 <= i < n]
    if bad:
        raise ValueError(f"plan {path}: field 'quant_layers' names layers {bad}; the model has layers 0..{n - 1}")
    return plan


def split_topk(plan: dict, topk: int) -> tuple[int, ...]:
    """The plan's split of the retrieved tokens (profile_layers.split), scaled to `topk` per offloaded layer on
    average: the same total as an even top-k, given where the plan finds attention needs it. () without a split."""
    shares = [r.get("topk", 0) for r in plan["layers"]]
    if not any(shares):
        return ()
    total, n = sum(shares), sum(k > 0 for k in shares)
    return tuple(max(1, round(topk * n * k / total)) if k else topk for k in shares)


def find_plan(model, plans_dir: Path = PLANS) -> Path | None:
    """The plan in plans_dir whose fingerprint matches the model, if any (unreadable files are passed over)."""
    fps = fingerprints(model)
    for path in sorted(Path(plans_dir).glob("*.json")):
        try:
            if read_plan(path)["model"]["fingerprint"] in fps:
                return path
        except ValueError:
            continue
    return None


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
