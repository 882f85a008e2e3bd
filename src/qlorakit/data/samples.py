"""Paths of the sample data set that ships inside the package (``data/sample/``).

``qlorakit train`` with no data uses these files; see ``data/sample/README.md`` for what is in them.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_DIR", "sample_train_path", "sample_eval_path"]

# The folder is package data (pyproject's package-data lists ``data/sample/*``), installed next to
# this module in both editable and wheel installs, so a path relative to the module is enough.
SAMPLE_DIR: Path = Path(__file__).resolve().parent / "sample"

_TRAIN = "support_train.jsonl"
_EVAL = "support_eval.jsonl"


def _existing(name: str) -> Path:
    path = SAMPLE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"sample data file {path} is missing; expected it as package data of qlorakit "
            "(reinstall the package, or run scripts/make_sample_data.py in a source checkout)"
        )
    return path


def sample_train_path() -> Path:
    """The training part: JSONL records ``{"instruction", "input", "output"}``."""
    return _existing(_TRAIN)


def sample_eval_path() -> Path:
    """The held-out part, new phrasings of topics the training part covers."""
    return _existing(_EVAL)
