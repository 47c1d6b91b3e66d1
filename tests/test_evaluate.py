"""The evaluate step / `distill eval` core: config and presets, think-prefix detection from chat templates,
scoring and files with a stand-in generator, resume, and rescore == run."""

import json
import re
from pathlib import Path

import datasets
import pydantic
import pytest

import pipeline.engines.vllm_local
from eval.results import rescore, save_samples
from eval.run import SHARD_DIR
from pipeline.core.artifacts import Artifact, Output
from pipeline.engines.request import Completion, Generations
from pipeline.steps import evaluate
from pipeline.text import chat


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
    with pytest.raises(pydantic.ValidationError, match="preset"):
        make_config(models=["step:sft"], benchmarks=["aime24"], preset="fast")


def test_presets_fill_only_what_is_not_set():
    from eval.benchmarks import BENCHMARKS

    r1 = make_config(models=["m/x"], benchmarks=["aime24"])
    assert (r1.preset, r1.temperature, r1.top_p, r1.max_tokens) == ("r1", 0.6, 0.95, 32768)
    assert {name: r1.samples_per_problem(BENCHMARKS[name]) for name in ("aime24", "math500", "amc23", "gsm8k")} \
        == {"aime24": 64, "math500": 4, "amc23": 16, "gsm8k": 1}
    quick = make_config(models=["m/x"], benchmarks=["aime24"], preset="quick", temperature=0.0)
    assert (quick.temperature, quick.max_tokens) == (0.0, 512)
    assert quick.samples_per_problem(BENCHMARKS["aime24"]) == 4 and quick.samples_per_problem(BENCHMARKS["gsm8k"]) == 1
    assert make_config(models=["m/x"], benchmarks=["aime24"], preset="quick", n=8).samples_per_problem(
        BENCHMARKS["aime24"]) == 8
    # a dumped config validates back to itself (the runner hashes model_dump)
    assert evaluate.Config(**quick.model_dump()) == quick
    assert make_config(models=["m/x"], benchmarks=["aime24"], prompt_template="open-r1").template_text \
        .endswith("Think step by step before answering.\n\n{problem}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-random"))


def test_think_prefix_from_the_chat_template(tokenizer):
    smollm_template = tokenizer.chat_template
    assert chat.think_prefix(tokenizer) == chat.ThinkPrefix("", "")
    # R1-distill style: strips "...</think>" from earlier assistant turns; the reply is expected to open <think>
    tokenizer.chat_template = ("{% for m in messages %}{% set c = m['content'] %}{% if '</think>' in c %}"
                               "{% set c = c.split('</think>')[-1] %}{% endif %}<|{{ m['role'] }}|>{{ c }}"
                               "{% endfor %}{% if add_generation_prompt %}<|Assistant|>{% endif %}")
    assert chat.think_prefix(tokenizer) == chat.ThinkPrefix("<think>\n", "<think>\n")
    assert chat.think_prefix(tokenizer, "") == chat.ThinkPrefix("", "")  # a setting wins
    # newer templates open thinking in the generation prompt themselves: nothing to add, but grading must know
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")
    assert chat.think_prefix(tokenizer) == chat.ThinkPrefix("", "<think>\n")
    tokenizer.chat_template = smollm_template


def arithmetic_answers(model, messages, n, think_prefix):
    """Model dir `good` answers every arithmetic problem right; `half` only in its first sample; AIME all wrong."""
    match = re.match(r"What is (\d+ [-+*] \d+)\?", messages[0]["content"])
    value = eval(match.group(1)) if match else 0  # noqa: S307 - our own arithmetic prompts
    right = f"\\boxed{{{value}}}"
    if think_prefix:
        right = f"{value}, I think.</think>The answer is {right}."
    good = Path(model).parent.name == "good"
    texts = [right if (good or i == 0) and match else f"\\boxed{{{i % 2}}}" for i in range(n)]
    return [Completion(text, "stop" if i < 3 else "length", 10, 5 + i) for i, text in enumerate(texts)]


def fake_generate(calls, answers=arithmetic_answers, fail_after_chunks=None):
    """A stand-in for pipeline.engines.vllm_local.generate with its chunk contract; records each call and the chunks it
    generated, and raises (as a killed run would stop) once `fail_after_chunks` chunks were handed over."""

    def generate(request, *, on_chunk=None, **_):
        model, prompts, n, think_prefix, chunks = (request.model, request.prompts, request.n, request.think_prefix,
                                                   request.chunks)
        todo = [c for c in range(len(chunks)) if c not in set(request.skip_chunks)]
        call = {"model": model, "prompts": prompts, "n": n, "ids": request.ids, "seed": request.seed,
                "think_prefix": think_prefix, "chunks": chunks, "generated": []}
        calls.append(call)
        out = [[] for _ in prompts]
        for chunk in todo:
            if fail_after_chunks is not None and len(call["generated"]) == fail_after_chunks:
                raise RuntimeError("the vLLM process died")
            rows = chunks[chunk]
            for p in rows:
                out[p] = answers(model, prompts[p], n[p], think_prefix)
            call["generated"].append(chunk)
            on_chunk(chunk, out[rows.start:rows.stop], 2.0)
        return Generations(out, load_seconds=1.0 if todo else 0.0, generate_seconds=2.0 * len(todo))

    return generate


@pytest.fixture
def fake_models(monkeypatch):
    """Stand-in generator, and model descriptions that need no tokenizer on disk."""
    calls = []
    monkeypatch.setattr(pipeline.engines.vllm_local, "generate", fake_generate(calls))

    def describe(model, think_prefix):
        prefix = think_prefix or ""
        return {"path": model, "weights_sha256": None, "chat_template_sha256": "0" * 64, "think_prefix": prefix,
                "completion_prefix": prefix}

    monkeypatch.setattr("eval.run.describe_model", describe)
    return calls


def run_evaluate(tmp_path, cfg):
    inputs = {name: Artifact(name, "model", tmp_path / name) for name in ("good", "half")}
    out = Output(name="report", kind="report", dir=tmp_path / "report", scratch=tmp_path / "scratch", seed=7)
    artifact = evaluate.run(cfg, inputs, out)
    return artifact, json.loads((tmp_path / "report" / "results.json").read_text())


def test_scores_files_and_resume(tmp_path, fake_models):
    calls = fake_models
    cfg = make_config(models=["step:half", "step:good"], benchmarks=["arith_test:3", "aime24:2"], n=4,
                      think_prefix="<think>\n")
    artifact, results = run_evaluate(tmp_path, cfg)

    assert list(results["models"]) == ["step:half", "step:good"]
    half, good = results["models"]["step:half"], results["models"]["step:good"]
    assert list(half) == ["arith_test:3", "aime24:2"]
    assert good["arith_test:3"]["pass@1"] == 1.0 and good["arith_test:3"]["stderr"] == 0.0
    assert good["arith_test:3"]["labels"] == {"correct": 12}
    # half: sample 0 right, samples 1-3 answer 1, 0, 1 -> pass@1 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2; maj@4 "1"
    assert half["arith_test:3"]["pass@1"] == pytest.approx(0.25)
    assert half["arith_test:3"]["pass@k"] == pytest.approx({"1": 0.25, "2": 0.5, "4": 1.0})
    assert half["arith_test:3"]["maj@k"] == {"1": 1.0, "2": 1.0, "4": 0.0}
    assert half["arith_test:3"]["truncation_rate"] == 0.25
    assert half["arith_test:3"]["mean_completion_tokens"] == {"all": 6.5, "correct": 5.0, "incorrect": 7.0}
    # a box counts even when cut short: the truncated samples are incorrect, not truncated
    assert good["aime24:2"]["pass@1"] == 0.0 and good["aime24:2"]["labels"] == {"incorrect": 8}
    meta = results["meta"]
    assert meta["seed"] == 7 and meta["versions"]["math-verify"] == "0.9.0"
    assert meta["n"] == {"arith_test:3": 4, "aime24:2": 4} and meta["sampling"]["max_tokens"] == 32768
    assert meta["prompt_template_name"] == "r1" and meta["models"]["step:good"]["think_prefix"] == "<think>\n"

    # one engine per model for both benchmarks, seeded, prompts from the template, chunks cut per benchmark
    assert [Path(c["model"]).parent.name for c in calls] == ["half", "good"]
    assert all(c["seed"] == 7 and c["n"] == [4] * 5 and len(c["prompts"]) == 5 for c in calls)
    assert calls[0]["chunks"] == [range(0, 3), range(3, 5)] and calls[0]["generated"] == [0, 1]
    assert calls[0]["ids"] == ["arith-test-0000", "arith-test-0001", "arith-test-0002", *calls[0]["ids"][3:]]
    assert calls[0]["prompts"][0] == [{"role": "user", "content": "What is 16 * 19?\n\n"
                                       "Please reason step by step, and put your final answer within \\boxed{}."}]

    samples = datasets.load_from_disk(str(tmp_path / "report" / "samples"))
    assert len(samples) == 2 * (3 + 2) * 4 == artifact.stats["samples"]
    assert {"benchmark", "id", "model", "sample_idx", "completion", "extracted", "correct", "completion_tokens",
            "finish_reason", "label", "answer"} <= set(samples.column_names)
    assert samples[0]["model"] == "step:half" and samples[0]["id"] == "arith-test-0000"
    assert artifact.stats["step:good arith_test:3 pass@1"] == 1.0
    for name in ("report.md", "accuracy.png", "lengths.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0

    # a rerun (same scratch, as after a crash) reuses the generations instead of sampling again
    calls.clear()
    (tmp_path / "report" / "results.json").unlink()
    _, again = run_evaluate(tmp_path, cfg)
    assert [c["generated"] for c in calls] == [[], []] and again["models"] == results["models"]


def test_a_run_killed_mid_benchmark_resumes_losing_at_most_one_chunk(tmp_path, monkeypatch, fake_models):
    calls = fake_models
    cfg = make_config(models=["step:half", "step:good"], benchmarks=["arith_test:5", "gsm8k:3"], n=2, chunk_size=2)
    # chunks: arith_test 0-1, 2-3, 4; gsm8k 0-1, 2 -- per model
    monkeypatch.setattr(pipeline.engines.vllm_local, "generate", fake_generate(calls, fail_after_chunks=3))
    with pytest.raises(RuntimeError, match="died"):
        run_evaluate(tmp_path, cfg)
    shard_dir = tmp_path / "scratch" / SHARD_DIR
    saved = {path.name: path.stat().st_mtime_ns for path in shard_dir.glob("*.json")}
    assert len(saved) == 3 and calls[0]["generated"] == [0, 1, 2]  # died after the last arith_test chunk

    calls.clear()
    monkeypatch.setattr(pipeline.engines.vllm_local, "generate", fake_generate(calls))
    _, resumed = run_evaluate(tmp_path, cfg)
    assert [c["generated"] for c in calls] == [[3, 4], [0, 1, 2, 3, 4]]  # nothing generated twice
    assert all(shard_dir.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in saved.items())
    resumed_samples = datasets.load_from_disk(str(tmp_path / "report" / "samples"))

    calls.clear()
    _, uninterrupted = run_evaluate(tmp_path / "fresh", cfg)
    assert resumed["models"] == uninterrupted["models"]
    fresh_samples = datasets.load_from_disk(str(tmp_path / "fresh" / "report" / "samples"))
    assert resumed_samples.to_list() == fresh_samples.to_list()


def test_rescore_gives_the_run_numbers(tmp_path, fake_models):
    cfg = make_config(models=["step:half", "step:good"], benchmarks=["arith_test:4", "aime24:2"], n=2)
    _, results = run_evaluate(tmp_path, cfg)
    rescored = rescore(tmp_path / "report")
    assert rescored["models"] == results["models"]
    assert json.loads((tmp_path / "report" / "results.json").read_text())["models"] == results["models"]
    assert "rescored" in rescored["meta"]
    # what a rescore is for: the grader (here: the completions) changed, and the numbers follow
    samples = datasets.load_from_disk(str(tmp_path / "report" / "samples"))
    wrong = samples.map(lambda row: {"completion": "\\boxed{-1}"})
    save_samples(wrong, tmp_path / "report" / "samples")
    assert rescore(tmp_path / "report")["models"]["step:good"]["arith_test:4"]["pass@1"] == 0.0


def test_think_prefix_makes_unclosed_thinking_score_nothing(tmp_path, fake_models, monkeypatch):
    def answers(model, messages, n, think_prefix):
        return [Completion("the product is 304", "stop", 10, 5)] * n

    monkeypatch.setattr(pipeline.engines.vllm_local, "generate", fake_generate([], answers))
    plain = make_config(models=["step:good"], benchmarks=["arith_test:1"], n=1, think_prefix="")
    assert run_evaluate(tmp_path / "a", plain)[1]["models"]["step:good"]["arith_test:1"]["pass@1"] == 1.0
    thinking = make_config(models=["step:good"], benchmarks=["arith_test:1"], n=1, think_prefix="<think>\n")
    scores = run_evaluate(tmp_path / "b", thinking)[1]["models"]["step:good"]["arith_test:1"]
    assert scores["pass@1"] == 0.0 and scores["labels"] == {"no_answer": 1}
