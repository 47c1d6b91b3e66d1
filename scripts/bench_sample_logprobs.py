"""The sampling slowdown of `sample`'s `logprobs: K` (backend vllm) against `logprobs: null`: one vLLM engine, the
same prompts, seeds and engine settings as the step's engine process (pipeline.engines.vllm_local), and each
configuration run `--repeats` times interleaved (null, 1, 5, 20, null, 1, ...) so that drift in the machine's load
hits every configuration alike.

Each run is what the step's engine process does for one chunk: `LLM.generate` of n seeded requests per prompt from an
empty prefix cache, then `vllm_local._completion` turning the outputs (and their top-K log-probs) into the plain
Python objects the step receives, pickled as the pipe to the step would pickle them. Its seconds cover both; the
engine's start-up (once, shared by all runs) is reported apart. Prints one JSON line per run, then a summary table
(median seconds, completion tokens/s, and the ratio of each K's median seconds to null's) and the load average.

    .venv/bin/python scripts/bench_sample_logprobs.py --prompts 32 --n 4 --max-tokens 128 --ks 1,5,20 --repeats 3

The engine's threads are the step's (`OMP_NUM_THREADS`: all cores) unless the variable is set; on a machine other
jobs keep busy, `OMP_NUM_THREADS=1` avoids threads spinning at barriers while their partner waits for a core (on the
2-core machine of BENCHMARKS.md at load average 16, two threads took 2 to 6 times as long as one per batch).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--problems", default="data/train/arith_train.jsonl")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ks", default="1,5,20", help="comma-separated K values, compared with logprobs: null")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--temperature", type=float, default=0.7)  # the quickstart's
    parser.add_argument("--json", help="write the runs and the summary here")
    opts = parser.parse_args()

    from pipeline.core.models import resolve_model
    from pipeline.engines import vllm_local
    from pipeline.engines.request import sample_seed
    from pipeline.steps import sample
    from pipeline.text.tables import read_table

    for name, value in vllm_local.engine_env_defaults().items():
        os.environ.setdefault(name, value)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir = str(resolve_model(opts.model, {}))
    cfg = sample.Config(uses="sample", input="problems", model=model_dir)
    problems = read_table(opts.problems).select(range(opts.prompts))
    started = time.perf_counter()
    # the engine settings of vllm_local._serve_chunks on CPU
    llm = LLM(model=model_dir, dtype=opts.dtype, enforce_eager=True, enable_chunked_prefill=False, seed=0)
    load_seconds = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    prompts = [vllm_local._render(tokenizer, sample.chat_messages(cfg, row), "") for row in problems]
    ids = [str(i) for i in problems["id"]]

    def one_run(k: int | None, prompts=prompts, max_tokens=opts.max_tokens) -> dict:
        llm.reset_prefix_cache()
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(opts.n)]
        params = [SamplingParams(n=1, seed=sample_seed(0, i, j), temperature=opts.temperature,
                                 max_tokens=max_tokens, logprobs=k) for i in ids[:len(prompts)] for j in range(opts.n)]
        began = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        completions = [vllm_local._completion(output, k) for output in outputs]
        sent = len(pickle.dumps(completions))
        seconds = time.perf_counter() - began
        tokens = sum(c.completion_tokens for c in completions)
        return {"logprobs": k, "seconds": round(seconds, 3), "completion_tokens": tokens,
                "tokens_per_s": round(tokens / seconds, 2), "pickled_bytes": sent, "load_avg_1m": os.getloadavg()[0]}

    configs = [None] + [int(k) for k in opts.ks.split(",")]
    for k in configs:  # warm-up, not counted: the first batches of an engine (and of a logprobs path) run slower
        print(json.dumps({"warm_up": one_run(k, prompts[:2], 8)}), flush=True)
    runs = []
    for repeat in range(opts.repeats):
        for k in configs:
            result = {"repeat": repeat, **one_run(k)}
            runs.append(result)
            print(json.dumps(result), flush=True)

    summary = []
    for k in configs:
        mine = [r for r in runs if r["logprobs"] == k]
        summary.append({"logprobs": k, "median_seconds": statistics.median(r["seconds"] for r in mine),
                        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                        "completion_tokens": [r["completion_tokens"] for r in mine]})
    base = summary[0]["median_seconds"]
    print(f"\n{opts.model}, {opts.prompts} prompts x {opts.n}, <= {opts.max_tokens} tokens, {opts.dtype}, "
          f"{opts.repeats} interleaved runs each; engine start-up {load_seconds:.1f} s (once)")
    print("| logprobs | median s | median tokens/s | vs null |")
    print("|---|---|---|---|")
    for row in summary:
        row["vs_null"] = round(row["median_seconds"] / base, 3)
        print(f"| {row['logprobs'] if row['logprobs'] is not None else 'null'} | {row['median_seconds']:.1f} | "
              f"{row['median_tokens_per_s']:.0f} | {row['vs_null']:.2f}x |")
    load = os.getloadavg()
    print(f"load average at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min) on "
          f"{os.cpu_count()} cores")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"runs": runs, "summary": summary, "load_seconds": load_seconds, "load_average": load}, f,
                      indent=1)


if __name__ == "__main__":
    main()
