"""`distill run` without a terminal: one summary line per step and plain progress lines on stdout, nothing on stderr;
what the step, its libraries and its child processes wrote is in the step's log file.

This module is also a step type (`uses: tests.test_console`) that writes to its output every way a library does: print,
stderr, a Python warning, logging, and a child process writing to the file descriptors it inherited.
"""

import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

from pydantic import Field

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.console import progress
from pipeline.core.step import StepConfig

DISTILL = str(Path(sys.executable).with_name("distill"))
HIDDEN = ("printed by the step", "written to stderr", "UserWarning: warned by the step", "logged by the step",
          "written by a child process")


class Config(StepConfig):
    fail: bool = Field(default=False, description="Raise after writing.")


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    import datasets

    print("printed by the step")
    print("written to stderr", file=sys.stderr)
    warnings.warn("warned by the step", UserWarning)
    logging.getLogger("some.library").warning("logged by the step")
    subprocess.run([sys.executable, "-c", "import os; os.write(1, b'written by a child process\\n')"], check=True)
    with progress(total=3, unit="rows") as bar:
        for _ in range(3):
            bar.advance()
    if cfg.fail:
        raise RuntimeError("asked to fail")
    return out.write_dataset(datasets.Dataset.from_dict({"value": [1, 2, 3]}))


def distill(*args, cwd: Path):
    # stdout and stderr are pipes: no terminal, as in CI or under nohup
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "COLUMNS": "200"}  # rich wraps at 80 without a terminal
    return subprocess.run([DISTILL, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def write_recipe(tmp_path: Path, steps: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: console\nseed: 0\nworkdir: {tmp_path / 'runs'}\nsteps:\n{steps}")
    return recipe


def test_step_output_goes_to_its_log_and_the_console_shows_progress_and_one_line(tmp_path):
    recipe = write_recipe(tmp_path, "  first: {uses: tests.test_console}\n  second: {uses: tests.test_console}\n")
    done = distill("run", str(recipe), cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert not any(text in done.stdout for text in HIDDEN), done.stdout
    assert "\x1b" not in done.stdout and "\r" not in done.stdout  # no control characters without a terminal
    lines = done.stdout.splitlines()
    assert lines[-2:] == [f"console: 2 step(s) ran, 0 skipped → {tmp_path / 'runs'}",
                          f"run page → {tmp_path / 'runs' / 'run-report' / 'index.html'}"]
    for position, step in enumerate(("first", "second"), 1):
        own = [line for line in lines if f"[{position}/2] {step}" in line]
        # its progress as plain lines (a tenth of the count or 10 s apart), then its one summary line
        assert own[-2] == f"[{position}/2] {step}: 3/3 rows"
        assert all(line.startswith(f"[{position}/2] {step}: ") for line in own[:-1])
        assert re.fullmatch(rf"✓ \[{position}/2\] {step} \(tests.test_console\): done in [\d.]+s \(3 rows\)", own[-1])
        log = (tmp_path / "runs" / step / "log.txt").read_text()
        assert log.startswith(f"[{position}/2] {step} (tests.test_console), key ")
        assert all(text in log for text in HIDDEN), log
    assert len(lines) == len([line for line in lines if "first" in line or "second" in line]) + 2  # + the last two


def test_a_failed_step_keeps_its_log_and_says_where(tmp_path):
    recipe = write_recipe(tmp_path, "  broken: {uses: tests.test_console, fail: true}\n")
    done = distill("run", str(recipe), cwd=tmp_path)

    assert done.returncode == 1
    log = tmp_path / "runs" / ".broken.scratch" / "log.txt"
    failed = r"✗ \[1/1\] broken \(tests.test_console\): failed after [\d.]+s; its output: "
    assert re.search(failed + re.escape(str(log)), done.stdout), done.stdout
    assert all(text in log.read_text() for text in HIDDEN)
    assert "RuntimeError: asked to fail" in done.stderr  # the traceback, after the output is the terminal's again
    error = json.loads((tmp_path / "runs" / ".broken.tmp" / "error.json").read_text())
    assert error["error"].startswith("RuntimeError")
    assert not (tmp_path / "runs" / ".broken.tmp" / "log.txt").exists()  # the next attempt empties the tmp dir


def test_verbose_shows_everything_as_it_comes(tmp_path):
    recipe = write_recipe(tmp_path, "  first: {uses: tests.test_console}\n")
    done = distill("run", str(recipe), "--verbose", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert all(text in shown for text in HIDDEN), shown
    assert not (tmp_path / "runs" / "first" / "log.txt").exists()


def test_plain_progress_lines_at_each_phase_and_tenth_with_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setattr("pipeline.core.console.PLAIN_LINE_SECONDS", 3600)  # only phases and tenths make lines here
    with progress("sampling", total=40, unit="chunks") as bar:
        bar.phase("loading model")
        bar.advance(3)  # still in the first tenth: no line
        bar.advance(1)  # the second tenth: a line, with the rate since the first chunk
        bar.update(note="generating")
        bar.advance(36)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sampling: 0/40 chunks, loading model"
    assert re.fullmatch(r"sampling: 4/40 chunks, [\d.,]+ chunks/s, ETA \d+s, loading model", lines[1]), lines[1]
    assert lines[2:] == ["sampling: 40/40 chunks, generating"]


def test_plain_progress_lines_every_few_seconds(capsys, monkeypatch):
    monkeypatch.setattr("pipeline.core.console.PLAIN_LINE_SECONDS", 0)
    with progress(total=1000, unit="steps") as bar:
        for step in range(1, 4):
            bar.update(completed=step, note=f"loss {4 - step}")
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == [
        "progress: 1/1000 steps", "progress: 2/1000 steps", "progress: 3/1000 steps"]


RECIPE = """\
name: libraries
seed: 0
workdir: {workdir}
steps:
  problems: {{uses: load, path: {problems}, limit: 4}}
  samples: {{uses: sample, input: problems, model: builtin:tiny-random, n: 2, max_tokens: 8}}
  graded: {{uses: verify, input: samples}}
  conversations: {{uses: load, path: {conversations}, require: [id]}}
  sft: {{uses: sft, input: conversations, model: builtin:tiny-random, max_steps: 2, logging_steps: 1, batch_size: 2,
        max_length: 128}}
"""


def conversations(path: Path, count: int = 4) -> Path:
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"c{i}", "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"{i} + {i} = {2 * i}. The answer is \\boxed{{{2 * i}}}."}]}) + "\n")
    return path


def test_real_libraries_are_quiet_on_the_console_and_kept_in_the_logs(tmp_path):
    """vLLM (in its engine process), transformers, datasets and TRL through the real CLI, stdout a pipe (~1 minute)."""
    workdir = tmp_path / "runs"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(workdir=workdir, problems=Path.cwd() / "data" / "train" / "arith_train.jsonl",
                                    conversations=conversations(tmp_path / "conversations.jsonl")))
    done = distill("run", str(recipe), cwd=tmp_path)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr == ""
    out = done.stdout
    for noise in ("Map", "Saving the dataset", "Loading weights", "Loading safetensors", "Processed prompts", "it/s",
                  "%|", "Warning", "WARNING", "{'loss'", "\x1b", "\r"):
        assert noise not in out, (noise, out)
    steps = {"problems": "load", "samples": "sample", "graded": "verify", "conversations": "load", "sft": "sft"}
    summaries = [line for line in out.splitlines() if line.startswith("✓")]
    assert [line.split(" done in")[0] for line in summaries] == [
        f"✓ [{i}/5] {step} ({uses}):" for i, (step, uses) in enumerate(steps.items(), 1)]
    # the engine's start-up is a phase of its own, then samples count as they finish; training counts steps and
    # shows the loss
    assert "[2/5] samples: 0/8 samples, loading model" in out
    assert "[2/5] samples: 0/8 samples, generating" in out
    assert "[2/5] samples: 8/8 samples, generating" in out
    assert re.search(r"\[5/5\] sft training: 2/2 steps, loss [\d.]+", out), out

    logs = {step: (workdir / step / "log.txt").read_text() for step in steps}
    assert all(logs[step].startswith(f"[{i}/5] {step} ({steps[step]}), key ") for i, step in enumerate(steps, 1))
    assert "Loading safetensors checkpoint shards" in logs["samples"]  # written by the vLLM engine's process
    assert "verify: labels" in logs["graded"]
    assert logs["sft"].count("{'loss'") == 2  # TRL's logs, a line per logging step


def test_the_engine_process_reports_its_phases_and_each_finished_sample():
    from pipeline.core.models import resolve_model
    from pipeline.engines.request import SamplingRequest
    from pipeline.engines.vllm_local import generate

    events = []
    prompts = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(3)]
    request = SamplingRequest(resolve_model("builtin:tiny-random"), prompts, n=2, temperature=1.0, max_tokens=4, seed=0,
                              chunks=[range(0, 2), range(2, 3)])
    generations = generate(request, on_phase=lambda text: events.append(text),
                           on_samples=lambda finished: events.append(finished),
                           on_chunk=lambda chunk, completions, seconds: events.append(f"chunk {chunk}"))
    assert sum(len(per_prompt) for per_prompt in generations) == 6
    phases = events[:2]
    chunk_0, chunk_1 = events[2:events.index("chunk 0") + 1], events[events.index("chunk 0") + 1:]
    assert phases == ["loading model", "generating"]
    # samples finished so far in the chunk being generated, counted from 0 again in the next chunk
    assert chunk_0[-1] == "chunk 0" and chunk_0[:-1] == sorted(chunk_0[:-1]) and chunk_0[-2] == 4
    assert chunk_1[-1] == "chunk 1" and chunk_1[:-1] == sorted(chunk_1[:-1]) and chunk_1[-2] == 2
