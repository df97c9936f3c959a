"""Writing files so that a crash never leaves a damaged one: what ``trp.save`` and the
training checkpoints share.

The bytes go to a temporary file beside the target, are flushed to disk and renamed over
it (an atomic step on POSIX file systems), then the directory is synced: after a crash at
any point the target holds either its old contents or the new ones. The temporary file is
created as any new file is (``open(..., 0o666)``), so the final file gets the mode the
process's umask gives, not the 0600 of ``tempfile.mkstemp``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> tuple[Path, int]:
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {str(path)!r}")


def atomic_write(path, data: bytes, keep_previous: Optional[os.PathLike] = None) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring). With
    ``keep_previous``, an existing ``path`` is first renamed to that name, so that the last
    good file survives a new one that later turns out damaged."""
    path = Path(path)
    tmp, fd = _temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def check_writable(directory) -> None:
    """Raise an OSError naming ``directory`` unless a file can be created in it (the real
    test: permission bits say nothing for root, or on a read-only mount)."""
    directory = Path(directory)
    tmp, fd = _temporary(directory / "write-test")
    os.close(fd)
    tmp.unlink()
