"""The README and docs/ hold together: every relative link and image resolves (a `page.md#anchor` link to a heading
of that page, GitHub-style), the README stays a five-minute read and links every docs page. Fast: no app."""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 150

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
CODE = re.compile(r"`+[^`\n]*`+")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w is Unicode-aware, as github-slugger keeps letters and digits
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, numbered the way GitHub numbers repeats (`-1`, `-2`, …)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def links(page: Path) -> list[str]:
    text = CODE.sub("", FENCE.sub("", page.read_text()))  # links inside code are examples, not links
    return LINK.findall(text) + HTML_SRC.findall(text)


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) and not target.startswith("//")


def test_the_docs_exist():
    assert README.is_file() and len(DOCS) >= 5, [p.name for p in DOCS]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in links(page):
        if not relative(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(REPO) if file.is_relative_to(REPO) else file}")
        elif not file.is_relative_to(REPO):
            broken.append(f"{target}: outside the repository")
        elif anchor and file.suffix == ".md" and unquote(anchor).lower() not in anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_the_readme_is_a_five_minute_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / unquote(t.partition("#")[0])).resolve() for t in links(README) if relative(t)}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_readme_keeps_the_research_use_disclaimer():
    assert "Research use only. This is not a diagnostic device." in README.read_text()


def test_images_in_the_docs_stay_small():
    images = sorted((REPO / "docs" / "images").glob("*.png"))
    big = [f"{p.name}: {p.stat().st_size // 1000} KB" for p in images if p.stat().st_size > 400_000]
    assert not big, big


@pytest.mark.parametrize("heading, expected", [
    ("Smear photos from a real microscope (ALL-IDB)", "smear-photos-from-a-real-microscope-all-idb"),
    ("Export: use a trained model outside this project", "export-use-a-trained-model-outside-this-project"),
    ("Safe classification: the gate, the decision rule, the audit trail",
     "safe-classification-the-gate-the-decision-rule-the-audit-trail"),
    ("The `RunConfig` and [its presets](x.md)", "the-runconfig-and-its-presets"),
    ("GPU and scaling out", "gpu-and-scaling-out"),
])
def test_slug_is_githubs(heading, expected):
    assert slug(heading) == expected


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Part two\n\n[ok](a.md#part-two) [bad](a.md#nope) [gone](b.md) "
                                   "![img](i.png) `[not a link](x.md)`\n")
    assert anchors(tmp_path / "a.md") == {"top", "part-two"}
    assert links(tmp_path / "a.md") == ["a.md#part-two", "a.md#nope", "b.md", "i.png"]


def test_every_screenshot_is_shown_and_made_by_the_script():
    """docs/images/*.png are the ones `make screenshots` (tools/screenshots.py) writes, and each is shown somewhere:
    a screenshot nobody can remake, or nobody sees, is stale."""
    script = (REPO / "tools" / "screenshots.py").read_text()
    shown = {Path(unquote(t)).name for p in PAGES for t in links(p) if t.endswith(".png")}
    for image in sorted((REPO / "docs" / "images").glob("*.png")):
        assert f'"{image.name}"' in script, f"{image.name} is not written by tools/screenshots.py"
        assert image.name in shown, f"{image.name} is shown by no page"
