"""Pydantic models of the OpenAI API as loramux serves it: requests in, responses out.

An unknown request field is a 400 naming it, as OpenAI answers ("Unrecognized request argument
supplied: max_token"): a misspelt option silently ignored gives a wrong answer that looks
right. vLLM's sampling extensions (`top_k`, `min_p`, `min_tokens`, `ignore_eos`,
`repetition_penalty`, `stop_token_ids`, `include_stop_str_in_output`) are accepted in both
bodies because benchmark tools send them, and so are the OpenAI fields that SDKs and
frameworks send routinely without changing the text (`user`, `metadata`, `store`,
`service_tier`, ...: declared, without effect). Fields that would change the answer but that
loramux does not implement (`logit_bias`, `suffix`, tools, JSON mode) are refused with a 400
rather than silently ignored. Chat messages and their content parts are the exception: their
undeclared keys are ignored (see `ChatMessage`).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from loramux.engine.sampling_params import SamplingParams
from loramux.server.errors import APIError, validation_error


class _Request(BaseModel):
    """A request body (or an option object in one): an undeclared field is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    """A part of a body whose shape clients vary freely: undeclared keys are ignored."""

    model_config = ConfigDict(extra="ignore")


RequestT = TypeVar("RequestT", bound=BaseModel)


MAX_BODY_BYTES = 16 << 20  # a JSON body; far beyond any context's worth of text or ids


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request's body, refused with 413 as soon as it passes `limit` bytes (before it is
    all in memory)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"The request body is {declared} bytes; the limit is {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is larger than the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


# Deeper than any body the API defines (a chat content part is 5 levels down) and than tool
# schemas or template arguments need, and far below where json (about 1,000 levels, then
# RecursionError) or pydantic would recurse into trouble.
MAX_BODY_DEPTH = 64
# An escaped UTF-16 surrogate (\ud800-\udfff): the only way a lone surrogate gets into a str
# from JSON, since the UTF-8 decoder refuses encoded ones.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _bad_body(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _lone_surrogate(text: str) -> str | None:
    """The first lone surrogate of `text` as an escape (`\\ud800`), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(text[exc.start]):04x}"
    return None


def check_body_shape(data: Any, *, depth: bool, surrogates: bool) -> None:
    """Refuse (400) nesting deeper than MAX_BODY_DEPTH and strings with lone surrogates.

    Iterative, so a deep body cannot exhaust the stack here; `param` is the dotted path of the
    bad string, as pydantic's errors name fields. A lone surrogate cannot be encoded, so it
    would fail the tokenizer, the JSON of an error that repeats it, or the log.
    """
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if depth and len(path) >= MAX_BODY_DEPTH:
            raise _bad_body(f"The request body is nested deeper than {MAX_BODY_DEPTH} levels.")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if surrogates and isinstance(key, str):
                bad = _lone_surrogate(key)
                if bad is not None:
                    where = f" in {'.'.join(path)}" if path else ""
                    raise _bad_body(f"A key{where} holds a lone UTF-16 surrogate ({bad}); "
                                    "text must be valid Unicode.", ".".join(path) or None)
            if isinstance(item, dict | list):
                stack.append((item, (*path, str(key))))
            elif surrogates and isinstance(item, str):
                bad = _lone_surrogate(item)
                if bad is not None:
                    param = ".".join((*path, str(key)))
                    raise _bad_body(f"{param} holds a lone UTF-16 surrogate ({bad}); text must "
                                    "be valid Unicode.", param)


def parse_body(raw: bytes, model: type[RequestT]) -> RequestT:
    """Parse a JSON request body whatever its Content-Type (curl -d sends a form type).

    Raises APIError 400 for malformed JSON or invalid fields, and for what JSON allows but the
    server cannot take: nesting deeper than MAX_BODY_DEPTH, integers longer than Python
    converts (4,300 digits), lone surrogates in any string.
    """
    try:
        data = json.loads(raw) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise validation_error([{"type": "json_invalid", "loc": ("body",)}]) from None
    except RecursionError:
        raise _bad_body(f"The request body is nested deeper than {MAX_BODY_DEPTH} levels."
                        ) from None
    except ValueError:  # int("9" * 5000): the interpreter's int_max_str_digits
        raise _bad_body(f"The request body holds an integer of more than "
                        f"{sys.get_int_max_str_digits()} digits.") from None
    if not isinstance(data, dict):
        raise validation_error([{"type": "model_type", "loc": ("body",),
                                 "msg": "the request body must be a JSON object"}])
    # Both scans are skipped, at C speed, for the bodies that cannot need them: fewer
    # brackets than the depth limit, no escaped surrogate.
    deep = raw.count(b"[") + raw.count(b"{") > MAX_BODY_DEPTH
    escaped = _SURROGATE_ESCAPE.search(raw) is not None
    if deep or escaped:
        check_body_shape(data, depth=deep, surrogates=escaped)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM (guidellm sends it)
    # OpenAI pads its stream chunks against length side channels; loramux does not, and a
    # client asking for it (or turning it off) gets the same events.
    include_obfuscation: bool | None = None


class _SamplingFields(_Request):
    """Fields shared by both endpoints."""

    model: str
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    # Ranges as SamplingParams checks them, stated here so that the OpenAPI document says
    # them and a 400 names the field.
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(self, max_tokens: int, logprobs: int | None, seed: int | None
                        ) -> SamplingParams:
        """The engine's parameters; raises ValueError (a 400) when a value is out of range."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=seed,
            stop=self.stop_strings(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, max_tokens),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=(
                1.0 if self.repetition_penalty is None else self.repetition_penalty
            ),
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of a field set to something loramux does not implement."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.min_tokens < 0:
            return "min_tokens", "min_tokens must be >= 0"
        return None


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            return []
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported"
        if self.echo and self.logprobs is not None:
            return "echo", "echo together with logprobs is not supported"
        return super().unsupported()


class ContentPart(_Lenient):
    """One part of a message's content; `ChatMessage.text` refuses all but text parts (so an
    image part is a 400 saying its type, not one about its `image_url` key)."""

    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    """One message. Unlike the body, a message ignores the keys it does not declare:
    clients send the history back as they got it or as their framework builds it, with
    `tool_calls`, `tool_call_id`, `refusal`, `audio`, `function_call`, vLLM's
    `reasoning_content`, LiteLLM's `provider_specific_fields` or `cache_control`, and which
    keys come depends on the role and the client's version. Refusing them would break routine
    multi-turn use; ignoring them loses nothing the chat template gets (role and text only,
    and tools themselves are refused)."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string; refuses non-text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts: list[str] = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    # Accepted without effect, because SDKs and frameworks (LangChain, LiteLLM) send them
    # routinely and none changes the text: bookkeeping and routing hints (loramux has one
    # service tier and stores no completions) and tool options that only matter with tools
    # (which `unsupported` refuses).
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    function_call: Any = None
    # vLLM extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def logprobs_count(self) -> int | None:
        """Alternatives per token for the engine: None without logprobs."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools are not supported"
        if self.functions:
            return "functions", "functions are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", "only response_format type 'text' is supported"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.continue_final_message and self.add_generation_prompt:
            return ("continue_final_message",
                    "continue_final_message needs add_generation_prompt: false")
        return super().unsupported()


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loramux"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----------------------------------------------------------------------------- admin bodies


class LoadLoraAdapterRequest(_Request):
    """vLLM's `/v1/load_lora_adapter` body."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM: replace an adapter of that name (here: a new version)


class UnloadLoraAdapterRequest(_Request):
    """vLLM's `/v1/unload_lora_adapter` body."""

    lora_name: str
    lora_int_id: int | None = None


class AdminLoadRequest(_Request):
    """`POST /admin/adapters`: load (or reload, as a new version) from under the adapter root."""

    name: str
    path: str | None = None  # relative to the adapter root; default: the name
    pin: bool = False
