"""``qlorakit data check``: personal data, duplicates, evaluation-set overlap and licences, in one report.

:func:`load_source` reads a file into the examples the training loop would see; :func:`run_checks`
runs every check over one or more sources and returns a :class:`CheckReport` whose findings carry
the file and row they point at, a severity (``info``, ``warn``) and whether the policy makes them
blocking. The same report feeds the run's ledger (``data_manifest.json``).

Policies: licence findings that :func:`licences.licence_findings` marks as blocking (no licence,
non-commercial, share-alike, no-derivatives, a conflict with the base model) block under policy
``block`` and warn under ``warn``. PII, duplicates and contamination warn, unless named in
``fail_on``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .._files import as_created
from .contamination import DEFAULT_MIN_WORDS, DEFAULT_N, build_index, find_contamination
from .dedup import exact_duplicates, near_duplicates
from .formats import Example, detect_format, example_text, to_examples
from .licences import DEFAULT_BASE_LICENCE, licence_findings, lookup_licence, resolve_licence
from .pii import PII_KINDS, find_pii, mask, redact_record
from .readers import DataError, read_records, sha256_path

__all__ = ["CheckOptions", "CheckSource", "CheckReport", "load_source", "run_checks", "format_report",
           "write_fixed_copies", "FAIL_ON_CHOICES"]

FAIL_ON_CHOICES = ("pii", "duplicates", "contamination")


@dataclass
class CheckOptions:
    eval_sets: list[str] | None = None  # None: every known evaluation set
    ngram: int = DEFAULT_N
    min_words: int = DEFAULT_MIN_WORDS
    near_threshold: float = 0.8
    num_perm: int = 128
    policy: str = "warn"  # licence policy: 'warn' or 'block'
    fail_on: tuple[str, ...] = ()  # other checks whose findings block: 'pii', 'duplicates', 'contamination'
    base_licence: str = DEFAULT_BASE_LICENCE
    contamination: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.policy not in ("warn", "block"):
            problems.append(f"policy: expected 'warn' or 'block', got {self.policy!r}")
        bad = [f for f in self.fail_on if f not in FAIL_ON_CHOICES]
        if bad:
            problems.append(f"fail_on: unknown check(s) {', '.join(bad)}; expected some of {', '.join(FAIL_ON_CHOICES)}")
        if not 0.0 < self.near_threshold <= 1.0:
            problems.append(f"near_threshold: expected 0 < x <= 1, got {self.near_threshold}")
        if self.ngram < 1 or self.min_words < 1:
            problems.append(f"ngram and min_words: expected positive integers, got {self.ngram} and {self.min_words}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class CheckSource:
    """One file's examples, with what is known about where they came from."""

    path: str
    examples: list[Example]
    rows: int
    sha256: str
    licence: str = ""
    licence_from: str = ""  # declared | sidecar | manifest | ''
    origin: str = ""
    commercial_use: bool | None = None
    forms: dict[str, int] = field(default_factory=dict)
    records: list[dict[str, Any]] | None = None  # the raw records (for writing fixed copies)


def load_source(path: str | Path, *, form: str = "auto", fields: dict[str, str] | None = None,
                licence: str = "", origin: str = "", commercial_use: bool | None = None) -> CheckSource:
    """Read a data file (or ``datasets`` folder) into examples; raise :class:`DataError` naming file and row."""
    p = Path(path)
    records = read_records(p)
    examples = to_examples(records, p, form, fields)
    if form == "auto":
        mapped = [{fields.get(k, k): v for k, v in r.items()} if fields else r for r in records]
        forms = dict(Counter(str(detect_format(r)) for r in mapped))
    else:
        forms = {form: len(records)}
    spdx, where, how = resolve_licence(p, licence, origin)
    return CheckSource(str(p), examples, len(records), sha256_path(p), spdx, how, where, commercial_use, forms,
                       records)


# --------------------------------------------------------------------------------------------
# the report


@dataclass
class CheckReport:
    sources: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    counts: dict[str, Any]
    options: dict[str, Any]
    timings: dict[str, float]
    per_source: dict[str, dict[str, Any]]  # path -> counts of findings in that source
    contaminated: dict[str, set[int]] = field(default_factory=dict, repr=False)  # path -> rows

    @property
    def blocking(self) -> list[dict[str, Any]]:
        return [f for f in self.findings if f["blocking"]]

    def to_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "counts": self.counts, "blocking": len(self.blocking),
                "findings": self.findings, "options": self.options, "timings": self.timings,
                "per_source": self.per_source}


def _ref(ex: Example) -> dict[str, Any]:
    return {"source": ex.source, "row": ex.line}


def _rows_by_source(refs: Iterable[dict[str, Any]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for r in refs:
        if r["row"] not in out[r["source"]]:
            out[r["source"]].append(r["row"])
    return dict(out)


def run_checks(sources: list[CheckSource], options: CheckOptions | None = None) -> CheckReport:
    """Every check over the examples of ``sources`` (duplicates are found across sources too)."""
    opt = options or CheckOptions()
    examples = [ex for s in sources for ex in s.examples]
    texts = [example_text(ex) for ex in examples]
    findings: list[dict[str, Any]] = []
    per_source: dict[str, dict[str, Any]] = {
        s.path: {"pii": {}, "placeholders": {}, "exact_duplicates": 0, "near_duplicates": 0, "contamination": {}}
        for s in sources}
    timings: dict[str, float] = {}

    # pass 1: personal data and exact duplicates (one regex scan and one hash per record)
    t0, c0 = time.perf_counter(), time.process_time()
    pii_hits: dict[tuple[str, str, bool], list[dict[str, Any]]] = defaultdict(list)
    for ex, text in zip(examples, texts):
        for m in find_pii(text):
            pii_hits[(ex.source, m.kind, m.placeholder)].append(
                {"row": ex.line, "detail": m.detail, "preview": mask(m.value)})
    for (src, kind, placeholder), hits in sorted(pii_hits.items()):
        rows = sorted({h["row"] for h in hits})
        bucket = "placeholders" if placeholder else "pii"
        per_source[src][bucket][kind] = len(hits)
        if placeholder:
            msg = (f"{src}: {len(hits)} reserved or fictional {kind.replace('_', ' ')} value(s) in {len(rows)} "
                   "record(s) (documentation domains, 555 numbers, private IPs); not counted as personal data")
            findings.append(_finding("pii", f"placeholder_{kind}", "info", False, msg, src, rows, hits))
        else:
            msg = f"{src}: {len(hits)} {kind.replace('_', ' ')}(s) in {len(rows)} record(s)"
            findings.append(_finding("pii", kind, "warn", "pii" in opt.fail_on, msg, src, rows, hits))
    exact = exact_duplicates(texts)
    timings["pii_exact_s"] = time.perf_counter() - t0
    timings["pii_exact_cpu_s"] = time.process_time() - c0

    # pass 2: near duplicates and contamination
    t1, c1 = time.perf_counter(), time.process_time()
    dup_blocks = "duplicates" in opt.fail_on
    drop = {i for g in exact for i in g.members[1:]}
    near = near_duplicates(texts, opt.near_threshold, num_perm=opt.num_perm, exclude=drop)
    for g in exact + near:
        refs = [_ref(examples[i]) for i in g.members]
        for r in refs[1:]:
            per_source[r["source"]][f"{g.kind}_duplicates"] += 1
        where = "; ".join(f"{src} rows {_short(rows)}" for src, rows in _rows_by_source(refs).items())
        what = "exact duplicates" if g.kind == "exact" else f"near duplicates (Jaccard similarity {g.similarity:.2f})"
        findings.append({"check": "duplicates", "kind": g.kind, "severity": "warn", "blocking": dup_blocks,
                         "message": f"{len(refs)} {what}: {where}", "members": refs, "similarity": g.similarity,
                         "count": len(refs) - 1})
    contaminated: dict[str, set[int]] = defaultdict(set)
    hits_by_set: dict[str, list[dict[str, Any]]] = defaultdict(list)
    index = None
    if opt.contamination:
        index = build_index(opt.eval_sets, n=opt.ngram, min_words=opt.min_words)
        for c in find_contamination(texts, index):
            ex = examples[c.record]
            contaminated[ex.source].add(ex.line)
            hits_by_set[c.eval_set].append({"source": ex.source, "row": ex.line, "items": c.items[:5],
                                            "ngram": c.ngram})
        for set_name in index.sets:
            hits = hits_by_set.get(set_name, [])
            for h in hits:
                cs = per_source[h["source"]]["contamination"]
                cs[set_name] = cs.get(set_name, 0) + 1
            if hits:
                where = "; ".join(f"{src} rows {_short(rows)}" for src, rows in _rows_by_source(hits).items())
                findings.append({"check": "contamination", "kind": set_name, "severity": "warn",
                                 "blocking": "contamination" in opt.fail_on,
                                 "message": f"{len(hits)} training record(s) overlap {set_name} "
                                            f"({index.n}-grams): {where}",
                                 "count": len(hits), "hits": hits})
        for set_name, why in index.skipped.items():
            findings.append({"check": "contamination", "kind": "skipped", "severity": "info", "blocking": False,
                             "message": f"{set_name}: not checked ({why})", "count": 0})
    timings["near_contamination_s"] = time.perf_counter() - t1
    timings["near_contamination_cpu_s"] = time.process_time() - c1

    # licences
    lic_in = [{"path": s.path, "licence": s.licence, "commercial_use": s.commercial_use} for s in sources]
    for f in licence_findings(lic_in, opt.base_licence):
        would_block = f["severity"] == "block"
        f["severity"] = "warn" if would_block else "info"
        f["blocking"] = would_block and opt.policy == "block"
        findings.append(f)

    counts = {
        "records": len(examples),
        "pii": {k: sum(len(h) for (_, kind, ph), h in pii_hits.items() if kind == k and not ph) for k in PII_KINDS},
        "pii_records": len({(s, h["row"]) for (s, _, ph), hs in pii_hits.items() if not ph for h in hs}),
        "placeholders": sum(len(h) for (_, _, ph), h in pii_hits.items() if ph),
        "exact_duplicate_groups": len(exact),
        "exact_duplicate_records": sum(len(g.members) - 1 for g in exact),
        "near_duplicate_groups": len(near),
        "near_duplicate_records": sum(len(g.members) - 1 for g in near),
        "contaminated_records": sum(len(r) for r in contaminated.values()),
        # records overlapping each evaluation set (0 for a set that was checked and is clean)
        "contamination": {name: len({(h["source"], h["row"]) for h in hits_by_set.get(name, [])})
                          for name in (index.sets if index is not None else [])},
        "licence": dict(Counter(f["kind"] for f in findings if f["check"] == "licence")),
    }
    srcs = []
    for s in sources:
        info = lookup_licence(s.licence)
        srcs.append({"path": s.path, "sha256": s.sha256, "rows": s.rows, "examples": len(s.examples),
                     "forms": s.forms, "licence": s.licence, "licence_from": s.licence_from,
                     "licence_name": info.name if info else "", "origin": s.origin,
                     "commercial_use": s.commercial_use})
    options_out = {"eval_sets": index.sets if index is not None else [], "ngram": opt.ngram,
                   "min_words": opt.min_words, "near_threshold": opt.near_threshold, "policy": opt.policy,
                   "fail_on": list(opt.fail_on), "base_licence": opt.base_licence}
    return CheckReport(srcs, findings, counts, options_out, {k: round(v, 4) for k, v in timings.items()},
                       per_source, dict(contaminated))


def _finding(check: str, kind: str, severity: str, blocking: bool, message: str, source: str,
             rows: list[int], hits: list[dict[str, Any]]) -> dict[str, Any]:
    return {"check": check, "kind": kind, "severity": severity, "blocking": blocking, "message": message,
            "source": source, "rows": rows, "count": len(hits), "hits": hits}


def _short(rows: list[int], limit: int = 12) -> str:
    rows = sorted(rows)
    head = ", ".join(str(r) for r in rows[:limit])
    return head + (f", … ({len(rows) - limit} more)" if len(rows) > limit else "")


# --------------------------------------------------------------------------------------------
# human-readable output


_SECTIONS = (("licence", "Licences"), ("pii", "Personal data and secrets"), ("duplicates", "Duplicates"),
             ("contamination", "Overlap with evaluation sets"))


def format_report(report: CheckReport, *, max_items: int = 20) -> str:
    c = report.counts
    lines = [f"qlorakit data check: {len(report.sources)} source(s), {c['records']} record(s)", ""]
    for s in report.sources:
        lic = s["licence"] or "no licence"
        how = f" (from {s['licence_from']})" if s["licence_from"] else ""
        forms = ", ".join(f"{k} {v}" for k, v in s["forms"].items())
        lines.append(f"  {s['path']}: {s['rows']} rows, {s['examples']} examples ({forms}); "
                     f"licence {lic}{how}; sha256 {s['sha256'][:16]}")
    for check, title in _SECTIONS:
        fs = [f for f in report.findings if f["check"] == check]
        lines += ["", title]
        if check == "duplicates":
            lines.append(f"  exact: {c['exact_duplicate_groups']} group(s), {c['exact_duplicate_records']} extra "
                         f"record(s); near (Jaccard >= {report.options['near_threshold']}): "
                         f"{c['near_duplicate_groups']} group(s), {c['near_duplicate_records']} extra record(s)")
        if check == "contamination" and report.options["eval_sets"]:
            per = ", ".join(f"{k} {v}" for k, v in c["contamination"].items())
            lines.append(f"  {report.options['ngram']}-gram overlap, records per evaluation set: {per}")
        if not fs:
            lines.append("  none found")
        for f in fs[:max_items]:
            tag = "BLOCK" if f["blocking"] else f["severity"].upper()
            lines.append(f"  {tag:5s} {f['message']}")
            if check == "pii" and f["severity"] != "info":
                lines.append(f"        rows {_short(f['rows'])}")
            if check == "contamination":
                for h in f.get("hits", [])[:3]:
                    lines.append(f"        {Path(h['source']).name} row {h['row']} ~ {h['items'][0]}: \"{h['ngram']}\"")
        if len(fs) > max_items:
            lines.append(f"  … {len(fs) - max_items} more (see --json)")
    nb = len(report.blocking)
    lines += ["", f"{nb} blocking finding(s) (licence policy {report.options['policy']}"
              + (f", failing on {', '.join(report.options['fail_on'])}" if report.options["fail_on"] else "")
              + ")" + ("" if nb else "; nothing blocks")]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# fixed copies: masked personal data, contaminated records dropped


def _plain(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k != "_line"}


def _serialise(path: Path, records: list[dict[str, Any]]) -> bytes:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode("utf-8")
    if suffix == ".json":
        return (json.dumps(records, ensure_ascii=False, indent=1, default=str) + "\n").encode("utf-8")
    if suffix == ".csv":
        cols = list(dict.fromkeys(k for r in records for k in r))
        for r in records:
            for k, v in r.items():
                if isinstance(v, (dict, list)):
                    raise DataError(f"{path}: field '{k}' holds nested data, which CSV cannot; write .jsonl instead")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(records)
        return buf.getvalue().encode("utf-8")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(records), sink)
        return sink.getvalue().to_pybytes()
    raise DataError(f"{path}: cannot write {suffix!r}; expected .jsonl, .json, .csv or .parquet")


def _write_all_atomic(files: dict[Path, bytes]) -> None:
    """Write every file under a temporary name first, then rename them all: no half-written output."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            as_created(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_fixed_copies(sources: list[CheckSource], report: CheckReport, out: str | Path, *, redact: bool,
                       drop_contaminated: bool) -> dict[str, Any]:
    """Write each source's records with PII masked and/or contaminated records dropped.

    With one source ``out`` is the output file; with several it is a folder that receives one file
    per source, named as the source. Returns what was written: paths, records kept, values masked.
    """
    out = Path(out)
    if not redact and not drop_contaminated:
        raise ValueError("nothing to write: neither redact nor drop_contaminated")
    targets: dict[Path, CheckSource] = {}
    if len(sources) == 1 and not out.is_dir():
        targets[out] = sources[0]
    else:
        if out.exists() and not out.is_dir():
            raise DataError(f"{out}: with several input files the output must be a folder")
        for s in sources:
            t = out / Path(s.path).name
            if t in targets:
                raise DataError(f"{out}: two inputs are named {t.name}; check them one at a time")
            targets[t] = s
    files: dict[Path, bytes] = {}
    summary: dict[str, Any] = {"files": [], "masked": 0, "dropped": 0, "kept": 0}
    for path, s in targets.items():
        if path.resolve() == Path(s.path).resolve():
            raise DataError(f"{path}: the output would overwrite its input; choose another path")
        if s.records is None:
            raise DataError(f"{s.path}: the raw records are not loaded; cannot write a copy")
        bad = report.contaminated.get(s.path, set()) if drop_contaminated else set()
        kept = []
        for rec in s.records:
            if rec.get("_line") in bad:
                summary["dropped"] += 1
                continue
            if redact:
                rec, n = redact_record(rec)
                summary["masked"] += n
            kept.append(_plain(rec))
        summary["kept"] += len(kept)
        files[path] = _serialise(path, kept)
        summary["files"].append(str(path))
    _write_all_atomic(files)
    return summary
