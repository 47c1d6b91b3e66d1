"""The privileged-teacher check opsd runs before training (pipeline/training/privileged_teacher.py), on builtin:tiny-random."""

import json

import pytest
from datasets import Dataset

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.models import resolve_model
from pipeline.steps import opsd
from pipeline.training import privileged_teacher
from pipeline.training.token_logprobs import load_scoring_model, score_traces


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoTokenizer

    path = resolve_model("builtin:tiny-random", {})
    return load_scoring_model(path, who="test", dtype="float32"), AutoTokenizer.from_pretrained(path)


def prompt(i):
    return [{"role": "user", "content": f"What is {i} + {i}?"}]


def test_sampling_is_seeded_and_cut_at_the_end_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    settings = dict(samples=3, max_tokens=6, temperature=1.0, top_p=1.0, top_k=0, batch_size=2)
    prompts = [prompt(i) for i in range(3)]
    first = privileged_teacher.sample(model, tokenizer, prompts, seed=5, **settings)
    assert [c.completion_ids for c in first] == [c.completion_ids for c in
                                                 privileged_teacher.sample(model, tokenizer, prompts, seed=5,
                                                                           **settings)]
    assert [c.completion_ids for c in first] != [c.completion_ids for c in
                                                 privileged_teacher.sample(model, tokenizer, prompts, seed=6,
                                                                           **settings)]
    assert len(first) == 9
    for index, completion in enumerate(first):
        # prompt-major; the prompt as the chat template renders it, unpadded
        assert completion.prompt_ids == privileged_teacher.prompt_ids(tokenizer, prompts[index // 3])
        ends = [i for i, token in enumerate(completion.completion_ids) if token == tokenizer.eos_token_id]
        if completion.finish_reason == "stop":
            assert ends == [len(completion.completion_ids) - 1]
        else:
            assert not ends and len(completion.completion_ids) == 6


def test_pass_rates_and_nll_of_verified_traces(model_and_tokenizer, monkeypatch):
    """Completions fixed by hand (the sampler is replaced), everything else real: grading, pairing, the scores."""
    model, tokenizer = model_and_tokenizer
    students = [prompt(i) for i in range(2)]
    teachers = [[{"role": "user", "content": f"What is {i} + {i}? Hint: the answer is {2 * i}."}] for i in range(2)]
    texts = {  # per arm, problem-major, 2 samples per problem
        "student": ["\\boxed{0}", "\\boxed{7}", "\\boxed{9}", "\\boxed{2}"],
        "teacher": ["\\boxed{0}", "\\boxed{0}", "\\boxed{2}", "\\boxed{2}"],
    }

    def fake_sample(model, tokenizer, prompts, *, samples, seed, bar=None, **settings):
        arm = "student" if prompts == students else "teacher"
        completions = []
        for index, text in enumerate(texts[arm]):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            completions.append(privileged_teacher.Completion(
                privileged_teacher.prompt_ids(tokenizer, prompts[index // samples]), ids, text, "stop"))
        return completions

    monkeypatch.setattr(privileged_teacher, "sample", fake_sample)
    result = privileged_teacher.measure(model, tokenizer, students, teachers, ["0", "2"], samples=2, max_tokens=8,
                                        temperature=1.0, top_p=1.0, top_k=0, batch_size=1, seed=0,
                                        grading_workers=1)
    assert (result["pass_rate_without"], result["pass_rate_with"]) == (0.5, 1.0)
    assert result["pass_rate_gain"]["difference"] == 0.5 and result["verified_traces"] == 2

    def nll(messages, text):
        prompt_ids = privileged_teacher.prompt_ids(tokenizer, messages)
        ids = prompt_ids + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        summed, tokens = score_traces(model, tokenizer, [(0, ids, len(prompt_ids))])[0]
        return summed / tokens

    # the student's correct samples: problem 0's first and problem 1's second
    without = [nll(students[0], "\\boxed{0}"), nll(students[1], "\\boxed{2}")]
    with_context = [nll(teachers[0], "\\boxed{0}"), nll(teachers[1], "\\boxed{2}")]
    assert result["nll_without"] == pytest.approx(sum(without) / 2, abs=1e-4)
    assert result["nll_with"] == pytest.approx(sum(with_context) / 2, abs=1e-4)
    assert result["teacher_better"] == (result["nll_with"] < result["nll_without"])


def test_verdict_names_what_makes_the_teacher_no_better():
    base = {"pass_rate_without": 0.2, "pass_rate_with": 0.5, "verified_traces": 3, "nll_without": 1.0,
            "nll_with": 0.8}
    better = privileged_teacher.verdict(base)
    assert better == {"teacher_better": True, "why": "pass rate 50.0% with the context vs 20.0% without; NLL per "
                      "token of the student's 3 verified traces 0.800 with the context vs 1.000 without"}
    # the quickstart's case: the hint helps sampling, yet makes the student's correct reasoning less likely
    worse_nll = privileged_teacher.verdict({**base, "nll_with": 1.1})
    assert worse_nll["teacher_better"] is False and worse_nll["why"].endswith("1.100 with the context vs 1.000 "
                                                                              "without (not lower)")
    worse_rate = privileged_teacher.verdict({**base, "pass_rate_with": 0.2})
    assert worse_rate["teacher_better"] is False and "20.0% without (not higher)" in worse_rate["why"]
    no_traces = privileged_teacher.verdict({"pass_rate_without": 0.0, "pass_rate_with": 0.25, "verified_traces": 0})
    assert no_traces["teacher_better"] is True and no_traces["why"].endswith("no verified trace of the student to "
                                                                             "score")


def problems_artifact(tmp_path, rows):
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "problems" / "data"))
    return {"problems": Artifact("problems", "dataset", tmp_path / "problems")}


def test_opsd_records_the_check_warns_and_does_not_sample_again(tmp_path, monkeypatch, capsys):
    inputs = problems_artifact(tmp_path, [{"id": f"p{i}", "problem": f"What is {i} + 3?", "answer": str(i + 3)}
                                          for i in range(6)])
    cfg = opsd.Config(uses="opsd", input="problems", model="builtin:tiny-random", lora={"r": 8}, batch_size=4,
                      max_length=192, max_tokens=8, max_steps=1, context_template="{problem} = {answer}",
                      teacher_check_problems=4, teacher_check_samples=2)
    out = Output(name="opsd", kind="model", dir=tmp_path / "opsd", scratch=tmp_path / "scratch", seed=0)
    check = opsd.run(cfg, inputs, out).stats["teacher_check"]
    assert check["problems"] == 4 and check["samples_per_problem"] == 2
    assert 0 <= check["pass_rate_without"] <= 1 and 0 <= check["pass_rate_with"] <= 1
    json.dumps(check)
    # A random model gets nothing right with the hint or without: no better, and the user is told so.
    assert check["teacher_better"] is False and check["pass_rate_with"] == 0.0
    shown = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert f"warning: opsd: the privileged teacher is no better than the student on 4 problems: {check['why']}" in shown

    def must_not_run(*args, **kwargs):
        raise AssertionError("the saved check is measured again")

    monkeypatch.setattr(privileged_teacher, "measure", must_not_run)
    assert opsd.teacher_check(cfg, inputs, out, resolve_model(cfg.model, inputs)) == check


def test_opsd_data_without_answers_skips_the_check(tmp_path):
    inputs = problems_artifact(tmp_path, [{"prompt": "What is 1 + 1?", "privileged_context": "2"}])
    cfg = opsd.Config(uses="opsd", input="problems", model="builtin:tiny-random", max_length=192, max_tokens=8)
    out = Output(name="opsd", kind="model", dir=tmp_path / "opsd", scratch=tmp_path / "scratch", seed=0)
    check = opsd.teacher_check(cfg, inputs, out, resolve_model(cfg.model, inputs))
    assert check == {"skipped": "dataset 'problems' has no answer column to grade samples against"}
