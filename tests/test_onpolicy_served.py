"""onpolicy with a served teacher (`teacher: {base_url, model}`): the recipe checks, the key, and (slow) a real
`vllm serve` of builtin:tiny-random on loopback: its per-token log-probs equal the local teacher's (an HF forward of
the same weights) to 1e-3, a few training steps through TRL's ServerDistillationTrainer, the manifest's server
identity, and the refusals of an unknown model name and of a student with another tokenizer."""

import math

import pytest
from pydantic import ValidationError

from pipeline.core.errors import UserError
from pipeline.core.keys import keyed_config
from pipeline.core.models import resolve_model
from pipeline.steps import onpolicy
from pipeline.training.served_teacher import ServedTeacher, check_tokenizer, describe_server
from tests.test_onpolicy import config, output, problems, tiny_model_dir  # noqa: F401 (problems: a fixture)
from tests.test_vllm_serve import start_server, stop_server


def test_a_served_teacher_is_not_a_model_reference_and_a_local_teacher_keys_as_before():
    served = config(teacher={"base_url": "http://127.0.0.1:8000/v1", "model": "tiny"})
    assert served.model_refs() == ["builtin:tiny-random"]
    assert served.teacher.server_root() == "http://127.0.0.1:8000"
    assert keyed_config(served)["teacher"] == {"base_url": "http://127.0.0.1:8000/v1", "model": "tiny", "top_k": None}
    local = config()
    assert local.model_refs() == ["builtin:tiny-random", "builtin:tiny-random"]
    assert keyed_config(local)["teacher"] == "builtin:tiny-random"  # a plain string, as before the served teacher


@pytest.mark.parametrize("overrides, expected", [
    ({"beta": 0.5, "teacher": {"base_url": "http://h/v1", "model": "t", "top_k": 5}}, "takes teacher.top_k 1 only"),
    ({"beta": 0.0, "temperature": 0.7, "teacher": {"base_url": "http://h/v1", "model": "t"}}, "needs temperature 1.0"),
    ({"teacher": {"base_url": "http://h/v1", "model": "t", "api_key": "x"}}, "Extra inputs are not permitted"),
])
def test_settings_the_server_path_cannot_honour_are_refused(overrides, expected):
    with pytest.raises(ValidationError, match=expected):
        config(**overrides)


def test_top_k_defaults_by_beta():
    assert ServedTeacher(base_url="http://h/v1", model="t").loss_top_k(0.0) == 20
    assert ServedTeacher(base_url="http://h/v1", model="t").loss_top_k(1.0) == 1


def test_an_unreachable_server_is_a_user_error():
    with pytest.raises(UserError, match="no model list from http://127.0.0.1:9/v1/models"):
        describe_server(ServedTeacher(base_url="http://127.0.0.1:9/v1", model="tiny"), timeout=2)


@pytest.fixture(scope="module")
def server():
    # float32: vLLM serves a float32 checkpoint in 16 bits by default, which would not match HF's float32 to 1e-3
    process, base_url = start_server(resolve_model("builtin:tiny-random"), "--dtype", "float32")
    yield base_url
    stop_server(process)


def local_logprobs(sequence: list[int]):
    """log softmax of the local teacher (HF forward of builtin:tiny-random, float32) at every position."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-random"), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.slow
def test_served_teacher_log_probs_equal_the_local_teachers_and_it_trains(problems, server, tmp_path):  # noqa: F811
    cfg = config(teacher={"base_url": server, "model": "tiny", "top_k": 5}, beta=0.0, max_steps=2, batch_size=2)
    trainer, data_stats = onpolicy.build_trainer(cfg, problems, output(tmp_path))
    assert data_stats["trl_trainer"] == "ServerDistillationTrainer" and data_stats["teacher_top_k"] == 5
    assert data_stats["served_teacher"] == {"base_url": server, "model": "tiny",
                                            "served_root": resolve_model("builtin:tiny-random"), "max_model_len": 512}

    # the log-probs the loss reads: TRL's client on a prompt + completion, against an HF forward of the same weights
    tokenizer = trainer.processing_class
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 5?"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
    sequence = prompt + tokenizer.encode("The answer is 7, I think.", add_special_tokens=False)
    served = trainer.teacher_client.get_sequence_logprobs([sequence], [len(prompt)], top_logprobs=5)
    local = local_logprobs(sequence)
    positions = range(len(prompt), len(sequence))
    assert len(served["logprobs"][0]) == len(positions)
    worst = 0.0
    for row, position in enumerate(positions):
        expected = local[position - 1]  # the distribution that predicts token `position`
        ids, values = served["logprob_token_ids"][0][row], served["logprobs"][0][row]
        # the server's top 5 are the local top 5 (up to ties within the tolerance)
        assert len(ids) == 5 and min(expected[ids].tolist()) >= expected.topk(5).values[-1].item() - 1e-3
        for token, value in zip(ids, values, strict=True):
            worst = max(worst, abs(value - expected[token].item()))
        actual = served["actual_logprobs"][0][row][0]
        if math.isfinite(actual):
            worst = max(worst, abs(actual - expected[sequence[position]].item()))
    assert worst <= 1e-3, worst

    # a student with the teacher's tokenizer and other weights, so that there is a divergence to learn from
    student = tiny_model_dir(tmp_path / "student")
    stats = onpolicy.train(cfg.model_copy(update={"model": student}), problems, output(tmp_path, "trained"))
    assert stats["steps"] == 2 and stats["trl_trainer"] == "ServerDistillationTrainer"
    assert stats["served_teacher"]["served_root"] == resolve_model("builtin:tiny-random")
    assert stats["teacher"] == f"{server} tiny"
    assert math.isfinite(stats["divergence_first"]) and stats["divergence_first"] > 0
    assert (tmp_path / "trained" / "model" / "adapter_config.json").exists()


@pytest.mark.slow
def test_a_served_teacher_refuses_an_unknown_name_and_another_tokenizer(server, tmp_path):
    with pytest.raises(UserError, match=r"does not serve teacher.model 'other' \(it serves: 'tiny'\)"):
        describe_server(ServedTeacher(base_url=server, model="other"))
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(tiny_model_dir(tmp_path / "student", extra_token="<|tool_call|>"))
    with pytest.raises(UserError, match="tokenizes differently from the student"):
        check_tokenizer(ServedTeacher(base_url=server, model="tiny"), student)
    check_tokenizer(ServedTeacher(base_url=server, model="tiny"),
                    AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-random")))


def test_the_cli_exits_2_when_the_served_teacher_cannot_be_reached(tmp_path, capsys):
    from pipeline.commands.cli import main

    data = tmp_path / "problems.jsonl"
    data.write_text('{"id": "a", "problem": "What is 1 + 1?", "answer": "2"}\n')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: served\nworkdir: {tmp_path / 'runs'}\nsteps:\n"
                      f"  problems: {{uses: load, path: {data}}}\n"
                      "  distil: {uses: onpolicy, input: problems, model: builtin:tiny-random, max_steps: 1,\n"
                      "           teacher: {base_url: 'http://127.0.0.1:9/v1', model: tiny}}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "teacher.base_url http://127.0.0.1:9/v1: no model list" in err and "Traceback" not in err, err
