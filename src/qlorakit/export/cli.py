"""``qlorakit export``: merged, PEFT, GGUF and Ollama exports, each checked against its source.

    qlorakit export RUN_DIR --format {merged,peft,gguf,ollama} [--dtype ...] [--quant ...] -o OUT
    qlorakit export --check OUT            run the parity check again on an export

Exit codes: 0 the export passed its check; 1 it was written but failed the check (it lies in
OUT.failed, with the reasons in its export_report.json); 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .common import FORMATS, GGUF_QUANTS, MERGED_DTYPES, ExportError

if TYPE_CHECKING:
    from .api import ExportResult

__all__ = ["export_main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlorakit export",
        description="Export a trained run and check the export against the tuned model (golden prompts from the "
                    "held-out data, greedy, token agreement and held-out loss).",
        epilog="Overrides of the parity thresholds go after the options, e.g. export.max_token_disagreement=0.1. "
               "Exit codes: 0 passed, 1 failed its check (left in OUT.failed), 2 bad input.")
    p.add_argument("target", help="RUN_DIR to export, or with --check the export folder OUT")
    p.add_argument("overrides", nargs="*", help="export.* recipe keys, key=value")
    p.add_argument("--format", "-f", dest="fmt", metavar="FORMAT", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--dtype", help=f"merged: {', '.join(MERGED_DTYPES)} (default bf16; nf4 is lossy and measured)")
    p.add_argument("--quant", help=f"gguf/ollama: {', '.join(GGUF_QUANTS)} (default q8_0)")
    p.add_argument("-o", "--out", help="output folder (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--check", action="store_true", help="run the parity check again on the export folder TARGET")
    p.add_argument("--run", metavar="RUN_DIR", help="with --check: the run folder, if it moved since the export")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (not allowed with --dtype nf4)")
    p.add_argument("--no-measure", action="store_true", help="skip the on-device measurements")
    p.add_argument("--runtime", default="auto", choices=["auto", "llama.cpp", "transformers"],
                   help="what runs GGUF files in the check: llama.cpp (llama-cpp-python), or transformers reading "
                        "the file back; auto takes llama.cpp when installed")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _print_result(res: ExportResult, verb: str) -> None:
    for r in res.reports:
        print(r.summary())
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for n in res.notes:
        print(f"note: {n}")
    if res.passed and res.report.get("status") == "unchecked":
        print(f"{verb} written, not checked (--no-check): {res.out}")
    elif res.passed:
        print(f"{verb} passed: {res.out}")
    else:
        print(f"qlorakit export: {verb} FAILED ({res.out}):", file=sys.stderr)
        for reason in res.reasons:
            print(f"  - {reason}", file=sys.stderr)


def export_main(argv: list[str]) -> int:
    p = build_parser()
    a = p.parse_intermixed_args(argv)
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("qlorakit.export").setLevel(logging.INFO if a.verbose else logging.WARNING)
    from .api import check_export, export_run

    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        raise ExportError(f"unexpected arguments {bad}; expected export.* key=value overrides after the run folder")
    if a.check:
        extra = [n for n, v in (("--format", a.fmt), ("--dtype", a.dtype), ("--quant", a.quant), ("-o", a.out))
                 if v is not None]
        if extra:
            raise ExportError(f"--check reads the format and types from TARGET/export_report.json; drop {', '.join(extra)}")
        res = check_export(a.target, run_dir=a.run, runtime=a.runtime, overrides=a.overrides)
        _print_result(res, "check")
        return 0 if res.passed else 1
    if not a.fmt:
        raise ExportError(f"--format is required: one of {', '.join(FORMATS)}")
    if not a.out:
        raise ExportError("-o OUT is required: the folder to write the export to")
    if a.run:
        raise ExportError("--run goes with --check")
    res = export_run(a.target, a.fmt, a.out, dtype=a.dtype, quant=a.quant, force=a.force, check=not a.no_check,
                     measure=not a.no_measure, runtime=a.runtime, overrides=a.overrides)
    _print_result(res, "export")
    return 0 if res.passed else 1
