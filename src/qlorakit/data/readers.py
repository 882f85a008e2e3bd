"""Read training records from files; every problem names the file and the line or row.

A record is a plain ``dict``. Each reader attaches the 1-based line (JSONL) or row (CSV, JSON
array) number it came from as ``record["_line"]``, so that later checks can point back at it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["DataError", "read_records", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv")


class DataError(ValueError):
    """Bad training data: the message names the file, the line or row, and what was expected."""


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "expected a UTF-8 text file — re-save it as UTF-8"
        ) from e


def _read_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
        obj["_line"] = i
        records.append(obj)
    return records


def _read_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # a .json file holding JSON Lines is common; read it as such when every line parses
        if "\n" in text.strip():
            try:
                return _read_jsonl(path, text)
            except DataError:
                pass
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    if isinstance(obj, dict):
        for key in ("data", "records", "rows", "examples"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise DataError(f"{path}: expected a JSON array of records (or an object with a 'data' array)")
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(obj).__name__}")
    records = []
    for i, rec in enumerate(obj, start=1):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i}: expected a JSON object, got {type(rec).__name__}")
        rec = dict(rec)
        rec["_line"] = i
        records.append(rec)
    return records


def _read_csv(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}:1: expected a CSV header row naming the columns")
    records = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(f"{path}:{line}: more values than header columns ({len(reader.fieldnames)})")
            if any(v is None for v in row.values()):
                raise DataError(f"{path}:{line}: fewer values than header columns ({len(reader.fieldnames)})")
            rec: dict[str, Any] = dict(row)
            rec["_line"] = line
            records.append(rec)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
    return records


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a JSONL, JSON or CSV file.

    Raises :class:`DataError` for a missing, empty, non-UTF-8 or malformed file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        raise DataError(f"{p}: is a folder; expected a data file ({', '.join(SUPPORTED_SUFFIXES)})")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{p}: unsupported file type {suffix!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)}")
    text = _read_text(p)
    if not text.strip():
        raise DataError(f"{p}: the file is empty; expected at least one record")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
    records = reader(p, text)
    if not records:
        raise DataError(f"{p}: no records found; expected at least one")
    return records
