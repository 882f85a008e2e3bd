"""What every export shares: the error type, the formats, atomic files and the output folder.

An export is built in a staging folder next to ``OUT`` and renamed into place at the end, so an
``OUT`` that exists is always a whole export (passed or failed, as its report says). An ``OUT``
that already exists is never touched without ``force``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .._files import as_created

__all__ = [
    "ExportError",
    "FORMATS",
    "MERGED_DTYPES",
    "GGUF_QUANTS",
    "LOSSY_GGUF_QUANTS",
    "REPORT_NAME",
    "write_atomic",
    "fsync_file",
    "file_digest",
    "file_entry",
    "check_output_path",
    "staging_dir",
    "commit_output",
]

FORMATS = ("merged", "peft", "gguf", "ollama")
MERGED_DTYPES = ("bf16", "fp16", "fp32", "nf4")
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
LOSSY_GGUF_QUANTS = ("q5_1", "q5_0", "q4_1", "q4_0")  # 4- and 5-bit: agreement measured, thresholds looser
REPORT_NAME = "export_report.json"


class ExportError(ValueError):
    """An export could not be made or did not keep its promise; the message says which and why."""


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` under a temporary name, fsync, rename."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        as_created(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path, root: Path) -> dict[str, object]:
    return {"path": str(path.relative_to(root)), "bytes": path.stat().st_size, "sha256": file_digest(path)}


def check_output_path(out: Path, force: bool) -> None:
    """Refuse an existing output path unless ``force``; refuse a parent that is not a folder."""
    if out.exists() or out.is_symlink():
        if not force:
            kind = "folder" if out.is_dir() else "file"
            raise ExportError(f"-o {out}: a {kind} of that name exists; choose another path or pass --force "
                              "to replace it")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise ExportError(f"-o {out}: {parent} is not a folder")


def staging_dir(out: Path) -> Path:
    """A fresh folder beside ``out`` to build the export in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    as_created(staging)
    return staging


def commit_output(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging folder to ``out`` (replacing it only when ``force``)."""
    if out.exists() or out.is_symlink():
        if not force:  # appeared while exporting
            raise ExportError(f"-o {out}: appeared while the export was being written; not replaced (use --force)")
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(old, out)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
        return
    os.replace(staging, out)
