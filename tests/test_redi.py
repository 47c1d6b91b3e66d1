"""The redi step: the REDI loss against a hand computation, and real TRL training on builtin:tiny-random."""

import json

import pytest
import torch
from datasets import Dataset

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.steps import merge, redi, sft
from pipeline.training.redi_trainer import redi_loss


def pair_rows(count):
    # Chosen and rejected differ in length, so a per-sequence normalisation that used the wrong length shows.
    return [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "chosen": [{"role": "assistant", "content": f"The answer is \\boxed{{{2 * i}}}."}],
             "rejected": [{"role": "assistant", "content": f"Adding them I think it is {2 * i + 1}, so "
                                                           f"\\boxed{{{2 * i + 1}}}."}]} for i in range(count)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    step_dir = tmp_path_factory.mktemp("pairs")
    Dataset.from_list(pair_rows(8)).save_to_disk(str(step_dir / "data"))
    return Artifact("pairs", "dataset", step_dir)


def config(**overrides):
    settings = dict(uses="redi", input="pairs", model="builtin:tiny-random", batch_size=4, learning_rate=5e-3,
                    warmup_ratio=0.0, logging_steps=1, max_length=128)
    return redi.Config(**{**settings, **overrides})


def output(tmp_path, name="redi"):
    return Output(name=name, kind="model", dir=tmp_path / name, scratch=tmp_path / f"{name}_scratch", seed=0)


def test_redi_loss_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    chosen_logps = -torch.rand(6, generator=generator) * 50
    rejected_logps = -torch.rand(6, generator=generator) * 50
    chosen_lengths = torch.tensor([3, 17, 5, 40, 1, 9])
    rejected_lengths = torch.tensor([30, 2, 11, 7, 25, 4])

    expected = sum(-c / lc + 0.8 * r / lr for c, lc, r, lr in zip(
        chosen_logps.tolist(), chosen_lengths.tolist(), rejected_logps.tolist(), rejected_lengths.tolist())) / 6
    assert redi_loss(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths).item() == pytest.approx(
        expected, rel=1e-6)
    # alpha = 0: length-normalised SFT on the chosen, whatever the rejected are.
    sft_loss = -(chosen_logps / chosen_lengths).mean()
    assert redi_loss(chosen_logps, chosen_lengths, rejected_logps * 3, rejected_lengths,
                     alpha=0.0).item() == pytest.approx(sft_loss.item(), rel=1e-6)
    assert redi_loss(chosen_logps, chosen_lengths, rejected_logps, rejected_lengths, alpha=1.0).item() == \
        pytest.approx((-(chosen_logps / chosen_lengths) + rejected_logps / rejected_lengths).mean().item(), rel=1e-6)


def test_gradients_reach_both_terms():
    chosen_logps = torch.tensor([-12.0, -30.0], requires_grad=True)
    rejected_logps = torch.tensor([-8.0, -20.0], requires_grad=True)
    lengths_chosen, lengths_rejected = torch.tensor([4, 10]), torch.tensor([2, 5])
    redi_loss(chosen_logps, lengths_chosen, rejected_logps, lengths_rejected, alpha=0.8).backward()
    # d/d chosen = -1 / (n * len); d/d rejected = alpha / (n * len): raise the chosen, lower the rejected.
    assert chosen_logps.grad.tolist() == pytest.approx([-1 / 8, -1 / 20])
    assert rejected_logps.grad.tolist() == pytest.approx([0.8 / 4, 0.8 / 10])


def test_trainer_loss_is_the_formula_in_one_forward_without_a_reference(pairs, tmp_path):
    # fp32, so the trainer's loss can be compared with a hand computation to 1e-4
    trainer, data_stats, _ = redi.build_trainer(config(lora=None, dtype="float32"), {"pairs": pairs}, output(tmp_path))
    assert trainer.ref_model is None and not trainer.is_peft  # full fine-tuning, and still no reference model
    assert (data_stats["rows"], data_stats["dropped_truncated"]) == (8, 0)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    calls = []
    hook = model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    try:
        loss = trainer.compute_loss(model, batch)
    finally:
        hook.remove()
    assert len(calls) == 1  # chosen and rejected in one forward, and no reference forward

    # By hand: full logits, log-softmax, the completion tokens' log-probs summed, divided by each one's own length.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].float()
    eos_id = trainer.processing_class.eos_token_id
    for row, row_mask in zip(batch["input_ids"], batch["completion_mask"]):
        assert eos_id in row[row_mask.bool()]  # |y| counts the eos
    summed, lengths = (token_logps * mask).sum(1), mask.sum(1)
    assert lengths[:4].tolist() != lengths[4:].tolist()
    expected = (-(summed[:4] / lengths[:4]) + 0.8 * (summed[4:] / lengths[4:])).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)


def test_no_reference_copy_is_loaded_under_fsdp(pairs, tmp_path, monkeypatch):
    """Under FSDP, DPOTrainer builds a reference model for its precompute even for full fine-tuning; REDI must not."""
    from transformers import AutoModelForCausalLM, Trainer

    create_accelerator = Trainer.create_accelerator_and_postprocess

    def as_if_fsdp(self):  # FSDP needs GPUs; what TRL reads is this flag, set here as the Trainer does
        create_accelerator(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_if_fsdp)
    loads = []
    load = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *args, **kwargs: loads.append(args) or load(cls, *args, **kwargs)))
    trainer, _, _ = redi.build_trainer(config(lora=None), {"pairs": pairs}, output(tmp_path))
    assert trainer.is_fsdp_enabled and trainer.ref_model is None
    assert len(loads) == 1  # the policy; no reference copy


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    """A finished sft step (LoRA on tiny-random) trained on the chosen answers, as REDI's stage 1."""
    root = tmp_path_factory.mktemp("stage1")
    rows = [{"id": row["id"], "messages": row["prompt"] + row["chosen"]} for row in pair_rows(8)]
    Dataset.from_list(rows).save_to_disk(str(root / "sft_data" / "data"))
    cfg = sft.Config(uses="sft", input="sft_data", model="builtin:tiny-random", lora={"r": 8}, max_steps=2,
                     batch_size=4, learning_rate=5e-3, max_length=128)
    out = Output(name="sft", kind="model", dir=root / "sft", scratch=root / "scratch", seed=0)
    stats = sft.run(cfg, {"sft_data": Artifact("sft_data", "dataset", root / "sft_data")}, out).stats
    return Artifact("sft", "model", root / "sft", key="k-sft", stats=stats)


def test_redi_from_an_sft_adapter_raises_chosen_and_lowers_rejected(pairs, sft_adapter, tmp_path):
    from peft.utils import load_peft_weights

    inputs = {"pairs": pairs, "sft": sft_adapter}
    trainer, _, lineage = redi.build_trainer(config(model="step:sft"), inputs, output(tmp_path, "probe"))
    assert lineage == {"base_model": "builtin:tiny-random", "adapter_from": "step:sft"}
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config
    saved = load_peft_weights(str(sft_adapter.model_dir))
    loaded = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
    name = next(iter(loaded))
    saved_name = name.replace(".default", "")
    assert torch.equal(loaded[name].detach(), saved[saved_name])  # the sft adapter is where REDI starts
    del trainer

    artifact = redi.run(config(model="step:sft", max_steps=6), inputs, output(tmp_path))
    history = json.loads(sorted((tmp_path / "redi_scratch" / "checkpoints").glob("checkpoint-*"))[-1]
                         .joinpath("trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "redi/chosen_norm" in entry]
    assert len(logged) == 6  # every logging step carries the REDI metrics
    first, last = logged[0], logged[-1]
    assert last["redi/chosen_norm"] > first["redi/chosen_norm"]
    assert last["redi/rejected_norm"] < first["redi/rejected_norm"]
    assert last["redi/margin"] == pytest.approx(last["redi/chosen_norm"] - last["redi/rejected_norm"], abs=1e-3)

    stats = artifact.stats
    assert stats["adapter"] is True and stats["base_model"] == "builtin:tiny-random"
    assert stats["adapter_from"] == "step:sft" and stats["steps"] == 6
    assert (artifact.path / "model" / "adapter_config.json").exists()
    assert "step:sft" in (artifact.path / "model" / "README.md").read_text()

    # The REDI adapter sits on the original base model, so merge folds it in like an sft adapter.
    merged = merge.run(merge.Config(uses="merge", input="redi"), {"redi": artifact}, output(tmp_path, "merged"))
    assert merged.stats["max_abs_logit_diff"] <= 1e-3 and merged.stats["base_model"] == "builtin:tiny-random"


def test_bad_pairs_are_user_errors(tmp_path):
    def inputs_with(rows, name):
        Dataset.from_list(rows).save_to_disk(str(tmp_path / name / "data"))
        return {"pairs": Artifact("pairs", "dataset", tmp_path / name)}

    no_rejected = [{key: value for key, value in row.items() if key != "rejected"} for row in pair_rows(2)]
    with pytest.raises(UserError, match="lacks column.*rejected"):
        redi.run(config(), inputs_with(no_rejected, "a"), output(tmp_path))

    wrong_role = pair_rows(2)
    wrong_role[1]["chosen"] = [{"role": "user", "content": "hi"}]
    with pytest.raises(UserError, match=r"'p1' of dataset 'pairs': column 'chosen'"):
        redi.run(config(), inputs_with(wrong_role, "b"), output(tmp_path))

    with pytest.raises(UserError, match="max_length=20"):
        redi.run(config(max_length=20), inputs_with(pair_rows(2), "c"), output(tmp_path))


def test_an_adapter_model_with_new_lora_settings_is_refused(pairs, sft_adapter, tmp_path):
    with pytest.raises(UserError, match="is a LoRA adapter"):
        redi.build_trainer(config(model="step:sft", lora={"r": 4}), {"pairs": pairs, "sft": sft_adapter},
                           output(tmp_path))


# ---- long traces: the completion log-probs in chunks (pipeline.training.token_logprobs) -------------------------------------


def full_logits_logprobs(hidden, weight, bias, labels):
    """The unchunked computation: log_softmax of the full logits, gathered at the labels, 0 where labels is -100."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    gathered = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return gathered * (labels != -100)


def random_head_inputs(with_bias, rows=3, length=10, hidden_size=16, vocab=50):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, length, hidden_size, generator=generator, requires_grad=True)
    weight = (0.5 * torch.randn(vocab, hidden_size, generator=generator)).requires_grad_()
    bias = torch.randn(vocab, generator=generator, requires_grad=True) if with_bias else None
    labels = torch.randint(0, vocab, (rows, length), generator=generator)
    labels[0, :4] = -100  # a prompt
    labels[2, -2:] = -100  # padding
    upstream = torch.randn(rows, length, generator=generator)  # weights each log-prob's gradient differently
    return hidden, weight, bias, labels, upstream


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 8, 5, 7, 100])  # 24 scored positions: divided, not divided, one chunk
def test_chunked_logprobs_and_gradients_equal_the_full_logits(chunk_size, with_bias):
    from pipeline.training.token_logprobs import token_logprobs

    hidden, weight, bias, labels, upstream = random_head_inputs(with_bias)
    assert (labels != -100).sum() == 24
    params = [hidden, weight] + ([bias] if with_bias else [])

    chunked = token_logprobs(hidden, weight, bias, labels, chunk_size)
    chunked_grads = torch.autograd.grad((chunked * upstream).sum(), params)
    full = full_logits_logprobs(hidden, weight, bias, labels)
    full_grads = torch.autograd.grad((full * upstream).sum(), params)

    assert chunked.dtype == torch.float32 and chunked.shape == labels.shape
    assert torch.all(chunked[labels == -100] == 0)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    for chunked_grad, full_grad in zip(chunked_grads, full_grads):
        assert full_grad.abs().max() > 0.1  # gradients large enough for a 1e-5 tolerance to mean something
        torch.testing.assert_close(chunked_grad, full_grad, atol=1e-5, rtol=0)
    assert torch.all(chunked_grads[0][labels == -100] == 0)  # unscored positions get no gradient


def test_chunked_logprobs_never_hold_the_logits_of_every_position():
    """No tensor made in forward or backward is as large as the logits of all scored positions."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.training.token_logprobs import token_logprobs

    class LargestOutput(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for tensor in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(tensor, torch.Tensor):
                    self.numel = max(self.numel, tensor.numel())
            return result

    hidden, weight, bias, labels, upstream = random_head_inputs(False, rows=4, length=32, vocab=2000)
    scored, chunk_size = int((labels != -100).sum()), 8
    for compute, chunk_bound in ((lambda: token_logprobs(hidden, weight, None, labels, chunk_size), True),
                                 (lambda: full_logits_logprobs(hidden, weight, None, labels), False)):
        with LargestOutput() as largest:
            (compute() * upstream).sum().backward()
        if chunk_bound:  # a chunk's logits, or the weight's gradient
            assert largest.numel <= max(chunk_size * weight.shape[0], weight.numel())
        else:  # the check can fail: the unchunked computation makes the logits of every position (and more)
            assert largest.numel >= scored * weight.shape[0]


def test_chunked_logprobs_under_bf16_autocast():
    from pipeline.training.token_logprobs import token_logprobs

    hidden, weight, bias, labels, upstream = random_head_inputs(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = token_logprobs(hidden, weight, bias, labels, chunk_size=5)
        full = full_logits_logprobs(hidden, weight, bias, labels)  # the model's own head: bf16 logits
    chunked_grads = torch.autograd.grad((chunked * upstream).sum(), [hidden, weight, bias])
    full_grads = torch.autograd.grad((full * upstream).sum(), [hidden, weight, bias])
    exact = full_logits_logprobs(hidden, weight, bias, labels)  # float32

    assert chunked.dtype == torch.float32
    assert [grad.dtype for grad in chunked_grads] == [torch.float32] * 3
    # The projection ran in bf16 like the model's own head (off float32 by bf16 rounding), the rest in float32.
    assert 1e-4 < (chunked - exact).abs().max() < 0.1
    torch.testing.assert_close(chunked, full, atol=0.05, rtol=0)
    for chunked_grad, full_grad in zip(chunked_grads, full_grads):
        torch.testing.assert_close(chunked_grad, full_grad, atol=0.05, rtol=0.02)


def test_heads_the_chunks_would_get_wrong_are_refused():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.training.token_logprobs import UnsupportedHead, add_token_logprob_forward

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    add_token_logprob_forward(LlamaForCausalLM(config))
    with_head_adapter = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(UnsupportedHead, match="peft.*not a plain torch.nn.Linear"):  # its LoRA would be skipped
        add_token_logprob_forward(with_head_adapter.get_base_model())
    config.final_logit_softcapping = 30.0  # Gemma 2's logits: 30 * tanh(logits / 30)
    with pytest.raises(UnsupportedHead, match="final_logit_softcapping=30.0"):
        add_token_logprob_forward(LlamaForCausalLM(config))


@pytest.mark.parametrize("one_sequence_at_a_time", [False, True], ids=["batch", "sequences"])
@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_trainer_loss_and_gradients_equal_the_unchunked_computation(pairs, tmp_path, monkeypatch, lora,
                                                                     one_sequence_at_a_time):
    # 7 positions per chunk: the completions' token counts are not multiples of it, and each spans several chunks.
    monkeypatch.setattr("pipeline.training.redi_trainer.LOGPROB_CHUNK_SIZE", 7)
    cfg = config(lora=lora, dtype="float32", one_sequence_at_a_time=one_sequence_at_a_time)
    trainer, _, _ = redi.build_trainer(cfg, {"pairs": pairs}, output(tmp_path))
    model = trainer.model
    base = model.get_base_model() if trainer.is_peft else model
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # tied: both uses add up
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # Padded: one sequence at a time cuts each after its last token, so that cut is checked too.
    assert (batch["attention_mask"] == 0).any()
    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]

    loss = trainer.compute_loss(model, batch)
    chunked_grads = torch.autograd.grad(loss, [param for _, param in trained])

    # The old way: the model's own forward, full logits, log-softmax, gathered; the REDI formula on top.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    logps, lengths = (token_logps * (labels != -100)).sum(1), (labels != -100).sum(1)
    assert lengths.max() > 2 * 7
    expected = redi_loss(logps[:4], lengths[:4], logps[4:], lengths[4:], alpha=0.8)
    full_grads = torch.autograd.grad(expected, [param for _, param in trained])

    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    largest = max(grad.abs().max() for grad in full_grads)
    assert largest > 1e-2
    for (name, _), chunked_grad, full_grad in zip(trained, chunked_grads, full_grads):
        torch.testing.assert_close(chunked_grad, full_grad, atol=1e-5, rtol=0, msg=lambda text: f"{name}: {text}")


def test_an_adapter_on_the_output_head_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="leave lm_head out of target_modules"):
        config(lora={"r": 4, "target_modules": ["q_proj", "lm_head"]})
    config(lora={"r": 4, "target_modules": "all-linear"})  # every linear layer but the head


@pytest.mark.filterwarnings("ignore:`use_liger_kernel=True` is deprecated:FutureWarning")  # TRL's, on every use
def test_use_liger_kernel_trains_the_redi_loss(pairs, tmp_path, monkeypatch):
    """With use_liger_kernel, Liger's kernels go into the layers and the loss optimised is still REDI's: DPOTrainer
    keeps Liger's fused linear cross-entropy off, and no DPO loss is computed."""
    import transformers.trainer
    import transformers.utils

    with pytest.raises(UserError, match="redi: use_liger_kernel needs the liger-kernel package"):
        redi.build_trainer(config(lora=None, use_liger_kernel=True), {"pairs": pairs}, output(tmp_path, "missing"))

    applied = []  # liger-kernel's Triton kernels need a GPU: here the Trainer's call to apply them is recorded
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", lambda model, config: applied.append(config))
    cfg = config(lora=None, dtype="float32", use_liger_kernel=True, batch_size=8, max_steps=1)
    trainer, _, _ = redi.build_trainer(cfg, {"pairs": pairs}, output(tmp_path))
    assert trainer.args.use_liger_kernel

    # The REDI loss of all 8 pairs (the one step's batch) before the step, from full logits.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    token_logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    logps, lengths = (token_logps * (labels != -100)).sum(1), (labels != -100).sum(1)
    expected = redi_loss(logps[:8], lengths[:8], logps[8:], lengths[8:], alpha=0.8).item()
    dpo_loss = -torch.nn.functional.logsigmoid(torch.tensor(0.0)).item()  # DPO's loss at the start: log 2

    trainer.train()
    assert applied == [{"fused_linear_cross_entropy": False}]
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(expected, abs=2e-4) and abs(expected - dpo_loss) > 0.1
    assert "redi/margin" in logged and not any(key.startswith("rewards/") for key in logged)
