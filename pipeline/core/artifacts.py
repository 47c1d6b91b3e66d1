"""What a step leaves on disk, and how it gets there without ever looking complete too early.

    <workdir>/<step>/manifest.json   step type, key, resolved config, rows, timings, versions, status
    <workdir>/<step>/data/           a datasets.Dataset (save_to_disk)      -- dataset steps
    <workdir>/<step>/model/          a Hugging Face model dir               -- model steps
    <workdir>/<step>/*               anything else (results.json, report.md) -- report steps

A step writes into a temporary dir (`Output.dir`); the runner writes the manifest last and renames the
directory into place, so a killed step leaves no directory that says complete. Work a step wants
to keep across a crash (sample shards, Trainer checkpoints) goes in its scratch dir (`Output.scratch`),
which survives until the step completes. Where those dirs are, how the rename is done and what a kill
during it leaves: `pipeline.core.workdir`.

Whether a step's output is complete is one question with one answer (`output_state`), asked by
`distill run` and `distill status` alike: a manifest that reads, names the step and says complete,
and the output it lists (`outputs`: each file of data/ or model/ with its size, recorded at
`pipeline.core.workdir.publish`) still there.

Also here: this process's temporary dir for files such as parsed tables (`temp_dir`).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"
COMPLETE = "complete"
OUTPUTS = "outputs"  # in the manifest: {path under the step dir: size in bytes} of the files later steps read
NO_OUTPUT = "no output yet"
UNREADABLE = "manifest unreadable"  # how `output_state` says a manifest does not read
FOREIGN = ": not this step's output, `distill run` will not replace it"  # and how it says a path is not ours


@dataclass
class Artifact:
    """A finished step's output, as later steps see it."""

    name: str
    kind: str  # dataset | model | report
    path: Path  # the step directory
    key: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def dataset(self):
        import datasets

        if self.kind != "dataset":
            raise TypeError(f"step {self.name!r} produced a {self.kind}, not a dataset")
        return datasets.load_from_disk(str(self.data_dir))

    @classmethod
    def from_dir(cls, path: Path) -> "Artifact":
        manifest = read_manifest(path)
        return cls(name=manifest["step"], kind=manifest["produces"], path=path, key=manifest["key"],
                   stats=manifest.get("stats", {}))


@dataclass
class Output:
    """Handed to a step's `run`: where to write, and the run's settings."""

    name: str
    kind: str
    dir: Path  # temporary step dir, renamed into place by the runner on success
    scratch: Path  # survives a crash; cleared once the step completes or its key changes
    seed: int | None  # None for a step that draws no random numbers
    dry_run: bool = False

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def write_dataset(self, dataset, **stats) -> Artifact:
        """Save a datasets.Dataset as this step's output; `stats` go into the manifest."""
        # datasets 5.2 writes no data file for 0 rows unless asked for one shard, and then cannot load it.
        dataset.save_to_disk(str(self.data_dir), num_shards=1 if len(dataset) == 0 else None)
        stats.setdefault("rows", len(dataset))
        return Artifact(self.name, "dataset", self.dir, stats=stats)

    def model_written(self, **stats) -> Artifact:
        """Call after saving a model (or a peft adapter) into `model_dir`; `stats` go into the manifest."""
        if not any((self.model_dir / f).exists() for f in ("config.json", "adapter_config.json")):
            raise RuntimeError(f"step {self.name!r} did not write a model or adapter into {self.model_dir}")
        return Artifact(self.name, "model", self.dir, stats=stats)

    def report_written(self, **stats) -> Artifact:
        return Artifact(self.name, "report", self.dir, stats=stats)


def read_manifest(step_dir: Path) -> dict[str, Any]:
    with open(step_dir / MANIFEST) as f:
        return json.load(f)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Make `path` appear whole or not at all: `write(tmp)` writes a temp file beside it (same directory, so the
    rename never crosses filesystems), which is synced and renamed over `path`. The temp name is this write's own,
    so two processes writing one path never write into each other's temp file; a failed write removes it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)

    write_atomic(path, write)


def output_files(step_dir: Path, kind: str | None) -> dict[str, int]:
    """What `output_state` checks of a step's output: each file under data/ (a dataset step) or model/ (a model
    step), by path relative to the step dir, with its size. A report step's files are not listed: `distill eval
    --rescore` rewrites them in place, and nothing reads them as a step's input."""
    sub = {"dataset": "data", "model": "model"}.get(kind or "")
    if sub is None or not (step_dir / sub).is_dir():
        return {}
    files = {}
    for root, dirs, names in os.walk(step_dir / sub):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            files[path.relative_to(step_dir).as_posix()] = path.stat().st_size
    return files


def output_state(step_dir: Path, name: str | None = None) -> tuple[str | None, str]:
    """(key, "") for a complete step output; (None, why it is not complete) otherwise -- the one answer both
    `distill run` (skip or run) and `distill status` give. `name`: the step the dir must be the output of.

    Complete: manifest.json reads as a Distillery manifest of that step that says complete, and every file its
    `outputs` lists is there with its size (a manifest from before that list: its data/ or model/ dir is there).
    A reason starting with UNREADABLE is a manifest that does not read (`distill run` re-runs the step over it);
    one ending with FOREIGN is a path that is not this step's output (`distill run` refuses to replace it).
    """
    if not step_dir.exists() and not step_dir.is_symlink():
        return None, NO_OUTPUT
    path = step_dir / MANIFEST
    if step_dir.is_symlink() or not step_dir.is_dir():
        return None, f"{step_dir} is not a directory{FOREIGN}"
    try:
        manifest = read_manifest(step_dir)
    except FileNotFoundError:
        return None, f"{step_dir} holds no {MANIFEST}{FOREIGN}"
    except (OSError, ValueError) as error:
        return None, f"{UNREADABLE} ({path}: {_reason(error)})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), str):
        return None, f"{path} is not a Distillery step manifest{FOREIGN}"
    if name is not None and manifest["step"] != name:
        return None, f"{path} is step {manifest['step']!r}'s, not {name!r}'s{FOREIGN}"
    if manifest.get("status") != COMPLETE:
        return None, "its output is incomplete"
    key = manifest.get("key")
    if not isinstance(key, str) or not key:
        return None, f"{UNREADABLE} ({path}: it records no key)"
    listed = manifest.get(OUTPUTS)
    if isinstance(listed, dict):
        for relative, size in listed.items():
            try:
                actual = (step_dir / relative).stat().st_size if (step_dir / relative).is_file() else None
            except (OSError, ValueError):
                actual = None
            if actual is None:
                return None, f"output missing ({relative})"
            if isinstance(size, int) and actual != size:
                return None, f"output damaged ({relative}: {actual} bytes, {size} when written)"
    else:  # written before manifests listed their outputs
        sub = {"dataset": "data", "model": "model"}.get(manifest.get("produces"))
        if sub is not None and not (step_dir / sub).is_dir():
            return None, f"output missing ({sub}/)"
    return key, ""


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if isinstance(error, UnicodeDecodeError):
        return "not UTF-8 text"
    return f"not valid JSON: {error}"


def complete_key(step_dir: Path) -> str | None:
    """The key of a complete step dir, or None if absent, broken or incomplete (`output_state`)."""
    return output_state(step_dir)[0]


# --- temporary files of the parsed input ---------------------------------------------------------------------
# The Arrow file a parsed data file becomes (pipeline.text.arrow_tables) lives in a temporary dir of this process's own:
# `$TMPDIR/distill-tmp-*`, removed when the process exits. A killed process cannot remove it, so each such dir
# holds a lock (flock) this process keeps while it lives: a dir whose lock can be taken is a dead process's, and
# the next `distill run` or `distill status` removes it (`clean_stale_temp_dirs`).

TEMP_PREFIX = "distill-tmp-"
_LOCK_NAME = ".owner.lock"
_temp: tuple[str, int, int] | None = None  # (dir, fd of its held lock, pid) of this process


def temp_dir() -> str:
    """This process's temporary dir (made on first use, removed at exit), for files such as parsed tables."""
    global _temp
    if _temp is None or _temp[2] != os.getpid() or not os.path.isdir(_temp[0]):
        clean_stale_temp_dirs()
        path = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        fd = os.open(os.path.join(path, _LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _temp = (path, fd, os.getpid())
        import atexit

        atexit.register(_remove_temp_dir, path, os.getpid())
    return _temp[0]


def _remove_temp_dir(path: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the registration
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_temp_dirs(older_than_s: float = 3600) -> None:
    """Remove the temporary dirs (`temp_dir`) of processes that are gone: their lock is free. A dir without a
    lock file (its process was killed between making the dir and locking it) goes once it is `older_than_s`."""
    try:
        candidates = [entry for entry in os.scandir(tempfile.gettempdir())
                      if entry.name.startswith(TEMP_PREFIX) and entry.is_dir(follow_symlinks=False)]
    except OSError:
        return
    mine = _temp[0] if _temp is not None else None
    for entry in candidates:
        if entry.path == mine:
            continue
        try:
            fd = os.open(os.path.join(entry.path, _LOCK_NAME), os.O_RDONLY)
        except FileNotFoundError:
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > older_than_s:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass
            continue
        except OSError:
            continue  # another user's, or unreadable: not ours to judge
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its process is alive
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
        finally:
            os.close(fd)
