"""Request and response bodies of the OpenAI-compatible API (pydantic; they make the OpenAPI spec).

Unknown request fields are accepted and ignored, as OpenAI clients send fields a server may not
know; fields that would change the answer and are not supported here (``n`` > 1, ``logprobs``,
``tools``, penalties, ...) are refused with a 400 by the app, not silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ContentPart", "ChatMessage", "StreamOptions", "ChatCompletionRequest", "CompletionRequest",
    "FeedbackRequest", "Usage", "ChatCompletion", "Completion", "ModelCard", "ModelList", "FeedbackReceipt",
    "ErrorDetail", "ErrorResponse", "Health", "SEED_MIN", "SEED_MAX",
]

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed accepts
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy decoding")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Stop = str | Annotated[list[str], Field(max_length=4)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Lenient):
    type: str = Field(description="only 'text' parts are supported")
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class _Sampling(_Lenient):
    model: str = Field(min_length=1, description="the base model id or an adapter name (see /v1/models)")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=200, description="the 'id' of a chat or text completion")
    rating: float = Field(description="-1, 0 or 1 (scale 'thumbs'), or 1 to 5 (scale 'stars')")
    scale: Literal["thumbs", "stars"] = "thumbs"
    correction: str | None = Field(default=None, max_length=100_000, description="what the answer should have been")
    comment: str | None = Field(default=None, max_length=10_000)


# ---------------------------------------------------------------------------------------------
# responses (for the OpenAPI spec and for reading; the app builds plain dicts)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _ChatChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


class _ChatChoice(BaseModel):
    index: int
    message: _ChatChoiceMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class _TextChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[_TextChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class FeedbackReceipt(BaseModel):
    id: str
    object: Literal["feedback"]
    completion_id: str
    score: float = Field(description="the rating mapped to -1..1")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    guard_verdicts: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]
    queue: int
    busy: bool
