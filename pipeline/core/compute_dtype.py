"""The dtype a model computes in on this machine: one decision for every engine and trainer.

`dtype: auto` (every step that runs a model: sample, evaluate, teachers, sft, redi, opsd, onpolicy; merge's saved
weights) means the fastest dtype that is exact enough on the device the step runs on, decided here and not by vLLM
(which takes bfloat16 on any CPU):

    device                                          inference   training (weights stay float32)
    CPU with AVX-512 BF16 or AMX                    bfloat16    bf16 autocast
    any other CPU (AVX2 only: most laptops)         float32     float32
    CUDA, compute capability >= 8.0 (A100, H100)    bfloat16    bf16 autocast
    CUDA below 8.0 (T4, V100)                       float16     fp16 autocast (loss scaling)
    Apple MPS                                       bfloat16 on macOS 14+ (else float16); training float32

Why float32 on a CPU without native bf16: its bf16 matmuls are emulated in software, ~30x slower than float32
(`distill bench decode` measures both; BENCHMARKS.md has the numbers per CPU). A recipe may pin a dtype; one the
device cannot run fast is run as asked, and `distill check` / `distill status` say so (`DtypeChoice.slow`).

The capability is read from torch (CUDA, MPS) and the CPU's flags (/proc/cpuinfo; torch's own CPU capability
elsewhere). `ATEN_CPU_CAPABILITY=avx2` (or `default`), torch's switch to dispatch to older kernels, counts as a CPU
without native bf16, so an AVX-512 machine can stand in for an AVX2 one.

The chosen dtype changes outputs, so it is part of a step's key (`keys.step_inputs`) and its manifest records
the choice and the reason.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from pipeline.core.errors import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPE_HELP = ("auto: the fastest exact-enough dtype on this device (bfloat16 on a GPU of compute capability 8.0+ or a "
              "CPU with AVX-512 BF16/AMX, float16 on older GPUs, float32 on other CPUs); or pin bfloat16, float16, "
              "float32.")
# CPU flags (as /proc/cpuinfo spells them) that mean bf16 matmuls run in hardware.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Hardware:
    """What decides the dtype: where torch computes, and what that device does natively."""

    device: Literal["cpu", "cuda", "mps"]
    name: str  # the CPU's or GPU's name, for the reason
    cpu_bf16: bool = False  # AVX-512 BF16 or AMX (and torch not told to use older kernels)
    cuda_capability: tuple[int, int] | None = None
    mps_bf16: bool = False  # macOS 14+

    @property
    def native_bf16(self) -> bool:
        if self.device == "cuda":
            return self.cuda_capability is not None and self.cuda_capability >= (8, 0)
        return self.mps_bf16 if self.device == "mps" else self.cpu_bf16


@dataclass(frozen=True)
class DtypeChoice:
    requested: str  # what the recipe says: auto or a dtype
    dtype: str  # what the model computes in: bfloat16, float16 or float32
    reason: str  # why, in words (printed by `distill env`, kept in manifests)
    slow: str | None = None  # a pinned dtype this device runs far slower than auto's: a warning, not a refusal

    def record(self) -> dict:
        return asdict(self)


@functools.cache
def hardware() -> Hardware:
    """This machine's compute device and its native dtypes (imports torch)."""
    import torch

    if torch.cuda.is_available():
        return Hardware("cuda", torch.cuda.get_device_name(0), cuda_capability=torch.cuda.get_device_capability(0))
    if torch.backends.mps.is_available():
        return Hardware("mps", "Apple MPS", mps_bf16=torch.backends.mps.is_macos_or_newer(14, 0))
    flags = cpu_flags()
    if flags is None:  # not Linux: torch's dispatch level is what it will use
        flags = {"avx512_bf16"} if torch.backends.cpu.get_cpu_capability() == "AVX512_BF16" else set()
    older_kernels = os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default", "avx", "zvector")
    return Hardware("cpu", cpu_name(), cpu_bf16=any(f in flags for f in CPU_BF16_FLAGS) and not older_kernels)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo; None where there is none (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose(requested: str = "auto", *, training: bool = False, hw: Hardware | None = None) -> DtypeChoice:
    """The dtype to run a model in: for inference (vLLM, HF scoring) the weights' dtype; for `training` the autocast
    dtype over float32 weights. `requested` is auto or a pinned dtype, kept as asked (with `slow` set where this
    device runs it far slower than auto's choice); training in float16 off CUDA is refused, as transformers would."""
    if requested not in DTYPES:
        raise UserError(f"dtype {requested!r}: expected one of {', '.join(DTYPES)}")
    hw = hw or hardware()
    auto, why = _auto(hw, training)
    if requested == "auto":
        return DtypeChoice("auto", auto, why)
    if training and requested == "float16" and hw.device != "cuda":
        raise UserError(f"dtype: float16 training (fp16 autocast with loss scaling) needs a CUDA GPU; this is "
                        f"{hw.device} ({hw.name}): use auto or float32")
    return DtypeChoice(requested, requested, f"pinned by the recipe ({why.split(':')[0]})", _slow(requested, hw))


def _auto(hw: Hardware, training: bool) -> tuple[str, str]:
    if hw.device == "cuda":
        major, minor = hw.cuda_capability or (0, 0)
        if hw.native_bf16:
            return "bfloat16", f"CUDA {hw.name}, compute capability {major}.{minor}: native bfloat16"
        return "float16", (f"CUDA {hw.name}, compute capability {major}.{minor}: no bfloat16 below 8.0, float16 "
                           + ("autocast with loss scaling" if training else "weights"))
    if hw.device == "mps":
        if training:
            return "float32", "Apple MPS: float32 training (mixed precision on MPS is not used)"
        return ("bfloat16", "Apple MPS on macOS 14+: bfloat16") if hw.mps_bf16 else (
            "float16", "Apple MPS before macOS 14: no bfloat16, float16")
    if hw.cpu_bf16:
        return "bfloat16", f"CPU {hw.name} with AVX-512 BF16/AMX: native bfloat16 matmuls"
    return "float32", f"CPU {hw.name} without AVX-512 BF16 or AMX: bfloat16 matmuls are emulated (~30x slower)"


def _slow(dtype: str, hw: Hardware) -> str | None:
    if dtype == "bfloat16" and not hw.native_bf16:
        if hw.device == "cpu":
            return "bfloat16 on a CPU without native bf16 (AVX-512 BF16/AMX): ~30x slower matmuls; use auto"
        return f"bfloat16 on {hw.name}, which has no native bfloat16: slow or refused by the kernels; use auto"
    if dtype == "float16" and hw.device == "cpu":
        return "float16 on a CPU: no native float16 matmuls; use auto"
    return None


class DtypeSetting(BaseModel):
    """The `dtype` setting of a step that runs a model, mixed into its Config ahead of StepConfig (whose
    `dtype_choice` says None: no model). `runner` keys and records the choice (`dtype_choice`), and the step runs
    its model in `dtype_choice().dtype`."""

    dtype: Dtype = Field(default="auto", description=DTYPE_HELP)

    # True for training steps: the dtype is the autocast dtype over float32 weights.
    dtype_for_training: ClassVar[bool] = False

    def dtype_choice(self) -> DtypeChoice | None:
        return choose(self.dtype, training=self.dtype_for_training)


def slow_dtype_warnings(steps: dict) -> list[str]:
    """For `distill check` and `distill status`: each step (name -> Config) that pins a dtype this device runs far
    slower than auto's choice, with why. A warning, not a refusal: the recipe may be meant for another machine."""
    warnings = []
    for name, cfg in steps.items():
        choice = cfg.dtype_choice()
        if choice is not None and choice.slow:
            warnings.append(f"step {name}: dtype {choice.dtype}: {choice.slow}")
    return warnings
