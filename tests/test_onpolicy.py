"""The onpolicy step: distillation from a separate teacher with TRL's DistillationTrainer, the tokenizer check, and a
teacher with another tokenizer through TRL's GOLDTrainer."""

import json
import math

import pytest
from datasets import Dataset

from pipeline.commands.cli import main
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.models import resolve_model
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
def test_without_cross_tokenizer_a_teacher_with_another_tokenizer_is_refused_naming_both(problems, tmp_path, change,
                                                                                         expected):
    teacher = tiny_model_dir(tmp_path / "teacher", **change)
    with pytest.raises(UserError) as refused:
        onpolicy.build_trainer(config(teacher=teacher, cross_tokenizer=False), problems, output(tmp_path))
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
                      f"  distil: {{uses: onpolicy, input: problems, model: builtin:tiny-random, teacher: {teacher}, "
                      "cross_tokenizer: off}\n")
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


def other_family_model_dir(path):
    """A tiny random Llama with a tokenizer of another family, built here from SmolLM2's: ByteLevel BPE with only its
    first 40,000 merges of 48,900 (rarer words split into more pieces), every id moved (the ids run backwards), other
    special tokens and another chat template. (Measured: against a BPE trained on a few sentences, 320 tokens that
    split the student's rollouts into single bytes, the loss of the test below only went from 0.42 to 0.38-0.40.)"""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    smollm2 = json.loads(AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-random")).backend_tokenizer.to_str())
    kept_merges = [tuple(merge) for merge in smollm2["model"]["merges"][:40000]]
    pieces = list(pre_tokenizers.ByteLevel.alphabet()) + [left + right for left, right in kept_merges]
    vocab = {piece: index for index, piece in enumerate(reversed(list(dict.fromkeys(pieces))))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=kept_merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<|begin|>", "<|end|>", "<|pad|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin|>", eos_token="<|end|>",
                                        pad_token="<|pad|>")
    tokenizer.chat_template = ("{% for m in messages %}<|begin|>{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|begin|>assistant: {% endif %}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(2)
    LlamaForCausalLM(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_gold_onpolicy_distils_from_a_teacher_with_another_tokenizer(problems, tmp_path):
    from transformers import AutoTokenizer

    teacher = other_family_model_dir(tmp_path / "teacher")
    out = output(tmp_path)
    # A full fine-tune at a high rate: under LoRA, tiny-random's tied output head stays frozen and keeps the student
    # near uniform over its 49,152 tokens, and the loss nearly flat. beta 0.5 (JSD): with reverse KL the loss moves
    # with the sampled rollouts about as much as with learning.
    settings = config(teacher=teacher, lora=None, learning_rate=1e-2, beta=0.5, max_steps=4)
    artifact = onpolicy.run(settings, problems, out)
    stats = artifact.stats
    assert stats["trl_trainer"] == "GOLDTrainer" and stats["alignment"] == "byte-offset", stats
    assert stats["steps"] == 4 and stats["tokens_per_second"] > 0 and 1 <= stats["completion_length_mean"] <= 8
    logged = [entry for entry in json.loads((out.dir / "log_history.json").read_text()) if "loss" in entry]
    losses = [entry["loss"] for entry in logged]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    assert all("matched_loss" in entry and "unmatched_loss" in entry for entry in logged)  # GOLD's hybrid ULD loss
    # Measured: at a learning rate of 1e-7 the loss wanders between 0.099 and 0.126 over 6 steps (the rollouts
    # change); at 1e-2 it falls from 0.107 to 0.006 by the fourth step. Half the first value takes learning.
    assert losses[-1] < 0.5 * losses[0], losses
    assert len(AutoTokenizer.from_pretrained(str(out.model_dir))) == 49152  # the student's tokenizer is saved
