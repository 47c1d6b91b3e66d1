"""verify's LLM-judge fallback (`judge:`): which rows are asked, the strict verdict, `graded_by`, the cache (a re-run
asks nothing), the key; against a local HTTP server speaking the chat completions API (fast) and with
builtin:tiny-random as a local vLLM judge (its verdicts are noise: the plumbing is what is tested)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import eval.judge
from eval.judge import JudgeSettings, judge_prompt, parse_verdict
from pipeline.core.keys import keyed_config
from pipeline.steps import verify
from tests.step_runner import run_on_rows

ROWS = [  # id, answer, completion, the grader's label
    ("p1", "12", "\\boxed{12}", "correct"),  # correct: never asked
    ("p1", "12", "\\boxed{13}", "incorrect"),  # asked with its extracted answer; the server says NO
    ("p2", "\\text{all real numbers}", "\\boxed{(-\\infty, \\infty)}", "incorrect"),  # the server says YES
    ("p3", "5", "It is five, I am sure of it", "no_answer"),  # asked with the reply's end; the server says YES
    ("p3", "5", "\\boxed{6}", "incorrect"),  # the server rambles: unparsed, keeps its label
    ("p4", "5", "\\boxed{5", "truncated"),  # cut off: never asked
    ("p5", "", "\\boxed{1}", "bad_gold"),  # ungraded: never asked
]


def rows():
    return [{"id": pid, "answer": gold, "completion": text, "finish_reason": "length" if label == "truncated" else
             "stop", "problem": f"Problem {pid}"} for pid, gold, text, label in ROWS]


class JudgeServer:
    """/v1/chat/completions in a thread: YES when the prompt after the problem mentions infty or five, NO when it says
    13, a sentence otherwise; keeps every request."""

    def __init__(self):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                student = body["messages"][-1]["content"].split("Reference answer:", 1)[1]
                text = ("YES" if "infty" in student or "five" in student else
                        "NO." if "13" in student else "Let me think about whether these are equal.")
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": text}}],
                                   "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.httpd.shutdown()


def test_server_judge_asks_only_eligible_rows_and_caches(tmp_path, judge_server, monkeypatch):
    judge = {"base_url": judge_server.base_url, "model": "judge-model"}
    artifact, graded = run_on_rows(verify, tmp_path, rows(), uses="verify", input_name="samples", timeout_s=30,
                                   judge=judge)
    assert len(judge_server.requests) == 4  # the incorrect and no_answer rows only
    asked = [r["messages"][0]["content"] for r in judge_server.requests]
    assert all(r["temperature"] == 0 and isinstance(r["seed"], int) for r in judge_server.requests)  # greedy, seeded
    assert any("Student's final answer:\n13" in p and "Reference answer:\n12" in p and "Problem p1" in p
               for p in asked)
    assert any("End of the student's solution:\nIt is five" in p for p in asked)
    assert graded["label"] == ["correct", "incorrect", "correct", "correct", "incorrect", "truncated", "bad_gold"]
    assert graded["correct"] == [True, False, True, True, False, False, False]
    assert graded["graded_by"] == ["rules", "judge", "judge", "judge", "rules", "rules", "rules"]
    assert graded["pass_rate"][:5] == [0.5, 0.5, 1.0, 0.5, 0.5]
    stats = artifact.stats
    assert {k: stats[k] for k in ("judge_eligible", "judge_asked", "judge_cached", "judge_yes", "judge_no",
                                  "judge_unparsed")} == {"judge_eligible": 4, "judge_asked": 4, "judge_cached": 0,
                                                         "judge_yes": 2, "judge_no": 1, "judge_unparsed": 1}
    assert stats["judge_unparsed_examples"][0]["row"] == 4
    # a resumed run (same scratch) asks nothing: every verdict comes from the step's cache
    judge_server.requests.clear()
    artifact, again = run_on_rows(verify, tmp_path, rows(), uses="verify", input_name="samples", timeout_s=30,
                                  judge=judge)
    assert judge_server.requests == [] and again["graded_by"] == graded["graded_by"]
    assert (artifact.stats["judge_asked"], artifact.stats["judge_cached"]) == (0, 4)


def test_verdicts_are_read_strictly():
    assert [parse_verdict(r) for r in ("YES", " no.\n", "**Yes**", "<think>hmm, 1/2 = 0.5</think>\nYES")] == [
        True, False, True, True]
    assert [parse_verdict(r) for r in ("", "Yes, they are equal", "YES NO", "maybe", None, "NOPE")] == [None] * 6


def test_prompt_is_fixed_and_versioned():
    prompt = judge_prompt("v1", problem="What is 6*7?", gold="42", extracted="", completion="<think>x</think>It is 42")
    assert prompt == eval.judge.JUDGE_PROMPT_V1.format(problem="What is 6*7?", gold="42",
                                                       answer_heading="End of the student's solution",
                                                       answer="It is 42")
    assert prompt.endswith("Reply with exactly one word: YES or NO.")


def test_judge_model_and_prompt_version_are_keyed():
    plain = verify.Config(uses="verify", input="s")
    assert "judge" not in keyed_config(plain) and plain.model_refs() == [] and plain.dtype_choice() is None
    local = verify.Config(uses="verify", input="s", judge={"model": "builtin:tiny-random"})
    assert keyed_config(local)["judge"]["model"] == "builtin:tiny-random"
    assert keyed_config(local)["judge"]["prompt_version"] == "v1"
    assert local.model_refs() == ["builtin:tiny-random"] and local.dtype_choice() is not None
    served = verify.Config(uses="verify", input="s", judge={"model": "m", "base_url": "http://127.0.0.1:1/v1"})
    assert served.model_refs() == [] and keyed_config(served)["judge"]["base_url"] == "http://127.0.0.1:1/v1"
    with pytest.raises(ValueError, match="prompt_version"):
        JudgeSettings(model="m", prompt_version="v0")


@pytest.mark.slow  # a vLLM engine start: about a minute on two busy cores
def test_local_tiny_random_judge_plumbing(tmp_path, monkeypatch):
    from pipeline.engines import vllm_local

    calls = []
    real_generate = vllm_local.generate

    def counting_generate(request, **kwargs):
        calls.append(len(request.prompts))
        return real_generate(request, **kwargs)

    monkeypatch.setattr(vllm_local, "generate", counting_generate)
    judge = {"model": "builtin:tiny-random", "max_tokens": 3, "max_model_len": 512}
    artifact, graded = run_on_rows(verify, tmp_path, rows(), uses="verify", input_name="samples", timeout_s=30,
                                   judge=judge)
    assert calls == [4]  # one engine, the four eligible rows
    stats = artifact.stats
    assert stats["judge_eligible"] == stats["judge_asked"] == 4
    # a random model's replies: whatever it said, each eligible row is either judged or counted unparsed
    assert stats["judge_yes"] + stats["judge_no"] + stats["judge_unparsed"] == 4
    assert graded["graded_by"].count("judge") == stats["judge_yes"] + stats["judge_no"]
    assert [graded["label"][i] for i in (0, 5, 6)] == ["correct", "truncated", "bad_gold"]  # never asked
    # the re-run finds every reply in the cache: no engine at all
    calls.clear()
    artifact, _ = run_on_rows(verify, tmp_path, rows(), uses="verify", input_name="samples", timeout_s=30,
                              judge=judge)
    assert calls == [] and artifact.stats["judge_cached"] == 4


@pytest.mark.slow  # vllm serve takes about a minute to start on two cores
def test_real_vllm_server_judge(tmp_path):
    from pipeline.core.models import resolve_model
    from tests.test_vllm_serve import start_server, stop_server

    process, base_url = start_server(resolve_model("builtin:tiny-random"))
    try:
        judge = {"base_url": base_url, "model": "tiny", "max_tokens": 3}
        artifact, graded = run_on_rows(verify, tmp_path, rows(), uses="verify", input_name="samples", timeout_s=30,
                                       judge=judge)
        again, _ = run_on_rows(verify, tmp_path, rows(), uses="verify", input_name="samples", timeout_s=30,
                               judge=judge)
    finally:
        stop_server(process)
    stats = artifact.stats
    assert stats["judge_asked"] == stats["judge_eligible"] == 4
    assert stats["judge_yes"] + stats["judge_no"] + stats["judge_unparsed"] == 4
    assert graded["graded_by"].count("judge") == stats["judge_yes"] + stats["judge_no"]
    assert (again.stats["judge_asked"], again.stats["judge_cached"]) == (0, 4)


def test_unreachable_judge_server_is_a_user_error(tmp_path):
    from pipeline.core.errors import UserError

    judge = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "request_timeout": 2}
    with pytest.raises(UserError, match=r"^verify judge: could not reach .*127\.0\.0\.1:9"):
        run_on_rows(verify, tmp_path, rows(), uses="verify", input_name="samples", timeout_s=30, judge=judge)
