"""``POST /tokenize`` and ``POST /detokenize``: vLLM's request and response shapes (vLLM 0.32
``vllm/entrypoints/serve/tokenize/protocol.py``), with the ingress tokenizer, so ``count`` is what
``usage.prompt_tokens`` counts for the same prompt or messages.

  /tokenize    {model?, prompt, add_special_tokens?}               -> {count, max_model_len, tokens}
               {model?, messages, add_generation_prompt?}          (the chat template, as the chat endpoint)
  /detokenize  {model?, tokens}                                     -> {prompt}

``model``, when given, must be the served name (404 otherwise). The ingress tokenizers always add the special
tokens a completion prompt gets and always end a chat with the generation prompt, so ``add_special_tokens:
false`` and ``add_generation_prompt: false`` are refused (400); vLLM's other options (``return_token_strs``,
``chat_template``, ``tools``, ...) are not declared and so ignored, as unknown fields are. Detokenized text
skips special tokens (as generation output does); ids that are not tokens decode to U+FFFD.
"""

from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator
from pydantic_core import PydanticCustomError

from halffull.deploy.protocol.chat import Messages
from halffull.deploy.protocol.common import MAX_INT64, ProtocolModel, Text, encodable


def _must_be_true(field: str):
    def check(value):
        if value is False:
            raise PydanticCustomError("invalid_value", f"{field}: false is not supported by this server.")
        return value

    return check


class TokenizeCompletionRequest(ProtocolModel):
    model: Text | None = None
    prompt: str
    add_special_tokens: bool | None = True

    @field_validator("prompt", mode="plain", json_schema_input_type=str)
    @classmethod
    def _prompt(cls, value):
        if not isinstance(value, str):
            raise PydanticCustomError("invalid_type", "must be a string")
        return encodable(value)

    @field_validator("add_special_tokens")
    @classmethod
    def _special(cls, value):
        return _must_be_true("add_special_tokens")(value)


class TokenizeChatRequest(ProtocolModel):
    model: Text | None = None
    messages: Messages
    add_generation_prompt: bool | None = True

    @field_validator("add_generation_prompt")
    @classmethod
    def _generation_prompt(cls, value):
        return _must_be_true("add_generation_prompt")(value)


def _shape(body: Any) -> str:
    # Chat when the body has messages (vLLM picks the shape the same way: by which field is present).
    return "messages_request" if isinstance(body, dict) and "messages" in body else "prompt_request"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("prompt_request")] | Annotated[TokenizeChatRequest, Tag("messages_request")],
    Discriminator(_shape),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(ProtocolModel):
    model: Text | None = None
    tokens: list[Annotated[int, Field(ge=0, le=MAX_INT64)]]


class DetokenizeResponse(BaseModel):
    prompt: str
