"""Files written whole or not at all: the one atomic write of fxdecomp, a lock, a forgiving JSON read.

Needs only the standard library (`device_bench.py` uses it on the device).

Example::

    atomic_write_text("table.json", json.dumps(table))
    with locked(Path("latency.json.lock")):
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temp file beside ``path``, then move it over ``path`` in one step.

    The temp file is in the same directory (``os.replace`` is atomic only within one file system)
    and gets the mode a plain ``open(path, "w")`` would give. On any error it is removed and the
    error propagates; ``path`` is untouched. The one atomic write of the package (the CLI's
    outputs, the layer-latency cache, latency packs and tables).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see `atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on ``lock_path`` while inside; a no-op where flock does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace alone
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size): every atomic replace makes a new inode, so a rewrite is never missed."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def read_json_dict(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} if the file is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
