"""The server's settings: a YAML or JSON file (``--config``) plus command-line flags.

    # serve.yaml -- every key is optional; flags given on the command line win
    host: 127.0.0.1
    port: 8000
    adapters: {support: runs/support-v1, tone: runs/tone-v2}
    base_id: null                 # model id of the base alone (default: the base's name)
    db: null                      # SQLite audit log + feedback (default: <first run>/serve.db)
    auth:
      keys_file: keys.txt         # lines "ID:KEY" or "ID:sha256:HEX"; '#' starts a comment
      keys:                       # or inline; store hashes, not keys: key_sha256 = sha256(KEY)
        - {id: shop, key_sha256: 9f86d0..., rpm: 120, tpm: 100000}
    limits:
      rpm: 60                     # requests per minute and key
      tpm: 20000                  # tokens (prompt + max_tokens, settled to the real count) per minute and key
      max_body_bytes: 1048576
      max_prompt_tokens: 2048
      max_tokens: 512             # cap on a request's max_tokens
      default_max_tokens: 128     # when a request gives none
      max_queue: 64               # waiting requests in all; beyond it: 503 with Retry-After
      max_queue_per_key: 16       # waiting requests of one key; beyond it: 429 with Retry-After
    guards:                       # block | flag | off
      input_injection: block
      input_harmful: block
      output_harmful: block
    store_completions: true       # keep prompts and answers (needed for feedback)

API keys also come from the environment: ``QLORAKIT_API_KEYS="ID:KEY,ID2:KEY2"`` (a bare ``KEY``
gets the id ``key-<first 8 hex of its sha256>``). Only sha256 digests of keys are kept in memory
and in the audit log.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import ServeError

__all__ = ["ApiKey", "Limits", "Guards", "ServeConfig", "load_config", "parse_keys", "key_digest",
           "ENV_KEYS", "GUARD_ACTIONS"]

ENV_KEYS = "QLORAKIT_API_KEYS"
GUARD_ACTIONS = ("block", "flag", "off")
GuardAction = Literal["block", "flag", "off"]
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def key_digest(key: str) -> str:
    """sha256 hex digest of an API key: what is kept in memory and in the audit log."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class ApiKey:
    id: str
    sha256: str
    rpm: int | None = None  # per-key overrides of the limits
    tpm: int | None = None


@dataclass
class Limits:
    rpm: int = 60
    tpm: int = 20000
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_queue: int = 64
    max_queue_per_key: int = 16


@dataclass
class Guards:
    input_injection: GuardAction = "block"
    input_harmful: GuardAction = "block"
    output_harmful: GuardAction = "block"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    adapters: dict[str, str] = field(default_factory=dict)  # name -> run folder
    base: str | None = None  # serve a base alone (no run folder): 'default', a folder or a .gguf
    base_id: str | None = None
    db: str | None = None
    keys: list[ApiKey] = field(default_factory=list)
    no_auth: bool = False
    limits: Limits = field(default_factory=Limits)
    guards: Guards = field(default_factory=Guards)
    store_completions: bool = True

    def validate(self) -> None:
        """Every problem at once, as one ServeError."""
        errs: list[str] = []
        for f in fields(Limits):
            v = getattr(self.limits, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                errs.append(f"limits.{f.name}: expected a positive integer, got {v!r}")
        if not errs and self.limits.default_max_tokens > self.limits.max_tokens:
            errs.append(f"limits.default_max_tokens ({self.limits.default_max_tokens}) exceeds limits.max_tokens "
                        f"({self.limits.max_tokens})")
        for f in fields(Guards):
            v = getattr(self.guards, f.name)
            if v not in GUARD_ACTIONS:
                errs.append(f"guards.{f.name}: expected one of {list(GUARD_ACTIONS)}, got {v!r}")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            errs.append(f"port: expected an integer 0..65535, got {self.port!r}")
        seen: set[str] = set()
        for k in self.keys:
            if k.id in seen:
                errs.append(f"auth: key id {k.id!r} appears twice")
            seen.add(k.id)
            for lim in ("rpm", "tpm"):
                v = getattr(k, lim)
                if v is not None and (not isinstance(v, int) or v <= 0):
                    errs.append(f"auth key {k.id!r}: {lim} must be a positive integer, got {v!r}")
        digests = [k.sha256 for k in self.keys]
        if len(set(digests)) != len(digests):
            errs.append("auth: the same key is listed under two ids")
        for name in self.adapters:
            if not _ID.match(name):
                errs.append(f"adapter name {name!r}: expected letters, digits, '_', '.', '-' (at most 64)")
        if not self.adapters and not self.base:
            errs.append("nothing to serve: give --adapter NAME=RUN_DIR (or --base MODEL for the base alone)")
        if not self.keys and not self.no_auth:
            errs.append(f"no API keys: set {ENV_KEYS}, auth.keys_file or auth.keys in the config, "
                        "or pass --no-auth to serve without keys (loopback only)")
        if errs:
            raise ServeError("server settings: " + "; ".join(errs))

    def default_db(self) -> Path:
        if self.db:
            return Path(self.db)
        if self.adapters:
            return Path(next(iter(self.adapters.values()))) / "serve.db"
        return Path("qlorakit-serve.db")


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(options)})"


def parse_keys(text: str, where: str, *, numbered: bool = False) -> list[ApiKey]:
    """Keys from ``ID:KEY`` / ``ID:sha256:HEX`` / bare ``KEY`` items (lines or comma-separated)."""
    out: list[ApiKey] = []
    items = [(i, s) for i, line in enumerate(text.splitlines(), 1) for s in line.split("#", 1)[0].split(",")]
    for line_no, raw in items:
        item = raw.strip()
        if not item:
            continue
        loc = f"{where}:{line_no}" if numbered else where
        parts = item.split(":")
        if len(parts) == 1:
            d = key_digest(parts[0])
            out.append(ApiKey(f"key-{d[:8]}", d))
        elif len(parts) == 2:
            kid, key = parts
            if not _ID.match(kid) or not key:
                raise ServeError(f"{loc}: expected ID:KEY with an id of letters, digits, '_', '.', '-', got {kid!r}")
            out.append(ApiKey(kid, key_digest(key)))
        elif len(parts) == 3 and parts[1] == "sha256":
            kid, _, hexd = parts
            if not _ID.match(kid) or not _HEX.match(hexd.lower()):
                raise ServeError(f"{loc}: expected ID:sha256:<64 hex digits>")
            out.append(ApiKey(kid, hexd.lower()))
        else:
            raise ServeError(f"{loc}: expected ID:KEY or ID:sha256:HEX (keys may not contain ':')")
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ServeError(f"{path}: cannot read the server config ({e.strerror})") from e
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ServeError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ServeError(f"{path}{line}: malformed YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ServeError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


def _section(cls: type, data: Any, where: str, path: Path, errs: list[str]) -> Any:
    obj = cls()
    if data is None:
        return obj
    if not isinstance(data, dict):
        errs.append(f"{path}: {where}: expected a mapping, got {type(data).__name__}")
        return obj
    names = [f.name for f in fields(cls)]
    for k, v in data.items():
        if k not in names:
            errs.append(f"{path}: unknown key '{where}.{k}'{_nearest(str(k), names)}")
        else:
            setattr(obj, k, v)
    return obj


def _inline_key(item: Any, i: int, path: Path) -> ApiKey:
    where = f"{path}: auth.keys[{i}]"
    if not isinstance(item, dict):
        raise ServeError(f"{where}: expected a mapping with 'id' and 'key_sha256' (or 'key')")
    allowed = ["id", "key", "key_sha256", "rpm", "tpm"]
    unknown = [k for k in item if k not in allowed]
    if unknown:
        raise ServeError(f"{where}: unknown key {unknown[0]!r}{_nearest(str(unknown[0]), allowed)}")
    kid = item.get("id")
    if not isinstance(kid, str) or not _ID.match(kid):
        raise ServeError(f"{where}.id: expected letters, digits, '_', '.', '-', got {kid!r}")
    if ("key" in item) == ("key_sha256" in item):
        raise ServeError(f"{where}: give exactly one of 'key' and 'key_sha256'")
    if "key" in item:
        if not isinstance(item["key"], str) or not item["key"] or ":" in item["key"]:
            raise ServeError(f"{where}.key: expected a non-empty string without ':'")
        digest = key_digest(item["key"])
    else:
        digest = str(item["key_sha256"]).lower()
        if not _HEX.match(digest):
            raise ServeError(f"{where}.key_sha256: expected 64 hex digits")
    return ApiKey(kid, digest, item.get("rpm"), item.get("tpm"))


def load_config(path: str | Path | None = None, *, env: dict[str, str] | None = None) -> ServeConfig:
    """Settings from a YAML/JSON file (or the defaults), plus keys from ``$QLORAKIT_API_KEYS``.

    Not validated yet: the command line may still fill in adapters and keys; call ``validate()``.
    """
    env = dict(os.environ if env is None else env)
    cfg = ServeConfig()
    errs: list[str] = []
    if path is not None:
        p = Path(path)
        data = _read_file(p)
        top = [f.name for f in fields(ServeConfig) if f.name not in ("keys", "no_auth")] + ["auth"]
        for k, v in data.items():
            if k not in top:
                errs.append(f"{p}: unknown key '{k}'{_nearest(str(k), top)}")
            elif k == "limits":
                cfg.limits = _section(Limits, v, "limits", p, errs)
            elif k == "guards":
                cfg.guards = _section(Guards, v, "guards", p, errs)
            elif k == "adapters":
                if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                    errs.append(f"{p}: adapters: expected a mapping NAME: RUN_DIR")
                else:
                    base = p.parent
                    cfg.adapters = {str(n): str((base / d) if not os.path.isabs(d) else d) for n, d in v.items()}
            elif k == "auth":
                if not isinstance(v, dict):
                    errs.append(f"{p}: auth: expected a mapping with keys_file and/or keys")
                    continue
                for ak in v:
                    if ak not in ("keys_file", "keys"):
                        errs.append(f"{p}: unknown key 'auth.{ak}'{_nearest(str(ak), ['keys_file', 'keys'])}")
                if v.get("keys_file"):
                    kf = Path(v["keys_file"])
                    kf = kf if kf.is_absolute() else p.parent / kf
                    cfg.keys += read_keys_file(kf)
                items = v.get("keys") or []
                if not isinstance(items, list):
                    errs.append(f"{p}: auth.keys: expected a list")
                else:
                    cfg.keys += [_inline_key(it, i, p) for i, it in enumerate(items)]
            elif k == "db" and v is not None:
                cfg.db = str(v if os.path.isabs(str(v)) else p.parent / str(v))
            else:
                setattr(cfg, k, v)
    if env.get(ENV_KEYS, "").strip():
        cfg.keys += parse_keys(env[ENV_KEYS], f"${ENV_KEYS}")
    if errs:
        raise ServeError("; ".join(errs))
    return cfg


def read_keys_file(path: str | Path) -> list[ApiKey]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ServeError(f"{p}: cannot read the API key file ({e.strerror})") from e
    return parse_keys(text, str(p), numbered=True)
