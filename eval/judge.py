"""The LLM-judge fallback of `verify` (`judge:`): a judge model asked, with a fixed and versioned prompt, whether a
sample's final answer equals the gold, for the rows the rule-based grader could not settle (open-r1, NeMo-Skills and
OpenThoughts do the same where rule-based checking fails).

Which rows (`JUDGED_LABELS`): `incorrect` (an answer was extracted and math-verify found it unequal: a judge may
see an equivalence it misses, such as `\\text{all reals}` and `(-\\infty, \\infty)`) and `no_answer` (nothing read
as an answer: the judge reads the end of the reply). Not `correct` (nothing to add), not `truncated` (a reply cut
at the token limit must not be credited from its unfinished reasoning), not the ungraded labels (no gold to
compare with, or grading failed).

The verdict is read strictly (`parse_verdict`): the reply, after any think span, must be YES or NO (any case,
optionally bold or ending in a period); anything else is unparsed and the row keeps the grader's label.

The judge runs greedily (temperature 0) with a fixed seed: locally through the vLLM engine
(pipeline.engines.vllm_local) or on an OpenAI-compatible server (pipeline.engines.openai_client). Each reply is
appended to a cache file in the step's scratch as its chunk finishes, keyed by the judge's identity, the prompt
version and the whole prompt text (`cache_key`), so a resumed run asks only what it has not asked yet.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.core.compute_dtype import DTYPE_HELP, Dtype

JUDGED_LABELS = ("incorrect", "no_answer")
JUDGE_SEED = 0  # greedy decoding needs no randomness; the seed is fixed so that nothing else can vary
TAIL_CHARS = 1500  # how much of a reply with no extracted answer the judge reads (its end, after any think span)
CHUNK = 64  # judge prompts per engine chunk: each finished chunk's replies are cached

# The judge's prompts, by version. A version's text never changes once released: a new wording is a new version
# (and `prompt_version` is part of verify's key, so choosing it re-runs the step).
JUDGE_PROMPT_V1 = """\
You are checking a student's answer to a math problem against the reference answer.

Problem:
{problem}

Reference answer:
{gold}

{answer_heading}:
{answer}

Is the student's final answer mathematically equivalent to the reference answer (the same value, expression, set \
or choice; ignore formatting, spacing, and units written or left out)? Reply with exactly one word: YES or NO."""
ANSWER_HEADINGS_V1 = {"extracted": "Student's final answer", "tail": "End of the student's solution"}
PROMPTS = {"v1": (JUDGE_PROMPT_V1, ANSWER_HEADINGS_V1)}

_VERDICT = re.compile(r"[*_\s]*(yes|no)[*_\s]*\.?[*_\s]*", re.IGNORECASE)


class JudgeSettings(BaseModel):
    """verify's `judge:` block: a local model (`model` is a model reference) or a server (`base_url` and the
    name it serves as `model`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The judge: builtin:NAME, step:NAME, a local HF dir or a hub id; with base_url, "
                                   "the model name the server serves.")
    base_url: str | None = Field(default=None, description="An OpenAI-compatible server's API root (e.g. "
                                                           "http://localhost:8000/v1); null: run `model` locally with vLLM.")
    api_key_env: str | None = Field(default=None, description="With base_url: the environment variable holding the "
                                                              "API key (never the key itself); null: no key.")
    max_tokens: int = Field(default=16, ge=1, description="Most tokens of a verdict (a reasoning judge needs "
                                                          "room to think before its YES or NO).")
    prompt_version: Literal["v1"] = Field(default="v1", description="The judge prompt's version "
                                                                    "(eval/judge.py JUDGE_PROMPT_V1).")
    dtype: Dtype = Field(default="auto", description="Local judge: " + DTYPE_HELP)
    max_model_len: int | None = Field(default=None, ge=1, description="Local judge: longest prompt + verdict in "
                                                                      "tokens; default: the model's own limit.")
    max_concurrency: int = Field(default=8, ge=1, description="With base_url: most requests in flight at once.")
    request_timeout: float = Field(default=120.0, gt=0, description="With base_url: seconds one request may take.")

    @model_validator(mode="after")
    def _local_or_served(self) -> JudgeSettings:
        if self.base_url is None and self.api_key_env is not None:
            raise ValueError("judge: api_key_env is for a server (base_url); a local judge needs no key")
        return self

    @property
    def local(self) -> bool:
        return self.base_url is None

    def identity(self) -> str:
        """Who judges, as the cache keys it: the model reference (local) or the server and its model name."""
        return f"local {self.model}" if self.local else f"{self.base_url} {self.model}"


def judge_prompt(version: str, *, problem: str | None, gold: str, extracted: str, completion: str) -> str:
    """The prompt asking whether the sample's answer equals `gold`: its extracted answer, or (none extracted) the
    last TAIL_CHARS of its reply after any think span."""
    template, headings = PROMPTS[version]
    if extracted:
        heading, answer = headings["extracted"], extracted
    else:
        heading, answer = headings["tail"], (completion or "").rsplit("</think>", 1)[-1].strip()[-TAIL_CHARS:]
    return template.format(problem=(problem or "(not given)").strip(), gold=str(gold).strip(),
                           answer_heading=heading, answer=answer)


def parse_verdict(reply: str | None) -> bool | None:
    """True for YES, False for NO, None for anything else (see the module docstring)."""
    match = _VERDICT.fullmatch((reply or "").rsplit("</think>", 1)[-1])
    return None if match is None else match.group(1).lower() == "yes"


def cache_key(settings: JudgeSettings, prompt: str) -> str:
    return hashlib.sha256(json.dumps([settings.identity(), settings.prompt_version, prompt]).encode()).hexdigest()


def read_cache(path: Path) -> dict[str, str]:
    """Replies cached by an earlier run, by cache_key; a torn last line (a kill mid-write) is dropped."""
    replies: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                key, reply = json.loads(line)
            except (ValueError, TypeError):
                continue
            if isinstance(key, str) and isinstance(reply, str):
                replies[key] = reply
    return replies


def ask(settings: JudgeSettings, prompts: Sequence[str], cache_path: Path, *, model_dir: str | None = None,
        dtype: str = "auto", on_asked=None) -> tuple[list[str], int]:
    """The judge's reply to each prompt, and how many were asked now (the rest came from the cache). Replies are
    appended to `cache_path` chunk by chunk. `model_dir` and `dtype`: the local judge's resolved directory and the
    dtype chosen for it (pipeline.core.compute_dtype)."""
    from pipeline.engines.request import SamplingRequest, chunk_ranges

    keys = [cache_key(settings, prompt) for prompt in prompts]
    replies = read_cache(cache_path)
    todo = list(dict.fromkeys(key for key in keys if key not in replies))  # one question asked once
    if todo:
        prompt_of = dict(zip(keys, prompts))
        chunks = chunk_ranges([len(todo)], CHUNK)
        request = SamplingRequest(
            model=model_dir or settings.model, prompts=[[{"role": "user", "content": prompt_of[k]}] for k in todo],
            n=1, seed=JUDGE_SEED, temperature=0.0, max_tokens=settings.max_tokens, ids=todo, chunks=chunks,
            dtype=dtype, max_model_len=settings.max_model_len)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        with open(cache_path, "a") as cache:
            if cache.tell() > 0:
                cache.write("\n")  # a run killed mid-line left a torn line: keep it apart from the next one

            def save(chunk: int, completions, seconds: float) -> None:
                for key, (completion,) in zip((todo[i] for i in chunks[chunk]), completions):
                    replies[key] = completion.text
                    cache.write(json.dumps([key, completion.text]) + "\n")
                cache.flush()
                if on_asked is not None:
                    on_asked(len(chunks[chunk]))

            _generate(settings, request, save)
    return [replies[key] for key in keys], len(todo)


def _generate(settings: JudgeSettings, request, save) -> None:
    if settings.local:
        from pipeline.engines import vllm_local

        vllm_local.generate(request, on_chunk=save)
        return
    from pipeline.core.errors import UserError
    from pipeline.engines import openai_client

    server = openai_client.OpenAIServer(base_url=settings.base_url, api_key_env=settings.api_key_env,
                                        max_concurrency=settings.max_concurrency,
                                        request_timeout=settings.request_timeout)
    try:
        openai_client.generate(request, server, on_chunk=save)
    except UserError as error:  # the client speaks for the sample step; say whose request it was
        raise UserError(f"verify judge: {str(error).removeprefix('sample: ')}") from None


def judge_grades(settings: JudgeSettings, grades: Sequence, golds: Sequence, completions: Sequence,
                 problems: Sequence | None, cache_path: Path, *, model_dir: str | None = None,
                 dtype: str = "auto") -> tuple[list, list[str], dict]:
    """The grades after the judge's verdicts on the rows it may judge (JUDGED_LABELS), each row's `graded_by`
    ("judge" where a verdict was read, "rules" elsewhere) and the counts for the manifest. YES makes a row
    `correct`; NO keeps its label (incorrect or no_answer: not correct either way); an unparsed reply keeps the
    grader's label and is counted in `judge_unparsed`."""
    from dataclasses import replace

    rows = [i for i, grade in enumerate(grades) if grade.label in JUDGED_LABELS]
    prompts = [judge_prompt(settings.prompt_version, problem=problems[i] if problems is not None else None,
                            gold=golds[i], extracted=grades[i].extracted, completion=completions[i]) for i in rows]
    replies, asked = ask(settings, prompts, cache_path, model_dir=model_dir, dtype=dtype) if rows else ([], 0)
    grades, graded_by = list(grades), ["rules"] * len(grades)
    counts = {"judge_eligible": len(rows), "judge_asked": asked, "judge_cached": len(set(prompts)) - asked,
              "judge_yes": 0, "judge_no": 0, "judge_unparsed": 0}
    unparsed_examples = []
    for row, reply in zip(rows, replies):
        verdict = parse_verdict(reply)
        if verdict is None:
            counts["judge_unparsed"] += 1
            if len(unparsed_examples) < 5:
                unparsed_examples.append({"row": row, "reply": reply[:200]})
            continue
        graded_by[row] = "judge"
        counts["judge_yes" if verdict else "judge_no"] += 1
        if verdict:
            grades[row] = replace(grades[row], label="correct", correct=True)
    return grades, graded_by, {**counts, "judge": settings.identity(), "judge_prompt_version": settings.prompt_version,
                               "judge_unparsed_examples": unparsed_examples}
