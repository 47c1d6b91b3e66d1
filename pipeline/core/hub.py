"""Hugging Face Hub references, one rule for models and datasets: what a hub id is (`HUB_ID`, `split_ref`), whether
the hub cache holds a repo (`in_cache`), fetching a snapshot (`snapshot`), the refusal when it is
not cached and the Hub cannot be asked (`not_cached`), what a step's key records of a hub repo (`identity`) and the
warning for an unpinned one (`unpinned_warning`).

A hub repo resolves to a snapshot directory in the hub cache ($HF_HUB_CACHE, else $HF_HOME/hub) through
`huggingface_hub.snapshot_download`: online it downloads what is missing; offline (HF_HUB_OFFLINE=1) or without
network it uses the cached snapshot of that revision (a commit, or a branch or tag the cache's refs/ records), and
when there is none, or one a killed download left partial, it is refused with a UserError (exit 2) that names the repo and the revision, before anything
runs. `pipeline.core.models` resolves pinned hub models through it; `pipeline.text.hub_datasets` resolves the `load`
step's `hub:` datasets through it.

Nothing heavy is imported at module level: recipe validation reads `HUB_ID` and `split_ref`.
"""

from __future__ import annotations

import os
import re

from pipeline.core.errors import UserError

# Hub ids are "name" or "org/name" (https://huggingface.co/docs/hub/repositories), optionally "@revision".
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9][A-Za-z0-9._/-]*)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}
DEFAULT_BRANCH = "main"


def split_ref(ref: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); a hub id without a revision -> (ref, None)."""
    repo, sep, revision = ref.partition("@")
    return (repo, revision) if sep else (ref, None)


def offline() -> bool:
    """Whether the Hub may not be asked: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, or as huggingface_hub
    read it when it was imported."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return now.upper() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def in_cache(repo: str, repo_type: str = "model", probe_file: str | None = None) -> bool:
    """Whether the hub cache holds `repo` (of `repo_type`: model or dataset) at any revision; `probe_file` (e.g. a
    model's config.json) is looked up first, at main, as the quick answer."""
    from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache

    if probe_file and isinstance(try_to_load_from_cache(repo, probe_file, cache_dir=constants.HF_HUB_CACHE,
                                                        repo_type=repo_type), str):
        return True
    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - no cache dir (CacheNotFound), an unreadable one: nothing we can use
        return False
    return any(info.repo_id == repo and info.repo_type == repo_type for info in cache.repos)


def not_cached(kind: str, repo: str, revision: str | None) -> UserError:
    """The refusal for a hub `kind` (model, dataset) whose revision the cache lacks while the Hub cannot be asked."""
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
    return UserError(
        f"{kind} {repo}: revision {revision or DEFAULT_BRANCH!r} is not in the Hugging Face hub cache "
        f"({constants.HF_HUB_CACHE}) and {why}; fetch it once where there is network (into the same "
        f"HF_HUB_CACHE){', or unset HF_HUB_OFFLINE' if offline() else ''}")


def snapshot(repo: str, revision: str | None, *, repo_type: str = "model",
             allow_patterns: list[str] | None = None) -> str:
    """The local snapshot dir of `repo` at `revision` (None: main): from the cache offline, else through
    `snapshot_download` (which downloads what is missing and falls back to the cache without network). A UserError
    naming the repo and the revision when it cannot be had (`not_cached`; unknown revision, gated, no such repo)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        # Offline too through snapshot_download (local_files_only): where the cache kept the repo's file listing it
        # refuses a snapshot a killed download left partial, which would otherwise load as short data.
        return snapshot_download(repo, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns,
                                 cache_dir=constants.HF_HUB_CACHE, local_files_only=offline())
    except IncompleteSnapshotError as error:
        raise UserError(f"{kind} {repo}: the cached snapshot of revision {revision or DEFAULT_BRANCH!r} is "
                        f"incomplete ({error}); fetch it again where there is network") from None
    except LocalEntryNotFoundError:  # no network, and the cache lacks it
        raise not_cached(kind, repo, revision) from None
    except Exception as error:  # noqa: BLE001 - unknown revision, gated repo, no such repo: say why
        raise UserError(f"{kind} {repo}: cannot fetch revision {revision or DEFAULT_BRANCH!r} "
                        f"({type(error).__name__}: {error})") from None


def identity(repo: str, revision: str | None) -> str:
    """What a step's key records of a hub repo: the pinned revision, or the id alone when unpinned -- then nothing
    can tell when the files behind it change (`distill run` warns: `unpinned_warning`)."""
    return f"hub {repo}@{revision}" if revision else f"hub {repo} (unpinned)"


def unpinned_warning(kind: str, ref: str, pinned: str) -> str:
    """What `distill run` warns about a hub `kind` (model, dataset) `ref` read without a revision; `pinned` shows how
    to pin it."""
    what = "weights" if kind == "model" else "files"
    return (f"{kind} {ref} has no revision: its {what} can change on the hub without any step re-running; "
            f"pin it as {pinned}")
