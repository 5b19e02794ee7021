"""bench/ruler.py: every task's prompt has exactly its length and holds its answers, the scoring is RULER's
recall, and a small run writes its JSON and table (and merges runs)."""
import collections
import json

import pytest

import ruler
from tokenizer import Tokenizer


@pytest.fixture(scope="module")
def builder(default_dir):
    return ruler.Builder(Tokenizer(default_dir))


@pytest.mark.parametrize("length", [600, 3001])
@pytest.mark.parametrize("task", ruler.TASKS)
def test_every_prompt_has_its_length_and_its_answers(builder, task, length):
    p = builder.build(task, length, 0)
    assert len(p.ids) == length and p.answers and p.n_new > 0
    text = builder.tok.decode(p.ids)
    assert all(a in text for a in p.answers), p.answers
    turns = builder.tok.render_chat([{"role": "user", "content": "x"}]).count("<|im_start|>")
    assert text.count("<|im_start|>") == turns and text.rstrip().endswith((":", " is", " are"))
    assert p.ids.count(builder.tok.encode("<|im_start|>", add_special_tokens=False)[0]) == turns  # control tokens
    assert builder.build(task, length, 0).ids == p.ids  # seeded by task, length and sample
    assert builder.build(task, length, 1).ids != p.ids


def test_the_needles_are_where_the_answers_say(builder):
    """multikey_1 hides three distractors beside the needle; multiquery asks for four keys, each value once."""
    p = builder.build("niah_multikey_1", 2000, 0)
    text = builder.tok.decode(p.ids)
    assert text.count("The special magic number for") == 4 + 1  # the needles, and the answer's start
    p = builder.build("niah_multiquery", 2000, 0)
    assert len(p.answers) == 4 and len(set(p.answers)) == 4


def test_common_and_frequent_words_are_the_most_common(builder):
    for length in (600, 3001):
        p = builder.build("cwe", length, 0)
        counts = collections.Counter(w for w in builder.tok.decode(p.ids).split() if w.isalpha())
        others = [c for w, c in counts.items() if w not in p.answers and w.islower()]
        assert len(p.answers) == 10 and min(counts[w] for w in p.answers) > max(others), (length, counts.most_common(14))
        p = builder.build("fwe", length, 0)
        counts = collections.Counter(builder.tok.decode(p.ids).split())
        assert len(p.answers) == 3 and [counts[w] for w in p.answers] == sorted((counts[w] for w in p.answers), reverse=True)
        assert min(counts[w] for w in p.answers) > max(c for w, c in counts.items() if len(w) == 6 and w not in p.answers)


def test_score_is_the_recall_of_the_expected_strings():
    assert ruler.score("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert ruler.score("the VARIABLES are ABCDE", ["abcde", "FGHIJ"]) == 0.5
    assert ruler.score("", ["x"]) == 0.0


def test_a_small_run_writes_json_and_table_resumes_and_merges(tmp_path, monkeypatch):
    out = tmp_path / "r"
    argv = ["--lengths", "512", "--tasks", "niah_single_1", "vt", "--samples", "2", "--policies", "full", "streaming@64",
            "--out", str(out)]
    assert ruler.main(argv) == 0
    run = json.loads(out.with_suffix(".json").read_text())
    assert run["meta"]["complete"] and len(run["records"]) == 2 * 2 * 2
    full = next(r for r in run["summary"] if r["policy"] == "full")
    assert set(full["tasks"]) == {"niah_single_1", "vt"} and full["samples"] == {"niah_single_1": 2, "vt": 2}
    assert full["vs_full"] == 1.0 and full["vs_full_ci"] == [1.0, 1.0] and full["ci"][0] <= full["average"] <= full["ci"][1]
    assert all(0 <= r["score"] <= 1 and r["device_kv_bytes"] > 0 for r in run["records"])
    table = out.with_suffix(".md").read_text()
    assert "| 512 | full |" in table and "| 512 | streaming@64 |" in table and "95% CI" in table
    journal = out.with_suffix(".jsonl")
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + 8 and json.loads(lines[0])["run"]["model"] == run["meta"]["model"]
    journal.write_text("\n".join(lines[:-3]) + "\n" + lines[-1][:20])  # the last prompt's answers lost, one cut short
    prefills = []
    real = ruler.Prefilled
    monkeypatch.setattr(ruler, "Prefilled", lambda model, ids: prefills.append(ids) or real(model, ids))
    assert ruler.main(argv) == 0 and len(prefills) == 2  # the two prompts whose answers were lost, no other
    again = json.loads(out.with_suffix(".json").read_text())
    assert sorted(map(json.dumps, again["records"])) == sorted(map(json.dumps, run["records"]))
    other = dict(run, records=[dict(r, length=1024, yarn=4.0) for r in run["records"]])
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert ruler.main(["--replot", str(out.with_suffix(".json")), str(tmp_path / "b.json"),
                       "--out", str(tmp_path / "merged")]) == 0
    merged = (tmp_path / "merged.md").read_text()
    assert "| 512 | full |" in merged and "| 1024 (YaRN x4) | full |" in merged


def test_a_journal_of_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    out.with_suffix(".jsonl").write_text(json.dumps({"run": {"model": "another"}}) + "\n")
    with pytest.raises(SystemExit) as e:
        ruler.main(["--lengths", "512", "--tasks", "vt", "--samples", "1", "--policies", "full", "--out", str(out)])
    assert e.value.code == 2 and "holds answers of another run" in capsys.readouterr().err


def test_the_plan_runs_saturated_tasks_once_unless_named():
    plan = ruler.plan(["all"], [4096, 65536], 5, 3)
    assert [(n, t, k) for n, t, k in plan if t in ("niah_single_1", "vt")] == [
        (4096, "niah_single_1", 1), (4096, "vt", 5), (65536, "niah_single_1", 1), (65536, "vt", 3)]
    assert {t for _, t, _ in ruler.plan(["discriminating"], [4096], 5, 3)} == set(ruler.TASKS) - set(ruler.SATURATED)
    assert ruler.plan(["niah_single_1", "discriminating"], [4096], 5, 3)[0] == (4096, "niah_single_1", 5)


def test_the_interval_is_paired_and_narrows_with_samples():
    """A policy that scores what the full cache scores has the ratio 1 exactly, whatever the prompts; a policy
    that loses on half the prompts has an interval around its average that more prompts narrow."""
    import random
    rng = random.Random(1)

    def records(n):
        out = []
        for task in ("vt", "cwe"):
            for i in range(n):
                s = rng.random()
                for policy, score in (("full", s), ("same", s), ("half", s * (i % 2))):
                    out.append({"length": 4096, "task": task, "sample": i, "policy": policy, "score": score,
                                "device_kv_bytes": 1})
        return out
    widths = []
    for n in (4, 40):
        rows = {r["policy"]: r for r in ruler.summarize(records(n))}
        assert rows["same"]["vs_full_ci"] == [1.0, 1.0] and rows["same"]["ci"] == rows["full"]["ci"]
        half = rows["half"]
        assert half["ci"][0] <= half["average"] <= half["ci"][1] and half["vs_full_ci"][1] < 1
        widths.append(half["ci"][1] - half["ci"][0])
    assert widths[1] < widths[0] / 2


@pytest.mark.parametrize("argv,message", [
    (["--lengths", "100"], "--lengths must be >= 512"),
    (["--policies", "tailor-x"], "--policies tailor-x"),
    (["--lengths", "65536"], "exceeds the model's 8192-token context"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ruler.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_oracle_recalls_itself_and_a_selector_recalls_part_of_it(builder, default_model):
    """At the answer's first step the oracle's choice recalls all of its own mass; the 2-bit mean-query sketch
    a part of it, more with a larger budget; a layer whose offloaded tokens all fit its top-k is left out."""
    pre = ruler.Prefilled(default_model, builder.build("vt", 1500, 0).ids)
    specs = ["sparse/exact-heads", "sparse", "sparse@512", "tailor-2@4096", "kivi-2"]
    recall = ruler.oracle_recall(default_model, pre, {s: ruler.parse_policy(s, default_model) for s in specs})
    assert recall["sparse/exact-heads"] == pytest.approx(1.0)
    assert 0.3 < recall["sparse"] < recall["sparse@512"] < 1.0, recall
    assert set(recall) == {"sparse/exact-heads", "sparse", "sparse@512"}  # everything fits, or nothing is offloaded
