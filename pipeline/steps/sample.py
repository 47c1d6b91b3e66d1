"""`sample`: n completions per problem from a model, with vLLM or an OpenAI-compatible server, into the
`samples` contract. One file past 400 lines because it is one thing: the step's Config (its backend checks) and
its run over chunks; the engines live in pipeline/engines, the stored-logprob layout in pipeline/text.

Each problem row comes out n times, contiguous and in input order, with all its columns plus
`sample_idx`, `prompt` (the chat messages sent), `prompt_text` (the prompt as the model read it: the chat
template's rendering plus the think prefix; null with `backend: openai`, where the server renders it),
`completion`, `reasoning` and `response` (the completion's think span and what follows it, see
`pipeline.text.chat.split_reasoning`), `finish_reason`, `prompt_tokens`, `completion_tokens`, `model` (the reference
as the recipe wrote it) and `think_prefix` (text the completion continues: the prefix appended to the prompt, or
the `<think>\n` the chat template wrote itself; verify, select and the training checks read it).

With `logprobs: K` every completion token also gets the model's top-K token ids and log-probs and the sampled token's
log-prob, with the prompt's and completion's token ids and the tokenizer's identity: the columns of
`pipeline.text.teacher_logprobs`, which `kd` trains on (`score` writes the same for existing completions). With
backend openai they come from a vLLM server (`logprobs`/`top_logprobs` with tokens as ids and the prompt's token ids,
see `pipeline.engines.openai_client`; another server is refused), and the tokenizer identity from `tokenizer:` or the
path the server reports, checked against the server's own tokenizer.

The think prefix comes from the model's chat template (`pipeline.text.chat.think_prefix`, the same rule as `evaluate`,
`opsd` and `onpolicy`) unless `think_prefix` is set.

Resume: problems are generated in chunks of `chunk_size`; each finished chunk is written atomically as
a shard into the step's scratch dir, so after a kill (even -9) a re-run generates only the chunks that
have no shard, and a sample is never written twice. The dataset is then written from the shards chunk by chunk
(through an Arrow file in the scratch dir), so memory holds one chunk's completions, not the run's.

Determinism: sample k of a problem is drawn with its own seed from (recipe seed, problem id, k)
(`pipeline.engines.request.sample_seed`), so its random draws do not depend on the other problems in the input,
on `chunk_size`, on n, or on a kill and resume: an interrupted-and-resumed run gives the samples of an
uninterrupted one, and the same input, settings and versions on the same machine give the same samples.
Rounding is the exception: the problems of one chunk are computed as one batch, and with bfloat16 weights
(vLLM's default on CPU) a problem's logits can round differently when its chunk holds other requests, so
another `chunk_size`, other neighbouring problems or another n can change some samples from the first
token where the rounding tips a draw (float32 weights did not, in our measurements on CPU).

`backend: openai` sends the same chat messages to any OpenAI-compatible server (`vllm serve`, a hosted API),
one request per sample with at most `max_concurrency` in flight, and saves the same shards as chunks
finish; the API key comes from the environment variable named by `api_key_env` and is written nowhere.
A think prefix cannot be forced through the chat completions API, so that backend refuses `think_prefix`:
a server whose chat template opens `<think>` itself (R1 distills under `vllm serve`) needs none. A server that
parses the reasoning out (the DeepSeek API; `vllm serve --reasoning-parser ...`) returns it in
`reasoning_content` or `reasoning`: the completion is then `<think>\n{reasoning}\n</think>\n\n{content}`, and a
reply cut off while still reasoning keeps its think span open, so it grades as truncated. A reply whose text
closes `</think>` without opening it (the template opened it in the prompt) gets the opener back.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.artifacts import Artifact, Output, write_json_atomic
from pipeline.core.compute_dtype import DtypeSetting
from pipeline.core.errors import UserError
from pipeline.core.funnel import Count, FunnelStage
from pipeline.core.step import StepConfig
from pipeline.engines.settings import EngineFields
from pipeline.text.prompts import DEFAULT_PROMPT_TEMPLATE, render_prompt

SAMPLE_COLUMNS = ("sample_idx", "prompt", "prompt_text", "completion", "reasoning", "response", "finish_reason",
                  "prompt_tokens", "completion_tokens", "model", "think_prefix")
SHARD_DIR = "shards"


class Config(DtypeSetting, StepConfig, EngineFields):
    """The sample step's settings: its own below, and the sampling and engine settings of `EngineFields`
    (temperature, top_p, top_k, max_tokens, think_prefix, max_model_len, chunk_size, tensor_parallel_size, ...,
    engine)."""

    input: str = Field(description="Name of the step whose problems dataset (id, problem, answer) is sampled.")
    model: str = Field(description="Model to sample from: builtin:NAME, step:NAME, a local HF dir or a hub id; "
                                   "with backend openai, the model name the server serves.")
    backend: Literal["vllm", "openai"] = Field(
        default="vllm", description="vllm: offline vLLM in a child process. openai: requests to the "
                                    "OpenAI-compatible server at base_url (chat completions).")
    base_url: str | None = Field(
        default=None, description="backend openai: the server's API root, e.g. http://localhost:8000/v1.")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY", description="backend openai: name of the environment variable holding the API "
                                              "key (never the key itself); null for a server without one.")
    max_concurrency: int = Field(default=8, ge=1, description="backend openai: most requests in flight at once.")
    max_retries: int = Field(
        default=5, ge=0, description="backend openai: retries of a request after a connection error, timeout, "
                                     "429 or 5xx, with exponential back-off.")
    request_timeout: float = Field(default=600.0, gt=0,
                                   description="backend openai: seconds one request may take before a retry.")
    n: int = Field(default=4, ge=1, description="Completions per problem.")
    prompt_template: str = Field(
        default=DEFAULT_PROMPT_TEMPLATE,
        description="User message. {column} is replaced by that column of the row (at least {problem}); "
                    "other braces, such as \\boxed{}, are kept as written.")
    system_prompt: str | None = Field(
        default=None, description="System message sent before the user message; none if unset "
                                  "(the model's chat template may add its own default).")
    stop: list[str] | None = Field(
        default=None, description="Strings that end a completion (not included in it); eos always does.")
    logprobs: int | None = Field(
        default=None, ge=1, le=20,
        description="Also store the model's top-K distribution at every completion token (vLLM `logprobs`, K up to "
                    "20): the teacher columns `kd` trains on (pipeline.text.teacher_logprobs). null: none. Backend "
                    "openai: a vLLM server started with --max-logprobs K+1 or more (its default 20 allows K up to "
                    "19); other servers give no token ids and are refused.")
    logprob_dtype: Literal["float16", "float32"] = Field(
        default="float16", description="With logprobs: storage type of the top-K log-probs.")
    tokenizer: str | None = Field(
        default=None, description="backend openai with logprobs: the served model's tokenizer (builtin:NAME, "
                                  "step:NAME, a local dir or a hub id), whose identity the teacher columns record; "
                                  "checked against the server's /tokenize. null: the path the server reports "
                                  "loading (/v1/models root), when this machine can read it.")

    dry_run_overrides: ClassVar[dict] = {"n": 2, "max_tokens": 16}
    path_fields: ClassVar = ()
    libraries: ClassVar = ("vllm", "torch", "transformers")
    # 2: one seeded request per sample (was: an engine seed per chunk). 3: think prefix from the chat template,
    # reasoning returned apart kept in the completion, prompt_text / reasoning / response columns.
    code_version: ClassVar = "3"
    # added later; their defaults store nothing new
    keyed_when_set: ClassVar = ("logprobs", "logprob_dtype", "tokenizer")

    def model_refs(self) -> list[str]:
        if self.backend == "vllm":
            return [self.model]
        # a served model's name is the server's business; a tokenizer named for its stored columns is ours
        return [self.tokenizer] if self.tokenizer else []

    def dtype_choice(self):
        return super().dtype_choice() if self.backend == "vllm" else None  # the server's dtype is its own

    @model_validator(mode="after")
    def _openai_settings(self) -> Config:
        if self.backend == "openai":
            if not self.base_url:
                raise ValueError("backend openai needs base_url (e.g. http://localhost:8000/v1)")
            if self.engine == "ray":
                raise ValueError("engine ray runs vLLM replicas; backend openai sends requests to a server: "
                                 "use one or the other")
            if self.think_prefix:
                raise ValueError("backend openai cannot force think_prefix: the chat completions API has no way to "
                                 "pre-fill the reply; leave it unset (a server whose chat template opens <think> "
                                 "needs none) or use backend vllm")
        if self.tokenizer and (self.backend != "openai" or not self.logprobs):
            raise ValueError("tokenizer names a served model's tokenizer for backend openai with logprobs; with "
                             "backend vllm the model's own tokenizer is used: leave it unset")
        return self

    @field_validator("prompt_template")
    @classmethod
    def _has_problem(cls, template: str) -> str:
        if "{problem}" not in template:
            raise ValueError(f"prompt_template must contain the {{problem}} placeholder: {template!r}")
        return template


def chat_messages(cfg: Config, row: dict) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return messages + [{"role": "user", "content": render_prompt(cfg.prompt_template, row)}]


def funnel_stage(stats: dict) -> FunnelStage:
    """The run page's data funnel: samples, by finish reason."""
    finished = [Count(key, f"finish: {key.removeprefix('finish_')}", value)
                for key, value in stats.items() if key.startswith("finish_")]
    return FunnelStage("samples", stats.get("problems"), finished)


def run(cfg: Config, inputs: dict[str, Artifact], out: Output) -> Artifact:
    from pipeline.core.console import progress
    from pipeline.engines.request import Completion, SamplingRequest, chunk_ranges

    problems = inputs[cfg.input].dataset()
    _check_columns(cfg, problems.column_names)
    prompts = [chat_messages(cfg, row) for row in problems]
    model, think, prompt_texts = _model_and_prompt_texts(cfg, inputs, prompts)
    teacher = _teacher_identity(cfg, inputs, model) if cfg.logprobs else None  # before any sampling: fail early
    ids = [str(i) for i in problems["id"]] if "id" in problems.column_names else [str(i) for i in range(len(problems))]
    chunks = chunk_ranges([len(ids)], cfg.chunk_size)
    chunk_ids = [ids[rows.start:rows.stop] for rows in chunks]

    shard_dir = out.scratch / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    # What the output's stats and column types need of each chunk, by chunk index (in the order the chunks were
    # read or saved); its completions stay in its shard file, read back one chunk at a time to write the dataset.
    tallies = _read_shards(shard_dir, chunk_ids, cfg.n, think.completion_prefix)
    resumed = len(tallies)

    started = time.perf_counter()
    saved = cfg.n * sum(len(chunk_ids[chunk]) for chunk in tallies)  # samples in shards, for the progress row
    with progress(total=cfg.n * len(ids), unit="samples", completed=saved) as bar:
        def save(chunk: int, completions: list[list[Completion]], seconds: float) -> None:
            nonlocal saved
            path = shard_dir / f"chunk-{chunk:06d}.json"
            shard = {"chunk": chunk, "ids": chunk_ids[chunk], "generate_seconds": seconds,
                     "completions": [[vars(c) for c in per_problem] for per_problem in completions]}
            write_json_atomic(path, shard)
            tallies[chunk] = _tally(path, shard, think.completion_prefix)
            # The engine's returned Generations keeps every Completion (its token counts feed the Ray stats); the
            # text (and any log-probs) is on disk now, so drop it: memory holds a chunk's text, not the run's.
            for per_problem in completions:
                for completion in per_problem:
                    completion.text = ""
                    completion.prompt_token_ids = completion.token_ids = completion.topk_ids = None
                    completion.topk_logprobs = completion.token_logprobs = None
            saved += cfg.n * len(chunk_ids[chunk])
            bar.update(completed=saved)

        dtype = cfg.dtype_choice()  # None with backend openai: the server's dtype is its own
        request = SamplingRequest(
            model=model, prompts=prompts, n=cfg.n, seed=out.seed, ids=ids, stop=cfg.stop, chunks=chunks,
            skip_chunks=set(tallies), think_prefix=think.appended, dtype=dtype.dtype if dtype else "auto",
            logprobs=cfg.logprobs, **cfg.request_settings())
        generations = _generate(cfg, request, save, bar, lambda finished: bar.update(completed=saved + finished))
    seconds = time.perf_counter() - started

    from pipeline.text import teacher_logprobs as stored

    samples = _write_samples(cfg, problems, prompts, prompt_texts, think.completion_prefix, chunks,
                             [tallies[chunk] for chunk in range(len(chunks))], out.scratch / "samples.arrow", teacher)
    artifact = out.write_dataset(
        samples, problems=len(problems), **_sample_stats(tallies), chunks=len(chunk_ids), chunks_resumed=resumed,
        **({"logprobs": cfg.logprobs, **stored.dataset_stats(samples, cfg.logprob_dtype)} if cfg.logprobs else {}),
        load_seconds=round(generations.load_seconds, 2), seconds=round(seconds, 2),
        # this run's replicas, nodes, retries and throughput (none when every chunk was resumed)
        **({"ray": generations.ray_stats()} if cfg.engine == "ray" else {}),
    )
    del samples
    (out.scratch / "samples.arrow").unlink(missing_ok=True)  # written into the step's data dir now
    return artifact


def _model_and_prompt_texts(cfg: Config, inputs, prompts: list[list[dict]]):
    """The model the engine loads, the think prefix, and each prompt as the model reads it (None with backend openai:
    the server renders the prompt, and what it appends is its template's business)."""
    from pipeline.core.models import resolve_model
    from pipeline.text import chat

    if cfg.backend != "vllm":
        return cfg.model, chat.ThinkPrefix("", ""), [None] * len(prompts)
    from transformers import AutoTokenizer

    model = resolve_model(cfg.model, inputs)
    tokenizer = AutoTokenizer.from_pretrained(model)
    think = chat.think_prefix(tokenizer, cfg.think_prefix)
    return model, think, [chat.generation_prompt(tokenizer, p) + think.appended for p in prompts]


def _server(cfg: Config):
    from pipeline.engines.openai_client import OpenAIServer

    return OpenAIServer(cfg.base_url, cfg.api_key_env, cfg.max_concurrency, cfg.max_retries, cfg.request_timeout)


def _teacher_identity(cfg: Config, inputs, model: str) -> str:
    """The tokenizer identity the teacher columns record: the sampled model's own with backend vllm; with backend
    openai, that of `tokenizer` or of the path the server reports, checked against the server's tokenizer."""
    from pipeline.core.models import resolve_model
    from pipeline.engines import openai_client
    from pipeline.text import teacher_logprobs as stored

    if cfg.backend == "vllm":
        return stored.model_identity(model, cfg.model)
    tokenizer = resolve_model(cfg.tokenizer, inputs) if cfg.tokenizer else None
    return openai_client.served_tokenizer_identity(_server(cfg), cfg.model, tokenizer, cfg.model)


def _generate(cfg: Config, request, save, bar, on_samples):
    """The request through the engine the config names; `save` gets each finished chunk."""
    from pipeline.engines import openai_client, vllm_local

    if cfg.backend == "openai":
        return openai_client.generate(request, _server(cfg), on_chunk=save)
    if cfg.engine == "ray":
        from pipeline.engines import ray_replicas

        return ray_replicas.generate(request, **cfg.ray_settings(), on_chunk=save, on_phase=bar.phase)
    return vllm_local.generate(request, on_chunk=save, on_phase=bar.phase, on_samples=on_samples)


def _sample_stats(tallies: dict[int, dict]) -> dict:
    """The manifest's token counts, finish reasons and throughput, summed over the chunks' tallies."""
    finish_reasons = sum((tally["finish_reasons"] for tally in tallies.values()), Counter())
    completion_tokens = sum(tally["completion_tokens"] for tally in tallies.values())
    # summed over every run that wrote a shard, so a resumed run reports the whole step's throughput
    generate_seconds = sum(tally["generate_seconds"] for tally in tallies.values())
    return dict(
        # each problem's prompt once
        prompt_tokens=sum(tally["prompt_tokens"] for tally in tallies.values()),
        completion_tokens=completion_tokens,
        # each prompt n times: one request per sample, which is what an API's usage bills
        prompt_tokens_sent=sum(tally["prompt_tokens_sent"] for tally in tallies.values()),
        **{f"finish_{reason}": count for reason, count in sorted(finish_reasons.items())},
        tokens_per_s=round(completion_tokens / generate_seconds, 2) if generate_seconds > 0 else 0.0,
        generate_seconds=round(generate_seconds, 2),
    )


def _read_shards(shard_dir, chunk_ids: list[list[str]], n: int, completion_prefix: str) -> dict[int, dict]:
    """Tallies (`_tally`) of the shards a killed run finished, by chunk index. Shards are renamed into place whole,
    so any that exists is complete; one that does not match this input (ids, n) is ignored and generated again."""
    tallies = {}
    for path in shard_dir.glob("chunk-*.json"):
        try:
            shard = json.loads(path.read_text())
            chunk = shard["chunk"]
        except (OSError, ValueError, KeyError):
            continue
        if (0 <= chunk < len(chunk_ids) and shard["ids"] == chunk_ids[chunk]
                and all(len(per_problem) == n for per_problem in shard["completions"])):
            tallies[chunk] = _tally(path, shard, completion_prefix)
    return tallies


def _tally(path, shard: dict, completion_prefix: str) -> dict:
    """What the step keeps of a chunk's shard until it writes the dataset: where the shard is, its stats, and
    whether it holds a non-null reasoning / finish_reason (a column with none anywhere is typed null, as Arrow
    infers it from all-None values)."""
    from pipeline.text import chat

    completions = [c for per_problem in shard["completions"] for c in per_problem]
    return {"path": path, "generate_seconds": shard["generate_seconds"],
            "prompt_tokens": sum(p[0]["prompt_tokens"] for p in shard["completions"] if p),
            "prompt_tokens_sent": sum(c["prompt_tokens"] for c in completions),
            "completion_tokens": sum(c["completion_tokens"] for c in completions),
            "finish_reasons": Counter(c["finish_reason"] for c in completions),
            "has_finish_reason": any(c["finish_reason"] is not None for c in completions),
            "has_reasoning": any(chat.split_reasoning(completion_prefix + c["text"])[0] is not None
                                 for c in completions)}


def _write_samples(cfg: Config, problems, prompts: list[list[dict]], prompt_texts: list[str | None],
                   completion_prefix: str, chunks: list[range], tallies: list[dict], path, teacher: str | None = None):
    """The samples dataset, written chunk by chunk from the shards into the Arrow file `path` (memory holds one
    chunk's completions) and memory-mapped back: each problem row n times with the `SAMPLE_COLUMNS`, typed as
    Arrow infers them from the whole column's values (null where every value is None, or there are no rows); with
    `logprobs`, the teacher columns of pipeline.text.teacher_logprobs too (`teacher`: the tokenizer's identity)."""
    import pyarrow as pa
    from datasets import Dataset, Features
    from datasets.arrow_writer import ArrowWriter

    from pipeline.text import teacher_logprobs as stored

    n = cfg.n
    rows = n * len(problems)
    has_values = {
        **{column: rows > 0 for column in SAMPLE_COLUMNS},
        "prompt_text": rows > 0 and any(text is not None for text in prompt_texts),
        "reasoning": any(tally["has_reasoning"] for tally in tallies),
        "finish_reason": any(tally["has_finish_reason"] for tally in tallies),
    }
    string, integer = pa.string(), pa.int64()
    types = {"sample_idx": integer, "prompt": pa.list_(pa.struct([("role", string), ("content", string)])),
             "prompt_text": string, "completion": string, "reasoning": string, "response": string,
             "finish_reason": string, "prompt_tokens": integer, "completion_tokens": integer, "model": string,
             "think_prefix": string}
    types = {column: types[column] if has_values[column] else pa.null() for column in SAMPLE_COLUMNS}
    features = Features({**problems.features, **Features.from_arrow_schema(pa.schema(list(types.items()))),
                         **(stored.features(cfg.logprob_dtype) if cfg.logprobs else {})})
    problem_rows = problems.with_format("arrow")

    with ArrowWriter(features=features, path=str(path)) as writer:
        for rows_of_chunk, tally in zip(chunks, tallies):
            if not len(rows_of_chunk):
                continue
            shard = json.loads(tally["path"].read_text())
            completions = [c for per_problem in shard.pop("completions") for c in per_problem]
            del shard
            repeated = [row for row in rows_of_chunk for _ in range(n)]
            arrays = dict(zip(("reasoning", "response"), _split_traces(
                [c["text"] for c in completions], completion_prefix, types["reasoning"], types["response"])))
            columns = {
                "sample_idx": [i for _ in rows_of_chunk for i in range(n)],
                "prompt": [prompts[row] for row in repeated],
                "prompt_text": [prompt_texts[row] for row in repeated],
                "completion": [c["text"] for c in completions],
                "finish_reason": [c["finish_reason"] for c in completions],
                "prompt_tokens": [c["prompt_tokens"] for c in completions],
                "completion_tokens": [c["completion_tokens"] for c in completions],
                "model": [cfg.model] * len(completions),
                "think_prefix": [completion_prefix] * len(completions),
            }
            if cfg.logprobs:
                arrays.update(stored.arrow_columns(
                    [c["prompt_token_ids"] for c in completions], [c["token_ids"] for c in completions],
                    [c["topk_ids"] for c in completions], [c["topk_logprobs"] for c in completions],
                    [c["token_logprobs"] for c in completions], teacher, cfg.logprob_dtype))
            del completions
            arrays.update((column, pa.array(values, type=types[column])) for column, values in columns.items())
            del columns
            table = problem_rows[repeated]
            for column in SAMPLE_COLUMNS + (stored.TEACHER_COLUMNS if cfg.logprobs else ()):
                table = table.append_column(column, arrays.pop(column))
            writer.write_table(table)
            del table
        writer.finalize()
    return Dataset.from_file(str(path))


def _split_traces(traces: list[str], completion_prefix: str, reasoning_type, response_type):
    """Arrow arrays of the traces' reasoning and response (`pipeline.text.chat.split_reasoning`), each trace's reasoning
    copied into Arrow as it is split (pa.array holds every item of a list or iterator until it is done), so Python
    holds the copies of one trace at a time."""
    import pyarrow as pa

    from pipeline.text import chat

    reasonings, responses = [], []
    for trace in traces:
        reasoning, response = chat.split_reasoning(completion_prefix + trace)
        reasonings.append(pa.array([reasoning], type=reasoning_type))
        responses.append(response)  # short, or the trace itself (no think span)
        del reasoning  # before the next trace's split
    return pa.concat_arrays(reasonings), pa.array(responses, type=response_type)


def _check_columns(cfg: Config, columns: list[str]) -> None:
    if "problem" not in columns:
        raise UserError(f"sample: dataset {cfg.input!r} has no 'problem' column (columns: {columns})")
    from pipeline.text.teacher_logprobs import TEACHER_COLUMNS

    clashes = [c for c in SAMPLE_COLUMNS + (TEACHER_COLUMNS if cfg.logprobs else ()) if c in columns]
    if clashes:
        raise UserError(f"sample: dataset {cfg.input!r} already has column(s) {clashes}, which sampling writes; "
                        "drop or rename them in the load step")
