"""`distill bench`: the cheap benchmarks run for real on tiny inputs and write every headline key."""

import json
import statistics

from pipeline.bench import HEADLINES
from pipeline.bench.train import PROMPT_ROOM, skewed_rows
from pipeline.bench.verify import mixed_items
from pipeline.cli import main

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
    assert main(["bench", "verify", "cache", "decode", "--samples", "120", "--recipe", str(recipe),
                 "--matmul-size", "128", "--prompts", "4", "--n", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())

    assert set(HEADLINES) <= set(results)
    assert {key for key in HEADLINES if results[key] is None} == {
        "sample_vs_vllm", "sample_vs_hf", "sft_packing_speedup", "redi_mem_ratio", "decode_fraction_of_bound"}
    assert results["targets"]["verify_speedup"] == 1.8 and results["targets"]["redi_mem_ratio"] == 0.6
    assert results["targets"]["verify_pathological_slowdown"] == 2.0
    assert results["date"] and results["machine"]["cpus"] >= 1
    assert set(results["met"]) == {"verify_speedup", "verify_pathological_slowdown", "cached_rerun_s"}

    verify = results["verify"]
    assert [(c["set"], c["workers"]) for c in verify["cases"]] == [
        ("clean", 1), ("clean", 2), ("pathological", 1), ("pathological", 2)]
    clean_1, clean_2, pathological_1, pathological_2 = verify["cases"]
    assert all(sum(c["labels"].values()) == 120 for c in verify["cases"])
    # about half the clean items are a solution with its own gold; the grader must find them, with 1 worker as with 2
    assert 0.35 * 120 <= clean_1["labels"]["correct"] == clean_2["labels"]["correct"] <= 0.6 * 120
    assert "timeout" not in clean_2["labels"]
    # 6 of the 120 replaced: power towers are cut off (timeout), the rest graded as before
    assert verify["pathological"] == 6 and pathological_2["labels"]["timeout"] >= 3
    assert clean_2["labels"]["correct"] - 6 <= pathological_1["labels"]["correct"] == pathological_2["labels"][
        "correct"] <= clean_2["labels"]["correct"]
    assert results["verify_speedup"] == round(clean_2["samples_per_s"] / clean_1["samples_per_s"], 3)
    assert results["verify_pathological_slowdown"] == round(
        verify["pathological_2_workers_s"] / verify["clean_2_workers_s"], 3) > 0
    assert verify["pathological_2_workers_s"] == pathological_2["seconds"]

    assert 0 < results["cached_rerun_s"] == results["cache"]["rerun_s"] < results["cache"]["first_run_s"]

    decode = results["decode"]
    assert 100e6 < decode["params"] < 200e6 and decode["hidden"] == 576 and decode["batch"] == 8
    assert decode["matmul_gflops_peak"] >= decode["matmul_gflops_decode_shape"] > 0 and decode["copy_gbps"] > 0
    assert abs(decode["compute_bound_tokens_per_s"] - decode["matmul_gflops_peak"] * 1e9 / (2 * decode["params"])) < 1


def test_pathological_set_is_the_clean_set_with_5_percent_replaced():
    (clean, golds), (mixed, same_golds) = mixed_items(400)
    assert golds == same_golds and len(clean) == len(mixed) == 400
    assert sum(a != b for a, b in zip(clean, mixed)) == 20
    assert any("\\boxed" in c for c in clean) and any("So the answer is" in c for c in clean)


def test_training_rows_have_long_tailed_lengths():
    rows = skewed_rows(400, max_length=1024)
    words = [len(r["chosen"][0]["content"].split()) for r in rows]
    assert max(words) <= 1024 - PROMPT_ROOM + 8
    # log-normal, sigma 1: the tail is many times the median, and the mean sits well above the median
    assert max(words) > 5 * statistics.median(words)
    assert statistics.mean(words) > 1.3 * statistics.median(words)
    assert len({r["id"] for r in rows}) == 400
