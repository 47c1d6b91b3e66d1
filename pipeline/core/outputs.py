"""Where a command may write: the one contract every `distill` command's outputs follow.

    A command writes its own outputs only into a directory it made and marked (`.distillery`, naming the command:
    a workdir for `distill run`, an `--out` dir for `distill eval` and `distill compare`, `<step>/export/` for
    `distill export`, `run-report/` for `distill report`), or into a new path, or an empty directory (which it
    marks). A file you name (`export --out`, `bench --json`) must be new. An existing file, a path another command
    wrote, or a non-empty directory no command made is refused (UserError: exit 2, naming the path) unless you pass
    --overwrite, which replaces only the paths the command writes.
    Whatever the flags, a command never writes the input a step read: a file a step read by path (recorded in its
    workdir's fingerprint cache and in the steps' manifests), a model dir it read, or a step's data, model and
    manifest (what later steps and the cache read). Paths are compared resolved.
    Every file appears whole (`pipeline.core.artifacts.write_atomic`: a temp file in its directory, then os.replace).
    A command checks every output (`claim_dir`, `claim_file`) before it writes anything, so a refused command
    leaves every file as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

from pipeline.core.artifacts import MANIFEST, write_atomic, write_json_atomic
from pipeline.core.errors import UserError
from pipeline.core.fingerprints import CACHE_FILE

WORKDIR_MARK = ".distillery"  # in every directory a command made for its outputs: {"made_by": command}
RUN_FILE = "recipe.json"  # step order and resolved recipe of the last run, read by `distill status`
# the commands that write outputs, as marks name them
RUN, EVAL, COMPARE, EXPORT, REPORT = (f"distill {name}" for name in ("run", "eval", "compare", "export", "report"))
_LEGACY_REPORT_MARK = ".distill-run-report"  # what `distill report` put in run-report/ before WORKDIR_MARK


def made_by(directory: Path) -> str | None:
    """The command that made `directory` for its outputs, from its mark; None for a directory no command made."""
    mark = directory / WORKDIR_MARK
    if mark.is_file():
        try:
            command = json.loads(mark.read_text()).get("made_by")
        except (OSError, ValueError, AttributeError):
            command = None
        return command if isinstance(command, str) else RUN  # marks from before they named a command were run's
    if (directory / _LEGACY_REPORT_MARK).is_file():
        return REPORT
    try:  # a workdir made by a Distillery from before the mark
        legacy_run = {"recipe", "steps", "document"} <= set(json.loads((directory / RUN_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        legacy_run = False
    return RUN if legacy_run else None


def mark(directory: Path, command: str) -> None:
    """Say that `command` made `directory` for its outputs. Atomic: a reader never sees a half-written mark."""
    write_json_atomic(directory / WORKDIR_MARK, {
        "made_by": command,
        "note": f"`{command}` made this directory and writes and replaces its outputs here; no other command "
                "replaces anything here without --overwrite."})


def make_dir(directory: Path, command: str, what: str) -> list[Path]:
    """Make `directory` (and its missing parents) for `command`'s outputs and mark it; an empty directory no
    command made is marked too. Returns the directories this call made, outermost first: each by an exclusive
    mkdir, so one another process made at the same moment is never counted (nor later removed) as this one's.
    `what` names the directory in errors ("workdir", "--out")."""
    made = []
    try:
        for path in [*reversed(directory.parents), directory]:
            if path.is_dir():
                continue
            try:
                path.mkdir()
                made.append(path)
            except FileExistsError:
                if not path.is_dir():
                    raise NotADirectoryError(f"{path} is a file") from None
        # not a directory already marked, nor someone's that --overwrite let the command write into
        if directory in made or (made_by(directory) is None and not any(directory.iterdir())):
            mark(directory, command)
    except OSError as error:
        remove_made(directory, made)
        raise UserError(f"{what} {directory}: cannot create it ({error.strerror or error})") from None
    return made


def remove_made(directory: Path, made: list[Path]) -> None:
    """Undo `make_dir` for a refused command: `directory` whole if it made it, then each parent it made that
    nothing else went into. Only call it while nothing else can be writing there (the runner holds the lock)."""
    for path in reversed(made):
        if path == directory:
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.rmdir()
            except OSError:
                pass  # another command's output went into it meanwhile


def claim_dir(directory: Path, names: Iterable[str], command: str, *, overwrite: bool,
              never: dict[Path, str] | None = None) -> list[Path]:
    """Check that `command` may write `names` (its own outputs) into `directory`; their paths. Refused, unless
    `overwrite`: a non-empty directory no command made, and an existing path there that `command` did not write
    (neither in a directory it made, nor a directory it made and marked itself). Always refused: a file where the
    directory should be, and any path in `never` (`never_written`)."""
    names = list(names)
    paths = [directory / name for name in names]
    _check_never_written([directory], never or {}, replaced=False)
    _check_never_written(paths, never or {})
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file, not a directory")
    if overwrite or not directory.is_dir() or made_by(directory) == command:
        return paths
    if made_by(directory) is None and any(directory.iterdir()):
        raise UserError(f"{directory} is a non-empty directory that no `distill` command made (it has no "
                        f"{WORKDIR_MARK}); refusing to write {', '.join(names)} into it: choose a new or empty "
                        "directory, or pass --overwrite to write there anyway")
    for path in paths:
        if (path.exists() or path.is_symlink()) and not (path.is_dir() and made_by(path) == command):
            raise UserError(f"{path} exists and was not written by `{command}`; refusing to replace it (pass "
                            "--overwrite to replace it)")
    return paths


def claim_file(path: Path, *, overwrite: bool, never: dict[Path, str] | None = None) -> Path:
    """Check that a command may write the file `path`, which the user named: it must be new, or `overwrite`.
    Always refused: a directory at `path`, and any path in `never` (`never_written`)."""
    _check_never_written([path], never or {})
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the path of the file to write")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise UserError(f"{path} exists; refusing to replace it (pass --overwrite to replace it)")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise UserError(f"{path}: {existing} is a file, not a directory")
    return path


def write_file(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file `claim_file` allowed: its missing directories made, the file itself atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)


def never_written(*places: Path, read: Iterable[Path] = ()) -> dict[Path, str]:
    """What no command may write, whatever the flags, for a command that writes `places` and reads `read` (model
    dirs, data files, results): what it reads; and in every workdir these are in (or are), every file a step read
    by path (its fingerprint cache, which holds them absolute, and each step manifest's record of its inputs,
    relative to the current directory) and each step's data, model and manifest; and the same outputs of any step
    dir among them or their parents. Resolved path -> what it is, for the message."""
    found: dict[Path, str] = {Path(path).resolve(): "read by this command" for path in read}
    resolved = [Path(place).resolve() for place in [*places, *read]]
    for directory in dict.fromkeys(d for place in resolved for d in (place, *place.parents)):
        if (directory / MANIFEST).is_file():
            _step_outputs(directory, found)
        if made_by(directory) == RUN:
            _workdir_inputs(directory, found)
    return found


def _step_outputs(step_dir: Path, found: dict[Path, str]) -> None:
    for name in (MANIFEST, "data", "model"):
        found.setdefault(step_dir / name, f"the output of step {step_dir.name!r}, which later steps read")


def _workdir_inputs(workdir: Path, found: dict[Path, str]) -> None:
    for step_dir in sorted(p for p in workdir.iterdir() if (p / MANIFEST).is_file()):
        _step_outputs(step_dir, found)
        try:
            manifest = json.loads((step_dir / MANIFEST).read_text())
            inputs = manifest.get("inputs") or {}
            read = [*inputs.get("files", {}), *inputs.get("models", {}), manifest.get("stats", {}).get("source")]
        except (OSError, ValueError, AttributeError, TypeError):
            continue  # a damaged manifest records nothing; the fingerprint cache below still does
        for path in read:
            if isinstance(path, str) and Path(path).expanduser().exists():
                found.setdefault(Path(path).expanduser().resolve(), f"read by step {step_dir.name!r} of {workdir}")
    try:
        cached = json.loads((workdir / CACHE_FILE).read_text())
    except (OSError, ValueError):
        cached = {}
    for path in cached if isinstance(cached, dict) else {}:
        found.setdefault(Path(path), f"read by a step of {workdir}")


def _check_never_written(paths: list[Path], never: dict[Path, str], replaced: bool = True) -> None:
    """Refuse a path that is in `never`, inside one, or (`replaced`: written whole, not written into) holds one."""
    for path in paths:
        target = path.resolve()
        holding = set(target.parents)
        for protected, what in never.items():
            if target == protected or protected in holding or (replaced and target in protected.parents):
                raise UserError(f"{path}: refusing to write there, whatever the flags: {protected} is {what}; "
                                "Distillery never writes a step's input")


def add_overwrite_argument(parser, replaces: str) -> None:
    """`--overwrite` for a command that writes files: `replaces` says what it would replace."""
    parser.add_argument("--overwrite", action="store_true", help=(
        f"replace what this command did not write: {replaces} (never a step's input)"))
