"""Every document the code and docs cite is in the repository, and every cited defect number is in
docs/h3fusion.md's table."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
# Where citations live: library and config docstrings/comments, the tests, the docs and the README.
FILES = sorted([*REPO.glob("h3jax/**/*.py"), *REPO.glob("configs/*.py"), *REPO.glob("tests/*.py"),
                *REPO.glob("docs/*.md"), REPO / "README.md"])
# Documents that lived outside the repository (cited by older docstrings), absolute paths of one machine,
# and "§N" section numbers (the docs here have named sections, not numbered ones).
OUTSIDE = re.compile(r"h3fusion-method\.md|jax-notes\.md|merging-methods\.md|study-notes\.md|/work/|§")
THIS = pathlib.Path(__file__).name


def _lines():
  for f in FILES:
    if f.name == THIS:
      continue
    for i, line in enumerate(f.read_text().splitlines(), 1):
      yield f.relative_to(REPO), i, line


def test_cited_docs_exist():
  missing = [f"{f}:{i}: {m}" for f, i, line in _lines() for m in re.findall(r"\bdocs/[\w./-]*\w\.md\b", line)
             if not (REPO / m).is_file()]
  assert not missing, "cited documents that are not in the repository:\n" + "\n".join(missing)


def test_no_references_outside_the_repository():
  bad = [f"{f}:{i}: {line.strip()}" for f, i, line in _lines() if OUTSIDE.search(line)]
  assert not bad, "references nobody in the repository can follow:\n" + "\n".join(bad)


def test_cited_defect_numbers_are_in_the_h3fusion_table():
  table = {int(n) for n in re.findall(r"^\| (\d+) \|", (REPO / "docs/h3fusion.md").read_text(), re.M)}
  assert table == set(range(1, 10))
  bad = [f"{f}:{i}: #{n}" for f, i, line in _lines()
         for cite in re.findall(r"defects? #\d+(?:,? #\d+)*", line) for n in re.findall(r"#(\d+)", cite)
         if int(n) not in table]
  assert not bad, "defect numbers missing from docs/h3fusion.md:\n" + "\n".join(bad)
