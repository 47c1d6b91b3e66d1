"""Every recipe in recipes/ loads and validates the way `distill run` loads it, without running anything."""

from pathlib import Path

import pytest

from pipeline.recipe import load_recipe
from pipeline.runner import dry_run_config, step_key

RECIPES = sorted(Path("recipes").glob("*.yaml"))


def test_the_paper_recipes_are_shipped():
    names = {path.stem for path in RECIPES}
    assert {"quickstart", "smoke", "redi-qwen2.5-math-1.5b", "eval-r1"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)  # what `distill run` does first: YAML, references, every step's Config, model refs
    assert recipe.steps
    for cfg in recipe.steps.values():
        # the --dry-run variant must validate too, and every config must hash into a step key
        type(cfg).model_validate(dry_run_config(cfg).model_dump())
        assert step_key(cfg, recipe.seed, {})


def test_eval_recipe_takes_the_model_from_an_override():
    recipe = load_recipe("recipes/eval-r1.yaml", ["models.model=builtin:smollm2-135m-instruct"])
    assert recipe.steps["report"].models == ["builtin:smollm2-135m-instruct"]
    assert recipe.steps["report"].preset == "r1" and recipe.steps["report"].max_tokens == 32768
