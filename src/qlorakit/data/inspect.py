"""``qlorakit data inspect``: what a data file holds and how it will train.

Rows, the record form of each row, the fields with their value types, the distribution of token
lengths under the base model's tokenizer and chat template (exactly what the training loop feeds the
model), and how many examples packing fits into one sequence of ``max_seq_len`` tokens.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from .._files import as_created
from .formats import detect_format, to_examples
from .packing import pack
from .readers import read_records
from .templating import IGNORE_INDEX, tokenize_example

__all__ = ["inspect_file", "length_stats", "length_histogram", "plot_lengths", "format_inspect", "load_tokenizer"]


def load_tokenizer(spec: str = "default") -> Any:
    """The tokenizer of a base model: 'default' (SmolLM2), a local HF folder or a .gguf file."""
    from ..models.loader import load_tokenizer as _load, resolve_base

    folder, _ = resolve_base(spec)
    return _load(folder)


def _percentile(sorted_vals: list[int], q: float) -> int:
    """Nearest-rank percentile (the value at rank ceil(q/100 * n))."""
    if not sorted_vals:
        return 0
    k = max(1, math.ceil(q / 100 * len(sorted_vals)))
    return sorted_vals[min(k, len(sorted_vals)) - 1]


def length_stats(lengths: list[int], max_seq_len: int) -> dict[str, Any]:
    s = sorted(lengths)
    if not s:
        return {"n": 0}
    return {"n": len(s), "min": s[0], "mean": round(sum(s) / len(s), 1), "p50": _percentile(s, 50),
            "p90": _percentile(s, 90), "p95": _percentile(s, 95), "p99": _percentile(s, 99), "max": s[-1],
            "over_max_seq_len": sum(x > max_seq_len for x in s), "total": sum(s)}


def length_histogram(lengths: list[int], bins: int = 12) -> list[dict[str, int]]:
    """Equal-width bins from the shortest to the longest example: ``[{lo, hi, count}]`` (``lo <= x < hi``)."""
    if not lengths:
        return []
    low, top = min(lengths), max(lengths)
    width = max(1, math.ceil((top - low + 1) / bins))
    counts = Counter(min((x - low) // width, bins - 1) for x in lengths)
    return [{"lo": low + b * width, "hi": low + (b + 1) * width, "count": counts.get(b, 0)} for b in range(bins)
            if low + b * width <= top]


def inspect_file(path: str | Path, tokenizer: Any | None, *, max_seq_len: int = 512, form: str = "auto",
                 fields: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything ``qlorakit data inspect`` prints for one file (token figures need a tokenizer)."""
    p = Path(path)
    records = read_records(p)
    examples = to_examples(records, p, form, fields)
    field_info: dict[str, Counter] = {}
    for r in records:
        for k, v in r.items():
            if k != "_line":
                field_info.setdefault(k, Counter())[type(v).__name__] += 1
    mapped = [{fields.get(k, k): v for k, v in r.items()} if fields else r for r in records]
    forms = dict(Counter(str(detect_format(r)) for r in mapped)) if form == "auto" else {form: len(records)}
    out: dict[str, Any] = {
        "path": str(p), "rows": len(records), "examples": len(examples), "forms": forms,
        "form_override": form if form != "auto" else None,
        "fields": {k: {"present": sum(c.values()), "types": dict(c)} for k, c in field_info.items()},
    }
    if tokenizer is None:
        return out
    toks = [tokenize_example(tokenizer, ex, 1 << 30) for ex in examples]  # untruncated lengths
    lengths = [len(t) for t in toks]
    answer = [sum(lab != IGNORE_INDEX for lab in t.labels) for t in toks]
    out["tokens"] = length_stats(lengths, max_seq_len)
    out["answer_tokens"] = length_stats(answer, max_seq_len)
    out["histogram"] = length_histogram(lengths)
    out["lengths"] = lengths
    # what packing does: the same truncation and first-fit-decreasing packing as training
    trunc = [tokenize_example(tokenizer, ex, max_seq_len) for ex in examples]
    trunc = [t for t in trunc if any(lab != IGNORE_INDEX for lab in t.labels)]
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    rows = pack(trunc, max_seq_len, pad) if trunc else []
    real = sum(len(t) for t in trunc)
    out["packing"] = {
        "max_seq_len": max_seq_len, "examples": len(trunc), "sequences": len(rows),
        "examples_per_sequence": round(len(trunc) / len(rows), 2) if rows else 0.0,
        "fill": round(real / (len(rows) * max_seq_len), 3) if rows else 0.0,
        "dropped_no_answer_tokens": len(examples) - len(trunc),
    }
    return out


def plot_lengths(results: list[dict[str, Any]], out: str | Path) -> Path:
    """A histogram of token lengths per file (PNG), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if r.get("lengths"):
            ax.hist(r["lengths"], bins=40, alpha=0.6, label=f"{Path(r['path']).name} (n={len(r['lengths'])})")
    msl = results[0].get("packing", {}).get("max_seq_len") if results else None
    if msl:
        ax.axvline(msl, color="k", linestyle="--", linewidth=1, label=f"max_seq_len {msl}")
    ax.set_xlabel("tokens per example (chat template included)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths under the base tokenizer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    try:
        as_created(tmp)
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def format_inspect(r: dict[str, Any]) -> str:
    forms = ", ".join(f"{k} {v}" for k, v in r["forms"].items())
    how = f" (set by --format {r['form_override']})" if r.get("form_override") else " (detected)"
    lines = [f"{r['path']}", f"  rows: {r['rows']}   examples: {r['examples']}   form: {forms}{how}", "  fields:"]
    for k, info in r["fields"].items():
        types = ", ".join(f"{t} {n}" for t, n in info["types"].items())
        lines.append(f"    {k:24s} in {info['present']} rows ({types})")
    if "tokens" in r:
        t, a, pk = r["tokens"], r["answer_tokens"], r["packing"]
        lines.append(f"  tokens per example: min {t['min']}, p50 {t['p50']}, mean {t['mean']}, p90 {t['p90']}, "
                     f"p99 {t['p99']}, max {t['max']}; {t['over_max_seq_len']} longer than {pk['max_seq_len']}")
        lines.append(f"  answer tokens (with loss): p50 {a['p50']}, max {a['max']}, total {a['total']}")
        top = max(h["count"] for h in r["histogram"]) or 1
        for h in r["histogram"]:
            bar = "#" * max(1 if h["count"] else 0, round(30 * h["count"] / top))
            lines.append(f"    {h['lo']:6d}-{h['hi'] - 1:<6d} {h['count']:6d} {bar}")
        lines.append(f"  packing at {pk['max_seq_len']} tokens: {pk['examples']} examples in {pk['sequences']} "
                     f"sequences, {pk['examples_per_sequence']} per sequence, {pk['fill']:.0%} filled")
    return "\n".join(lines)
