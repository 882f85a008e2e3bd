"""Locating and reading the shared evaluation data.

The data lives outside the repository: ``$QLORAKIT_SHARED_DATA`` when set, else
``<repo>/../shared/data``. Readers name the file and line of anything malformed.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "shared_data_root", "data_file", "read_jsonl", "read_json", "read_csv"]

ENV_VAR = "QLORAKIT_SHARED_DATA"


def shared_data_root() -> Path:
    """The shared data folder; raises FileNotFoundError naming both places looked at."""
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{ENV_VAR}={env!r} is not a directory")
        return root
    repo = Path(__file__).resolve().parents[3]
    root = repo.parent / "shared" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"shared evaluation data not found at {root}; set {ENV_VAR} to the folder that holds benchmarks/, bbq/, safety/ and truthfulqa/")
    return root


def data_file(relative: str, root: Path | None = None) -> Path:
    """``root / relative`` (root defaults to :func:`shared_data_root`), which must exist."""
    path = (root if root is not None else shared_data_root()) / relative
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data file missing: {path}")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines file (blank lines skipped)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e.msg}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_json(path: Path) -> Any:
    """A whole JSON document."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e


def read_csv(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; ``required`` columns must be present."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        return [dict(r) for r in reader]
