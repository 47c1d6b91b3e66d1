"""The docs fit their readers and stay true: docs/steps.md is what `distill steps --markdown` prints now, the README
stays short and keeps its two commands, and every relative link and image in README.md and docs/ resolves (file and
heading)."""

import re
from pathlib import Path

import pytest

from pipeline.commands.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_step_reference_is_up_to_date(capsys):
    assert main(["steps", "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert (ROOT / "docs" / "steps.md").read_text() == printed, (
        "docs/steps.md is out of date: run `distill steps --markdown > docs/steps.md`")


def test_step_reference_lists_every_step_and_its_fields(capsys):
    from pipeline.core.step import STEP_MODULES, config_class

    assert main(["steps"]) == 0
    printed = capsys.readouterr().out
    for name in STEP_MODULES:
        assert f"\n{name}: " in f"\n{printed}"
        for field, info in config_class(name).model_fields.items():
            assert f"  {info.alias or field} (" in printed, f"{name}.{field} missing from `distill steps`"
    assert main(["steps", "lora"]) == 2  # an unknown step type is bad input, as in a recipe


def test_readme_is_short_and_keeps_its_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make quickstart" in readme and "make test " in readme  # the test command CI runs (`.ci/run`)
    for doc in DOCS:
        assert f"(docs/{doc.name}" in readme, f"README does not link docs/{doc.name}"


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    for target in LINK.findall(_outside_code_blocks(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target} names no file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: link to {target} names no heading of {linked.name}"


def _outside_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but - and _ dropped, spaces made -."""
    headings = re.findall(r"^#+ (.+)$", _outside_code_blocks(page.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
