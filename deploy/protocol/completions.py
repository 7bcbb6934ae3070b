"""``POST /v1/completions``: request and response models.

``prompt``: a string, a list of token ids, or a list holding one of those (one prompt per request; a batch of
several is refused with 400 ``invalid_value``). Token ids are integers in [0, 2**40) here; the serving code
narrows that to the tokenizer's vocabulary. Besides the shared fields (common.py ``SamplingRequest``):
``logprobs`` (any value, 0 included: it asks for the sampled token's logprob) and a non-empty ``suffix`` are
refused with 400 naming the field.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from halffull.deploy.protocol.common import FinishReason, SamplingRequest, Text, Usage, encodable

TOKEN_ID_LIMIT = 1 << 40  # the simulated tokenizer's ids are below this


def _refused(message: str):
    def check(value):
        if value is not None and value != "":
            raise PydanticCustomError("invalid_value", message)
        return value

    return AfterValidator(check)


def check_prompt(prompt: Any) -> str | list[int]:
    """The one prompt of a request: its text or its token ids (see the module docstring)."""
    if prompt is None:
        raise PydanticCustomError("missing_required_parameter", "is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise PydanticCustomError("invalid_value", "must not be empty")
        return encodable(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < TOKEN_ID_LIMIT for t in prompt):
            raise PydanticCustomError("invalid_value", f"token ids must be integers in [0, {TOKEN_ID_LIMIT})")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise PydanticCustomError("invalid_value", "batched prompts are not supported: send one prompt per request")
    raise PydanticCustomError("invalid_type", "must be a string, a list of token ids, or a list with one of those")


_TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]], Field(min_length=1)]
_PROMPT_SCHEMA = (Annotated[str, Field(min_length=1)] | _TokenIds | Annotated[list[str], Field(min_length=1, max_length=1)]
                  | Annotated[list[_TokenIds], Field(min_length=1, max_length=1)])


class CompletionRequest(SamplingRequest):
    prompt: str | list[int]
    suffix: Annotated[Text, _refused("The 'suffix' field is not supported.")] | None = None
    logprobs: Annotated[int, _refused("logprobs are not supported.")] | None = None

    @field_validator("prompt", mode="plain", json_schema_input_type=_PROMPT_SCHEMA)
    @classmethod
    def _prompt(cls, value):
        return check_prompt(value)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
