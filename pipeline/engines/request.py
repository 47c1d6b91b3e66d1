"""What every engine is asked and what it gives back: `SamplingRequest` (one generation job: prompts, model, samples
per prompt, sampling settings, seed, chunks), `Completion` and `Generations`; and the two rules every engine keeps:
each sample's own seed (`sample_seed`) and chunks cut per group of prompts (`chunk_ranges`).

The engines (`pipeline.engines.vllm_local`, `pipeline.engines.ray_replicas`, `pipeline.engines.openai_client`) each
take a request and hand each finished chunk to the caller's `on_chunk`, so a step saves the same shards and resumes
the same way whatever the engine.

Determinism: every sample is its own request to the model (n = 1) with its own seed, `sample_seed(seed, problem id,
sample index)`, so the random draws behind sample k of a problem are the same whatever else is generated: other
problems, their number, their order, the chunking, n, or an interrupted and resumed run. What can still change a
sample is arithmetic (see `pipeline.engines.vllm_local`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_tokens or max_model_len)
    prompt_tokens: int
    completion_tokens: int
    # With a request's `logprobs: K` (local vLLM, or the openai backend against a vLLM server), per completion
    # token: the prompt's and the completion's token ids, the model's K most likely tokens and their log-probs (most
    # likely first) and the sampled token's log-prob (the columns of pipeline.text.teacher_logprobs). None otherwise.
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    token_logprobs: list[float] | None = None


# on_chunk(chunk index, its completions per prompt, the seconds it took), called in the caller's process as the chunk
# finishes
OnChunk = Callable[[int, list[list[Completion]], float], None]


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


@dataclass
class SamplingRequest:
    """`n` completions for each chat prompt, as every engine's `generate(request, ...)` takes them.

    Each prompt is a list of chat messages. Sample k of prompt p is drawn with the seed `sample_seed(seed, ids[p], k)`;
    `ids` are the problems' ids (default: the prompts' positions), so a problem's samples do not depend on the other
    prompts.

    Chunked (resumable) generation: `chunks` are ranges of prompt positions (default: one chunk of all, see
    `chunk_ranges`), each generated as one batch. Chunks in `skip_chunks` (finished by an earlier run) are not
    generated; an engine returns [] for their prompts.
    """

    model: str  # a resolved local dir or hub id; for an OpenAI-compatible server, the name it serves
    prompts: list[list[dict]]
    n: int | Sequence[int]  # one count for every prompt, or one per prompt
    seed: int
    temperature: float
    max_tokens: int
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] | None = None
    ids: Sequence[str] | None = None
    chunks: Sequence[range] | None = None
    skip_chunks: Collection[int] = ()
    # The vLLM engine's (local or Ray replicas; a server has its own): text appended after the chat template's
    # generation prompt (e.g. "<think>\n", part of the prompt, not of the completion), and the `vllm.LLM` settings,
    # passed as they are (distributed_executor_backend: "mp", "ray", ...).
    think_prefix: str = ""
    dtype: str = "auto"
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    logprobs: int | None = None  # top-K log-probs per completion token (see Completion)

    def plan(self) -> ChunkPlan:
        """Samples per prompt, problem ids, chunks, and the chunks to generate; refused (ValueError) when the
        counts or ids do not match the prompts."""
        counts = [self.n] * len(self.prompts) if isinstance(self.n, int) else list(self.n)
        ids = [str(i) for i in range(len(self.prompts))] if self.ids is None else [str(i) for i in self.ids]
        if len(counts) != len(self.prompts) or len(ids) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(counts)} sample counts and {len(ids)} ids")
        chunks = [range(len(self.prompts))] if self.chunks is None else list(self.chunks)
        skip = set(self.skip_chunks)
        todo = [c for c, rows in enumerate(chunks) if c not in skip and len(rows)]
        return ChunkPlan(self.prompts, counts, ids, chunks, todo)


@dataclass(frozen=True)
class ChunkPlan:
    """A request's prompts, samples per prompt, problem ids (as text), chunks, and the chunks to generate (neither
    skipped nor empty), in order."""

    prompts: list[list[dict]]
    counts: list[int]
    ids: list[str]
    chunks: list[range]
    todo: list[int]

    def chunk(self, chunk: int) -> tuple[list[list[dict]], list[str], list[int]]:
        """The prompts, problem ids and sample counts of chunk `chunk`, as an engine generates it."""
        rows = self.chunks[chunk]
        return [self.prompts[p] for p in rows], [self.ids[p] for p in rows], [self.counts[p] for p in rows]


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
