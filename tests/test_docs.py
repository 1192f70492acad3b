"""Documentation: every link resolves, design citations name real sections, the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

DOCS = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
SKIP_DIRS = {".git", ".venv", "output", "data", "node_modules", "__pycache__"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".json", ".cff", ".txt", ".toml"}


def prose_lines(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks, with inline code spans removed."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of the headings of ``path``: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def test_the_slug_rule_is_githubs():
    doc = REPO_ROOT / "docs" / "design.md"
    assert {"41-captions", "4-the-method-bimors", "3-contracts"} <= anchors(doc)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_link_resolves_to_a_file_and_anchor_in_the_repository(doc):
    broken = []
    for line in prose_lines(doc):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            if REPO_ROOT not in path.parents and path != REPO_ROOT:
                broken.append(f"{target} (outside the repository)")
            elif not path.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path)):
                broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def _text_files() -> list[Path]:
    return [
        p for p in REPO_ROOT.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES and not SKIP_DIRS & set(p.relative_to(REPO_ROOT).parts)
    ]  # fmt: skip


def test_design_citations_name_sections_that_exist():
    headings = set()
    for line in (REPO_ROOT / "docs" / "design.md").read_text().splitlines():
        match = re.match(r"^#{2,3}\s+(\d+(?:\.\d+)?)\.?\s", line)
        if match:
            headings.add(match.group(1))
    cited = {}
    for path in _text_files():
        for number in re.findall(r"docs/design\.md section (\d+(?:\.\d+)?)", path.read_text(errors="replace")):
            cited.setdefault(number, []).append(str(path.relative_to(REPO_ROOT)))
    assert {"3", "4", "4.1", "4.4", "4.7", "5.1", "7"} <= set(cited), cited
    missing = {n: files for n, files in cited.items() if n not in headings}
    assert not missing, f"citations of sections docs/design.md does not have: {missing}"


def test_nothing_cites_a_design_document_outside_the_repository():
    outside = "DESIGN" + ".md"  # the original brief, which is not part of the repository
    offenders = [str(p.relative_to(REPO_ROOT)) for p in _text_files() if outside in p.read_text(errors="replace")]
    assert not offenders, f"cite docs/design.md instead in: {offenders}"


def test_readme_fits_on_a_screen_or_two():
    assert len((REPO_ROOT / "README.md").read_text(encoding="utf-8")) < 12_000


def test_citation_file_names_the_paper_and_the_licence_is_mit():
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["title"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert "arXiv:2601.20675" in {i["value"] for i in paper["identifiers"]}
    assert [a["family-names"] for a in paper["authors"]] == ["Kashyap", "Singha", "Banerjee"]
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License")
