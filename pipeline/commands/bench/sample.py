"""`distill bench sample`: completion tokens/s on the same prompts, three ways, in each dtype (`--dtypes`).

- ours: the `sample` step itself (pipeline.steps.sample -> pipeline.engines.vllm_local), with its defaults (chunks, shards).
- bare vLLM: a script that only calls `vllm.LLM(...).chat(prompts, SamplingParams(...))`, in its own process, with
  the engine settings our path uses (the same environment defaults, seed, eager mode on CPU).
- HF generate: `model.generate` on left-padded batches of prompts, `num_return_sequences=n`, same sampling and
  max new tokens.

Each runs in bfloat16 and in float32 by default (the two dtypes `dtype: auto` chooses between, see
pipeline.core.compute_dtype): a CPU without native bf16 runs bf16 matmuls far slower, and which engine is faster can
differ by dtype. Each case counts its own completion tokens (up to and including eos) over the time of its generate
calls only: engine start-up and model loading are reported apart. Then the decode bound (pipeline.commands.bench.decode).
The headlines are taken in the dtype `auto` chooses here: ours / bare vLLM, ours / HF, and
decode_fraction_of_bound = our tokens/s / the fp32 compute-bound tokens/s.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from pipeline.commands.bench import child_main, run_child

PROBLEMS = "data/train/arith_train.jsonl"
TEMPERATURE = 0.7  # the quickstart's sampling
SEED = 0


def ours(opts, model_dir: str, workdir: Path, dtype: str) -> tuple[dict, list[list[dict]]]:
    """Our sample step's numbers in `dtype`, and the chat prompts it sent."""
    from pipeline.core.artifacts import Artifact, Output
    from pipeline.steps import sample
    from pipeline.text.tables import read_table

    problems = read_table(PROBLEMS).select(range(opts.prompts))
    problems.save_to_disk(str(workdir / "problems" / "data"))
    cfg = sample.Config(uses="sample", input="problems", model=model_dir, n=opts.n, temperature=TEMPERATURE,
                        max_tokens=opts.max_tokens, dtype=dtype)
    out = Output(name="samples", kind="dataset", dir=workdir / f"samples-{dtype}", scratch=workdir / f"scratch-{dtype}",
                 seed=SEED)
    stats = sample.run(cfg, {"problems": Artifact("problems", "dataset", workdir / "problems")}, out).stats
    prompts = [sample.chat_messages(cfg, row) for row in problems]
    return {"case": "ours", "dtype": dtype, "completion_tokens": stats["completion_tokens"], "load_s": stats["load_seconds"],
            "generate_s": stats["generate_seconds"], "tokens_per_s": stats["tokens_per_s"]}, prompts


def bare_vllm(spec: dict) -> dict:
    """The bare script, run in a child process."""
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    started = time.perf_counter()
    llm = LLM(model=spec["model"], seed=SEED, enforce_eager=current_platform.is_cpu(), dtype=spec["dtype"])
    load = time.perf_counter() - started
    params = SamplingParams(n=spec["n"], temperature=TEMPERATURE, max_tokens=spec["max_tokens"])
    started = time.perf_counter()
    outputs = llm.chat(spec["prompts"], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
    return {"case": "vllm", "dtype": spec["dtype"], "completion_tokens": tokens, "load_s": round(load, 2), "generate_s": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 2)}


def hf_generate(spec: dict) -> dict:
    """HF transformers' batched generate, run in a child process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"])).to(device).eval()
    load = time.perf_counter() - started
    eos = torch.tensor(model.generation_config.eos_token_id, device=device).flatten()
    torch.manual_seed(SEED)
    tokens, seconds = 0, 0.0
    prompts, batch = spec["prompts"], spec["batch_size"]
    for start in range(0, len(prompts), batch):
        texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in prompts[start:start + batch]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        started = time.perf_counter()
        with torch.inference_mode():
            generated = model.generate(**inputs, do_sample=True, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                                       max_new_tokens=spec["max_tokens"], num_return_sequences=spec["n"],
                                       pad_token_id=tokenizer.pad_token_id)
        seconds += time.perf_counter() - started
        # generate pads a finished row to the batch's end: count each row up to and including its first eos
        is_eos = torch.isin(generated[:, inputs.input_ids.shape[1]:], eos)
        tokens += int(torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, is_eos.shape[1]).sum())
    return {"case": "hf", "dtype": spec["dtype"], "completion_tokens": tokens, "load_s": round(load, 2), "generate_s": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 2)}


def run(opts, console) -> tuple[dict, dict]:
    from rich.table import Table

    from pipeline.commands.bench import decode
    from pipeline.core.compute_dtype import choose
    from pipeline.core.models import resolve_model
    from pipeline.engines.vllm_local import engine_env_defaults

    model_dir = str(resolve_model(opts.model, {}))
    cases = []
    for dtype in opts.dtypes:
        with tempfile.TemporaryDirectory(prefix="bench-sample-") as workdir:
            console.print(f"[bold]bench sample[/bold] {dtype}: ours ({opts.prompts} prompts x {opts.n}, "
                          f"{opts.max_tokens} tokens)")
            ours_result, prompts = ours(opts, model_dir, Path(workdir), dtype)
        spec = {"model": model_dir, "prompts": prompts, "n": opts.n, "max_tokens": opts.max_tokens,
                "batch_size": opts.hf_batch_size, "dtype": dtype}
        console.print(f"[bold]bench sample[/bold] {dtype}: bare vLLM")
        # the engine environment our path sets (KV cache size, threads, in-process engine); the user's variables win
        bare = run_child("pipeline.commands.bench.sample", {**spec, "case": "vllm"}, env={**engine_env_defaults(), **os.environ})
        console.print(f"[bold]bench sample[/bold] {dtype}: HF generate")
        hf = run_child("pipeline.commands.bench.sample", {**spec, "case": "hf"})
        cases += [ours_result, bare, hf]

    table = Table(title=f"distill bench sample — {opts.model}, {opts.prompts} prompts x {opts.n}, "
                        f"≤ {opts.max_tokens} new tokens, temperature {TEMPERATURE}")
    for column in ("case", "dtype", "completion tokens", "load s", "generate s", "tokens/s"):
        table.add_column(column, justify="left" if column in ("case", "dtype") else "right")
    names = {"ours": "our sample step", "vllm": "bare vLLM script", "hf": "HF generate (batched)"}
    for case in cases:
        table.add_row(names[case["case"]], case["dtype"], str(case["completion_tokens"]), f"{case['load_s']:.1f}",
                      f"{case['generate_s']:.1f}", f"{case['tokens_per_s']:.0f}")
    console.print(table)

    bound = decode.measure(opts.model, min(opts.prompts * opts.n, 256), opts.matmul_size)
    decode.print_table(bound, console)
    auto = choose().dtype
    by_case = {case["case"]: case["tokens_per_s"] for case in cases if case["dtype"] == auto}
    headlines = {}
    if by_case:  # the headlines are in the dtype auto picks here, when it was measured
        headlines = {"sample_vs_vllm": round(by_case["ours"] / by_case["vllm"], 3),
                     "sample_vs_hf": round(by_case["ours"] / by_case["hf"], 3),
                     "decode_fraction_of_bound": round(by_case["ours"] / bound["compute_bound_tokens_per_s_fp32"], 4)}
    return {"prompts": opts.prompts, "n": opts.n, "max_tokens": opts.max_tokens, "temperature": TEMPERATURE,
            "auto_dtype": auto, "cases": cases, "decode": bound}, headlines


if __name__ == "__main__":
    child_main({"vllm": bare_vllm, "hf": hf_generate})
