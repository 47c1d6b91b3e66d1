"""Malformed recipes are refused before anything runs: exit 2, the file, the key path (or line), no artifact."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.commands.cli import main
from pipeline.core.document import apply_override
from pipeline.core.recipe import load_recipe

GOOD = """\
name: t
seed: 1
workdir: WORKDIR
models:
  student: builtin:tiny-random
steps:
  problems: {uses: load, path: DATA}
  more: {uses: tests.toy_steps, input: problems, rows: 2}
"""


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?", "answer": 4}\n')
    return path


def write(tmp_path, text, data_file):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("WORKDIR", str(tmp_path / "runs")).replace("DATA", str(data_file)))
    return path


def test_good_recipe_loads_and_resolves_references(tmp_path, data_file):
    text = GOOD.replace("rows: 2", "rows: '${seed}'") + "  echo: {uses: tests.toy_steps, input: more, rows: 1}\n"
    recipe = load_recipe(write(tmp_path, text, data_file))
    assert list(recipe.steps) == ["problems", "more", "echo"]
    assert recipe.steps["more"].rows == 1  # ${seed} kept its int type
    assert recipe.dependencies("echo") == ["more"]


def test_overrides_parse_values_as_yaml(tmp_path, data_file):
    recipe = load_recipe(write(tmp_path, GOOD, data_file), ["steps.more.rows=5", "seed=7"])
    assert recipe.steps["more"].rows == 5 and recipe.seed == 7


@pytest.mark.parametrize("mutate, expected", [
    (lambda t: t.replace("seed: 1", "seed: 1\ncolour: red"), "colour: unknown key"),
    (lambda t: t.replace("rows: 2", "rows: lots"), "steps.more.rows: Input should be a valid integer"),
    (lambda t: t.replace("rows: 2", "rows: 2, bogus: 1"), "steps.more.bogus: Extra inputs are not permitted"),
    (lambda t: t.replace("uses: tests.toy_steps", "uses: toy"), "steps.more.uses: unknown step type 'toy'"),
    (lambda t: t.replace("input: problems", "input: nothing"), "steps.more.input: no step named 'nothing'"),
    (lambda t: t.replace("  problems: {uses: load", "  more0: {uses: tests.toy_steps, input: more}\n"
                         "  problems: {uses: load"), "steps.more0.input: step 'more' runs later"),
    (lambda t: t.replace("path: DATA", "path: DATA.missing"), "steps.problems.path: Value error, file not found"),
    (lambda t: t.replace("builtin:tiny-random", "builtin:gpt-17"), "models.student: "),
    (lambda t: t.replace("seed: 1", "seed: ${nowhere.at.all}"), "seed: ${nowhere.at.all} refers to a key"),
])
def test_bad_recipe_exits_2_naming_the_key_and_writes_nothing(tmp_path, data_file, capsys, mutate, expected):
    path = write(tmp_path, mutate(GOOD), data_file)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err, err
    assert "(line " in err  # every one of these keys is in the file
    assert not (tmp_path / "runs").exists()


def test_invalid_yaml_names_the_line(tmp_path, data_file, capsys):
    path = write(tmp_path, GOOD.replace("rows: 2}", "rows: 2"), data_file)  # unclosed flow mapping
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML" in err and "line 9" in err, err


@pytest.mark.parametrize("override, expected", [
    ("steps.more.rows", "expected KEY.PATH=VALUE"),
    ("steps..rows=3", "expected KEY.PATH=VALUE"),
    ("name.x=3", "name is a str, not a mapping"),
    ("steps.more.rows=[1, 2]", "steps.more.rows: Input should be a valid integer"),
])
def test_bad_override_exits_2(tmp_path, data_file, capsys, override, expected):
    path = write(tmp_path, GOOD, data_file)
    assert main(["run", str(path), "-o", override]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_unknown_builtin_model_on_a_step(tmp_path, data_file, capsys):
    text = GOOD + "  samples: {uses: sample, input: problems, model: builtin:nope, n: 2, max_tokens: 8}\n"
    assert main(["run", str(write(tmp_path, text, data_file))]) == 2
    err = capsys.readouterr().err
    assert "steps.samples.model" in err and "builtin:nope" in err, err


def test_step_model_must_come_from_an_earlier_model_step(tmp_path, data_file, capsys):
    text = GOOD + "  samples: {uses: sample, input: problems, model: 'step:more', n: 2, max_tokens: 8}\n"
    assert main(["run", str(write(tmp_path, text, data_file))]) == 2
    assert "step 'more' (tests.toy_steps) does not produce a model" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path, data_file):
    path = write(tmp_path, GOOD.replace("rows: 2", "rows: -1"), data_file)
    proc = subprocess.run([str(Path(sys.executable).with_name("distill")), "run", str(path)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    assert proc.returncode == 2 and "steps.more.rows" in proc.stderr


def test_apply_override_creates_nested_keys():
    doc = {"steps": {"sft": {}}}
    apply_override(doc, "steps.sft.lora.r=8")
    assert doc == {"steps": {"sft": {"lora": {"r": 8}}}}


def test_recipe_file_missing(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read recipe" in capsys.readouterr().err


def test_every_shipped_recipe_validates():
    recipes = sorted(Path("recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)
