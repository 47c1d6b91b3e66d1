"""The evaluate step: config checks, scoring and files with a stand-in generator, and one real vLLM run."""

import json
import re
from pathlib import Path

import datasets
import pydantic
import pytest

import pipeline.generation
from pipeline.artifacts import Artifact, Output
from pipeline.generation import Completion, Generations
from pipeline.steps import evaluate


def make_config(**settings):
    return evaluate.Config(uses="evaluate", **settings)


def test_config_checks():
    cfg = make_config(models=["step:sft", "builtin:tiny-random"], benchmarks=["arith_test:3", "math500"])
    assert cfg.model_refs() == ["step:sft", "builtin:tiny-random"]
    with pytest.raises(pydantic.ValidationError, match="known benchmarks"):
        make_config(models=["step:sft"], benchmarks=["aime2024"])
    with pytest.raises(pydantic.ValidationError, match="more than once"):
        make_config(models=["step:sft", "step:sft"], benchmarks=["aime24"])
    with pytest.raises(pydantic.ValidationError, match="problem"):
        make_config(models=["step:sft"], benchmarks=["aime24"], prompt_template="Solve it.")


def fake_generate(calls):
    """Model dir `good` answers every arithmetic problem right; `half` only in its first sample; AIME all wrong."""

    def generate(model, prompts, *, n, temperature, top_p, max_tokens, seed, think_prefix, **_):
        calls.append({"model": model, "prompts": prompts, "n": n, "seed": seed, "think_prefix": think_prefix})
        out = []
        for messages in prompts:
            match = re.match(r"What is (\d+ [-+*] \d+)\?", messages[0]["content"])
            value = eval(match.group(1)) if match else 0  # noqa: S307 - our own arithmetic prompts
            right = f"\\boxed{{{value}}}"
            if think_prefix:
                right = f"{value}, I think.</think>The answer is {right}."
            good = Path(model).parent.name == "good"
            texts = [right if (good or i == 0) and match else "\\boxed{-1}" for i in range(n)]
            out.append([Completion(text, "stop", 10, 5) for text in texts])
        return Generations(out, load_seconds=1.0, generate_seconds=2.0)

    return generate


def run_evaluate(tmp_path, cfg):
    inputs = {name: Artifact(name, "model", tmp_path / name) for name in ("good", "half")}
    out = Output(name="report", kind="report", dir=tmp_path / "report", scratch=tmp_path / "scratch", seed=7)
    artifact = evaluate.run(cfg, inputs, out)
    return artifact, json.loads((tmp_path / "report" / "results.json").read_text())


def test_scores_files_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline.generation, "generate", fake_generate(calls))
    cfg = make_config(models=["step:half", "step:good"], benchmarks=["arith_test:3", "aime24:2"], n=2,
                      think_prefix="<think>\n")
    artifact, results = run_evaluate(tmp_path, cfg)

    assert list(results["models"]) == ["step:half", "step:good"]
    half, good = results["models"]["step:half"], results["models"]["step:good"]
    assert list(half) == ["arith_test:3", "aime24:2"]
    assert good["arith_test:3"] == {"pass@1": 1.0, "stderr": 0.0, "n": 2, "problems": 3, "labels": {"correct": 6}}
    assert half["arith_test:3"]["pass@1"] == pytest.approx(0.5)
    assert good["aime24:2"]["pass@1"] == 0.0 and good["aime24:2"]["labels"] == {"incorrect": 4}
    assert results["meta"]["seed"] == 7 and results["meta"]["versions"]["math-verify"] == "0.9.0"

    # one engine per model (both benchmarks share n), seeded, prompts from the template
    assert [Path(c["model"]).parent.name for c in calls] == ["half", "good"]
    assert all(c["seed"] == 7 and c["n"] == 2 and len(c["prompts"]) == 5 for c in calls)
    assert calls[0]["prompts"][0] == [{"role": "user", "content": "What is 16 * 19?\n\n"
                                       "Please reason step by step, and put your final answer within \\boxed{}."}]

    samples = datasets.load_from_disk(str(tmp_path / "report" / "samples"))
    assert len(samples) == 2 * (3 + 2) * 2 == artifact.stats["samples"]
    assert {"benchmark", "id", "model", "sample_idx", "completion", "extracted", "correct", "completion_tokens",
            "finish_reason", "label"} <= set(samples.column_names)
    assert samples[0]["model"] == "step:half" and samples[0]["id"] == "arith-test-0000"
    assert artifact.stats["step:good arith_test:3 pass@1"] == 1.0

    # a rerun (same scratch, as after a crash) reuses the generations instead of sampling again
    calls.clear()
    (tmp_path / "report" / "results.json").unlink()
    _, again = run_evaluate(tmp_path, cfg)
    assert calls == [] and again["models"] == results["models"]


def test_think_prefix_makes_unclosed_thinking_score_nothing(tmp_path, monkeypatch):
    def generate(model, prompts, *, n, **_):
        return Generations([[Completion("the product is 304", "stop", 10, 5)] * n for _ in prompts])

    monkeypatch.setattr(pipeline.generation, "generate", generate)
    plain = make_config(models=["step:good"], benchmarks=["arith_test:1"], n=1)
    assert run_evaluate(tmp_path / "a", plain)[1]["models"]["step:good"]["arith_test:1"]["pass@1"] == 1.0
    thinking = make_config(models=["step:good"], benchmarks=["arith_test:1"], n=1, think_prefix="<think>\n")
    scores = run_evaluate(tmp_path / "b", thinking)[1]["models"]["step:good"]["arith_test:1"]
    assert scores["pass@1"] == 0.0 and scores["labels"] == {"no_answer": 1}


def test_real_vllm_run_on_tiny_model(tmp_path):
    cfg = make_config(models=["builtin:tiny-random"], benchmarks=["arith_test:2"], n=2, max_tokens=8)
    out = Output(name="report", kind="report", dir=tmp_path / "report", scratch=tmp_path / "scratch", seed=0)
    evaluate.run(cfg, {}, out)
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    scores = results["models"]["builtin:tiny-random"]["arith_test:2"]
    assert (scores["n"], scores["problems"], sum(scores["labels"].values())) == (2, 2, 4)
    samples = datasets.load_from_disk(str(tmp_path / "report" / "samples"))
    assert all(0 < t <= 8 for t in samples["completion_tokens"])
