"""The sample step's `backend: openai` against a real local HTTP server speaking the chat completions API: rows,
retries, the concurrency bound, resume after a failed run, errors, and that the API key is written nowhere."""

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import pytest

from pipeline.core.errors import UserError
from pipeline.core.recipe import load_recipe
from pipeline.core.runner import run_recipe
from pipeline.engines.request import sample_seed
from pipeline.steps import sample

KEY_ENV = "DISTILL_TEST_OPENAI_KEY"
KEY = "sk-test-0123456789-do-not-leak"
PROBLEMS = [{"id": f"q{i}", "problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)} for i in range(5)]


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions in a thread: deterministic replies, answers 500 then 429 to
    the first two requests, 400 to any prompt containing a string in `refuse`, and counts requests in flight."""

    def __init__(self, delay_s=0.05):
        self.requests, self.refuse = [], set()
        # the field a reasoning parser returns the think span in (vLLM --reasoning-parser, the DeepSeek API); None:
        # a plain server, whose content holds everything
        self.reasoning_field = None
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_GET(self):
                self.answer(*server.info(self.path, self.headers.get("Authorization"), None))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":  # not a sampling request: neither counted nor failed on purpose
                    return self.answer(*server.info(self.path, self.headers.get("Authorization"), body))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append(body)
                    attempt = len(server.requests)
                try:
                    time.sleep(delay_s)  # long enough for requests to overlap
                    status, reply = server.reply(self.path, self.headers.get("Authorization"), body, attempt)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                self.answer(status, reply)

            def answer(self, status, reply):
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def info(self, path, authorization, body):
        """GET /v1/models and POST /tokenize: a plain OpenAI-compatible server has neither (vLLM's has both)."""
        return 404, {"error": {"message": f"no route {path}"}}

    def reply(self, path, authorization, body, attempt):
        if authorization != f"Bearer {KEY}":
            return 401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}}
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        if attempt <= 2:  # the client must retry these
            return (500 if attempt == 1 else 429), {"error": {"message": "try again"}}
        question = body["messages"][-1]["content"]
        if any(text in question for text in self.refuse):
            return 400, {"error": {"message": "this prompt is refused"}}
        if self.reasoning_field:
            return 200, self.reasoning_reply(body, question)
        words = f"seed {body['seed']}: {question.split('?')[0]} is \\boxed{{0}}".split()
        text = " ".join(words[:body["max_tokens"]])
        return 200, {
            "id": "cmpl", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length" if len(words) > body["max_tokens"] else "stop"}],
            "usage": {"prompt_tokens": len(json.dumps(body["messages"]).split()),
                      "completion_tokens": len(text.split()), "total_tokens": 0},
        }

    def reasoning_reply(self, body, question):
        """As a server with a reasoning parser: 6 words of reasoning apart, then the right answer as the content;
        a budget that ends inside the reasoning leaves no content and finishes with "length"."""
        a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", question).groups())
        thought = f"seed {body['seed']}: add {a} and {b}".split()
        cut = len(thought) >= body["max_tokens"]
        message = {"role": "assistant", "content": None if cut else f"The answer is \\boxed{{{a + b}}}.",
                   self.reasoning_field: " ".join(thought[:body["max_tokens"]])}
        return {"id": "cmpl", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "length" if cut else "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": min(len(thought) + 5, body["max_tokens"]),
                          "total_tokens": 0}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


def write_recipe(tmp_path, server, then=None, **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS))
    step = {"uses": "sample", "input": "problems", "model": "served-model", "backend": "openai",
            "base_url": server.base_url, "api_key_env": KEY_ENV, "n": 3, "max_tokens": 12, "chunk_size": 2,
            "max_concurrency": 3, **settings}
    recipe = {"name": "openai", "seed": 7, "workdir": str(tmp_path / "work"),
              "steps": {"problems": {"uses": "load", "path": str(data)}, "samples": step, **(then or {})}}
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return load_recipe(path)


def all_text_under(path):
    return "".join(p.read_bytes().decode(errors="replace") for p in path.rglob("*") if p.is_file())


def test_openai_backend_writes_the_samples_contract_and_never_the_key(tmp_path, server, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)  # the openai client and httpx log requests at debug level
    run_recipe(write_recipe(tmp_path, server, max_tokens=8))
    workdir = tmp_path / "work"
    samples = datasets.load_from_disk(str(workdir / "samples" / "data"))

    assert len(samples) == 15 and samples["id"] == [p["id"] for p in PROBLEMS for _ in range(3)]
    assert samples["sample_idx"] == [0, 1, 2] * 5
    assert samples["prompt"][0][-1]["content"].startswith("What is 0 + 3?\n\nPlease reason step by step")
    assert samples["completion"][0].startswith("seed ") and "What is 0 + 3 is" in samples["completion"][0]
    assert len(set(samples["completion"])) == 15  # each sample its own request and seed
    # the seed of sample k of a problem comes from (recipe seed, problem id, k), as with the vllm backend
    assert all(completion.startswith(f"seed {sample_seed(7, problem_id, k)}:") for completion, problem_id, k
               in zip(samples["completion"], samples["id"], samples["sample_idx"]))
    assert set(samples["model"]) == {"served-model"}
    # "seed N: What is 0 + 3 is \boxed{0}" is 9 words: cut to 8 by max_tokens
    assert set(samples["finish_reason"]) == {"length"} and set(samples["completion_tokens"]) == {8}

    assert len(server.requests) == 15 + 2  # the 500 and the 429 were retried
    assert server.max_in_flight == 3  # max_concurrency, reached and never passed
    assert all(r["model"] == "served-model" and r["n"] == 1 and r["max_tokens"] == 8 for r in server.requests)

    stats = json.loads((workdir / "samples" / "manifest.json").read_text())["stats"]
    assert stats["completion_tokens"] == 15 * 8 and stats["finish_length"] == 15
    assert stats["prompt_tokens_sent"] == sum(samples["prompt_tokens"]) == 3 * stats["prompt_tokens"]
    assert stats["tokens_per_s"] > 0 and (stats["chunks"], stats["chunks_resumed"]) == (3, 0)

    logged = caplog.text + "".join(capfd.readouterr())
    assert "chat/completions" in logged  # the debug logs were captured, so the next check means something
    assert KEY not in logged
    assert KEY not in all_text_under(tmp_path)
    assert KEY_ENV in (workdir / "samples" / "manifest.json").read_text()  # the variable's name is recorded


def test_a_failed_run_resumes_without_repeating_or_duplicating(tmp_path, server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.refuse = {"What is 3 + 6?"}  # problem q3, in the second of three chunks
    with pytest.raises(UserError, match="refused the request"):
        run_recipe(write_recipe(tmp_path, server, max_concurrency=1))
    shard_dir = tmp_path / "work" / ".samples.scratch" / sample.SHARD_DIR
    assert sorted(p.name for p in shard_dir.glob("chunk-*.json")) == ["chunk-000000.json"]
    first_run = list(server.requests)

    server.refuse = set()
    run_recipe(write_recipe(tmp_path, server, max_concurrency=1))
    resumed = server.requests[len(first_run):]
    asked = [r["messages"][-1]["content"].split("?")[0] for r in resumed]
    assert sorted(set(asked)) == [f"What is {i} + {i + 3}" for i in (2, 3, 4)]  # chunk 0 was not asked again
    assert len(resumed) == 3 * 3

    samples = datasets.load_from_disk(str(tmp_path / "work" / "samples" / "data"))
    pairs = list(zip(samples["id"], samples["sample_idx"]))
    assert len(pairs) == len(set(pairs)) == 15
    manifest = json.loads((tmp_path / "work" / "samples" / "manifest.json").read_text())
    assert manifest["stats"]["chunks_resumed"] == 1
    # the same seeds as a run that never failed: each sample's seed depends on its problem and index only
    expected = [f"seed {r['seed']}:" for r in first_run[2:5]]
    assert all(e in c for e, c in zip(expected, samples["completion"][:3]))


def test_missing_key_variable_wrong_key_and_no_server_are_user_errors(tmp_path, server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(UserError, match=f"{KEY_ENV} .*not set.*{server.base_url}"):
        run_recipe(write_recipe(tmp_path, server))

    monkeypatch.setenv(KEY_ENV, "sk-wrong-key")
    with pytest.raises(UserError, match=f"{server.base_url} refused the API key from \\${KEY_ENV}") as refused:
        run_recipe(write_recipe(tmp_path, server))
    assert "sk-wrong-key" not in str(refused.value)

    monkeypatch.setenv(KEY_ENV, KEY)
    server.close()  # nothing listens on that port any more
    with pytest.raises(UserError, match=f"could not reach .* at {server.base_url}"):
        run_recipe(write_recipe(tmp_path, server, max_retries=1, request_timeout=5))


def test_openai_backend_refuses_a_think_prefix_and_needs_base_url():
    with pytest.raises(ValueError, match="cannot force think_prefix"):
        sample.Config(uses="sample", input="p", model="m", backend="openai", base_url="http://x/v1",
                      think_prefix="<think>\n")
    with pytest.raises(ValueError, match="needs base_url"):
        sample.Config(uses="sample", input="p", model="m", backend="openai")
    assert sample.Config(uses="sample", input="p", model="m", backend="openai", base_url="http://x/v1").model_refs() == []


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_returned_apart_is_kept_and_a_cut_inside_it_grades_truncated(tmp_path, server, monkeypatch, field):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.reasoning_field = field
    graded = {"graded": {"uses": "verify", "input": "samples", "workers": 1}}
    for budget in (12, 4):  # room for the 6 words of reasoning and the answer; cut inside the reasoning
        run_recipe(write_recipe(tmp_path / str(budget), server, then=graded, max_tokens=budget))
    whole = datasets.load_from_disk(str(tmp_path / "12" / "work" / "graded" / "data"))
    seed = sample_seed(7, "q1", 0)
    assert whole["completion"][3] == f"<think>\nseed {seed}: add 1 and 4\n</think>\n\nThe answer is \\boxed{{5}}."
    assert (whole["reasoning"][3], whole["response"][3]) == (f"seed {seed}: add 1 and 4", "The answer is \\boxed{5}.")
    assert set(whole["think_prefix"]) == {""} and set(whole["prompt_text"]) == {None}
    assert set(whole["label"]) == {"correct"}

    cut = datasets.load_from_disk(str(tmp_path / "4" / "work" / "graded" / "data"))
    assert cut["completion"][3] == f"<think>\nseed {seed}: add 1"  # the think span stays open
    assert (cut["reasoning"][3], cut["response"][3]) == (f"seed {seed}: add 1", "")
    assert set(cut["finish_reason"]) == {"length"} and set(cut["label"]) == {"truncated"}


def test_a_reply_that_closes_a_think_span_the_template_opened_gets_its_opener():
    from openai.types.chat import ChatCompletionMessage

    from pipeline.engines.openai_client import completion_text

    def text(finish_reason="stop", **fields):
        return completion_text(ChatCompletionMessage(role="assistant", **fields), finish_reason)

    assert text(content="2 + 2 is 4</think>\n\n\\boxed{4}") == "<think>\n2 + 2 is 4</think>\n\n\\boxed{4}"
    assert text(content="<think>\nhm</think>\n\n\\boxed{4}") == "<think>\nhm</think>\n\n\\boxed{4}"
    assert text(content="\\boxed{4}") == "\\boxed{4}"
    assert text(content=None, reasoning_content="hm", finish_reason="length") == "<think>\nhm"
    # a server that counts an unfinished reply as stopped still gets the whole trace
    assert text(content="", reasoning="hm") == "<think>\nhm\n</think>\n\n"
