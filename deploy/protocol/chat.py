"""``POST /v1/chat/completions``: request and response models.

``messages``: a non-empty list of ``{"role", "content"}``; roles system, developer, user, assistant, tool;
``content`` a string or a list of ``{"type": "text", "text"}`` parts (joined), optional only for the assistant.
Other message fields (``name``, ``tool_calls``, ...) are ignored. ``max_completion_tokens`` overrides
``max_tokens``. Besides the shared fields (common.py ``SamplingRequest``), refused with 400 naming the field:
``logprobs: true``, ``top_logprobs`` > 0, non-empty ``tools`` and ``tool_choice`` other than "none" (no tool
parser), ``continue_final_message: true`` and ``add_generation_prompt: false`` (the chat template always ends
with the assistant's generation prompt).
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from halffull.deploy.protocol.common import (
    FinishReason,
    PositiveInt,
    ProtocolModel,
    SamplingRequest,
    Usage,
    encodable,
)
from halffull.deploy.tokenizer import CHAT_ROLES


def _refuse_unless(ok, message: str):
    def check(value):
        if value is not None and not ok(value):
            raise PydanticCustomError("invalid_value", message)
        return value

    return AfterValidator(check)


class TextPart(ProtocolModel):
    type: Literal["text"]
    text: str


def check_content(value: Any, role: str | None) -> str | list[dict[str, str]] | None:
    if value is None:
        if role != "assistant":
            raise PydanticCustomError("missing_required_parameter", "is required")
        return None
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise PydanticCustomError("invalid_value", 'parts must be {"type": "text", "text": string} objects')
        return [{"type": "text", "text": encodable(p["text"])} for p in value]
    raise PydanticCustomError("invalid_type", "must be a string or a list of text parts")


class ChatMessage(ProtocolModel):
    role: Literal[tuple(sorted(CHAT_ROLES))]  # type: ignore[valid-type]
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)

    @field_validator("content", mode="plain", json_schema_input_type=str | list[TextPart] | None)
    @classmethod
    def _content(cls, value, info: ValidationInfo):
        return check_content(value, info.data.get("role"))

    def as_dict(self) -> dict[str, Any]:
        """What the tokenizers' chat templates read: ``{"role", "content"}``, parts as plain dicts."""
        return {"role": self.role, "content": self.content}


def _non_empty_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise PydanticCustomError("invalid_type", "must be a non-empty list")
    return value


Messages = Annotated[list[ChatMessage], BeforeValidator(_non_empty_list), Field(min_length=1)]


class ChatCompletionRequest(SamplingRequest):
    messages: Messages
    max_completion_tokens: PositiveInt | None = None
    logprobs: Annotated[bool, _refuse_unless(lambda v: not v, "logprobs are not supported.")] | None = None
    top_logprobs: Annotated[int, _refuse_unless(lambda v: v == 0, "logprobs are not supported.")] | None = None
    tools: Annotated[list[Any], _refuse_unless(lambda v: not v, "Tools are not supported (no tool-call parser).")] | None = None
    tool_choice: Annotated[Any, _refuse_unless(lambda v: v == "none", "Only tool_choice \"none\" is supported.")] = None
    continue_final_message: Annotated[bool, _refuse_unless(
        lambda v: not v, "continue_final_message is not supported: the chat template always adds the "
                         "assistant's generation prompt.")] | None = None
    add_generation_prompt: Annotated[bool, _refuse_unless(
        lambda v: v, "add_generation_prompt: false is not supported: the chat template always adds the "
                     "assistant's generation prompt.")] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
