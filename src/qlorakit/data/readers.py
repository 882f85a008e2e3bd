"""Read training records from files; every problem names the file and the line or row.

A record is a plain ``dict``. Each reader attaches the 1-based line (JSONL) or row (CSV, JSON
array, Parquet, ``datasets`` folder) number it came from as ``record["_line"]``, so that later
checks can point back at it. A record that has a field of that name already is refused (naming
the file and the line) rather than silently overwritten.

Supported: JSON Lines, JSON (an array of records, or an object holding one), CSV with a header,
Parquet, and a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, whose
``train`` split is read unless the path names a split folder). Parquet and Arrow files are read
with pyarrow; the ``datasets`` package is not needed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["DataError", "read_records", "sha256_path", "SUPPORTED_SUFFIXES"]

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """Bad training data: the message names the file, the line or row, and what was expected."""


LINE_KEY = "_line"


def _numbered(path: Path, where: str, rec: dict[str, Any], number: int) -> dict[str, Any]:
    """``rec`` with its line or row number under :data:`LINE_KEY`; a field of that name is an error."""
    if LINE_KEY in rec:
        raise DataError(f"{path}:{where}: the record has a field named {LINE_KEY!r}, which qlorakit reserves for "
                        "the line or row number it reports problems with; expected the field under another name "
                        "(rename it in the file)")
    rec[LINE_KEY] = number
    return rec


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
    # JSON Lines separates records by "\n" only; str.splitlines() would also split inside strings
    # that hold U+2028, U+2029 or U+0085, which JSON allows unescaped
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno}); expected one JSON object per line") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}")
        records.append(_numbered(path, str(i), obj, i))
    return records


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _read_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # a .json file holding JSON Lines is common: when its first line is a whole JSON object, it is
        # read as JSON Lines, whose errors name the line that is wrong
        if e.msg == "Extra data" and "\n" in text.strip() and _is_json_object(text.lstrip().split("\n", 1)[0]):
            return _read_jsonl(path, text)
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
        records.append(_numbered(path, f" record {i}", dict(rec), i))
    return records


def _read_csv(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}:1: expected a CSV header row naming the columns")
    twice = sorted({c for c in reader.fieldnames if reader.fieldnames.count(c) > 1})
    if twice:
        raise DataError(f"{path}:1: column(s) {', '.join(repr(c) for c in twice)} named more than once in the header; "
                        "expected one column per name")
    records = []
    try:
        for row in reader:
            line = reader.line_num
            if None in row:
                raise DataError(f"{path}:{line}: more values than header columns ({len(reader.fieldnames)})")
            if any(v is None for v in row.values()):
                raise DataError(f"{path}:{line}: fewer values than header columns ({len(reader.fieldnames)})")
            records.append(_numbered(path, str(line), dict(row), line))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
    return records


def _table_records(path: Path, table: Any) -> list[dict[str, Any]]:
    records = table.to_pylist()
    for i, rec in enumerate(records, start=1):
        _numbered(path, f" row {i}", rec, i)
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PAR1":
        raise DataError(f"{path}: not a Parquet file (it does not start with the 'PAR1' magic bytes); "
                        "expected a file written by pyarrow, pandas or another Parquet writer")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    return _table_records(path, table)


def _read_arrow_file(path: Path) -> Any:
    import pyarrow as pa

    errors = []
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):  # datasets writes the stream format
        try:
            with pa.memory_map(str(path)) as source:
                return opener(source).read_all()
        except (pa.ArrowException, OSError) as e:
            errors.append(f"{opener.__name__}: {e}")
    raise DataError(f"{path}: not a readable Arrow file ({'; '.join(errors)})")


def _read_datasets_folder(path: Path) -> list[dict[str, Any]]:
    """A folder written by ``Dataset.save_to_disk`` (``state.json`` + ``*.arrow`` shards)."""
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path / 'dataset_dict.json'}: expected {{\"splits\": [...]}} ({e})") from e
        if "train" not in splits:
            raise DataError(f"{path}: a DatasetDict folder without a 'train' split; name a split folder "
                            f"instead, one of: {', '.join(str(s) for s in splits)}")
        return _read_datasets_folder(path / "train")
    state = path / "state.json"
    if not state.is_file():
        raise DataError(f"{path}: is a folder but not a saved `datasets` folder (no state.json or "
                        f"dataset_dict.json); expected a data file ({', '.join(SUPPORTED_SUFFIXES)}) or a "
                        "folder written by Dataset.save_to_disk")
    try:
        files = [d["filename"] for d in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: expected a `datasets` state file with a '_data_files' list ({e})") from e
    if not files:
        raise DataError(f"{path}: no records found; the folder lists no data files")
    tables = []
    for name in files:
        shard = path / name
        if not shard.is_file():
            raise DataError(f"{shard}: listed in {state.name} but missing")
        tables.append(_read_arrow_file(shard))
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowException as e:
        raise DataError(f"{path}: the shards do not share one schema ({e})") from e
    return _table_records(path, table)


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a folder (every file's relative path and bytes, in sorted order)."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode("utf-8") + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a JSONL, JSON, CSV or Parquet file, or a saved ``datasets`` folder.

    Raises :class:`DataError` for a missing, empty, non-UTF-8 or malformed file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    if p.is_dir():
        records = _read_datasets_folder(p)
    else:
        suffix = p.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise DataError(f"{p}: unsupported file type {suffix!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)} "
                            "or a saved `datasets` folder")
        if p.stat().st_size == 0:
            raise DataError(f"{p}: the file is empty; expected at least one record")
        if suffix == ".parquet":
            records = _read_parquet(p)
        else:
            text = _read_text(p)
            if not text.strip():
                raise DataError(f"{p}: the file is empty; expected at least one record")
            reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
            records = reader(p, text)
    if not records:
        raise DataError(f"{p}: no records found; expected at least one")
    return records
