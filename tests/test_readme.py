"""Every table row of measurements in the README is a row of a results file that a script wrote."""
from conftest import ROOT


def table_rows(text: str) -> list[str]:
    """Markdown table rows that hold numbers (not headers, separators or the flag tables)."""
    return [line.strip() for line in text.splitlines()
            if line.startswith("| ") and any(c.isdigit() for c in line) and not line.startswith(("| `", "|---"))]


def test_every_readme_measurement_row_comes_from_a_results_file():
    results = set()
    for path in (ROOT / "bench" / "results").glob("*.md"):
        results |= set(table_rows(path.read_text()))
    rows = table_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 14  # the headline latency table (the rest is in bench/RESULTS.md)
    missing = [r for r in rows if r not in results]
    assert not missing, "README rows with no results file:\n" + "\n".join(missing[:10])


def test_results_md_is_written_from_the_results_files():
    import sys
    sys.path.insert(0, str(ROOT / "bench"))
    import results
    assert (ROOT / "bench" / "RESULTS.md").read_text() == results.build()
