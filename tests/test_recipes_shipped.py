"""Every recipe in recipes/ loads and validates the way `distill run` loads it, without running anything."""

from pathlib import Path

import pytest

from pipeline.core.keys import dry_run_config, plan
from pipeline.core.models import hub_revision, is_hub_id
from pipeline.core.recipe import load_recipe

RECIPES = sorted(Path("recipes").glob("*.yaml"))
OVERRIDES = {"eval-r1": ["models.model=builtin:smollm2-135m-instruct"]}


def test_the_paper_recipes_are_shipped():
    names = {path.stem for path in RECIPES}
    assert {"quickstart", "smoke", "redi-qwen2.5-math-1.5b", "eval-r1"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)  # what `distill run` does first: YAML, references, every step's Config, model refs
    assert recipe.steps
    for cfg in recipe.steps.values():
        # the --dry-run variant must validate too
        type(cfg).model_validate(dry_run_config(cfg).model_dump())
    # every step keys: its files are there to hash, its models identify
    for dry_run in (False, True):
        steps = plan(recipe, dry_run=dry_run)
        assert [s.name for s in steps] == list(recipe.steps) and all(len(s.key) == 16 for s in steps)


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_shipped_recipes_pin_every_hub_model(path):
    refs = {ref for cfg in load_recipe(path, OVERRIDES.get(path.stem, [])).steps.values() for ref in cfg.model_refs()}
    unpinned = sorted(ref for ref in refs if is_hub_id(ref) and hub_revision(ref)[1] is None)
    assert not unpinned, f"{path}: hub models without a revision: {unpinned}"


def test_eval_recipe_takes_the_model_from_an_override():
    recipe = load_recipe("recipes/eval-r1.yaml", ["models.model=builtin:smollm2-135m-instruct"])
    assert recipe.steps["report"].models == ["builtin:smollm2-135m-instruct"]
    assert recipe.steps["report"].preset == "r1" and recipe.steps["report"].max_tokens == 32768
