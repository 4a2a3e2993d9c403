"""Writing files so that a crash or a kill never leaves a truncated one."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path, write: Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """``write(f)`` into a temporary file next to ``path`` (opened ``"wb"``), optionally fsync'ed,
    then renamed over ``path``: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8; newlines written as given)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def fsync_dir(path) -> None:
    """Make the renames and removals in directory ``path`` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
