"""File helpers shared by the writers of user-facing output."""

from __future__ import annotations

import os

__all__ = ["as_created"]


def as_created(path: str | os.PathLike[str]) -> None:
    """Give a temporary file (``tempfile.mkstemp`` makes it 0600) the mode ``open()`` would have
    given the file it replaces: 0666 less the process's umask (usually 0644), so that outputs are
    as readable as any other file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
