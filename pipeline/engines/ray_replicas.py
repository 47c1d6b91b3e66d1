"""`engine: ray` for the `sample` and `evaluate` steps: `generate(request, replicas=...)` makes the chunks of prompts a
Ray Dataset, and vLLM engine replicas, each a Ray actor, generate them (Ray Data `map_batches` over an actor pool).

A replica wraps the local engine's own `pipeline.engines.vllm_local.EngineProcess`, so a chunk is computed exactly as
the local engine computes it: one batch of the same requests with the same per-sample seeds, from an empty prefix
cache. The driver (the step's process) receives each chunk as a replica finishes it and hands it to the step's
`on_chunk`, which saves the same shards as with the local engine, so resume works the same whatever the engine:
chunks with a shard are not sent to Ray at all.

A replica that dies (its worker killed, its node lost, its engine process killed or out of memory) is restarted
by Ray, and the chunks it held are generated again on the new one (Ray Data's actor pools restart actors and
retry their tasks); a chunk whose replica died `MAX_CHUNK_ATTEMPTS` times fails the run instead of looping, and
the driver keeps the first result of a chunk, so none is saved twice.

Numerics: on CPU with bfloat16 weights, vLLM's matmuls round differently with another number of torch threads, so
a replica matches the local engine's samples when it runs as many threads (OMP_NUM_THREADS set where `distill`
runs goes to every replica; otherwise a replica runs its share of the node's CPUs). docs/scaling.md: "Many machines".

Why not `ray.data.llm`'s vLLM processor (tried): it needs `ray[llm]`, which pins another vLLM release than this
project's; with `ray[data]` alone its engine stage fails at start-up (vLLM's Ray metrics import `ray.serve`); it
reserves a CPU per stage; and it streams requests into vLLM's async engine, so a chunk would no longer be one
batch and samples would differ from the local engine's by rounding.

Ray is imported only inside the functions here: a recipe with the local engine never loads it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from pipeline.core.errors import UserError
from pipeline.engines.request import ChunkPlan, Completion, Generations, OnChunk, SamplingRequest
from pipeline.engines.vllm_local import EngineDied, EngineProcess, engine_env_defaults, engine_settings, usable_cores

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


def generate(request: SamplingRequest, *, replicas: int, batch_size: int, ray_address: str | None,
             on_chunk: OnChunk | None = None, on_phase: Callable[[str], None] | None = None) -> RayGenerations:
    """`pipeline.engines.vllm_local.generate`'s contract (same samples, `on_chunk` in this process as each chunk comes
    back, in the order they finish) on `replicas` engines of a Ray cluster, each replica taking `batch_size` chunks at
    a time (`ray_address`: see `pipeline.engines.settings.EngineFields`)."""
    plan = request.plan()
    completions: list[list[Completion]] = [[] for _ in request.prompts]
    if not plan.todo:
        return RayGenerations(completions, requested_replicas=replicas)
    import ray

    if on_phase is not None:
        on_phase("starting Ray")
    clock = DriverClock()
    started_here = _connect(ray_address)
    try:
        replica_resources = _replica_resources(replicas, request.tensor_parallel_size, ray_address)
        clock.lap("ray_start")
        attempts = ray.remote(num_cpus=0)(ChunkAttempts).remote()
        results = _replica_pool(request, plan, attempts, replicas, batch_size, replica_resources)
        if on_phase is not None:
            on_phase("generating")
        clock.lap("dataset")
        stats = _collect(results, plan, completions, on_chunk, clock)
        retries = ray.get(attempts.retries.remote())
        # the address each node joined with (`ray start --node-ip-address`), by node id
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    finally:
        if started_here:
            ray.shutdown()
    clock.lap("finish")
    per_replica = stats.per_replica(addresses)
    return RayGenerations(
        completions, load_seconds=max(r["load_seconds"] for r in per_replica.values()),
        generate_seconds=sum(r["generate_seconds"] for r in per_replica.values()), span_seconds=stats.span_seconds,
        replicas=per_replica, retries=retries, requested_replicas=replicas, driver_seconds=clock.seconds)


class DriverClock:
    """Where the driver's wall time goes, by phase (`DRIVER_PHASES`): each `lap(phase)` adds the seconds since the
    last lap to `phase`."""

    def __init__(self):
        self.seconds = dict.fromkeys(DRIVER_PHASES, 0.0)
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now


def _replica_pool(request: SamplingRequest, plan: ChunkPlan, attempts, replicas: int, batch_size: int,
                  replica_resources: dict):
    """The chunks to generate as a Ray Dataset, one row per chunk (its prompts, problem ids and sample counts, as the
    local engine sends them), mapped by a pool of `replicas` `EngineReplica`s: the Dataset of their results."""
    import ray

    work = ray.data.from_items(
        [{"chunk": chunk, "work": json.dumps(dict(zip(("prompts", "ids", "counts"), plan.chunk(chunk))))}
         for chunk in plan.todo],
        override_num_blocks=len(plan.todo))
    return work.map_batches(
        EngineReplica, fn_constructor_kwargs=dict(model=request.model, settings=engine_settings(request),
                                                  attempts=attempts),
        # one batch per replica at a time: chunks go to whichever replica is free instead of queueing behind a
        # busy one, and a replica that dies held only the batch it was generating
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
        runtime_env={"env_vars": _replica_env(replica_resources)}, **replica_resources)


def _collect(results, plan: ChunkPlan, completions: list[list[Completion]], on_chunk: OnChunk | None,
             clock: DriverClock) -> ReplicaStats:
    """Take each chunk's result as a replica hands it back: its completions into `completions`, its stats, then
    `on_chunk`. Refused when Ray returned no result for a chunk."""
    stats = ReplicaStats()
    done: set[int] = set()
    for row in results.iter_rows():
        clock.lap("waiting")
        chunk, result = int(row["chunk"]), json.loads(row["result"])
        # A batch retried after its replica died can hand back a chunk a second time: the first one counts.
        if chunk in done:
            continue
        done.add(chunk)
        rows = plan.chunks[chunk]
        chunk_completions = [[Completion(**c) for c in per_prompt] for per_prompt in result["completions"]]
        completions[rows.start:rows.stop] = chunk_completions
        stats.add(result, chunk_completions)
        clock.lap("results")
        if on_chunk is not None:
            on_chunk(chunk, chunk_completions, result["seconds"])
            clock.lap("on_chunk")
    clock.lap("waiting")  # for Ray to say there are no more rows
    missing = sorted(set(plan.todo) - done)
    if missing:
        raise RuntimeError(f"Ray returned no result for chunk(s) {missing}")
    return stats


class ReplicaStats:
    """What the driver tallies of the chunks' results: per replica (actor id) its node, chunks, completion tokens,
    generate seconds and engine start-up; and the span from the first chunk's start to the last one's end."""

    def __init__(self):
        self.replicas: dict[str, dict] = {}
        self.first_started, self.last_finished = float("inf"), 0.0

    def add(self, result: dict, chunk_completions: list[list[Completion]]) -> None:
        replica = self.replicas.setdefault(result["replica"], {
            "node": result["node"], "chunks": 0, "completion_tokens": 0, "generate_seconds": 0.0, "load_seconds": 0.0})
        replica["chunks"] += 1
        replica["completion_tokens"] += sum(c.completion_tokens for per_prompt in chunk_completions
                                            for c in per_prompt)
        replica["generate_seconds"] += result["seconds"]
        replica["load_seconds"] = max(replica["load_seconds"], result["load_seconds"])
        self.first_started = min(self.first_started, result["finished_at"] - result["seconds"])
        self.last_finished = max(self.last_finished, result["finished_at"])

    @property
    def span_seconds(self) -> float:
        return self.last_finished - self.first_started

    def per_replica(self, addresses: dict[str, str]) -> dict[str, dict]:
        """The replicas' stats for the manifest: seconds rounded, each node named by its address (by node id in
        `addresses`) where known."""
        return {replica: {**stats, "node": addresses.get(stats["node"], stats["node"]),
                          "generate_seconds": round(stats["generate_seconds"], 2),
                          "load_seconds": round(stats["load_seconds"], 2)}
                for replica, stats in self.replicas.items()}


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
