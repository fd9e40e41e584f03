"""The documentation as a newcomer meets it: README is the front door (short, every link
resolving), the reference lives in docs/ by topic, and no section the README once held was lost
in the move (each is found by its old heading)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "infra" / "README.md"]

# The README's sections before it became the front door (2026-11-27).
OLD_HEADINGS = [
    "What `make run` does",
    "Scheduled retraining (Prefect deployments)",
    "Drift monitor",
    "A local stack of servers (no Docker)",
    "Running for a team",
    "Metrics",
    "The promotion gate",
    "The VAE's uses, measured",
    "Anomaly detection",
    "Few-label learning",
    "Embeddings",
    "Generation",
    "Promotion floors",
    "Configuration",
    "Commands",
    "Data sources",
    "Reproducing by hand with DVC",
    "Tracking",
    "Training directly",
    "Layout",
    "Tests",
    "Benchmarks",
]


def headings(path: Path) -> list[str]:
    out, code = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            code = not code
        elif not code and (m := re.match(r"^#{1,4} (.+)$", line)):
            out.append(m.group(1).strip())
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("heading", OLD_HEADINGS)
def test_every_old_readme_section_is_found_by_its_heading(heading):
    found = [p.name for p in PAGES if heading in headings(p)]
    assert found, f"no page has the heading {heading!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO)}")
        elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for h in headings(dest)}:
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, broken


def test_the_development_map_names_every_module():
    """docs/development.md's one-screen map names each module of vae_pipeline/ and flows/."""
    text = (REPO / "docs" / "development.md").read_text()
    layout = text[text.index("## Layout") : text.index("## Tests")]
    block = layout[layout.index("```") : layout.rindex("```")]
    modules = [*(REPO / "vae_pipeline").rglob("*.py"), *(REPO / "flows").glob("*.py")]
    packages = {p.parent.name + "/" for p in modules if p.parent.name != "vae_pipeline"}
    missing = [p.name for p in modules if not p.name.startswith("__") and p.name not in block]
    missing += [pkg for pkg in packages if pkg not in block]
    assert not missing, f"docs/development.md's map does not name: {sorted(set(missing))}"
