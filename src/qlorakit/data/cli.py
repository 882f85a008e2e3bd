"""``qlorakit data``: look at training data and check it before it trains anything.

    qlorakit data inspect FILE... [--tokenizer BASE] [--max-seq-len N] [--plot PNG] [--json]
    qlorakit data check FILE... [--eval-sets NAMES] [--json] [--policy warn|block] [--licence SPDX]
                                [--redact OUT] [--drop-contaminated OUT] [--fail-on KINDS]
    qlorakit data check --recipe RECIPE.yaml      the recipe's sources, licences and licence policy

Exit codes of ``check``: 0 when nothing blocks, 1 when a finding is blocking under the policy, 2
when the input cannot be read (the message names the file and row).

Other modules add subcommands with :func:`register_subcommand`, or by being listed in
:data:`PLUGINS` with a ``register(subparsers)`` function: ``data_main`` imports them when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from typing import Any

from ..cli import number_arg
from .readers import DataError

__all__ = ["data_main", "build_parser", "register_subcommand", "PLUGINS"]

# "module:function" of subcommands defined elsewhere; each function is called with the subparsers
# object and registers its own parser (setting ``func`` to a callable(args) -> int)
PLUGINS: list[str] = ["qlorakit.data.feedback:register"]

_REGISTERED: list[Callable[[Any], None]] = []


def register_subcommand(setup: Callable[[Any], None]) -> Callable[[Any], None]:
    """Add a subcommand: ``setup(subparsers)`` adds a parser and sets ``func`` (args -> exit code)."""
    _REGISTERED.append(setup)
    return setup


def _fields(items: list[str]) -> dict[str, str] | None:
    out = {}
    for it in items or []:
        src, sep, dst = it.partition("=")
        if not sep or not src or not dst:
            raise DataError(f"--field {it!r}: expected THEIRS=OURS, e.g. --field prompt=instruction")
        out[src] = dst
    return out or None


def _add_input_args(p: argparse.ArgumentParser, *, optional: bool = False) -> None:
    p.add_argument("files", nargs="*" if optional else "+", metavar="FILE",
                   help="JSONL, JSON, CSV or Parquet files, or saved `datasets` folders")
    p.add_argument("--format", default="auto", choices=["auto", "instruction", "chat", "completion"],
                   help="record form; 'auto' detects it per record")
    p.add_argument("--field", action="append", default=[], metavar="THEIRS=OURS",
                   help="map a column onto ours, e.g. --field prompt=instruction --field response=output")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _inspect(a: argparse.Namespace) -> int:
    from .inspect import format_inspect, inspect_file, load_tokenizer, plot_lengths

    fields = _fields(a.field)
    tok = None if a.no_tokens else load_tokenizer(a.tokenizer)
    results = [inspect_file(f, tok, max_seq_len=a.max_seq_len, form=a.format, fields=fields) for f in a.files]
    plot = None
    if tok is not None and a.plot != "none":
        plot = str(plot_lengths(results, a.plot))
    if a.json:
        for r in results:
            r.pop("lengths", None)
        print(json.dumps({"files": results, "plot": plot}, indent=2))
    else:
        print("\n\n".join(format_inspect(r) for r in results))
        if plot:
            print(f"\nhistogram of token lengths: {plot}")
    return 0


def _check(a: argparse.Namespace) -> int:
    from .check import CheckOptions, format_report, load_source, run_checks, write_fixed_copies

    if a.drop_contaminated and a.no_contamination:
        raise DataError("--drop-contaminated drops the records that overlap evaluation sets, which "
                        "--no-contamination does not look for; give one of the two")
    fields = _fields(a.field)
    try:
        opts = CheckOptions(
            eval_sets=[s.strip() for s in a.eval_sets.split(",") if s.strip()] if a.eval_sets else None,
            ngram=a.ngram, min_words=a.min_words, near_threshold=a.near_threshold, policy=a.policy or "warn",
            fail_on=tuple(s.strip() for s in a.fail_on.split(",") if s.strip()) if a.fail_on else (),
            base_licence=a.base_licence, contamination=not a.no_contamination)
    except ValueError as e:
        raise DataError(str(e)) from e
    sources = [load_source(f, form=a.format, fields=fields, licence=a.licence or "", origin=a.origin or "")
               for f in a.files]
    if a.recipe:
        sources += _recipe_sources(a.recipe, opts, policy_given=a.policy is not None)
    if not sources:
        raise DataError("name at least one FILE, or --recipe RECIPE.yaml")
    report = run_checks(sources, opts)
    written = []
    outs: dict[str, dict[str, bool]] = {}
    if a.redact:
        outs.setdefault(a.redact, {"redact": False, "drop_contaminated": False})["redact"] = True
    if a.drop_contaminated:
        outs.setdefault(a.drop_contaminated, {"redact": False, "drop_contaminated": False})["drop_contaminated"] = True
    for out, what in outs.items():
        summary = write_fixed_copies(sources, report, out, **what)
        written.append({"out": out, **what, **summary})
    if a.json:
        print(json.dumps(report.to_dict() | {"written": written}, indent=2, default=str))
    else:
        print(format_report(report))
        for w in written:
            did = " and ".join(x for x, on in (("PII masked", w["redact"]),
                                                ("contaminated records dropped", w["drop_contaminated"])) if on)
            print(f"wrote {', '.join(w['files'])}: {w['kept']} records kept, {w['dropped']} dropped, "
                  f"{w['masked']} values masked ({did})")
    return 1 if report.blocking else 0


def _recipe_sources(path: str, opts: Any, *, policy_given: bool) -> list[Any]:
    """The training sources a recipe declares, with their licences; its licence policy unless --policy."""
    from ..config import RecipeError, load_recipe
    from .check import load_source
    from .dataset import resolve_data_path

    try:
        data = load_recipe(path).data
    except RecipeError as e:
        raise DataError(str(e)) from e
    if not policy_given:
        opts.policy = data.licence_policy
    if data.sources:
        return [load_source(resolve_data_path(s.path), form=s.format if s.format != "auto" else data.format,
                            fields=s.fields or None, licence=s.licence, origin=s.origin,
                            commercial_use=s.commercial_use) for s in data.sources]
    sample = data.train == "sample"
    return [load_source(resolve_data_path(data.train), form=data.format,
                        licence="Apache-2.0" if sample else "",
                        origin="qlorakit sample data (fictional customer support)" if sample else "")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlorakit data", description="Look at and check training data.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("inspect", help="rows, form, fields, token lengths and packing of data files",
                        description="Rows, detected form, fields, token lengths under the base tokenizer "
                                    "(with a histogram plot) and how many examples packing fits per sequence.")
    _add_input_args(pi)
    pi.add_argument("--tokenizer", default="default",
                    help="base model whose tokenizer and chat template count the tokens: 'default', a HF folder or a .gguf")
    pi.add_argument("--max-seq-len", type=number_arg(int, 16), default=512, help="sequence length for the packing estimate")
    pi.add_argument("--plot", default="token_lengths.png", help="where to write the histogram PNG ('none': no plot)")
    pi.add_argument("--no-tokens", action="store_true", help="skip tokenizing (no tokenizer is loaded)")
    pi.set_defaults(func=_inspect)

    pc = sub.add_parser("check", help="PII, duplicates, overlap with evaluation sets, licences",
                        description="Find personal data and secrets, exact and near duplicates, n-gram overlap "
                                    "with the evaluation sets, and licence terms. Exit 1 when a finding blocks.")
    _add_input_args(pc, optional=True)
    pc.add_argument("--recipe", metavar="RECIPE.yaml",
                    help="also check the training sources the recipe declares, with their licences and its policy")
    pc.add_argument("--eval-sets", metavar="NAMES",
                    help="comma-separated evaluation sets (mmlu, hellaswag, truthfulqa, bbq, advbench, xstest, "
                         "bipia, bipia_attacks) or files; default: all")
    pc.add_argument("--ngram", type=int, default=13, help="n-gram length for contamination (13, as in GPT-3)")
    pc.add_argument("--min-words", type=int, default=8, help="shorter evaluation items are not checked")
    pc.add_argument("--near-threshold", type=float, default=0.8, help="Jaccard similarity for near duplicates")
    pc.add_argument("--no-contamination", action="store_true", help="skip the evaluation-set overlap check")
    pc.add_argument("--policy", choices=["warn", "block"], default=None,
                    help="licence policy: 'block' makes licence findings blocking (exit 1); default: the "
                         "recipe's data.licence_policy, else 'warn'")
    pc.add_argument("--fail-on", metavar="CHECKS", help="also block on: pii, duplicates, contamination (comma-separated)")
    pc.add_argument("--licence", "--license", dest="licence", metavar="SPDX",
                    help="licence of the files (otherwise a <file>.licence sidecar or the shared data manifest)")
    pc.add_argument("--origin", help="where the files came from")
    pc.add_argument("--base-licence", default="Apache-2.0", metavar="SPDX", help="licence of the base model")
    pc.add_argument("--redact", metavar="OUT", help="write a copy with personal data and secrets masked")
    pc.add_argument("--drop-contaminated", metavar="OUT", help="write a copy without the contaminated records")
    pc.set_defaults(func=_check)

    for setup in _plugins():
        setup(sub)
    return p


def _plugins() -> list[Callable[[Any], None]]:
    out = list(_REGISTERED)
    for spec in PLUGINS:
        mod, _, fn = spec.partition(":")
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # that subcommand is not installed (yet)
                continue
            raise
        out.append(getattr(module, fn))
    return out


def data_main(argv: list[str]) -> int:
    """Entry point of ``qlorakit data``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DataError as e:
        print(f"qlorakit data {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m qlorakit.data.cli check FILE ...
    sys.exit(data_main(sys.argv[1:]))
