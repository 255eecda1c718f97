"""Atomic output directories: written into a hidden staging dir beside the output, renamed at the end.

A failure leaves no partial output. A run killed with SIGKILL skips its cleanup and leaves `.NAME.tmp-XXXX`
(its staging dir) or `.NAME.old-XXXX` (the output it was replacing) behind; the next run into the same output
removes them under `StagingLock`, and readers refuse them (`is_staging_dir`).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from generator.errors import GenRepoError

# `.NAME.tmp-XXXX` (a run's staging dir) and `.NAME.old-XXXX` (the output it replaces, while it is moved)
_STAGING_PATTERN = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]+$")


def is_staging_dir(path: Path) -> bool:
    """Whether `path` is a convert run's hidden staging directory (never a finished checkpoint)."""
    return bool(_STAGING_PATTERN.match(Path(path).name))


class StagingLock:
    """Holds a shared flock on the output's parent dir for a run; first removes stale staging dirs.

    A run that gets the lock exclusively knows no other convert is writing into that parent, so every
    `.NAME.tmp-*` / `.NAME.old-*` beside the output was left by a killed run (SIGKILL skips the cleanup) and is
    removed. Otherwise another run is busy there and nothing is touched. No lock file is left behind.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self._fd: int | None = None

    def __enter__(self) -> StagingLock:
        try:
            self._fd = os.open(self.output_dir.parent, os.O_RDONLY)
        except OSError:
            return self  # no lock on this file system: skip the cleanup, convert anyway
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another run holds it: leave its staging dirs alone
            self._lock_shared()
            return self
        except OSError:
            return self  # this file system has no flock (e.g. some network mounts): no cleanup
        remove_stale_staging(self.output_dir)
        self._lock_shared()  # not atomic, but this run's staging dir does not exist yet
        return self

    def _lock_shared(self) -> None:
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        except OSError:
            pass  # the cleanup is best effort; the convert itself does not need the lock

    def __exit__(self, *_: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock


def remove_stale_staging(output_dir: Path) -> list[Path]:
    """Remove the staging dirs of `output_dir` that earlier runs left (call only under the exclusive lock)."""
    removed = []
    prefixes = (f".{output_dir.name}.tmp-", f".{output_dir.name}.old-")
    for path in output_dir.parent.iterdir():
        if path.name.startswith(prefixes) and is_staging_dir(path) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            print(f"note: removed {path}, left by an interrupted convert", file=sys.stderr)
            removed.append(path)
    return removed


def new_staging_dir(output_dir: Path) -> Path:
    """A fresh staging dir beside `output_dir` (the parent must exist), readable like an ordinary dir."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary directory
    return staging


def check_output_dir(output_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor a TensorRT-LLM checkpoint."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise GenRepoError(f"output {output_dir} exists and is not a directory")
    if any(output_dir.iterdir()) and not (output_dir / "config.json").is_file():
        raise GenRepoError(f"output {output_dir} exists and is not a TensorRT-LLM checkpoint; refusing to replace it")


def replace_dir(staging: Path, output_dir: Path) -> None:
    """Move a finished staging directory to `output_dir`, replacing what was there."""
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / "checkpoint")
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
