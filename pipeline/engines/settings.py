"""The generation settings of the steps that sample, declared once and mixed into their configs: `SamplingFields`
(sample, evaluate, and the on-policy steps' rollouts) and `EngineFields` (sample and evaluate: the vLLM engine's
settings, which engine runs it, and the Ray settings), checked when a recipe loads.

Each field has one type, its bounds and its help text here. A step whose default differs redeclares the field with
the type below (`temperature: Temperature = 0.6`), which keeps the bounds and help text; a `Field(...)` as the default
may add to the help text. A setting whose bounds or meaning differ is the step's own declaration, of the same type:
the rollouts' temperature (above 0: their divergence divides by it) and top_k (0 keeps all tokens, as TRL has it).
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

RAY_INSTALL_LINE = 'pip install -e ".[ray]"'

Temperature = Annotated[float, Field(ge=0, description="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, Field(gt=0, le=1, description=(
    "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1 keeps all."))]
TopK = Annotated[int, Field(ge=-1, description="Keep only the k most likely tokens; -1 keeps all.")]
MaxTokens = Annotated[int, Field(ge=1, description=(
    "Most new tokens per completion; longer ones stop with finish_reason 'length'."))]
ThinkPrefixSetting = Annotated[str | None, Field(description=(
    "Text appended after the chat template's generation prompt, e.g. '<think>\\n' for R1-style models; part of the "
    "prompt, not of the completion. null: from the model's chat template ('<think>\\n' when it expects the reply to "
    "open it, nothing otherwise; pipeline.text.chat)."))]


class SamplingFields(BaseModel):
    """The sampling settings every step that generates has (sample, evaluate, the on-policy steps' rollouts), with
    the sample step's defaults."""

    temperature: Temperature = 0.7
    top_p: TopP = 1.0
    top_k: TopK = -1
    max_tokens: MaxTokens = 256
    think_prefix: ThinkPrefixSetting = None


class EngineFields(SamplingFields):
    """The engine settings `sample` and `evaluate` share: vLLM's, and which engine generates."""

    max_model_len: int | None = Field(default=None, ge=1, description=(
        "Longest prompt + completion in tokens; default: the model's own limit."))
    chunk_size: int = Field(default=64, ge=1, description=(
        "Problems per chunk (evaluate cuts them per benchmark): each finished chunk is saved, and a re-run after a "
        "crash or kill generates only the chunks not saved yet. Seeds are per sample, not per chunk; with bfloat16 "
        "weights another chunk size can still change some samples by rounding (pipeline.engines.vllm_local)."))
    tensor_parallel_size: int = Field(default=1, ge=1, description=(
        "GPUs one vLLM engine splits the model over (vLLM tensor_parallel_size)."))
    data_parallel_size: int = Field(default=1, ge=1, description=(
        "vLLM data_parallel_size, passed as is; offline vLLM supports it only with distributed_executor_backend: "
        "external_launcher (one process per rank)."))
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = Field(
        default=None, description="vLLM distributed_executor_backend: mp (one machine), ray (across nodes), "
                                  "external_launcher (torchrun); default: vLLM's choice.")
    engine: Literal["local", "ray"] = Field(default="local", description=(
        "local: one vLLM engine in a child process of the step. ray: `replicas` vLLM engines as Ray actors, fed "
        "the chunks as a Ray Dataset, on the cluster at ray_address; same samples, shards and resume. Needs the "
        f"ray extra ({RAY_INSTALL_LINE})."))
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
            raise ValueError(f"engine ray needs Ray, which is not installed: {RAY_INSTALL_LINE} (the gpu extra has it)")
        return engine

    @field_validator("replicas", "batch_size", "ray_address")
    @classmethod
    def _only_with_engine_ray(cls, value, info: ValidationInfo):
        # runs only for the settings given (engine is validated before them); a default passes, so a dumped config
        # validates back to itself
        if info.data.get("engine") == "local" and value != cls.model_fields[info.field_name].default:
            raise ValueError("only for engine: ray (engine is local)")
        return value

    def request_settings(self) -> dict:
        """The fields a `pipeline.engines.request.SamplingRequest` takes as they are (the think prefix it takes is the
        one this field resolves to)."""
        return {name: getattr(self, name) for name in (
            "temperature", "top_p", "top_k", "max_tokens", "max_model_len", "tensor_parallel_size",
            "data_parallel_size", "distributed_executor_backend")}

    def ray_settings(self) -> dict:
        return dict(replicas=self.replicas, batch_size=self.batch_size, ray_address=self.ray_address)
