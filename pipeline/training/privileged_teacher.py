"""Is the privileged teacher a better teacher than the student? `opsd` measures it before it trains.

OPSD (pipeline/steps/opsd.py) pulls the student toward the same model shown a privileged context. That only helps when
the model with the context is the better one; on the CPU quickstart it was not (pass@1 went from 14.1% to 11.3%).
On a seeded slice of the opsd rows that have an answer, the model as it starts:

    pass rate   samples `samples` completions per problem after the student's prompt and as many after the
                teacher's (the rollouts' settings), graded against the row's answer (eval.answers, in the grading
                pool): the pass rate without and with the context, and its gain paired over problems
    NLL         scores the student's own correct completions (verified traces: what OPSD trains toward the teacher
                when the student is right) after the student's prompt and after the teacher's: the negative
                log-likelihood per token without and with the context, and its change paired over traces. Lower
                with the context: the teacher puts more weight on the tokens of correct reasoning than the student.

The teacher is no better when, with the context, the pass rate is not higher, or the verified traces' NLL is not
lower (point estimates; the paired intervals are recorded beside them). Sampling is HF generate, in batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.core.console import progress


def measure(model, tokenizer, student_prompts: list[list[dict]], teacher_prompts: list[list[dict]],
            answers: list[str], *, samples: int, max_tokens: int, temperature: float, top_p: float, top_k: int,
            batch_size: int, seed: int, grading_workers: int = 2, grading_timeout_s: float = 10.0) -> dict:
    """The check above over the given problems (student prompt, teacher prompt and answer of each, aligned).
    `model` is patched by `token_logprobs.add_token_logprob_forward`; `tokenizer` renders prompts as the rollouts do."""
    from eval.grading_pool import grade_many
    from eval.metrics import paired_difference
    from pipeline.training.token_logprobs import score_traces

    settings = dict(samples=samples, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    batch_size=batch_size)
    with progress("privileged-teacher check: sampling", total=2 * len(answers) * samples, unit="samples") as bar:
        without = sample(model, tokenizer, student_prompts, seed=seed, bar=bar, **settings)
        with_context = sample(model, tokenizer, teacher_prompts, seed=seed + 1, bar=bar, **settings)
    golds = [answer for answer in answers for _ in range(samples)]
    grades = {}
    for arm, completions in (("without", without), ("with", with_context)):
        grades[arm] = grade_many([c.text for c in completions], golds, workers=grading_workers,
                                 timeout_s=grading_timeout_s, finish_reasons=[c.finish_reason for c in completions])

    def pass_rates(arm: str) -> list[float]:
        correct = [grade.correct for grade in grades[arm]]
        return [sum(correct[p * samples:(p + 1) * samples]) / samples for p in range(len(answers))]

    rates = {arm: pass_rates(arm) for arm in grades}
    result = {
        "problems": len(answers),
        "samples_per_problem": samples,
        "pass_rate_without": round(mean(rates["without"]), 4),
        "pass_rate_with": round(mean(rates["with"]), 4),
        "pass_rate_gain": rounded(paired_difference(rates["without"], rates["with"], seed=seed)),
    }

    # Verified traces: the student's correct completions, scored after either prompt (the same completion tokens).
    verified = [(index, completion) for index, (completion, grade) in enumerate(zip(without, grades["without"]))
                if grade.correct]
    nll = {"without": [], "with": []}
    for start in range(0, len(verified), batch_size):
        batch = verified[start:start + batch_size]
        # each arm's samples are laid out alike, so sample `index` of an arm was drawn after that arm's prompt for
        # the same problem
        for arm, sampled in (("without", without), ("with", with_context)):
            traces = [(index, sampled[index].prompt_ids + completion.completion_ids, len(sampled[index].prompt_ids))
                      for index, completion in batch]
            nll[arm] += [summed / tokens for summed, tokens in score_traces(model, tokenizer, traces)]
    result["verified_traces"] = len(verified)
    if verified:
        result.update(nll_without=round(mean(nll["without"]), 4), nll_with=round(mean(nll["with"]), 4),
                      nll_change=rounded(paired_difference(nll["without"], nll["with"], seed=seed)))
    result.update(verdict(result))
    return result


def verdict(result: dict) -> dict:
    """`teacher_better` and why, from the point estimates (see the module docstring); both signals are named."""
    better = result["pass_rate_with"] > result["pass_rate_without"]
    reasons = [f"pass rate {100 * result['pass_rate_with']:.1f}% with the context vs "
               f"{100 * result['pass_rate_without']:.1f}% without" + ("" if better else " (not higher)")]
    if result.get("verified_traces"):
        lower = result["nll_with"] < result["nll_without"]
        better = better and lower
        reasons.append(f"NLL per token of the student's {result['verified_traces']} verified traces "
                       f"{result['nll_with']:.3f} with the context vs {result['nll_without']:.3f} without"
                       + ("" if lower else " (not lower)"))
    else:
        reasons.append("no verified trace of the student to score")
    return {"teacher_better": better, "why": "; ".join(reasons)}


@dataclass(slots=True)
class Completion:
    """One sampled completion: its prompt's token ids, its own (up to and with the end token), text and finish."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str  # stop | length


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def sample(model, tokenizer, prompts: list[list[dict]], *, samples: int, max_tokens: int, temperature: float,
           top_p: float, top_k: int, batch_size: int, seed: int, bar=None) -> list[Completion]:
    """`samples` completions of each prompt (prompt-major), with HF generate over left-padded batches."""
    import torch

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops]) | {tokenizer.eos_token_id}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_ids(tokenizer, messages) for messages in prompts[start:start + batch_size]]
        longest = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in batch], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                       temperature=temperature, top_p=top_p, top_k=top_k,
                                       max_new_tokens=max_tokens, num_return_sequences=samples, pad_token_id=pad)
        for row, tokens in enumerate(generated[:, longest:].tolist()):
            end = next((i + 1 for i, token in enumerate(tokens) if token in stops), None)
            tokens = tokens[:end] if end else tokens
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(batch[row // samples], tokens, text, "stop" if end else "length"))
        if bar is not None:
            bar.advance(len(batch) * samples)
    return completions


def slice_of(answers: list, problems: int, seed: int) -> list[int]:
    """Row indices of up to `problems` rows with an answer, drawn with `seed`, in row order."""
    answered = [i for i, answer in enumerate(answers) if answer is not None and str(answer).strip()]
    return sorted(random.Random(seed).sample(answered, min(problems, len(answered))))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def rounded(difference: dict) -> dict:
    return {key: [round(v, 4) for v in value] if isinstance(value, (list, tuple)) else
            round(value, 4) if isinstance(value, float) else value for key, value in difference.items()}
