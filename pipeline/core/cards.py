"""Cards: the README.md the Hugging Face Hub shows for a step's dataset or model, one code path for both.

    <workdir>/<step>/README.md         a dataset step's card, beside data/
    <workdir>/<step>/model/README.md   a model step's card, inside the model dir (it travels with the weights)

A card is YAML front matter the Hub reads (license when the source says one, task or pipeline tag, tags:
distillery, a dataset's size category, a model's base model and library) and a body. A dataset's body: its columns
and types and row count, then the lineage every card shares (`lineage_sections`): the recipe, this step and each
step it came from with its type, key and what its manifest stats say it made and left out (each step module's
`funnel_stage` hook, as the run page shows it: filters and their counts, grading labels), the teacher that wrote the
rows (a `sample` step's model), the source data and its licence, the seed and the library versions. A model's body is
the text its step wrote (`model_card_body`: sft, redi, opsd, onpolicy through pipeline.training.build; merge its own),
kept as it was, between the front matter and the same lineage.

The runner writes the card (`write_card`) into the step's temp dir before the manifest, so it is published with the
step. Nothing reads it back as input: a step's key never covers it (keys hash configs and parent keys; a model dir's
digest skips *.md), and a step is complete without it (`pipeline.core.artifacts.output_state` checks only data/ or
model/), so workdirs from before cards stay up to date; `distill push` renders the card of such a step on the fly
(`card_text`). The card holds no time or duration, so two runs of the same seed write the same card.

Licence: known from the source only. A `load` step's hub dataset (a local Hub-layout dir, or the hub cache's copy of
the commit it read; never the network) says it in its card's front matter; a manifest whose config or stats carry
`license` says it too. When every source of a dataset says the same licence, the dataset card's front matter has
it; otherwise it has none and the body says so. A model card's front matter has none (a model's licence is its base
model's, which no manifest records); its body lists its data's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.artifacts import read_manifest, write_atomic
from pipeline.core.outputs import RUN_FILE

CARD = "README.md"
TAG = "distillery"
# The Hub's size categories (huggingface.co/docs/hub/datasets-cards): upper bounds and their names.
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def card_path(step_dir: Path, kind: str) -> Path | None:
    """Where a step of `kind` (dataset, model) keeps its card; None for a report step, which has none."""
    return {"dataset": step_dir / CARD, "model": step_dir / "model" / CARD}.get(kind)


def model_card_body(title: str, sentence: str, facts: list[str]) -> str:
    """The body of a model card as a training step writes it: a title, one sentence on what the model is and which
    step made it, and a line per fact (base model, data, teacher, schedule)."""
    return f"# {title}\n\n{sentence}\n\n" + "".join(f"- {fact}\n" for fact in facts)


def write_card(step_dir: Path, manifest: dict) -> None:
    """Write the card of the step whose (temp) dir is `step_dir` and whose manifest is `manifest` (not yet on disk):
    its workdir is `step_dir`'s parent, where its parents' manifests are. A model step's own card text becomes the
    body; nothing is written for a report step."""
    path = card_path(step_dir, manifest.get("produces", ""))
    if path is None or not path.parent.is_dir():
        return
    text = render_card(step_dir, manifest)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def card_text(step_dir: Path) -> str:
    """The card of a complete step dir: the one on disk when it is a full card (has front matter), else rendered
    now from the manifests (a step from before cards; a model step's card then keeps its text as the body)."""
    manifest = read_manifest(step_dir)
    path = card_path(step_dir, manifest.get("produces", ""))
    if path is not None and path.is_file():
        text = path.read_text()
        if text.startswith("---\n"):
            return text
    return render_card(step_dir, manifest)


def render_card(step_dir: Path, manifest: dict) -> str:
    """The full card of a step: front matter, body, lineage."""
    chain = ancestry(manifest, step_dir.parent)
    licenses = source_licenses(chain)
    known = {license for _, license in licenses if license}
    license = known.pop() if len(known) == 1 and all(license for _, license in licenses) else None
    if manifest.get("produces") == "model":
        meta, body = _model_meta(step_dir, manifest), _model_body(step_dir, manifest)
    else:
        meta, body = _dataset_meta(step_dir, license), _dataset_body(step_dir, manifest)
    return front_matter(meta) + "\n" + body + "\n" + lineage_sections(chain, step_dir.parent, licenses)


def front_matter(meta: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


# --- what the cards are made of ------------------------------------------------------------------------------------


def ancestry(manifest: dict, workdir: Path) -> list[dict]:
    """This step's manifest, then each step it came from (parents before grandparents, each once), read from the
    workdir. A parent whose output now has another key than the one this step read is marked `stale`; one whose
    manifest does not read ends that branch."""
    chain, seen, pending = [], set(), [manifest]
    while pending:
        current = pending.pop(0)
        if current["step"] in seen:
            continue
        seen.add(current["step"])
        chain.append(current)
        for parent, key in (current.get("parents") or {}).items():
            try:
                parent_manifest = read_manifest(workdir / parent)
            except (OSError, ValueError):
                continue
            if isinstance(parent_manifest, dict) and parent_manifest.get("step") == parent:
                pending.append({**parent_manifest, "stale": parent_manifest.get("key") != key})
    return chain


def recipe_name(workdir: Path, manifest: dict) -> str:
    """The recipe's name from the workdir's run record, else its file's stem."""
    try:
        name = json.loads((workdir / RUN_FILE).read_text())["document"]["name"]
        if isinstance(name, str):
            return name
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return Path(str(manifest.get("recipe") or "?")).stem


def made_what(manifest: dict) -> tuple[str, list[str], list[str]]:
    """What a step made ("graded samples (6 rows, 3 problems)"), how its rows divide and what it left out, from its
    module's `funnel_stage` hook as the run page reads it; a step whose module lacks it or whose stats it cannot
    read: plain rows."""
    from pipeline.core.funnel import FunnelStage, trained_stage
    from pipeline.core.step import step_module

    stats = manifest.get("stats") or {}
    try:
        describe = getattr(step_module(manifest.get("uses", "")), "funnel_stage", None)
        stage = describe(stats) if describe is not None else \
            trained_stage(stats) if manifest.get("produces") == "model" else FunnelStage("rows", None)
    except Exception:  # noqa: BLE001 - a module gone or stats of an older version: the card still says the rows
        stage = FunnelStage("rows", None)
    breakdown = [f"{count.label} {count.count:,}" for count in stage.breakdown]
    dropped = [f"{count.label} {count.count:,}" for count in stage.dropped if count.count]
    rows = stats.get("rows")
    counts = [f"{rows:,} rows" if isinstance(rows, int) else "",
              f"{stage.problems:,} problems" if isinstance(stage.problems, int) else ""]
    what = stage.what + (f" ({', '.join(count for count in counts if count)})" if any(counts) else "")
    return what, breakdown, dropped


def teachers(chain: list[dict]) -> list[str]:
    """The models that wrote the rows: each `sample` step's model (and server, for the OpenAI-compatible backend)."""
    lines = []
    for manifest in chain:
        config = manifest.get("config") or {}
        if manifest.get("uses") == "sample" and config.get("model"):
            server = f" through {config['base_url']}" if config.get("backend") == "openai" and config.get("base_url") \
                else ""
            lines.append(f"`{config['model']}`{server}, sampled by step `{manifest['step']}` (n={config.get('n')}, "
                         f"temperature {config.get('temperature')}, max_tokens {config.get('max_tokens')})")
    return lines


def source_licenses(chain: list[dict]) -> list[tuple[str, str | None]]:
    """(what, licence or None) for each source of the data: each `load` step's file or hub dataset."""
    sources = []
    for manifest in chain:
        if manifest.get("uses") != "load":
            continue
        config, stats = manifest.get("config") or {}, manifest.get("stats") or {}
        declared = config.get("license") or stats.get("license")
        if stats.get("hub"):
            what = f"hub dataset `{stats['hub']}`" + (f" at commit `{stats['commit']}`" if stats.get("commit") else "")
            license = declared or _hub_license(str(stats["hub"]), stats.get("commit"))
        else:
            what, license = f"file `{config.get('path') or stats.get('source')}`", declared
        sources.append((f"{what} (step `{manifest['step']}`)", license if isinstance(license, str) else None))
    return sources


def _hub_license(ref: str, commit: str | None) -> str | None:
    """The `license` a hub dataset's card declares: a local Hub-layout dir's README.md, or the hub cache's copy of
    the commit read (never the network)."""
    try:
        from huggingface_hub import metadata_load, try_to_load_from_cache

        local = Path(ref).expanduser()
        if local.is_dir():
            card = local / CARD
        else:
            cached = try_to_load_from_cache(ref.partition("@")[0], CARD, revision=commit, repo_type="dataset")
            card = Path(cached) if isinstance(cached, str) else None
        license = (metadata_load(card) or {}).get("license") if card is not None and card.is_file() else None
    except Exception:  # noqa: BLE001 - an unreadable card is an unknown licence, not a failed step
        return None
    return license if isinstance(license, str) else None


def lineage_sections(chain: list[dict], workdir: Path, licenses: list[tuple[str, str | None]]) -> str:
    """The sections every card ends with: how it was made (recipe, steps, keys, counts), teacher, source and licence,
    seed and versions."""
    manifest = chain[0]
    lines = [(f"## How it was made\n\nStep `{manifest['step']}` (`{manifest.get('uses')}`, key `{manifest.get('key')}`)"
              f" of the distillery recipe `{recipe_name(workdir, manifest)}` (`{manifest.get('recipe')}`), and the "
              "steps it came from, newest first; counts from each step's manifest:\n")]
    for step in chain:
        what, breakdown, dropped = made_what(step)
        parents = ", ".join(f"`{name}` (key `{key}`)" for name, key in (step.get("parents") or {}).items())
        lines.append(f"- `{step['step']}` (`{step.get('uses')}`, key `{step.get('key')}`)"
                     + (f", from {parents}" if parents else "")
                     + f": {what}"
                     + (f"; {', '.join(breakdown)}" if breakdown else "")
                     + (f"; left out: {', '.join(dropped)}" if dropped else "")
                     + (" (that step has re-run since: its output now has another key)" if step.get("stale") else ""))
    settings = _settings(manifest)
    if settings:
        lines.append(f"\nThis step's settings: {settings}.")
    wrote = teachers(chain)
    lines.append("\n## Teacher\n")
    lines.extend(f"- {line}" for line in wrote)
    if not wrote:
        lines.append("No step of the recipe generated text: the rows come from the source data.")
    lines.append("\n## Source and licence\n")
    lines.extend(f"- {what}: licence {license or 'not stated by the source'}" for what, license in licenses)
    if not licenses:
        lines.append("- no `load` step among the steps above: the source is not known to this card")
    lines.append("\n## Reproducing\n")
    seed = manifest.get("seed")
    lines.append(f"- seed: {seed if seed is not None else 'none (this step draws no random numbers)'}")
    versions = manifest.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    lines.append(f"- `distill run {manifest.get('recipe')}` re-makes it; a step whose key is unchanged is skipped")
    return "\n".join(lines) + "\n"


def _settings(manifest: dict) -> str:
    """The step's own settings that were set (not null, not empty), as `name: value`."""
    config = manifest.get("config") or {}
    return ", ".join(f"{name}: {json.dumps(value)}" for name, value in config.items()
                     if name not in ("uses", "input") and value not in (None, [], {}))


def _dataset_meta(step_dir: Path, license: str | None) -> dict[str, Any]:
    rows = _dataset(step_dir).num_rows
    size = next((name for bound, name in SIZE_CATEGORIES if rows < bound), "n>1B")
    return {**({"license": license} if license else {}), "task_categories": ["text-generation"], "tags": [TAG],
            "size_categories": [size]}


def _dataset_body(step_dir: Path, manifest: dict) -> str:
    dataset = _dataset(step_dir)
    what = made_what(manifest)[0]
    columns = "".join(f"| `{name}` | {type_name(feature)} |\n" for name, feature in dataset.features.items())
    return (f"# {manifest['step']}\n\nA dataset made by the distillery `{manifest.get('uses')}` step "
            f"`{manifest['step']}`: {what}; one split, train.\n\n"
            f"## Columns\n\n| column | type |\n|---|---|\n{columns}")


def _dataset(step_dir: Path):
    import datasets

    return datasets.load_from_disk(str(step_dir / "data"))


def type_name(feature) -> str:
    """A column's type as a card shows it: string, int64, list<string>, struct<role: string, content: string>."""
    if isinstance(feature, dict):
        return "struct<" + ", ".join(f"{name}: {type_name(inner)}" for name, inner in feature.items()) + ">"
    if getattr(feature, "dtype", None) and type(feature).__name__ == "Value":
        return feature.dtype
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"list<{type_name(inner)}>"
    return type(feature).__name__


def _model_meta(step_dir: Path, manifest: dict) -> dict[str, Any]:
    """A model's front matter. No licence: a model's is its base model's, which no manifest records (the body lists
    its data's)."""
    from pipeline.core.models import is_hub_id

    stats, config = manifest.get("stats") or {}, manifest.get("config") or {}
    adapter = (step_dir / "model" / "adapter_config.json").is_file()
    base = stats.get("base_model") or config.get("model")
    meta: dict[str, Any] = {"library_name": "peft" if adapter else "transformers"}
    if isinstance(base, str) and is_hub_id(base):
        meta["base_model"] = base.partition("@")[0]
    meta.update(pipeline_tag="text-generation", tags=[TAG, str(manifest.get("uses"))])
    return meta


def _model_body(step_dir: Path, manifest: dict) -> str:
    """The card text the model step wrote (kept as it was), or a title when it wrote none."""
    path = step_dir / "model" / CARD
    text = path.read_text() if path.is_file() else ""
    if text.startswith("---\n"):  # a full card already: keep its body only
        text = text.split("\n---\n", 1)[1].lstrip("\n") if "\n---\n" in text else text
        text = text.split("\n## How it was made\n", 1)[0]
    return text if text else f"# {manifest['step']}\n\nA model made by the distillery `{manifest.get('uses')}` step.\n"

