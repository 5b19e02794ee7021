"""bench/accuracy.py: the task builders, the metrics and the policy specs, on tiny inputs."""
import json
import math
from pathlib import Path

import accuracy
import pytest
import torch
from conftest import ROOT
from accuracy import (budget_knobs, fidelity, fidelity_task, markdown, parse_policy, passkey_found, passkey_task,
                      recall, repeat_task, summarize, token_metrics)


def test_repeat_task_feeds_the_document_then_asks_for_it_again():
    doc = list(range(100, 200))
    prefix, targets = repeat_task(doc, context=40, n_copy=10)
    assert prefix == doc[:30] and targets == doc[:10]        # context = D + the start of D again
    assert len(prefix) + len(targets) == 40
    with pytest.raises(ValueError):
        repeat_task(doc[:20], context=40, n_copy=10)           # the document is shorter than D
    with pytest.raises(ValueError):
        repeat_task(doc, context=40, n_copy=30)                # more copied than read


def test_fidelity_task_continues_the_same_document():
    doc = list(range(50))
    prefix, targets = fidelity_task(doc, context=30, n_next=8)
    assert prefix == doc[:30] and targets == doc[30:38]
    with pytest.raises(ValueError):
        fidelity_task(doc, context=45, n_next=8)


def test_passkey_prompt_hides_the_key_at_the_depth(default_dir):
    from tokenizer import Tokenizer
    tok = Tokenizer(default_dir)
    for depth in (0.1, 0.9):
        ids = passkey_task(tok, 400, depth, 48213)
        text = tok.decode(ids)
        assert abs(len(ids) - 400) < 8 and text.count("48213") == 2
        at = text.index("48213") / len(text)
        assert abs(at - depth) < 0.15, (depth, at)
        assert text.rstrip().endswith("The pass key is")
    assert passkey_found(" 48213.", 48213) and passkey_found("4 8 2 1 3", 48213) and not passkey_found("48231", 48213)


def test_a_perfect_predictor_scores_perfectly_and_a_bad_one_worse():
    V, targets = 50, [3, 17, 42, 8, 8, 0]
    perfect = [torch.full((V,), -30.0).index_fill_(0, torch.tensor([t]), 30.0) for t in targets]
    uniform = [torch.zeros(V) for _ in targets]
    wrong = [torch.full((V,), -30.0).index_fill_(0, torch.tensor([(t + 1) % V]), 30.0) for t in targets]
    scores = {}
    for name, logits in (("perfect", perfect), ("uniform", uniform), ("wrong", wrong)):
        nll, top1 = zip(*(token_metrics(lg, t) for lg, t in zip(logits, targets)))
        scores[name] = recall(list(nll), list(top1))
    assert scores["perfect"] == {"top1": 1.0, "nll": pytest.approx(0.0, abs=1e-6)}
    assert scores["uniform"]["nll"] == pytest.approx(math.log(V), rel=1e-5)
    assert scores["wrong"]["top1"] == 0.0 and scores["wrong"]["nll"] > scores["uniform"]["nll"]


def test_fidelity_metrics_against_the_reference():
    from generate import compare
    torch.manual_seed(0)
    ref = [torch.randn(64) for _ in range(200)]
    same = fidelity(*zip(*((c["kl"], c["top1"]) for c in (compare(r, r.clone()) for r in ref))))
    assert same == {"kl_mean": pytest.approx(0, abs=1e-6), "kl_p99": pytest.approx(0, abs=1e-6), "agreement": 1.0}
    noisy = fidelity(*zip(*((c["kl"], c["top1"]) for c in (compare(r, r + 2 * torch.randn(64)) for r in ref))))
    assert noisy["kl_mean"] > 0.5 and noisy["kl_p99"] >= noisy["kl_mean"] and noisy["agreement"] < 0.8
    kl = [0.0] * 99 + [5.0]
    assert fidelity(kl, [True] * 100)["kl_p99"] == 5.0   # p99 of 100 steps is the worst one


def test_policy_specs_and_budgets():
    c = parse_policy("tailor-2/channels@512")
    assert (c.policy, c.bits, c.select, c.budget, c.sink, c.recent, c.topk) == ("tailor", 2, "channels", 512, 8, 56, 448)
    assert budget_knobs(192) == {"budget": 192, "sink": 8, "recent": 56}   # the paper's 8 + 56 + 128
    assert topk_of(64) == 32 and topk_of(1024) == 960
    s = parse_policy("streaming@192")
    assert s.sink + s.recent == 192                       # the same device tokens per layer as sparse@192
    assert parse_policy("kivi-1").bits == 1 and parse_policy("sparse").select == "sketch"
    c = parse_policy("tailor-2/sketch-heads:1b@432")
    assert (c.select, c.sketch_bits, c.topk) == ("sketch-heads", 1, 368)
    assert parse_policy("tailor-2/exact-heads:4b").sketch_bits == 4
    with pytest.raises(ValueError, match="':2' is not a sketch's bits"):
        parse_policy("tailor-2/sketch:2")
    from latency import policy                            # bench/latency.py's labels read the same options
    c = policy("tailor-1/sketch-heads:1b@448")
    assert (c.quant_layers, c.bits, c.select, c.sketch_bits, c.budget, c.topk) == ((0,), 1, "sketch-heads", 1, 448, 384)
    assert policy("sparse").select == "sketch"
    split = policy("tailor-1+split/sketch@320").layer_topk  # as uneven as the default plan's, the same 31 x 256
    assert len(split) == 32 and abs(sum(split[1:]) - 31 * 256) <= 31 and max(split) > 3 * min(split[1:])
    with pytest.raises(ValueError):
        parse_policy("quest")
    with pytest.raises(ValueError, match="needs tailor and a layer plan"):
        parse_policy("sparse+split")


def topk_of(budget):
    return parse_policy(f"sparse@{budget}").topk


def test_tailor_takes_its_layers_from_the_plan(default_model):
    c = parse_policy("tailor-1", default_model)
    assert c.quant_layers == (0,) and c.bits == 1          # the shipped plan's layers, the spec's bits
    assert c.layer_topk == ()                              # an even top-k; +split: the plan's split of the same total
    s = parse_policy("tailor-2+split@256", default_model)
    assert s.quant_layers == (0,) and s.topk == 192 and len(set(s.layer_topk)) > 5
    assert abs(sum(s.layer_topk[1:]) - 29 * 192) <= 29
    c = parse_policy("tailor-2[0,1,2]/sketch-heads@1024", default_model)  # the spec's layers, not the plan's
    assert c.quant_layers == (0, 1, 2) and c.select == "sketch-heads" and c.topk == 1024 - 64
    assert parse_policy("tailor-2[]", default_model).quant_layers == ()
    for bad in ("sparse[0]", "tailor-2[0]+split"):
        with pytest.raises(ValueError, match="names tailor's quantized layers"):
            parse_policy(bad, default_model)


def test_summary_gives_mean_and_spread_over_documents():
    recs = [{"context": 8, "policy": "full", "doc": d, "top1": t, "nll": 1.0, "device_kv_bytes": 2**20,
             "compression": 1.0, "h2d_bytes_per_step": 0} for d, t in (("a", 0.5), ("b", 1.0))]
    (row,) = summarize(recs)
    assert row["top1"] == 0.75 and row["top1_sd"] == 0.25 and row["docs"] == 2
    table = markdown([row])
    assert "0.750 ± 0.250" in table and "| 1.00 | 1.0x |" in table


def test_full_cache_beats_a_tiny_window_on_a_tiny_model(tiny_llama_dir):
    """End to end on a random model: the full cache agrees with itself, a 4-token window does not."""
    from kvcache import CacheConfig
    from model import load_model
    model = load_model(tiny_llama_dir, "cpu", torch.float32)
    doc = torch.randint(4, 300, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    prefix, targets = fidelity_task(doc, 80, 16)
    ref = []
    full = accuracy.run_fidelity(model, CacheConfig(), prefix, targets, ref)
    assert full["kl_mean"] < 1e-9 and full["agreement"] == 1.0 and len(ref) == 16
    window = accuracy.run_fidelity(model, CacheConfig("streaming", sink=2, recent=2), prefix, targets, ref)
    assert window["kl_mean"] > 1e-4 and window["device_kv_bytes"] < full["device_kv_bytes"] / 10


@pytest.mark.parametrize("spec", ["full", "tailor-2", "kivi-1", "sparse@24", "sparse/channels@24", "streaming@16"])
def test_a_prompt_prefilled_once_decodes_as_if_each_policy_prefilled_it(tmp_path_factory, spec):
    """Prefilled.load_into: every policy's logits after loading the shared prefill are the same
    bits as after its own prefill (prefill attention is exact in every policy), over decode steps that
    quantize groups and retrieve from the host."""
    from dataclasses import replace

    from kvcache import KVCache
    from model import load_model
    from conftest import TINY_QWEN2, write_hf_model
    model = load_model(write_hf_model(tmp_path_factory.mktemp("qwen2"), TINY_QWEN2), "cpu", torch.float32)  # hd 32
    cfg = replace(parse_policy(spec, model), quant_layers=(1,), group=32, residual=64, sink=4, recent=8)
    doc = torch.randint(4, 300, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    prefix, targets = doc[:230], doc[230:300]
    shared = accuracy.Prefilled(model, prefix)

    def logits_of(prompt):
        seen = []
        mem = accuracy.teacher_force(model, cfg, prompt, targets, lambda i, lg: seen.append(lg.clone()))
        return torch.stack(seen), mem
    (own, mem_own), (loaded, mem_loaded) = logits_of(prefix), logits_of(shared)
    assert torch.equal(own, loaded) and mem_own == mem_loaded
    with pytest.raises(ValueError, match="online identification"):
        shared.load_into(KVCache(model, 300, replace(cfg, policy="tailor", quant_layers=None)))


def test_run_doc_prefills_each_prompt_once(tiny_llama_dir, monkeypatch):
    import argparse

    from model import load_model
    model = load_model(tiny_llama_dir, "cpu", torch.float32)
    prefills = []
    real = model.prefill
    monkeypatch.setattr(model, "prefill", lambda *a, **k: prefills.append(a[0].shape[1]) or real(*a, **k))
    args = argparse.Namespace(tasks=["repeat", "fidelity"], copy=16, next=8)
    doc = torch.randint(4, 300, (200,), generator=torch.Generator().manual_seed(2)).tolist()
    specs = [("full", False), ("sparse/channels@24", False), ("sparse@24", True), ("streaming@16", True)]
    records = accuracy.run_doc(args, model, None, 96, specs, "d", doc, passkey=False)
    assert prefills == [80, 96]   # the repeat prompt (96 - 16 copied), the fidelity prompt: once each
    assert [r["policy"] for r in records] == [s for s, _ in specs] and records[0]["kl_mean"] < 1e-9
    assert all("top1" in r and "kl_mean" in r for r in records)


def test_an_interrupted_run_keeps_its_finished_rows_and_replots(tmp_path):
    import accuracy
    meta = {"model": "m", "device": "CPU", "dtype": "float32", "documents": {"a": 100, "b": 100}, "sweep_context": 1024}
    row = {"sweep": False, "quant_layers": None, "bits": None, "top1": 0.9, "nll": 0.5, "kl_mean": 0.1,
           "kl_p99": 0.5, "agreement": 0.9, "device_kv_bytes": 1 << 20, "compression": 2.0}

    def one(context, spec, sweep, records):
        if spec == "kivi":
            records.append({**row, "context": context, "policy": spec, "doc": "a"})
            raise KeyboardInterrupt  # Ctrl-C half-way through the second policy
        for doc in ("a", "b"):
            records.append({**row, "context": context, "policy": spec, "doc": doc})

    out = tmp_path / "acc"
    assert accuracy.run_all([(1024, "full", False), (1024, "kivi", False), (1024, "sparse", False)], one,
                            meta, out) == 130
    run = json.loads(out.with_suffix(".json").read_text())
    assert [(r["policy"], r["doc"]) for r in run["records"]] == [("full", "a"), ("full", "b"), ("kivi", "a")]
    assert run["meta"]["complete"] is False and "interrupted run" in out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    assert accuracy.main(["--replot", str(out.with_suffix(".json"))]) == 0
    assert "| 1024 | kivi |" in out.with_suffix(".md").read_text()
    later = {"meta": {**meta, "sweep_context": 2048}, "records": [{**row, "context": 1024, "policy": "kivi", "doc": "a",
                                                                   "top1": 0.1},  # the first run's row is kept
                                                                  {**row, "context": 2048, "policy": "full", "doc": "a"}]}
    (tmp_path / "later.json").write_text(json.dumps(later))
    merged = tmp_path / "merged"
    assert accuracy.main(["--replot", str(out.with_suffix(".json")), str(tmp_path / "later.json"),
                          "--out", str(merged)]) == 0
    run = json.loads(merged.with_suffix(".json").read_text())
    assert [(r["context"], r["policy"], r["top1"]) for r in run["records"]] == \
        [(1024, "full", 0.9), (1024, "full", 0.9), (1024, "kivi", 0.9), (2048, "full", 0.9)]
    assert run["meta"]["sweep_context"] == 2048


def test_the_benchmark_refuses_its_inputs_as_clearly_as_the_cli(tmp_path):
    """A document shorter than the context, a policy spec it cannot read: one line, exit status 2."""
    import subprocess
    import sys
    script = [sys.executable, str(Path(accuracy.__file__)), "--out", str(tmp_path / "acc")]
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    r = subprocess.run([*script, "--docs", str(short), "--contexts", "1024", "--policies", "full"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "short has 5 tokens" in r.stderr and "Traceback" not in r.stderr, r.stderr
    for spec, message in (("tailor-x", "invalid literal"), ("quest", "unknown cache policy"),
                          ("tailor-2/nosuch:2", "nosuch")):
        r = subprocess.run([*script, "--policies", spec], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"--policies {spec}:" in r.stderr and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("script,args,message", [
    ("accuracy.py", ["--depths", "0.5", "2"], "--depths are fractions of the context, from 0 to 1, got [2.0]"),
    ("accuracy.py", ["--sweep-budgets", "0"], "--sweep-budgets and --sweep-context must be >= 2 tokens"),
    ("accuracy.py", ["--out", "/no/such/folder/acc"], "--out /no/such/folder/acc: folder /no/such/folder does not exist"),
    ("accuracy.py", ["--replot", "/no/such/run.json"], "--replot /no/such/run.json: No such file or directory"),
    ("accuracy.py", ["--device", "tpu"], "--device tpu: must be cpu, cuda or cuda:N"),
    ("ruler.py", ["--replot", "/no/such/run.json"], "--replot /no/such/run.json: No such file or directory"),
    ("ruler.py", ["--out", "/no/such/folder/r"], "--out /no/such/folder/r: folder /no/such/folder does not exist"),
])
def test_the_benchmarks_refuse_in_one_line_before_any_work(tmp_path, script, args, message, capsys):
    """A bad sweep, depth, --out, --replot file or device: exit 2, one line naming the flag, before anything loads
    (a damaged --replot file too)."""
    import importlib
    main = importlib.import_module(script.removesuffix(".py")).main
    for argv, expect in ((args, message), (["--replot", str(tmp_path / "run.json")], "run.json is not valid JSON")):
        (tmp_path / "run.json").write_text("{truncated")
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and expect in err and "Traceback" not in err, err