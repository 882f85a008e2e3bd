"""Helpers of the server tests: run folders over a tiny base, a live server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789", "flood": "sk-flood-0123456789",
        "frugal": "sk-frugal-0123456789"}


def make_run(run_dir: Path, base_dir: Path, *, r: int = 4, alpha: float = 8.0, seed: int = 0,
             scale: float = 0.3, targets: list[str] | None = None) -> Path:
    """A finished-looking run folder: the resolved recipe and an adapter with random A and B."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlorakit.config import load_recipe, dump_recipe
    from qlorakit.lora import attach_lora, lora_layers, save_adapter

    overrides = [f"model.base={base_dir}", f"name={run_dir.name}", f"output_dir={run_dir.parent}", f"lora.r={r}",
                 f"lora.alpha={alpha}"]
    if targets:
        overrides.append("lora.targets=[" + ",".join(targets) + "]")
    recipe = load_recipe(None, overrides)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    attach_lora(model, recipe.lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * scale)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")
    save_adapter(model, run_dir / "adapter", recipe.lora, base_name=str(base_dir))
    return run_dir


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: Any
    cfg: Any
    db: Path
    thread: threading.Thread
    server: Any

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(cfg: Any, hub: Any) -> LiveServer:
    """Run the app with uvicorn in a thread on a free loopback port; return once it accepts."""
    import uvicorn

    from qlorakit.serve import create_app

    app = create_app(cfg, hub)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    return LiveServer(f"http://127.0.0.1:{port}", app, cfg, cfg.default_db(), thread, server)


def server_config(runs: dict[str, Path], db: Path, guards: str = "flag", **limits: int) -> Any:
    """Test settings: small limits; every guard set to ``guards`` ('flag' records verdicts only, so
    that tests about other things do not depend on where the guards draw their lines)."""
    from qlorakit.serve import ApiKey, Guards, ServeConfig, key_digest

    cfg = ServeConfig(adapters={k: str(v) for k, v in runs.items()}, db=str(db), base_id="base",
                      guards=Guards(guards, guards, guards))
    cfg.keys = [ApiKey("alice", key_digest(KEYS["alice"])), ApiKey("bob", key_digest(KEYS["bob"])),
                ApiKey("flood", key_digest(KEYS["flood"]), rpm=5),
                ApiKey("frugal", key_digest(KEYS["frugal"]), tpm=120)]
    cfg.limits.rpm = 10_000  # the tests share keys; 'flood' and 'frugal' carry the tight limits
    cfg.limits.tpm = 1_000_000
    cfg.limits.max_tokens = 24
    cfg.limits.default_max_tokens = 6
    cfg.limits.max_prompt_tokens = 300
    cfg.limits.max_body_bytes = 20_000
    for k, v in limits.items():
        setattr(cfg.limits, k, v)
    cfg.validate()
    return cfg


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"}


def audit_rows(db: Path, sql: str, args: tuple = (), *, expect: int = 1, timeout: float = 10.0) -> list[tuple]:
    """Rows of the audit database, waiting until ``expect`` rows are there: a request's row is written
    just after its response has gone out, so it may lag the client by a moment."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        con = sqlite3.connect(str(db))
        try:
            rows = con.execute(sql, args).fetchall()
        finally:
            con.close()
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


class FakeHub:
    """The hub interface over a real tokenizer, without a model: subclasses supply ``generate`` and
    ``stream`` (a scripted answer, a slow countable one)."""

    base_id = "base"
    adapters: dict[str, Any] = {}
    created = 0
    context_length = 1024

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def model_ids(self) -> list[str]:
        return ["base"]

    def has(self, model_id: str) -> bool:
        return model_id == "base"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        from qlorakit.models import chat_prompt

        return chat_prompt(self.tokenizer, messages)
