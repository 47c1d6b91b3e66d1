"""A workdir on disk: where each step's dirs are, how a finished step is moved into place, what a killed run left and
how it is put right, the lock, and which directories `distill run` may write into.

    <workdir>/<step>/             a step's complete output (its manifest.json written last: pipeline.core.artifacts)
    <workdir>/.<step>.tmp/        where the step writes while it runs (`tmp_dir_of`); `publish` renames it into place;
                                  what is left of a failed attempt (its error.json, until the step next starts)
    <workdir>/.<step>.scratch/    work kept across a crash (sample shards, Trainer checkpoints: `scratch_dir_of`) for
                                  the key in its KEY file, and a failed attempt's log; removed once the step completes
    <workdir>/.<step>.old/        the previous output, for the moment `publish` swaps the new one in (`old_dir_of`)
    <workdir>/.lock               held by the one `distill run` or `distill report` using the workdir (`workdir_lock`)
    <parent>/seed-N/              each seed's workdir under `distill run --seeds` (SEED_DIR)

(recipe.json and .distillery: pipeline.core.outputs; .fingerprints.json: pipeline.core.fingerprints.)

The runner only ever replaces what it wrote: a directory with a step's name is replaced only if it holds a
Distillery manifest, and a workdir that is a non-empty directory not made by `distill run` is refused (`check_workdir`;
the contract every command's outputs follow is `pipeline.core.outputs`'s). A kill during or just after `publish`
leaves nothing that counts as an incomplete step: the next `distill run` or `distill status` puts it right
(`clean_leftovers_if_idle`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.artifacts import (
    FOREIGN,
    MANIFEST,
    OUTPUTS,
    UNREADABLE,
    clean_stale_temp_dirs,
    output_files,
    output_state,
    read_manifest,
    write_json_atomic,
)
from pipeline.core.errors import UserError
from pipeline.core.outputs import RUN, made_by, make_dir

if TYPE_CHECKING:
    from pipeline.core.recipe import Recipe

LOCK_FILE = ".lock"  # in the workdir: held by the one `distill run` or `distill report` using it
LOG_FILE = "log.txt"  # what a step and its libraries wrote while it ran, in its dir (in its scratch dir if it failed)
SCRATCH_KEY = "KEY"  # in a step's scratch dir: the key its saved work is for
ERROR_FILE = "error.json"  # in a step's tmp dir: the failure of its last attempt
SEED_DIR = re.compile(r"seed-(-?\d+)(-dry-run)?")  # a seed's workdir under `distill run --seeds` (and its dry run)


def tmp_dir_of(workdir: Path, name: str) -> Path:
    """Where step (or output) `name` is written while it runs, renamed into place by `publish`."""
    return workdir / f".{name}.tmp"


def scratch_dir_of(workdir: Path, name: str) -> Path:
    """Where step `name` keeps work across a crash, until it completes."""
    return workdir / f".{name}.scratch"


def old_dir_of(workdir: Path, name: str) -> Path:
    """Where `publish` moves the previous output of `name` while it swaps the new one in."""
    return workdir / f".{name}.old"


def seed_workdir(parent: Path, seed: int) -> Path:
    """The workdir of seed `seed` under `distill run --seeds` (matches SEED_DIR)."""
    return parent / f"seed-{seed}"


def scratch_key(scratch: Path) -> str | None:
    """The key a step's scratch dir holds work for (its KEY file), or None."""
    try:
        return (scratch / SCRATCH_KEY).read_text()
    except (OSError, ValueError):
        return None


def publish(tmp: Path, final_dir: Path) -> None:
    """Move a finished temp dir into place, replacing an older output of the same step (never anything else).
    Its manifest gets the list of its output files first, if it has none (`output_state` checks it)."""
    try:
        manifest = read_manifest(tmp)
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and OUTPUTS not in manifest:
        manifest[OUTPUTS] = output_files(tmp, manifest.get("produces"))
        write_json_atomic(tmp / MANIFEST, manifest)
    if final_dir.exists():
        if not (final_dir / MANIFEST).is_file():
            raise FileExistsError(f"{final_dir} holds no {MANIFEST}: not a step output, not replacing it")
        old = old_dir_of(final_dir.parent, final_dir.name)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_dir)


# --- what killed runs left --------------------------------------------------------------------------------------


def clean_leftovers(workdir: Path, name: str) -> None:
    """Put right what a kill during or just after `publish` of step `name` left, so that nothing of it is counted
    as an incomplete step: a finished output still in `.<name>.tmp` (killed between its manifest and its rename,
    or between the renames) is published; `.<name>.old` (the previous output, a full copy) is removed once the
    step's dir is in place, or put back if the kill left none; a `.<name>.scratch` of the key the step's
    complete output has (killed after publishing, before removing it) is removed. Call it only while no run can
    be using the workdir (under its lock). A read-only workdir is left as it is."""
    final_dir, tmp = workdir / name, tmp_dir_of(workdir, name)
    old, scratch = old_dir_of(workdir, name), scratch_dir_of(workdir, name)
    if final_dir.is_symlink():
        return  # not a step's output (`distill run` refuses it)
    try:
        final_is_output = not final_dir.exists() or (final_dir / MANIFEST).is_file()  # else `publish` refuses
        if final_is_output and output_state(tmp, name)[0] is not None:
            publish(tmp, final_dir)
        if old.is_dir() and not old.is_symlink():
            if not final_dir.exists() and not final_dir.is_symlink() and output_state(old, name)[0] is not None:
                os.replace(old, final_dir)
            elif (final_dir / MANIFEST).is_file():
                shutil.rmtree(old)
        key = output_state(final_dir, name)[0]
        if key is not None and scratch.is_dir() and not tmp.exists() and (scratch / SCRATCH_KEY).is_file() \
                and (scratch / SCRATCH_KEY).read_text() == key:
            shutil.rmtree(scratch)
    except OSError:
        pass  # read-only, or another process got there first: the leftovers stay, and say so where they matter


def clean_leftovers_if_idle(workdir: Path, names) -> None:
    """Remove what killed runs left in a workdir distill made (`clean_leftovers`: a half-published step, `.STEP.old`,
    a published step's scratch dir), so that `distill run` and `distill status` see the same steps, and the temporary
    dirs of killed processes (`clean_stale_temp_dirs`). Only where there is something to remove, and only while no
    run is using the workdir: this takes its lock without waiting, for that moment; a busy or read-only workdir is
    left as it is."""
    clean_stale_temp_dirs()
    if not workdir.is_dir() or not made_by_distill(workdir):
        return
    names = [name for name in names if _left_over(workdir, name)]
    if not names:
        return
    try:
        fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            fd = os.open(workdir / LOCK_FILE, os.O_RDONLY)  # a read-only workdir: nothing can be removed anyway
        except OSError:
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a run is using the workdir: what looks left over may be its work
    try:
        for name in names:
            clean_leftovers(workdir, name)
    finally:
        os.close(fd)


def _left_over(workdir: Path, name: str) -> bool:
    """Whether a kill during or just after publishing step `name` left something (`clean_leftovers` removes it)."""
    scratch, tmp = scratch_dir_of(workdir, name), tmp_dir_of(workdir, name)
    if old_dir_of(workdir, name).exists() or (tmp / MANIFEST).is_file():
        return True
    if not scratch.is_dir() or tmp.exists():
        return False
    key = output_state(workdir / name, name)[0]
    return key is not None and scratch_key(scratch) == key


# --- which workdirs `distill run` writes into, one run at a time ----------------------------------------------


def workdir_for(recipe: Recipe, dry_run: bool) -> Path:
    """The recipe's workdir (beside it, `<workdir>-dry-run` for --dry-run), refused (naming the workdir) where its path
    holds a name longer than a file name may be (ENAMETOOLONG: every use of it would raise OSError); a workdir that
    does not exist yet is fine (a run makes it), and other problems are reported where the workdir is checked
    (check_workdir)."""
    workdir = _workdir_for(recipe, dry_run)
    try:
        os.stat(workdir)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise UserError(f"{workdir}: cannot use this path as the workdir ({error.strerror or error})") from None
    return workdir


def _workdir_for(recipe: Recipe, dry_run: bool) -> Path:
    if not dry_run:
        return recipe.workdir
    # beside the workdir; `workdir: .` has no name of its own, so take the directory it stands for
    workdir = recipe.workdir if recipe.workdir.name else recipe.workdir.resolve()
    return workdir.with_name(workdir.name + "-dry-run")


def made_by_distill(workdir: Path) -> bool:
    return made_by(workdir) == RUN


def check_workdir(workdir: Path, step_names: list[str]) -> None:
    """Refuse a workdir distill did not make and any path a step would replace that distill did not write."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} is a file, not a directory")
    if workdir.is_dir() and any(workdir.iterdir()) and not made_by_distill(workdir):
        raise UserError(f"workdir {workdir} is a non-empty directory that `distill run` did not create; refusing to "
                        "write into it (set `workdir:` to a new or empty directory)")
    for name in step_names:
        final_dir = workdir / name
        if not final_dir.exists() and not final_dir.is_symlink():
            continue
        # ours: a dir whose manifest names the step, or whose manifest does not read (cut short) in a workdir distill
        # made, which `distill run` re-runs the step over (`output_state`)
        why_not = output_state(final_dir, name)[1]
        ours = not why_not.endswith(FOREIGN) and (not why_not.startswith(UNREADABLE) or made_by_distill(workdir))
        if not ours:
            raise UserError(f"{final_dir} exists and was not written by Distillery for step {name!r} "
                            f"(no manifest.json naming it); refusing to replace it: rename step {name!r} "
                            "or move that path")


def prepare_parent_workdir(parent: Path) -> None:
    """The workdir `distill run --seeds` puts its seed-N workdirs in: refused like any workdir if distill did not
    make it, created (and marked) otherwise."""
    check_workdir(parent, [])
    make_dir(parent, RUN, "workdir")


@contextmanager
def workdir_lock(workdir: Path):
    """Hold the workdir's lock while the block runs, or refuse: one `distill run` or `distill report` at a time.
    A refused run removes a workdir it made while it holds this lock; a process that opened the lock file before
    that removal then locks a file no longer at its path, which guards nothing, so that counts as refused too."""
    path = workdir / LOCK_FILE
    busy = UserError(f"{workdir}: another `distill run` or `distill report` is using this workdir; try again when "
                     "it ends")
    try:
        lock = open(path, "a")  # "a": never truncate a lock another process holds
    except FileNotFoundError:
        raise busy from None  # the workdir went away: a run that made it was refused meanwhile
    except OSError as error:
        raise UserError(f"{path}: cannot open the workdir's lock ({error.strerror or error})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.path.samestat(os.fstat(lock.fileno()), os.stat(path))
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            raise busy
        yield
