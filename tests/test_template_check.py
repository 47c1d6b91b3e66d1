"""The chat-template check that runs before training, on three template families (fixtures in
tests/fixtures/templates, on SmolLM2's tokenizer): ChatML (SmolLM2's own), Qwen3-style, R1-distill style."""

import copy
from pathlib import Path

import pytest

from pipeline.core.errors import UserError
from pipeline.text import chat
from pipeline.training.template_check import TrainingRow, check_rows, check_teacher_prompts, row_problem

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
MODEL = "builtin:tiny-random"
PROMPT = [{"role": "user", "content": "What is 2 + 3? Put the answer in \\boxed{}."}]
TRACE = "<think>\nTwo plus three: count on from 2.\n</think>\n\nThe answer is \\boxed{5}."


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(MODEL))


def with_template(tokenizer, name):
    tokenizer = copy.deepcopy(tokenizer)
    if name != "chatml":
        tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    if name.startswith("r1"):  # special tokens in R1's tokenizer; as plain text they would merge with what follows
        tokenizer.add_special_tokens({"additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>"]})
    return tokenizer


def sampled_row(tokenizer, row_id="good", completion=TRACE, **fields):
    """A row as select writes it from this model's own samples: the prompt text it was sampled with recorded."""
    think = chat.think_prefix(tokenizer)
    recorded = dict(think_prefix=think.completion_prefix or "<think>\n", sampled_by=MODEL,
                    prompt_text=chat.generation_prompt(tokenizer, PROMPT) + think.appended)
    return TrainingRow(row_id, PROMPT, completion, "messages", **{**recorded, **fields})


@pytest.mark.parametrize("template", ["chatml", "qwen3", "r1_distill_train"])
def test_each_template_passes_good_rows_and_names_each_bad_one(smollm_tokenizer, template):
    tokenizer = with_template(smollm_tokenizer, template)
    think = chat.think_prefix(tokenizer)
    other_prompt = chat.generation_prompt(tokenizer, [{"role": "system", "content": "Be brief."}] + PROMPT)
    good = [sampled_row(tokenizer, f"good-{i}", TRACE.replace("5", str(5 + i))) for i in range(3)]
    assert check_rows(tokenizer, good, step="sft", dataset="sft_data", think=think, model_ref=MODEL) \
        == {"template_checked_rows": 3, "think_prefix": think.appended}

    bad = {
        "stripped": sampled_row(tokenizer, "stripped", "The answer is \\boxed{5}."),
        "empty": sampled_row(tokenizer, "empty", ""),
        "other-prompt": sampled_row(tokenizer, "other-prompt", prompt_text=other_prompt + think.appended),
    }
    reasons = {name: row_problem(tokenizer, row, think, MODEL) for name, row in bad.items()}
    assert reasons["stripped"].startswith("think stripped: it was sampled inside a think span")
    assert reasons["empty"].startswith("empty:")
    assert reasons["other-prompt"].startswith("sampled prompt:") and "Be brief." in reasons["other-prompt"]
    # sampled by another model (a teacher): its prompt text is the teacher's business, not a failure
    teacher_row = sampled_row(tokenizer, "teacher", prompt_text=other_prompt, sampled_by="org/teacher")
    assert row_problem(tokenizer, teacher_row, think, MODEL) is None

    with pytest.raises(UserError) as refused:
        check_rows(tokenizer, good + list(bad.values()), step="sft", dataset="sft_data", think=think, model_ref=MODEL)
    message = str(refused.value)
    assert message.startswith("sft: 3 of 6 training rows of dataset 'sft_data' would not train as intended")
    assert all(f"row {name!r} (messages)" in message for name in bad)
    assert "good-" not in message


def test_a_template_that_strips_the_think_span_of_every_reply_fails_every_trace(smollm_tokenizer):
    tokenizer = with_template(smollm_tokenizer, "r1_distill")
    problem = row_problem(tokenizer, sampled_row(tokenizer), chat.think_prefix(tokenizer), MODEL)
    assert problem.startswith("think stripped: the chat template drops the completion's think span")


def test_the_think_opener_a_template_writes_is_not_trained_twice(smollm_tokenizer):
    tokenizer = with_template(smollm_tokenizer, "r1_distill_train")
    think = chat.think_prefix(tokenizer)
    assert think == chat.ThinkPrefix("", "<think>\n")  # the generation prompt opens <think> itself
    # a reply without the opener: the prompt the model generates from ends with <think>, the trained one does not
    problem = row_problem(tokenizer, sampled_row(tokenizer, completion="The answer is \\boxed{5}.", think_prefix=""),
                          think, MODEL)
    assert problem.startswith("prompt:") and "opens <think> but this completion does not" in problem


def test_a_template_expecting_a_think_prefix_refuses_replies_without_it(smollm_tokenizer):
    tokenizer = with_template(smollm_tokenizer, "r1_distill_train")
    # first R1-distill release: mentions </think> (strips history), the reply is expected to open <think>
    tokenizer.chat_template = tokenizer.chat_template.replace("<｜Assistant｜><think>\\n", "<｜Assistant｜>")
    think = chat.think_prefix(tokenizer)
    assert think == chat.ThinkPrefix("<think>\n", "<think>\n")
    assert row_problem(tokenizer, sampled_row(tokenizer), think, MODEL) is None
    problem = row_problem(tokenizer, sampled_row(tokenizer, completion="The answer is \\boxed{5}.", think_prefix=""),
                          think, MODEL)
    assert problem.startswith("think prefix: the student's template expects replies to open with '<think>\\n'")


def test_a_template_without_eos_at_the_end_of_a_turn_is_refused(smollm_tokenizer):
    tokenizer = with_template(smollm_tokenizer, "r1_distill_train")
    tokenizer.chat_template = tokenizer.chat_template.replace("+ eos_token", "")
    problem = row_problem(tokenizer, sampled_row(tokenizer), chat.think_prefix(tokenizer), MODEL)
    assert problem.startswith("no end of turn:")


def test_qwen3_whitespace_normalisation_is_not_a_failure_but_an_added_empty_think_span_is(smollm_tokenizer):
    tokenizer = with_template(smollm_tokenizer, "qwen3")
    think = chat.think_prefix(tokenizer)
    squashed = "<think>Two plus three.</think>The answer is \\boxed{5}."  # rendered with Qwen3's own newlines
    assert row_problem(tokenizer, sampled_row(tokenizer, completion=squashed), think, MODEL) is None
    # a reply without reasoning: the template mentions </think>, so prompts open <think> (the model thinks, as
    # Qwen3 does by default) ...
    assert think == chat.ThinkPrefix("<think>\n", "<think>\n")
    problem = row_problem(tokenizer, sampled_row(tokenizer, completion="\\boxed{5}", think_prefix=""), think, MODEL)
    assert problem.startswith("think prefix:")
    # ... and with no think prefix the template adds an empty think span: trained tokens the data never had
    problem = row_problem(tokenizer, sampled_row(tokenizer, completion="\\boxed{5}", think_prefix=""),
                          chat.think_prefix(tokenizer, ""), MODEL)
    assert problem.startswith("mask: the trained tokens decode to")


def test_teacher_and_student_prompts_may_differ_only_by_the_privileged_context(smollm_tokenizer):
    tokenizer = copy.deepcopy(smollm_tokenizer)
    teacher = PROMPT[:-1] + [{"role": "user", "content": PROMPT[-1]["content"] + "\n\nReference: 5"}]
    assert check_teacher_prompts(tokenizer, [("q1", PROMPT, teacher)], step="opsd", dataset="d", model_ref=MODEL) \
        == {"template_checked_rows": 1}
    with_system = [{"role": "system", "content": "You are a teacher."}] + teacher
    with pytest.raises(UserError, match=r"(?s)opsd: 1 of 2 rows .*row 'q2': teacher and student prompts differ"):
        check_teacher_prompts(tokenizer, [("q1", PROMPT, teacher), ("q2", PROMPT, with_system)], step="opsd",
                              dataset="d", model_ref=MODEL)
