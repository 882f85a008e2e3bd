"""Records in, token batches out: readers, record forms, chat templating, packing."""

from .dataset import PreparedData, SourceInfo, load_examples, prepare_data, resolve_data_path, sha256_file
from .formats import Example, detect_format, to_examples
from .packing import BatchSchedule, Row, collate, no_pack, pack
from .readers import DataError, read_records
from .templating import IGNORE_INDEX, Tokenized, render_prompt, tokenize_example, tokenize_examples

__all__ = [
    "BatchSchedule",
    "DataError",
    "Example",
    "IGNORE_INDEX",
    "PreparedData",
    "Row",
    "SourceInfo",
    "Tokenized",
    "collate",
    "detect_format",
    "load_examples",
    "no_pack",
    "pack",
    "prepare_data",
    "read_records",
    "render_prompt",
    "resolve_data_path",
    "sha256_file",
    "to_examples",
    "tokenize_example",
    "tokenize_examples",
]
