"""Request bodies of the OpenAI-compatible endpoints: the schema (pydantic; a wrong type or a missing field is a
422) and the values (checked here; a value out of range or an option the server does not offer is a 400)."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ...core.parsing import load_json, short
from ...core.errors import ConfigError
from ..sampling import SamplingParams
from .errors import APIError

Number = Union[StrictInt, StrictFloat]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata, ...)

    model: StrictStr
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None       # vLLM's extension
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[StrictInt] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    ignore_eos: Optional[StrictBool] = None  # vLLM's extension


class CompletionBody(_Body):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[StrictStr] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: Optional[StrictStr] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, list[ContentPart]]] = None


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None


class LoadBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: StrictStr
    lora_path: StrictStr


class UnloadBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: StrictStr
    lora_path: Optional[StrictStr] = None


def parse(raw: bytes, schema: type[BaseModel]):
    """The body as `schema`: 400 for what is not JSON, 422 for what does not fit the schema."""
    if not raw:
        raise APIError(400, "the request needs a JSON body")
    try:
        data = load_json(raw, "the request body", ConfigError)
    except ConfigError as e:
        raise APIError(400, str(e)) from None
    if not isinstance(data, dict):
        raise APIError(422, f"the request body must be a JSON object, got {short(data)}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(422, f"{loc}: {first['msg']}" if loc else first["msg"],
                       param=str(first["loc"][0]) if first["loc"] else None,
                       code="invalid_type") from None


def sampling_of(body: _Body, prompt_tokens: int, context: int, default_max: int) -> SamplingParams:
    """SamplingParams from the body's values; a 400 naming the parameter for a value out of range."""
    def bad(param: str, message: str) -> APIError:
        return APIError(400, message, param=param, code="invalid_value")

    if body.n not in (None, 1):
        raise bad("n", "only n=1 is supported")
    for p in ("presence_penalty", "frequency_penalty"):
        if getattr(body, p) not in (None, 0, 0.0):
            raise bad(p, f"{p} is not supported (only 0)")
    if isinstance(body, CompletionBody):
        if body.logprobs is not None:
            raise bad("logprobs", "logprobs are not supported by this server")
        if body.echo:
            raise bad("echo", "echo is not supported")
        if body.best_of not in (None, 1):
            raise bad("best_of", "only best_of=1 is supported")
        if body.suffix:
            raise bad("suffix", "suffix is not supported")
    if isinstance(body, ChatBody):
        if body.logprobs or body.top_logprobs:
            raise bad("logprobs", "logprobs are not supported by this server")
    room = context - prompt_tokens
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens",
                       param="messages" if isinstance(body, ChatBody) else "prompt", code="context_length_exceeded")
    max_tokens = body.max_tokens
    param = "max_tokens"
    if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens = min(default_max, room)
    if max_tokens < 1:
        raise bad(param, f"{param} must be at least 1, got {max_tokens}")
    if max_tokens > room:
        raise APIError(400, f"this model's context is {context} tokens; the prompt has {prompt_tokens} and "
                       f"{param}={max_tokens} asks for more than the {room} left", param=param,
                       code="context_length_exceeded")
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    if not 0 <= temperature <= 2:
        raise bad("temperature", f"temperature must be in [0, 2], got {temperature}")
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    if not 0 < top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1], got {top_p}")
    top_k = body.top_k or 0
    if top_k < 0 and top_k != -1:
        raise bad("top_k", f"top_k must be ≥ 0 (or -1: off), got {top_k}")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4 or any(not s or len(s) > 200 for s in stop):
        raise bad("stop", "stop takes up to 4 non-empty strings of at most 200 characters")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise bad("seed", f"seed must be in [0, 2^63), got {body.seed}")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                              seed=body.seed, stop=stop, eos=() if body.ignore_eos else None)
    except ConfigError as e:
        raise APIError(400, str(e), code="invalid_value") from None


def chat_text(messages: list[Message]) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(messages):
        if m.content is None:
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got {short(part.type)}",
                                   param=f"messages[{i}].content", code="invalid_value")
                parts.append(part.text)
            text = "".join(parts)
        out.append({"role": m.role, "content": text})
    if not out:
        raise APIError(400, "messages must hold at least one message", param="messages", code="invalid_value")
    return out
