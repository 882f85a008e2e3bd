"""The provenance ledger of a run (``data_manifest.json``) and the terms it puts on the adapter.

:func:`build_ledger` records, per source, its sha256, the rows read and used, its licence and where
that licence was found, and the counts of every finding of :mod:`qlorakit.data.check` over the
records that train; and it derives the *effective terms* of the adapter trained on them: whether
commercial use is allowed, whether a share-alike licence must be carried, who must be credited, in
plain sentences. :func:`licence_gate` refuses a run under policy ``block``; :func:`terms_markdown`
and :func:`adapter_metadata` put the same terms into the model card and the adapter's metadata.

The training loop calls, before it creates the run folder::

    ledger = build_ledger(recipe.data, prepared, base_licence)
    licence_gate(ledger, recipe.data.licence_policy)       # raises LicenceError under 'block'
    ledger["adapter_metadata"] = adapter_metadata(ledger)  # safetensors header / adapter_config.json
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .check import CheckOptions, CheckSource, run_checks
from .dataset import resolve_data_path
from .licences import DEFAULT_BASE_LICENCE, lookup_licence, normalise_spdx, resolve_licence
from .readers import DataError

__all__ = ["LicenceError", "build_ledger", "licence_gate", "terms_markdown", "adapter_metadata", "LEDGER_VERSION"]

log = logging.getLogger(__name__)

LEDGER_VERSION = 1


class LicenceError(DataError):
    """The licence policy forbids training on these sources; the message says which and why."""


def _licence_flags(spdx: str) -> dict[str, Any]:
    info = lookup_licence(spdx)
    if info is None:
        return {"known": False, "commercial": None, "share_alike": False, "attribution": False,
                "copyleft": False, "no_derivatives": False}
    return {"known": info.known, "commercial": info.commercial, "share_alike": info.share_alike,
            "attribution": info.attribution, "copyleft": info.copyleft, "no_derivatives": info.no_derivatives}


def build_ledger(cfg: DataConfig, prepared: Any, base_licence: str = DEFAULT_BASE_LICENCE) -> dict[str, Any]:
    """The content of ``data_manifest.json`` for ``prepared`` (a :class:`PreparedData`).

    The checks run over the training examples, each counted once however often its source's weight
    repeats it; duplicates and overlap with evaluation sets are found across all sources together.
    """
    t0 = time.perf_counter()
    base = normalise_spdx(base_licence) or DEFAULT_BASE_LICENCE
    train_infos = [s for s in prepared.sources if getattr(s, "role", "train") == "train"]
    eval_infos = [s for s in prepared.sources if getattr(s, "role", "train") != "train"]
    declared = {str(resolve_data_path(s.path)): s for s in (cfg.sources or [])}

    # the training examples of each source, each once (weights repeat the same objects)
    by_source: dict[str, list[Any]] = {str(s.path): [] for s in train_infos}
    seen: set[int] = set()
    for ex in prepared.train_examples:
        if id(ex) in seen:
            continue
        seen.add(id(ex))
        by_source.setdefault(str(ex.source), []).append(ex)

    check_sources = []
    resolved: dict[str, tuple[str, str, str]] = {}
    for s in train_infos:
        spdx, origin, how = resolve_licence(s.path, s.licence or "", s.origin or "")
        resolved[str(s.path)] = (spdx, origin, how)
        check_sources.append(CheckSource(str(s.path), by_source.get(str(s.path), []), s.rows, s.sha256, spdx, how,
                                         origin, s.commercial_use))
    report = run_checks(check_sources, CheckOptions(policy=cfg.licence_policy, base_licence=base))

    sources = []
    for s in train_infos:
        spdx, origin, how = resolved[str(s.path)]
        src_cfg = declared.get(str(s.path))
        sources.append({
            "path": str(s.path), "role": "train", "sha256": s.sha256, "rows": s.rows, "rows_used": s.rows_used,
            "rows_held_out": s.rows_held_out, "weight": src_cfg.weight if src_cfg is not None else 1.0,
            "licence": spdx, "licence_from": how, "licence_name": (lookup_licence(spdx).name if spdx else ""),
            "licence_flags": _licence_flags(spdx), "origin": origin, "commercial_use": s.commercial_use,
            "findings": report.per_source.get(str(s.path), {}),
        })
    for s in eval_infos:
        spdx, origin, how = resolve_licence(s.path, s.licence or "", s.origin or "")
        sources.append({"path": str(s.path), "role": "eval", "sha256": s.sha256, "rows": s.rows,
                        "rows_used": s.rows_used, "licence": spdx, "licence_from": how, "origin": origin})

    licence_items = [{k: f[k] for k in ("kind", "severity", "blocking", "message", "source", "licence")}
                     for f in report.findings if f["check"] == "licence"]
    ledger: dict[str, Any] = {
        "version": LEDGER_VERSION,
        "base_licence": base,
        "licence_policy": cfg.licence_policy,
        "sources": sources,
        "findings": {
            "counts": report.counts,
            "licence": licence_items,
            "duplicates": [{"kind": f["kind"], "similarity": f["similarity"], "members": f["members"]}
                           for f in report.findings if f["check"] == "duplicates"][:200],
            "contamination": {f["kind"]: [{"source": h["source"], "row": h["row"], "items": h["items"]}
                                          for h in f["hits"]][:200]
                              for f in report.findings if f["check"] == "contamination" and f["kind"] != "skipped"},
            "pii_rows": {f"{f['source']}:{f['kind']}": f["rows"][:200]
                         for f in report.findings if f["check"] == "pii" and f["severity"] != "info"},
        },
        "checks": report.options | {"seconds": round(time.perf_counter() - t0, 3)},
    }
    ledger["effective_terms"] = _effective_terms(sources, base, licence_items)
    return ledger


def _effective_terms(sources: list[dict[str, Any]], base: str, licence_items: list[dict[str, Any]]) -> dict[str, Any]:
    train = [s for s in sources if s["role"] == "train"]
    notes: list[str] = []
    base_info = lookup_licence(base)
    commercial = bool(base_info and base_info.commercial)
    if not commercial:
        notes.append(f"The base model's licence ({base}) does not allow commercial use, so neither does the adapter.")
    share_alike: list[str] = []
    attribution: list[dict[str, str]] = []
    non_commercial: list[str] = []
    unknown: list[str] = []
    for s in train:
        name, spdx, flags = Path(s["path"]).name, s["licence"], s["licence_flags"]
        declared = s.get("commercial_use")
        if not spdx or not flags["known"]:
            unknown.append(name)
            if declared is not True:
                commercial = False
        elif declared is False or (not flags["commercial"] and declared is not True):
            commercial = False
            non_commercial.append(f"{name} ({spdx})")
        if flags["share_alike"]:
            share_alike.append(spdx)
        if flags["attribution"]:
            attribution.append({"source": name, "licence": spdx, "origin": s.get("origin", "")})
        if flags["no_derivatives"]:
            notes.append(f"{name} is under {spdx}, which forbids adaptations: the adapter may not be shared.")
    for n in non_commercial:
        notes.append(f"Trained on {n}, a non-commercial source: the adapter may not be used commercially.")
    for n in unknown:
        notes.append(f"{n} has no licence qlorakit can vouch for: its terms, and so the adapter's, are unknown.")
    sa = sorted(set(share_alike))
    for spdx in sa:
        who = ", ".join(Path(s["path"]).name for s in train if s["licence"] == spdx)
        notes.append(f"Trained on {who} under the share-alike licence {spdx}: if you share the adapter, you must "
                     f"share it under {spdx} too.")
    if attribution:
        credits = "; ".join(f"{a['source']} ({a['licence']}{', ' + a['origin'] if a['origin'] else ''})"
                            for a in attribution)
        notes.append(f"Credit these sources when you share the adapter: {credits}.")
    for f in licence_items:
        if f["kind"] == "conflict":
            notes.append("Licence conflict: " + f["message"])
    if commercial and not sa and not unknown:
        notes.insert(0, "Every source allows commercial use; the adapter may be used commercially.")
    if len(sa) == 1:
        adapter_licence = sa[0]
    elif len(sa) > 1 or unknown:
        adapter_licence = "unresolved"
    elif non_commercial:
        adapter_licence = non_commercial[0].split("(")[-1].rstrip(")")  # the first non-commercial licence
    else:
        adapter_licence = base
    return {
        "commercial_use": commercial,
        "share_alike": bool(sa),
        "licences": sorted({s["licence"] for s in train if s["licence"]}),
        "base_licence": base,
        "adapter_licence": adapter_licence,
        "attribution_required": bool(attribution),
        "attribution": attribution,
        # the licence findings that policy 'block' refuses (under 'warn' they are stated, not enforced)
        "would_block": [f["message"] for f in licence_items if f["severity"] == "warn"],
        "notes": notes,
    }


def licence_gate(ledger: dict[str, Any], policy: str) -> None:
    """Under policy ``block``, raise :class:`LicenceError` naming every blocking licence finding.

    Under ``warn`` the same findings are logged as warnings and the run goes on.
    """
    if policy not in ("warn", "block"):
        raise DataError(f"data.licence_policy: expected 'warn' or 'block', got {policy!r}")
    problems = ledger.get("effective_terms", {}).get("would_block", [])
    if not problems:
        return
    if policy == "block":
        raise LicenceError(
            f"data.licence_policy is 'block' and {len(problems)} licence finding(s) block this run:\n  - "
            + "\n  - ".join(problems)
            + "\nRemove or replace those sources, declare the right licence in data.sources[].licence, or set "
              "data.licence_policy=warn to train anyway (the terms are then stated in the model card)."
        )
    for p in problems:
        log.warning("licence: %s", p)


def _yes(b: Any) -> str:
    return "yes" if b else "no"


def _finding_words(f: dict[str, Any]) -> str:
    pii = sum(f.get("pii", {}).values())
    kinds = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(f.get("pii", {}).items()))
    cont = sum(f.get("contamination", {}).values())
    parts = [f"personal data: {pii}" + (f" ({kinds})" if kinds else ""),
             f"duplicates: {f.get('exact_duplicates', 0)} exact, {f.get('near_duplicates', 0)} near",
             f"overlap with evaluation sets: {cont}" + (
                 " (" + ", ".join(f"{k} {v}" for k, v in f["contamination"].items() if v) + ")" if cont else "")]
    return "; ".join(parts)


def terms_markdown(ledger: dict[str, Any]) -> str:
    """The data and licence terms in plain words, for MODEL_CARD.md (no heading of its own)."""
    t = ledger["effective_terms"]
    lines = [
        f"- **Commercial use:** {'allowed' if t['commercial_use'] else 'not allowed'}.",
        f"- **Share-alike:** {_yes(t['share_alike'])}"
        + (f"; the adapter must be shared under {t['adapter_licence']}." if t["share_alike"] else "."),
        f"- **Attribution required:** {_yes(t['attribution_required'])}.",
        f"- **Licence of the adapter:** {t['adapter_licence']} (base model: {t['base_licence']}; data: "
        f"{', '.join(t['licences']) or 'none given'}).",
        "",
    ]
    lines += [n for n in t["notes"]]
    lines += ["", "| source | licence | rows used | sha256 | findings |", "|---|---|---|---|---|"]
    for s in ledger["sources"]:
        if s["role"] != "train":
            continue
        lic = s["licence"] or "none given"
        if s.get("licence_from"):
            lic += f" ({s['licence_from']})"
        notes = [f"weight {s['weight']:g}"] if s.get("weight", 1.0) != 1.0 else []
        if s.get("rows_held_out"):
            notes.append(f"{s['rows_held_out']} held out for validation")
        used = f"{s['rows_used']} of {s['rows']}" + (f" ({', '.join(notes)})" if notes else "")
        lines.append(f"| `{Path(s['path']).name}` | {lic} | {used} | "
                     f"`{s['sha256'][:12]}` | {_finding_words(s.get('findings', {}))} |")
    evals = [s for s in ledger["sources"] if s["role"] != "train"]
    if evals:
        lines.append("")
        lines.append("Held-out data: " + ", ".join(
            f"`{Path(s['path']).name}` ({s['licence'] or 'no licence given'}, {s['rows']} rows)" for s in evals) + ".")
    warned = t.get("would_block", [])
    if warned and ledger.get("licence_policy", "warn") == "warn":
        lines.append("")
        lines.append(f"Licence policy `{ledger.get('licence_policy', 'warn')}`: these findings were accepted with a "
                     "warning:")
        lines += [f"- {w}" for w in warned]
    return "\n".join(lines)


def adapter_metadata(ledger: dict[str, Any]) -> dict[str, str]:
    """Short string values for the adapter's safetensors header and ``adapter_config.json``."""
    t = ledger["effective_terms"]
    sources = [s for s in ledger["sources"] if s["role"] == "train"]
    digest = hashlib.sha256(json.dumps([(s["path"], s["sha256"], s["rows_used"]) for s in sources],
                                       sort_keys=True).encode("utf-8")).hexdigest()
    summary = " ".join(t["notes"])
    return {
        "data_licences": ",".join(t["licences"]) or "none",
        "data_commercial_use": str(bool(t["commercial_use"])).lower(),
        "data_share_alike": str(bool(t["share_alike"])).lower(),
        "data_attribution_required": str(bool(t["attribution_required"])).lower(),
        "adapter_licence": str(t["adapter_licence"]),
        "base_licence": str(t["base_licence"]),
        "data_sources": ",".join(f"{Path(s['path']).name}:{s['sha256'][:12]}" for s in sources)[:1000],
        "data_ledger_sha256": digest,
        "data_terms": summary[:1000],
    }
