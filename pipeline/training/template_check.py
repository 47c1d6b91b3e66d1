"""Before any training: every row rendered through the student's chat template, as the trainer will tokenize it.

Hours of training are lost, silently, when a chat template does not render a training row the way its author
assumed. Known failures in the field: templates that strip `<think>...</think>` from assistant turns (R1-distill
templates do it to every turn; Qwen3's to turns before the last question), completion masks that cover nothing or
everything, a reply's think opener written by the generation prompt and again by the data, and prompts rendered one
way when sampling and another when training. `check_rows` tokenizes each row as TRL's SFT and DPO trainers do (the
prompt with the generation prompt; prompt + completion without; the completion is what follows their common prefix,
see `trl.trainer.utils`' `common_prefix_length`) and refuses, naming the row, a row where:

    empty           the completion is empty, or its mask covers no token
    think stripped  the row was sampled inside a think span (its `think_prefix` opens one) but holds none, or the
                    template drops the think span the completion has
    prompt          the prompt alone renders differently from the prompt before the reply, so the model would be
                    trained on a context it never sees when it generates
    think prefix    the student's template expects replies to open with a think prefix (`pipeline.text.chat`) that this
                    completion lacks: every prompt at sampling and evaluation ends with text training never shows
    no end of turn  the masked tokens hold no eos, so the model never learns to stop
    mask            the masked tokens do not decode to the completion plus its end-of-turn token (whitespace aside:
                    Qwen3-style templates normalise the newlines around </think>)
    sampled prompt  the row was sampled by the model being trained (`sampled_by` names it) and its recorded prompt
                    text differs from the prompt it is trained on: another system prompt, template or think prefix

and, for `opsd`, a row whose teacher prompt differs from the student's anywhere but in the user turn that carries
the privileged context (`check_teacher_prompts`). `distill check RECIPE` runs the same checks without training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pipeline.core.errors import UserError
from pipeline.text.chat import ThinkPrefix, generation_prompt

SHOWN_FAILURES = 3  # rows named in the error; the count covers them all


@dataclass(frozen=True)
class TrainingRow:
    """One trained completion: a row's prompt and one of its assistant replies, with how it was sampled."""

    row_id: str
    prompt: list[dict]
    completion: str  # the assistant message's content
    column: str  # where it came from: messages, chosen, rejected
    think_prefix: str | None = None  # what the completion continued when sampled (a sample step records it)
    prompt_text: str | None = None  # the prompt as the sampling model read it
    sampled_by: str | None = None  # the model reference that sampled it


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _first_difference(a: str, b: str) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {at}: {a[max(0, at - 30):at + 40]!r} vs {b[max(0, at - 30):at + 40]!r}"


def _ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def trained_token_ids(tokenizer, prompt: list[dict], completion: str) -> tuple[list[int], int]:
    """The tokens of prompt + reply as TRL's SFT and DPO trainers tokenize a conversational prompt-completion row,
    and where the trained ones start: after the longest common prefix of the prompt (with the generation prompt) and
    prompt + reply (a token merging across the boundary moves the start back by that token)."""
    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = _ids(tokenizer, prompt + [{"role": "assistant", "content": completion}])
    shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                  min(len(prompt_ids), len(full_ids)))
    return full_ids, shared


def completion_token_ids(tokenizer, prompt: list[dict], completion: str) -> list[int]:
    """The tokens the loss covers (`trained_token_ids`)."""
    full_ids, start = trained_token_ids(tokenizer, prompt, completion)
    return full_ids[start:]


def row_problem(tokenizer, row: TrainingRow, think: ThinkPrefix, model_ref: str) -> str | None:
    """Why `row` would train wrongly under `tokenizer`'s chat template, or None when it renders as it should."""
    completion = row.completion or ""
    if not completion.strip():
        return "empty: the completion is empty, so the loss mask covers nothing"
    if row.think_prefix and "<think>" in row.think_prefix and "<think>" not in completion:
        return (f"think stripped: it was sampled inside a think span (think_prefix {row.think_prefix!r}) but its "
                "completion holds none: the reasoning was lost before training")
    prompt_text = generation_prompt(tokenizer, row.prompt)
    full_text = tokenizer.apply_chat_template(row.prompt + [{"role": "assistant", "content": completion}],
                                              tokenize=False)
    if "</think>" in completion:
        reasoning = completion.rsplit("</think>", 1)[0].split("<think>")[-1]
        if _squeeze(reasoning) and _squeeze(reasoning) not in _squeeze(full_text):
            return ("think stripped: the chat template drops the completion's think span from the trained tokens "
                    "(as R1-distill templates do to every assistant turn); train with a template that keeps it "
                    "(`chat_template`)")
    if not full_text.startswith(prompt_text):
        opener_missing = "<think>" in prompt_text[-12:] and "<think>" not in completion
        return ("prompt: the chat template renders the prompt before the reply differently from the prompt it "
                f"generates from ({_first_difference(prompt_text, full_text)})"
                + ("; its generation prompt opens <think> but this completion does not" if opener_missing else ""))
    masked_ids = completion_token_ids(tokenizer, row.prompt, completion)
    if not masked_ids:
        return "empty: the loss mask covers no token"
    if think.appended and not _squeeze(completion).startswith(_squeeze(think.appended)):
        return (f"think prefix: the student's template expects replies to open with {think.appended!r} (every "
                "prompt at sampling and evaluation ends with it), but this completion does not")
    masked = tokenizer.decode(masked_ids)
    opener_in_prompt = next((o for o in ("<think>\n", "<think>") if prompt_text.endswith(o)), "")
    expected = completion[len(opener_in_prompt):] if completion.startswith(opener_in_prompt) else completion
    if tokenizer.eos_token_id not in masked_ids:
        return (f"no end of turn: the trained tokens hold no eos {tokenizer.eos_token!r}, so the model never learns "
                "to stop")
    if _squeeze(masked) != _squeeze(expected + tokenizer.eos_token):
        return (f"mask: the trained tokens decode to {masked[:80]!r}..., not the completion and its end of turn "
                f"({_first_difference(_squeeze(masked), _squeeze(expected + tokenizer.eos_token))}, whitespace "
                "removed)")
    if row.prompt_text is not None and row.sampled_by == model_ref and prompt_text + think.appended != row.prompt_text:
        return ("sampled prompt: sampled by this model from another prompt than the one it is trained on "
                f"({_first_difference(row.prompt_text, prompt_text + think.appended)}, sampled vs trained)")
    return None


def check_rows(tokenizer, rows: Iterable[TrainingRow], *, step: str, dataset: str, think: ThinkPrefix,
               model_ref: str) -> dict:
    """Refuse (UserError, exit code 2) when any row would train wrongly, naming the first few rows and why;
    otherwise the manifest stats of the check."""
    checked, failures = 0, []
    for row in rows:
        checked += 1
        problem = row_problem(tokenizer, row, think, model_ref)
        if problem:
            failures.append(f"row {row.row_id!r} ({row.column}): {problem}")
    if failures:
        shown = "\n  ".join(failures[:SHOWN_FAILURES])
        raise UserError(f"{step}: {len(failures)} of {checked} training rows of dataset {dataset!r} would not train as "
                        f"intended with the chat template of {model_ref!r}:\n  {shown}")
    return {"template_checked_rows": checked, "think_prefix": think.appended}


def check_teacher_prompts(tokenizer, rows: Iterable[tuple[str, list[dict], list[dict]]], *, step: str,
                          dataset: str, model_ref: str) -> dict:
    """For (row id, student prompt, teacher prompt) rows: refuse a row whose teacher prompt, rendered, differs from
    the student's anywhere but in the user turn that carries the privileged context."""
    checked, failures = 0, []
    for row_id, student, teacher in rows:
        checked += 1
        student_text, teacher_text = generation_prompt(tokenizer, student), generation_prompt(tokenizer, teacher)
        student_user, teacher_user = student[-1]["content"], teacher[-1]["content"]
        if student[:-1] != teacher[:-1] or student_text.replace(student_user, teacher_user, 1) != teacher_text:
            failures.append(f"row {row_id!r}: teacher and student prompts differ outside the privileged context "
                            f"({_first_difference(student_text.replace(student_user, teacher_user, 1), teacher_text)})")
    if failures:
        shown = "\n  ".join(failures[:SHOWN_FAILURES])
        raise UserError(f"{step}: {len(failures)} of {checked} rows of dataset {dataset!r} prompt the teacher "
                        f"differently from the student with the chat template of {model_ref!r}:\n  {shown}")
    return {"template_checked_rows": checked}


def training_rows(dataset, completion_columns: tuple[str, ...] = ("messages",)) -> Iterator[TrainingRow]:
    """The trained completions of a dataset: the last message of `messages` (SFT data) after the messages before it,
    or each of `chosen`/`rejected` after `prompt` (preference data); with the sampling columns `select` and `pairs`
    carry. Rows are read one at a time: a dataset of long traces is never held in memory whole."""
    sampling = [name for name in ("think_prefix", "prompt_text", "sampled_by") if name in dataset.column_names]
    id_column = ["id"] if "id" in dataset.column_names else []
    for index, row in enumerate(dataset.select_columns(id_column + list(completion_columns) + sampling
                                                       + (["prompt"] if "messages" not in completion_columns else []))):
        fields = {name: row[name] for name in sampling}
        for column in completion_columns:
            prompt, reply = (row[column][:-1], row[column][-1]) if column == "messages" else (row["prompt"],
                                                                                              row[column][-1])
            yield TrainingRow(str(row["id"]) if id_column else f"row {index}", prompt, reply["content"], column,
                              **fields)


def teacher_prompt(student: list[dict], privileged_context: str, teacher_template: str) -> list[dict]:
    """The teacher's prompt as TRL's SDFT composes it (`_compose_teacher_prompt`): the student's messages with the
    last one replaced by a user turn of `teacher_template` filled with its text and the privileged context."""
    return student[:-1] + [{"role": "user", "content": teacher_template.format(
        prompt=student[-1]["content"], privileged_context=privileged_context)}]
