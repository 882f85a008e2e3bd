"""File helpers shared by the writers of user-facing output."""

from __future__ import annotations

import os

__all__ = ["as_created"]


def as_created(path: str | os.PathLike[str]) -> None:
    """Give a temporary file or folder (``tempfile.mkstemp``/``mkdtemp`` make them 0600/0700) the
    mode ``open()``/``mkdir()`` would have given what it replaces: 0666 (files) or 0777 (folders)
    less the process's umask (usually 0644/0755), so that outputs are as readable as any other
    file the user writes (a model server running as another user reads exports, for one)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
