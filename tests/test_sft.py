"""The sft step: real TRL SFTTrainer + peft LoRA on builtin:tiny-random (a 2-layer Llama), a few steps on CPU."""

import pytest
from datasets import Dataset

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.steps import sft
from pipeline.training.build import model_card
from pipeline.training.template_check import completion_token_ids

EOS = "<|im_end|>"  # SmolLM2's end of turn, the eos of builtin:tiny-random


def arithmetic_conversations(count, long_answer_every=0):
    rows = []
    for i in range(count):
        answer = f"{i} + {i} = {2 * i}. The answer is \\boxed{{{2 * i}}}."
        if long_answer_every and i % long_answer_every == 0:
            answer = "Let me think. " * 60 + answer
        rows.append({"id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                 {"role": "assistant", "content": answer}]})
    return rows


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    step_dir = tmp_path_factory.mktemp("sft_data")
    Dataset.from_list(arithmetic_conversations(16)).save_to_disk(str(step_dir / "data"))
    return {"sft_data": Artifact("sft_data", "dataset", step_dir)}


def config(**overrides):
    settings = dict(uses="sft", input="sft_data", model="builtin:tiny-random", lora={"r": 8}, batch_size=4,
                    learning_rate=5e-3, logging_steps=1, max_length=128)
    return sft.Config(**{**settings, **overrides})


def output(tmp_path, name="sft", scratch="scratch"):
    return Output(name=name, kind="model", dir=tmp_path / name, scratch=tmp_path / scratch, seed=0)


def test_trained_tokens_are_the_completion_and_end_with_eos(sft_data, tmp_path):
    trainer, data_stats = sft.build_trainer(config(), sft_data, output(tmp_path))
    tokenizer = trainer.processing_class

    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert data_stats == {"rows": 16, "dropped_truncated": 0, "template_checked_rows": 16, "think_prefix": ""}
    assert len(trainer.train_dataset) == 16
    for row, source in zip(trainer.train_dataset, arithmetic_conversations(16)):
        trained = [token for token in row["labels"] if token != -100]
        assert row["labels"][0] == -100  # the prompt is not trained on
        assert tokenizer.decode(trained) == source["messages"][-1]["content"] + EOS + "\n"
        assert tokenizer.eos_token_id in trained
        # the template check tokenizes as the trainer does: its masked tokens are exactly the trained ones
        messages = source["messages"]
        assert completion_token_ids(tokenizer, messages[:-1], messages[-1]["content"]) == trained


def test_rows_truncated_before_eos_are_dropped(tmp_path):
    step_dir = tmp_path / "long_data"
    Dataset.from_list(arithmetic_conversations(8, long_answer_every=4)).save_to_disk(str(step_dir / "data"))
    inputs = {"sft_data": Artifact("sft_data", "dataset", step_dir)}

    trainer, data_stats = sft.build_trainer(config(), inputs, output(tmp_path))
    # rows 0 and 4 are longer than max_length=128; every row went through the template check
    assert data_stats == {"rows": 6, "dropped_truncated": 2, "template_checked_rows": 8, "think_prefix": ""}
    assert all(trainer.processing_class.eos_token_id in row["labels"] for row in trainer.train_dataset)

    with pytest.raises(UserError, match="max_length=40"):
        sft.build_trainer(config(max_length=40), inputs, output(tmp_path))


def test_lora_training_lowers_the_loss_and_saves_the_adapter(sft_data, tmp_path):
    artifact = sft.run(config(max_steps=12, save_steps=6), sft_data, output(tmp_path))

    stats = artifact.stats
    assert stats["adapter"] is True and stats["base_model"] == "builtin:tiny-random"
    assert stats["steps"] == 12 and stats["resumed_from_step"] == 0
    assert stats["train_loss_last"] < stats["train_loss_first"] - 0.5
    assert stats["tokens_seen"] > 0 and stats["tokens_per_second"] > 0
    model_dir = artifact.path / "model"
    assert (model_dir / "adapter_config.json").exists() and (model_dir / "adapter_model.safetensors").exists()
    assert (model_dir / "tokenizer_config.json").exists() and (model_dir / "chat_template.jinja").exists()
    assert "builtin:tiny-random" in (model_dir / "README.md").read_text()


def test_a_stopped_run_resumes_from_its_checkpoint(sft_data, tmp_path):
    # Constant learning rate, so a run stopped at step 4 and resumed to step 6 must match one straight run of 6.
    stopped = sft.run(config(max_steps=4, save_steps=2, lr_scheduler_type="constant"), sft_data,
                      output(tmp_path, "first"))
    assert stopped.stats["steps"] == 4
    resumed = sft.run(config(max_steps=6, save_steps=2, lr_scheduler_type="constant"), sft_data,
                      output(tmp_path, "second"))
    straight = sft.run(config(max_steps=6, save_steps=2, lr_scheduler_type="constant"), sft_data,
                       output(tmp_path, "straight", scratch="straight_scratch"))

    assert resumed.stats["resumed_from_step"] == 4 and resumed.stats["steps"] == 6
    assert resumed.stats["train_loss_first"] == stopped.stats["train_loss_first"]
    assert resumed.stats["tokens_seen"] == straight.stats["tokens_seen"]  # no batch skipped or repeated
    assert resumed.stats["train_loss_last"] == pytest.approx(straight.stats["train_loss_last"], abs=1e-4)


def test_full_fine_tuning_saves_the_whole_model(sft_data, tmp_path):
    artifact = sft.run(config(lora=None, max_steps=2, learning_rate=1e-3), sft_data, output(tmp_path))
    model_dir = artifact.path / "model"
    assert artifact.stats["adapter"] is False
    assert (model_dir / "config.json").exists() and (model_dir / "model.safetensors").exists()
    assert not (model_dir / "adapter_config.json").exists()


def test_bad_input_is_a_user_error(tmp_path):
    step_dir = tmp_path / "bad"
    Dataset.from_list([{"id": "x", "messages": [{"role": "user", "content": "hi"}]}]).save_to_disk(
        str(step_dir / "data"))
    with pytest.raises(UserError, match=r"'x' of dataset 'sft_data'"):
        sft.run(config(), {"sft_data": Artifact("sft_data", "dataset", step_dir)}, output(tmp_path))

    Dataset.from_list([{"id": "x", "text": "hi"}]).save_to_disk(str(tmp_path / "text" / "data"))
    with pytest.raises(UserError, match=r"'sft_data' lacks column\(s\) messages"):
        sft.run(config(), {"sft_data": Artifact("sft_data", "dataset", tmp_path / "text")}, output(tmp_path))


def test_a_batch_without_trained_tokens_is_an_error(sft_data, tmp_path):
    trainer, _ = sft.build_trainer(config(), sft_data, output(tmp_path))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert trainer.compute_loss(trainer.model, dict(batch)).item() > 0
    batch["labels"][:] = -100  # as if every completion had been cut away
    with pytest.raises(UserError, match="no trainable token"):
        trainer.compute_loss(trainer.model, batch)


def test_packed_and_padding_free_batches_train_on_the_same_tokens(tmp_path):
    # Length-skewed rows: padding wastes most of a padded batch, packing and padding-free waste none.
    step_dir = tmp_path / "skewed"
    Dataset.from_list(arithmetic_conversations(8, long_answer_every=4)).save_to_disk(str(step_dir / "data"))
    inputs = {"sft_data": Artifact("sft_data", "dataset", step_dir)}
    padded, _ = sft.build_trainer(config(max_length=512), inputs, output(tmp_path))
    packed, _ = sft.build_trainer(config(max_length=512, packing=True), inputs, output(tmp_path))
    padding_free, _ = sft.build_trainer(config(max_length=512, padding_free=True), inputs, output(tmp_path))

    def trained_tokens(trainer):
        batch = trainer.data_collator(list(trainer.train_dataset))
        return (batch["labels"] != -100).sum().item(), batch["input_ids"].numel(), trainer.compute_loss(
            trainer.model, batch).item()

    padded_trained, padded_size, padded_loss = trained_tokens(padded)
    for trainer in (packed, padding_free):
        trained, size, loss = trained_tokens(trainer)
        assert trained == padded_trained and size < padded_size
        # Same weights, same rows: rows never attend to each other, so the loss is the padded batch's.
        assert loss == pytest.approx(padded_loss, rel=1e-4)


def test_chat_template_override_and_gradient_checkpointing(sft_data, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    artifact = sft.run(config(chat_template=str(template), gradient_checkpointing=True, max_steps=1), sft_data,
                       output(tmp_path))
    saved = (artifact.path / "model" / "chat_template.jinja").read_text()
    assert saved == template.read_text()  # sampling and evaluation see the template it was trained with
    assert artifact.stats["steps"] == 1

    with pytest.raises(ValueError, match="file not found"):
        config(chat_template=str(tmp_path / "missing.jinja"))


def test_model_card_names_the_model_the_step_and_the_schedule():
    card = model_card(config(max_steps=5), "tuned",
                      facts=["base model: `builtin:tiny-random`", "training data: step `d`"])
    assert card == ("# tuned\n\nLoRA adapter (r=8) trained by the distillery `sft` step `tuned`.\n\n"
                    "- base model: `builtin:tiny-random`\n- training data: step `d`\n"
                    "- 1.0 epochs, max 5 steps, learning rate 0.005, batch 4 x 1\n")
    full = model_card(config(lora=None), "tuned", facts=[], trained="trained by REDI in", batch_unit=" pairs")
    assert full.startswith("# tuned\n\nFully fine-tuned model trained by REDI in the distillery `sft` step `tuned`.")
    assert full.endswith("batch 4 pairs x 1\n")
