#!/usr/bin/env python
"""Load test of ``qlorakit serve`` on loopback, and an API fuzzing run against its OpenAPI spec.

    # a real short run to serve (the default base, SmolLM2-135M-Instruct, with its adapter)
    flock /tmp/qlorakit-cpu.lock qlorakit train name=serve-bench output_dir=/tmp/runs train.max_steps=10
    # the load test (and schemathesis), results in bench/results/serve.md
    flock /tmp/qlorakit-cpu.lock python bench/bench_serve.py --run /tmp/runs/serve-bench

Starts the server as a subprocess on a free loopback port with ``--clients`` API keys, guards on
(the defaults: block), then runs ``--clients`` concurrent clients (asyncio + httpx), each with its
own key, each sending ``--requests`` chat completions one after another (every other one streamed),
``max_tokens`` fixed, greedy, questions from the packaged held-out support set. Bounded: a fixed
number of requests and a wall-clock limit (``--timeout``). Records requests/s, latency p50/p90/p99,
time to first token of the streamed ones, the queue wait from the audit log, generated tokens/s
and the spread across clients (the fair scheduler serves keys round-robin). Any error (non-200
status, a stream without ``[DONE]``, a timeout) is counted and makes the exit code 1.

``--schemathesis N`` then fuzzes the same server with schemathesis (``st run``, every check, N
examples per operation) and records the summary; any failure makes the exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import write_atomic  # noqa: E402

SAMPLE_EVAL = REPO / "src" / "qlorakit" / "data" / "sample" / "support_eval.jsonl"


@dataclass
class Result:
    client: int
    ok: bool
    latency_s: float
    stream: bool
    ttft_s: float | None = None
    completion_tokens: int = 0
    error: str = ""


@dataclass
class Run:
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0


def _questions() -> list[str]:
    out = []
    for line in SAMPLE_EVAL.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        q = (r.get("instruction", "") + ("\n\n" + r["input"] if r.get("input") else "")).strip()
        if q:
            out.append(q)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


async def _one(c: httpx.AsyncClient, key: str, body: dict[str, Any], stream: bool, client: int) -> Result:
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not stream:
            r = await c.post("/v1/chat/completions", json=body, headers=headers)
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                return Result(client, False, dt, False, error=f"{r.status_code} {r.text[:200]}")
            return Result(client, True, dt, False, completion_tokens=r.json()["usage"]["completion_tokens"])
        ttft, done, tokens = None, False, 0
        async with c.stream("POST", "/v1/chat/completions", headers=headers,
                            json=dict(body, stream=True, stream_options={"include_usage": True})) as r:
            if r.status_code != 200:
                return Result(client, False, time.perf_counter() - t0, True,
                              error=f"{r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(client, False, time.perf_counter() - t0, True, error=str(chunk["error"])[:200])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if ttft is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
        dt = time.perf_counter() - t0
        return Result(client, done, dt, True, ttft, tokens, "" if done else "stream ended without [DONE]")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        return Result(client, False, time.perf_counter() - t0, stream, error=f"{type(e).__name__}: {e}")


async def _load_test(url: str, keys: list[str], model: str, requests: int, max_tokens: int,
                     timeout: float) -> Run:
    qs = _questions()
    run = Run()

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            for j in range(requests):
                q = qs[(i * requests + j) % len(qs)]
                body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                        "temperature": 0}
                run.results.append(await _one(c, keys[i], body, stream=(i + j) % 2 == 1, client=i))

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(len(keys)))), timeout)
    run.wall_s = time.perf_counter() - t0
    return run


def _queue_ms(db: Path) -> list[float]:
    con = sqlite3.connect(str(db))
    try:
        return [r[0] for r in con.execute("SELECT queue_ms FROM requests WHERE status=200 AND queue_ms IS NOT NULL "
                                          "AND endpoint='POST /v1/chat/completions' AND key_id LIKE 'client%'")]
    finally:
        con.close()


def _schemathesis(url: str, key: str, examples: int, timeout: float) -> tuple[int, str, float]:
    exe = Path(sys.executable).with_name("st")
    cmd = [str(exe), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}", "--checks", "all",
           "--max-examples", str(examples), "--workers", "1", "--seed", "1234"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp,
                           env=dict(os.environ, NO_COLOR="1"))
    out = p.stdout + p.stderr
    keep = [ln.strip() for ln in out.splitlines()
            if any(w in ln for w in ("generated", "passed", "failed", "Selected", "Tested", "Coverage", "Fuzzing",
                                     "Stateful", "Examples", "ST1", "ST2", "ST3", "5xx", "Server error"))]
    return p.returncode, "\n".join(keep[-20:]), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished run folder (made by 'qlorakit train')")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=900, help="wall-clock limit of the load test, seconds")
    ap.add_argument("--schemathesis", type=int, default=0, metavar="N", help="also fuzz with N examples per operation")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "serve.md"))
    a = ap.parse_args(argv)
    run_dir = Path(a.run)
    if not (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        print(f"{run_dir}: not a finished run; make one with:\n  flock /tmp/qlorakit-cpu.lock qlorakit train "
              f"name={run_dir.name} output_dir={run_dir.parent} train.max_steps=10", file=sys.stderr)
        return 2
    if a.clients < 1 or a.requests < 1:
        ap.error("--clients and --requests must be positive")
    keys = [f"sk-bench-{i:02d}-{os.urandom(6).hex()}" for i in range(a.clients)]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="qlorakit-bench-serve-") as tmp:
        db = Path(tmp) / "serve.db"
        env = dict(os.environ, HF_HUB_OFFLINE="1",
                   QLORAKIT_API_KEYS=",".join(f"client{i:02d}:{k}" for i, k in enumerate(keys)))
        cmd = [sys.executable, "-m", "qlorakit", "serve", "--adapter", f"bench={run_dir}", "--port", str(port),
               "--db", str(db), "--rpm", "100000", "--tpm", "100000000", "--max-queue", str(4 * a.clients),
               "--max-tokens", str(max(a.max_tokens, 16))]
        log = open(Path(tmp) / "server.log", "w")
        t_start = time.perf_counter()
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 600
            while True:
                if server.poll() is not None:
                    log.flush()
                    raise SystemExit(f"server exited with {server.returncode}:\n"
                                     + (Path(tmp) / "server.log").read_text()[-3000:])
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("server did not come up in 600 s")
                time.sleep(0.5)
            startup_s = time.perf_counter() - t_start
            warm = httpx.post(f"{url}/v1/chat/completions", timeout=300, headers={"Authorization": f"Bearer {keys[0]}"},
                              json={"model": "bench", "messages": [{"role": "user", "content": "Hello"}],
                                    "max_tokens": a.max_tokens, "temperature": 0})
            if warm.status_code != 200:
                raise SystemExit(f"warm-up request failed: {warm.status_code} {warm.text}")
            print(f"server up in {startup_s:.1f} s; {a.clients} clients x {a.requests} requests ...", flush=True)
            run = asyncio.run(_load_test(url, keys, "bench", a.requests, a.max_tokens, a.timeout))
            load_after = _load()
            queue = _queue_ms(db)
            st = _schemathesis(url, keys[0], a.schemathesis, 900) if a.schemathesis else None
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    res = run.results
    ok = [r for r in res if r.ok]
    errors = [r for r in res if not r.ok]
    lat = [r.latency_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.stream and r.ttft_s is not None]
    per_client = [statistics.mean(r.latency_s for r in ok if r.client == c) for c in range(a.clients)
                  if any(r.client == c for r in ok)]
    gen_tokens = sum(r.completion_tokens for r in ok)
    rps = len(ok) / run.wall_s
    lines = [
        "# qlorakit serve: load test on loopback" + (" and API fuzzing" if st else ""),
        "",
        "Command (from the repository root, after the training command in the script's docstring):",
        "",
        "    flock /tmp/qlorakit-cpu.lock python bench/bench_serve.py "
        + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
        "",
        f"Machine: {_cpu()}, {os.cpu_count()} CPUs (shared with other work), Python {platform.python_version()}. "
        f"Load average (1/5/15 min) before: {load_before}; after: {load_after}.",
        f"Served: the adapter of `{run_dir}` over its base (4-bit NF4), one worker thread, guards on "
        f"(block); server start to healthy: {startup_s:.1f} s.",
        f"Load: {a.clients} concurrent clients, one API key each, {a.requests} chat completions each "
        f"({len(res)} in all, every other one streamed), max_tokens {a.max_tokens}, greedy, questions from the "
        "packaged held-out support set.",
        "",
        "| requests | errors | wall s | requests/s | latency p50 s | p90 s | p99 s | max s | TTFT p50 s (streamed) "
        "| queue wait p50 s | generated tokens/s | per-client mean latency min / max s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {len(res)} | {len(errors)} | {run.wall_s:.1f} | {rps:.2f} | {_pct(lat, .5):.2f} | {_pct(lat, .9):.2f} "
        f"| {_pct(lat, .99):.2f} | {max(lat) if lat else float('nan'):.2f} | {_pct(ttft, .5):.2f} "
        f"| {_pct(queue, .5) / 1000:.2f} | {gen_tokens / run.wall_s:.1f} "
        f"| {min(per_client, default=float('nan')):.2f} / {max(per_client, default=float('nan')):.2f} |",
        "",
        "One generation runs at a time (the adapter is switched per request under a single worker), so "
        "requests/s is the model's sequential speed and latency grows with the number of waiting clients; "
        "the small spread of per-client mean latency is the round-robin scheduler's fairness.",
    ]
    if errors:
        lines += ["", "Errors:", ""] + [f"- client {r.client}: {r.error}" for r in errors[:20]]
    if st is not None:
        code, summary, secs = st
        lines += ["", "## schemathesis", "",
                  f"`st run <server>/openapi.json -H 'Authorization: Bearer ...' --checks all --max-examples "
                  f"{a.schemathesis} --workers 1 --seed 1234` against the same server ({secs:.0f} s): exit code {code} "
                  f"({'no failures: no 5xx and every other check passed' if code == 0 else 'FAILURES'}).", "",
                  "```", summary, "```"]
    text = "\n".join(lines) + "\n"
    write_atomic(Path(a.out), text)
    print(text)
    return 1 if errors or (st is not None and st[0] != 0) else 0


if __name__ == "__main__":
    sys.exit(main())
