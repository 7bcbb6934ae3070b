"""Field types and models shared by the endpoint families.

``Text``: a JSON string that is valid Unicode. JSON may carry a lone surrogate (``"\\ud800"``); no tokenizer
and no UTF-8 response can hold one, so it is refused here (400 ``invalid_value``), on every string field.

``SamplingRequest``: the fields both generation endpoints share (vLLM's names and defaults). What each does:

  model              required; must be the served name (else 404, checked by the serving code)
  max_tokens         >= 1; default: the rest of the context (capped by the app's ``max_output_tokens``)
  stream, stream_options.include_usage   SSE; ``stream_options`` only with ``stream: true`` (as vLLM)
  ignore_eos         vLLM extra: run to ``max_tokens``
  min_tokens         vLLM extra: no end (EOS, pseudo-EOS, stop string) before this many tokens
  stop               a string or a list of strings: generation ends before the first one; finish_reason "stop",
                     the stop string not in the output
  priority           vLLM extra; lower runs first under the ``priority`` engine policy
  temperature, top_p, seed, presence_penalty, frequency_penalty    a vLLM engine's sampling; the simulated
                     model's output is deterministic and ignores them (documented, so type- and range-checked)
  logit_bias, response_format (json_object / json_schema)          a vLLM engine only; the simulated model
                     answers 400 naming the field
  user               type-checked, otherwise ignored (OpenAI's abuse-monitoring tag)
  n, best_of         only 1;  echo, logprobs, top_logprobs: not supported (400 when set)

Unknown fields are ignored, as vLLM does.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_INT64 = (1 << 63) - 1
MAX_PRIORITY = 1 << 62


class ProtocolModel(BaseModel):
    """Strict JSON types (no "1" for 1, no 1 for true), finite numbers only, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def encodable(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_value", "must be valid Unicode text (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(encodable)]


def _range(lo: float | None, hi: float | None, *, lo_open: bool = False, kind: str = "a number"):
    """An AfterValidator + JSON schema for ``lo <= v <= hi`` (``lo < v`` with ``lo_open``); its message names
    the whole range, e.g. "must be a number in [0, 2]"."""
    left = "(" if lo_open else "["
    what = (f"{kind} in {left}{lo:g}, {hi:g}]" if lo is not None and hi is not None
            else f"{kind} >= {lo:g}" if lo is not None else f"{kind} <= {hi:g}")

    def check(value):
        below = lo is not None and (value <= lo if lo_open else value < lo)
        if below or (hi is not None and value > hi):
            raise PydanticCustomError("invalid_value", f"must be {what}")
        return value

    schema: dict[str, Any] = {}
    if lo is not None:
        schema["exclusiveMinimum" if lo_open else "minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    return AfterValidator(check), Field(json_schema_extra=schema)


def _at_least(lo: int):
    def check(value):
        if value < lo:
            raise PydanticCustomError("invalid_value", f"must be at least {lo}")
        return value

    return AfterValidator(check), Field(json_schema_extra={"minimum": lo})


def _only(allowed: Any, message: str):
    """Refuse any value but ``allowed`` (and null) with ``message``: a field vLLM has and halffull does not do."""
    def check(value):
        if value is not None and value != allowed:
            raise PydanticCustomError("invalid_value", message)
        return value

    return AfterValidator(check)


Temperature = Annotated[float, *_range(0, 2)]
TopP = Annotated[float, *_range(0, 1, lo_open=True)]
Penalty = Annotated[float, *_range(-2, 2)]
PositiveInt = Annotated[int, *_at_least(1)]
Seed = Annotated[int, *_range(-MAX_INT64 - 1, MAX_INT64, kind="an integer")]
Priority = Annotated[int, *_range(-MAX_PRIORITY + 1, MAX_PRIORITY - 1, kind="an integer")]
Bias = Annotated[float, *_range(-100, 100)]


def check_stop(value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > 16:
            raise PydanticCustomError("invalid_value", "must hold at most 16 stop strings")
        return [encodable(s) for s in value]
    raise PydanticCustomError("invalid_type", "must be a string or a list of strings")


class StreamOptions(ProtocolModel):
    include_usage: bool | None = None


class JsonSchemaFormat(ProtocolModel):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(ProtocolModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def is_text(self) -> bool:
        return self.type == "text"


class SamplingRequest(ProtocolModel):
    """Fields of both generation endpoints (see the module docstring)."""

    model: Text
    max_tokens: PositiveInt | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    min_tokens: Annotated[int, *_at_least(0)] | None = None
    stop: str | list[str] | None = None
    priority: Priority | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    logit_bias: dict[str, Bias] | None = None
    response_format: ResponseFormat | None = None
    user: Text | None = None
    n: Annotated[int, _only(1, "Only n = 1 is supported.")] | None = None
    best_of: Annotated[int, _only(1, "Only best_of = 1 is supported.")] | None = None
    echo: Annotated[bool, _only(False, "echo is not supported.")] | None = None

    @field_validator("stop", mode="plain", json_schema_input_type=str | list[str] | None)
    @classmethod
    def _stop(cls, value):
        return check_stop(value)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError("invalid_value", "Stream options can only be defined when stream=True.")
        return value

    @field_validator("response_format")
    @classmethod
    def _json_schema_given(cls, value):
        if value is not None and value.type == "json_schema" and (value.json_schema is None
                                                                   or value.json_schema.schema_ is None):
            raise PydanticCustomError("invalid_value", "Type json_schema needs json_schema.schema.")
        return value

    def stop_strings(self) -> list[str]:
        """The stop strings, empty ones dropped (they would end every output at once)."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return [s for s in stop if s]

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# ---- responses ---------------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length", "abort"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "halffull"
    max_model_len: int
    root: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
