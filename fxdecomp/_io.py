"""Atomic file writes: a reader never sees half a file, and a failed write leaves the old file.

Example::

    atomic_write_text("plan.json", text)
    atomic_write("model.pt", lambda tmp: torch.save(module, tmp))
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temp file beside ``path``, then move it over ``path`` in one step.

    The temp file is in the same directory (``os.replace`` is atomic only within one file system)
    and gets the mode a plain ``open(path, "w")`` would give. On any error it is removed and the
    error propagates; ``path`` is untouched.
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
