"""Offline generation with vLLM, shared by the `sample` and `evaluate` steps.

Each `generate` call runs its vLLM engine in a fresh spawned process and returns plain Python
objects. vLLM starts engine processes of its own and does not reliably give back memory when an
`LLM` is deleted, so a child process that exits is the one teardown that always works: an evaluate
step can generate with three models in a row without their weights or KV caches piling up.
Inside that process vLLM runs with the defaults in `_engine_env_defaults` (in-process engine core,
2 GiB CPU KV cache, all cores, quiet logs); setting any of those variables yourself overrides it.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
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
) -> Generations:
    """Sample `n` completions for each chat prompt with vLLM; same seed and inputs give the same outputs.

    `model` is a resolved local dir (or hub id). Each prompt is a list of chat messages rendered with
    the model's own chat template, generation prompt added, then `think_prefix` appended (e.g.
    "<think>\\n"); the completion text does not include the prefix.
    """
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    import multiprocessing

    if not prompts:
        return Generations()
    request = dict(
        model=model, prompts=prompts, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
        max_tokens=max_tokens, seed=seed, stop=stop, max_model_len=max_model_len, dtype=dtype,
        think_prefix=think_prefix, tensor_parallel_size=tensor_parallel_size,
    )
    logger.info("generating %d x %d completions with %s", len(prompts), n, model)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(_generate_in_this_process, **request).result()
        except BrokenProcessPool as err:
            raise RuntimeError(
                f"the vLLM process for {model} died (out of memory? try a smaller max_model_len, "
                "or VLLM_CPU_KVCACHE_SPACE in GiB on CPU)"
            ) from err


def _generate_in_this_process(
    *, model, prompts, n, temperature, top_p, top_k, max_tokens, seed, stop, max_model_len, dtype,
    think_prefix, tensor_parallel_size,
) -> Generations:
    """The body of `generate`, run inside the spawned child process."""
    for name, value in _engine_env_defaults().items():
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
        tensor_parallel_size=tensor_parallel_size, enforce_eager=_on_cpu(),
    )
    try:
        tokenizer = llm.get_tokenizer()
        token_prompts = [TokensPrompt(prompt_token_ids=_render(tokenizer, m, think_prefix)) for m in prompts]
        loaded = time.perf_counter()
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop,
        )
        outputs = llm.generate(token_prompts, params, use_tqdm=True)
        finished = time.perf_counter()
    finally:
        # Stop the engine now. If it runs in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1),
        # leaving it to exit handlers deadlocks: this process waits for the engine, the engine for it.
        llm.llm_engine.engine_core.shutdown()

    completions = [
        [
            Completion(
                text=sample.text,
                finish_reason=sample.finish_reason,
                prompt_tokens=len(output.prompt_token_ids),
                completion_tokens=len(sample.token_ids),
            )
            for sample in output.outputs
        ]
        for output in outputs
    ]
    return Generations(completions, load_seconds=loaded - started, generate_seconds=finished - loaded)


def _engine_env_defaults() -> dict[str, str]:
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
        "OMP_NUM_THREADS": str(_usable_cores()),
        # vLLM logs each engine detail, and a dtype warning per weight; errors still surface as exceptions.
        "VLLM_LOGGING_LEVEL": "ERROR",
    }


def _render(tokenizer, messages: list[dict], think_prefix: str) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + think_prefix
    # The template already wrote any special tokens (bos, role markers); don't let the tokenizer add more.
    return tokenizer(text, add_special_tokens=False).input_ids


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _on_cpu() -> bool:
    # Compiling the model (torch.compile + inductor) costs minutes on CPU and pays back only on long
    # runs; on a GPU vLLM's default (compile + CUDA graphs) is the fast path.
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
