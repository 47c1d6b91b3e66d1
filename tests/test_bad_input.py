"""A corpus of malformed recipes, data files and paths: each one exits with code 2, a message naming the thing
(file, key or line, row id), no traceback, and leaves no trace (no workdir, no file written or deleted)."""

import pytest

from pipeline.commands.cli import main

GOOD_ROWS = '{"id": "a", "problem": "1 + 1?", "answer": "2"}\n{"id": "b", "problem": "2 + 2?", "answer": "4"}\n'


def recipe(steps: str, head: str = "name: bad\nworkdir: runs/bad\n") -> str:
    return head + "steps:\n" + steps


LOAD = "  problems: {uses: load, path: %s}\n"

# id: (files to write, recipe text, extra argv, what the message must say)
CASES = {
    "yaml-syntax": ({}, "name: bad\nsteps: [unclosed\n", [], "invalid YAML"),
    "not-a-mapping": ({}, "- just\n- a list\n", [], "must be a YAML mapping"),
    "unknown-top-level-key": ({"p.jsonl": GOOD_ROWS}, "nmae: typo\n" + recipe(LOAD % "p.jsonl"), [],
                              "nmae: unknown key"),
    "bad-name": ({"p.jsonl": GOOD_ROWS}, recipe(LOAD % "p.jsonl", "name: 'has space'\n"), [], "name: required"),
    "seed-not-int": ({"p.jsonl": GOOD_ROWS}, recipe(LOAD % "p.jsonl", "name: bad\nseed: one\n"), [], "seed: must be"),
    "unknown-step-type": ({}, recipe("  a: {uses: nosuchstep}\n"), [], "unknown step type 'nosuchstep'"),
    "missing-uses": ({}, recipe("  a: {input: b}\n"), [], "missing `uses`"),
    "unknown-step-key": ({"p.jsonl": GOOD_ROWS}, recipe("  problems: {uses: load, path: p.jsonl, limt: 3}\n"), [],
                         "steps.problems.limt"),
    "input-runs-later": ({"p.jsonl": GOOD_ROWS},
                         recipe("  graded: {uses: verify, input: problems}\n" + LOAD % "p.jsonl"), [], "runs later"),
    "input-missing": ({}, recipe("  graded: {uses: verify, input: nowhere}\n"), [], "no step named 'nowhere'"),
    "dangling-reference": ({"p.jsonl": GOOD_ROWS}, recipe("  problems: {uses: load, path: '${files.x}'}\n"), [],
                           "${files.x} refers to a key that does not exist"),
    "data-file-missing": ({}, recipe(LOAD % "nothere.jsonl"), [], "file not found: nothere.jsonl"),
    "unknown-builtin-model": ({"p.jsonl": GOOD_ROWS},
                              recipe(LOAD % "p.jsonl" + "  s: {uses: sample, input: problems, model: builtin:nope}\n"),
                              [], "unknown builtin model"),
    "model-dir-without-config": ({"p.jsonl": GOOD_ROWS, "mymodel/weights.bin": "x"},
                                 recipe(LOAD % "p.jsonl" + "  s: {uses: sample, input: problems, model: ./mymodel}\n"),
                                 [], "holds no config.json"),
    "step-model-not-a-model": ({"p.jsonl": GOOD_ROWS},
                               recipe(LOAD % "p.jsonl" + "  t: {uses: sft, input: problems, model: 'step:problems'}\n"),
                               [], "does not produce a model"),
    "unknown-benchmark": ({}, recipe("  e: {uses: evaluate, models: [builtin:tiny-random], benchmarks: [aime99]}\n"),
                          [], "unknown benchmark 'aime99'"),
    "bad-override": ({"p.jsonl": GOOD_ROWS}, recipe(LOAD % "p.jsonl"), ["-o", "steps.problems.limit"],
                     "expected KEY.PATH=VALUE"),
    "override-wrong-type": ({"p.jsonl": GOOD_ROWS}, recipe(LOAD % "p.jsonl"), ["-o", "steps.problems.limit=many"],
                            "steps.problems.limit"),
    "unknown-until": ({"p.jsonl": GOOD_ROWS}, recipe(LOAD % "p.jsonl"), ["--until", "later"],
                      "no step named 'later'"),
    "jsonl-broken-line": ({"p.jsonl": GOOD_ROWS + '{"id": "c", "problem": \n'}, recipe(LOAD % "p.jsonl"), [],
                          "p.jsonl: line 3"),
    "jsonl-not-utf8": ({"p.jsonl": GOOD_ROWS.encode() + b'{"id": "c", "problem": "caf\xe9", "answer": "1"}\n'},
                       recipe(LOAD % "p.jsonl"), [], "p.jsonl: line 3"),
    "jsonl-line-not-an-object": ({"p.jsonl": GOOD_ROWS + "[1, 2]\n"}, recipe(LOAD % "p.jsonl"), [],
                                 "p.jsonl: line 3"),
    "empty-data-file": ({"p.jsonl": ""}, recipe(LOAD % "p.jsonl"), [], "p.jsonl"),
    "missing-answer-column": ({"p.jsonl": '{"id": "a", "problem": "1 + 1?"}\n'}, recipe(LOAD % "p.jsonl"), [],
                              "missing column(s) ['answer']"),
    "duplicate-id": ({"p.jsonl": GOOD_ROWS + '{"id": "a", "problem": "3 + 3?", "answer": "6"}\n'},
                     recipe(LOAD % "p.jsonl"), [], "duplicate id 'a'"),
    "empty-problem": ({"p.jsonl": '{"id": "a", "problem": " ", "answer": "2"}\n'}, recipe(LOAD % "p.jsonl"), [],
                      "(id 'a'): empty 'problem'"),
    "unsupported-file-type": ({"p.csv": "id,problem,answer\n"}, recipe(LOAD % "p.csv"), [],
                              "unsupported file type '.csv'"),
    "corrupt-parquet": ({"p.parquet": b"PAR1 this is not parquet"}, recipe(LOAD % "p.parquet"), [], "p.parquet"),
    "workdir-is-a-file": ({"p.jsonl": GOOD_ROWS, "taken": "a file"},
                          recipe(LOAD % "p.jsonl", "name: bad\nworkdir: taken\n"), [], "taken is a file"),
    "workdir-cannot-be-created": ({"p.jsonl": GOOD_ROWS, "afile": "x"},
                                  recipe(LOAD % "p.jsonl", "name: bad\nworkdir: afile/runs\n"), [],
                                  "workdir afile/runs: cannot create it"),
    "workdir-not-made-by-distill": ({"p.jsonl": GOOD_ROWS, "mine/notes.txt": "keep"},
                                    recipe(LOAD % "p.jsonl", "name: bad\nworkdir: mine\n"), [], "did not create"),
    "recipe-file-missing": ({}, None, [], "cannot read recipe"),
}


def snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_exits_2_names_the_thing_and_leaves_no_trace(case, tmp_path, monkeypatch, capsys):
    files, text, extra, expected = CASES[case]
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if text is not None:
        (tmp_path / "recipe.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main(["run", "recipe.yaml", *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before


def test_the_corpus_covers_at_least_twenty_kinds():
    assert len(CASES) >= 20


def test_eval_refuses_an_out_dir_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    assert main(["eval", "builtin:tiny-random", "--benchmarks", "arith_test:1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is a non-empty directory that no `distill` command made" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before
