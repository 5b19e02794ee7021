"""The README's numbers and links: every measurement row (here and in research/README.md) comes from a
results file a script wrote, every link to a function lands on its definition, and it stays short.

    python tests/test_readme.py      # moves the README's #L anchors to where the definitions are now
"""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[`([\w.]+)(?:\(\))?`\]\(([\w/]+\.py)#L(\d+)\)")  # [`Class.method`](file.py#L123)


def table_rows(text: str) -> list[str]:
    """Markdown table rows that hold numbers (not headers, separators or the flag tables)."""
    return [line.strip() for line in text.splitlines()
            if line.startswith("| ") and any(c.isdigit() for c in line) and not line.startswith(("| `", "|---"))]


def test_every_readme_measurement_row_comes_from_a_results_file():
    results = set()
    for path in (ROOT / "bench" / "results").glob("*.md"):
        results |= set(table_rows(path.read_text()))
    for readme in ("README.md", "research/README.md"):
        rows = table_rows((ROOT / readme).read_text())
        assert len(rows) >= 12  # README: one latency and one accuracy table (the rest is in bench/RESULTS.md)
        missing = [r for r in rows if r not in results]
        assert not missing, f"{readme} rows with no results file:\n" + "\n".join(missing[:10])


def test_the_readme_teaches_in_at_most_16_kb():
    assert len((ROOT / "README.md").read_bytes()) < 16000  # findings go to research/README.md


def defines(node: ast.stmt, name: str) -> bool:
    targets = getattr(node, "targets", [getattr(node, "target", None)])
    return getattr(node, "name", None) == name or any(isinstance(t, ast.Name) and t.id == name for t in targets)


def definition_line(path: Path, name: str) -> int | None:
    """The line where `name` is defined in `path`: a function, class or constant, `Class.method`, or a
    bare method name (the first class that has it); a leading module name is dropped."""
    parts = name.split(".")
    if parts[0] == path.stem and len(parts) > 1:
        parts = parts[1:]
    body = ast.parse(path.read_text()).body
    if len(parts) == 1 and not any(defines(n, parts[0]) for n in body):  # a method: its first class
        body = [m for n in body if isinstance(n, ast.ClassDef) for m in n.body]
    for part in parts[:-1]:
        body = next((n.body for n in body if defines(n, part)), [])
    return next((n.lineno for n in body if defines(n, parts[-1])), None)

def fix(text: str) -> str:
    return LINK.sub(lambda m: f"[`{m[0][2:m[0].index('`', 2)]}`]({m[2]}#L{definition_line(ROOT / m[2], m[1])})",
                    text)


def test_readme_links_land_on_the_definitions():
    text = (ROOT / "README.md").read_text()
    links = LINK.findall(text)
    assert len(links) >= 20 and len(links) == text.count(".py#L")  # every anchor has the form LINK reads
    wrong = [f"{name} ({file}#L{line}): defined at {definition_line(ROOT / file, name)}"
             for name, file, line in links if definition_line(ROOT / file, name) != int(line)]
    assert not wrong, "run `python tests/test_readme.py` to move the anchors:\n" + "\n".join(wrong)


if __name__ == "__main__":
    readme = ROOT / "README.md"
    readme.write_text(fix(readme.read_text()))
    sys.exit(0)
