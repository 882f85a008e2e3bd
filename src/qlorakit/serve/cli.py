"""``qlorakit serve``: an OpenAI-compatible server for tuned adapters over one 4-bit base.

    qlorakit serve --adapter support=runs/support-v1 [--adapter tone=runs/tone-v2]
                   [--config serve.yaml] [--host 127.0.0.1] [--port 8000]
                   [--api-keys-file keys.txt | --no-auth] [--db audit.db]
                   [--rpm N] [--tpm N] [--max-tokens N] [--max-prompt-tokens N] [--max-body-bytes N]
                   [--max-queue N] [--guard input_injection=block|flag|off ...]

Keys come from ``--api-keys-file``, the config's ``auth`` section or ``$QLORAKIT_API_KEYS``
(``ID:KEY`` items); with none, ``--no-auth`` must be given and the server stays on a loopback
address. Flags override the config file (see :mod:`qlorakit.serve.config` for its format).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from .config import GUARD_ACTIONS, ServeConfig, load_config, read_keys_file
from .errors import ServeError

__all__ = ["serve_main", "build_parser", "config_from_args"]

_CHECKS = ("input_injection", "input_harmful", "output_harmful")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlorakit serve", description="An OpenAI-compatible server for tuned adapters.")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="serve the adapter of a run folder under the model id NAME (repeat for more; one base)")
    p.add_argument("--base", metavar="MODEL", help="serve a base model without adapters ('default', a folder, a .gguf)")
    p.add_argument("--base-id", metavar="ID", help="model id of the base alone (default: the base's name)")
    p.add_argument("--config", metavar="FILE", help="server settings (YAML or JSON)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--api-keys-file", metavar="FILE", help="API keys, one 'ID:KEY' or 'ID:sha256:HEX' per line")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (loopback addresses only)")
    p.add_argument("--db", metavar="FILE", help="SQLite audit log and feedback store (default: <first run>/serve.db)")
    p.add_argument("--rpm", type=int, help="requests per minute and key")
    p.add_argument("--tpm", type=int, help="tokens per minute and key")
    p.add_argument("--max-tokens", type=int, help="cap on a request's max_tokens")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted, in tokens")
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted")
    p.add_argument("--max-queue", type=int, help="waiting requests in all before answering 503")
    p.add_argument("--guard", action="append", default=[], metavar="CHECK=ACTION",
                   help=f"set a guard: CHECK in {', '.join(_CHECKS)}; ACTION in {', '.join(GUARD_ACTIONS)}")
    p.add_argument("--no-store-completions", action="store_true",
                   help="keep no prompts or answers (feedback then has nothing to refer to)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from_args(a: argparse.Namespace) -> ServeConfig:
    """The config file (if any) with the flags applied on top; validated."""
    cfg = load_config(a.config)
    for item in a.adapter:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise ServeError(f"--adapter {item!r}: expected NAME=RUN_DIR, e.g. --adapter support=runs/support-v1")
        if name in cfg.adapters and a.config:
            raise ServeError(f"--adapter {name!r}: the config {a.config} already names an adapter {name!r}")
        cfg.adapters[name] = run
    for flag, attr in (("base", "base"), ("base_id", "base_id"), ("host", "host"), ("port", "port"), ("db", "db")):
        if getattr(a, flag) is not None:
            setattr(cfg, attr, getattr(a, flag))
    for flag in ("rpm", "tpm", "max_tokens", "max_prompt_tokens", "max_body_bytes", "max_queue"):
        if getattr(a, flag) is not None:
            setattr(cfg.limits, flag, getattr(a, flag))
    if cfg.limits.default_max_tokens > cfg.limits.max_tokens:
        cfg.limits.default_max_tokens = cfg.limits.max_tokens
    for item in a.guard:
        check, sep, action = item.partition("=")
        if not sep or check not in _CHECKS or action not in GUARD_ACTIONS:
            raise ServeError(f"--guard {item!r}: expected CHECK=ACTION with CHECK in {list(_CHECKS)} and ACTION in "
                             f"{list(GUARD_ACTIONS)}")
        setattr(cfg.guards, check, action)
    if a.api_keys_file:
        cfg.keys += read_keys_file(a.api_keys_file)
    if a.no_auth:
        if cfg.keys:
            raise ServeError("--no-auth was given, but API keys are configured; drop one or the other")
        cfg.no_auth = True
    if a.no_store_completions:
        cfg.store_completions = False
    cfg.validate()
    if cfg.no_auth and not _is_loopback(cfg.host):
        raise ServeError(f"--no-auth serves without keys and so only on a loopback address, not {cfg.host!r}; "
                         "configure API keys to serve on other addresses")
    return cfg


def serve_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="qlorakit serve: %(message)s")
    try:
        cfg = config_from_args(a)
        if cfg.no_auth:
            print("qlorakit serve: WARNING: no API keys (--no-auth): anyone who can reach "
                  f"{cfg.host}:{cfg.port} can use the models", file=sys.stderr)
        import uvicorn

        from .app import create_app
        from .hub import ModelHub

        hub = ModelHub.load(cfg.adapters, base=cfg.base, base_id=cfg.base_id)
        app = create_app(cfg, hub)
    except ServeError as e:
        print(f"qlorakit serve: error: {e}", file=sys.stderr)
        return 2
    print(f"qlorakit serve: models {', '.join(hub.model_ids())} at http://{cfg.host}:{cfg.port}/v1 "
          f"(audit log {cfg.default_db()})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info" if a.verbose else "warning")
    return 0
