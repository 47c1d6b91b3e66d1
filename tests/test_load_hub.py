"""The load step from the Hub and from published traces, without network: a dataset repository built in a temp dir
(README with YAML configs + parquet shards, as the Hub stores it), the same through a pre-filled hub cache with
HF_HUB_OFFLINE=1, a dataset not cached (exit 2 naming it and the revision), streaming with a limit; `explode` on the
OpenR1-Math-Raw-shaped fixture (data/fixtures/openr1-math-raw) and into verify; `conversation` rows; `ids: row`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.core.artifacts import Output
from pipeline.core.errors import UserError
from pipeline.core.fingerprints import Fingerprints
from pipeline.core.keys import keyed_config, step_inputs
from pipeline.steps import load as load_step

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "fixtures" / "openr1-math-raw"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CARD = """---
configs:
- config_name: easy
  default: true
  data_files:
  - split: train
    path: data/easy/train-*
  - split: test
    path: data/easy/test-*
- config_name: hard
  data_files:
  - split: train
    path: data/hard/train-*
---
# a test dataset
"""
EXPLODE = {"completion": "generations", "published_correct": "correctness.math_verify_reparsed_answer"}


def shard(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def problem(qid: str, answer: str) -> dict:
    return {"qid": qid, "question": f"What is {answer}?", "answer": answer}


@pytest.fixture
def repo(tmp_path):
    """A dataset repository as the Hub stores it: two configs, `easy` in two train shards and a test split."""
    root = tmp_path / "repo"
    shard(root / "data/easy/train-00000-of-00002.parquet", [problem("e0", "1"), problem("e1", "2")])
    shard(root / "data/easy/train-00001-of-00002.parquet", [problem("e2", "3")])
    shard(root / "data/easy/test-00000-of-00001.parquet", [problem("t0", "9")])
    shard(root / "data/hard/train-00000-of-00001.parquet", [problem("h0", "42")])
    (root / "README.md").write_text(CARD)
    return root


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A private hub cache and datasets cache (nothing of the user's is read or written)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path / "hub"


def run_load(tmp_path, name="problems", **settings):
    cfg = load_step.Config(uses="load", **settings)
    cfg.check_inputs()
    out = Output(name=name, kind="dataset", dir=tmp_path / name, scratch=tmp_path / f".{name}.scratch", seed=None)
    return load_step.run(cfg, {}, out)


RENAME = {"qid": "id", "question": "problem"}


def test_a_local_dataset_repo_by_config_and_split(tmp_path, repo, hf_home):
    default = run_load(tmp_path, "a", hub=str(repo), columns=RENAME).dataset()
    assert default["id"] == ["e0", "e1", "e2"] and default["answer"] == ["1", "2", "3"]
    assert run_load(tmp_path, "b", hub=str(repo), columns=RENAME, split="test").dataset()["id"] == ["t0"]
    assert run_load(tmp_path, "c", hub=str(repo), columns=RENAME, config="hard").dataset()["answer"] == ["42"]
    files = run_load(tmp_path, "d", hub=str(repo), columns=RENAME, data_files="data/hard/*.parquet").dataset()
    assert files["id"] == ["h0"]
    with pytest.raises(UserError, match=r"split 'validation'"):
        run_load(tmp_path, "e", hub=str(repo), columns=RENAME, split="validation")


def test_a_local_repo_is_keyed_by_content_and_a_hub_id_by_revision(tmp_path, repo):
    def key_record(**settings):
        cfg = load_step.Config(uses="load", **settings)
        return step_inputs(cfg, 0, {}, Fingerprints(), {})

    before = key_record(hub=str(repo), columns=RENAME)
    assert list(before["files"]) == [str(repo)]
    shard(repo / "data/hard/train-00000-of-00001.parquet", [problem("h0", "43")])
    assert key_record(hub=str(repo), columns=RENAME)["files"] != before["files"]
    pinned = key_record(hub="org/name@v1")
    assert pinned["files"] == {} and pinned["config"]["revision"] == "v1" and pinned["config"]["hub"] == "org/name"
    assert key_record(hub="org/name", revision="v1") == pinned  # one spelling, one key
    assert key_record(hub="org/name@v2")["config"] != pinned["config"]
    assert load_step.Config(uses="load", hub="org/name").run_warnings() == [(
        "dataset org/name has no revision: its files can change on the hub without any step re-running; pin it as "
        "org/name@<commit> (or `revision: <commit>`)")]
    assert load_step.Config(uses="load", hub="org/name@v1").run_warnings() == []


def test_new_settings_at_their_defaults_leave_a_path_recipes_key_as_it_was(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "problem": "1+1", "answer": "2"}\n')
    assert set(keyed_config(load_step.Config(uses="load", path=str(path)))) == {
        "uses", "input", "seed", "path", "columns", "limit", "require", "unique_ids"}


def prefill_hub_cache(hub_cache: Path, repo: Path, name: str = "org/toy") -> None:
    """The layout huggingface_hub reads offline: datasets--org--name/{refs/main, snapshots/COMMIT/...}."""
    storage = hub_cache / f"datasets--{name.replace('/', '--')}"
    shutil.copytree(repo, storage / "snapshots" / COMMIT)
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)


def test_offline_through_a_prefilled_hub_cache(tmp_path, repo, hf_home, monkeypatch):
    prefill_hub_cache(hf_home, repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_branch = run_load(tmp_path, "a", hub="org/toy@main", columns=RENAME, config="hard")
    assert by_branch.dataset()["id"] == ["h0"]
    assert by_branch.stats["commit"] == COMMIT and by_branch.stats["source"] == f"org/toy@main (commit {COMMIT})"
    by_commit = run_load(tmp_path, "b", hub="org/toy", revision=COMMIT, columns=RENAME, streaming=True, limit=2)
    assert by_commit.dataset()["id"] == ["e0", "e1"]
    with pytest.raises(UserError, match=r"dataset org/toy: revision 'v2' is not in the Hugging Face hub cache .*"
                                        r"HF_HUB_OFFLINE is set"):
        run_load(tmp_path, "c", hub="org/toy@v2", columns=RENAME)


def test_a_snapshot_a_killed_download_left_partial_is_refused_offline(tmp_path, repo, hf_home, monkeypatch):
    # what huggingface_hub keeps of a download: the snapshot's files and the repo's file listing; one shard is missing
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    prefill_hub_cache(hf_home, repo)
    storage = hf_home / "datasets--org--toy"
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    write_tree_cache(str(storage), COMMIT, {f: TreeCacheEntry(size=1, blob_id="0" * 40) for f in files})
    shard = next(f for f in files if f.endswith(".parquet"))
    (storage / "snapshots" / COMMIT / shard).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"dataset org/toy: the cached snapshot of revision 'main' is incomplete"):
        run_load(tmp_path, "a", hub="org/toy@main", columns=RENAME)


def test_a_dataset_not_cached_offline_exits_2_naming_it_and_its_revision_before_anything_runs(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "problem": "1+1", "answer": "2"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: offline\nworkdir: {tmp_path / 'run'}\nsteps:\n"
                      f"  first: {{uses: load, path: {tmp_path / 'p.jsonl'}}}\n"
                      "  raw: {uses: load, hub: open-r1/OpenR1-Math-Raw@abc123, ids: row}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub"),
           "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "pipeline.commands.cli", "run", str(recipe)], env=env,
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    message = " ".join((done.stdout + done.stderr).split())
    assert "dataset open-r1/OpenR1-Math-Raw: revision 'abc123' is not in the Hugging Face hub cache" in message
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "first").exists()  # refused before the first step ran


def test_streaming_with_a_limit_reads_the_first_rows_as_a_full_load_does(tmp_path, hf_home):
    settings = {"hub": str(FIXTURE), "ids": "row", "drop_columns": ["messages"]}
    streamed = run_load(tmp_path, "a", streaming=True, limit=7, **settings).dataset()
    full = run_load(tmp_path, "b", limit=7, **settings).dataset()
    assert len(streamed) == 7 and streamed["id"] == [str(i) for i in range(7)]
    assert streamed.to_list() == full.to_list()
    source = pq.read_table(FIXTURE / "data" / "train-00000-of-00001.parquet").slice(0, 7).to_pylist()
    assert streamed["problem"] == [row["problem"] for row in source]


def test_explode_the_openr1_fixture_into_one_row_per_trace(tmp_path, hf_home):
    source = pq.read_table(FIXTURE / "data" / "train-00000-of-00001.parquet").slice(0, 20).to_pylist()
    artifact = run_load(tmp_path, hub=str(FIXTURE), ids="row", limit=20, explode=EXPLODE,
                        drop_columns=["messages", "reparsed_answers"])
    ds = artifact.dataset()
    expected = [(str(i), k, text, flag) for i, row in enumerate(source)
                for k, (text, flag) in enumerate(zip(row["generations"],
                                                     row["correctness"]["math_verify_reparsed_answer"]))]
    assert list(zip(ds["id"], ds["sample_idx"], ds["completion"], ds["published_correct"])) == expected
    assert artifact.stats["problems"] == 20 and artifact.stats["traces"] == len(expected) > 20
    assert "generations" not in ds.column_names and "correctness" not in ds.column_names
    assert ds.features["published_correct"].dtype == "bool"
    first = ds[0]
    assert first["answer"] == source[0]["answer"] and first["source"] == source[0]["source"]
    assert first["prompt"] == [{"role": "user", "content": source[0]["problem"] + "\n\nPlease reason step by "
                                "step, and put your final answer within \\boxed{}."}]
    assert first["completion"].startswith("<think>")


def test_explode_refuses_unequal_lists_naming_the_row_id_and_the_columns(tmp_path, hf_home):
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "p1", "problem": "1+1", "answer": "2", "gens": ["a", "b"], "ok": [True, False]},
        {"id": "p2", "problem": "2+2", "answer": "4", "gens": ["a", "b"], "ok": [True]}]))
    with pytest.raises(UserError, match=r"row 1 \(id 'p2'\): explode's lists differ in length \(gens has 2, ok has 1"):
        run_load(tmp_path, path=str(path), explode={"completion": "gens", "published_correct": "ok"})
    with pytest.raises(UserError, match=r"column 'nope'.*not in the data"):
        run_load(tmp_path, "b", path=str(path), explode={"completion": "nope"})
    with pytest.raises(UserError, match=r"'problem' is not a list column"):
        run_load(tmp_path, "c", path=str(path), explode={"completion": "problem"})
    with pytest.raises(UserError, match=r"published_correct comes from 'gens'.*not booleans"):
        run_load(tmp_path, "d", path=str(path), explode={"completion": "gens", "published_correct": "gens"})


def test_conversations_become_prompt_and_completion_with_the_think_span_kept(tmp_path):
    thought = "<|begin_of_thought|>\nadd them\n<|end_of_thought|>\n\n<|begin_of_solution|>\\boxed{4}<|end_of_solution|>"
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"answer": "4", "conversations": [{"from": "system", "value": "Think first."},
                                          {"from": "user", "value": "2+2?"}, {"from": "assistant", "value": thought}]},
        {"answer": "6", "conversations": [{"role": "user", "content": "3+3?"},
                                          {"role": "assistant", "content": "<think>\nok\n</think>\n\\boxed{6}"}]}]))
    ds = run_load(tmp_path, path=str(path), ids="row", conversation="conversations").dataset()
    assert ds["id"] == ["0", "1"] and ds["sample_idx"] == [0, 0] and ds["problem"] == ["2+2?", "3+3?"]
    assert ds["prompt"][0] == [{"role": "system", "content": "Think first."}, {"role": "user", "content": "2+2?"}]
    assert ds["completion"] == [thought, "<think>\nok\n</think>\n\\boxed{6}"]
    assert "conversations" not in ds.column_names
    path.write_text(json.dumps({"answer": "1", "conversations": [{"from": "user", "value": "hi"}]}) + "\n")
    with pytest.raises(UserError, match=r"row 0 \(id '0'\), 'conversations': needs a user turn and an assistant"):
        run_load(tmp_path, "b", path=str(path), ids="row", conversation="conversations")


def test_ids_row_is_refused_beside_an_id_column_and_settings_are_checked():
    with pytest.raises(ValidationError, match="one of them"):
        load_step.Config(uses="load")
    with pytest.raises(ValidationError, match="one of them"):
        load_step.Config(uses="load", path=str(FIXTURE / "README.md"), hub=str(FIXTURE))
    with pytest.raises(ValidationError, match="settings of `hub`"):
        load_step.Config(uses="load", path=str(FIXTURE / "README.md"), revision="main")
    with pytest.raises(ValidationError, match="needs a `completion` target"):
        load_step.Config(uses="load", hub=str(FIXTURE), explode={"published_correct": "x"})
    with pytest.raises(ValidationError, match="neither a local directory nor a hub id"):
        load_step.Config(uses="load", hub="no/such/dir")
    with pytest.raises(ValidationError, match="pins revision 'a'"):
        load_step.Config(uses="load", hub="org/name@a", revision="b")


def test_load_explode_output_goes_straight_into_verify(tmp_path, hf_home):
    from pipeline.steps import verify

    loaded = run_load(tmp_path, hub=str(FIXTURE), ids="row", limit=12, explode=EXPLODE,
                      drop_columns=["messages", "reparsed_answers"])
    out = Output(name="graded", kind="dataset", dir=tmp_path / "graded", scratch=tmp_path / ".graded", seed=None)
    graded = verify.run(verify.Config(uses="verify", input="problems", workers=1), {"problems": loaded}, out).dataset()
    assert len(graded) == len(loaded.dataset())
    agree = sum(ours == theirs for ours, theirs in zip(graded["correct"], graded["published_correct"]))
    # the fixture's published flags are the truth except about one trace in twelve (planted)
    assert agree >= 0.75 * len(graded) and any(graded["correct"]) and not all(graded["correct"])


def test_a_problem_in_several_rows_numbers_its_traces_on_without_unique_ids(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "p", "problem": "1+1", "answer": "2", "gens": ["a", "b"]},
        {"id": "q", "problem": "2+2", "answer": "4", "gens": ["c"]},
        {"id": "p", "problem": "1+1", "answer": "2", "gens": ["d"]}]))
    with pytest.raises(UserError, match="duplicate id 'p'"):
        run_load(tmp_path, path=str(path), explode={"completion": "gens"})
    ds = run_load(tmp_path, "b", path=str(path), explode={"completion": "gens"}, unique_ids=False).dataset()
    assert list(zip(ds["id"], ds["sample_idx"], ds["completion"])) == [("p", 0, "a"), ("p", 1, "b"), ("q", 0, "c"),
                                                                       ("p", 2, "d")]


def test_a_hub_explode_source_missing_is_refused_before_any_row_is_read(tmp_path, hf_home):
    cfg = load_step.Config(uses="load", hub=str(FIXTURE), ids="row", explode={"completion": "generations",
                                                                               "published_correct": "correctness.x"})
    with pytest.raises(UserError, match=r"column 'correctness' has no field 'x' \(its fields: llama_verification"):
        cfg.check_inputs()


def test_a_pinned_hub_model_resolves_offline_by_the_same_rule(tmp_path, hf_home, monkeypatch):
    from pipeline.core.models import model_identity, resolve_model

    snapshot_dir = hf_home / "models--org--tiny" / "snapshots" / COMMIT
    snapshot_dir.mkdir(parents=True)
    (snapshot_dir / "config.json").write_text("{}")
    (hf_home / "models--org--tiny" / "refs").mkdir()
    (hf_home / "models--org--tiny" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("org/tiny@main") == str(snapshot_dir)
    assert model_identity("org/tiny@main", None) == "hub org/tiny@main"
    with pytest.raises(UserError, match=r"model org/tiny: revision 'v9' is not in the Hugging Face hub cache"):
        resolve_model("org/tiny@v9")


def test_online_only_the_card_and_the_chosen_configs_split_files_are_fetched(repo):
    from pipeline.text.hub_datasets import config_patterns

    readme = repo / "README.md"
    assert config_patterns(readme, None, "train") == ["data/easy/train-*"]  # the default config
    assert config_patterns(readme, "easy", "test") == ["data/easy/test-*"]
    assert config_patterns(readme, "hard", "train") == ["data/hard/train-*"]
    assert config_patterns(readme, "nope", "train") is None  # unknown: fetch all, datasets names the configs
    assert config_patterns(FIXTURE / "README.md", None, "train") == ["data/train-*"]
