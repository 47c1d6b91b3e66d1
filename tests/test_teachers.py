"""The teachers step: source statistics on hand-made graded rows against hand computations, the student's NLL against
a direct HF forward on builtin:tiny-random, resume of the scoring, and the ranking's choice."""

import json

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.steps import teachers
from pipeline.training.token_logprobs import load_scoring_model, score_traces

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def sample(pid, idx, correct, tokens, completion=None, extracted=None, label=None):
    answer = "5" if correct else "6"
    return {"id": pid, "prompt": [{"role": "user", "content": f"Problem {pid}?"}], "sample_idx": idx,
            "completion": completion or f"trace {pid} {idx} " + "word " * tokens + f"so \\boxed{{{answer}}}",
            "label": label or ("correct" if correct else "incorrect"), "correct": correct,
            "extracted": extracted if extracted is not None else answer, "completion_tokens": tokens}


def graded_steps(tmp_path, by_teacher: dict[str, list[dict]]) -> dict:
    inputs = {}
    for name, rows in by_teacher.items():
        Dataset.from_list(rows).save_to_disk(str(tmp_path / name / "data"))
        inputs[name] = Artifact(name, "dataset", tmp_path / name)
    return inputs


def run(tmp_path, inputs, **settings):
    cfg = teachers.Config(uses="teachers", teachers=list(inputs), **settings)
    out = Output(name="teachers", kind="dataset", dir=tmp_path / "out", scratch=tmp_path / "scratch", seed=None)
    return teachers.run(cfg, inputs, out), out


def hand_made(tmp_path):
    """Teacher a: p1 2/2 correct (10 and 30 tokens), p2 1/2 (20), p3 0/2. Teacher b: p1 1/2 (40), p2 2/2 (40, 40,
    the same text: a near duplicate), p3 0/1 graded + 1 timeout (ungraded), and p4, which a lacks (not shared)."""
    repeated = "the same reasoning every time " * 3 + "\\boxed{5}"
    return graded_steps(tmp_path, {
        "a": [sample("p1", 0, True, 10), sample("p1", 1, True, 30), sample("p2", 0, True, 20),
              sample("p2", 1, False, 50, extracted="7"), sample("p3", 0, False, 5), sample("p3", 1, False, 5)],
        "b": [sample("p1", 1, False, 8), sample("p1", 0, True, 40), sample("p2", 0, True, 40, completion=repeated),
              sample("p2", 1, True, 40, completion=repeated), sample("p3", 0, False, 9),
              sample("p3", 1, False, 9, label="timeout", extracted=""), sample("p4", 0, True, 3)],
    })


def test_statistics_equal_a_hand_computation(tmp_path):
    artifact, out = run(tmp_path, hand_made(tmp_path))
    document = json.loads((out.dir / teachers.TEACHERS_JSON).read_text())
    a, b = document["teachers"]["a"], document["teachers"]["b"]
    assert document["problems_shared"] == 3 and document["problems_not_shared"] == {"a": 0, "b": 1}

    # pass rate: mean over problems of correct / graded; b's p3 has one graded sample (the timeout leaves)
    assert a["pass_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert b["pass_rate"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert a["correct_tokens"] == {"mean": 20, "median": 20, "p90": 30, "cv": pytest.approx((200 / 3) ** 0.5 / 20)}
    assert b["correct_tokens"]["mean"] == 40 and b["correct_tokens"]["cv"] == 0
    # distinct answers per graded sample: a p1 {5}/2, p2 {5,7}/2, p3 {6}/2; b p1 {6,5}/2, p2 {5}/2, p3 {6}/1
    assert a["distinct_answer_rate"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert b["distinct_answer_rate"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert a["near_duplicate_rate"] == 0 and b["near_duplicate_rate"] == pytest.approx(1 / 3)
    # difficulty from the pooled pass rate: p1 3/4 easy, p2 3/4 easy, p3 0/3 hard
    assert a["by_difficulty"] == {"easy": {"problems": 2, "pass_rate": 0.75, "correct_tokens_mean": 20},
                                  "hard": {"problems": 1, "pass_rate": 0.0, "correct_tokens_mean": None}}
    assert a["nll_per_token"] is None  # no student

    # Same pass rate; b wins on length diversity? No: its CV is 0, a's is higher, so a ranks first.
    assert [entry["teacher"] for entry in document["ranking"]] == ["a", "b"]
    assert "length diversity (CV)" in document["ranking"][0]["why"]
    assert document["comparisons"]["b"]["pass_rate"]["difference"] == pytest.approx(0.0)
    assert artifact.stats["best_teacher"] == "a"

    merged = artifact.dataset()
    assert len(merged) == 13 and merged.column_names[-3:] == ["teacher", "trace_tokens", "student_nll_per_token"]
    assert merged.filter(lambda row: row["teacher"] == "b" and row["correct"])["trace_tokens"] == [40, 40, 40, 3]
    assert (out.dir / teachers.PLOT_PNG).stat().st_size > 5000
    report = (out.dir / teachers.REPORT_MD).read_text()
    assert "**Best: a.**" in report and "| b |" in report


def test_level_column_is_the_difficulty(tmp_path):
    rows = {"a": [dict(sample("p1", 0, True, 4), level="Level 1"), dict(sample("p2", 0, False, 4), level="Level 5")],
            "b": [dict(sample("p1", 0, False, 4), level="Level 1"), dict(sample("p2", 0, False, 4), level="Level 5")]}
    _, out = run(tmp_path, graded_steps(tmp_path, rows))
    document = json.loads((out.dir / teachers.TEACHERS_JSON).read_text())
    assert set(document["teachers"]["a"]["by_difficulty"]) == {"Level 1", "Level 5"}
    assert document["teachers"]["a"]["by_difficulty"]["Level 1"]["pass_rate"] == 1.0


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="each teacher once"):
        teachers.Config(uses="teachers", teachers=["a", "a"])
    with pytest.raises(ValidationError, match="at least 2"):
        teachers.Config(uses="teachers", teachers=["a"])
    disjoint = graded_steps(tmp_path, {"a": [sample("p1", 0, True, 3)], "b": [sample("p2", 0, True, 3)]})
    with pytest.raises(UserError, match="share no problem id"):
        run(tmp_path, disjoint)
    no_labels = graded_steps(tmp_path / "x", {"a": [{"id": "p1", "completion": "c"}], "b": [sample("p1", 0, True, 3)]})
    with pytest.raises(UserError, match="dataset of step 'a' lacks column"):
        run(tmp_path, no_labels)


def direct_nll(model, tokenizer, prompt, text) -> tuple[float, int]:
    """-sum log p of the tokens SFT trains on, from the model's own full logits: the reference."""
    from pipeline.training.template_check import completion_token_ids

    trained = completion_token_ids(tokenizer, prompt, text)
    ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": text}], tokenize=True,
                                        return_dict=False)
    assert ids[-len(trained):] == trained
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return -float(logprobs[-len(trained):].sum()), len(trained)


def test_student_nll_equals_a_direct_forward_and_resumes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.core.models import resolve_model

    texts = ["Adding 2 and 3 gives \\boxed{5}.", "Two plus three.\nThat is five: \\boxed{5}", "\\boxed{5}"]
    rows = {"a": [sample("p1", i, True, 3, completion=text) for i, text in enumerate(texts)],
            "b": [sample("p1", 0, True, 3, completion=texts[0] + " Done."), sample("p1", 1, False, 3)]}
    inputs = graded_steps(tmp_path, rows)
    # One of a's scores as an interrupted run left it: resumed, not scored again.
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / teachers.SCORES_FILE).write_text(
        json.dumps({"teacher": "a", "row": 2, "nll": 7.0, "tokens": 2}) + "\n" + '{"teacher": "a", "ro')
    artifact, _ = run(tmp_path, inputs, student="builtin:tiny-random", batch_size=2)

    path = resolve_model("builtin:tiny-random", {})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    merged = artifact.dataset()
    scored = [(row["teacher"], row["sample_idx"], row["student_nll_per_token"], row["trace_tokens"]) for row in merged]
    for teacher, idx, nll, tokens in scored:
        if teacher == "b" and idx == 1:
            assert nll is None and tokens is None  # incorrect: not scored
            continue
        if teacher == "a" and idx == 2:
            assert nll == 3.5  # the resumed score, 7.0 over 2 tokens
            continue
        text = rows[teacher][idx]["completion"]
        expected_nll, expected_tokens = direct_nll(model, tokenizer, rows[teacher][idx]["prompt"], text)
        assert tokens == expected_tokens
        assert nll == pytest.approx(expected_nll / expected_tokens, abs=1e-4)
        assert nll > 1.0  # a random model: far from 0, so the tolerance means something
    assert artifact.stats["student_nll/a"] is not None and "student NLL" in artifact.stats["why"]


def test_score_traces_pads_a_batch_without_changing_a_score():
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model
    from pipeline.training.template_check import trained_token_ids

    path = resolve_model("builtin:tiny-random", {})
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_scoring_model(path, who="test", dtype="float32")
    traces = [(("a", i), *trained_token_ids(tokenizer, PROMPT, text))
              for i, text in enumerate(["\\boxed{5}", "It is five, so the answer is \\boxed{5} for sure."])]
    together = score_traces(model, tokenizer, traces)
    alone = [score_traces(model, tokenizer, [trace])[0] for trace in traces]
    assert [tokens for _, tokens in together] == [tokens for _, tokens in alone]
    for (nll, _), (nll_alone, _) in zip(together, alone):
        assert nll == pytest.approx(nll_alone, abs=1e-4)


@pytest.mark.parametrize("choice, expected", [
    ("best_teacher", {"p1": ("a", 0), "p2": ("a", 0)}),  # a ranks first; it never solved p3
    ("b", {"p1": ("b", 0), "p2": ("b", 0), "p4": ("b", 0)}),
    # a's first where it has a correct sample, else b's: p4 only b has
    ("best_per_problem", {"p1": ("a", 0), "p2": ("a", 0), "p4": ("b", 0)}),
])
def test_select_from_a_teachers_step_picks_as_the_ranking_says(tmp_path, choice, expected):
    from pipeline.steps import select

    artifact, out = run(tmp_path, hand_made(tmp_path))
    assert artifact.stats["ranking"] == ["a", "b"]
    source = Artifact("teachers", "dataset", out.dir, stats=artifact.stats)
    selected_out = Output(name="sft_data", kind="dataset", dir=tmp_path / "sel", scratch=tmp_path / "sel_scratch",
                          seed=None)
    cfg = select.Config.model_validate({"uses": "select", "input": "teachers", "from": choice})
    selected = select.run(cfg, {"teachers": source}, selected_out)
    rows = selected.dataset()
    merged = artifact.dataset()
    by_text = {}  # b's two p2 samples share a text: the first (sample_idx 0) names it
    for row in merged:
        by_text.setdefault(row["completion"], (row["teacher"], row["sample_idx"]))
    picked = {row["id"]: by_text[row["messages"][-1]["content"]] for row in rows}
    assert picked == expected
    assert sum(selected.stats["problems_by_teacher"].values()) == len(expected)


def test_select_from_refuses_what_is_not_a_teacher(tmp_path):
    from pipeline.steps import select

    artifact, out = run(tmp_path, hand_made(tmp_path))
    source = Artifact("teachers", "dataset", out.dir, stats=artifact.stats)
    selected_out = Output(name="s", kind="dataset", dir=tmp_path / "sel", scratch=tmp_path / "scr", seed=None)
    with pytest.raises(UserError, match="'c' is not a teacher of step 'teachers' \\(teachers: a, b"):
        select.run(select.Config.model_validate({"uses": "select", "input": "teachers", "from": "c"}),
                   {"teachers": source}, selected_out)
    graded = Artifact("a", "dataset", tmp_path / "a")
    with pytest.raises(UserError, match="step 'a' is not a teachers step"):
        select.run(select.Config.model_validate({"uses": "select", "input": "a", "from": "best_teacher"}),
                   {"a": graded}, selected_out)


def test_the_report_shows_each_privileged_teachers_check(tmp_path):
    """An opsd step's check (from its manifest, as opsd records it) in the report, and a step without one refused."""
    inputs = hand_made(tmp_path)
    gain = {"difference": 0.25, "stderr": 0.1, "ci95": [0.05, 0.45], "detectable": True, "mdd": 0.28}
    change = {"difference": 0.031, "stderr": 0.01, "ci95": [0.012, 0.05], "detectable": True, "mdd": 0.03}
    check = {"problems": 16, "samples_per_problem": 4, "pass_rate_without": 0.125, "pass_rate_with": 0.375,
             "pass_rate_gain": gain, "verified_traces": 8, "nll_without": 0.5, "nll_with": 0.531,
             "nll_change": change, "teacher_better": False, "why": "the NLL per token ... not below"}
    inputs["opsd"] = Artifact("opsd", "model", tmp_path / "opsd", stats={"teacher_check": check})
    cfg = teachers.Config(uses="teachers", teachers=["a", "b"], privileged=["step:opsd"])
    assert cfg.model_refs() == ["step:opsd"]
    out = Output(name="teachers", kind="dataset", dir=tmp_path / "out", scratch=tmp_path / "scratch", seed=None)
    teachers.run(cfg, inputs, out)
    assert json.loads((out.dir / "teachers.json").read_text())["privileged"] == {"opsd": check}
    report = (out.dir / "report.md").read_text()
    assert ("| opsd | 16 | 12.5 → 37.5 | +25.0 [+5.0, +45.0] | 8 | 0.500 → 0.531 | +0.031 [+0.012, +0.050] | no: "
            "the NLL per token ... not below |") in report

    inputs["opsd"] = Artifact("opsd", "model", tmp_path / "opsd", stats={})
    with pytest.raises(UserError, match="privileged step:opsd: step 'opsd' has no teacher check"):
        teachers.run(cfg, inputs, out)
    with pytest.raises(ValidationError, match="name an opsd step as step:NAME"):
        teachers.Config(uses="teachers", teachers=["a", "b"], privileged=["opsd"])
