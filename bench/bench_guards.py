#!/usr/bin/env python
"""Latency and held-out rates of the shipped safety guards.

    python bench/bench_guards.py                 # prints and writes bench/results/guards.md

For each guard head: per-request latency (p50 / p99 / max, milliseconds) of ``score`` on the
held-out test texts of that head, once cold (first pass, right after loading: empty n-gram word
cache) and warm (per text the best of three further passes, which removes most pauses caused by
other processes on a shared machine), then TPR / FPR at the shipped thresholds on the same texts,
and the latency of ``check_messages`` on a user turn and on a tool turn. The sentence encoder runs
with its embedding cache off (every call encodes its windows again) and torch on one thread
(``--threads``), so the numbers are those of a request that has not been seen before.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

import torch

from qlorakit.safety import (
    InjectionGuard,
    ModerationGuard,
    SentenceEncoder,
    check_messages,
    injection_examples,
    moderation_examples,
    rate_report,
)
from qlorakit.safety.datasets import Example, default_data_dir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "guards.md"


def latencies_ms(fn: Callable[[str], object], texts: Sequence[str]) -> np.ndarray:
    out = np.empty(len(texts))
    for i, t in enumerate(texts):
        t0 = time.perf_counter()
        fn(t)
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def fmt_lat(x: np.ndarray) -> str:
    return f"{np.percentile(x, 50):.3f} | {np.percentile(x, 99):.3f} | {x.max():.3f}"


def fmt_rate(r: dict) -> str:
    return f"{r['rate']:.3f} ({r['flagged']}/{r['n']})" if r["n"] else "—"


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None, help="shared data folder")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report to write")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the sentence encoder")
    args = ap.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    torch.set_num_threads(args.threads)

    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    encoder = SentenceEncoder.load(cache_size=0)  # no cache: every call encodes its windows
    enc_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    inj, mod = InjectionGuard.load(encoder=encoder), ModerationGuard.load()
    load_ms = (time.perf_counter() - t0) * 1e3
    # the request head's encoder is the one its file names (the packaged chat model's first layers)
    t0 = time.perf_counter()
    if mod.model.dense is not None:
        mod.model.dense_encoder()
    mod_enc_ms = (time.perf_counter() - t0) * 1e3
    mod_enc_name = mod.model.dense.encoder if mod.model.dense is not None else "none"

    examples: list[Example] = injection_examples(data_dir, splits=["test"]) + moderation_examples(
        data_dir, splits=["test"]
    )
    embedding_heads = {f"{g.name}.{h}" for g in (inj, mod) for h in g.heads if g.model.uses_dense(h)}

    def encoder_share(model, texts: Sequence[str], head: str) -> str:
        """Share of ``texts`` whose windows reach the encoder, and windows embedded / windows."""
        if not model.uses_dense(head):
            return "—"
        spans = [model.spans(t, head) for t in texts]
        windows = [t[a:b] for t, sp in zip(texts, spans) for a, b in sp]
        chosen = model.embedded_windows(spans, model.sparse_margins(windows), head)
        n_emb = [len(ks) for _, ks in chosen]
        return f"{np.mean([n > 0 for n in n_emb]):.2f} ({sum(n_emb)}/{len(windows)})"

    heads: dict[str, tuple[Callable[[str], float], float]] = {
        "injection.prompt": (lambda t: inj.score(t, source="prompt"), inj.threshold("prompt")),
        "injection.document": (lambda t: inj.score(t, source="document"), inj.threshold("document")),
        "moderation.request": (lambda t: mod.score(t, kind="request"), mod.threshold("request")),
        "moderation.content": (lambda t: mod.score(t, kind="content"), mod.threshold("content")),
    }
    lat_rows, rate_rows = [], []
    for name, (fn, thr) in heads.items():
        head = name.split(".")[1]
        exs = [e for e in examples if e.head == head]
        texts = [e.text for e in exs]
        cold = latencies_ms(fn, texts)
        warm = np.minimum.reduce([latencies_ms(fn, texts) for _ in range(3)])
        chars = np.array([len(t) for t in texts])
        per_kchar = float(np.median(warm / np.maximum(chars, 1) * 1000))
        guard = inj if name.startswith("injection") else mod
        lat_rows.append(
            f"| {name} | {encoder_share(guard.model, texts, head) if name in embedding_heads else 'no'} | {len(texts)} | {int(np.median(chars))} / {chars.max()} | {fmt_lat(cold)} "
            f"| {fmt_lat(warm)} | {per_kchar:.3f} |"
        )
        rep = rate_report(exs, [fn(t) for t in texts], thr, by=())
        rate_rows.append(f"| {name} | {thr:.4f} | {fmt_rate(rep['tpr'])} | {fmt_rate(rep['fpr'])} |")

    # tool content as check_messages decides it: document head, or prompt head at its stricter
    # document threshold; one call per held-out document, through the public function
    docs = [e for e in examples if e.head == "document"]
    doc_flags = [
        float(any(v.flagged for v in check_messages([{"role": "tool", "content": e.text}], injection=inj, moderation=mod)))
        for e in docs
    ]
    rep = rate_report(docs, doc_flags, 0.5, by=())
    rate_rows.append(
        f"| check_messages on tool content (injection.document at {inj.threshold('document'):.4f}, or injection.prompt "
        f"at {inj.document_prompt_threshold():.4f}) | — | {fmt_rate(rep['tpr'])} | {fmt_rate(rep['fpr'])} |"
    )

    user_turn = [{"role": "user", "content": "Can you summarize the attached quarterly report in five bullet points?"}]
    tool_doc = next(e.text for e in examples if e.head == "document" and e.label == 0 and len(e.text) > 1000)
    tool_turn = user_turn + [{"role": "tool", "tool_call_id": "1", "content": tool_doc}]
    cm_user = latencies_ms(lambda _: check_messages(user_turn, injection=inj, moderation=mod), ["x"] * 300)
    cm_tool = latencies_ms(lambda _: check_messages(tool_turn, injection=inj, moderation=mod), ["x"] * 300)

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *(argv or sys.argv[1:])])
    report = "\n".join(
        [
            "# Safety guard benchmark",
            "",
            f"Command: `{command}` (from the repository root)",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}, "
            f"numpy {np.__version__}, torch {torch.__version__} on {torch.get_num_threads()} thread(s), encoder in "
            f"{', '.join(sorted({g.model.dense.precision for g in (inj, mod) if g.model.dense}))}; "
            f"no scikit-learn. Sentence encoder (all-MiniLM-L6-v2) loaded in {enc_ms:.0f} ms, guard files in "
            f"{load_ms:.0f} ms, the moderation guard's encoder ({mod_enc_name}) in {mod_enc_ms:.0f} ms. "
            f"Load average before the run: {load_before}.",
            "",
            "## Latency per request (ms) on the held-out test texts of each head",
            "",
            "Cold: first pass after loading (empty word cache), one measurement per text. Warm: per text the "
            "best of three further passes (removes most pauses caused by other processes on the shared machine). "
            "Encoder: for the heads with dense features, the share of texts of which at least one window "
            "reaches the encoder (a head with a lexical gate embeds only the windows it passes; windows "
            "embedded / windows in all).",
            "",
            "| guard head | encoder | texts | chars median / max | cold p50 | cold p99 | cold max | warm p50 | warm p99 | warm max | warm ms per 1000 chars (median) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *lat_rows,
            "",
            f"`check_messages` (warm, 300 calls): one user turn ({len(user_turn[0]['content'])} chars, 2 checks) "
            f"p50 {np.percentile(cm_user, 50):.3f} ms, p99 {np.percentile(cm_user, 99):.3f} ms; user turn + tool turn "
            f"({len(tool_doc)} chars, 4 checks) p50 {np.percentile(cm_tool, 50):.3f} ms, p99 {np.percentile(cm_tool, 99):.3f} ms. "
            "The same input every call, so the spread between p50 and p99 is scheduling on the shared machine.",
            "",
            "## Rates at the shipped thresholds (held-out test split)",
            "",
            "Targets: TPR >= 0.90 at FPR <= 0.05. Per-set numbers (each benign set's FPR, each attack "
            "category's TPR) are in `src/qlorakit/safety/models/MODEL_CARD.md`.",
            "",
            "| guard head | threshold | TPR | FPR |",
            "|---|---|---|---|",
            *rate_rows,
            "",
        ]
    )
    print(report)
    atomic_write(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
