"""Model references: checks, step/local/hub resolution, and the two builtins built into a private cache."""

import hashlib
import subprocess
import sys
import threading
import time

import pytest

from pipeline.core import models
from pipeline.core.artifacts import Artifact
from pipeline.core.errors import UserError
from pipeline.core.models import check_model_ref, resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding HuggingFaceTB/SmolLM2-135M-Instruct at main (config.json only): an unpinned
    `org/name` passes the check only when the hub cache has it (else it reads as a local dir without `./`)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(UserError) as err:
        check_model_ref("builtin:gpt-5")
    assert "builtin:gpt-5" in str(err.value)
    for name in models.BUILTIN_MODELS:
        assert f"builtin:{name}" in str(err.value)


@pytest.mark.parametrize("ref", ["", "  ", "step:", "not a model", "org/name/extra", "openai:gpt-4o", "./no/such/dir"])
def test_malformed_refs_are_refused(ref):
    with pytest.raises(UserError):
        check_model_ref(ref)


@pytest.mark.parametrize("ref", ["builtin:tiny-random", "builtin:smollm2-135m-instruct", "step:sft",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_valid_refs_pass(ref, hub_cache):
    check_model_ref(ref)


def test_checking_refs_imports_nothing_heavy():
    code = ("import sys; from pipeline.core.models import check_model_ref; check_model_ref('builtin:tiny-random'); "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_step_refs_resolve_to_the_step_model_dir(tmp_path):
    inputs = {"sft": Artifact("sft", "model", tmp_path / "sft"), "data": Artifact("data", "dataset", tmp_path)}
    assert resolve_model("step:sft", inputs) == str(tmp_path / "sft" / "model")
    with pytest.raises(UserError, match="produced a dataset"):
        resolve_model("step:data", inputs)
    with pytest.raises(UserError, match="not among"):
        resolve_model("step:merged", inputs)


def test_local_dirs_and_hub_ids(tmp_path, hub_cache):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_tiny_random_is_built_once_and_deterministic(cache, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    first = resolve_model("builtin:tiny-random")
    assert first == str(cache / "tiny-random")
    weights = cache / "tiny-random" / "model.safetensors"
    built_at = weights.stat().st_mtime_ns

    # Cached: a second call must not build again (the builder would fail) and is instant.
    monkeypatch.setitem(models._BUILDERS, "tiny-random", lambda dest: pytest.fail("rebuilt a cached builtin"))
    started = time.perf_counter()
    assert resolve_model("builtin:tiny-random") == first
    assert time.perf_counter() - started < 0.5
    assert weights.stat().st_mtime_ns == built_at
    monkeypatch.undo()

    # Same weights in a fresh cache: the random init is seeded.
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "other-cache"))
    again = resolve_model("builtin:tiny-random")
    assert sha256(tmp_path / "other-cache" / "models" / "tiny-random" / "model.safetensors") == sha256(weights)

    config = AutoConfig.from_pretrained(again)
    assert (config.num_hidden_layers, config.head_dim, config.vocab_size) == (2, 64, 49152)
    tokenizer = AutoTokenizer.from_pretrained(again)
    assert tokenizer.chat_template
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_a_failed_build_leaves_nothing_and_the_next_one_succeeds(cache, monkeypatch):
    def crash(dest):
        (dest / "config.json").write_text("{}")  # half-written model
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(models._BUILDERS, "tiny-random", crash)
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model("builtin:tiny-random")
    assert not (cache / "tiny-random").exists()

    monkeypatch.setitem(models._BUILDERS, "tiny-random", lambda dest: (dest / "config.json").write_text("{}"))
    assert resolve_model("builtin:tiny-random") == str(cache / "tiny-random")
    assert (cache / "tiny-random" / "config.json").read_text() == "{}"
    assert not (cache / ".tiny-random.tmp").exists()


def test_concurrent_resolves_build_once(cache, monkeypatch):
    builds = []

    def slow_build(dest):
        builds.append(dest)
        time.sleep(0.5)  # long enough that the other caller arrives mid-build
        (dest / "config.json").write_text("{}")

    monkeypatch.setitem(models._BUILDERS, "tiny-random", slow_build)
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("builtin:tiny-random")))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [str(cache / "tiny-random")] * 3


def test_smollm2_converts_to_a_working_hf_model(cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model("builtin:smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == models.SMOLLM2_PAD_TOKEN

    # The de-quantized weights still know arithmetic: greedy decoding answers a sum and stops at eos.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12+7? Put the answer in \\boxed{}."}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=30, do_sample=False)
    reply = tokenizer.decode(output[0, batch["input_ids"].shape[1]:])
    assert "19" in reply and reply.endswith("<|im_end|>")
