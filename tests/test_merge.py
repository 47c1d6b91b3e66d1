"""The merge step: a LoRA adapter trained by the real sft step, merged with peft into a standalone model."""

import json
import shutil

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open

from pipeline.core.artifacts import MANIFEST, Artifact, Output, write_json_atomic
from pipeline.core.errors import UserError
from pipeline.core.models import resolve_model
from pipeline.steps import merge, sft


@pytest.fixture(scope="module")
def adapter_step(tmp_path_factory):
    """A finished sft step with a LoRA adapter on builtin:tiny-random, trained enough to move the logits."""
    root = tmp_path_factory.mktemp("sft")
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i} * 3?"},
                                         {"role": "assistant", "content": f"\\boxed{{{3 * i}}}"}]} for i in range(8)]
    Dataset.from_list(rows).save_to_disk(str(root / "sft_data" / "data"))
    cfg = sft.Config(uses="sft", input="sft_data", model="builtin:tiny-random", lora={"r": 8}, max_steps=3,
                     batch_size=4, learning_rate=1e-2)
    out = Output(name="sft", kind="model", dir=root / "sft", scratch=root / "scratch", seed=0)
    artifact = sft.run(cfg, {"sft_data": Artifact("sft_data", "dataset", root / "sft_data")}, out)
    # The manifests the runner would write: the merge's model card reads the lineage from them.
    write_json_atomic(root / "sft_data" / MANIFEST, {"step": "sft_data", "uses": "select", "key": "k-data",
                                                     "parents": {}, "config": {"input": "graded"}})
    write_json_atomic(root / "sft" / MANIFEST, {"step": "sft", "uses": "sft", "key": "k-sft",
                                                "parents": {"sft_data": "k-data"}, "config": cfg.model_dump()})
    return Artifact("sft", "model", root / "sft", key="k-sft", stats=artifact.stats)


def run_merge(tmp_path, source, **config):
    out = Output(name="merged", kind="model", dir=tmp_path / "merged", scratch=tmp_path / "scratch", seed=0)
    return merge.run(merge.Config(uses="merge", input=source.name, **config), {source.name: source}, out)


def logits(model, tokenizer, text):
    batch = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**batch).logits


def test_merged_model_matches_the_adapter_model(adapter_step, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    artifact = run_merge(tmp_path, adapter_step)
    stats = artifact.stats
    assert stats["merged"] is True and stats["adapter_step"] == "sft"
    assert stats["max_abs_logit_diff"] <= 1e-3
    assert stats["max_abs_adapter_effect"] > 1e-2  # the adapter changed the model, so the check compared something

    merged_dir = artifact.path / "model"
    for name in ("config.json", "model.safetensors", "generation_config.json", "chat_template.jinja",
                 "tokenizer.json"):
        assert (merged_dir / name).exists(), name
    assert not (merged_dir / "adapter_config.json").exists()
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as weights:
        assert not [key for key in weights.keys() if "lora" in key]
    card = (merged_dir / "README.md").read_text()
    assert "base model: `builtin:tiny-random`" in card and "trained by step: `sft` (key `k-sft`)" in card
    assert "- `sft_data` (select, key `k-data`)" in card and "input: `sft_data`" in card  # the data it learned from

    # Loaded on its own, the merged dir gives the adapter model's logits on a prompt the step never checked.
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-random"), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(adapter_step.model_dir)).eval()
    text = "If a train leaves at 3pm going 60 km/h, when does it cover 90 km?"
    assert (logits(merged, tokenizer, text) - logits(adapted, tokenizer, text)).abs().max().item() <= 1e-3


def test_a_wrong_merge_is_caught(adapter_step, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    merge_and_unload = BaseTuner.merge_and_unload  # what PeftModel.merge_and_unload calls

    def merge_then_corrupt(self, *args, **kwargs):
        model = merge_and_unload(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.05)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", merge_then_corrupt)
    with pytest.raises(RuntimeError, match="differ from the adapter model"):
        run_merge(tmp_path, adapter_step)
    assert not (tmp_path / "merged" / "model").exists()


def test_full_weights_are_copied_through(tmp_path):
    full_step = tmp_path / "full_sft"
    shutil.copytree(resolve_model("builtin:tiny-random"), full_step / "model")
    source = Artifact("full_sft", "model", full_step, stats={"adapter": False, "base_model": "builtin:tiny-random"})

    artifact = run_merge(tmp_path, source)
    merged_dir = artifact.path / "model"
    assert artifact.stats["merged"] is False
    assert json.loads((merged_dir / "config.json").read_text()) == json.loads(
        (full_step / "model" / "config.json").read_text())
    assert "full_sft" in (merged_dir / "README.md").read_text()


def test_a_dataset_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="'data' produced a dataset"):
        run_merge(tmp_path, Artifact("data", "dataset", tmp_path / "data"))
