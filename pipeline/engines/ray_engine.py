"""`engine: ray` for the `sample` and `evaluate` steps: the chunks of prompts become a Ray Dataset, and vLLM
engine replicas, each a Ray actor, generate them (Ray Data `map_batches` over an actor pool).

A replica wraps the local engine's own `pipeline.engines.generation.EngineProcess`, so a chunk is computed exactly as the
local engine computes it: one batch of the same requests with the same per-sample seeds, from an empty prefix
cache. The driver (the step's process) receives each chunk as a replica finishes it and hands it to the step's
`on_chunk`, which saves the same shards as with the local engine, so resume works the same whatever the engine:
chunks with a shard are not sent to Ray at all.

A replica that dies (its worker killed, its node lost, its engine process killed or out of memory) is restarted
by Ray, and the chunks it held are generated again on the new one (Ray Data's actor pools restart actors and
retry their tasks); a chunk whose replica died `MAX_CHUNK_ATTEMPTS` times fails the run instead of looping, and
the driver keeps the first result of a chunk, so none is saved twice.

Numerics: on CPU with bfloat16 weights, vLLM's matmuls round differently with another number of torch threads, so
a replica matches the local engine's samples when it runs as many threads (OMP_NUM_THREADS set where `distill`
runs goes to every replica; otherwise a replica runs its share of the node's CPUs). README: "Many machines".

Why not `ray.data.llm`'s vLLM processor (tried): it needs `ray[llm]`, which pins another vLLM release than this
project's; with `ray[data]` alone its engine stage fails at start-up (vLLM's Ray metrics import `ray.serve`); it
reserves a CPU per stage; and it streams requests into vLLM's async engine, so a chunk would no longer be one
batch and samples would differ from the local engine's by rounding.

Ray is imported only inside the functions here: a recipe with the local engine never loads it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Collection, Sequence
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from pipeline.core.errors import UserError
from pipeline.engines.generation import (
    Completion,
    EngineDied,
    EngineProcess,
    Generations,
    _plan,
    engine_env_defaults,
    engine_settings,
    usable_cores,
)

INSTALL_LINE = 'pip install -e ".[ray]"'
# A local cluster holds only prompts and completions in its object store; Ray's default is 30% of the RAM.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
# Starts of one chunk before the run fails: a chunk whose replicas keep dying (a model or a batch too large for
# its node) should stop the run, not loop.
MAX_CHUNK_ATTEMPTS = 4
# Where the driver's wall time goes in `generate` (`driver_seconds` in the manifest): starting or joining Ray;
# handing the chunks' prompts to Ray (the Dataset); blocked waiting for the next chunk (replicas starting and
# generating); decoding each chunk's result; the caller's `on_chunk` (the step's shard writes); the replicas'
# stats and stopping a local cluster. All but `waiting` is the driver's own work.
DRIVER_PHASES = ("ray_start", "dataset", "waiting", "results", "on_chunk", "finish")


class EngineFields(BaseModel):
    """The engine settings `sample` and `evaluate` share (mixed into their configs)."""

    engine: Literal["local", "ray"] = Field(default="local", description=(
        "local: one vLLM engine in a child process of the step. ray: `replicas` vLLM engines as Ray actors, fed "
        "the chunks as a Ray Dataset, on the cluster at ray_address; same samples, shards and resume. Needs the "
        f"ray extra ({INSTALL_LINE})."))
    replicas: int = Field(default=1, ge=1, description=(
        "engine ray: vLLM engine replicas, each a Ray actor with tensor_parallel_size GPUs (on a cluster "
        "without GPUs: an equal share of its CPUs)."))
    batch_size: int = Field(default=1, ge=1, description=(
        "engine ray: chunks (of chunk_size problems) a replica takes per Ray Data batch. Each chunk is still "
        "generated as one batch and saved on its own, so this changes scheduling, not samples; a replica that "
        "dies loses its whole batch."))
    ray_address: str | None = Field(default=None, description=(
        "engine ray: null starts a local Ray cluster for the step and stops it after; 'auto' joins the cluster "
        "`ray start` runs on this machine; host:port or ray://host:port joins that one."))

    @field_validator("engine")
    @classmethod
    def _ray_installed(cls, engine: str) -> str:
        if engine == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError(f"engine ray needs Ray, which is not installed: {INSTALL_LINE} (the gpu extra has it)")
        return engine

    @field_validator("replicas", "batch_size", "ray_address")
    @classmethod
    def _only_with_engine_ray(cls, value, info: ValidationInfo):
        # runs only for the settings given (engine is validated before them); a default passes, so a dumped config
        # validates back to itself
        if info.data.get("engine") == "local" and value != cls.model_fields[info.field_name].default:
            raise ValueError("only for engine: ray (engine is local)")
        return value

    def ray_settings(self) -> dict:
        return dict(replicas=self.replicas, batch_size=self.batch_size, ray_address=self.ray_address)


class RayGenerations(Generations):
    """`Generations`, plus what the Ray run did: `ray_stats()` for the manifest."""

    def __init__(self, completions=(), *, load_seconds=0.0, generate_seconds=0.0, span_seconds=0.0,
                 replicas: dict | None = None, retries: int = 0, requested_replicas: int = 0,
                 driver_seconds: dict | None = None):
        super().__init__(completions, load_seconds=load_seconds, generate_seconds=generate_seconds)
        self.span_seconds = span_seconds  # from the first chunk's start to the last one's end: replicas overlap
        self.driver_seconds = driver_seconds or {}  # where the driver's wall time went, by phase (DRIVER_PHASES)
        self.replicas = replicas or {}  # replica (actor id) -> its node, chunks, tokens, seconds
        self.retries = retries
        self.requested_replicas = requested_replicas

    def ray_stats(self) -> dict:
        """Replicas, nodes, retries, and tokens/s per replica (its tokens over its own generate seconds) and
        overall (all tokens over the span from the first chunk's start to the last one's end, the replicas
        generating side by side; engine start-up is in neither); and the driver's seconds by phase
        (`DRIVER_PHASES`)."""
        per_replica = {
            replica: {**stats, "tokens_per_s": round(stats["completion_tokens"] / stats["generate_seconds"], 2)
                      if stats["generate_seconds"] > 0 else 0.0}
            for replica, stats in sorted(self.replicas.items())}
        return {"replicas": self.requested_replicas,
                "nodes": sorted({stats["node"] for stats in per_replica.values()}),
                "retries": self.retries,
                "tokens_per_s": round(self.completion_tokens / self.span_seconds, 2) if self.span_seconds > 0 else 0.0,
                "span_seconds": round(self.span_seconds, 2),
                "per_replica": per_replica,
                "driver_seconds": {phase: round(seconds, 3) for phase, seconds in self.driver_seconds.items()}}


def generate(
    model: str,
    prompts: list[list[dict]],
    *,
    replicas: int,
    batch_size: int,
    ray_address: str | None,
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
) -> RayGenerations:
    """`pipeline.engines.generation.generate`'s contract (same samples, `chunks`, `skip_chunks`, `on_chunk` in this
    process as each chunk comes back, in the order they finish) on `replicas` engines of a Ray cluster."""
    counts, ids, chunks, todo = _plan(prompts, n, ids, chunks, skip_chunks)
    completions: list[list[Completion]] = [[] for _ in prompts]
    if not todo:
        return RayGenerations(completions, requested_replicas=replicas)
    import ray

    if on_phase is not None:
        on_phase("starting Ray")
    driver = dict.fromkeys(DRIVER_PHASES, 0.0)
    mark = time.perf_counter()

    def lap(phase: str) -> None:  # the seconds since the last lap go to `phase`
        nonlocal mark
        now = time.perf_counter()
        driver[phase] += now - mark
        mark = now

    started_here = _connect(ray_address)
    try:
        replica_resources = _replica_resources(replicas, tensor_parallel_size, ray_address)
        lap("ray_start")
        # Each row is one chunk: its prompts, problem ids and sample counts, as the local engine sends them.
        work = ray.data.from_items(
            [{"chunk": chunk, "work": json.dumps({"prompts": [prompts[p] for p in chunks[chunk]],
                                                  "ids": [ids[p] for p in chunks[chunk]],
                                                  "counts": [counts[p] for p in chunks[chunk]]})}
             for chunk in todo],
            override_num_blocks=len(todo))
        attempts = ray.remote(num_cpus=0)(ChunkAttempts).remote()
        settings = dict(seed=seed, think_prefix=think_prefix, **engine_settings(
            temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, stop=stop, dtype=dtype,
            max_model_len=max_model_len, tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size, distributed_executor_backend=distributed_executor_backend))
        results = work.map_batches(
            EngineReplica, fn_constructor_kwargs=dict(model=model, settings=settings, attempts=attempts),
            # one batch per replica at a time: chunks go to whichever replica is free instead of queueing behind a
            # busy one, and a replica that dies held only the batch it was generating
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
            runtime_env={"env_vars": _replica_env(replica_resources)}, **replica_resources)
        if on_phase is not None:
            on_phase("generating")
        stats: dict[str, dict] = {}
        done: set[int] = set()
        first_started, last_finished = float("inf"), 0.0
        lap("dataset")
        for row in results.iter_rows():
            lap("waiting")
            chunk, result = int(row["chunk"]), json.loads(row["result"])
            # A batch retried after its replica died can hand back a chunk a second time: the first one counts.
            if chunk in done:
                continue
            done.add(chunk)
            rows = chunks[chunk]
            chunk_completions = [[Completion(**c) for c in per_prompt] for per_prompt in result["completions"]]
            completions[rows.start:rows.stop] = chunk_completions
            replica = stats.setdefault(result["replica"], {"node": result["node"], "chunks": 0, "completion_tokens": 0,
                                                           "generate_seconds": 0.0, "load_seconds": 0.0})
            replica["chunks"] += 1
            replica["completion_tokens"] += sum(c.completion_tokens for per_prompt in chunk_completions
                                                for c in per_prompt)
            replica["generate_seconds"] += result["seconds"]
            replica["load_seconds"] = max(replica["load_seconds"], result["load_seconds"])
            first_started = min(first_started, result["finished_at"] - result["seconds"])
            last_finished = max(last_finished, result["finished_at"])
            lap("results")
            if on_chunk is not None:
                on_chunk(chunk, chunk_completions, result["seconds"])
                lap("on_chunk")
        lap("waiting")  # for Ray to say there are no more rows
        missing = sorted(set(todo) - done)
        if missing:
            raise RuntimeError(f"Ray returned no result for chunk(s) {missing}")
        retries = ray.get(attempts.retries.remote())
        # the address each node joined with (`ray start --node-ip-address`), by node id
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    finally:
        if started_here:
            ray.shutdown()
    lap("finish")
    for replica in stats.values():
        replica["node"] = addresses.get(replica["node"], replica["node"])
        replica["generate_seconds"] = round(replica["generate_seconds"], 2)
        replica["load_seconds"] = round(replica["load_seconds"], 2)
    return RayGenerations(
        completions, load_seconds=max(r["load_seconds"] for r in stats.values()),
        generate_seconds=sum(r["generate_seconds"] for r in stats.values()),
        span_seconds=last_finished - first_started,
        replicas=stats, retries=retries, requested_replicas=replicas, driver_seconds=driver)


class EngineReplica:
    """One vLLM engine replica, a Ray Data actor: the local engine's `EngineProcess` in a child of the actor's
    worker (which dies with the worker), fed the chunks of each batch one at a time."""

    def __init__(self, model: str, settings: dict, attempts):
        import ray

        self.attempts = attempts
        context = ray.get_runtime_context()
        self.replica = context.get_actor_id()[:8]  # the rest of the id is the job's
        self.node = context.get_node_id()
        self.engine = EngineProcess(model, **settings)

    def __call__(self, batch: dict):
        import numpy as np
        import ray

        for chunk, work in zip(batch["chunk"], batch["work"]):
            work = json.loads(work)
            attempt = ray.get(self.attempts.started.remote(int(chunk)))
            if attempt > MAX_CHUNK_ATTEMPTS:
                raise RuntimeError(f"chunk {chunk} was started {MAX_CHUNK_ATTEMPTS} times and its replica died each "
                                   "time (out of memory? try fewer replicas per node or a smaller chunk_size)")
            try:
                per_prompt, seconds = self.engine.generate_chunk(work["prompts"], work["ids"], work["counts"])
            except EngineDied:
                # A replica whose engine died (killed, out of memory) dies with it: Ray then restarts the replica
                # and retries the batch, which it does not do for an exception.
                os._exit(1)
            result = {"completions": [[vars(c) for c in per_problem] for per_problem in per_prompt],
                      "seconds": seconds, "finished_at": time.time(), "load_seconds": self.engine.load_seconds,
                      "replica": self.replica, "node": self.node}
            yield {"chunk": np.array([chunk]), "result": np.array([json.dumps(result)], dtype=object)}


class ChunkAttempts:
    """A Ray actor counting how often each chunk was started: every start after a chunk's first is a retry."""

    def __init__(self):
        self.starts: dict[int, int] = {}

    def started(self, chunk: int) -> int:
        """Count a start of `chunk`; return which start it is (1 for the first)."""
        self.starts[chunk] = self.starts.get(chunk, 0) + 1
        return self.starts[chunk]

    def retries(self) -> int:
        return sum(count - 1 for count in self.starts.values())


def _connect(ray_address: str | None) -> bool:
    """Join the cluster at `ray_address`, or start a local one (None); True when this process started it."""
    import ray
    from ray.data import DataContext

    if ray_address is None:
        ray.init(address="local", num_cpus=usable_cores(), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 include_dashboard=False, log_to_driver=False)
    else:
        try:
            ray.init(address=ray_address, log_to_driver=False)
        except ConnectionError as error:
            raise UserError(f"ray_address {ray_address!r}: no Ray cluster to join there ({error})") from None
    # the step's own progress row shows the chunks; Ray Data's bars would interleave with it
    DataContext.get_current().enable_progress_bars = False
    return ray_address is None


def _replica_resources(replicas: int, tensor_parallel_size: int, ray_address: str | None) -> dict:
    """What one replica reserves: tensor_parallel_size GPUs (and a CPU) on a cluster with GPUs, else an equal
    share of the CPUs, at most one node's. Refused when the cluster cannot hold `replicas` of them, which
    would otherwise wait for resources forever."""
    import ray

    where = f"the Ray cluster at {ray_address}" if ray_address else "the local Ray cluster"
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    if gpus:
        fit = sum(int(node.get("GPU", 0)) // tensor_parallel_size for node in nodes)
        if fit < replicas:
            raise UserError(f"replicas: {replicas} replicas of tensor_parallel_size {tensor_parallel_size} GPUs "
                            f"do not fit on {where} ({gpus} GPUs, room for {fit})")
        return {"num_gpus": tensor_parallel_size, "num_cpus": 1}
    cpus = sum(int(node.get("CPU", 0)) for node in nodes)
    if cpus < replicas:
        raise UserError(f"replicas: {replicas} replicas need a CPU each; {where} has {cpus} CPUs and no GPU")
    return {"num_cpus": min(cpus // replicas, max(int(node.get("CPU", 0)) for node in nodes))}


def _replica_env(replica_resources: dict) -> dict[str, str]:
    """The engine variables set here (VLLM_CPU_KVCACHE_SPACE, ...) for the replicas, which do not inherit this
    process's environment on a cluster; on CPU, torch threads for the replica's share of the cores."""
    env = {name: os.environ[name] for name in engine_env_defaults() if name in os.environ}
    if "num_gpus" not in replica_resources:
        env.setdefault("OMP_NUM_THREADS", str(replica_resources["num_cpus"]))
    return env
