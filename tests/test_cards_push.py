"""Cards and `distill push`: the dataset card a run writes beside data/ (front matter, lineage with keys, counts,
columns, licence from a Hub-layout source), the model card's text unchanged and wrapped in the same front matter
and lineage, a workdir without cards still up to date, and `distill push`: --dry-run lists the files and writes
nothing, offline / no token / no connection / not a step dir exit 2 naming the repo or the dir. The upload itself
needs the network and is not tested here."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.artifacts import read_manifest
from pipeline.core.cards import card_text

ROOT = Path(__file__).resolve().parents[1]
DISTILL = [sys.executable, "-m", "pipeline.commands.cli"]
HUB_CARD = """---
license: cc-by-4.0
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# a tiny Hub-layout dataset
"""


def distill(*args, env=None, check=False):
    proc = subprocess.run([*DISTILL, *args], check=False, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


def tree(root: Path) -> dict:
    """Every path under root with its size, mtime and content digest."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A real run: graded completions from the bundled example file, filtered; and a Hub-layout source with a
    licence."""
    base = tmp_path_factory.mktemp("cards")
    hub = base / "hub_source"
    (hub / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"id": "h0", "problem": "1+1?", "answer": "2"},
                                         {"id": "h1", "problem": "2+2?", "answer": "4"}]),
                   hub / "data" / "train-00000-of-00001.parquet")
    (hub / "README.md").write_text(HUB_CARD)
    recipe = base / "cards.yaml"
    recipe.write_text(f"""name: cards
seed: 3
workdir: {base / "run"}
steps:
  completions: {{uses: load, path: {ROOT / "data/examples/completions.jsonl"}, require: [id, answer, completion],
                unique_ids: false}}
  graded: {{uses: verify, input: completions}}
  kept: {{uses: filter, input: graded, drop_truncated: true}}
  licensed: {{uses: load, hub: {hub}}}
""")
    distill("run", str(recipe), env={"HF_HUB_OFFLINE": "1"}, check=True)
    return base / "run"


def test_dataset_card_holds_front_matter_lineage_counts_and_columns(workdir):
    card = (workdir / "kept" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["tags"] == ["distillery"] and meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]
    assert "license" not in meta  # a local JSONL says no licence
    kept, graded, completions = (read_manifest(workdir / name) for name in ("kept", "graded", "completions"))
    # lineage: this step, its parent and grandparent, each with its key and the key it was read at
    assert f"- `kept` (`filter`, key `{kept['key']}`), from `graded` (key `{graded['key']}`)" in card
    assert f"- `graded` (`verify`, key `{graded['key']}`), from `completions` (key `{completions['key']}`)" in card
    assert "recipe `cards`" in card
    # counts from the manifests: verify's labels, filter's drops, rows
    stats = graded["stats"]
    assert f"correct {stats['label_correct']}, incorrect {stats['label_incorrect']}" in card
    assert f"rows kept ({kept['stats']['rows']} rows" in card
    assert "left out: truncated" in card
    # columns with types, from the data
    assert "| `label` | string |" in card and "| `correct` | bool |" in card and "| `pass_rate` | float64 |" in card
    assert "file `" + str(ROOT / "data/examples/completions.jsonl") + "` (step `completions`): licence not stated" \
        in card
    assert "No step of the recipe generated text" in card
    assert f"math-verify {kept['versions']['math-verify']}" in card
    assert "seconds" not in card and kept["started_at"] not in card  # the same run twice writes the same card


def test_licence_comes_from_a_hub_layout_source(workdir):
    card = (workdir / "licensed" / "README.md").read_text()
    assert front_matter(card)["license"] == "cc-by-4.0"
    assert "licence cc-by-4.0" in card


def test_cards_change_no_key_and_a_workdir_without_them_stays_complete(workdir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(workdir, old, symlinks=True)
    for card in old.glob("*/README.md"):
        card.unlink()  # a workdir from before cards
    document = json.loads((old / "recipe.json").read_text())
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump({**document["document"], "workdir": str(old)}))
    status = distill("status", str(old), check=True).stdout
    assert status.count("complete") == 4, status
    again = distill("run", str(recipe), env={"HF_HUB_OFFLINE": "1"}, check=True).stdout
    assert "0 step(s) ran, 4 skipped" in again, again
    assert not (old / "kept" / "README.md").exists()
    # push renders the missing card from the manifests, the same one the run wrote
    assert card_text(old / "kept") == (workdir / "kept" / "README.md").read_text()


def test_push_dry_run_lists_parquet_and_card_and_writes_nothing(workdir, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    before = tree(workdir)
    proc = distill("push", str(workdir / "kept"), "--repo", "me/kept-data", "--dry-run",
                   env={"TMPDIR": str(temp), "HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}, check=True)
    assert "dataset repo me/kept-data" in proc.stdout
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["data/train-00000-of-00001.parquet", "README.md"]
    assert "2 files" in proc.stdout and "nothing uploaded" in proc.stdout
    assert tree(workdir) == before
    assert not any(temp.iterdir())  # its parquet temp dir is gone


def test_parquet_shards_hold_the_rows(workdir, tmp_path):
    import datasets

    from pipeline.commands.push import planned_files

    uploads = planned_files(workdir / "kept", read_manifest(workdir / "kept"), tmp_path)
    shard = datasets.Dataset.from_parquet(str(uploads[0].source))
    assert shard.to_list() == datasets.load_from_disk(str(workdir / "kept" / "data")).to_list()
    assert uploads[-1].source == (workdir / "kept" / "README.md").read_bytes()


@pytest.mark.parametrize("env, says", [
    ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"}, "HF_HUB_OFFLINE is set"),
    ({"HF_TOKEN": "", "HF_HOME": "{home}"}, "no Hugging Face token; log in with `hf auth login`"),
    ({"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hub cannot be reached"),
], ids=["offline", "no-token", "no-connection"])
def test_push_that_cannot_upload_exits_2_naming_the_repo(workdir, tmp_path, env, says):
    env = {name: value.format(home=tmp_path / "hf_home") for name, value in env.items()}
    env.setdefault("HF_HUB_OFFLINE", "0")
    proc = distill("push", str(workdir / "kept"), "--repo", "me/kept-data", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "dataset repo me/kept-data" in proc.stderr and says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_push_refuses_what_is_not_a_complete_step_dir(workdir, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(workdir / "kept", incomplete)
    manifest = read_manifest(incomplete)
    (incomplete / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    for path, says in [(workdir, "it is a workdir"), (workdir / "run-report", "no manifest.json"),
                       (tmp_path / "missing", "no such step dir"), (incomplete, "its output is incomplete")]:
        proc = distill("push", str(path), "--repo", "me/x", "--dry-run")
        assert proc.returncode == 2 and str(path) in proc.stderr and says in proc.stderr, (path, proc.stderr)


def test_model_card_text_is_unchanged(tmp_path):
    """build.model_card now renders through pipeline.core.cards; its text is what it was."""
    from pipeline.steps import sft
    from pipeline.training.build import model_card, schedule_line

    cfg = sft.Config(uses="sft", input="sft_data", model="builtin:smollm2-135m-instruct", lora={"r": 16, "alpha": 32})
    facts = [f"base model: `{cfg.model}`", "training data: step `sft_data`"]
    lines = "".join(f"- {fact}\n" for fact in facts)  # the text as the code before cards wrote it
    before = f"# sft\n\nLoRA adapter (r=16) trained by the distillery `sft` step `sft`.\n\n{lines}" + schedule_line(cfg)
    assert model_card(cfg, "sft", facts=facts) == before
    assert model_card(cfg, "sft", facts=facts, kind="Model", trained="made by", batch_unit=" pairs") == (
        f"# sft\n\nModel made by the distillery `sft` step `sft`.\n\n{lines}" + schedule_line(cfg, " pairs"))


def test_model_card_keeps_its_text_between_front_matter_and_lineage(workdir, tmp_path):
    """A model step's card: its own text kept, the front matter (library, base model, tags) and the lineage every
    card shares; `distill push --dry-run` lists the model files and the card, in a model repo."""
    from pipeline.core.cards import write_card

    work = tmp_path / "run"
    shutil.copytree(workdir, work, symlinks=True)
    kept = read_manifest(work / "kept")
    step = work / "sft"
    (step / "model").mkdir(parents=True)
    (step / "model" / "config.json").write_text("{}")
    body = "# sft\n\nFully fine-tuned model trained by the distillery `sft` step `sft`.\n\n- training data: step `kept`\n"
    (step / "model" / "README.md").write_text(body)
    manifest = {"step": "sft", "uses": "sft", "produces": "model", "status": "complete", "key": "0123456789abcdef",
                "parents": {"kept": kept["key"]}, "config": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                "seed": 3, "recipe": kept["recipe"], "stats": {"rows": 4, "dropped_truncated": 0},
                "versions": kept["versions"]}
    write_card(step, manifest)  # as the runner does, before the manifest
    (step / "manifest.json").write_text(json.dumps(manifest))
    card = (step / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["tags"] == ["distillery", "sft"] and "license" not in meta
    assert "\n" + body + "\n## How it was made" in card
    assert f"from `kept` (key `{kept['key']}`)" in card and "rows trained on (4 rows)" in card
    assert card_text(step) == card  # a full card is taken as written, not wrapped twice
    proc = distill("push", str(step), "--repo", "me/sft-model", "--dry-run", check=True)
    assert "model repo me/sft-model" in proc.stdout
    assert [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")] == ["config.json",
                                                                                              "README.md"]
