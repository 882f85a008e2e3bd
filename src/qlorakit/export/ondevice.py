"""On-device figures: file size, memory and generation speed of an export on this CPU, measured.

Each measurement runs in a fresh Python process (``python -m qlorakit.export.ondevice ...``) so that
its peak resident memory is the memory serving that model needs, runtime included, and nothing
else loaded by the exporting process. Speed is answer tokens per second for one golden prompt,
greedy, prompt processing included, with all cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["measure", "measure_gguf", "measure_adapter", "measure_merged", "main"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _gguf(model: str, lora: str | None, ids: list[int], n: int) -> dict[str, Any]:
    import llama_cpp

    base_rss = _current_rss_mb()
    t0 = time.perf_counter()
    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(model_path=model, lora_path=lora, n_ctx=len(ids) + n + 8, n_batch=512,
                          logits_all=True, n_threads=threads, verbose=False)
    load_s = time.perf_counter() - t0
    llm.eval(ids[:1])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    for _ in range(n):
        t = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([t])
    dt = time.perf_counter() - t0
    return {"runtime": "llama.cpp (llama-cpp-python %s)" % llama_cpp.__version__, "threads": threads,
            "load_s": round(load_s, 2), "prompt_tokens": len(ids), "generated": n,
            "tokens_per_s": round(n / dt, 1), "peak_rss_mb": round(_rss_mb(), 1),
            "runtime_rss_mb": round(base_rss, 1)}


def _adapter(run_dir: str, prompt: str, n: int) -> dict[str, Any]:
    import torch

    from ..models import generate
    from ..train import load_run

    base_rss = _current_rss_mb()
    t0 = time.perf_counter()
    loaded, _ = load_run(run_dir)
    load_s = time.perf_counter() - t0
    generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=2)  # warm-up
    t0 = time.perf_counter()
    out = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=n)
    dt = time.perf_counter() - t0
    return {"runtime": f"qlorakit (transformers + bitsandbytes 4-bit, {str(loaded.compute_dtype).replace('torch.', '')})",
            "threads": torch.get_num_threads(), "load_s": round(load_s, 2), "prompt_tokens": out.prompt_tokens,
            "generated": out.completion_tokens, "tokens_per_s": round(out.completion_tokens / dt, 1),
            "peak_rss_mb": round(_rss_mb(), 1), "runtime_rss_mb": round(base_rss, 1)}


def _merged(folder: str, prompt: str, n: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_rss = _current_rss_mb()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    load_s = time.perf_counter() - t0
    x = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        model.generate(**x, max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        y = model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    dt = time.perf_counter() - t0
    gen = y.shape[1] - x["input_ids"].shape[1]
    return {"runtime": f"transformers ({str(model.dtype).replace('torch.', '')})", "threads": torch.get_num_threads(),
            "load_s": round(load_s, 2), "prompt_tokens": int(x["input_ids"].shape[1]), "generated": int(gen),
            "tokens_per_s": round(gen / dt, 1), "peak_rss_mb": round(_rss_mb(), 1), "runtime_rss_mb": round(base_rss, 1)}


def measure(args: list[str], timeout: float = 900.0) -> dict[str, Any]:
    """Run one measurement in a fresh process; a failure is returned as ``{"error": ...}``, not raised."""
    cmd = [sys.executable, "-m", "qlorakit.export.ondevice", *args]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {p.returncode}: {tail[0][:300]}"}
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as e:
        return {"error": f"unreadable measurement output ({e})"}
    res["load_average"] = round(os.getloadavg()[0], 2)
    return res


def measure_gguf(model: Path, ids: list[int], n: int, lora: Path | None = None) -> dict[str, Any]:
    args = ["gguf", str(model), "--ids", json.dumps(ids), "--tokens", str(n)]
    if lora is not None:
        args += ["--lora", str(lora)]
    return measure(args)


def measure_adapter(run_dir: Path, prompt: str, n: int) -> dict[str, Any]:
    return measure(["adapter", str(run_dir), "--prompt", prompt, "--tokens", str(n)])


def measure_merged(folder: Path, prompt: str, n: int) -> dict[str, Any]:
    return measure(["merged", str(folder), "--prompt", prompt, "--tokens", str(n)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qlorakit.export.ondevice")
    p.add_argument("kind", choices=["gguf", "adapter", "merged"])
    p.add_argument("path")
    p.add_argument("--lora")
    p.add_argument("--ids", help="prompt token ids as a JSON list (gguf)")
    p.add_argument("--prompt", help="templated prompt text (adapter, merged)")
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.disable(logging.WARNING)
    if a.kind == "gguf":
        res = _gguf(a.path, a.lora, json.loads(a.ids), a.tokens)
    elif a.kind == "adapter":
        res = _adapter(a.path, a.prompt, a.tokens)
    else:
        res = _merged(a.path, a.prompt, a.tokens)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
