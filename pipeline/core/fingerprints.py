"""Content fingerprints (sha256) of the files and directories steps read, cheap to take again.

Hashing a 10 GB data file or model on every `distill run` would make a cached re-run slow, so each file's
digest is kept with its size, mtime and inode (what DVC keeps in its state db): a file whose three are
unchanged is not read again; a file that was touched is read and hashed, and if its bytes are the same, so is
its digest, and no step re-runs. The cache lives in `<workdir>/.fingerprints.json`; a path's entry is absolute.
A directory's digest covers every file under it by relative path and content, so renaming, adding or editing
any file changes it. A FIFO, socket or device is refused before it is opened (`special_file_kind` names it, for
pipeline.text.tables too).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat as modes
from pathlib import Path

from pipeline.core.errors import UserError

CACHE_FILE = ".fingerprints.json"
_READ = 1 << 23


class Fingerprints:
    """sha256 digests of files and directories, remembered by (size, mtime, inode) in `cache_path`."""

    def __init__(self, cache_path: Path | None = None):
        self.cache_path = cache_path
        self._entries: dict[str, list] = {}
        if cache_path is not None and cache_path.is_file():
            try:
                self._entries = json.loads(cache_path.read_text())
            except (OSError, ValueError):
                self._entries = {}  # a damaged cache only costs a re-hash
            if not isinstance(self._entries, dict):
                self._entries = {}
        self.hashed_bytes = 0  # bytes actually read this time (the cost a cached re-run should not pay)

    def of(self, path: str | Path, *, skip_suffixes: tuple[str, ...] = ()) -> str:
        """The digest of a file, or of a directory's files (except those ending in `skip_suffixes`). A path that is
        empty (Path("") is the working directory) or names a FIFO, socket or device is refused before it is opened:
        reading a FIFO blocks until a writer comes, a device may never end."""
        if not str(path).strip():
            raise UserError("empty path: name a file or a directory")
        path = Path(path).expanduser()
        try:
            mode = path.stat().st_mode
            if not (modes.S_ISREG(mode) or modes.S_ISDIR(mode)):
                raise UserError(f"{path}: is a {special_file_kind(mode)}, not a regular file or directory")
            if modes.S_ISDIR(mode):
                digest = hashlib.sha256()
                for file in _files_under(path):
                    relative = file.relative_to(path).as_posix()
                    if not relative.endswith(skip_suffixes):
                        digest.update(f"{relative}\0{self._file(file)}\n".encode())
                return digest.hexdigest()
            return self._file(path)
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror or error})") from None

    def _file(self, path: Path) -> str:
        stat = path.stat()
        # A FIFO, socket or device inside a fingerprinted directory: opening it would block (a FIFO waits for a
        # writer) or never end (a device). Refused, naming the file, before it is opened.
        if not modes.S_ISREG(stat.st_mode):
            raise UserError(f"{path}: is a {special_file_kind(stat.st_mode)}, not a regular file "
                            "(a step's input directory may hold only regular files and directories)")
        absolute = str(path.resolve())
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        cached = self._entries.get(absolute)
        if isinstance(cached, list) and len(cached) == 4 and cached[:3] == signature:
            return cached[3]
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_READ):
                digest.update(block)
        self.hashed_bytes += stat.st_size
        self._entries[absolute] = signature + [digest.hexdigest()]
        return digest.hexdigest()

    def save(self) -> None:
        """Write the cache (only where its directory exists: asking never creates a workdir). The cache only saves
        re-hashing: where it cannot be written (a read-only workdir), it is not, and nothing fails."""
        if self.cache_path is None or not self.cache_path.parent.is_dir():
            return
        from pipeline.core.artifacts import write_atomic

        try:
            write_atomic(self.cache_path, lambda tmp: tmp.write_text(json.dumps(self._entries)))
        except OSError:
            pass


def special_file_kind(mode: int) -> str:
    """What a file that is neither a regular file nor a directory is, in words, from its `st_mode`."""
    for test, kind in ((modes.S_ISFIFO, "named pipe (FIFO)"), (modes.S_ISSOCK, "socket"),
                       (modes.S_ISCHR, "character device"), (modes.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def _files_under(directory: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        files += [Path(root) / name for name in sorted(names)]
    return files
