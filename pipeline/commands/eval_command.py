"""`distill eval`: the `evaluate` step's evaluation (eval/run.py) outside a recipe, on models and benchmarks named on
the command line, with the step's settings as --flags; or `--rescore DIR` to re-grade an earlier run's samples."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pydantic import ValidationError

from eval.results import RESULTS_JSON, SAMPLES_DIR, print_table, rescore
from eval.run import evaluate_models
from pipeline.core.errors import UserError
from pipeline.core.outputs import EVAL, claim_dir, make_dir, never_written, remove_made
from pipeline.steps.evaluate import Config

# Config fields the command takes as --flags (the rest: models, --benchmarks, and the step's own keys)
CLI_FIELDS = ("baseline", "preset", "n", "temperature", "top_p", "top_k", "max_tokens", "max_model_len", "dtype",
              "prompt_template", "think_prefix", "limit", "chunk_size", "workers", "timeout_s",
              "tensor_parallel_size", "data_parallel_size", "distributed_executor_backend", "engine", "replicas",
              "batch_size", "ray_address")
# What `distill eval` writes into --out (and --rescore rewrites), each checked before anything is written.
EVAL_OUTPUTS = (RESULTS_JSON, SAMPLES_DIR, SAMPLES_DIR + ".tmp", "report.md", "accuracy.png", "lengths.png",
                ".scratch")


def add_cli_arguments(parser) -> None:
    """`distill eval`'s arguments: one --flag per sampling/grading field of Config, with its help text."""
    parser.add_argument("models", nargs="*", metavar="MODEL", help=(
        "builtin:NAME, a local model dir, a hub id, or a recipe step dir (runs/<recipe>/<step>, its model/)"))
    parser.add_argument("--benchmarks", metavar="B[:N],...", help=(
        "comma-separated: aime24, aime25, amc23, math500, gsm8k, arith_test or a .jsonl/.parquet file; "
        ":N keeps the first N problems"))
    parser.add_argument("--out", metavar="DIR", help="output dir (default runs/eval/<date>-<time>)")
    parser.add_argument("--seed", type=int, default=0, help=(
        "sampling seed: sample k of a problem draws from a seed made of it, the problem id and k (default 0)"))
    parser.add_argument("--rescore", metavar="DIR", help=(
        "re-grade the saved completions of an earlier run in DIR (no generation) and rewrite its results"))
    for name in CLI_FIELDS:
        field = Config.model_fields[name]
        # argparse formats help strings with %: a literal one ("95% interval") is written %%
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE",
                            help=(field.description or "").replace("%", "%%"))


def run_cli(args) -> int:
    if args.rescore:
        return _rescore(args)
    if not args.models or not args.benchmarks:
        raise UserError("distill eval needs MODEL(s) and --benchmarks (or --rescore DIR)")
    cfg = _config(args)
    out_dir = Path(args.out or Path("runs") / "eval" / time.strftime("%Y%m%d-%H%M%S"))
    read = [Path(path).expanduser() for path in [*cfg.input_paths(), *cfg.models] if Path(path).expanduser().exists()]
    claim_dir(out_dir, EVAL_OUTPUTS, EVAL, overwrite=args.overwrite, never=never_written(out_dir, read=read))
    models = {ref: resolve_cli_model(ref) for ref in cfg.models}
    made = make_dir(out_dir, EVAL, "--out")
    scratch = out_dir / ".scratch"
    try:
        document = evaluate_models(cfg, models, out_dir, scratch, args.seed)
    except UserError:
        remove_made(out_dir, made)  # a refused evaluation leaves nothing behind
        raise
    shutil.rmtree(scratch, ignore_errors=True)  # everything is in samples/ now
    print_table(document)
    print(f"results → {out_dir / RESULTS_JSON}, report → {out_dir / 'report.md'}")
    return 0


def _rescore(args) -> int:
    claim_dir(Path(args.rescore), EVAL_OUTPUTS, EVAL, overwrite=args.overwrite,
              never=never_written(Path(args.rescore)))
    document = rescore(Path(args.rescore), workers=_positive(args.workers, "--workers", int),
                       timeout_s=_positive(args.timeout_s, "--timeout-s", float))
    print_table(document)
    print(f"rescored → {args.rescore}")
    return 0


def _config(args) -> Config:
    """The step's Config from the command line; a setting it refuses is named by its --flag."""
    settings = {name: getattr(args, name) for name in CLI_FIELDS if getattr(args, name) is not None}
    try:
        return Config(uses="evaluate", models=args.models,
                      benchmarks=[b.strip() for b in args.benchmarks.split(",") if b.strip()], **settings)
    except ValidationError as error:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                             for e in error.errors())
        raise UserError(f"distill eval: {problems}") from None


def _positive(value: str | None, flag: str, kind: type) -> int | float | None:
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise UserError(f"{flag} must be a positive {kind.__name__}, got {value!r}")
    return number


def resolve_cli_model(ref: str) -> str:
    """A model the command can load: a recipe step dir means its model/; everything else as in recipes."""
    from pipeline.core.artifacts import read_manifest
    from pipeline.core.models import STEP_PREFIX, resolve_model

    path = Path(ref).expanduser()
    if (path / "manifest.json").is_file():
        manifest = read_manifest(path)
        if manifest.get("produces") != "model":
            raise UserError(f"{ref}: step {manifest.get('step')!r} produced a {manifest.get('produces')}, "
                            "not a model")
        return str((path / "model").resolve())
    if ref.startswith(STEP_PREFIX):
        raise UserError(f"{ref}: step:NAME only works inside a recipe; pass the step's dir (runs/<recipe>/<step>)")
    return resolve_model(ref)
