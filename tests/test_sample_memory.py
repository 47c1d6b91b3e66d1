"""The sample step with its engine replaced by a stand-in (no vLLM): its memory is bounded by a chunk, not by the
run's output; a run resumed from shards writes the uninterrupted run's dataset and stats; columns are typed as
before the step wrote the dataset chunk by chunk (Arrow's inference over the whole column)."""

import tracemalloc

import pytest
from datasets import Dataset

from pipeline.core.artifacts import Artifact, Output
from pipeline.engines import vllm_local
from pipeline.engines.request import Completion, Generations
from pipeline.steps import sample
from pipeline.text.prompts import DEFAULT_PROMPT_TEMPLATE, render_prompt


class Killed(Exception):
    pass


def stand_in(text, *, stop_after=None, on_start=None):
    """An engine that hands out `text(problem id, k)` chunk by chunk through `on_chunk`, as the engines do (keeping
    every Completion in the list it returns); with `stop_after`, it dies after that many chunks."""
    def generate(request, *, on_chunk, **_):
        if on_start is not None:
            on_start()
        completions, done = [[] for _ in request.prompts], 0
        for chunk, rows in enumerate(request.chunks):
            if chunk in request.skip_chunks:
                continue
            if done == stop_after:
                raise Killed
            made = [[Completion(text(request.ids[p], k), ("stop", "length")[(p + k) % 2], 10 + p, 100 + k)
                     for k in range(request.n)] for p in rows]
            completions[rows.start:rows.stop] = made
            on_chunk(chunk, made, 0.5 + chunk)
            done += 1
        return Generations(completions, load_seconds=2.0)
    return generate


def run_sample(workdir, count, monkeypatch, text, *, stop_after=None, on_start=None, rows=None, **config):
    rows = rows if rows is not None else [{"id": f"q{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1),
                                           "level": i % 3} for i in range(count)]
    if not (workdir / "problems").exists():
        problems = Dataset.from_list(rows) if rows else Dataset.from_dict({"id": [], "problem": [], "answer": []})
        problems.save_to_disk(str(workdir / "problems" / "data"), num_shards=1)
    monkeypatch.setattr(vllm_local, "generate", stand_in(text, stop_after=stop_after, on_start=on_start))
    cfg = sample.Config(uses="sample", input="problems", model="builtin:tiny-random", **config)
    out = Output(name="samples", kind="dataset", dir=workdir / "samples", scratch=workdir / "scratch", seed=0)
    return sample.run(cfg, {"problems": Artifact("problems", "dataset", workdir / "problems")}, out)


def test_memory_holds_about_a_chunk_of_completions_not_the_run(tmp_path, monkeypatch):
    chunks, n, chars = 40, 2, 1_000_000
    filler = "Let me check that again. " * (chars // 25)

    def text(problem_id, k):  # a new string each time, as an engine's would be
        return f"<think>\n{filler}{problem_id}/{k}\n</think>\n\nThe answer is \\boxed{{{k}}}."

    try:  # traced from the engine's start: the step's tokenizer, loaded before, holds ~150 MB of its own
        artifact = run_sample(tmp_path, chunks, monkeypatch, text, n=n, chunk_size=1, on_start=tracemalloc.start)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    chunk_text = n * chars
    assert artifact.stats["rows"] == chunks * n
    # before: every completion as a Python string for the whole run, then reasoning and response too (126 chunks)
    assert peak < 3 * chunk_text, f"peak Python allocation {peak / chunk_text:.1f} chunks' worth of text"


def test_a_run_resumed_from_shards_writes_the_uninterrupted_runs_dataset(tmp_path, monkeypatch):
    def text(problem_id, k):  # some with a think span, some without: reasoning None in places
        return f"<think>\nwork {problem_id}\n</think>\n\nanswer {k}" if k else f"plain {problem_id}"

    settings = dict(n=3, chunk_size=2, system_prompt="Be brief.")
    whole = run_sample(tmp_path / "whole", 7, monkeypatch, text, **settings)
    with pytest.raises(Killed):
        run_sample(tmp_path / "killed", 7, monkeypatch, text, stop_after=2, **settings)
    resumed = run_sample(tmp_path / "killed", 7, monkeypatch, text, **settings)

    expected, got = whole.dataset(), resumed.dataset()
    assert got.to_list() == expected.to_list() and got.features == expected.features
    assert got.column_names == ["id", "problem", "answer", "level", *sample.SAMPLE_COLUMNS]
    assert got["id"] == [f"q{i}" for i in range(7) for _ in range(3)] and got["sample_idx"] == [0, 1, 2] * 7
    assert got["completion"] == [text(f"q{i}", k) for i in range(7) for k in range(3)]
    assert got["reasoning"] == [f"work q{i}" if k else None for i in range(7) for k in range(3)]
    assert got["prompt"][0] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": render_prompt(DEFAULT_PROMPT_TEMPLATE,
                                                                                 {"problem": "What is 0 + 1?"})}]
    timings = ("seconds", "chunks_resumed")
    assert {k: v for k, v in resumed.stats.items() if k not in timings} == \
        {k: v for k, v in whole.stats.items() if k not in timings}
    assert (resumed.stats["chunks"], resumed.stats["chunks_resumed"], whole.stats["chunks_resumed"]) == (4, 2, 0)
    assert whole.stats["completion_tokens"] == sum(got["completion_tokens"])
    assert whole.stats["prompt_tokens"] == sum(got["prompt_tokens"][::3])
    assert whole.stats["prompt_tokens_sent"] == sum(got["prompt_tokens"])
    assert whole.stats["finish_stop"] + whole.stats["finish_length"] == 21
    assert whole.stats["generate_seconds"] == 0.5 + 1.5 + 2.5 + 3.5


def test_columns_are_typed_by_all_their_values(tmp_path, monkeypatch):
    """Arrow types a column of None alone as null: the step must too, over the whole column, not per chunk."""
    def text(problem_id, k):  # a think span only after the first chunk
        return "no span" if problem_id in ("q0", "q1") else "<think>\nx\n</think>\n\ny"

    mixed = run_sample(tmp_path / "mixed", 5, monkeypatch, text, n=2, chunk_size=2).dataset()
    assert mixed.features["reasoning"].dtype == "string" and mixed["reasoning"][:4] == [None] * 4
    assert mixed.features["prompt_text"].dtype == "string"
    plain = run_sample(tmp_path / "plain", 2, monkeypatch, lambda i, k: "no span", n=2, chunk_size=1).dataset()
    assert plain.features["reasoning"].dtype == "null" and plain["reasoning"] == [None] * 4

    empty = run_sample(tmp_path / "empty", 0, monkeypatch, text, rows=[], n=2)
    assert empty.stats["rows"] == 0 and empty.stats["generate_seconds"] == 0
    assert all(empty.dataset().features[c].dtype == "null" for c in sample.SAMPLE_COLUMNS)
