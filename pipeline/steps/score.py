"""`score`: the teacher's top-K distribution over completions that already exist (a published dataset, another
teacher's traces, the student's own samples), so that any dataset becomes a KD dataset for `kd`.

The teacher (a local vLLM model) reads each row's prompt + completion once (vLLM `prompt_logprobs=k`, nothing is
generated) and the step writes, for every completion token, the teacher's K most likely tokens and their log-probs
and the completion token's own log-prob: the columns and layout of `pipeline.text.teacher_logprobs` (prompt and
completion token ids, `teacher_topk_ids`, `teacher_topk_logprobs` in float16 or float32, `teacher_token_logprob`,
`teacher_tokenizer`), beside the row's own columns. The manifest records K, the teacher's tokenizer identity and the
stored bytes per completion token.

Input rows, either form:
- as `sample` writes them: `completion` (text), and `prompt_text` (the prompt as the sampler's model read it) or
  else `prompt` (chat messages, rendered here with the teacher's chat template and think prefix). The completion gets
  the eos token appended unless its `finish_reason` is "length" (cut off: it never ended);
- as `select` writes them: `messages`, whose last (assistant) message is the completion and the rest the prompt
  (rendered with the teacher's template and think prefix); eos appended.
The completion text is tokenized by the teacher's tokenizer (without special tokens), so the stored ids are the
teacher's tokens, which `kd` trains on as they are. Rows whose completion has no token, or (with `max_model_len`)
whose prompt + completion is longer, are dropped and counted.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

from pydantic import Field

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.compute_dtype import DtypeSetting
from pipeline.core.errors import UserError
from pipeline.core.step import StepConfig
from pipeline.text import teacher_logprobs as stored


class Config(DtypeSetting, StepConfig):
    input: str = Field(description="Name of the step whose completions are scored: sample rows (prompt_text or "
                                   "prompt, completion) or select rows (messages).")
    model: str = Field(description="The teacher: builtin:NAME, step:NAME, a local HF dir or a hub id (run with vLLM).")
    k: int = Field(default=20, ge=1, le=20, description="Top-K tokens stored per completion token (vLLM allows "
                                                         "at most 20).")
    logprob_dtype: Literal["float16", "float32"] = Field(
        default="float16", description="Storage type of the top-K log-probs: float16 halves the largest column.")
    think_prefix: str | None = Field(
        default=None, description="Text after the generation prompt when the prompt is rendered here (rows without "
                                  "prompt_text); null: from the teacher's chat template, as `sample` does.")
    max_model_len: int | None = Field(
        default=None, ge=2, description="Longest prompt + completion in tokens; longer rows are dropped and counted. "
                                        "null: the longest row (the model's own limit still applies).")
    batch_size: int = Field(default=64, ge=1, description="Sequences sent to vLLM per call.")

    path_fields: ClassVar = ()
    libraries: ClassVar = ("vllm", "torch", "transformers")

    def model_refs(self) -> list[str]:
        return [self.model]


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model
    from pipeline.engines.vllm_scoring import top_k_logprobs
    from pipeline.text import chat

    rows = inputs[cfg.input].dataset()
    model = resolve_model(cfg.model, inputs)
    tokenizer = AutoTokenizer.from_pretrained(model)
    think = chat.think_prefix(tokenizer, cfg.think_prefix)
    identity = stored.tokenizer_identity(tokenizer, cfg.model)

    prompts, completions = token_sequences(cfg, rows, tokenizer, think.appended)
    kept = [i for i, (p, c) in enumerate(zip(prompts, completions))
            if c and (cfg.max_model_len is None or len(p) + len(c) <= cfg.max_model_len)]
    empty = sum(1 for c in completions if not c)
    started = time.perf_counter()
    scored, load_seconds = top_k_logprobs(
        model, [prompts[i] + completions[i] for i in kept], [len(prompts[i]) for i in kept], cfg.k,
        dtype=cfg.dtype_choice().dtype, max_model_len=cfg.max_model_len, batch_size=cfg.batch_size) if kept else ([], 0.0)
    seconds = time.perf_counter() - started

    table = rows.select(kept).with_format("arrow")[:]
    columns = stored.arrow_columns([prompts[i] for i in kept], [completions[i] for i in kept],
                                   [s.topk_ids for s in scored], [s.topk_logprobs for s in scored],
                                   [s.token_logprobs for s in scored], identity, cfg.logprob_dtype)
    for name, array in columns.items():
        table = table.append_column(name, array)
    tokens = sum(len(completions[i]) for i in kept)
    from pipeline.text.arrow_tables import dataset_from_table

    return out.write_dataset(
        dataset_from_table(table), k=cfg.k, logprob_dtype=cfg.logprob_dtype, teacher_tokenizer=identity,
        completion_tokens=tokens, dropped_empty=empty, dropped_too_long=len(rows) - len(kept) - empty,
        # measured on the written Arrow arrays, list offsets included
        bytes_per_token=stored.measured_bytes_per_token(columns, tokens),
        load_seconds=round(load_seconds, 2), seconds=round(seconds, 2),
        tokens_per_s=round(tokens / max(seconds - load_seconds, 1e-9), 1) if tokens else 0.0)


def token_sequences(cfg: Config, rows, tokenizer, think_appended: str) -> tuple[list[list[int]], list[list[int]]]:
    """Each row's prompt and completion as the teacher's token ids (see the module docstring for the two forms)."""
    from pipeline.text import chat

    columns = rows.column_names
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # the template wrote them
    prompts, completions = [], []
    if "completion" in columns:
        if "prompt_text" not in columns and "prompt" not in columns:
            raise UserError(f"score: dataset {cfg.input!r} has a 'completion' column but neither 'prompt_text' nor "
                            f"'prompt' (columns: {columns})")
        wanted = [c for c in ("id", "prompt_text", "prompt", "completion", "finish_reason") if c in columns]
        for index, row in enumerate(rows.select_columns(wanted)):
            text = row.get("prompt_text")
            if text is None:
                messages = row.get("prompt")
                if not isinstance(messages, list) or not messages:
                    raise UserError(f"score: row {row.get('id', index)!r} of dataset {cfg.input!r} has no "
                                    "prompt_text and its 'prompt' is not chat messages")
                text = chat.generation_prompt(tokenizer, messages) + think_appended
            ended = row.get("finish_reason") != "length"
            prompts.append(encode(text))
            completions.append(encode(row["completion"] or "") + ([eos] if ended else []))
    elif "messages" in columns:
        wanted = [c for c in ("id", "messages") if c in columns]
        for index, row in enumerate(rows.select_columns(wanted)):
            messages = row["messages"]
            if not isinstance(messages, list) or len(messages) < 2 or messages[-1].get("role") != "assistant":
                raise UserError(f"score: row {row.get('id', index)!r} of dataset {cfg.input!r}: 'messages' must end "
                                "with an assistant message after a prompt")
            prompts.append(encode(chat.generation_prompt(tokenizer, messages[:-1]) + think_appended))
            completions.append(encode(messages[-1]["content"] or "") + [eos])
    else:
        raise UserError(f"score: dataset {cfg.input!r} has neither 'completion' (sample rows) nor 'messages' "
                        f"(select rows) (columns: {columns})")
    clashes = [c for c in stored.TEACHER_COLUMNS if c in columns]
    if clashes:
        raise UserError(f"score: dataset {cfg.input!r} already has column(s) {clashes}, which scoring writes")
    return prompts, completions
