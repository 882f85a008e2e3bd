"""What a data licence allows: a small SPDX table, where a file's licence comes from, and findings.

The table knows the licences training data usually comes under. Each entry carries four flags:

- ``commercial``: commercial use of the data (and so of an adapter trained on it) is allowed;
- ``share_alike``: adapted material must be shared under the same licence (CC ``-SA``, ODbL);
- ``attribution``: adapted material must credit the source (CC ``BY``, ODC-By);
- ``copyleft``: a software copyleft licence (GPL family) with the same effect as share-alike;

plus ``no_derivatives`` for CC ``-ND`` licences (an adapter is an adaptation, so they forbid it).
Anything else (a model licence such as Llama's, a proprietary agreement) is ``other``: nothing can
be vouched for, so it is reported like a missing licence.

A file's licence is found in this order: the recipe source (or ``--licence``), a sidecar file
``<file>.licence`` holding the SPDX id, and the ``manifest.json`` of the shared data folder when the
file is one of its files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "LicenceInfo",
    "LICENCES",
    "lookup_licence",
    "normalise_spdx",
    "resolve_licence",
    "licence_findings",
    "shared_data_root",
    "DEFAULT_BASE_LICENCE",
]

DEFAULT_BASE_LICENCE = "Apache-2.0"  # SmolLM2-135M-Instruct


@dataclass(frozen=True)
class LicenceInfo:
    spdx: str
    name: str
    commercial: bool
    share_alike: bool = False
    attribution: bool = False
    copyleft: bool = False
    no_derivatives: bool = False
    known: bool = True


def _l(spdx: str, name: str, **flags: bool) -> tuple[str, LicenceInfo]:
    return spdx, LicenceInfo(spdx, name, **flags)


LICENCES: dict[str, LicenceInfo] = dict([
    _l("Apache-2.0", "Apache License 2.0", commercial=True),
    _l("MIT", "MIT License", commercial=True),
    _l("BSD-2-Clause", "BSD 2-Clause License", commercial=True),
    _l("BSD-3-Clause", "BSD 3-Clause License", commercial=True),
    _l("ISC", "ISC License", commercial=True),
    _l("Unlicense", "The Unlicense", commercial=True),
    _l("CC0-1.0", "Creative Commons Zero 1.0 (public domain dedication)", commercial=True),
    _l("PDDL-1.0", "Open Data Commons Public Domain Dedication and Licence", commercial=True),
    _l("CC-BY-3.0", "Creative Commons Attribution 3.0", commercial=True, attribution=True),
    _l("CC-BY-4.0", "Creative Commons Attribution 4.0", commercial=True, attribution=True),
    _l("ODC-By-1.0", "Open Data Commons Attribution Licence", commercial=True, attribution=True),
    _l("CC-BY-SA-3.0", "Creative Commons Attribution-ShareAlike 3.0", commercial=True, attribution=True,
       share_alike=True),
    _l("CC-BY-SA-4.0", "Creative Commons Attribution-ShareAlike 4.0", commercial=True, attribution=True,
       share_alike=True),
    _l("ODbL-1.0", "Open Database Licence", commercial=True, attribution=True, share_alike=True),
    _l("CC-BY-NC-3.0", "Creative Commons Attribution-NonCommercial 3.0", commercial=False, attribution=True),
    _l("CC-BY-NC-4.0", "Creative Commons Attribution-NonCommercial 4.0", commercial=False, attribution=True),
    _l("CC-BY-NC-SA-3.0", "Creative Commons Attribution-NonCommercial-ShareAlike 3.0", commercial=False,
       attribution=True, share_alike=True),
    _l("CC-BY-NC-SA-4.0", "Creative Commons Attribution-NonCommercial-ShareAlike 4.0", commercial=False,
       attribution=True, share_alike=True),
    _l("CC-BY-ND-4.0", "Creative Commons Attribution-NoDerivatives 4.0", commercial=True, attribution=True,
       no_derivatives=True),
    _l("CC-BY-NC-ND-4.0", "Creative Commons Attribution-NonCommercial-NoDerivatives 4.0", commercial=False,
       attribution=True, no_derivatives=True),
    _l("GPL-2.0-only", "GNU General Public License 2.0 only", commercial=True, copyleft=True, share_alike=True),
    _l("GPL-2.0-or-later", "GNU General Public License 2.0 or later", commercial=True, copyleft=True,
       share_alike=True),
    _l("GPL-3.0-only", "GNU General Public License 3.0 only", commercial=True, copyleft=True, share_alike=True),
    _l("GPL-3.0-or-later", "GNU General Public License 3.0 or later", commercial=True, copyleft=True,
       share_alike=True),
    _l("AGPL-3.0-only", "GNU Affero General Public License 3.0 only", commercial=True, copyleft=True,
       share_alike=True),
    _l("AGPL-3.0-or-later", "GNU Affero General Public License 3.0 or later", commercial=True, copyleft=True,
       share_alike=True),
    # the LGPL lets a larger work keep its own licence; only changes to the library itself stay LGPL
    _l("LGPL-2.1-only", "GNU Lesser General Public License 2.1 only", commercial=True, copyleft=True),
    _l("LGPL-2.1-or-later", "GNU Lesser General Public License 2.1 or later", commercial=True, copyleft=True),
    _l("LGPL-3.0-only", "GNU Lesser General Public License 3.0 only", commercial=True, copyleft=True),
    _l("LGPL-3.0-or-later", "GNU Lesser General Public License 3.0 or later", commercial=True, copyleft=True),
    _l("other", "a licence outside the SPDX list (custom terms)", commercial=False, known=False),
])

# names people write instead of the SPDX id (compared after lower-casing and squeezing separators)
_ALIASES = {
    "apache2": "Apache-2.0", "apache20": "Apache-2.0", "apachelicense20": "Apache-2.0", "asl20": "Apache-2.0",
    "mitlicense": "MIT", "expat": "MIT",
    "bsd2": "BSD-2-Clause", "bsd3": "BSD-3-Clause", "bsd": "BSD-3-Clause", "newbsd": "BSD-3-Clause",
    "simplifiedbsd": "BSD-2-Clause",
    "cc0": "CC0-1.0", "publicdomain": "CC0-1.0",
    "ccby": "CC-BY-4.0", "ccbysa": "CC-BY-SA-4.0", "ccbync": "CC-BY-NC-4.0", "ccbyncsa": "CC-BY-NC-SA-4.0",
    "ccbynd": "CC-BY-ND-4.0", "ccbyncnd": "CC-BY-NC-ND-4.0",
    "odcby": "ODC-By-1.0", "odcby10": "ODC-By-1.0", "odbl": "ODbL-1.0",
    "gpl2": "GPL-2.0-only", "gpl20": "GPL-2.0-only", "gpl20+": "GPL-2.0-or-later", "gpl2+": "GPL-2.0-or-later",
    "gpl20orlater": "GPL-2.0-or-later",
    "gpl3": "GPL-3.0-only", "gpl30": "GPL-3.0-only", "gpl": "GPL-3.0-only", "gplv3": "GPL-3.0-only",
    "gplv2": "GPL-2.0-only", "gpl30+": "GPL-3.0-or-later", "gpl3+": "GPL-3.0-or-later",
    "gpl30orlater": "GPL-3.0-or-later",
    "agpl3": "AGPL-3.0-only", "agpl30": "AGPL-3.0-only", "agpl": "AGPL-3.0-only", "agplv3": "AGPL-3.0-only",
    "agpl30orlater": "AGPL-3.0-or-later",
    "lgpl21": "LGPL-2.1-only", "lgpl2.1": "LGPL-2.1-only", "lgpl3": "LGPL-3.0-only", "lgpl30": "LGPL-3.0-only",
    "lgpl": "LGPL-3.0-only", "lgpl21orlater": "LGPL-2.1-or-later", "lgpl30orlater": "LGPL-3.0-or-later",
    "llama2": "other", "llama3": "other", "llama31": "other", "llama32": "other", "llama33": "other",
    "llama": "other", "gemma": "other", "openrail": "other", "openrailm": "other", "custom": "other",
    "proprietary": "other", "unknown": "",
}
# deprecated SPDX ids with a plain successor
_DEPRECATED = {"GPL-2.0": "GPL-2.0-only", "GPL-3.0": "GPL-3.0-only", "AGPL-3.0": "AGPL-3.0-only",
               "LGPL-2.1": "LGPL-2.1-only", "LGPL-3.0": "LGPL-3.0-only", "GPL-2.0+": "GPL-2.0-or-later",
               "GPL-3.0+": "GPL-3.0-or-later", "ODC-By": "ODC-By-1.0", "ODbL": "ODbL-1.0"}


def _squeeze(text: str) -> str:
    s = text.strip().lower().replace("licence", "").replace("license", "").replace("version", "")
    s = re.sub(r"\bv(?=\d)", "", s)
    return re.sub(r"[\s_\-.,]+", "", s).replace("attribution", "by").replace("sharealike", "sa")


_BY_SQUEEZE = {_squeeze(k): k for k in LICENCES} | {_squeeze(k): v for k, v in _DEPRECATED.items()}


def _one(text: str) -> str | None:
    """The SPDX id of a text that names one licence and nothing else, or None."""
    t = text.strip()
    if t in LICENCES:
        return t
    if t in _DEPRECATED:
        return _DEPRECATED[t]
    sq = _squeeze(t)
    if sq in _BY_SQUEEZE:
        return _BY_SQUEEZE[sq]
    return _ALIASES.get(sq)


_IDS = sorted([*LICENCES, *_DEPRECATED], key=len, reverse=True)
_ID_RE = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(i) for i in _IDS) + r")(?![\w-]|\.\d)", re.IGNORECASE)
_BY_LOWER = {i.lower(): _DEPRECATED.get(i, i) for i in _IDS}
_PARTS = re.compile(r"[;,()\[\]/&+]|\s+(?:and|with|plus)\s+", re.IGNORECASE)
_CHOICE = re.compile(r"\s+or\s+", re.IGNORECASE)


def _named(text: str) -> list[str]:
    """Every licence a text names, in order: each part that is a licence name, and the SPDX ids
    written inside the other parts ("data CC-BY-NC-4.0")."""
    out: list[str] = []
    for part in _PARTS.split(text):
        one = _one(part) if part.strip() else None
        found = [one] if one else [_BY_LOWER[m.group(1).lower()] for m in _ID_RE.finditer(part)]
        out += [f for f in found if f not in out]
    return out


def _restriction(spdx: str) -> tuple[int, ...]:
    """How much a licence restricts an adapter trained on data under it (larger: more)."""
    info = LICENCES.get(spdx)
    if info is None:  # outside the table: nothing can be vouched for
        return (2,)
    return (1, info.no_derivatives, not info.commercial, info.share_alike, info.copyleft, info.attribution)


def normalise_spdx(text: str | None) -> str:
    """The SPDX id for a licence name (``'apache 2.0'`` -> ``'Apache-2.0'``); ``''`` when none is given.

    A name the table does not know comes back unchanged; :func:`lookup_licence` then treats it as
    'other'. A text naming several licences stands for the one whose terms restrict the adapter
    most, as all of them apply (``'MIT (code), CC-BY-NC-SA-4.0 (data)'`` -> ``'CC-BY-NC-SA-4.0'``;
    ``'Apache-2.0 (oasst1 data); repo MIT'`` -> ``'Apache-2.0'``, the first of equals), except a
    choice (``'MIT OR GPL-3.0-only'``), which stands for the least restrictive alternative.
    """
    if text is None:
        return ""
    t = text.strip()
    if not t:
        return ""
    one = _one(t)
    if one is not None:
        return one
    choices = [_named(c) for c in _CHOICE.split(t)]
    if len(choices) > 1 and all(len(c) == 1 for c in choices):  # "A OR B": one licence per alternative
        return min((c[0] for c in choices), key=_restriction)
    named = _named(t)
    if named:
        return max(named, key=_restriction)  # max keeps the first of equals
    return t


def lookup_licence(spdx: str) -> LicenceInfo | None:
    """What the table knows of ``spdx`` (after :func:`normalise_spdx`); None for no licence."""
    sid = normalise_spdx(spdx)
    if not sid:
        return None
    if sid in LICENCES:
        return LICENCES[sid]
    return LicenceInfo(sid, f"{sid} (not in qlorakit's licence table)", commercial=False, known=False)


# --------------------------------------------------------------------------------------------
# where a file's licence comes from


def shared_data_root() -> Path | None:
    """The shared data folder: ``$QLORAKIT_SHARED_DATA``, else ``<repo>/../shared/data``, if present."""
    env = os.environ.get("QLORAKIT_SHARED_DATA")
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    repo = Path(__file__).resolve().parents[3]  # src/qlorakit/data/licences.py -> repo root
    p = repo.parent / "shared" / "data"
    return p if p.is_dir() else None


@lru_cache(maxsize=8)
def _manifest(root: str) -> dict[str, dict[str, Any]]:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text(encoding="utf-8"))
    return {str((Path(root) / e["file"]).resolve()): e for e in entries if isinstance(e, dict) and "file" in e}


def _manifest_entry(path: Path) -> dict[str, Any] | None:
    try:
        resolved = path.resolve()
    except OSError:
        return None
    roots = [shared_data_root()]
    # a file inside any folder that holds a manifest.json (the shared data copied elsewhere)
    roots += [d for d in resolved.parents if (d / "manifest.json").is_file()][:3]
    for root in roots:
        if root is not None:
            entry = _manifest(str(root.resolve())).get(str(resolved))
            if entry is not None:
                return entry
    return None


def resolve_licence(path: str | Path, declared: str = "", origin: str = "") -> tuple[str, str, str]:
    """``(spdx, origin, where_from)`` for a data file.

    ``where_from`` says how the licence was found: ``'declared'`` (recipe or ``--licence``),
    ``'sidecar'`` (``<file>.licence``), ``'manifest'`` (the shared data manifest) or ``''`` (none).
    """
    if declared.strip():
        return normalise_spdx(declared), origin, "declared"
    p = Path(path)
    for side in (p.with_name(p.name + ".licence"), p.with_name(p.name + ".license")):
        if side.is_file():
            text = side.read_text(encoding="utf-8").strip().splitlines()
            if text and text[0].strip():
                return normalise_spdx(text[0]), origin or " ".join(t.strip() for t in text[1:2]), "sidecar"
    entry = _manifest_entry(p)
    if entry is not None and entry.get("license"):
        src, upstream = entry.get("source", ""), str(entry.get("path", "")).split(" (", 1)[0]
        where = f"{src} @ {str(entry.get('commit', ''))[:12]} : {upstream}".strip(" @:")
        return normalise_spdx(str(entry["license"])), origin or where, "manifest"
    return "", origin, ""


# --------------------------------------------------------------------------------------------
# findings


def _finding(kind: str, severity: str, message: str, source: str, licence: str) -> dict[str, Any]:
    return {"check": "licence", "kind": kind, "severity": severity, "message": message, "source": source,
            "licence": licence}


def licence_findings(sources: list[dict[str, Any]], base_licence: str = DEFAULT_BASE_LICENCE) -> list[dict[str, Any]]:
    """Licence findings for training sources (each a dict with ``path``, ``licence``, ``commercial_use``).

    Severity ``'block'`` marks what the ``block`` policy refuses (no licence, non-commercial,
    share-alike, no-derivatives, a conflict); ``'info'`` what only needs to be stated (attribution).
    ``commercial_use`` set explicitly on a source (True/False) overrides the licence's flag and the
    finding says so.
    """
    out: list[dict[str, Any]] = []
    base = lookup_licence(base_licence)
    sa_sources: dict[str, list[str]] = {}
    for s in sources:
        path, spdx = str(s["path"]), normalise_spdx(s.get("licence", ""))
        info = lookup_licence(spdx)
        declared = s.get("commercial_use")
        if info is None:
            out.append(_finding("missing", "block", f"{path}: no licence given; set the source's licence (SPDX id, "
                                "e.g. Apache-2.0), pass --licence, or write it into a sidecar file "
                                f"'{Path(path).name}.licence'", path, ""))
            continue
        if not info.known:
            out.append(_finding("unknown", "block", f"{path}: licence {spdx!r} is not in the licence table; its "
                                "terms cannot be vouched for (commercial use and sharing unknown)", path, spdx))
        if info.no_derivatives:
            out.append(_finding("no_derivatives", "block", f"{path}: {spdx} forbids adapted material; an adapter "
                                "trained on it may not be shared", path, spdx))
        if not info.commercial and info.known:
            if declared is True:
                out.append(_finding("non_commercial_overridden", "info", f"{path}: {spdx} is non-commercial, but the "
                                    "source declares commercial_use: true (a separate agreement); the adapter is "
                                    "marked commercial on that declaration", path, spdx))
            else:
                out.append(_finding("non_commercial", "block", f"{path}: {spdx} is non-commercial; the adapter "
                                    "trained on it may not be used commercially", path, spdx))
        elif declared is False:
            out.append(_finding("non_commercial_declared", "block", f"{path}: the source declares "
                                "commercial_use: false; the adapter may not be used commercially", path, spdx))
        if info.share_alike:
            sa_sources.setdefault(spdx, []).append(path)
            out.append(_finding("share_alike", "block", f"{path}: {spdx} is share-alike; the adapter must be "
                                f"shared under {spdx} too", path, spdx))
        elif info.copyleft:
            out.append(_finding("weak_copyleft", "info", f"{path}: {spdx} is a weak copyleft licence; changes to "
                                "the data itself stay under it", path, spdx))
        if info.attribution:
            out.append(_finding("attribution", "info", f"{path}: {spdx} requires credit to the source when the "
                                "adapter is shared", path, spdx))
        if base is not None and base.spdx != spdx:
            conflict = _conflict(base, info)
            if conflict:
                out.append(_finding("conflict", "block", f"{path}: {spdx} conflicts with the base model's licence "
                                    f"{base.spdx}: {conflict}", path, spdx))
    if len(sa_sources) > 1:
        names = ", ".join(sorted(sa_sources))
        out.append(_finding("conflict", "block", f"share-alike licences {names} each require the adapter to be "
                            "shared under themselves alone; they cannot all be met", "", names))
    return out


# GPL-2.0-only cannot be combined with Apache-2.0 (patent and termination clauses); GPL-3.0 can
_INCOMPATIBLE_WITH_APACHE = {"GPL-2.0-only"}


def _conflict(base: LicenceInfo, data: LicenceInfo) -> str:
    """Why data under ``data`` cannot be used to adapt a base model under ``base`` ('' if it can)."""
    if data.share_alike and not base.known:
        return "the base model's own terms do not allow relicensing a derivative under a share-alike licence"
    if data.share_alike and base.share_alike:
        return "two share-alike licences each require the adapter to carry them alone"
    if data.share_alike and not base.commercial and data.commercial:
        return "the share-alike licence requires terms that allow commercial use, which the base model forbids"
    if base.spdx == "Apache-2.0" and data.spdx in _INCOMPATIBLE_WITH_APACHE:
        return "GPL-2.0-only is incompatible with Apache-2.0"
    if data.spdx == "Apache-2.0" and base.spdx in _INCOMPATIBLE_WITH_APACHE:
        return "Apache-2.0 is incompatible with GPL-2.0-only"
    return ""
