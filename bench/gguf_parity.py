"""GGUF parity of the default run in llama.cpp: f16, q8_0 and a 4-bit type, merged and as base + LoRA adapter.

Make the default run first (once), then run this script; it needs llama-cpp-python
(``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install 'qlorakit[gguf-check]'``):

    flock /tmp/qlorakit-cpu.lock qlorakit train name=export-src output_dir=/tmp/runs   # the default recipe
    flock /tmp/qlorakit-cpu.lock python bench/gguf_parity.py --run /tmp/runs/export-src

Each export is written with ``qlorakit.export.export_run`` (the same code as ``qlorakit export``) and
checked in llama.cpp against the tuned model: greedy answers to the golden prompts from the held-out
data, token agreement over the first 32 tokens, the end-of-turn token, the held-out loss. The table
goes to bench/results/export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _versions() -> str:
    import llama_cpp
    import torch
    import transformers
    from importlib.metadata import version

    return (f"llama-cpp-python {llama_cpp.__version__}, gguf {version('gguf')}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def _row(fmt: str, quant: str, r: dict) -> str:
    same = f"{r['stops']['same']}/{r['stops']['source_stopped']}"
    ends = f"{r['forced_stops']['export_stops_there']}/{r['forced_stops']['source_stopped']}"
    return (f"| {fmt} {quant} | {r['artifact']} | {r['forced_agreement']:.1%} | {ends} | {r['token_agreement']:.1%} | "
            f"{r['prefix_agreement']:.1%} | {same} | "
            f"{'yes' if r['tokenizer_ok'] else 'NO'} | {'yes' if r['template_ok'] else 'NO'} | "
            f"{r['source_loss']:.4f} | {r['export_loss']:.4f} | {r['loss_increase']:+.4f} | "
            f"{'passed' if r['passed'] else 'FAILED'} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="/tmp/runs/export-src", help="a finished default run")
    p.add_argument("--out-root", default="/tmp/qlorakit-export-bench", help="where the exports are written")
    p.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_1", "q4_0"])
    p.add_argument("--measure", nargs="*", default=["f16", "q8_0", "q4_1"],
                   help="GGUF types whose exports are measured on this CPU (each also measures the adapter)")
    p.add_argument("--ollama", default="q8_0", help="also export for Ollama with this quant ('' to skip)")
    p.add_argument("--merged", default="bf16", help="also export merged with this dtype ('' to skip)")
    p.add_argument("--results", default=str(REPO / "bench" / "results" / "export.md"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from qlorakit.export import export_run
    from qlorakit.export.parity import llama_cpp_available

    if not llama_cpp_available():
        print("llama-cpp-python is not installed: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install "
              "'qlorakit[gguf-check]'", file=sys.stderr)
        return 2
    run = Path(a.run)
    if not (run / "adapter" / "adapter_model.safetensors").is_file():
        print(f"{run}: not a finished run; make it with:\n  flock /tmp/qlorakit-cpu.lock qlorakit train "
              f"name={run.name} output_dir={run.parent}", file=sys.stderr)
        return 2
    root = Path(a.out_root)
    root.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rows, device, results = [], [], []
    jobs = ([("merged", a.merged)] if a.merged else []) + [("gguf", q) for q in a.quants] \
        + ([("ollama", a.ollama)] if a.ollama else [])
    for fmt, quant in jobs:
        t0 = time.perf_counter()
        kw = {"dtype": quant} if fmt == "merged" else {"quant": quant, "runtime": "llama.cpp"}
        res = export_run(run, fmt, root / f"{fmt}-{quant}", force=True,
                         measure=fmt == "gguf" and quant in a.measure, **kw)
        took = time.perf_counter() - t0
        rep = res.report
        results.append({"format": fmt, "quant": quant, "passed": res.passed, "seconds": round(took, 1),
                        "parity": rep["parity"], "problems": rep["problems"], "on_device": rep.get("on_device")})
        for r in rep["parity"]:
            rows.append(_row(fmt, quant, r))
            print(_row(fmt, quant, r), flush=True)
        for item in (rep.get("on_device") or {}).get("items", []):
            m = item.get("measured") or {}
            files = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in item["files"].items())
            if "error" in m:
                device.append(f"| {fmt} {quant} | {item['what']} | {files} | - | - | not measured: {m['error']} |")
            else:
                device.append(f"| {fmt} {quant} | {item['what']} | {files} | {m['peak_rss_mb']:.0f} MB | "
                              f"{m['tokens_per_s']:.1f} | {m['runtime']}, {m['threads']} threads, load {m['load_average']} |")
        for prob in rep["problems"]:
            print(f"  problem: {prob}", flush=True)
    thresholds = results[0]["parity"][0] if results and results[0]["parity"] else {}
    lines = [
        "# Export parity: the default run in llama.cpp (and the merged export in transformers)",
        "",
        "Command (the run is made once, then exported to each type and checked in llama.cpp):",
        "",
        "```",
        f"flock /tmp/qlorakit-cpu.lock qlorakit train name={run.name} output_dir={run.parent}   # the default recipe",
        f"flock /tmp/qlorakit-cpu.lock python bench/gguf_parity.py --run {run}",
        "```",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, load average {load_before:.1f} at the start "
        f"(other work shares the machine). {_versions()}. Date: {time.strftime('%Y-%m-%d')}.",
        "",
        "Source: the tuned model (the run's NF4 base weights dequantized + LoRA, fp32). Golden prompts: the first "
        f"{results[0]['parity'][0]['prompts'] if rows else '?'} held-out conversations; greedy. Next-token agreement "
        "(the check): the export is fed the source's greedy answer and, at each of its first 32 tokens, picks the "
        "same next token as the source did (teacher forcing; the 'same top token' statistic of llama.cpp's "
        "KL-divergence tool). Ends there: of the answers the source ended with `<|im_end|>`, those where the "
        "export's next token at that position is `<|im_end|>` too. Free-running agreement (reported): both "
        "generate on their own and the positions of the first 32 answer tokens that hold the same token id are "
        "counted (an answer that stops early or runs on disagrees there); after the first near-tie that rounds "
        "the other way, the rest of that answer is compared against a different text, so this figure measures "
        "where answers part, not how far the weights differ; common prefix: share of those positions before the "
        "first difference. Tokenizer: "
        "llama.cpp's tokenization of each templated golden prompt equals the training tokenizer's. Template: the "
        "chat template in the GGUF renders each golden conversation exactly as training did. Same stop: answers "
        "that ended with `<|im_end|>` in the source and end with the same tokens and `<|im_end|>` in llama.cpp.",
        "",
        f"Thresholds: f16/q8_0 at most {thresholds.get('max_token_disagreement', 0.05):.0%} of tokens may differ "
        "and the held-out loss may rise 0.05 nats (export.max_token_disagreement / max_loss_increase); 4- and "
        "5-bit types use export.lossy_max_token_disagreement / lossy_max_loss_increase: their agreement is "
        "measured and recorded here.",
        "",
        "| export | artifact | next-token agreement (32) | ends there | free-running agreement (32) | common prefix "
        "| same stop (free-running) | tokenizer | template | loss tuned | loss export | rise | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "## On-device (this CPU, measured in a fresh process)",
        "",
        "Peak resident memory includes the runtime (Python, the library); tokens/s is answer tokens per second "
        "for one golden prompt, greedy, prompt processing included.",
        "",
        "| export | what runs | files | RAM (peak RSS) | tokens/s | runtime |",
        "|---|---|---|---|---|---|",
        *device,
        "",
    ]
    out = Path(a.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    (root / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
