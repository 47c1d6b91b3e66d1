"""Chat templates and thinking: the one place that decides how a prompt opens a reasoning model's reply.

Reasoning models write `<think>\\n ... </think>` before their answer, and chat templates differ in who writes the
opener:

    plain (ChatML, SmolLM2)        nothing: the model may or may not think
    R1-distill (first release)     the template mentions </think> (it strips reasoning from earlier turns) and the
                                   reply is expected to start with `<think>\\n`: the prompt must append it
    R1-distill (later), QwQ        the generation prompt itself ends with `<think>\\n`
    Qwen3                          nothing appended; `enable_thinking: false` closes an empty think span instead

`think_prefix` reads that from the tokenizer's template, for every step that prompts a model (`sample`,
`evaluate`, `opsd`, `onpolicy`); an explicit setting in the recipe wins. It returns the text to append after the
generation prompt and the text the completion continues (what the grader and `select` put before it), which also
holds an opener the template wrote itself: either way a completion that opened thinking and never closed it is
read as unfinished.

`join_reasoning` / `split_reasoning` convert between a trace as one text and its (reasoning, response) parts, the
form OpenAI-compatible servers return when they parse reasoning out (`reasoning_content`, `reasoning`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ThinkPrefix:
    appended: str  # appended after the chat template's generation prompt
    completion_prefix: str  # what the completion continues: `appended`, or the `<think>\n` the template wrote


def generation_prompt(tokenizer, messages: list[dict], **template_kwargs) -> str:
    """The chat template's rendering of `messages` with the generation prompt, as text."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)


def think_prefix(tokenizer, setting: str | None = None) -> ThinkPrefix:
    """The think prefix for prompting the model of `tokenizer`; `setting` (a recipe's `think_prefix`) wins when set.

    R1-distill templates strip `...</think>` from earlier assistant turns (so they mention </think>) and expect
    the reply to start with `<think>\\n`; newer ones write `<think>\\n` into the generation prompt themselves.
    """
    rendered = generation_prompt(tokenizer, [{"role": "user", "content": "1 + 1?"}])
    opened_by_template = rendered.rstrip().endswith("<think>")
    if setting is not None:
        appended = setting
    elif opened_by_template:
        appended = ""
    else:
        template = tokenizer.chat_template
        template_text = template if isinstance(template, str) else json.dumps(template)
        appended = THINK_OPEN if THINK_CLOSE in template_text else ""
    return ThinkPrefix(appended=appended, completion_prefix=THINK_OPEN if opened_by_template else appended)


def template_appending(template: str, text: str) -> str:
    """`template` with `text` written after its generation prompt: for trainers that render prompts themselves (TRL's
    rollouts), so they prompt with the same think prefix as `sample` and `evaluate`."""
    return template + "{% if add_generation_prompt %}" + text.replace("{", "{{ '{' }}") + "{% endif %}"


def join_reasoning(reasoning: str | None, response: str | None, *, finished: bool) -> str:
    """One trace from a server's separate parts: `<think>\\n{reasoning}\\n</think>\\n\\n{response}`.

    A reply cut off (`finished` False) while still reasoning (no response) keeps its think span open, so the grader
    reads it as unfinished thinking, as it does for a trace generated in one piece."""
    response = response or ""
    if not reasoning:
        return response
    if not finished and not response:
        return THINK_OPEN + reasoning
    return f"{THINK_OPEN}{reasoning}\n{THINK_CLOSE}\n\n{response}"


def split_reasoning(trace: str) -> tuple[str | None, str]:
    """(reasoning, response) of a trace: the text inside its think span (None without one) and what follows it.

    A trace that closes </think> without opening it (a template opened it in the prompt) is reasoning up to the
    close; one that opens and never closes is reasoning to its end, with an empty response."""
    before, closed, after = trace.rpartition(THINK_CLOSE)
    if not closed:
        opened = trace.find("<think>")
        return (None, trace) if opened < 0 else (trace[opened + len("<think>"):].strip("\n"), "")
    opened = before.find("<think>")
    reasoning = before[opened + len("<think>"):] if opened >= 0 else before
    return reasoning.strip("\n"), after.lstrip("\n")
