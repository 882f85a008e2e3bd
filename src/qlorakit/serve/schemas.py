"""Request and response bodies of the OpenAI-compatible API (pydantic; they make the OpenAPI spec).

Unknown request fields are accepted and ignored, as OpenAI clients send fields a server may not
know; fields that would change the answer and are not supported here (``n`` > 1, ``logprobs``,
``tools``, penalties, ...) are refused with a 400 by the app, not silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "ContentPart", "ChatMessage", "StreamOptions", "ChatCompletionRequest", "CompletionRequest",
    "FeedbackRequest", "ThumbsFeedback", "StarsFeedback", "Usage", "ChatCompletion", "Completion", "ModelCard",
    "ModelList", "FeedbackReceipt",
    "ErrorDetail", "ErrorResponse", "Health", "SEED_MIN", "SEED_MAX",
]

# the integers every JSON client reads exactly (JavaScript's safe range); torch.manual_seed takes them all
SEED_MIN, SEED_MAX = -(2**53 - 1), 2**53 - 1


def _integral(v: Any) -> Any:
    """JSON Schema counts 8.0 as an integer; so does this server (strict mode would refuse it)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Count = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy decoding")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Stop = str | Annotated[list[str], Field(max_length=4)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX), BeforeValidator(_integral)]


class _Lenient(BaseModel):
    # strict: no silent coercion ("1" -> 1, 0 -> False); unknown fields allowed (see the module docstring)
    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(_Lenient):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class _Sampling(_Lenient):
    model: str = Field(min_length=1, description="the base model id or an adapter name (see /v1/models)")
    max_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1, description="one answer per request"), BeforeValidator(_integral)] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Count | None = None


Prompt = Annotated[str, Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)]


class _Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    completion_id: str = Field(min_length=1, max_length=200, description="the 'id' of a chat or text completion")
    correction: str | None = Field(default=None, max_length=100_000, description="what the answer should have been")
    comment: str | None = Field(default=None, max_length=10_000)


class ThumbsFeedback(_Feedback):
    scale: Literal["thumbs"] = "thumbs"
    rating: float = Field(ge=-1.0, le=1.0, description="-1 (thumbs down) .. 1 (thumbs up)")


class StarsFeedback(_Feedback):
    scale: Literal["stars"]
    rating: float = Field(ge=1.0, le=5.0, description="1 .. 5 stars")


FeedbackRequest = ThumbsFeedback | StarsFeedback


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
