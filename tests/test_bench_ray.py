"""`distill bench ray`: registered (and left out of `all`), its arithmetic (engine vs driver seconds, the fit through
two sizes), its problems and long-chunk case, and the driver's seconds in the Ray engine's manifest stats; none of it
starts Ray except the slow end-to-end run."""

import importlib
import json
import types

import pytest

from pipeline.commands.bench import BENCHMARKS, NOT_IN_ALL, run_benchmarks, run_child
from pipeline.commands.bench.ray import DRIVER_OWN_PHASES, decode_model, fit, long_chunk, per_gb, problems, summarize
from pipeline.commands.cli import build_parser, main
from pipeline.engines.ray_replicas import DRIVER_PHASES, RayGenerations


def test_ray_is_a_benchmark_named_on_its_own_with_its_flags(capsys):
    assert "ray" in BENCHMARKS and "ray" in NOT_IN_ALL
    args = build_parser().parse_args(["bench", "ray", "--ray-prompts", "2000,10000", "--ray-replicas", "1"])
    assert args.targets == ["ray"] and args.ray_prompts == [2000, 10000] and args.ray_replicas == 1
    defaults = build_parser().parse_args(["bench", "ray"])
    assert defaults.ray_prompts == [2000, 10000] and defaults.ray_model == "builtin:tiny-random"
    assert defaults.ray_max_tokens == 8 and defaults.ray_chunk_size == 64 and defaults.ray_replicas == 2
    for bad in ("10000,2000", "0", "ten"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "ray", "--ray-prompts", bad])
    assert "prompt counts" in capsys.readouterr().err


def test_all_runs_every_benchmark_but_ray(monkeypatch):
    ran = []
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name.startswith("pipeline.commands.bench."):
            short = name.rsplit(".", 1)[1]
            return types.SimpleNamespace(run=lambda opts, console: (ran.append(short) or ({}, {})))
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    monkeypatch.setattr("pipeline.core.env.device", lambda: "cpu (test)")
    console = types.SimpleNamespace(print=lambda *a, **k: None)
    run_benchmarks(["all"], types.SimpleNamespace(json=None), console)
    assert ran == ["sample", "verify", "train", "cache", "data"]  # decode is part of sample
    ran.clear()
    run_benchmarks(["ray"], types.SimpleNamespace(json=None), console)
    assert ran == ["ray"]


def sample_stats(wall_inside: float, load: float, span: float, generate: tuple[float, float], phases: dict) -> dict:
    return {"seconds": wall_inside, "rows": 1000, "chunks": 16, "completion_tokens": 8000,
            "ray": {"span_seconds": span, "driver_seconds": phases,
                    "per_replica": {"a": {"load_seconds": load, "generate_seconds": generate[0]},
                                    "b": {"load_seconds": load - 1, "generate_seconds": generate[1]}}}}


def test_summarize_splits_the_wall_into_engine_and_driver():
    phases = {"ray_start": 4.0, "dataset": 0.5, "waiting": 30.0, "results": 0.25, "on_chunk": 1.0, "finish": 2.0}
    seconds = summarize(2, 45.0, sample_stats(38.0, 8.0, 12.0, (10.0, 9.0), phases), verify_s=5.0)["seconds"]
    assert seconds["engine"] == 20.0 and seconds["engine_load"] == 8.0 and seconds["engine_span"] == 12.0
    assert seconds["engine_generate"] == 19.0 and seconds["replica_idle"] == 2 * 12.0 - 19.0
    assert seconds["driver"] == 45.0 - 20.0
    assert seconds["step_outside_generate"] == 45.0 - 38.0
    assert seconds["driver_own"] == 4.0 + 0.5 + 0.25 + 1.0 + 2.0 + 7.0
    assert seconds["ray_other"] == 30.0 - 20.0 and seconds["verify"] == 5.0
    assert set(DRIVER_OWN_PHASES) == set(DRIVER_PHASES) - {"waiting"}


def test_fit_separates_what_grows_with_the_prompts_from_what_is_paid_once():
    # 3 s fixed + 0.002 s per prompt (20 s per 10,000)
    seconds = {n: {"wall": 3 + 0.002 * n, "verify": 1.0} for n in (2000, 10_000)}
    fitted = fit([2000, 10_000], seconds)
    assert fitted["marginal_per_10k_prompts_s"] == {"wall": 20.0, "verify": 0.0}
    assert fitted["fixed_s"] == {"wall": 3.0, "verify": 1.0}


def test_problems_are_unique_and_answered():
    rows = problems(500)
    assert len(set(rows["id"])) == 500 and rows == problems(500)
    a, b = (int(x) for x in rows["problem"][7].removeprefix("What is ").removesuffix("?").split(" + "))
    assert rows["answer"][7] == str(a + b)


def test_long_chunk_times_decoding_and_writing_a_shard_of_long_completions():
    result = long_chunk({"chunk_size": 2})
    assert result["samples"] == 8 and result["chars_per_sample"] == 37_000
    assert result["text_mb"] > 0.29 and result["seconds"] > 0 and result["mb_per_s"] > 0


def test_the_sample_step_on_long_completions_reports_seconds_and_memory_per_gb(tmp_path):
    # in a child process: the case replaces the engine (pipeline.engines.vllm_local.generate) in the process it runs in
    run = run_child("pipeline.commands.bench.ray", {"case": "long_samples", "prompts": 6, "chars": 3000,
                                           "model": "builtin:tiny-random", "workdir": str(tmp_path)})
    assert run["prompts"] == 6 and run["text_gb"] == 0.0 and run["seconds"] > 0 and run["peak_rss_gib"] > 0
    import datasets

    rows = datasets.load_from_disk(str(tmp_path / "samples" / "data")).to_list()
    assert len(rows) == 6 and all(len(row["completion"]) == 3000 for row in rows)
    assert rows[5]["response"] == "The answer is \\boxed{5}." and rows[5]["finish_reason"] == "stop"

    small = {"text_gb": 0.5, "seconds": 20.0, "peak_rss_gib": 3.0}
    large = {"text_gb": 1.5, "seconds": 40.0, "peak_rss_gib": 8.0}
    assert per_gb(small, large) == {"seconds_per_gb": 20.0, "rss_gib_per_gb": 5.0}


def test_decode_model_chunks_cost_their_tails():
    lengths = [100] * 6 + [1000] * 2
    stream, chunked = decode_model(lengths, None), decode_model(lengths, 4)
    assert stream["tokens"] == chunked["tokens"] == 2600
    # each chunk of 4 ends with a long sequence decoding alone: more steps, each reading the whole weights
    assert chunked["seconds"] > stream["seconds"] > 0
    # one sequence at a time: every step reads the weights plus that sequence's KV cache
    alone = decode_model([10], None, weights_bytes=1e9, kv_bytes_per_token=1, bandwidth=1e9, prompt=0)
    assert alone["seconds"] == 10.0 and alone["tokens_per_s"] == 1.0


def test_the_ray_engines_stats_hold_the_drivers_seconds_by_phase():
    phases = dict(zip(DRIVER_PHASES, (1.23456, 0.1, 20.0, 0.0004, 0.5, 2.0)))
    generations = RayGenerations([], span_seconds=3.0, requested_replicas=2, driver_seconds=phases)
    assert generations.ray_stats()["driver_seconds"] == {
        "ray_start": 1.235, "dataset": 0.1, "waiting": 20.0, "results": 0.0, "on_chunk": 0.5, "finish": 2.0}
    assert RayGenerations([]).ray_stats()["driver_seconds"] == {}


@pytest.mark.slow  # starts a local Ray cluster and two tiny engines, twice
def test_bench_ray_runs_end_to_end(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "bench.json"
    assert main(["bench", "ray", "--ray-prompts", "16,48", "--ray-max-tokens", "4", "--ray-chunk-size", "16",
                 "--json", str(out)]) == 0
    ray = json.loads(out.read_text())["ray"]
    assert set(ray["sizes"]) == {"16", "48"}
    large = ray["sizes"]["48"]
    assert large["chunks"] == 3 and large["sample_stats"]["rows"] == 48
    assert sum(large["verify_labels"].values()) == 48
    assert large["seconds"]["wall"] > large["seconds"]["engine"] > 0
    assert all(large["seconds"][f"driver_{phase}"] >= 0 for phase in DRIVER_OWN_PHASES)
    assert set(ray["marginal_per_10k_prompts_s"]) == set(large["seconds"])
    assert ray["long_chunk"]["mb_per_s"] > 0
    assert len(ray["long_samples"]["runs"]) == 2 and ray["long_samples"]["rss_gib_per_gb"] is not None
