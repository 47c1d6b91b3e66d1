"""Offline generation with vLLM, shared by the `sample` and `evaluate` steps.

Each `generate` call runs its vLLM engine in a fresh spawned process and returns plain Python
objects. vLLM starts engine processes of its own and does not reliably give back memory when an
`LLM` is deleted, so a child process that exits is the one teardown that always works: an evaluate
step can generate with three models in a row without their weights or KV caches piling up.
Inside that process vLLM runs with the defaults in `engine_env_defaults` (in-process engine core,
2 GiB CPU KV cache, all cores, quiet logs); setting any of those variables yourself overrides it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass

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
    n: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = -1,
    max_tokens: int,
    seed: int,
    stop: list[str] | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    think_prefix: str = "",
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    distributed_executor_backend: str | None = None,
    chunk_size: int | None = None,
    skip_chunks: Collection[int] = (),
    on_chunk: Callable[[int, list[list[Completion]], float], None] | None = None,
) -> Generations:
    """Sample `n` completions for each chat prompt with vLLM; same seed and inputs give the same outputs.

    `model` is a resolved local dir (or hub id). Each prompt is a list of chat messages rendered with
    the model's own chat template, generation prompt added, then `think_prefix` appended (e.g.
    "<think>\\n"); the completion text does not include the prefix.

    `tensor_parallel_size`, `data_parallel_size` and `distributed_executor_backend` ("mp", "ray", ...) go to
    `vllm.LLM` as they are.

    Chunked (resumable) generation: with `chunk_size`, prompts are generated in chunks of that many,
    chunk c = prompts[c * chunk_size:(c + 1) * chunk_size], on one engine. Before each chunk the
    sampling RNG is re-seeded from (seed, c), so a chunk's samples depend only on the seed, the chunk
    index and the chunk's prompts: a run that skips finished chunks (`skip_chunks`) and generates the
    rest on a fresh engine gives the samples an uninterrupted run would have. `on_chunk(c, completions,
    seconds)` is called in this process as each chunk finishes; the returned list holds [] for the
    prompts of skipped chunks.
    """
    if not prompts:
        return Generations()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    size = chunk_size or len(prompts)
    skip = set(skip_chunks)
    chunks = [c for c in range(-(-len(prompts) // size)) if c not in skip]
    request = dict(
        model=model, prompts=prompts, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
        max_tokens=max_tokens, seed=seed, stop=stop, max_model_len=max_model_len, dtype=dtype,
        think_prefix=think_prefix, tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
        distributed_executor_backend=distributed_executor_backend,
        chunks=chunks, chunk_size=size, reseed=chunk_size is not None,
    )
    completions: list[list[Completion]] = [[] for _ in prompts]
    if not chunks:
        return Generations(completions)
    logger.info("generating %d x %d completions with %s", len(prompts), n, model)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    parent_conn, child_conn = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(child_conn, os.getpid(), request))
    process.start()
    child_conn.close()
    try:
        while True:
            try:
                kind, *payload = parent_conn.recv()
            except EOFError:
                raise RuntimeError(
                    f"the vLLM process for {model} died (out of memory? try a smaller max_model_len, "
                    "or VLLM_CPU_KVCACHE_SPACE in GiB on CPU)"
                ) from None
            if kind == "chunk":
                chunk, chunk_completions, seconds = payload
                completions[chunk * size:chunk * size + len(chunk_completions)] = chunk_completions
                if on_chunk is not None:
                    on_chunk(chunk, chunk_completions, seconds)
            elif kind == "error":
                raise payload[0]
            else:  # done
                load_seconds, generate_seconds = payload
                return Generations(completions, load_seconds=load_seconds, generate_seconds=generate_seconds)
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        parent_conn.close()


def _child_main(conn, parent_pid: int, request: dict) -> None:
    """Entry point of the spawned engine process: stream ("chunk", ...) messages, then ("done", ...)."""
    _die_with_parent(parent_pid)
    try:
        _generate_in_this_process(conn, **request)
    except BaseException as error:  # noqa: BLE001 -- handed to the parent, which re-raises it
        try:
            conn.send(("error", error))
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


def _reseed_worker(worker, seed: int) -> None:
    """Run on each vLLM worker through `collective_rpc`: re-seed the RNGs its sampler draws from."""
    from vllm.utils.torch_utils import set_random_seed

    set_random_seed(seed)


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk `chunk` of a run seeded `seed` (distinct across both)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}".encode()).digest()[:4], "little")


def _generate_in_this_process(
    conn, *, model, prompts, n, temperature, top_p, top_k, max_tokens, seed, stop, max_model_len, dtype,
    think_prefix, tensor_parallel_size, data_parallel_size, distributed_executor_backend, chunks, chunk_size, reseed,
) -> None:
    """The body of `generate`, run inside the spawned child process."""
    for name, value in engine_env_defaults().items():
        os.environ.setdefault(name, value)
    # vLLM's import trips torch deprecation warnings that say nothing to a pipeline user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    # The engine is seeded, not each request: per-request seeds fail on vLLM's CPU backend, and an
    # engine seed with a fixed batch already makes the run reproducible.
    llm = LLM(
        model=model, seed=seed, dtype=dtype, max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
        distributed_executor_backend=distributed_executor_backend, enforce_eager=_on_cpu(),
    )
    generate_seconds = 0.0
    try:
        tokenizer = llm.get_tokenizer()
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop,
        )
        load_seconds = time.perf_counter() - started
        for chunk in chunks:
            chunk_prompts = prompts[chunk * chunk_size:(chunk + 1) * chunk_size]
            token_prompts = [TokensPrompt(prompt_token_ids=_render(tokenizer, m, think_prefix)) for m in chunk_prompts]
            if reseed:
                llm.collective_rpc(_reseed_worker, args=(chunk_seed(seed, chunk),))
            chunk_started = time.perf_counter()
            outputs = llm.generate(token_prompts, params, use_tqdm=len(chunks) == 1)
            seconds = time.perf_counter() - chunk_started
            generate_seconds += seconds
            conn.send(("chunk", chunk, [_completions(output) for output in outputs], seconds))
    finally:
        # Stop the engine now. If it runs in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1),
        # leaving it to exit handlers deadlocks: this process waits for the engine, the engine for it.
        llm.llm_engine.engine_core.shutdown()
    conn.send(("done", load_seconds, generate_seconds))


def _completions(output) -> list[Completion]:
    return [
        Completion(
            text=sample.text,
            finish_reason=sample.finish_reason,
            prompt_tokens=len(output.prompt_token_ids),
            completion_tokens=len(sample.token_ids),
        )
        for sample in output.outputs
    ]


def engine_env_defaults() -> dict[str, str]:
    """Environment for the engine process; a variable the user has set wins."""
    return {
        # Run vLLM's engine core inside this (already dedicated) process instead of yet another one:
        # requests are then all queued before the first step, so batches -- and with an engine seed,
        # the samples -- are the same on every run (with a separate engine process they were not),
        # and start-up is ~25 s shorter on CPU.
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
    n: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = -1,
    max_tokens: int,
    seed: int,
    stop: list[str] | None = None,
    api_key_env: str | None = "OPENAI_API_KEY",
    max_concurrency: int = 8,
    max_retries: int = 5,
    request_timeout: float = 600.0,
    chunk_size: int | None = None,
    skip_chunks: Collection[int] = (),
    on_chunk: Callable[[int, list[list[Completion]], float], None] | None = None,
) -> Generations:
    """Sample `n` completions for each chat prompt from an OpenAI-compatible server (`vllm serve`, a hosted API)
    through its chat completions endpoint; same chunk contract (`chunk_size`, `skip_chunks`, `on_chunk`) as
    `generate`.

    Each sample is its own request (n = 1), so `usage` gives each sample's token counts, and each carries a
    seed from (seed, prompt index, sample index); servers treat seeds as best effort. At most
    `max_concurrency` requests are in flight; the openai client retries connection errors, 408, 409, 429 and
    5xx responses up to `max_retries` times with exponential back-off (honouring Retry-After). The API key is
    read from the environment variable `api_key_env` (None: a server without authentication) and goes
    nowhere but the request header. A chunk's seconds are the wall time since the previous chunk finished,
    so they add up to the run's wall time although requests of several chunks overlap.
    """
    from pipeline.errors import UserError

    if not prompts:
        return Generations()
    if api_key_env is not None and not os.environ.get(api_key_env):
        raise UserError(f"sample: environment variable {api_key_env} (api_key_env) is not set; it must hold the "
                        f"API key for {base_url}")
    size = chunk_size or len(prompts)
    skip = set(skip_chunks)
    chunks = [c for c in range(-(-len(prompts) // size)) if c not in skip]
    completions: list[list[Completion]] = [[] for _ in prompts]
    if not chunks:
        return Generations(completions)
    import asyncio

    import openai

    logger.info("requesting %d x %d completions of %s from %s", len(prompts), n, model, base_url)
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
                    messages=prompts[prompt], seed=chunk_seed(seed, prompt * n + sample), **settings)
            choice, usage = response.choices[0], response.usage
            return Completion(text=choice.message.content or "", finish_reason=choice.finish_reason,
                              prompt_tokens=usage.prompt_tokens if usage else 0,
                              completion_tokens=usage.completion_tokens if usage else 0)

        async def one_chunk(chunk: int) -> None:
            nonlocal last_finished
            rows = range(chunk * size, min(len(prompts), (chunk + 1) * size))
            samples = await asyncio.gather(*(one(p, k) for p in rows for k in range(n)))
            per_prompt = [samples[i * n:(i + 1) * n] for i in range(len(rows))]
            completions[rows.start:rows.stop] = per_prompt
            now = time.perf_counter()
            seconds, last_finished = now - last_finished, now
            if on_chunk is not None:
                on_chunk(chunk, per_prompt, seconds)

        async with client:
            # the semaphore hands out slots in request order, so chunks finish (and are saved) about in order
            await asyncio.gather(*(one_chunk(chunk) for chunk in chunks))
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
