"""The OpenAI-compatible HTTP API.

    GET  /health                  liveness, served models and queue length (no key needed)
    GET  /v1/models               the base model id and one id per adapter
    GET  /v1/models/{model}
    POST /v1/chat/completions     chat, streaming (server-sent events) or not
    POST /v1/completions          plain text completion, streaming or not
    POST /v1/feedback             a rating and/or correction of a completion

Every ``/v1`` request passes the :class:`Gate` first: a request id, the API key (401), the
per-key request limit (429 + ``Retry-After``) and the body size limit (413); then the handler checks
the body (400 in the OpenAI error shape, never FastAPI's 422), the model (404 naming the served
ones), the prompt length and ``max_tokens`` (400), the per-key token limit (429), the input guards,
and queues the generation on the fair scheduler (503 or 429 with ``Retry-After`` when full). A
client that disconnects before its answer is complete takes its generation with it: a queued one
never runs, one under way stops at its next token (streamed or not), and what it cost still counts
against the key (the tokens made; for a stream, the tokens it reserved). Each request leaves one row
in the audit log (status 499 for a client that left before the answer began).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ApiKey, ServeConfig, key_digest
from .errors import (
    APIError,
    bad_request,
    error_body,
    not_found,
    overloaded,
    policy_violation,
    rate_limited,
    too_large,
    unauthorized,
)
from .guarding import OUTPUT_REFUSAL, GuardOutcome, GuardPolicy
from .limits import Denied, RateLimiter, Reservation
from .scheduler import FairScheduler, QueueFull
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    FeedbackReceipt,
    FeedbackRequest,
    Health,
    ModelCard,
    ModelList,
)
from .store import AuditRecord, AuditStore

__all__ = ["create_app", "ServerState"]

log = logging.getLogger(__name__)

ANONYMOUS = ApiKey("anonymous", "")
_GUARD_HEADER = "X-Qlorakit-Guard"
_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse, "description": d}
    for s, d in ((400, "invalid request, prompt too long, or blocked by a guard"), (401, "missing or wrong API key"),
                 (404, "unknown model or completion"), (413, "request body too large"),
                 (429, "rate limit or per-key queue limit; see Retry-After"),
                 (503, "server queue full; see Retry-After"))
}
# request fields that would change the answer and are not supported: name -> "is it set?" test
_UNSUPPORTED = {
    "logprobs": lambda v: v not in (None, False, 0),
    "top_logprobs": lambda v: v not in (None, 0),
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "function_call": lambda v: v not in (None, "none", "auto"),
    "response_format": lambda v: not (v is None or (isinstance(v, dict) and v.get("type") == "text")),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v),
    "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v not in (None, ""),
    "best_of": lambda v: v not in (None, 1),
}
_HOLD_CHARS = 24  # streamed text waits for the output guard in pieces of at least this many characters
DISCONNECT_POLL_S = 0.25  # how often a request waiting for its answer checks that its client is still there
_GREEDY_BELOW = 1e-4  # temperatures below this decode greedily (dividing logits by ~0 overflows)


@dataclass
class RequestContext:
    request_id: str
    audit: AuditRecord
    t0: float = field(default_factory=time.monotonic)
    key: ApiKey | None = None
    reservation: Reservation | None = None


@dataclass
class ServerState:
    cfg: ServeConfig
    hub: Any  # ModelHub (or anything with its interface)
    store: AuditStore
    guards: GuardPolicy
    scheduler: FairScheduler
    limiter: RateLimiter = field(default_factory=RateLimiter)
    keys: dict[str, ApiKey] = field(default_factory=dict)  # sha256 -> key

    def limits_of(self, key: ApiKey) -> tuple[int, int]:
        return key.rpm or self.cfg.limits.rpm, key.tpm or self.cfg.limits.tpm


# ---------------------------------------------------------------------------------------------
# the gate: request id, auth, request rate, body size, audit row


async def _send_error(send: Any, err: APIError, request_id: str) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """Pure ASGI middleware in front of every route (see the module docstring)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    def _authenticate(self, headers: dict[bytes, bytes]) -> ApiKey:
        if self.state.cfg.no_auth:
            return ANONYMOUS
        raw = headers.get(b"authorization", b"").decode("latin-1").strip()
        scheme, _, token = raw.partition(" ")
        if not raw:
            raise unauthorized("Missing API key: send it as 'Authorization: Bearer YOUR_KEY'.")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Malformed Authorization header: expected 'Bearer YOUR_KEY'.")
        key = self.state.keys.get(key_digest(token.strip()))
        if key is None:
            raise unauthorized("Incorrect API key provided.")
        return key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        st = self.state
        path, method = scope["path"], scope["method"]
        rid = f"req-{uuid.uuid4().hex[:24]}"
        ctx = RequestContext(rid, AuditRecord(rid, f"{method} {path}"))
        scope.setdefault("state", {})["ctx"] = ctx
        status: list[int] = []

        async def send_wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        guarded = path.startswith("/v1/")
        try:
            headers = dict(scope.get("headers") or [])
            if guarded:
                ctx.key = self._authenticate(headers)
                ctx.audit.key_id, ctx.audit.key_sha256 = ctx.key.id, ctx.key.sha256 or None
                rpm, _ = st.limits_of(ctx.key)
                got = st.limiter.admit(ctx.key.id, rpm=rpm)
                if isinstance(got, Denied):
                    raise rate_limited(f"Rate limit reached for key {ctx.key.id!r}: {got.limit} requests per "
                                       f"minute. Retry after {got.retry_after_s:.1f} s.", got.retry_after_s,
                                       code="rate_limit_requests")
                ctx.reservation = got
            receive = await self._limited_body(headers, method, receive)
            await self.app(scope, receive, send_wrapped)
        except APIError as e:
            ctx.audit.error_code = e.code
            if not status:
                await _send_error(send_wrapped, e, rid)
        except BaseException:
            if not status:
                status.append(500)
            ctx.audit.error_code = ctx.audit.error_code or "internal_error"
            raise
        finally:
            if guarded:
                ctx.audit.status = status[0] if status else 499  # 499: the client left before an answer
                ctx.audit.latency_ms = (time.monotonic() - ctx.t0) * 1000
                if ctx.reservation is not None and ctx.audit.status != 200 and ctx.audit.prompt_tokens is None:
                    st.limiter.settle(ctx.reservation, 0)  # refused before generating: no tokens used
                try:
                    st.store.log_request(ctx.audit)
                except Exception:  # the answer is out; a failed audit write is logged, not re-raised over it
                    log.exception("could not write the audit row of %s", rid)

    async def _limited_body(self, headers: dict[bytes, bytes], method: str, receive: Any) -> Any:
        limit = self.state.cfg.limits.max_body_bytes
        if method not in ("POST", "PUT", "PATCH"):
            return receive
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError as e:
                raise bad_request("Malformed Content-Length header.") from e
            if n > limit:
                raise too_large(f"Request body of {n} bytes exceeds the limit of {limit} bytes.")
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise APIError(499, "client disconnected", "client_closed")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(f"Request body exceeds the limit of {limit} bytes.")
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# ---------------------------------------------------------------------------------------------
# request checks shared by both generation endpoints


def _one_branch(errs: list[dict[str, Any]], body: Any) -> list[dict[str, Any]]:
    """Errors of a union body (the feedback forms) as if the body had only the form it chose by
    its ``scale``; without the form's name in ``loc``."""
    forms = {str(e["loc"][1]) for e in errs if len(e.get("loc", ())) > 1 and str(e["loc"][1]).endswith("Feedback")}
    if not forms:
        return errs
    chosen = "StarsFeedback" if isinstance(body, dict) and body.get("scale") == "stars" else "ThumbsFeedback"
    mine = [e for e in errs if len(e.get("loc", ())) > 1 and e["loc"][1] == chosen]
    return [{**e, "loc": (e["loc"][0], *e["loc"][2:])} for e in mine] or errs


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param(loc: Any) -> str:
    """A validation error's location as OpenAI names a parameter: ``messages[0].content``, without
    "body" and without the type a union member was tried as (pydantic's ``str``, ``constrained-str``,
    ``list[ContentPart]``...)."""
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
            continue
        x = str(x)
        if x == "body" or x in _TYPE_TAGS or "[" in x or "-" in x:
            continue
        out += f".{x}" if out else x
    return out


def _check_unsupported(body: Any) -> None:
    fields = dict(body.model_extra or {})
    for name, is_set in _UNSUPPORTED.items():
        if name in fields and is_set(fields[name]):
            raise bad_request(f"'{name}' is not supported by this server (value {fields[name]!r}).", param=name,
                              code="unsupported_parameter")


def _is_json_type(content_type: str) -> bool:
    """application/json or another JSON media type (``+json``), with or without parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _utf8(text: str, param: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param}: text is not valid Unicode ({e.reason} at position {e.start}).", param=param) from e
    return text


def _flatten_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """OpenAI messages -> plain role/content strings for the chat template and the guards."""
    out = []
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        for name in ("tool_calls", "function_call"):  # the model cannot see them: refused, not dropped
            if (m.model_extra or {}).get(name):
                raise bad_request(f"messages[{i}].{name}: tool and function calls are not supported by this server "
                                  "(pass tool results as 'tool' or 'user' messages with text content).",
                                  param=f"messages[{i}].{name}", code="unsupported_parameter")
        if m.content is None:
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            text = "\n".join(p.text for p in m.content)  # the schema admits text parts only
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": _utf8(text, where)})
    return out


def _sampling(body: Any, st: ServerState, max_tokens: int) -> dict[str, Any]:
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    stop = body.stop
    if isinstance(stop, str):
        stop = [stop]
    stop = [_utf8(s, "stop") for s in (stop or []) if s]
    return {"max_new_tokens": max_tokens, "temperature": 0.0 if temperature < _GREEDY_BELOW else temperature,
            "top_p": 1.0 if body.top_p is None else float(body.top_p), "stop": stop or None, "seed": body.seed}


def _max_tokens(requested: int | None, st: ServerState, param: str = "max_tokens") -> int:
    lim = st.cfg.limits
    if requested is None:
        return lim.default_max_tokens
    if requested > lim.max_tokens:
        raise bad_request(f"{param} is {requested}, above this server's limit of {lim.max_tokens}.",
                          param=param, code="max_tokens_exceeded")
    return requested


def _check_length(st: ServerState, n_prompt: int, max_tokens: int) -> None:
    """400 for a prompt that is empty, longer than this server takes, or too long for the model."""
    lim = st.cfg.limits
    if n_prompt == 0:
        raise bad_request("The prompt is empty.", param="prompt")
    if n_prompt > lim.max_prompt_tokens:
        raise bad_request(f"The prompt has {n_prompt} tokens, above this server's limit of {lim.max_prompt_tokens}.",
                          param="messages", code="context_length_exceeded")
    ctxlen = st.hub.context_length
    if ctxlen and n_prompt + max_tokens > ctxlen:
        raise bad_request(f"This model's context is {ctxlen} tokens; the prompt ({n_prompt}) plus max_tokens "
                          f"({max_tokens}) is {n_prompt + max_tokens}. Shorten the prompt or lower max_tokens.",
                          param="max_tokens", code="context_length_exceeded")


def _admit_tokens(ctx: RequestContext, st: ServerState, n_prompt: int, max_tokens: int) -> None:
    """Reserve the request's tokens against its key's per-minute limit (429 when it is spent)."""
    assert ctx.key is not None and ctx.reservation is not None  # set by the gate on every /v1 route
    _, tpm = st.limits_of(ctx.key)
    need = n_prompt + max_tokens
    if need > tpm:
        raise bad_request(f"This request may use {need} tokens (prompt {n_prompt} + max_tokens {max_tokens}), more "
                          f"than key {ctx.key.id!r} may use per minute ({tpm}). Lower max_tokens or shorten the "
                          "prompt.", param="max_tokens", code="tokens_exceed_limit")
    denied = st.limiter.reserve(ctx.reservation, need, tpm=tpm)
    if denied is not None:
        raise rate_limited(f"Rate limit reached for key {ctx.key.id!r}: {tpm} tokens per minute (this request "
                           f"reserves {need}). Retry after {denied.retry_after_s:.1f} s.", denied.retry_after_s,
                           code="rate_limit_tokens")


def _submit(st: ServerState, ctx: RequestContext, fn: Any) -> Any:
    assert ctx.key is not None
    try:
        return st.scheduler.submit(ctx.key.id, fn)
    except QueueFull as e:
        if e.scope == "server":
            raise overloaded(f"The server is busy ({e.limit} requests waiting). Retry after "
                             f"{e.retry_after_s:.0f} s.", e.retry_after_s) from e
        raise rate_limited(f"Key {ctx.key.id!r} already has {e.limit} requests waiting. Retry after "
                           f"{e.retry_after_s:.0f} s.", e.retry_after_s, code="too_many_queued") from e


async def _unless_client_gone(request: Request, st: ServerState, ctx: RequestContext, fut: Any,
                              cancel: threading.Event) -> Any:
    """The result of the queued generation ``fut``, watching the connection meanwhile.

    When the client disconnects first (a client timeout, a closed tab), a generation still waiting in
    the queue is taken out of it, and one under way is stopped at its next token (``cancel``); its
    tokens are counted against the key, and the request ends as 499. Without this, an abandoned long
    answer would hold the one generation worker, and every request queued behind it would wait.
    """
    waiter = asyncio.wrap_future(fut)
    while True:
        done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiter.result()
        if await request.is_disconnected():
            break
    cancel.set()
    if not fut.cancel():  # under way (a queued job is cancelled and never runs): wait for its next token
        result = await waiter
        # the tokens it made count against the key's token limit
        ctx.audit.prompt_tokens, ctx.audit.completion_tokens = result.prompt_tokens, result.completion_tokens
        ctx.audit.finish_reason = result.finish_reason
        if ctx.reservation is not None:
            st.limiter.settle(ctx.reservation, result.prompt_tokens + result.completion_tokens)
    raise APIError(499, "client disconnected before the answer was ready", "client_closed")


def _guard_headers(outcome: GuardOutcome) -> dict[str, str]:
    marks = [f"blocked={c}" for c in outcome.blocked] + [f"flagged={c}" for c in outcome.flagged]
    return {_GUARD_HEADER: ",".join(marks)} if marks else {}


# ---------------------------------------------------------------------------------------------
# the app


def create_app(cfg: ServeConfig, hub: Any, *, store: AuditStore | None = None,
               guards: GuardPolicy | None = None) -> FastAPI:
    """The FastAPI app over a loaded :class:`~qlorakit.serve.hub.ModelHub`; ``cfg`` must be validated."""
    st = ServerState(cfg, hub, store or AuditStore(cfg.default_db()), guards or GuardPolicy(cfg.guards),
                     FairScheduler(cfg.limits.max_queue, cfg.limits.max_queue_per_key))
    st.keys = {k.sha256: k for k in cfg.keys}
    bearer = HTTPBearer(auto_error=False, description="an API key of this server")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        st.scheduler.close()

    app = FastAPI(title="qlorakit serve", version="1", description=__doc__, lifespan=lifespan,
                  openapi_tags=[{"name": "openai", "description": "OpenAI-compatible endpoints"}])
    app.state.qlorakit = st

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        ctx = request.scope.get("state", {}).get("ctx")
        if ctx is not None:
            ctx.audit.error_code = exc.code or exc.type
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = _one_branch(list(exc.errors()), exc.body)
        first = errs[0] if errs else {}
        ctype = request.headers.get("content-type", "")
        if first.get("type") == "json_invalid":
            param = None
            msg = f"The body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})."
        elif tuple(first.get("loc", ())) == ("body",) and not _is_json_type(ctype):
            # FastAPI reads a body as JSON only under a JSON content type (`curl -d` sends a form type)
            param = None
            msg = (f"The request's Content-Type is {ctype!r}; expected 'application/json' with a JSON body."
                   if ctype else "The request has no Content-Type; expected 'application/json' with a JSON body.")
        else:
            param = _param(first.get("loc", ())) or None
            msg = "; ".join(f"{_param(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errs[:5])
        ctx = request.scope.get("state", {}).get("ctx")
        if ctx is not None:
            ctx.audit.error_code = "invalid_request"
        return JSONResponse(error_body(msg, "invalid_request_error", param, None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error: %s: %s", type(exc).__name__, exc)
        return JSONResponse(error_body(f"Internal error ({type(exc).__name__}).", "server_error", None,
                                       "internal_error"), status_code=500)

    # ---- health and models ------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["ops"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": hub.model_ids(), "queue": st.scheduler.waiting(),
                "busy": st.scheduler.busy}

    def _card(mid: str) -> dict[str, Any]:
        if mid == hub.base_id:
            return {"id": mid, "object": "model", "created": hub.created, "owned_by": "qlorakit", "root": mid,
                    "parent": None}
        return {"id": mid, "object": "model", "created": hub.adapters[mid].created, "owned_by": "qlorakit",
                "root": hub.base_id, "parent": hub.base_id}

    def _model_id(name: str) -> str:
        if not hub.has(name):
            raise not_found(f"The model {name!r} does not exist on this server; it serves: "
                            f"{', '.join(hub.model_ids())}.", param="model", code="model_not_found")
        return name

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["openai"],
             dependencies=[_security(bearer)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_card(m) for m in hub.model_ids()]}

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=_ERRORS, tags=["openai"],
             dependencies=[_security(bearer)])
    async def get_model(model: str) -> dict[str, Any]:
        return _card(_model_id(model))

    # ---- generation ---------------------------------------------------------------------------
    async def _run(request: Request, body: Any, kind: str) -> Any:
        ctx: RequestContext = request.scope["state"]["ctx"]
        ctx.audit.model = body.model
        ctx.audit.stream = bool(body.stream)
        _check_unsupported(body)
        if body.stream_options is not None and not body.stream:
            raise bad_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        model_id = _model_id(body.model)
        if kind == "chat":
            messages = _flatten_messages(body)
            stored_prompt: Any = messages
            try:
                prompt = hub.chat_prompt(messages)
            except Exception as e:  # jinja's TemplateError and friends: the template refused these messages
                raise bad_request(f"messages: the model's chat template cannot render them ({e}).",
                                  param="messages") from e
            _max_tokens(body.max_tokens, st)  # both fields are checked; the newer one wins
            max_tokens = _max_tokens(body.max_completion_tokens, st, "max_completion_tokens") \
                if body.max_completion_tokens is not None else _max_tokens(body.max_tokens, st)
        else:
            prompt = _utf8(body.prompt if isinstance(body.prompt, str) else body.prompt[0], "prompt")
            stored_prompt = prompt
            max_tokens = _max_tokens(body.max_tokens, st)
        # lengths first: the guards' models never read a prompt that is refused anyway
        n_prompt = hub.count_tokens(prompt)
        _check_length(st, n_prompt, max_tokens)
        if kind == "chat":
            outcome = await asyncio.to_thread(st.guards.check_messages, messages)
        else:
            outcome = await asyncio.to_thread(st.guards.check_prompt, prompt)
        ctx.audit.guard_verdicts = list(outcome.verdicts)
        ctx.audit.guard_action = outcome.action
        if outcome.blocked:
            raise policy_violation(f"The request was blocked by the input guard ({', '.join(outcome.blocked)}).",
                                   [v for v in outcome.verdicts if v["action"] == "block"])
        _admit_tokens(ctx, st, n_prompt, max_tokens)
        params = _sampling(body, st, max_tokens)
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = _guard_headers(outcome)
        if body.stream:
            return _stream(request, ctx, kind, model_id, prompt, stored_prompt, params, n_prompt, cid, created,
                           outcome, headers, bool(body.stream_options and body.stream_options.include_usage))
        t_queued = time.monotonic()
        started: list[float] = []
        cancel = threading.Event()  # set when the client has gone: the generation stops at its next token

        def work() -> Any:
            started.append(time.monotonic())
            return hub.generate(model_id, prompt, cancel=cancel, **params)

        result = await _unless_client_gone(request, st, ctx, _submit(st, ctx, work), cancel)
        ctx.audit.queue_ms = (started[0] - t_queued) * 1000 if started else None
        text, finish = result.text, result.finish_reason
        out = await asyncio.to_thread(st.guards.check_output, text)
        total = outcome.merge(out)
        if out.blocked:
            text, finish = OUTPUT_REFUSAL, "content_filter"
        _finish(ctx, st, total, result.prompt_tokens, result.completion_tokens, finish, cid)
        _store_completion(st, ctx, cid, model_id, kind, stored_prompt, text, finish, params)
        usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        if kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": cid, "object": obj, "created": created, "model": model_id, "choices": [choice],
                             "usage": usage, "system_fingerprint": None}, headers=_guard_headers(total))

    def _stream(request: Request, ctx: RequestContext, kind: str, model_id: str, prompt: str, stored_prompt: Any,
                params: dict[str, Any], n_prompt: int, cid: str, created: int, outcome: GuardOutcome,
                headers: dict[str, str], include_usage: bool) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()
        t_queued = time.monotonic()
        started: list[float] = []

        def work() -> tuple[str, dict[str, Any]]:
            # runs in the worker thread. Once ``cancel`` is set (the client has gone, or the output guard
            # blocked the answer) no more tokens are made: closing the generator ends the generation
            # here, in this thread, so the model is idle when the next request switches adapters
            started.append(time.monotonic())
            got = []
            stats: dict[str, Any] = {}  # the generation's own token count and finish reason
            with contextlib.closing(hub.stream(model_id, prompt, stats=stats, **params)) as gen:
                for piece in gen:
                    got.append(piece)
                    if cancel.is_set():
                        break
                    loop.call_soon_threadsafe(pieces.put_nowait, ("piece", piece))
            return "".join(got), stats

        fut = _submit(st, ctx, work)  # QueueFull is answered as 503/429 before the stream starts
        fut.add_done_callback(lambda f: loop.call_soon_threadsafe(pieces.put_nowait, ("done", f)))
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text: str | None, finish: str | None, *, role: bool = False) -> str:
            if kind == "chat":
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if delta_text is not None:
                    delta["content"] = delta_text
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            data: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model_id,
                                    "choices": [choice], "system_fingerprint": None}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        blocking = st.guards.actions["output_harmful"] == "block"

        async def events() -> AsyncIterator[str]:
            sent, held, finish = "", "", None
            verdict_out = GuardOutcome()
            done = False
            try:
                if kind == "chat":
                    yield chunk("", None, role=True)
                while not done:
                    batch = [await pieces.get()]
                    while not pieces.empty():  # everything that arrived meanwhile: one check for all
                        batch.append(pieces.get_nowait())
                    for what, val in batch:
                        if what == "piece" and not blocking:
                            if not cancel.is_set():
                                yield chunk(val, None)  # one chunk per piece, as generated
                                sent += val
                        elif what == "piece":
                            held += val
                        else:
                            done = True
                            if val.exception() is not None:
                                raise val.exception()
                    # with output blocking on, text is released only after the output guard has seen
                    # it, checked every _HOLD_CHARS characters
                    if blocking and not done and len(held) < _HOLD_CHARS:
                        continue
                    if held and not cancel.is_set():
                        if blocking:
                            verdict_out = await asyncio.to_thread(st.guards.check_output, sent + held)
                        if verdict_out.blocked:
                            cancel.set()
                            finish = "content_filter"
                            yield chunk(OUTPUT_REFUSAL, None)
                        else:
                            yield chunk(held, None)
                            sent += held
                        held = ""
                text, stats = fut.result()
                if not blocking:
                    # 'flag' (or 'off'): checked once at the end, recorded only
                    verdict_out = await asyncio.to_thread(st.guards.check_output, text)
                ctx.audit.queue_ms = (started[0] - t_queued) * 1000 if started else None
                n_completion = int(stats.get("completion_tokens", 0))
                if finish is None:
                    finish = stats.get("finish_reason", "stop")
                total = outcome.merge(verdict_out)
                answer = OUTPUT_REFUSAL if finish == "content_filter" else text
                _finish(ctx, st, total, n_prompt, n_completion, finish, cid)
                _store_completion(st, ctx, cid, model_id, kind, stored_prompt, answer, finish, params)
                yield chunk(None, finish) if kind == "chat" else chunk("", finish)
                if include_usage:
                    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                             "total_tokens": n_prompt + n_completion}
                    last = {"id": cid, "object": obj, "created": created, "model": model_id, "choices": [],
                            "usage": usage}
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                ctx.audit.error_code = "client_disconnected"
                raise
            except Exception as e:  # the stream has started (200 sent): report in-band, OpenAI style
                log.exception("generation failed in %s", ctx.request_id)
                ctx.audit.error_code = "generation_failed"
                err = error_body(f"Generation failed: {type(e).__name__}: {e}", "server_error", None,
                                 "generation_failed")
                yield f"data: {json.dumps(err)}\n\n"
            finally:
                cancel.set()
                fut.cancel()  # still queued (the client left before its turn): it never runs

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})

    def _finish(ctx: RequestContext, st_: ServerState, outcome: GuardOutcome, n_prompt: int, n_completion: int,
                finish: str, cid: str) -> None:
        ctx.audit.prompt_tokens, ctx.audit.completion_tokens = n_prompt, n_completion
        ctx.audit.finish_reason = finish
        ctx.audit.guard_verdicts = list(outcome.verdicts)
        ctx.audit.guard_action = outcome.action
        ctx.audit.completion_id = cid
        if ctx.reservation is not None:
            st_.limiter.settle(ctx.reservation, n_prompt + n_completion)

    def _store_completion(st_: ServerState, ctx: RequestContext, cid: str, model_id: str, kind: str, prompt: Any,
                          answer: str, finish: str, params: dict[str, Any]) -> None:
        if not st_.cfg.store_completions:
            return
        st_.store.save_completion(cid, key_id=ctx.key.id if ctx.key else None, model=model_id,
                                  endpoint="chat" if kind == "chat" else "completions", prompt=prompt,
                                  answer=answer, finish_reason=finish, params=params)

    # one server-sent event: 'data' holds a JSON chunk (or the literal [DONE] at the end)
    sse_event = {"type": "object", "required": ["data"],
                 "properties": {"data": {"type": "string", "contentMediaType": "application/json"},
                                "event": {"type": "string"}, "id": {"type": "string"}}}
    stream_doc = {200: {"content": {"text/event-stream": {"schema": sse_event}},
                        "description": "JSON, or server-sent events when stream is true"}}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**stream_doc, **_ERRORS},
              tags=["openai"], dependencies=[_security(bearer)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _run(request, body, "chat")

    @app.post("/v1/completions", response_model=Completion, responses={**stream_doc, **_ERRORS}, tags=["openai"],
              dependencies=[_security(bearer)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _run(request, body, "completions")

    # ---- feedback -----------------------------------------------------------------------------
    @app.post("/v1/feedback", response_model=FeedbackReceipt, responses=_ERRORS, tags=["feedback"],
              dependencies=[_security(bearer)])
    async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
        ctx: RequestContext = request.scope["state"]["ctx"]
        # -1..1 as given; stars 1..5 -> -1..1 (3 stars is neutral)
        score = float(body.rating) if body.scale == "thumbs" else (float(body.rating) - 3.0) / 2.0
        correction = body.correction if body.correction and body.correction.strip() else None
        comment = body.comment if body.comment and body.comment.strip() else None
        for name, text in (("correction", correction), ("comment", comment), ("completion_id", body.completion_id)):
            if text is not None:
                _utf8(text, name)
        exists, owner = st.store.completion_owner(body.completion_id)
        key_id = ctx.key.id if ctx.key else None
        if not exists or (not cfg.no_auth and owner != key_id):
            raise not_found(f"No completion {body.completion_id!r} of this API key is stored"
                            + ("" if cfg.store_completions else " (the server does not store completions)") + ".",
                            param="completion_id", code="completion_not_found")
        fid = f"fb-{uuid.uuid4().hex}"
        st.store.save_feedback(fid, completion_id=body.completion_id, key_id=key_id, rating=float(body.rating),
                               scale=body.scale, score=score, correction=correction, comment=comment)
        ctx.audit.completion_id = body.completion_id
        return {"id": fid, "object": "feedback", "completion_id": body.completion_id, "score": score}

    _patch_openapi(app, hub, cfg.limits.max_tokens)
    app.add_middleware(Gate, state=st)
    return app


def _security(bearer: HTTPBearer) -> Any:
    """The bearer scheme as a no-op dependency: the Gate checks keys, this documents them in OpenAPI."""
    from fastapi import Security

    return Security(bearer)


def _patch_openapi(app: FastAPI, hub: Any, max_tokens: int) -> None:
    """Put this server's facts into the spec: the served model ids as the ``model`` enum, and the
    ``max_tokens`` cap as its maximum (for clients and API fuzzers)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = original()
        schemas = spec.get("components", {}).get("schemas", {})
        for name in ("ChatCompletionRequest", "CompletionRequest"):
            props = schemas.get(name, {}).get("properties", {})
            if "model" in props:
                props["model"]["enum"] = hub.model_ids()
            for field_name in ("max_tokens", "max_completion_tokens"):
                for alt in props.get(field_name, {}).get("anyOf", []):
                    if alt.get("type") == "integer":
                        alt["maximum"] = max_tokens
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
