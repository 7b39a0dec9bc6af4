"""The README and docs/ stand on their own in a clone: links resolve inside the repository, commands name
files and Dockerfile targets that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md"))


def _links(path: Path) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()) if "://" not in m]


@pytest.mark.parametrize("path", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(path):
    for link in _links(path):
        target = (path.parent / link).resolve()
        assert target.is_relative_to(REPO), f"{path.name} links {link}, outside the repository"
        assert target.exists(), f"{path.name} links {link}, which does not exist"
    assert "shared/design.md" not in path.read_text()


def test_readme_links_the_design_docs():
    linked = {(REPO / link).resolve() for link in _links(REPO / "README.md")}
    for name in ("architecture.md", "planner.md", "runtime.md", "metrics.md", "argocd.md"):
        assert (REPO / "docs" / name).resolve() in linked, name


def test_readme_image_build_commands_use_the_dockerfiles_targets():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)", (REPO / "Dockerfile").read_text(), re.M))
    built = set(re.findall(r"docker build --target (\S+)", (REPO / "README.md").read_text()))
    assert {"operator", "runtime"} <= built <= targets


def test_example_paths_in_docs_and_scripts_exist():
    texts = [(REPO / "README.md").read_text(), (REPO / "scripts" / "quickstart.sh").read_text(),
             *(p.read_text() for p in DOCS), *(p.read_text() for p in (REPO / "bench").glob("*.py"))]
    paths = {m for text in texts for m in re.findall(r"\bexamples/[\w./-]+\.ya?ml", text)}
    assert paths, "the README shows at least one example"
    for rel in paths:
        assert (REPO / rel).is_file(), rel
