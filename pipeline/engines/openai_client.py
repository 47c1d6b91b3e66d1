"""`backend: openai` of the `sample` step: `generate(request, server)` asks an OpenAI-compatible server (`vllm serve`,
a hosted API) for the request's samples through its chat completions endpoint, with the local engine's contract
(`pipeline.engines.request`: samples per prompt, per-sample seeds, chunks, skipped chunks, `on_chunk`).

Each sample is its own request (n = 1), so `usage` gives each sample's token counts, and each carries the seed
`sample_seed(seed, problem id, sample index)`; servers treat seeds as best effort, and batch our requests with
whatever else they serve. Reasoning the server returns apart from the content is kept in the completion
(`completion_text`).

With the request's `logprobs: K` each request also asks for the top log-probs of every completion token, with the
tokens as ids (vLLM's `return_tokens_as_token_ids`: "token_id:123") and the prompt's token ids (vLLM's
`return_token_ids`), which fill the same `Completion` fields as the local engine (`with_logprobs`). vLLM's chat reply
lists the sampled token first among a position's top log-probs (vllm/logprobs.py puts it ahead of the top K, and the
chat server keeps the first K entries), so a sampled token outside the top K would push the K-th out: each request
asks for K + 1 and keeps the K most likely, which needs `vllm serve --max-logprobs` of at least K + 1 (its default,
20, allows K up to 19). A server that returns no log-probs, no token ids or fewer than K + 1 entries is refused,
naming it: the columns are never stored partly or from token text. `served_tokenizer_identity` finds the tokenizer
behind the served name and checks it against the server's own (`/tokenize`), for the columns' tokenizer identity.
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
    api_key = _api_key(server)
    completions: list[list[Completion]] = [[] for _ in request.prompts]
    if not plan.todo:
        return Generations(completions)
    import asyncio

    import openai

    logger.info("requesting %d completions for %d prompts of %s from %s", sum(plan.counts), len(request.prompts),
                request.model, server.base_url)
    try:
        generate_seconds = asyncio.run(_request_all(request, plan, server, api_key, completions, on_chunk))
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError, openai.BadRequestError,
            openai.APIConnectionError) as error:  # APIConnectionError: also a request past request_timeout
        raise _refused(error, request.model, server, request.logprobs) from None
    return Generations(completions, generate_seconds=generate_seconds)


# Text whose token ids the local tokenizer and the server's must agree on (with the tokenizer's special tokens added).
TOKENIZER_PROBE = "Distillation check: 12 + 30 = 42. Émile's naïve café, 東京, \\boxed{7}\n\t  done."


def served_tokenizer_identity(server: OpenAIServer, model: str, tokenizer_path: str | None, name: str) -> str:
    """`pipeline.text.teacher_logprobs.tokenizer_identity` of the tokenizer behind the served `model`: the one at
    `tokenizer_path` (a local dir or hub id), else the one at the path the server reports loading (`/v1/models`'
    `root`, readable here when the server runs on this machine). Checked against the server's own tokenizer through
    vLLM's `/tokenize` of a probe text; UserError naming the server when it cannot be found, loaded or checked, or
    when the two tokenize differently."""
    import httpx
    from transformers import AutoTokenizer

    from pipeline.text.teacher_logprobs import tokenizer_identity

    base_url = server.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {_api_key(server)}"}
    where = f"sample: logprobs with backend openai records the teacher's tokenizer, and the server at {base_url}"
    try:
        if tokenizer_path is None:
            served = httpx.get(f"{base_url}/models", headers=headers, timeout=30).raise_for_status().json()["data"]
            entry = next((m for m in served if m.get("id") == model), None)
            if entry is None or not entry.get("root"):
                raise UserError(f"{where} names no path for model {model!r} in its /v1/models; set `tokenizer:` to "
                                "the served model's tokenizer (builtin:NAME, step:NAME, a local dir or a hub id)")
            tokenizer_path = entry["root"]
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        except (OSError, ValueError) as error:
            raise UserError(f"{where} serves {model!r} from {tokenizer_path!r}, where this machine finds no "
                            f"tokenizer ({type(error).__name__}); set `tokenizer:` to the served model's tokenizer "
                            "(builtin:NAME, step:NAME, a local dir or a hub id)") from None
        specials = [token for token in dict.fromkeys(tokenizer.all_special_tokens) if token]
        probe = TOKENIZER_PROBE + "".join(specials)
        answer = httpx.post(f"{base_url.removesuffix('/v1')}/tokenize", headers=headers, timeout=30,
                            json={"model": model, "prompt": probe, "add_special_tokens": False})
        served_ids = answer.raise_for_status().json()["tokens"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
        what = (f"HTTP {error.response.status_code} from {error.request.url}"
                if isinstance(error, httpx.HTTPStatusError) else f"{type(error).__name__}: {error}")
        raise UserError(f"{where} could not be asked for its tokenizer ({what}); logprobs with backend openai needs "
                        "a vLLM server (its /v1/models and /tokenize)") from None
    if served_ids != tokenizer.encode(probe, add_special_tokens=False):
        raise UserError(f"{where} tokenizes a probe text differently from the tokenizer at {tokenizer_path!r}; set "
                        "`tokenizer:` to the served model's own tokenizer")
    return tokenizer_identity(tokenizer, name)


def _api_key(server: OpenAIServer) -> str:
    """The API key from the environment variable the server's settings name ("none": a server without one)."""
    if server.api_key_env is None:
        return "none"
    if not os.environ.get(server.api_key_env):
        raise UserError(f"sample: environment variable {server.api_key_env} (api_key_env) is not set; it must hold "
                        f"the API key for {server.base_url}")
    return os.environ[server.api_key_env]


async def _request_all(request: SamplingRequest, plan: ChunkPlan, server: OpenAIServer, api_key: str,
                       completions: list[list[Completion]], on_chunk: OnChunk | None) -> float:
    """Request every sample of the chunks to generate, filling `completions` and calling `on_chunk` as each chunk's
    samples are all back; the seconds it all took."""
    import asyncio

    import openai

    settings = _chat_settings(request)
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=api_key, max_retries=server.max_retries,
                                timeout=server.request_timeout)
    in_flight = asyncio.Semaphore(server.max_concurrency)
    started = last_finished = time.perf_counter()

    async def one(prompt: int, sample: int) -> Completion:
        async with in_flight:
            response = await client.chat.completions.create(
                messages=request.prompts[prompt], seed=sample_seed(request.seed, plan.ids[prompt], sample), **settings)
        return _completion(response, request.logprobs, server.base_url)

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
    # top_k is not in the OpenAI API: sent only when set, for servers that take it (vLLM does)
    extra_body = {"top_k": request.top_k} if request.top_k != -1 else {}
    logprobs = {}
    if request.logprobs:
        # K + 1: vLLM's chat reply lists the sampled token first, which can push the K-th most likely out
        logprobs = {"logprobs": True, "top_logprobs": request.logprobs + 1}
        extra_body |= {"return_tokens_as_token_ids": True, "return_token_ids": True}
    return dict(model=request.model, n=1, temperature=request.temperature, top_p=request.top_p,
                max_tokens=request.max_tokens, stop=request.stop, extra_body=extra_body or None, **logprobs)


def _completion(response, k: int | None = None, base_url: str = "") -> Completion:
    choice, usage = response.choices[0], response.usage
    completion = Completion(text=completion_text(choice.message, choice.finish_reason),
                            finish_reason=choice.finish_reason, prompt_tokens=usage.prompt_tokens if usage else 0,
                            completion_tokens=usage.completion_tokens if usage else 0)
    if k:
        with_logprobs(completion, response, k, base_url)
    return completion


TOKEN_ID_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids


def with_logprobs(completion: Completion, response, k: int, base_url: str) -> None:
    """Fill `completion`'s prompt and completion token ids, top-K ids and log-probs (most likely first) and sampled
    token log-probs from a chat reply asked for K + 1 top log-probs as token ids; UserError naming the server and
    what it left out when the reply cannot give them."""
    choice = response.choices[0]
    content = choice.logprobs.content if choice.logprobs is not None else None
    prompt_ids = (response.model_extra or {}).get("prompt_token_ids")
    where = f"sample: logprobs: {k} with backend openai: the server at {base_url}"
    if content is None:
        raise UserError(f"{where} returned no log-probs (asked with logprobs: true, top_logprobs: {k + 1}); use a "
                        "vLLM server (`vllm serve`), or backend vllm, or `score` the samples afterwards")
    if prompt_ids is None:
        raise UserError(f"{where} returned no prompt_token_ids (vLLM's return_token_ids): the stored columns need "
                        "the prompt's token ids; use a vLLM server, or backend vllm")

    def token_id(token: str) -> int:
        if not token.startswith(TOKEN_ID_PREFIX) or not token[len(TOKEN_ID_PREFIX):].isdigit():
            raise UserError(f"{where} returned the token {token!r} as text, not as an id (vLLM's "
                            "return_tokens_as_token_ids gives 'token_id:123'): the stored columns need token ids; "
                            "use a vLLM server, or backend vllm")
        return int(token[len(TOKEN_ID_PREFIX):])

    token_ids, topk_ids, topk_logprobs, token_logprobs = [], [], [], []
    for position, entry in enumerate(content):
        token_ids.append(token_id(entry.token))
        token_logprobs.append(entry.logprob)
        if len(entry.top_logprobs) < k + 1:
            raise UserError(f"{where} returned {len(entry.top_logprobs)} top log-probs at completion token "
                            f"{position} where {k + 1} were asked (K + 1: the reply lists the sampled token first); "
                            f"start it with `--max-logprobs {k + 1}` or more, or use a smaller logprobs")
        # the K most likely of the K + 1 (sorted stably: ties keep the server's order)
        top = sorted(((token_id(t.token), t.logprob) for t in entry.top_logprobs), key=lambda item: -item[1])[:k]
        topk_ids.append([token for token, _ in top])
        topk_logprobs.append([logprob for _, logprob in top])
    served_ids = (choice.model_extra or {}).get("token_ids")
    if served_ids is not None and list(served_ids) != token_ids:
        raise UserError(f"{where} returned {len(served_ids)} token_ids that differ from its {len(token_ids)} "
                        "log-prob tokens; the reply is inconsistent")
    completion.prompt_token_ids = list(prompt_ids)
    completion.token_ids, completion.token_logprobs = token_ids, token_logprobs
    completion.topk_ids, completion.topk_logprobs = topk_ids, topk_logprobs


def _refused(error, model: str, server: OpenAIServer, logprobs: int | None = None) -> UserError:
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
        hint = (f" (logprobs: {logprobs} asks for top_logprobs {logprobs + 1}, which `vllm serve` allows from "
                f"--max-logprobs {logprobs + 1})" if logprobs and "logprob" in str(error.message) else "")
        return UserError(f"sample: the server at {base_url} refused the request (HTTP 400): {error.message}{hint}")
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
