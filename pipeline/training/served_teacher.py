"""A teacher behind an OpenAI-compatible vLLM server for the `onpolicy` step: its recipe block (`ServedTeacher`), what
the server says it serves (the manifest's teacher identity), the check that it reads the student's token ids, and
TRL's ServerDistillationTrainer built over it, so the teacher never loads in the training process.

TRL's client (`trl.generation.vllm_client.VLLMClient.get_sequence_logprobs`) scores prompt + rollout with one
`/v1/completions` request per batch (token-id prompts, `max_tokens: 1`, `prompt_logprobs: K`) and keeps, per rollout
token, the teacher's K most likely tokens and the log-prob of the sampled one. The loss is over that support plus
one tail bucket (1 - the support's mass) on each side: with `beta` 0 forward KL over the teacher's top K; with
`beta` above 0 TRL has only the top-1 path (the teacher's top token, the sampled token, and the tail).

Why the rollout temperature must be 1: vLLM's prompt log-probs skip the sampling processors (vllm
v1/worker/gpu_model_runner.py, `_get_prompt_logprobs_dict`: "prompt tokens skip sampling processors"), so the
server's teacher log-probs are at temperature 1 whatever TRL asks, while TRL divides the student's logits by the
temperature; at any other temperature the two sides would be at different temperatures.

Imports no torch at module level: the step's Config uses `ServedTeacher` when a recipe is only validated.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.errors import UserError

# vLLM's default --max-logprobs: the most prompt log-probs a server started without that flag returns per token.
SERVER_DEFAULT_MAX_LOGPROBS = 20
# Text whose token ids the student and the served teacher must agree on (with the student's special tokens added).
TOKENIZER_PROBE = "Distillation check: 12 + 30 = 42. Émile's naïve café, 東京, \\boxed{7}\n\t  done."


class ServedTeacher(BaseModel):
    """onpolicy's `teacher:` as a block: a teacher served by vLLM's OpenAI-compatible server."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(description="The vLLM server's API root, e.g. http://localhost:8000/v1 (`vllm serve`; "
                                      "the trainer needs vLLM's prompt_logprobs, which hosted APIs do not give).")
    model: str = Field(description="The model name the server serves (its --served-model-name).")
    top_k: int | None = Field(
        default=None, ge=1,
        description="Teacher tokens per position the loss sees (plus a tail bucket for the rest of its mass). "
                    "beta 0 (forward KL): 1 up to the server's --max-logprobs (vLLM default 20); beta above 0: only "
                    "1 (TRL's server path has top-1 support there). null: 20 with beta 0, 1 otherwise.")

    def loss_top_k(self, beta: float) -> int:
        """The top-K the loss uses at this beta."""
        if self.top_k is not None:
            return self.top_k
        return SERVER_DEFAULT_MAX_LOGPROBS if beta == 0 else 1

    def server_root(self) -> str:
        """The server's root URL without the /v1 API suffix, as TRL's VLLMClient takes it (it appends /v1/...)."""
        root = self.base_url.rstrip("/")
        return root.removesuffix("/v1")

    def identity(self) -> str:
        """The teacher as the step's key sees it: the server and the name it serves, never the weights behind them."""
        return f"{self.base_url} {self.model}"


def check_settings(teacher: ServedTeacher, *, beta: float, temperature: float) -> None:
    """Raise ValueError (the recipe's validation error) for settings TRL's server path cannot honour."""
    top_k = teacher.loss_top_k(beta)
    if beta > 0 and top_k != 1:
        raise ValueError(f"a served teacher with beta {beta} takes teacher.top_k 1 only (TRL's ServerDistillation"
                         "Trainer has top-K support only for forward KL): set beta: 0 for top-K, or top_k: 1")
    if temperature != 1.0:
        raise ValueError(f"a served teacher needs temperature 1.0 (got {temperature}): vLLM's prompt log-probs are "
                         "at temperature 1 whatever the request asks, while TRL divides the student's logits by it")


def describe_server(teacher: ServedTeacher, timeout: float = 30.0) -> dict:
    """The served teacher's identity for the manifest: base_url, the model name, and what the server reports behind
    that name (`root`: the path or hub id it loaded, `max_model_len`). UserError when the server cannot be reached or
    does not serve the name."""
    import requests

    url = f"{teacher.server_root()}/v1/models"
    try:
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
        served = response.json()["data"]
    except (requests.RequestException, ValueError, KeyError) as error:
        raise UserError(f"onpolicy: teacher.base_url {teacher.base_url}: no model list from {url} ({error}); start "
                        "the teacher with `vllm serve MODEL --served-model-name NAME` and give its API root") from None
    entry = next((model for model in served if model.get("id") == teacher.model), None)
    if entry is None:
        raise UserError(f"onpolicy: the server at {teacher.base_url} does not serve teacher.model {teacher.model!r} "
                        f"(it serves: {', '.join(repr(model.get('id')) for model in served) or 'nothing'})")
    return {"base_url": teacher.base_url, "model": teacher.model, "served_root": entry.get("root"),
            "max_model_len": entry.get("max_model_len")}


def check_tokenizer(teacher: ServedTeacher, tokenizer, timeout: float = 30.0) -> None:
    """Refuse a served teacher that tokenizes differently from the student (the loss compares token ids; a served
    teacher cannot be re-tokenized as GOLD does with a local one): the server's `/tokenize` of a probe text with the
    student's special tokens must give the student's ids."""
    import requests

    specials = [token for token in dict.fromkeys(tokenizer.all_special_tokens) if token]
    probe = TOKENIZER_PROBE + "".join(specials)
    expected = tokenizer.encode(probe, add_special_tokens=False)
    url = f"{teacher.server_root()}/tokenize"
    try:
        response = requests.post(url, json={"model": teacher.model, "prompt": probe, "add_special_tokens": False},
                                 timeout=timeout)
        response.raise_for_status()
        served = response.json()["tokens"]
    except (requests.RequestException, ValueError, KeyError) as error:
        raise UserError(f"onpolicy: could not check the served teacher's tokenizer at {url} ({error}); the teacher "
                        "must be a vLLM server (it has /tokenize)") from None
    if served != expected:
        first = next((i for i, (a, b) in enumerate(zip(expected, served)) if a != b), min(len(expected), len(served)))
        raise UserError(
            f"onpolicy: served teacher {teacher.model!r} at {teacher.base_url} tokenizes differently from the student "
            f"({len(expected)} vs {len(served)} ids for a probe text, first difference at id {first}). The loss "
            "compares token ids, so a served teacher must use the student's tokenizer; a teacher of another family "
            "trains locally (teacher: MODEL, cross_tokenizer: true) or through its samples (sample -> sft)")


def served_teacher_trainer(teacher: ServedTeacher, *, beta: float, model, tokenizer, rows, arguments: dict,
                           peft_config):
    """TRL's ServerDistillationTrainer over the prompt rows, scoring the student's rollouts on the served teacher;
    `arguments`: the Trainer and rollout arguments (with beta)."""
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    args = ServerDistillationConfig(
        **arguments,
        teacher_model_server_url=teacher.server_root(),
        loss_top_k=teacher.loss_top_k(beta),
        loss_add_tail=True,  # the teacher's mass outside its top K is one more bucket on each side
    )
    return ServerDistillationTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                                     peft_config=peft_config)
