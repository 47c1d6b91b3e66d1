"""`distill push STEP_DIR --repo org/name [--private] [--dry-run] [--revision BRANCH]`: a finished step, out to the
Hugging Face Hub with its card.

    a dataset step   a dataset repo: its rows as parquet shards (data/train-NNNNN-of-NNNNN.parquet, the layout the
                     Hub's viewer and `datasets.load_dataset("org/name")` read) and README.md, the step's card
    a model step     a model repo: the files of its model/ dir, README.md being the card

The manifest says which (`produces`); a report step, a run-report dir, a workdir or any dir without a complete
manifest is refused (exit 2, naming it). The card is the one the run wrote beside the data (pipeline.core.cards), or,
for a step from before cards, rendered now from the manifests. `--dry-run` lists what would go (repo id and type,
each file and its size) and asks nothing of the Hub, so it works offline and without a token. Otherwise, before any
work: offline (HF_HUB_OFFLINE) is refused naming the repo, and so is a missing token (how to log in). A connection
error or a refusal from the Hub ends in exit 2 naming the repo too. The upload is one commit (`create_repo`, then
`create_commit`): a re-push replaces the files, and parquet shards the new data no longer has are deleted with it.

Writes nothing into the workdir (pipeline.core.outputs): the parquet shards go into a temp dir this command makes
and removes (in $TMPDIR). The upload itself is not tested here (no network); the dry run, the refusals and the card
are (tests/test_cards_push.py).
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from pipeline.core.artifacts import MANIFEST, output_state, read_manifest
from pipeline.core.cards import CARD, card_text
from pipeline.core.errors import UserError
from pipeline.core.hub import offline
from pipeline.core.outputs import RUN_FILE

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # org/name, or name
SHARD_BYTES = 500 * 1024 * 1024  # per parquet shard of Arrow data, as `datasets.push_to_hub` cuts them
DATA_DIR = "data"
LOGIN = "log in with `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"


@dataclass
class Upload:
    """One file of the push: where it goes in the repo, and where its bytes come from."""

    path_in_repo: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


def add_arguments(parser) -> None:
    parser.add_argument("step_dir", help="a finished dataset or model step dir, e.g. runs/quickstart/sft_data")
    parser.add_argument("--repo", required=True, help="the Hub repo to push to: org/name (made if missing)")
    parser.add_argument("--private", action="store_true", help="make the repo private when this push creates it")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would go (files, sizes, repo type and id); upload nothing, ask nothing of the "
                             "Hub")
    parser.add_argument("--revision", help="the branch to push to (made from main if missing; default: main)")
    parser.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    push(Path(args.step_dir), args.repo, private=args.private, dry_run=args.dry_run, revision=args.revision,
         console=Console())
    return 0


def push(step_dir: Path, repo: str, *, private: bool = False, dry_run: bool = False, revision: str | None = None,
         console: Console | None = None) -> list[Upload]:
    """Push the step (or list what would go, `dry_run`); returns the files, in repo order."""
    console = console or Console()
    manifest = check_step_dir(step_dir)
    if not REPO_ID.fullmatch(repo):
        raise UserError(f"--repo {repo!r}: not a Hub repo id (org/name: letters, digits, '.', '_', '-')")
    repo_type = manifest["produces"]
    token = None if dry_run else check_can_upload(repo, repo_type)
    staging = Path(tempfile.mkdtemp(prefix="distill-push-"))
    try:
        uploads = planned_files(step_dir, manifest, staging)
        what = f"{repo_type} repo {repo}" + (f" (branch {revision})" if revision else "") + \
            (", private" if private else "")
        if dry_run:
            console.print(f"dry run: would push step {manifest['step']!r} ({manifest['uses']}, key "
                          f"{manifest['key']}) to {what}:", soft_wrap=True)
            for upload in uploads:
                console.print(f"  {upload.path_in_repo}  {_size(upload.size)}", soft_wrap=True)
            console.print(f"{len(uploads)} files, {_size(sum(u.size for u in uploads))}; nothing uploaded")
            return uploads
        url = upload_files(uploads, repo, repo_type, token=token, private=private, revision=revision,
                           message=f"distill push: step {manifest['step']} ({manifest['uses']}, key {manifest['key']})")
        console.print(f"pushed step {manifest['step']!r}: {len(uploads)} files, "
                      f"{_size(sum(u.size for u in uploads))} to {what}: {url}", soft_wrap=True)
        return uploads
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_step_dir(step_dir: Path) -> dict:
    """The manifest of a complete dataset or model step dir; anything else is refused naming it."""
    if not step_dir.is_dir():
        raise UserError(f"{step_dir}: no such step dir")
    if not (step_dir / MANIFEST).is_file():
        hint = (": it is a workdir; name one of its steps, e.g. " + str(step_dir / "<step>")
                if (step_dir / RUN_FILE).is_file() else ", so it is not a step's output (a step dir holds one)")
        raise UserError(f"{step_dir}: not a complete step dir (no {MANIFEST}{hint})")
    key, why_not = output_state(step_dir)
    if key is None:
        raise UserError(f"{step_dir}: not a complete step dir ({why_not})")
    manifest = read_manifest(step_dir)
    if manifest.get("produces") not in ("dataset", "model"):
        raise UserError(f"{step_dir}: step {manifest['step']!r} made a {manifest.get('produces')}; only dataset and "
                        "model steps push")
    return manifest


def check_can_upload(repo: str, repo_type: str) -> str:
    """The token to upload with; refused (naming the repo) while offline or without a token."""
    if offline():
        raise UserError(f"cannot push to {repo_type} repo {repo}: HF_HUB_OFFLINE is set; unset it on a machine with "
                        "network (or use --dry-run to see what would go)")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(f"cannot push to {repo_type} repo {repo}: no Hugging Face token; {LOGIN}")
    return token


def planned_files(step_dir: Path, manifest: dict, staging: Path) -> list[Upload]:
    """What the push uploads: a dataset's parquet shards (written into `staging`) or a model dir's files, then the
    card as README.md."""
    card = Upload(CARD, card_text(step_dir).encode())
    if manifest["produces"] == "model":
        model_dir = step_dir / "model"
        files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.relative_to(model_dir).as_posix() != CARD)
        return [*(Upload(p.relative_to(model_dir).as_posix(), p) for p in files), card]
    return [*parquet_shards(step_dir / "data", staging), card]


def parquet_shards(data_dir: Path, staging: Path) -> list[Upload]:
    """The dataset's rows as parquet shards of at most SHARD_BYTES of Arrow data each, named as the Hub's data-files
    rules read them as the train split."""
    import datasets

    datasets.disable_progress_bars()  # the command prints its own lines
    dataset = datasets.load_from_disk(str(data_dir))
    count = max(1, math.ceil(dataset.data.nbytes / SHARD_BYTES))
    (staging / DATA_DIR).mkdir()
    uploads = []
    for index in range(count):
        name = f"{DATA_DIR}/train-{index:05d}-of-{count:05d}.parquet"
        dataset.shard(count, index, contiguous=True).to_parquet(str(staging / name))
        uploads.append(Upload(name, staging / name))
    return uploads


def upload_files(uploads: list[Upload], repo: str, repo_type: str, *, token: str, private: bool,
                 revision: str | None, message: str) -> str:
    """Create the repo (and branch) if missing and commit the files in one commit, deleting data/ shards the push
    no longer has; the commit's URL. A connection error or the Hub's refusal is a UserError naming the repo."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, repo_type=repo_type, exist_ok=True)
        new = {upload.path_in_repo for upload in uploads}
        stale = [path for path in api.list_repo_files(repo, repo_type=repo_type, revision=revision)
                 if path.startswith(f"{DATA_DIR}/") and path not in new] if repo_type == "dataset" else []
        operations = [*(CommitOperationAdd(u.path_in_repo, u.source if isinstance(u.source, bytes) else str(u.source))
                        for u in uploads), *(CommitOperationDelete(path) for path in stale)]
        commit = api.create_commit(repo, operations, commit_message=message, repo_type=repo_type, revision=revision)
    except OfflineModeIsEnabled:
        raise UserError(f"cannot push to {repo_type} repo {repo}: HF_HUB_OFFLINE is set") from None
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        why = f"the Hub refused it ({error})" + (f"; {LOGIN} with a token that may write there"
                                                 if status in (401, 403) else "")
        raise UserError(f"cannot push to {repo_type} repo {repo}: {why}") from None
    except Exception as error:  # only a connection problem is turned into exit 2; anything else is raised
        if not _is_connection_error(error):
            raise
        raise UserError(f"cannot push to {repo_type} repo {repo}: the Hub cannot be reached ({error})") from None
    return getattr(commit, "commit_url", None) or str(commit)


def _is_connection_error(error: BaseException) -> bool:
    """No network, DNS, a refused or reset connection, a timeout: an OSError, or the HTTP client's transport error
    (huggingface_hub's client is httpx, or a vendored copy under another module name, so it goes by class name)."""
    return isinstance(error, OSError) or any(
        cls.__name__ in ("TransportError", "TimeoutException", "ConnectionError") for cls in type(error).__mro__)


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}"
