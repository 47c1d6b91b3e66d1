"""The onpolicy step: distillation from a separate teacher with TRL's DistillationTrainer, and the tokenizer check."""

import pytest
from datasets import Dataset

from pipeline.artifacts import Artifact, Output
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.models import resolve_model
from pipeline.steps import onpolicy


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    step_dir = tmp_path_factory.mktemp("problems")
    rows = [{"id": f"p{i}", "problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(8)]
    Dataset.from_list(rows).save_to_disk(str(step_dir / "data"))
    return {"problems": Artifact("problems", "dataset", step_dir)}


def tiny_model_dir(path, *, eos=None, extra_token=None):
    """builtin:tiny-random's architecture with its tokenizer changed: another eos, or one more special token."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve_model("builtin:tiny-random")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if eos:
        tokenizer.eos_token = eos
    if extra_token:
        tokenizer.add_special_tokens({"additional_special_tokens": [extra_token]})
    config = AutoConfig.from_pretrained(source)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def config(**overrides):
    settings = dict(uses="onpolicy", input="problems", model="builtin:tiny-random", teacher="builtin:tiny-random",
                    lora={"r": 8}, batch_size=4, learning_rate=5e-3, logging_steps=1, max_length=128, max_tokens=8,
                    save_steps=1000)
    return onpolicy.Config(**{**settings, **overrides})


def output(tmp_path, name="onpolicy"):
    return Output(name=name, kind="model", dir=tmp_path / name, scratch=tmp_path / f"{name}_scratch", seed=0)


@pytest.mark.parametrize("change, expected", [
    (dict(eos="<|endoftext|>"), "eos_token: '<|im_end|>' vs '<|endoftext|>'"),
    (dict(extra_token="<|tool_call|>"), "vocabulary: 49152 vs 49153 tokens, 1 differ"),
])
def test_a_teacher_with_another_tokenizer_is_refused_naming_both(problems, tmp_path, change, expected):
    teacher = tiny_model_dir(tmp_path / "teacher", **change)
    with pytest.raises(UserError) as refused:
        onpolicy.build_trainer(config(teacher=teacher), problems, output(tmp_path))
    message = str(refused.value)
    assert expected in message, message
    assert f"teacher {teacher!r} and student 'builtin:tiny-random'" in message


def test_the_cli_exits_2_on_a_tokenizer_mismatch(tmp_path, capsys):
    teacher = tiny_model_dir(tmp_path / "teacher", eos="<|endoftext|>")
    data = tmp_path / "problems.jsonl"
    data.write_text('{"id": "a", "problem": "What is 1 + 1?", "answer": "2"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: mismatch\nworkdir: {tmp_path / 'runs'}\nsteps:\n"
                      f"  problems: {{uses: load, path: {data}}}\n"
                      f"  distil: {{uses: onpolicy, input: problems, model: builtin:tiny-random, teacher: {teacher}}}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and teacher in err and "builtin:tiny-random" in err, err


def test_distils_from_a_separate_teacher(problems, tmp_path):
    teacher = tiny_model_dir(tmp_path / "teacher")  # same tokenizer, other weights
    out = output(tmp_path)
    artifact = onpolicy.run(config(teacher=teacher, max_steps=8, beta=0.5), problems, out)
    stats = artifact.stats
    assert (out.model_dir / "adapter_config.json").exists()
    assert stats["steps"] == 8 and stats["rows"] == 8 and stats["teacher"] == teacher
    assert stats["divergence_last"] < stats["divergence_first"]
    assert 1 <= stats["completion_length_mean"] <= 8 and stats["tokens_per_second"] > 0
