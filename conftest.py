"""Fixtures shared by the engine's tests (tests/) and the benchmarks' own (bench/test_*.py)."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
# convert the default GGUF into a cache private to this test session (exercises the conversion too),
# removed when the session ends
if "XDG_CACHE_HOME" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="tailorkv-test-cache-")
    os.environ["XDG_CACHE_HOME"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in the interpreter (exact, slow)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import checkpoint  # noqa: E402
from model import load_model  # noqa: E402


def hide_kernels_from_transformers():
    """transformers >= 5 imports the hub's `kernels` package when it is installed (it depends on it), and
    this repository's kernels.py, first on sys.path, answers to that name: turn its hub kernels off and
    tell it the package is absent (the oracle needs none of it)."""
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    try:
        import transformers.utils as utils
        import transformers.utils.import_utils as import_utils
    except ImportError:
        return
    utils.is_kernels_available = import_utils.is_kernels_available = lambda *args, **kwargs: False


hide_kernels_from_transformers()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bench/gpu_check.py runs these with the cuda-parametrized tests)")


@pytest.fixture(scope="session")
def default_dir() -> Path:
    return checkpoint.resolve_model(None)


@pytest.fixture(scope="session")
def default_model(default_dir):
    return load_model(default_dir, "cpu", torch.float32)


def write_hf_model(path: Path, config: dict, seed: int = 0, max_shard_size=None) -> Path:
    """Build a random HF transformers model from `config` and save it as safetensors in `path`."""
    import transformers
    cls = getattr(transformers, config["architectures"][0])
    cfg_cls = transformers.AutoConfig.for_model(config["model_type"]).__class__
    torch.manual_seed(seed)
    hf = cls(cfg_cls(**config)).float().eval()
    for p in hf.parameters():  # HF initialises norms to 1 exactly: perturb so their loading is tested
        if p.dim() == 1:
            p.data.normal_(1.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    hf.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


TINY_LLAMA31 = {  # Llama 3.1 style: llama3 rope scaling, GQA 4:1, explicit head_dim != hidden/heads
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 300, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [2, 3],
}
TINY_MISTRAL = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 96, "intermediate_size": 192,
    "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 300,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}

TINY_QWEN2 = {  # Qwen2: biases on q, k and v; a sliding window that is switched off
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "use_sliding_window": False,
    "sliding_window": 64, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}

@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return write_hf_model(tmp_path_factory.mktemp("tiny-llama31"), TINY_LLAMA31)
