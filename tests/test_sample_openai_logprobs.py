"""`sample` with `backend: openai` and `logprobs: K` against a loopback server speaking vLLM's chat completions API
with log-probs (tokens as "token_id:N", the prompt's token ids, the sampled token listed first among a position's top
log-probs as vLLM lists it): the stored teacher columns, in the layout backend vllm writes; and the servers that are
refused (no log-probs, tokens as text, too few top entries, no way to know the tokenizer, another tokenizer)."""

import json

import datasets
import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.core.models import resolve_model
from pipeline.core.runner import run_recipe
from pipeline.engines.request import sample_seed
from pipeline.steps import sample
from pipeline.text import teacher_logprobs as stored
from tests.test_sample_openai import KEY, KEY_ENV, PROBLEMS, FakeServer, write_recipe

K = 3


def word_id(word: str) -> int:
    return 500 + sum(word.encode()) % 400


def position(i: int, word: str, k: int):
    """Completion position i of a fake reply: (the sampled id and log-prob, the true top K (ids, log-probs), the
    K + 1 entries the server lists: the sampled token first, then the most likely, as vLLM lists them). The sampled
    token is inside the top K (i % 3 == 0), just outside it (rank K + 1: i % 3 == 1), or far outside (i % 3 == 2)."""
    sampled = word_id(word)
    ranked = [(2000 + 50 * i + r, -0.25 * r - 0.01 * i) for r in range(1, k + 3)]
    if i % 3 == 0:
        ranked[1] = (sampled, ranked[1][1])
    elif i % 3 == 1:
        ranked[k] = (sampled, ranked[k][1])
    sampled_logprob = next((lp for token, lp in ranked if token == sampled), -20.0)
    listed = dict([(sampled, sampled_logprob)] + ranked[:k + 1])  # the sampled first; a repeat keeps its place
    return (sampled, sampled_logprob), ranked[:k], list(listed.items())[:k + 1]


def prompt_ids(question: str) -> list[int]:
    return [1] + [ord(c) % 300 for c in question[:12]]


class LogprobServer(FakeServer):
    """FakeServer as vLLM's server answers with log-probs. `mode`: "vllm"; "ignores" (a server that takes the
    request and returns no log-probs); "text" (tokens as text, no ids); "vendor" (no log-probs and no /v1/models or
    /tokenize); "other-tokenizer" (its /tokenize gives other ids than the model's tokenizer)."""

    def __init__(self, mode="vllm"):
        super().__init__(delay_s=0.01)
        self.mode = mode
        self.model_dir = resolve_model("builtin:tiny-random")

    def info(self, path, authorization, body):
        if self.mode == "vendor" or authorization != f"Bearer {KEY}":
            return super().info(path, authorization, body)
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "served-model", "object": "model", "root": self.model_dir}]}
        from transformers import AutoTokenizer

        tokens = AutoTokenizer.from_pretrained(self.model_dir).encode(body["prompt"], add_special_tokens=False)
        return 200, {"tokens": [t + 1 for t in tokens] if self.mode == "other-tokenizer" else tokens}

    def reply(self, path, authorization, body, attempt):
        status, reply = super().reply(path, authorization, body, attempt)
        if status != 200 or not body.get("logprobs") or self.mode in ("ignores", "vendor"):
            return status, reply
        k = body["top_logprobs"] - 1
        words = reply["choices"][0]["message"]["content"].split()
        as_token = (lambda i: f"token_id:{i}") if self.mode != "text" else (lambda i: f"w{i}")
        content = []
        for i, word in enumerate(words):
            (sampled, logprob), _, listed = position(i, word, k)
            content.append({"token": as_token(sampled), "logprob": logprob, "bytes": None,
                            "top_logprobs": [{"token": as_token(t), "logprob": lp, "bytes": None} for t, lp in listed]})
        reply["choices"][0]["logprobs"] = {"content": content}
        reply["choices"][0]["token_ids"] = [word_id(w) for w in words]
        reply["prompt_token_ids"] = prompt_ids(body["messages"][-1]["content"])
        return status, reply


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def test_served_logprobs_are_stored_in_the_vllm_backends_layout(tmp_path, key):
    server = LogprobServer("vllm")
    try:
        run_recipe(write_recipe(tmp_path, server, logprobs=K, logprob_dtype="float32", max_tokens=8))
    finally:
        server.close()
    asked = server.requests[-1]
    assert (asked["logprobs"], asked["top_logprobs"]) == (True, K + 1)
    assert asked["return_tokens_as_token_ids"] is True and asked["return_token_ids"] is True

    samples = datasets.load_from_disk(str(tmp_path / "work" / "samples" / "data"))
    assert all(samples.features[name] == feature for name, feature in stored.features("float32").items())
    k, identity = stored.check_dataset(samples, step="test", source="samples")
    from transformers import AutoTokenizer

    assert (k, identity) == (K, stored.tokenizer_identity(AutoTokenizer.from_pretrained(server.model_dir),
                                                          "served-model"))
    assert len(samples) == 15
    for row in samples:
        prompt, completion, topk_ids, topk_logprobs, token_logprobs = stored.row_arrays(row)
        words = row["completion"].split()
        assert row["completion"].startswith(f"seed {sample_seed(7, row['id'], row['sample_idx'])}:")
        assert list(prompt) == prompt_ids(row["prompt"][-1]["content"])
        assert list(completion) == [word_id(w) for w in words]
        expected = [position(i, w, K) for i, w in enumerate(words)]
        # the true top K at every position, most likely first, whether the sampled token is in it or not
        assert topk_ids.tolist() == [[t for t, _ in top] for _, top, _ in expected]
        np.testing.assert_allclose(topk_logprobs, [[lp for _, lp in top] for _, top, _ in expected], rtol=1e-6)
        np.testing.assert_allclose(token_logprobs, [lp for (_, lp), _, _ in expected], rtol=1e-6)
    stats = json.loads((tmp_path / "work" / "samples" / "manifest.json").read_text())["stats"]
    assert stats["logprobs"] == K and stats["teacher_tokenizer"] == identity and stats["scored_tokens"] == 15 * 8


@pytest.mark.parametrize(("mode", "settings", "message"), [
    ("ignores", {}, "returned no log-probs"),
    ("text", {}, "returned the token 'w\\d+' as text, not as an id"),
    ("vendor", {}, "could not be asked for its tokenizer \\(HTTP 404 .*needs a vLLM server"),
    ("vendor", {"tokenizer": "builtin:tiny-random"}, "could not be asked for its tokenizer"),
    ("other-tokenizer", {}, "tokenizes a probe text differently"),
])
def test_a_server_that_cannot_give_the_columns_is_refused_by_name(tmp_path, key, mode, settings, message):
    server = LogprobServer(mode)
    try:
        with pytest.raises(UserError, match=message) as refused:
            run_recipe(write_recipe(tmp_path, server, logprobs=K, **settings))
    finally:
        server.close()
    assert server.base_url in str(refused.value)
    assert not (tmp_path / "work" / "samples").exists()  # nothing stored


def test_too_few_top_entries_asks_for_max_logprobs(tmp_path, key, monkeypatch):
    server = LogprobServer("vllm")
    real_reply = server.reply

    def capped(path, authorization, body, attempt):  # a server whose --max-logprobs caps the list at K
        status, reply = real_reply(path, authorization, body, attempt)
        for entry in reply.get("choices", [{}])[0].get("logprobs", {}).get("content", []):
            entry["top_logprobs"] = entry["top_logprobs"][:K]
        return status, reply

    monkeypatch.setattr(server, "reply", capped)
    try:
        with pytest.raises(UserError, match=f"{K} top log-probs .* where {K + 1} were asked.*--max-logprobs {K + 1}"):
            run_recipe(write_recipe(tmp_path, server, logprobs=K))
    finally:
        server.close()


def test_tokenizer_setting_is_for_backend_openai_with_logprobs_and_keyed_only_when_set():
    openai = {"uses": "sample", "input": "p", "model": "m", "backend": "openai", "base_url": "http://x/v1"}
    assert sample.Config(**openai, logprobs=5).model_refs() == []
    assert sample.Config(**openai, logprobs=5, tokenizer="builtin:tiny-random").model_refs() == ["builtin:tiny-random"]
    with pytest.raises(ValueError, match="tokenizer names a served model's tokenizer"):
        sample.Config(**openai, tokenizer="builtin:tiny-random")
    with pytest.raises(ValueError, match="tokenizer names a served model's tokenizer"):
        sample.Config(uses="sample", input="p", model="m", logprobs=5, tokenizer="builtin:tiny-random")
    assert "tokenizer" in sample.Config.keyed_when_set


def assert_same_top_k(ids_a, logprobs_a, ids_b, logprobs_b, tolerance=1e-3):
    """Two top-K lists of one position agree: the same log-probs in order to `tolerance`, and the same ids except
    where log-probs within `tolerance` of each other may swap places (random weights give near-ties)."""
    np.testing.assert_allclose(logprobs_a, logprobs_b, atol=tolerance)
    a, b = dict(zip(ids_a.tolist(), logprobs_a)), dict(zip(ids_b.tolist(), logprobs_b))
    for token in set(a) ^ set(b):  # in one top K only: a near-tie at its boundary
        assert abs((a.get(token) if token in a else b[token]) - min(logprobs_a[-1], logprobs_b[-1])) <= tolerance
    for token in set(a) & set(b):
        assert abs(a[token] - b[token]) <= tolerance


@pytest.mark.slow
def test_a_real_vllm_server_gives_the_top_k_of_backend_vllm(tmp_path):
    """builtin:tiny-random served by `vllm serve` and sampled by backend vllm, float32, same seeds: where the two
    completions agree (the same context), the stored top-K ids and log-probs agree to 1e-3."""
    from tests.test_vllm_serve import start_server, stop_server

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS[:3]))
    common = {"uses": "sample", "input": "problems", "n": 2, "max_tokens": 12, "temperature": 1.0, "logprobs": 5,
              "logprob_dtype": "float32", "chunk_size": 2}
    process, base_url = start_server(resolve_model("builtin:tiny-random"), "--dtype", "float32")
    try:
        steps = {"problems": {"uses": "load", "path": str(data)},
                 "served": {**common, "model": "tiny", "backend": "openai", "base_url": base_url, "api_key_env": None},
                 "local": {**common, "model": "builtin:tiny-random", "dtype": "float32"}}
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(json.dumps({"name": "served", "seed": 7, "workdir": str(tmp_path / "work"), "steps": steps}))
        from pipeline.core.recipe import load_recipe

        run_recipe(load_recipe(recipe))
    finally:
        stop_server(process)
    served, local = (datasets.load_from_disk(str(tmp_path / "work" / name / "data")) for name in ("served", "local"))
    assert stored.same_vocabulary(served[0][stored.TOKENIZER], local[0][stored.TOKENIZER])
    compared = 0
    for a, b in zip(served, local):
        prompt_a, ids_a, top_a, lp_a, token_a = stored.row_arrays(a)
        prompt_b, ids_b, top_b, lp_b, token_b = stored.row_arrays(b)
        assert prompt_a.tolist() == prompt_b.tolist()  # the server's chat template rendered the same prompt
        same = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        # position `same` still has the same context (its token differs): its distribution is compared too
        upto = min(same + 1, len(ids_a), len(ids_b))
        for i in range(upto):
            assert_same_top_k(top_a[i], lp_a[i], top_b[i], lp_b[i])
        np.testing.assert_allclose(token_a[:same], token_b[:same], atol=1e-3)
        compared += upto
    assert compared >= 12  # most rows share their first tokens at least
