"""The README and docs/ stand alone: every link and every repository path they name exists, and none points
outside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# paths into the repository as the pages write them: launch/train.py, configs/base.yaml, benchmarks/soak.py, ...
REPO_PATH = re.compile(r"\b((?:launch|configs|ds_configs|benchmarks|slurm|tests|examples|more_scale|docs)/[\w./-]+\.\w+)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_links_and_paths_exist(page):
    text = page.read_text()
    assert "../shared" not in text and "shared/data" not in text, f"{page.name} points outside the repository"
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    for path in REPO_PATH.findall(text):
        path = path.rstrip(".")
        if any(c in path for c in "*{}"):
            continue  # a pattern, not a file
        assert (ROOT / path).exists() or (ROOT / "more_scale" / path).exists(), f"{page.name} names {path}, which does not exist"


def test_readme_is_short_and_indexes_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 120
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README does not list docs/{page.name}"


def test_fidelity_recipe_table_is_read_from_the_configs():
    """docs/FIDELITY.md's recipe table is what tests/fidelity_table.py writes from today's configs; reference.yaml
    sets every value of the reference except the rows that say why it cannot; base.yaml's differences each have
    their reason, and no reason stands beside a value that does not differ."""
    import fidelity_table

    text = fidelity_table.PAGE.read_text()
    assert fidelity_table.page_with_table(text) == text, "docs/FIDELITY.md's recipe table is stale: run make fidelity"
    reference, base = fidelity_table.configs()
    for row in fidelity_table.ROWS:
        ours, default = fidelity_table.read(reference, row.key), fidelity_table.read(base, row.key)
        if row.deviation:
            assert ours != row.reference, f"{row.key}: reference.yaml now sets the reference's value; drop the deviation"
        else:
            assert ours == row.reference, f"{row.key}: reference.yaml sets {ours!r}, the reference {row.reference!r} " \
                                          f"({row.source})"
        assert bool(row.base_why) == (default != ours), f"{row.key}: base.yaml {default!r} vs {ours!r}, reason " \
                                                        f"{row.base_why!r}"
