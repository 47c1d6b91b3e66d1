"""`backend: openai` of the `sample` step: `generate(request, server)` asks an OpenAI-compatible server (`vllm serve`,
a hosted API) for the request's samples through its chat completions endpoint, with the local engine's contract
(`pipeline.engines.request`: samples per prompt, per-sample seeds, chunks, skipped chunks, `on_chunk`).

Each sample is its own request (n = 1), so `usage` gives each sample's token counts, and each carries the seed
`sample_seed(seed, problem id, sample index)`; servers treat seeds as best effort, and batch our requests with
whatever else they serve. Reasoning the server returns apart from the content is kept in the completion
(`completion_text`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from pipeline.core.errors import UserError
from pipeline.engines.request import ChunkPlan, Completion, Generations, OnChunk, SamplingRequest, sample_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenAIServer:
    """Where the requests go and how: the server's API root (e.g. http://localhost:8000/v1); the environment variable
    holding the API key (None: a server without authentication), read only for the request header; at most
    `max_concurrency` requests in flight; the openai client's retries of connection errors, 408, 409, 429 and 5xx
    responses (exponential back-off, honouring Retry-After); and the seconds one request may take."""

    base_url: str
    api_key_env: str | None = "OPENAI_API_KEY"
    max_concurrency: int = 8
    max_retries: int = 5
    request_timeout: float = 600.0


def generate(request: SamplingRequest, server: OpenAIServer, *, on_chunk: OnChunk | None = None) -> Generations:
    """Sample `request.n` completions for each chat prompt from `server`. A chunk's seconds (for `on_chunk`) are the
    wall time since the previous chunk finished, so they add up to the run's wall time although requests of several
    chunks overlap. The request's vLLM engine settings (think prefix, dtype, ...) are the server's business."""
    plan = request.plan()
    if not request.prompts:
        return Generations()
    if server.api_key_env is not None and not os.environ.get(server.api_key_env):
        raise UserError(f"sample: environment variable {server.api_key_env} (api_key_env) is not set; it must hold "
                        f"the API key for {server.base_url}")
    completions: list[list[Completion]] = [[] for _ in request.prompts]
    if not plan.todo:
        return Generations(completions)
    import asyncio

    import openai

    logger.info("requesting %d completions for %d prompts of %s from %s", sum(plan.counts), len(request.prompts),
                request.model, server.base_url)
    try:
        generate_seconds = asyncio.run(_request_all(request, plan, server, completions, on_chunk))
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError, openai.BadRequestError,
            openai.APIConnectionError) as error:  # APIConnectionError: also a request past request_timeout
        raise _refused(error, request.model, server) from None
    return Generations(completions, generate_seconds=generate_seconds)


async def _request_all(request: SamplingRequest, plan: ChunkPlan, server: OpenAIServer,
                       completions: list[list[Completion]], on_chunk: OnChunk | None) -> float:
    """Request every sample of the chunks to generate, filling `completions` and calling `on_chunk` as each chunk's
    samples are all back; the seconds it all took."""
    import asyncio

    import openai

    settings = _chat_settings(request)
    client = openai.AsyncOpenAI(base_url=server.base_url,
                                api_key=os.environ[server.api_key_env] if server.api_key_env else "none",
                                max_retries=server.max_retries, timeout=server.request_timeout)
    in_flight = asyncio.Semaphore(server.max_concurrency)
    started = last_finished = time.perf_counter()

    async def one(prompt: int, sample: int) -> Completion:
        async with in_flight:
            response = await client.chat.completions.create(
                messages=request.prompts[prompt], seed=sample_seed(request.seed, plan.ids[prompt], sample), **settings)
        return _completion(response)

    async def one_chunk(chunk: int) -> None:
        nonlocal last_finished
        rows = plan.chunks[chunk]
        samples = iter(await asyncio.gather(*(one(p, k) for p in rows for k in range(plan.counts[p]))))
        per_prompt = [[next(samples) for _ in range(plan.counts[p])] for p in rows]
        completions[rows.start:rows.stop] = per_prompt
        now = time.perf_counter()
        seconds, last_finished = now - last_finished, now
        if on_chunk is not None:
            on_chunk(chunk, per_prompt, seconds)

    async with client:
        # the semaphore hands out slots in request order, so chunks finish (and are saved) about in order
        await asyncio.gather(*(one_chunk(chunk) for chunk in plan.todo))
    return time.perf_counter() - started


def _chat_settings(request: SamplingRequest) -> dict:
    """The chat completions arguments every sample's request shares."""
    return dict(model=request.model, n=1, temperature=request.temperature, top_p=request.top_p,
                max_tokens=request.max_tokens, stop=request.stop,
                # top_k is not in the OpenAI API: sent only when set, for servers that take it (vLLM does)
                extra_body={"top_k": request.top_k} if request.top_k != -1 else None)


def _completion(response) -> Completion:
    choice, usage = response.choices[0], response.usage
    return Completion(text=completion_text(choice.message, choice.finish_reason), finish_reason=choice.finish_reason,
                      prompt_tokens=usage.prompt_tokens if usage else 0,
                      completion_tokens=usage.completion_tokens if usage else 0)


def _refused(error, model: str, server: OpenAIServer) -> UserError:
    """What to tell the user about an error the server (or the way to it) answered with."""
    import openai

    base_url = server.base_url
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return UserError(f"sample: the server at {base_url} refused the API key from ${server.api_key_env} "
                         f"(HTTP {error.status_code})")
    if isinstance(error, openai.NotFoundError):
        return UserError(f"sample: the server at {base_url} has no model {model!r} or no chat completions "
                         f"endpoint (HTTP 404: {error.message})")
    if isinstance(error, openai.BadRequestError):
        return UserError(f"sample: the server at {base_url} refused the request (HTTP 400): {error.message}")
    return UserError(f"sample: could not reach an OpenAI-compatible server at {base_url} after "
                     f"{server.max_retries} retries: {error}")


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
