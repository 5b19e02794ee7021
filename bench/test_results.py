"""bench/RESULTS.md is what bench/results.py builds from the tables in bench/results/."""
import results
from conftest import ROOT


def test_results_md_is_written_from_the_results_files():
    assert (ROOT / "bench" / "RESULTS.md").read_text() == results.build()


def test_publishing_a_table_rebuilds_results_md_only_for_its_own_files(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(results, "write", lambda: written.append(True))
    results.publish(tmp_path / "latency.md", "| a | 1 |")           # elsewhere (a benchmark's --out)
    assert (tmp_path / "latency.md").read_text() == "| a | 1 |\n" and not written
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    results.publish(tmp_path / "notes.md", "x")                     # in results/, not one of RESULTS.md's
    assert not written
    results.publish(tmp_path / "latency.md", "| a | 2 |")
    assert written == [True]


def test_the_retrieval_summary_is_built_from_the_runs_json():
    """research/README.md's retrieval tables: research/retrieval_table.py over the committed JSON, nothing typed."""
    from research import retrieval_table
    assert (ROOT / "bench" / "results" / "retrieval_summary.md").read_text() == retrieval_table.build() + "\n"
    assert "| 4096 | tailor-2/sketch-heads | 0.885 | 1.02x | 105% | 0.019 | 13.00 |" in retrieval_table.build()
