"""Strict recipe input (issue 24): what used to be read silently wrong, crash or hang is refused at load with exit 2,
naming the file and the key (and line): duplicate YAML keys, booleans given for numbers, names with a trailing
newline, recursive or exploding YAML aliases and `${...}` references, reserved step names, and model references
that can never resolve (`~nosuchuser/m`, a local dir written without `./`). Through `pipeline.commands.cli.main` in-process,
as `distill check` / `distill run` would run them."""

from __future__ import annotations

import contextlib
import resource
import signal

import pytest

from pipeline.commands.cli import main
from pipeline.core import strict_yaml
from pipeline.core.errors import UserError
from pipeline.core.recipe import load_recipe

TOY = "tests.toy_steps"
LIMIT_S = 10  # every refusal here takes well under a second; a hang fails the test instead of hanging it


@contextlib.contextmanager
def bounded(seconds: float = LIMIT_S, memory_mb: int = 300):
    """Fail (TimeoutError, not a hang) if the block runs longer than `seconds`, and if the process's peak memory
    grows by more than `memory_mb` in it."""
    def alarm(*_):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < memory_mb, f"peak memory grew by {grown_mb:.0f} MB"


@pytest.fixture
def write(tmp_path, monkeypatch):
    """Write a recipe (its workdir in tmp_path) and return its path; the hub cache is an empty dir of tmp_path."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def write(text: str, name: str = "r.yaml"):
        path = tmp_path / name
        path.write_text(text.replace("WORKDIR", str(tmp_path / "runs")))
        return path
    return write


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run `distill ARGV` in-process: exit 2, every `expected` in the message, no traceback."""
    with bounded():
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"
    assert "Traceback" not in err
    return err


HEAD = "name: strict\nworkdir: WORKDIR\n"
STEP = "  a: {uses: tests.toy_steps, rows: 2}\n"


# ---------------------------------------------------------------- duplicate keys


def test_two_steps_of_one_name_are_refused(write, capsys):
    path = write(HEAD + "steps:\n" + STEP + "  b: {uses: tests.toy_steps}\n  a: {uses: tests.toy_steps, rows: 5}\n")
    refused(capsys, ["check", str(path)], str(path), "duplicate key 'a' in 'steps'", "line 6", "first at line 4")


def test_two_workdirs_are_refused(write, capsys):
    path = write(HEAD + "workdir: elsewhere\nsteps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "duplicate key 'workdir'", "line 3", "first at line 2")


def test_a_key_that_yaml_reads_as_another_is_a_duplicate(write, capsys):
    # `on` and `yes` are both True in YAML 1.1: plain YAML keeps one of the two settings
    path = write(HEAD + "steps:\n  a: {uses: tests.toy_steps, rows: {on: 1, yes: 2}}\n")
    refused(capsys, ["check", str(path)], str(path), "duplicate key 'yes' (read as True)", "line 4")


def test_a_merge_key_may_still_be_overridden(write):
    path = write(HEAD + "steps:\n  a: &toy {uses: tests.toy_steps, rows: 2}\n  b: {<<: *toy, rows: 4}\n")
    steps = load_recipe(path).steps
    assert (steps["a"].rows, steps["b"].rows) == (2, 4)


def test_an_override_with_a_duplicate_key_is_refused(write, capsys):
    path = write(HEAD + "steps:\n" + STEP)
    refused(capsys, ["check", str(path), "-o", "steps.a={uses: tests.toy_steps, rows: 1, rows: 2}"],
            "override", "duplicate key 'rows'")


def test_an_override_changes_one_place_even_where_an_alias_shared_it(write):
    path = write(HEAD + "steps:\n  a: &toy {uses: tests.toy_steps, rows: 2}\n  b: *toy\n")
    steps = load_recipe(path, ["steps.b.rows=7"]).steps
    assert (steps["a"].rows, steps["b"].rows) == (2, 7)


def test_data_yaml_is_read_by_the_same_strict_loader(tmp_path):
    data = tmp_path / "settings.yaml"
    data.write_text("a: 1\nb: 2\na: 3\n")
    with pytest.raises(UserError, match=r"settings.yaml: line 3, column 1: invalid YAML: duplicate key 'a'"):
        strict_yaml.load_file(data)
    data.write_text("a: 1\nb: [2, 3]\n")
    assert strict_yaml.load_file(data) == {"a": 1, "b": [2, 3]}


# ---------------------------------------------------------------- booleans are not numbers


@pytest.mark.parametrize("setting, key", [
    ("rows: true", "steps.a.rows"),  # int
    ("rows: false", "steps.a.rows"),
    ("seed: true", "steps.a.seed"),  # int | None, on the shared StepConfig
])
def test_a_boolean_for_an_integer_is_refused(write, capsys, setting, key):
    path = write(HEAD + "steps:\n  a: {uses: tests.toy_steps, " + setting + "}\n")
    refused(capsys, ["check", str(path)], str(path), key, "is a boolean, not a number", "line 4")


def test_a_boolean_for_a_float_or_inside_nested_settings_is_refused(write, capsys):
    path = write(HEAD + "steps:\n  p: {uses: load, path: data/train/arith_train.jsonl, limit: 8}\n"
                 "  s: {uses: sample, input: p, model: builtin:tiny-random, temperature: true}\n"
                 "  t: {uses: sft, input: p, model: builtin:tiny-random, lora: {r: true, alpha: 8}}\n")
    err = refused(capsys, ["check", str(path)], "steps.s.temperature", "true is a boolean, not a number",
                  "steps.t.lora", "r: true is a boolean")
    assert "line 5" in err and "line 6" in err


def test_booleans_still_set_boolean_fields_and_overrides_still_set_numbers(write, capsys):
    path = write(HEAD + "steps:\n  a: {uses: tests.toy_steps, fail: false, rows: 2}\n")
    assert load_recipe(path, ["steps.a.rows=8", "steps.a.fail=true"]).steps["a"].model_dump(
        include={"rows", "fail"}) == {"rows": 8, "fail": True}
    refused(capsys, ["check", str(path), "-o", "steps.a.rows=true"], "steps.a.rows", "is a boolean")


# ---------------------------------------------------------------- names match whole


@pytest.mark.parametrize("text, key", [
    ('name: "strict\\n"\nworkdir: WORKDIR\nsteps:\n' + STEP, "name:"),
    (HEAD + 'steps:\n  "a\\n": {uses: tests.toy_steps}\n', "steps.'a\\n'"),
    (HEAD + "steps:\n  " + "a" * 201 + ": {uses: tests.toy_steps}\n", "at most 200 characters"),
    (HEAD + "steps:\n  1: {uses: tests.toy_steps}\n", "steps.1"),
    (HEAD + "steps:\n  a: {uses: .toy_steps}\n", "steps.a.uses"),
    (HEAD + 'steps:\n  a: {uses: "tests.toy_steps\\n"}\n', "steps.a.uses"),
    (HEAD + 'steps:\n  a: {uses: tests.toy_steps, model: "org/name\\n"}\n', "control character"),
])
def test_names_must_match_their_pattern_whole(write, capsys, tmp_path, text, key):
    path = write(text)
    refused(capsys, ["run", str(path)], str(path), key)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- aliases and references, bounded


def test_a_recursive_alias_is_refused(write, capsys):
    path = write(HEAD + "models: &x [*x]\nsteps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "line 3", "alias *x refers to the collection that contains it")
    path = write(HEAD + "models: &x {m: *x}\nsteps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "recursive structure")


def test_billion_laughs_is_refused_fast_and_small(write, capsys):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = write(HEAD + "models:\n" + "".join(f"  {line}\n" for line in lines) + "steps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "aliases expand this to more than")


def test_aliases_nesting_deeper_than_the_bound_are_refused(write, capsys):
    path = write(HEAD + "models:\n  a: &a " + "[" * 40 + "x" + "]" * 40 + "\n  b: &b " + "[" * 40 + "*a" + "]" * 40
                 + "\nsteps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "levels deep")
    path = write(HEAD + "models: " + "[" * 5000 + "]" * 5000 + "\nsteps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "levels deep")


def test_sibling_self_references_are_a_cycle_not_gigabytes(write, capsys):
    path = write(HEAD + "models:\n" + "".join(f"  {m}: ${{models}}\n" for m in "abcd") + "steps:\n" + STEP)
    err = refused(capsys, ["check", str(path)], str(path), "models.a: reference cycle",
                  "${models} is (or holds) the value", "(line 4)", "models.d")
    assert "is empty" not in err  # a failed reference is reported once, not again by what reads it


def test_a_reference_cycle_through_several_keys_is_named(write, capsys):
    path = write(HEAD + "models:\n  a: ${models.b}\n  b: ${models.c}\n  c: ${models.a}\nsteps:\n" + STEP)
    err = refused(capsys, ["check", str(path)], "${models.b} -> ${models.c} -> ${models.a} -> ${models.b}")
    for key, line in (("models.a", 4), ("models.b", 5), ("models.c", 6)):  # every link of the loop is named
        assert f"{key}: reference cycle" in err and f"(line {line})" in err
    assert "got NoneType" not in err
    path = write(HEAD + "steps:\n  a: {uses: tests.toy_steps, notes: '${steps.a.notes}'}\n")
    refused(capsys, ["check", str(path)], "steps.a.notes", "reference cycle")


def test_references_that_multiply_are_bounded(write, capsys):
    # no cycle, but each level copies the one before four times: 4^12 values
    levels = ["  l0: [x, x, x, x]"] + [f"  l{i}: ['${{models.l{i - 1}}}', '${{models.l{i - 1}}}', "
                                        f"'${{models.l{i - 1}}}', '${{models.l{i - 1}}}']" for i in range(1, 13)]
    path = write(HEAD + "models:\n" + "\n".join(levels) + "\nsteps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "references expand the recipe past")
    # the same inside strings
    levels = ["  s0: xxxxxxxxxxxxxxxx"] + [f"  s{i}: '${{models.s{i - 1}}}${{models.s{i - 1}}}${{models.s{i - 1}}}"
                                          f"${{models.s{i - 1}}}'" for i in range(1, 16)]
    path = write(HEAD + "models:\n" + "\n".join(levels) + "\nsteps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "references expand the recipe past")


def test_a_long_chain_of_references_is_refused_not_a_recursion_error(write, capsys):
    chain = "".join(f"  r{i}: ${{models.r{i + 1}}}\n" for i in range(400)) + "  r400: x\n"
    path = write(HEAD + "models:\n" + chain + "steps:\n" + STEP)
    refused(capsys, ["check", str(path)], str(path), "levels deep")


def test_references_still_resolve(write):
    path = write(HEAD + "models:\n  base: builtin:tiny-random\n"
                 "steps:\n  a: {uses: tests.toy_steps, model: '${models.base}', notes: 'n-${steps.b.uses}'}\n"
                 "  b: {uses: tests.toy_steps, model: '${steps.a.model}'}\n")
    steps = load_recipe(path).steps
    assert steps["a"].model == steps["b"].model == "builtin:tiny-random"
    assert steps["a"].notes == "n-tests.toy_steps"


# ---------------------------------------------------------------- reserved step names


@pytest.mark.parametrize("name, says", [
    ("run-report", "'run-report' is reserved"),
    ("Run-Report", "is reserved"),  # one directory on a case-insensitive file system
    ("seed-3", "distill run --seeds"),
    ("seed-3-dry-run", "distill run --seeds"),
])
def test_reserved_step_names_are_refused_at_load(write, capsys, tmp_path, name, says):
    path = write(HEAD + f"steps:\n  {name}: {{uses: tests.toy_steps}}\n")
    refused(capsys, ["run", str(path)], str(path), f"steps.{name}", says, "line 4")
    assert not (tmp_path / "runs").exists()  # refused before any step ran


def test_step_names_differing_only_in_case_are_refused(write, capsys):
    path = write(HEAD + "steps:\n  sft: {uses: tests.toy_steps}\n  SFT: {uses: tests.toy_steps}\n")
    refused(capsys, ["check", str(path)], "steps.SFT", "differs from step 'sft' only in case")


def test_names_like_reserved_ones_are_fine(write):
    path = write(HEAD + "steps:\n  report: {uses: tests.toy_steps}\n  seed-a: {uses: tests.toy_steps}\n"
                 "  seeds: {uses: tests.toy_steps}\n  run-report2: {uses: tests.toy_steps}\n")
    assert list(load_recipe(path).steps) == ["report", "seed-a", "seeds", "run-report2"]


# ---------------------------------------------------------------- model references


def test_a_model_under_a_user_that_does_not_exist_is_refused(write, capsys):
    path = write(HEAD + "steps:\n  a: {uses: tests.toy_steps, model: ~nosuchuser_distill/m}\n")
    refused(capsys, ["check", str(path)], str(path), "steps.a.model", "~nosuchuser_distill does not expand",
            "line 4")


def test_a_missing_local_model_without_dot_slash_is_refused_before_anything_runs(write, capsys, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(HEAD + "steps:\n" + STEP + "  b: {uses: tests.toy_steps, input: a, model: models/student}\n")
    refused(capsys, ["run", str(path)], str(path), "steps.b.model", str(tmp_path / "models" / "student"),
            "./models/student", "models/student@REVISION", "line 5")
    assert not (tmp_path / "runs").exists()  # step a did not run first


def test_local_and_hub_models_that_exist_still_load(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "student").mkdir(parents=True)
    (tmp_path / "models" / "student" / "config.json").write_text("{}")
    hub = tmp_path / "hub" / "models--org--cached"  # an unpinned hub id the hub cache holds
    (hub / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (hub / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("0" * 40)
    refs = {"local": "models/student", "dotted": "./models/student", "cached": "org/cached",
            "pinned": "org/pinned@0123abc", "bare": "gpt2", "builtin": "builtin:tiny-random"}
    path = write(HEAD + "steps:\n" + "".join(f"  {name}: {{uses: tests.toy_steps, model: '{ref}'}}\n"
                                             for name, ref in refs.items()))
    assert {name: cfg.model for name, cfg in load_recipe(path).steps.items()} == refs


# ---------------------------------------------------------------- the recipe file itself


def test_a_named_pipe_without_a_writer_is_read_as_empty_not_waited_on(tmp_path, capsys):
    import os

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    refused(capsys, ["check", str(fifo)], str(fifo), "must be a YAML mapping")


def test_a_recipe_that_is_not_utf8_or_too_large_is_refused(write, capsys):
    path = write(HEAD + "steps:\n" + STEP)
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")
    refused(capsys, ["check", str(path)], str(path), "not UTF-8 text (line 5")
    path.write_bytes(b"# " + b"x" * strict_yaml.MAX_BYTES + b"\n")
    refused(capsys, ["check", str(path)], str(path), "larger than")


@pytest.mark.parametrize("text, says", [
    ("name: strict\nworkdir: \"runs/a\\x00b\"\nsteps:\n" + STEP, "workdir: holds a control character"),
    ("name: strict\nworkdir: x\nseed: 2001-02-30\nsteps:\n" + STEP, "line 3, column 7: invalid YAML: cannot read "
                                                                    "'2001-02-30' as timestamp"),
    ("name: strict\nworkdir: x\nseed: " + "9" * 5000 + "\nsteps:\n" + STEP, "as int"),
])
def test_values_that_used_to_crash_later_are_refused_at_load(write, capsys, text, says):
    path = write(text)
    refused(capsys, ["run", str(path)], str(path), says)


def test_a_setting_under_a_user_that_does_not_exist_is_no_traceback(write, capsys):
    # the path heuristic (which settings name files a step reads) looks at every string setting
    path = write(HEAD + "steps:\n  a: {uses: tests.toy_steps, notes: '~nosuchuser_distill/x'}\n")
    with bounded():
        assert main(["check", str(path)]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_the_reserved_names_are_the_ones_distill_writes():
    from pipeline.commands.run_report.page import REPORT_DIR
    from pipeline.core import recipe

    assert recipe.REPORT_DIR == REPORT_DIR
    assert all(not recipe.STEP_NAME.fullmatch(name) for name in
               ("recipe.json", ".lock", ".distillery", ".fingerprints.json", ".a.tmp", ".a.scratch", "a@1"))
