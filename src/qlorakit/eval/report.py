"""Evaluation report: results.json, report.md and a self-contained report.html.

The HTML embeds its plots as base64 PNGs (matplotlib, Agg backend): the training loss curve when
a ``metrics.jsonl`` is given, and per suite the base and tuned value of every metric with the
interval of the difference. Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .._files import as_created

__all__ = ["write_report", "render_markdown", "render_html", "read_loss_curve", "atomic_write"]


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        as_created(tmp)  # mkstemp creates 0600; reports are meant to be read
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def read_loss_curve(path: Path) -> list[tuple[float, float]]:
    """``(step, loss)`` pairs from a training ``metrics.jsonl`` (lines without both are skipped)."""
    points = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {e.msg}") from e
            if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and isinstance(row.get("loss"), (int, float)):
                points.append((float(row["step"]), float(row["loss"])))
    return points


def _scaled(m: Mapping[str, Any], key: str) -> float | None:
    v = m.get(key)
    if v is None:
        return None
    return v * (100.0 if m.get("fraction", True) else 1.0)


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _direction(m: Mapping[str, Any]) -> str:
    hib = m.get("higher_is_better", True)
    return "higher" if hib is True else ("lower" if hib is False else "closer to 0")


def _rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, Mapping[str, Any], Mapping[str, Any]]]:
    out = []
    for suite, tasks in results.get("suites", {}).items():
        for task, t in tasks.items():
            for name, m in t["metrics"].items():
                out.append((suite, task, name, m, t))
    return out


def render_markdown(results: Mapping[str, Any]) -> str:
    paired = results.get("paired", False)
    conf = int(round(100 * results.get("settings", {}).get("confidence", 0.95)))
    lines = ["# Evaluation report", ""]
    gate = results.get("gate")
    if gate:
        lines += [f"**Gate: {'PASSED' if gate['passed'] else 'FAILED'}**", ""]
        for c in gate["checks"]:
            lines.append(f"- {c['status'].upper()}: {c['message']}")
        lines.append("")
    lines += ["Fraction metrics are in points (x100). " + (f"Delta is tuned - base with a paired bootstrap {conf}% interval over the same items." if paired else f"Intervals are bootstrap {conf}% intervals."), ""]
    for suite, tasks in results.get("suites", {}).items():
        lines += [f"## {suite}", ""]
        for task, t in tasks.items():
            secs = ", ".join(f"{k} {v:.1f}s" for k, v in t.get("seconds", {}).items())
            lines += [f"### {task} ({t['n_items']} items; {secs})", "", t.get("description", ""), ""]
            if paired:
                lines += ["| metric | better | base | tuned | delta | interval |", "|---|---|---|---|---|---|"]
                for name, m in t["metrics"].items():
                    lines.append(f"| {name} | {_direction(m)} | {_f(_scaled(m, 'base'))} | {_f(_scaled(m, 'tuned'))} | {_f(_scaled(m, 'delta'))} | [{_f(_scaled(m, 'ci_low'))}, {_f(_scaled(m, 'ci_high'))}] |")
            else:
                lines += ["| metric | better | value | interval |", "|---|---|---|---|"]
                for name, m in t["metrics"].items():
                    lines.append(f"| {name} | {_direction(m)} | {_f(_scaled(m, 'tuned'))} | [{_f(_scaled(m, 'ci_low'))}, {_f(_scaled(m, 'ci_high'))}] |")
            lines.append("")
            for s in t.get("samples", [])[:3]:
                lines.append(f"- `{s['id']}` tuned: {json.dumps(s['tuned'][:300])}" + (f" / base: {json.dumps(s['base'][:300])}" if "base" in s else ""))
            if t.get("samples"):
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(results: Mapping[str, Any], loss_points: list[tuple[float, float]] | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plots = []
    if loss_points:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot([p[0] for p in loss_points], [p[1] for p in loss_points], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss")
        ax.grid(alpha=0.3)
        plots.append(("Training loss", _png(fig)))
        plt.close(fig)
    paired = results.get("paired", False)
    for suite, tasks in results.get("suites", {}).items():
        labels, base, tuned, err = [], [], [], []
        for task, t in tasks.items():
            for name, m in t["metrics"].items():
                if "/" in name:  # per-category breakdowns stay in the tables
                    continue
                tv = _scaled(m, "tuned")
                if tv is None:
                    continue
                labels.append(f"{task}\n{name}")
                tuned.append(tv)
                b = _scaled(m, "base")
                base.append(b if b is not None else float("nan"))
                lo, hi = _scaled(m, "ci_low"), _scaled(m, "ci_high")
                if paired and b is not None and lo is not None and hi is not None:
                    # interval of the difference, drawn around the tuned value
                    d = tv - b
                    err.append((max(d - lo, 0.0), max(hi - d, 0.0)))
                elif lo is not None and hi is not None:
                    err.append((max(tv - lo, 0.0), max(hi - tv, 0.0)))
                else:
                    err.append((0.0, 0.0))
        if not labels:
            continue
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(labels) + 1), 3.4))
        xs = list(range(len(labels)))
        w = 0.38
        if paired:
            ax.bar([x - w / 2 for x in xs], base, w, label="base", color="#9aa5b1")
        yerr = [[e[0] for e in err], [e[1] for e in err]]
        ax.bar([x + (w / 2 if paired else 0) for x in xs], tuned, w, yerr=yerr, capsize=3, label="tuned" if paired else "model", color="#3b7dd8")
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(f"{suite}" + (" (error bar: interval of tuned - base)" if paired else ""))
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        plots.append((suite, _png(fig)))
        plt.close(fig)
    return plots


def render_html(results: Mapping[str, Any], loss_points: list[tuple[float, float]] | None = None) -> str:
    md = render_markdown(results)
    body = []
    for title, png in _plots(results, loss_points):
        body.append(f"<h3>{html.escape(title)}</h3>\n<img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{png}\">")
    table_rows = []
    for suite, task, name, m, _t in _rows(results):
        cells = [suite, task, name, _direction(m), _f(_scaled(m, "base")), _f(_scaled(m, "tuned")), _f(_scaled(m, "delta")),
                 f"[{_f(_scaled(m, 'ci_low'))}, {_f(_scaled(m, 'ci_high'))}]"]
        table_rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    gate = results.get("gate")
    gate_html = ""
    if gate:
        items = "".join(f"<li class=\"{c['status']}\"><b>{c['status'].upper()}</b> {html.escape(c['message'])}</li>" for c in gate["checks"])
        gate_html = f"<h2>Gate: {'PASSED' if gate['passed'] else 'FAILED'}</h2><ul>{items}</ul>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:nth-child(-n+4) {{ text-align: left; }}
li.fail {{ color: #b00020; }} li.pass {{ color: #1b6e20; }} li.skipped {{ color: #777; }}
img {{ max-width: 100%; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: 1em; }}
</style></head><body>
<h1>Evaluation report</h1>
{gate_html}
<h2>Plots</h2>
{''.join(body) or '<p>No plots.</p>'}
<h2>All metrics (fraction metrics in points)</h2>
<table><tr><th>suite</th><th>task</th><th>metric</th><th>better</th><th>base</th><th>tuned</th><th>delta</th><th>interval</th></tr>
{''.join(table_rows)}
</table>
<h2>Report (Markdown)</h2>
<pre>{html.escape(md)}</pre>
</body></html>
"""


def write_report(results: Mapping[str, Any], out_dir: str | Path, loss_curve: str | Path | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and ``report.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    points = None
    if loss_curve is not None:
        lc = Path(loss_curve)
        if not lc.is_file():
            raise FileNotFoundError(f"loss curve file not found: {lc}")
        points = read_loss_curve(lc)
    paths = {"json": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    kept: dict[str, Any] = {}
    if paths["json"].is_file():
        # a run's results.json also holds what training measured (held-out losses, samples, the
        # training's own gate): an evaluation replaces its own keys and keeps those
        from .cli import EvalError

        try:
            kept = json.loads(paths["json"].read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{paths['json']}: cannot be read as JSON ({e}); move it away to evaluate into "
                             f"{out}") from e
        if not isinstance(kept, dict):
            raise EvalError(f"{paths['json']}: expected a JSON object of results; move it away to evaluate into {out}")
    atomic_write(paths["json"], json.dumps(_clean(kept | dict(results)), indent=2, allow_nan=False) + "\n")
    atomic_write(paths["markdown"], render_markdown(results))
    atomic_write(paths["html"], render_html(results, points))
    return paths
