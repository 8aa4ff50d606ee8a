"""The README stays a short guide for users and the documentation holds together: README's length, its
first two commands (set-up and demo, then exactly the test command CI runs), every relative link in
README.md, docs/*.md and benchmarks/README.md (file and heading), and no words about how the project
is developed anywhere in the repository."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 250
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def code_blocks(text: str, language: str = "bash") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, at most {MAX_README_LINES}"


def test_readme_starts_with_set_up_and_demo_then_the_ci_test_command():
    setup, tests = code_blocks(README.read_text())[:2]
    setup = setup.replace("\\\n", " ")
    assert "python3 -m venv .venv" in setup
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup
    assert "magcache-generate --demo" in setup
    ci = (ROOT / ".ci" / "run").read_text()
    ci_test = [
        line.strip() for line in ci.splitlines() if "pytest" in line and not line.lstrip().startswith("#")
    ]
    assert ci_test, ".ci/run runs no pytest command"
    assert [line.strip() for line in tests.strip().splitlines()] == ci_test


def test_readme_pins_the_torch_that_ci_installs():
    ci_torch = re.search(r"torch==[0-9][0-9.]*", (ROOT / ".ci" / "run").read_text())
    assert ci_torch
    quick_start = code_blocks(README.read_text())[0]
    assert f"pip install {ci_torch.group(0)}" in quick_start


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert broken == []


# Words about the workplace rather than the product, assembled so that this file does not match itself.
DEVELOPMENT_WORDS = [
    re.compile(r"/work/" + "(shared|wt|main)"),
    re.compile(r"\.\./" + "shared"),
    re.compile(r"\b[Ii]ssues? #?\d"),
    re.compile(r"\bdevice " + r"(call|tool|time)s?\b"),
    re.compile(r"\b(helper|coordinator) " + r"(session|branch|worktree)"),
    re.compile(r"\bthis " + r"project's (machine|host|2-core)"),
]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".yml", ".yaml"}
SKIPPED_DIRS = {"out", "build", "dist", "__pycache__", "node_modules"}


def repository_text_files() -> list[Path]:
    """Source, documentation and scripts; the golden data sets (generated) and hidden folders other
    than .ci (virtual environments, caches) are left out."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = [
            d
            for d in dirs
            if (not d.startswith(".") or d == ".ci")
            and d not in SKIPPED_DIRS
            and not d.endswith(".egg-info")
            and not (here == ROOT / "tests" and d.startswith("golden"))
        ]
        files += [here / n for n in names if Path(n).suffix in TEXT_SUFFIXES or (here.name == ".ci")]
    return files


def test_nothing_speaks_of_how_the_project_is_developed():
    found = []
    for path in repository_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if any(pattern.search(line) for pattern in DEVELOPMENT_WORDS):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert found == []
