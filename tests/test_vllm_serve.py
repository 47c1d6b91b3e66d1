"""The sample step's `backend: openai` against a real `vllm serve` (vLLM's OpenAI-compatible server, CPU build) on
loopback with builtin:tiny-random: a plain server, and one with a reasoning parser, which returns the reasoning apart
from the content. Slow: each server takes about a minute to start on two cores."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import datasets
import pytest

from pipeline.core.models import resolve_model
from pipeline.core.recipe import load_recipe
from pipeline.core.runner import run_recipe
from pipeline.engines.request import sample_seed
from pipeline.engines.vllm_local import engine_env_defaults

PROBLEMS = [{"id": f"q{i}", "problem": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(3)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir, *extra, timeout_s=600):
    port = free_port()
    env = {**os.environ, **{k: v for k, v in engine_env_defaults().items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
               "--max-model-len", "512", "--no-enable-chunked-prefill", *extra]
    # its own process group: the server starts an engine-core process and workers, which must all go with it
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            errors = [line for line in process.stderr.read().splitlines() if "Error" in line]
            raise RuntimeError(f"vllm serve exited with {process.returncode}: {errors[-5:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(2)
    stop_server(process)
    raise RuntimeError("vllm serve did not answer /health in time")


def stop_server(process) -> None:
    """Kill the server and every process it started (they share its process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_sample(tmp_path, base_url, name):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS))
    recipe = {"name": name, "seed": 7, "workdir": str(tmp_path / name),
              "steps": {"problems": {"uses": "load", "path": str(data)},
                        "samples": {"uses": "sample", "input": "problems", "model": "tiny", "backend": "openai",
                                    "base_url": base_url, "api_key_env": None, "n": 2, "max_tokens": 8,
                                    "temperature": 1.0, "chunk_size": 2}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    run_recipe(load_recipe(path))
    return datasets.load_from_disk(str(tmp_path / name / "samples" / "data"))


@pytest.mark.slow
def test_plain_vllm_server_seeded_samples(tmp_path):
    process, base_url = start_server(resolve_model("builtin:tiny-random"))
    try:
        first = run_sample(tmp_path, base_url, "first")
        again = run_sample(tmp_path, base_url, "again")
    finally:
        stop_server(process)
    assert first["id"] == [p["id"] for p in PROBLEMS for _ in range(2)] and first["sample_idx"] == [0, 1] * 3
    assert all(1 <= tokens <= 8 for tokens in first["completion_tokens"])
    assert set(first["finish_reason"]) <= {"stop", "length"} and all(first["completion"])
    assert set(first["think_prefix"]) == {""} and set(first["prompt_text"]) == {None}
    # the per-sample seeds reach the server: the same recipe gives the same samples, sample k its own draw
    assert first["completion"] == again["completion"]
    assert first["completion"][0] != first["completion"][1]
    assert sample_seed(7, "q0", 0) != sample_seed(7, "q0", 1)


def with_think_tokens(model_dir, dest):
    """builtin:tiny-random with <think> and </think> as tokens of their own, as reasoning models have them (vLLM's
    reasoning parsers look their ids up)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens(["<think>", "</think>"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    return dest


@pytest.mark.slow
def test_vllm_server_with_a_reasoning_parser_keeps_the_reasoning(tmp_path):
    # deepseek_r1: text before </think> is reasoning; random weights never close it, so every reply is cut off
    # while reasoning and the server returns no content at all
    model_dir = with_think_tokens(resolve_model("builtin:tiny-random"), tmp_path / "thinking-tiny")
    process, base_url = start_server(model_dir, "--reasoning-parser", "deepseek_r1")
    try:
        samples = run_sample(tmp_path, base_url, "reasoning")
    finally:
        stop_server(process)
    assert set(samples["finish_reason"]) == {"length"}
    for completion, reasoning, response in zip(samples["completion"], samples["reasoning"], samples["response"]):
        assert completion.startswith("<think>\n") and "</think>" not in completion  # kept open: truncated
        assert reasoning and response == ""
