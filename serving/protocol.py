"""The OpenAI-compatible request bodies (pydantic) and the error body.

Requests follow OpenAI's completions and chat completions, plus what vLLM users send
(`structured_outputs`, `guided_*`, `ignore_eos`) and dlm's decoding options as extra fields.
Every field is checked here or in serving/handlers.py: bad input is a 400 naming the field.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from dlm.decoding.config import server_fields

SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # OpenAI's seed range (int64)


# dlm's decoding options, accepted as extra fields of any generation request: generated from
# DecodeConfig's server-exposed fields (dlm/decoding/config.py), each optional (None: the server's
# default) and checked by DecodeConfig.validate.
DecodeOptions = create_model("DecodeOptions", __config__=ConfigDict(extra="allow", populate_by_name=True),
                             ignore_eos=(Optional[bool], None), **server_fields())

DECODE_OPTIONS = tuple(server_fields())  # their names
# The options above that only a diffusion model has (the AR server refuses them).
DIFFUSION_OPTIONS = tuple(name for name in DECODE_OPTIONS if name != "top_k")


class StructuredOutputs(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    json_schema: Optional[Union[dict, bool, str]] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Optional[str] = None
    schema_: Optional[Union[dict, bool]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class GenerationFields(DecodeOptions):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: Optional[dict] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Optional[Union[dict, bool, str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None


class CompletionRequest(GenerationFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict], None] = None


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    tokens: list[int]


class APIError(Exception):
    """An error response: status, OpenAI error body fields, extra headers."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
