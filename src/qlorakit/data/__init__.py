"""Records in, token batches out: readers, record forms, chat templating, packing.

And data you can vouch for: personal data and secrets (:mod:`.pii`), exact and near duplicates
(:mod:`.dedup`), overlap with evaluation sets (:mod:`.contamination`), licence terms
(:mod:`.licences`), all run by ``qlorakit data check`` (:mod:`.check`, :mod:`.cli`), and the run's
provenance ledger ``data_manifest.json`` (:mod:`.ledger`).
"""

from .dataset import PreparedData, SourceInfo, load_examples, prepare_data, resolve_data_path, sha256_file
from .formats import Example, detect_format, to_examples
from .packing import BatchSchedule, Row, collate, no_pack, pack
from .readers import DataError, read_records, sha256_path
from .templating import IGNORE_INDEX, Tokenized, render_prompt, tokenize_example, tokenize_examples

# data you can vouch for: checks, licences, the run's ledger, the `qlorakit data` command
from .check import CheckOptions, CheckReport, load_source, run_checks
from .cli import data_main
from .ledger import LicenceError, adapter_metadata, build_ledger, licence_gate, terms_markdown
from .licences import lookup_licence, resolve_licence
from .pii import find_pii, redact

__all__ = [
    "BatchSchedule",
    "CheckOptions",
    "CheckReport",
    "LicenceError",
    "adapter_metadata",
    "build_ledger",
    "data_main",
    "find_pii",
    "licence_gate",
    "load_source",
    "lookup_licence",
    "redact",
    "resolve_licence",
    "run_checks",
    "sha256_path",
    "terms_markdown",
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
