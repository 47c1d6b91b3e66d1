"""`merge`: a LoRA adapter + its base model -> one standalone Hugging Face model dir.

The input is a model step (e.g. `sft` with LoRA). The base model comes from the adapter's own config
(`base_model_name_or_path`, the path the trainer loaded), or else from the training step's `base_model`
reference. peft's `merge_and_unload` folds the adapter into the weights; the step then checks its work:
the merged model's logits on a few chat prompts must match the adapter model's (fp32, max abs difference
at most `tolerance`). The output holds safetensors weights, the tokenizer with its chat template, the
generation config and a model card naming the lineage, so vLLM and `from_pretrained` load it as is.

A step that trained full weights has nothing to merge: its model is copied through.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from pipeline.core.errors import UserError
from pipeline.core.models import base_model_path
from pipeline.core.step import StepConfig

# Prompts the merged and the adapter model must agree on, token by token.
CHECK_PROMPTS = (
    "What is 17 + 25?",
    "Solve for x: 3x - 7 = 11. Put your final answer within \\boxed{}.",
    "Name a prime number larger than 50.",
)


class Config(StepConfig):
    produces: ClassVar = "model"
    path_fields: ClassVar = ()
    uses_seed: ClassVar = False
    libraries: ClassVar = ("torch", "transformers", "peft")

    input: str = Field(description="Name of the training step (e.g. an sft step with LoRA) whose model is merged.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype of the saved weights; merging and the check run in float32."
    )
    tolerance: float = Field(
        default=1e-3, gt=0, description="Largest allowed |merged - adapter| logit difference on the check prompts."
    )


def run(cfg: Config, inputs, out):
    source = inputs[cfg.input]
    if source.kind != "model":
        raise UserError(f"merge: step {cfg.input!r} produced a {source.kind}; merge takes a model step such as sft")
    adapter_config = source.model_dir / "adapter_config.json"
    if not adapter_config.exists():
        shutil.copytree(source.model_dir, out.model_dir)
        (out.model_dir / "README.md").write_text(model_card(cfg, out.name, source, merged=False))
        return out.model_written(merged=False, base_model=source.stats.get("base_model"))

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = base_model_path(json.loads(adapter_config.read_text()), source)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(source.model_dir))
    adapted = PeftModel.from_pretrained(base, str(source.model_dir)).eval()

    checks = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True) for prompt in CHECK_PROMPTS]
    with torch.no_grad():
        with adapted.disable_adapter():
            base_logits = [adapted(**batch).logits for batch in checks]
        adapter_logits = [adapted(**batch).logits for batch in checks]
        merged = adapted.merge_and_unload()
        merged_logits = [merged(**batch).logits for batch in checks]
    max_diff = max((a - m).abs().max().item() for a, m in zip(adapter_logits, merged_logits))
    # How far the adapter moves the base model: shows that the check below compares something that changed.
    adapter_effect = max((a - b).abs().max().item() for a, b in zip(adapter_logits, base_logits))
    if max_diff > cfg.tolerance:
        raise RuntimeError(
            f"merge: the merged model's logits differ from the adapter model's of step {cfg.input!r} by {max_diff:.2e} "
            f"(tolerance {cfg.tolerance:.0e}); the merge is wrong, nothing was saved"
        )

    merged.config.pad_token_id = tokenizer.pad_token_id  # the tokenizer the adapter was trained with
    merged.to(getattr(torch, cfg.dtype)).save_pretrained(str(out.model_dir))  # safetensors + generation config
    tokenizer.save_pretrained(str(out.model_dir))
    (out.model_dir / "README.md").write_text(model_card(cfg, out.name, source, merged=True, base_path=base_path))
    return out.model_written(
        merged=True,
        base_model=source.stats.get("base_model", base_path),
        adapter_step=cfg.input,
        max_abs_logit_diff=max_diff,
        max_abs_adapter_effect=adapter_effect,
        check_tokens=sum(batch["input_ids"].numel() for batch in checks),
    )


def model_card(cfg: Config, step_name: str, source, merged: bool, base_path: str = "") -> str:
    base_ref = source.stats.get("base_model", "unknown")
    if not merged:
        how = f"A copy of the fully fine-tuned model of step `{cfg.input}` (no adapter to merge)."
    else:
        how = (f"The LoRA adapter of step `{cfg.input}` merged into its base model with peft `merge_and_unload`; "
               f"merged and adapter logits agree within {cfg.tolerance:.0e} (float32). Weights saved as {cfg.dtype}.")
    lineage = f"- base model: `{base_ref}`" + (f" (loaded from `{base_path}`)" if base_path else "")
    upstream = upstream_steps(source.path)
    steps = ("\n\n## Steps upstream (from their manifests)\n\n" + "\n".join(upstream)) if upstream else ""
    return (f"# {step_name}\n\n{how}\n\n## Lineage\n\n{lineage}\n- adapter / trained by step: `{cfg.input}` "
            f"(key `{source.key or 'n/a'}`)\n- merged by step: `{step_name}` (distillery `merge`)\n{steps}\n")


def upstream_steps(step_dir: Path) -> list[str]:
    """One line per step the model came from (training, data, ...), with its type, key and main settings.

    Read from the manifests the runner wrote beside the input step; a step without one (run by hand) ends the walk.
    """
    from pipeline.core.artifacts import read_manifest

    lines, seen, pending = [], set(), [step_dir]
    while pending:
        current = pending.pop(0)
        try:
            manifest = read_manifest(current)
        except (OSError, ValueError):
            continue
        if manifest["step"] in seen:
            continue
        seen.add(manifest["step"])
        config = manifest.get("config", {})
        settings = ", ".join(f"{key}: `{config[key]}`" for key in ("model", "input", "path", "alpha") if config.get(key)
                             is not None)
        lines.append(f"- `{manifest['step']}` ({manifest['uses']}, key `{manifest['key']}`)"
                     + (f": {settings}" if settings else ""))
        pending += [current.parent / parent for parent in manifest.get("parents", {})]
    return lines
