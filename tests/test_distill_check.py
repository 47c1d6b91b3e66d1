"""`distill check RECIPE` and the same check at the start of a training step: a row that would train wrongly is
refused with exit code 2, naming the row and why, before any model is loaded."""

import json
from pathlib import Path

from pipeline.commands.cli import main

QWEN3_TEMPLATE = Path(__file__).parent / "fixtures" / "templates" / "qwen3.jinja"
PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def row(row_id, reply):
    return {"id": row_id, "messages": PROMPT + [{"role": "assistant", "content": reply}], "think_prefix": "<think>\n"}


def write_recipe(tmp_path, rows):
    (tmp_path / "sft_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "recipe.yaml").write_text(json.dumps({
        "name": "check", "seed": 0, "workdir": str(tmp_path / "work"),
        "steps": {
            "data": {"uses": "load", "path": str(tmp_path / "sft_data.jsonl"), "require": ["id", "messages"]},
            "sft": {"uses": "sft", "input": "data", "model": "builtin:tiny-random", "max_steps": 1,
                    "chat_template": str(QWEN3_TEMPLATE), "max_length": 128},
        }}))
    return str(tmp_path / "recipe.yaml")


def test_check_names_the_bad_row_before_and_at_the_start_of_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    good = [row("q1", "<think>\n2 and 3 make 5.\n</think>\n\n\\boxed{5}"),
            row("q3", "<think>\nCount on: 3, 4, 5.\n</think>\n\n\\boxed{5}")]
    recipe = write_recipe(tmp_path, good[:1] + [row("q2", "\\boxed{5}")] + good[1:])

    assert main(["check", recipe]) == 0  # nothing produced yet: listed, not checked
    assert "sft (sft): not checked, data not produced yet" in capsys.readouterr().out

    assert main(["run", recipe, "--until", "data"]) == 0
    capsys.readouterr()
    assert main(["check", recipe]) == 2
    captured = capsys.readouterr()
    assert "sft: 1 of 3 training rows of dataset 'data' would not train as intended" in captured.out
    assert "row 'q2' (messages): think stripped: it was sampled inside a think span" in captured.out
    assert "the chat-template check failed for sft" in captured.err and "Traceback" not in captured.err

    # the training step runs the same check first: exit 2, the row named, nothing of the step left behind
    assert main(["run", recipe]) == 2
    err = capsys.readouterr().err
    assert "row 'q2' (messages): think stripped" in err and "Traceback" not in err
    assert not (tmp_path / "work" / "sft").exists()

    write_recipe(tmp_path, good)
    assert main(["run", recipe, "--until", "data"]) == 0
    capsys.readouterr()
    assert main(["check", recipe]) == 0
    # whitespace collapsed: the console may wrap the line where the terminal width is not its own (pytest-xdist)
    assert "sft (sft): 2 rows of 'data' render through the chat template of 'builtin:tiny-random'" \
        in " ".join(capsys.readouterr().out.split())
