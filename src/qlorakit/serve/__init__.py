"""An OpenAI-compatible server for tuned adapters: one 4-bit base, adapters switched per request,
API keys, rate limits, guards on the way in and out, an audit log and a feedback store.

    >>> from qlorakit.serve import ModelHub, create_app, load_config
    >>> cfg = load_config("serve.yaml"); cfg.adapters = {"support": "runs/support-v1"}; cfg.validate()
    >>> app = create_app(cfg, ModelHub.load(cfg.adapters))      # a FastAPI app; run it with uvicorn

or ``qlorakit serve --adapter support=runs/support-v1`` (:mod:`qlorakit.serve.cli`).
"""

from .config import ApiKey, Guards, Limits, ServeConfig, key_digest, load_config, parse_keys, read_keys_file
from .errors import APIError, ServeError
from .guarding import OUTPUT_REFUSAL, GuardOutcome, GuardPolicy
from .limits import RateLimiter
from .scheduler import FairScheduler, QueueFull
from .store import SCHEMA_VERSION, AuditRecord, AuditStore

__all__ = [
    "APIError",
    "ApiKey",
    "AuditRecord",
    "AuditStore",
    "FairScheduler",
    "GuardOutcome",
    "GuardPolicy",
    "Guards",
    "Limits",
    "ModelHub",
    "OUTPUT_REFUSAL",
    "QueueFull",
    "RateLimiter",
    "SCHEMA_VERSION",
    "ServeConfig",
    "ServeError",
    "create_app",
    "key_digest",
    "load_config",
    "parse_keys",
    "read_keys_file",
    "serve_main",
]


def __getattr__(name: str):  # torch, transformers and fastapi load only when the server is used
    if name == "ModelHub":
        from .hub import ModelHub

        return ModelHub
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "serve_main":
        from .cli import serve_main

        return serve_main
    raise AttributeError(f"module 'qlorakit.serve' has no attribute {name!r}")
