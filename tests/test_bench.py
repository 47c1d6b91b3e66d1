"""`distill bench`: the cheap benchmarks run for real on tiny inputs and write every headline key."""

import json
import statistics

import pytest

from pipeline.commands.bench import HEADLINES
from pipeline.commands.bench.train import FIXED_LENGTH_MARGIN, PROMPT_ROOM, fixed_length_rows, skewed_rows
from pipeline.commands.bench.verify import long_traces, teacher_like_samples
from pipeline.commands.cli import main

TINY_RECIPE = """\
name: tiny
seed: 0
steps:
  problems: {uses: load, path: data/train/arith_train.jsonl, limit: 8}
  clean: {uses: filter, input: problems, decontaminate: []}
"""


def test_verify_cache_and_decode_benchmarks_write_their_numbers(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "bench.json"
    assert main(["bench", "verify", "cache", "decode", "--samples", "120", "--rounds", "2", "--recipe", str(recipe),
                 "--matmul-size", "128", "--prompts", "4", "--n", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())

    assert set(HEADLINES) <= set(results)
    assert {key for key in HEADLINES if results[key] is None} == {
        "sample_vs_vllm", "sample_vs_hf", "sft_packing_speedup", "redi_mem_ratio", "decode_fraction_of_bound"}
    assert results["targets"]["verify_speedup"] == 1.8 and results["targets"]["redi_mem_ratio"] == 0.6
    assert results["targets"]["verify_pathological_slowdown"] == 2.0
    assert results["targets"]["verify_long_trace_speedup"] == 1.5
    assert results["date"] and results["machine"]["cpus"] >= 1
    assert set(results["met"]) == {"verify_speedup", "verify_pathological_slowdown", "verify_long_trace_speedup",
                                   "cached_rerun_s"}

    verify = results["verify"]
    labels = verify["labels"]
    assert set(labels) == {"clean_1", "clean_2", "pathological_1", "pathological_2"}
    assert all(sum(counts.values()) == 120 for counts in labels.values())
    # 30 problems x (solution, wrong final answer, cut at the token limit, no answer); 1 worker grades as 2 do
    assert labels["clean_1"] == labels["clean_2"] and "timeout" not in labels["clean_2"]
    assert 30 <= labels["clean_2"]["correct"] <= 36 and labels["clean_2"]["no_answer"] >= 30
    assert labels["clean_2"]["incorrect"] >= 28 and labels["clean_2"]["truncated"] >= 24
    # 6 of the 120 replaced: power towers are cut off (timeout), the rest graded as before
    assert verify["pathological"] == 6 and labels["pathological_2"]["timeout"] >= 3
    assert labels["pathological_1"] == labels["pathological_2"]
    assert len(verify["rounds"]) == 2 and verify["ceiling"] > 0
    assert results["verify_speedup"] == round(statistics.median(r["speedup"] for r in verify["rounds"]), 3) > 0
    assert results["verify_pathological_slowdown"] == round(
        statistics.median(r["pathological_slowdown"] for r in verify["rounds"]), 3) > 0
    # 120 // 20 = 6 long traces, one per ending, graded by ours and by plain math-verify in each round
    traced = verify["long_traces"]
    assert traced["traces"] == 6 and len(traced["rounds"]) == 2
    assert traced["ours"]["agreement"] == 1 and traced["ours"]["correct"] == 2
    assert traced["speedup"] == round(statistics.median(r["speedup"] for r in traced["rounds"]), 3) > 0
    assert results["verify_long_trace_speedup"] == traced["speedup"]
    assert traced["ours"]["traces_per_s"] > 0 and traced["plain"]["traces_per_s"] > 0
    decode = results["decode"]
    assert 100e6 < decode["params"] < 200e6 and decode["hidden"] == 576 and decode["batch"] == 8
    assert decode["matmul_gflops_peak"] >= decode["matmul_gflops_decode_shape"] > 0 and decode["copy_gbps"] > 0
    assert abs(decode["compute_bound_tokens_per_s"] - decode["matmul_gflops_peak"] * 1e9 / (2 * decode["params"])) < 1
    assert decode["matmul_gflops_peak"] >= decode["matmul_gflops_peak_fp32"] >= decode["matmul_gflops_decode_shape"]
    assert abs(decode["compute_bound_tokens_per_s_fp32"]
               - decode["matmul_gflops_peak_fp32"] * 1e9 / (2 * decode["params"])) < 1


def test_verify_samples_are_teacher_like_and_the_pathological_set_replaces_5_percent():
    clean, mixed = teacher_like_samples(400)
    assert mixed["golds"] == clean["golds"] and len(clean["completions"]) == len(mixed["completions"]) == 400
    assert sum(a != b for a, b in zip(clean["completions"], mixed["completions"])) == 20
    # four samples per problem, consecutive, sharing a gold; no completion graded twice
    assert all(len(set(clean["golds"][i:i + 4])) == 1 for i in range(0, 400, 4))
    assert len(set(clean["completions"][0::4])) == 100
    assert clean["finish_reasons"][:4] == ["stop", "stop", "length", "stop"]
    assert any("\\boxed" in c for c in clean["completions"])
    assert any("So the answer is" in c for c in clean["completions"])


def test_long_traces_are_teacher_length_and_labelled_by_how_they_end():
    traces = long_traces(12)
    assert all(10_000 <= len(c) <= 101_000 for c in traces["completions"])
    assert traces["expected"] == [True, False, True, False, False, False] * 2
    assert traces["finish_reasons"] == ["stop"] * 4 + ["length", "stop"] + ["stop"] * 4 + ["length", "stop"]
    assert len(set(traces["golds"][:6])) == 1 and traces["golds"][0] != traces["golds"][6]  # six per problem
    closed = [c for c, reason in zip(traces["completions"], traces["finish_reasons"]) if reason == "stop"]
    assert all(c.startswith("<think>\n") and "\n</think>\n\n" in c for c in closed)
    assert all(c.count("\\boxed") >= 2 for c in traces["completions"])  # re-check boxes in the reasoning


def test_training_rows_have_long_tailed_lengths():
    rows = skewed_rows(400, max_length=1024)
    words = [len(r["chosen"][0]["content"].split()) for r in rows]
    assert max(words) <= 1024 - PROMPT_ROOM + 8
    # log-normal, sigma 1: the tail is many times the median, and the mean sits well above the median
    assert max(words) > 5 * statistics.median(words)
    assert statistics.mean(words) > 1.3 * statistics.median(words)
    assert len({r["id"] for r in rows}) == 400


def test_data_benchmark_times_every_step_at_each_size(tmp_path):
    from pipeline.commands.bench.data import CASES

    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--data-rows", "40,400", "--json", str(out)]) == 0
    data = json.loads(out.read_text())["data"]

    assert set(data["sizes"]) == {"40", "400"} and set(data["per_row_time_growth"]) == set(CASES)
    small, large = (data["sizes"][size] for size in ("40", "400"))
    assert large["inputs"]["samples"] == 400 and large["inputs"]["problems"] == 100
    assert 1000 <= large["inputs"]["mean_completion_chars"] <= 4000
    for case in CASES:
        result = large["cases"][case]
        assert result["seconds"] > 0 and result["peak_rss_gib"] > result["baseline_anon_gib"] > 0
        assert result["rows_in"] == 400 and result["stats"]
    cases = large["cases"]
    # verify took every grade from its progress file; select and pairs made one row per problem at most
    assert cases["verify"]["rows_out"] == 400 and cases["verify"]["stats"]["problems"] == 100
    assert 0 < cases["select"]["rows_out"] <= 100 and 0 < cases["pairs"]["rows_out"] <= 100
    # the planted duplicates (1% exact, 3% near) are found among load's 400 problems
    removed = cases["filter_problems"]["stats"]
    assert removed["removed_duplicate"] >= 1 and removed["removed_near_duplicate"] >= 5
    assert cases["filter"]["stats"]["removed_truncated"] > 0 and small["cases"]["load"]["rows_out"] == 40


def test_synthetic_problems_share_phrasing_and_plant_duplicates():
    from pipeline.commands.bench.data import problem_texts
    from pipeline.steps.filter import ngrams

    texts = problem_texts(2000, seed=0)
    assert 150 <= statistics.mean(len(t) for t in texts) <= 250
    normalised = [" ".join(t.lower().split()) for t in texts]
    assert 5 <= len(normalised) - len(set(normalised)) <= 40  # ~1% exact duplicates
    # common phrasing: the most shared 5-gram appears in hundreds of problems
    counts: dict = {}
    for text in texts:
        for gram in ngrams(text, 5):
            counts[gram] = counts.get(gram, 0) + 1
    assert max(counts.values()) >= 200


def test_fixed_length_pairs_fit_the_length_they_are_built_for():
    # `bench train --lengths` trains one pair per step at max_length = its length: a pair one token over is dropped,
    # and a sweep of such pairs trained nothing (it did, when the chat template grew by a token).
    from transformers import AutoTokenizer

    from pipeline.core.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny-random"))
    for tokens in (128, 512):
        for row in fixed_length_rows(6, tokens, tokenizer):
            for side in ("chosen", "rejected"):
                length = len(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True,
                                                           return_dict=True)["input_ids"])
                assert tokens - 2 * FIXED_LENGTH_MARGIN <= length <= tokens, (tokens, side, length)


@pytest.mark.slow
def test_length_sweep_trains_pairs_of_the_asked_length_in_both_cases(tmp_path):
    # the sweep once trained nothing (its pairs were over max_length) and no test ran it
    out = tmp_path / "bench.json"
    assert main(["bench", "train", "--lengths", "256", "--model", "builtin:tiny-random", "--steps", "1",
                 "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    measured = results["train"]
    cases = {case["case"]: case for case in measured["cases"]}
    assert set(cases) == {"redi", "dpo_with_reference"}
    for case in cases.values():
        assert case["steps"] == 1
        assert 256 - 2 * FIXED_LENGTH_MARGIN <= case["row_tokens"]["mean"] <= case["row_tokens"]["max"] <= 256
    above = {name: case["peak_rss_above_baseline_gib"] for name, case in cases.items()}
    assert measured["redi_mem_ratio_by_length"]["256"] == round(above["redi"] / above["dpo_with_reference"], 3)
    assert results["redi_mem_ratio"] == measured["redi_mem_ratio_by_length"]["256"]
