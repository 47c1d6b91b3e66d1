"""Scoring given token sequences with a local vLLM teacher: `top_k_logprobs` runs the model over each whole sequence
once (vLLM's `prompt_logprobs`, no generation) and returns, for every position from a given start on, the teacher's K
most likely tokens with their log-probs and the log-prob of the token that is there. The `score` step turns them into
the stored teacher columns (`pipeline.text.teacher_logprobs`).

As with generation (`pipeline.engines.vllm_local`), vLLM runs in a spawned child process that exits when done, so its
memory always comes back. Prefix caching is off: a cached prefix gets no prompt log-probs computed. The log-probs are
vLLM's raw ones: the model's own distribution at temperature 1, before any sampling setting.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.engines.vllm_local import EngineDied, _die_with_parent, _on_cpu, engine_env_defaults

MAX_K = 20  # vLLM's default cap on log-probs per position (max_logprobs)


@dataclass
class ScoredSequence:
    """Per scored position i (the token at start + i): the top-K ids [T, K], their log-probs [T, K] (most likely
    first) and the log-prob of the token there [T], as numpy arrays."""

    topk_ids: object
    topk_logprobs: object
    token_logprobs: object


def top_k_logprobs(model: str, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int, *,
                   dtype: str = "auto", max_model_len: int | None = None,
                   batch_size: int = 64) -> tuple[list[ScoredSequence], float]:
    """Each sequence's positions from `starts[i]` on, scored by `model` (a local dir or hub id): see `ScoredSequence`.
    Returns them and the seconds the engine took to start."""
    import multiprocessing

    if not 1 <= k <= MAX_K:
        raise ValueError(f"top-K log-probs: K must be 1..{MAX_K}, got {k}")
    if any(not 1 <= start < len(sequence) for sequence, start in zip(sequences, starts)):
        raise ValueError("every scored sequence needs at least one token before its first scored position and one "
                         "scored token")
    longest = max((len(sequence) for sequence in sequences), default=1)
    context = multiprocessing.get_context("spawn")
    parent_conn, child_conn = context.Pipe()
    request = {"model": model, "k": k, "batch_size": batch_size,
               "engine": {"dtype": dtype, "max_model_len": max_model_len or longest + 1}}
    process = context.Process(target=_child_main, args=(child_conn, os.getpid(), request))
    process.start()
    child_conn.close()
    try:
        parent_conn.send(([list(map(int, s)) for s in sequences], [int(s) for s in starts]))
        try:
            kind, *payload = parent_conn.recv()
        except (EOFError, ConnectionResetError):
            raise EngineDied(f"the vLLM process scoring with {model} died (out of memory? try a smaller batch, or "
                             "VLLM_CPU_KVCACHE_SPACE in GiB on CPU)") from None
        if kind == "error":
            raise payload[0]
        scored, load_seconds = payload
        return scored, load_seconds
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
            process.join()
        parent_conn.close()


def _child_main(conn, parent_pid: int, request: dict) -> None:
    _die_with_parent(parent_pid)
    try:
        sequences, starts = conn.recv()
        conn.send(("done", *_score(sequences, starts, **request)))
    except BaseException as error:  # noqa: BLE001 -- handed to the parent, which re-raises it
        try:
            conn.send(("error", error))
        except OSError:
            pass
        except Exception:  # noqa: BLE001 -- not picklable: send its text
            conn.send(("error", RuntimeError(repr(error))))
    finally:
        conn.close()


def _score(sequences, starts, *, model, k, batch_size, engine):
    import numpy as np

    for name, value in engine_env_defaults().items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    on_cpu = _on_cpu()
    llm = LLM(model=model, enforce_eager=on_cpu, enable_prefix_caching=False, max_logprobs=max(k, MAX_K),
              **({"enable_chunked_prefill": False} if on_cpu else {}), **engine)
    load_seconds = time.perf_counter() - started
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
    scored = []
    try:
        for first in range(0, len(sequences), batch_size):
            batch = sequences[first:first + batch_size]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in batch], params, use_tqdm=False)
            for sequence, start, output in zip(batch, starts[first:first + batch_size], outputs):
                positions = output.prompt_logprobs[start:]
                ids = np.zeros((len(positions), k), dtype=np.int32)
                logprobs = np.zeros((len(positions), k), dtype=np.float32)
                token = np.zeros(len(positions), dtype=np.float32)
                for i, entries in enumerate(positions):
                    top = sorted(((lp.rank, token_id, lp.logprob) for token_id, lp in entries.items()))[:k]
                    ids[i] = [token_id for _, token_id, _ in top]
                    logprobs[i] = [logprob for _, _, logprob in top]
                    token[i] = entries[sequence[start + i]].logprob
                scored.append(ScoredSequence(ids, logprobs, token))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return scored, load_seconds
