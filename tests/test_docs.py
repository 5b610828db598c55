"""Every documentation reference in the repository resolves: a `.md` path that a source file
(kdiff_jax/, tests/, benchmarks/, configs/, launch/, main.py) cites names a file of the
repository, the docs' own links lead to files, and nothing cites notes that are not in the
repository (a `specs/` folder or a design memo). Read from the text; nothing is imported."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("kdiff_jax", "tests", "benchmarks", "configs", "launch", "main.py")
# A path ending in .md: path characters, not preceded by one (so "docs/x.md" is one match).
MD_PATH = re.compile(r"(?<![\w./-])((?:\.\./|[\w.-]+/)*[\w.-]+\.md)\b")
# Markdown links [text](target), the target up to its closing parenthesis or a #fragment.
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
# Notes that live outside the repository: citing them leads nowhere for a reader of the code.
OUTSIDE = re.compile(r"(?<![\w/])specs/|\bDESIGN\.md\b|\.\./shared\b")


THIS_FILE = os.path.abspath(__file__)  # its synthetic references are meant to fail


def _files(extensions):
  """The files of SOURCES with these extensions, this test's own file left out."""
  for source in SOURCES:
    path = os.path.join(ROOT, source)
    if os.path.isfile(path):
      yield path
      continue
    for directory, dirs, files in os.walk(path):
      dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
      yield from (os.path.join(directory, f) for f in sorted(files)
                  if f.endswith(extensions) and os.path.join(directory, f) != THIS_FILE)


def _docs():
  yield os.path.join(ROOT, "README.md")
  for directory, _, files in os.walk(os.path.join(ROOT, "docs")):
    yield from (os.path.join(directory, f) for f in sorted(files) if f.endswith(".md"))


def _page_names() -> set:
  """The file names of the repository's Markdown pages (docs/, README.md, benchmarks/RESULTS.md,
  ...)."""
  names = set()
  for directory, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    names.update(f for f in files if f.endswith(".md"))
  return names


PAGE_NAMES = _page_names()


def missing_md_references(text: str, directory: str) -> list:
  """The `.md` paths cited in `text` that name no file, relative to the repository root or to
  `directory` (the citing file's folder). A cited path with a folder (docs/samplers.md,
  ../export.md) is a reference; so is a bare page name (samplers.md, which must be cited with
  its folder); another bare name (SUMMARY.md) names a file that a tool writes, not a page."""
  return sorted({path for path in MD_PATH.findall(text)
                 if ("/" in path or path in PAGE_NAMES)
                 and not any(os.path.isfile(os.path.normpath(os.path.join(base, path)))
                             for base in (ROOT, directory))})


def missing_links(text: str, directory: str) -> list:
  """The relative link targets of a Markdown text that name no file or folder."""
  return sorted({target for target in MD_LINK.findall(text)
                 if "://" not in target and not target.startswith("mailto:")
                 and not os.path.exists(os.path.normpath(os.path.join(directory, target)))})


def outside_references(text: str) -> list:
  return [line.strip() for line in text.splitlines() if OUTSIDE.search(line)]


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _relative(path):
  return os.path.relpath(path, ROOT)


def test_the_checks_fail_on_what_they_must_catch():
  """Synthetic sources: a reference to a missing file, and to notes outside the repository."""
  tests = os.path.join(ROOT, "tests")
  assert missing_md_references('"""See docs/no_such_page.md, "Loss"."""', tests) == [
      "docs/no_such_page.md"]
  assert missing_md_references("# (objectives/nowhere.md)", tests) == ["objectives/nowhere.md"]
  assert missing_md_references('"""docs/samplers.md and docs/objectives/imm.md."""', tests) == []
  assert missing_md_references("x = 'README.md'", tests) == []
  assert missing_md_references("(parameterization.md)", tests) == ["parameterization.md"]
  assert missing_md_references('open(out / "SUMMARY.md")', tests) == []
  assert missing_links("[a](samplers.md) [b](gone.md#x) [c](https://x.org/y.md)",
                       os.path.join(ROOT, "docs")) == ["gone.md"]
  cited = "A port of X (specs/imm.md); see DESIGN.md and ../shared/notes."
  assert len(outside_references(cited)) == 1
  assert outside_references("/mnt/shared/in256_latents, docs/export.md") == []


def test_every_md_path_cited_in_the_sources_exists():
  missing = []
  for path in _files((".py",)):
    missing += [f"{_relative(path)}: {ref}"
                for ref in missing_md_references(_read(path), os.path.dirname(path))]
  assert not missing, "references to files that do not exist:\n" + "\n".join(missing)


def test_the_docs_links_lead_to_files():
  missing = []
  for path in _docs():
    text = _read(path)
    missing += [f"{_relative(path)}: {target}"
                for target in missing_links(text, os.path.dirname(path))]
    missing += [f"{_relative(path)}: {ref}"
                for ref in missing_md_references(text, os.path.dirname(path))]
  assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("extensions", [(".py",), (".md", ".ipynb", ".sh")])
def test_nothing_cites_notes_outside_the_repository(extensions):
  paths = list(_files(extensions))
  if ".md" in extensions:
    paths += list(_docs())
  found = [f"{_relative(path)}: {line}" for path in paths for line in outside_references(_read(path))]
  assert not found, "cite the docs/ page instead:\n" + "\n".join(found)


def test_every_page_of_the_index_exists_and_every_page_is_in_the_index():
  index = _read(os.path.join(ROOT, "docs", "README.md"))
  linked = {os.path.normpath(target) for target in MD_LINK.findall(index)
            if target.endswith(".md") and not target.startswith("..")}
  pages = {os.path.relpath(p, os.path.join(ROOT, "docs")) for p in _docs()
           if os.path.dirname(p) != ROOT and os.path.basename(p) != "README.md"}
  assert pages == linked
