"""Session settings for every test run.

`make test` runs two pytest-xdist workers on a 2-core machine. Each worker is pinned to its own share of the cores, so
two model-running tests never fight over one core: vLLM's CPU engine, torch and Ray take their thread counts from the
CPU affinity (`pipeline.engines.vllm_local.usable_cores`) or OMP_NUM_THREADS, and the processes a test starts (the
`distill` CLI, engine children) inherit both. Set before any test module imports torch.
"""

import os

_worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under xdist; unset in a plain `pytest` run
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _worker and _workers > 1 and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    if len(_cores) >= _workers:
        _share = _cores[int(_worker.removeprefix("gw")) % _workers::_workers]
        os.sched_setaffinity(0, _share)
        os.environ["OMP_NUM_THREADS"] = str(len(_share))
