"""The run's record of its exports: ``exports.json`` and a section of ``MODEL_CARD.md``.

The section sits between two markers and is rewritten from ``exports.json`` each time, so the rest
of the card (written by training) is never touched and several exports of one run are listed together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import ExportError, write_atomic

__all__ = ["START", "END", "record_export", "render_section", "replace_section"]

START = "<!-- qlorakit:exports:start -->"
END = "<!-- qlorakit:exports:end -->"
REGISTRY = "exports.json"


def _mb(n: float | int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def replace_section(text: str, section: str) -> str:
    """``text`` with the marked section replaced by ``section`` (appended when there is none)."""
    block = f"{START}\n{section.rstrip()}\n{END}\n"
    s, e = text.find(START), text.find(END)
    if s >= 0 and e > s:
        return text[:s] + block + text[e + len(END):].lstrip("\n")
    if (s >= 0) != (e >= 0) or (s >= 0 and e < s):
        raise ExportError(f"MODEL_CARD.md: the markers {START} / {END} are broken; fix or remove them")
    return text.rstrip("\n") + "\n\n" + block


def _speed(m: dict[str, Any] | None) -> tuple[str, str, str]:
    if not m:
        return "not measured", "-", "-"
    if "error" in m:
        return f"not measured ({m['error'][:80]})", "-", "-"
    return m.get("runtime", "?"), f"{m['peak_rss_mb']:.0f} MB", f"{m['tokens_per_s']:.1f}"


def render_section(entries: list[dict[str, Any]]) -> str:
    lines = ["## Exports", "",
             "Every export is checked against the tuned model it came from (4-bit base + adapter, as qlorakit "
             "runs it): golden prompts from the held-out data answered greedily by both; next-token agreement "
             "over the first answer tokens (the export fed the source's answer picks the same token; free-running "
             "agreement in brackets), the same end-of-turn token, and the held-out loss of both. "
             "`qlorakit export --check OUT` runs the check again.", "",
             "| export | artifact | runtime | next-token agreement (free-running) | held-out loss: tuned -> export | same stop | status |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for r in e.get("parity", []):
            lines.append(f"| `{e['out']}` ({e['format']}) | {r['artifact']} | {r['runtime']} | "
                         f"{r.get('forced_agreement', r['token_agreement']):.1%} ({r['token_agreement']:.1%}) of "
                         f"{r['agreement_tokens']} x {r['prompts']} | "
                         f"{r['source_loss']:.4f} -> {r['export_loss']:.4f} ({r['loss_increase']:+.4f}) | "
                         f"{r['stops']['same']}/{r['stops']['source_stopped']} | "
                         f"{'passed' if r['passed'] else 'FAILED'} |")
        if not e.get("parity"):
            lines.append(f"| `{e['out']}` ({e['format']}) | - | - | not checked | - | - | {e.get('status', '?')} |")
    lines += ["", "## On-device", "",
              "Measured on this machine's CPU after export: peak resident memory of a fresh process serving the "
              "model (runtime included) and answer tokens per second for one golden prompt, greedy, prompt "
              "included. The load average at the time is given: other work on the machine slows the figures.", "",
              "| export | what runs | files | RAM (peak RSS) | tokens/s | load avg |",
              "|---|---|---|---|---|---|"]
    for e in entries:
        od = e.get("on_device") or {}
        for item in od.get("items", []):
            runtime, rss, tps = _speed(item.get("measured"))
            files = ", ".join(f"{f} {_mb(b)}" for f, b in item.get("files", {}).items())
            load = item.get("measured", {}).get("load_average", "-") if item.get("measured") else "-"
            lines.append(f"| `{e['out']}` ({e['format']}) | {item['what']}: {runtime} | {files} | {rss} | {tps} | {load} |")
        if not od.get("items"):
            lines.append(f"| `{e['out']}` ({e['format']}) | {od.get('note', 'not measured')} | - | - | - | - |")
    return "\n".join(lines) + "\n"


def record_export(run_dir: Path, entry: dict[str, Any]) -> None:
    """Add or replace the entry for ``entry['out']`` in exports.json and rewrite the card's section."""
    reg = run_dir / REGISTRY
    entries: list[dict[str, Any]] = []
    if reg.is_file():
        try:
            entries = json.loads(reg.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ExportError(f"{reg}:{e.lineno}: malformed JSON ({e.msg})") from e
        if not isinstance(entries, list):
            raise ExportError(f"{reg}: expected a JSON list of exports")
    entries = [x for x in entries if x.get("out") != entry["out"]] + [entry]
    write_atomic(reg, json.dumps(entries, indent=2, default=str) + "\n")
    card = run_dir / "MODEL_CARD.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else f"# Model card: {run_dir.name}\n"
    write_atomic(card, replace_section(text, render_section(entries)))
