"""generate.py end to end (subprocess, as a user runs it) and its pieces."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import generate
from kvcache import CacheConfig, KVCache
from tokenizer import Tokenizer

DOC = ROOT / "examples" / "lighthouse.txt"


def cli(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_golden_answer_and_report(tmp_path):
    report = tmp_path / "run.json"
    r = cli("--prompt", "What is the capital of France?", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is Paris.\n"  # only generated text on stdout
    assert "prompt 37 tokens of 8192 context" in r.stderr and "ms/tok" in r.stderr
    rep = json.loads(report.read_text())
    assert rep["generated_text"] == "The capital of France is Paris." and rep["prompt_tokens"] == 37
    cuda = torch.cuda.is_available()  # the defaults: bf16 on CUDA, fp32 on CPU
    assert rep["device"] == ("cuda" if cuda else "cpu") and rep["dtype"] == ("bfloat16" if cuda else "float32")
    assert rep["policy"]["cache"] == "full"
    assert rep["prefill_s"] > 0 and rep["decode_ms_per_token"] > 0 and rep["peak_memory_bytes"] > 0
    assert rep["kv_cache"]["device_bytes"] == 2 * 30 * 3 * 64 * (37 + 256) * (2 if cuda else 4)  # K and V
    assert "torch" in rep["versions"] and not rep["interrupted"]


def test_cli_document_from_stdin_with_question():
    doc = DOC.read_text()
    r = cli("--prompt-file", "-", "--question", "In which year did the new keeper arrive?",
            "--max-new-tokens", "12", "--prefill-chunk", "1024", stdin=doc)
    assert r.returncode == 0, r.stderr
    n = int(r.stderr.split("prompt ")[1].split(" tokens")[0])
    assert n > 3000 and r.stdout.strip()


@pytest.mark.parametrize("args,message", [
    (["--prompt-file", "/no/such/doc.txt"], "prompt file /no/such/doc.txt does not exist"),
    (["--prompt", "   \n"], "the prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "must be a positive integer"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--prompt", "hi", "--cache", "magic"], "invalid choice: 'magic'"),
    (["--prompt", "hi", "--model", "/no/such/model"], "no such file or directory"),
    (["--prompt", "hi", "--max-new-tokens", "9000"], "leaves no room for a prompt"),
])
def test_cli_bad_input(args, message):
    r = cli(*args)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_cli_empty_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = cli("--prompt-file", str(tmp_path / "empty.txt"))
    assert r.returncode == 2 and "empty.txt has no text" in r.stderr


def test_cli_prompt_longer_than_context(tmp_path):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(DOC.read_text() * 3)  # ~9.6k tokens > 8192
    r = cli("--prompt-file", str(long_doc))
    assert r.returncode == 2 and "but the model's context is 8192" in r.stderr and "--truncate middle" in r.stderr


def test_fit_to_context():
    ids = list(range(100))
    assert generate.fit_to_context(ids, 200, 50, "none") == (ids, 50)
    assert generate.fit_to_context(ids, 120, 50, "none") == (ids, 20)  # generation stops at the context end
    cut, n = generate.fit_to_context(ids, 80, 30, "middle")
    assert n == 30 and cut == ids[:25] + ids[75:]
    with pytest.raises(generate.UsageError, match="prompt is 100 tokens"):
        generate.fit_to_context(ids, 90, 10, "none")


def test_sampling():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert generate.sample(logits, 0.0, 1.0, g) == 1
    assert {generate.sample(logits, 1.0, 0.5, g) for _ in range(50)} == {1}  # nucleus of one token
    draws = {generate.sample(logits, 1.0, 0.9, g) for _ in range(200)}
    assert draws == {1, 2}  # the -3.0 and 0.0 tokens are outside the 0.9 nucleus
    seeded = [[generate.sample(logits, 2.0, 1.0, gen) for _ in range(20)]
              for gen in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))]
    assert seeded[0] == seeded[1] and len(set(seeded[0])) > 1  # same seed, same draws


def test_interrupt_keeps_what_was_generated(default_dir, default_model):
    tok = Tokenizer(default_dir)
    ids = tok.encode_chat([{"role": "user", "content": "Count from one to fifty in words."}])
    seen = []

    def on_token(t):
        seen.append(t)
        if len(seen) == 5:
            raise KeyboardInterrupt

    cache = KVCache(default_model, len(ids) + 40)
    out, stats = generate.generate(default_model, cache, ids, 40, set(tok.eos_ids), on_token=on_token)
    assert stats["interrupted"] and out == seen and len(out) == 5


def test_memory_refusal_before_allocating(default_model, monkeypatch):
    monkeypatch.setattr(generate, "free_memory", lambda device: 600 << 20)
    with pytest.raises(generate.UsageError, match=r"full KV cache for 8192 positions needs 0.67 GiB of host memory "
                                                  r"\(cache 0.35 \+ prefill 0.00 \+ working 0.32\) but only 0.59 GiB"):
        generate.make_cache(CacheConfig(), default_model, 8192, "cpu", torch.float32)
    # the same budget holds a shorter one (on a CPU an offloaded layer's host store is the same memory)
    assert isinstance(generate.make_cache(CacheConfig("tailor"), default_model, 2048, "cpu", torch.float32), KVCache)
