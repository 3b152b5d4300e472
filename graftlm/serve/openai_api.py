"""The OpenAI wire format for `graftlm serve`: request validation and response shapes.

Field names and shapes follow OpenAI's chat and legacy completions APIs, so the official
clients work unchanged. Differences a client may notice:

- `temperature` defaults to 0 (greedy), graftlm's rule everywhere, where OpenAI defaults to 1;
- `max_tokens` defaults to 16 for `/v1/completions` (as OpenAI) and, for chat, to what the
  server's `--max-tokens-limit` and the context leave;
- `n` > 1, `logprobs`, `echo`, `suffix`, tools and nonzero penalties are refused with a 400
  rather than ignored, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from graftlm.data.chat_template import prompt_for_generation
from graftlm.errors import GraftError
from graftlm.infer.generate import SamplingConfig
from graftlm.serve.adapter_pool import UnknownAdapter
from graftlm.serve.scheduler import EngineStopped

MAX_PROMPTS = 64  # prompts in one /v1/completions request (each one is a batch row)
MAX_STOPS = 16


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers  # sent with the error, e.g. a 429's Retry-After


def error_body(error: ApiError) -> dict:
    """OpenAI's error object."""
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


@dataclass
class Job:
    """A validated generation request: one engine request per prompt."""

    id: str
    model: str
    adapter: str | None
    prompts: list[list[int]]
    sampling: SamplingConfig
    stream: bool = False
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


# -- request validation ---------------------------------------------------------------------------


def parse_generation(body: dict, state: Any, chat: bool) -> Job:
    """Validate a chat or completions body and tokenize its prompt(s).

    Raises:
        ApiError: 400 for a malformed or unsupported field or a too long prompt, 404 for an
            unknown model.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "'model' should be the base model's or an adapter's name", param="model"
        )
    adapter = None if model == state.base_name else model
    if adapter is not None and adapter not in state.registry:
        raise ApiError(
            404, f"the model {model!r} does not exist", param="model", code="model_not_found"
        )
    _refuse_unsupported(body, chat)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None) or {}
    include_usage = bool(options.get("include_usage", False))
    tokenizer, lock = state.engine.tokenizer, state.engine.tokenizer_lock
    with lock:
        prompts = _chat_prompt(body, tokenizer) if chat else _completion_prompts(body, tokenizer)
    longest = max(len(p) for p in prompts)
    if longest > state.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {longest} tokens, more than this server's limit of "
            f"{state.max_prompt_tokens} (--max-prompt-tokens)",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    room = state.context - longest
    if room <= 0:
        raise ApiError(
            400,
            f"the prompt has {longest} tokens; the model's context is {state.context}",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    max_tokens = _max_tokens(body, chat, state, room)
    temperature = _get(body, "temperature", float, 0.0)
    top_p = _get(body, "top_p", float, 1.0)
    if not 0 <= temperature <= 2:
        raise ApiError(
            400, f"'temperature' should be in [0, 2], got {temperature!r}", param="temperature"
        )
    if not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' should be in (0, 1], got {top_p!r}", param="top_p")
    stop = _stops(body.get("stop"))
    seed = _get(body, "seed", int, None)
    try:
        sampling = SamplingConfig(
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop
        )
    except GraftError as exc:
        raise ApiError(400, str(exc)) from None
    prefix = "chatcmpl-" if chat else "cmpl-"
    return Job(
        id=prefix + uuid.uuid4().hex,
        model=model,
        adapter=adapter,
        prompts=prompts,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
    )


_TYPES = {
    bool: "a boolean",
    float: "a number",
    int: "an integer",
    dict: "an object",
    str: "a string",
}


def _get(body: dict, key: str, kind: type, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ApiError(400, f"{key!r} should be {_TYPES[kind]}, got {value!r}", param=key)
    return float(value) if kind is float else value


def _refuse_unsupported(body: dict, chat: bool) -> None:
    if _get(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported; send several requests instead", param="n")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of' is not supported", param="best_of")
    for key in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
        if body.get(key) not in (None, False, [], ""):
            raise ApiError(400, f"{key!r} is not supported by this server", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _get(body, key, float, 0.0) != 0.0:
            raise ApiError(400, f"{key!r} is not supported (only 0)", param=key)


def _max_tokens(body: dict, chat: bool, state: Any, room: int) -> int:
    key = (
        "max_completion_tokens"
        if chat and body.get("max_completion_tokens") is not None
        else "max_tokens"
    )
    value = _get(body, key, int, None)
    if value is None:
        return min(state.max_tokens_limit, room) if chat else min(16, room)
    if value <= 0:
        raise ApiError(400, f"{key!r} should be a positive integer, got {value!r}", param=key)
    if value > state.max_tokens_limit:
        raise ApiError(
            400,
            f"{key!r} is {value}, more than this server's limit of {state.max_tokens_limit} "
            "(--max-tokens-limit)",
            param=key,
        )
    if value > room:
        raise ApiError(
            400,
            f"prompt + {key} would need {state.context - room + value} tokens; the model's "
            f"context is {state.context}",
            param=key,
            code="context_length_exceeded",
        )
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            400, f"'stop' should be a non-empty string or a list of up to {MAX_STOPS}", param="stop"
        )
    return tuple(stops)


def _chat_prompt(body: dict, tokenizer) -> list[list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' should be a non-empty list", param="messages")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} should be an object", param="messages")
        role, content = message.get("role"), message.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise ApiError(
                400,
                f"{where}.role should be system, user or assistant, got {role!r}",
                param="messages",
            )
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    400, f"{where}.content: only text parts are supported", param="messages"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content should be a string", param="messages")
        clean.append({"role": role, "content": content})
    try:
        text = prompt_for_generation({"messages": clean}, tokenizer)
    except GraftError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    return [tokenizer(text, add_special_tokens=False)["input_ids"]]


def _completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_PROMPTS:
        raise ApiError(
            400,
            f"'prompt' should be a string, a list of up to {MAX_PROMPTS} strings, or token ids",
            param="prompt",
        )
    vocab = len(tokenizer)
    out = []
    for item in prompt:
        if isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=False)["input_ids"]
        elif _is_ids(item):
            if not all(0 <= t < vocab for t in item):
                raise ApiError(
                    400, f"'prompt' holds token ids outside [0, {vocab})", param="prompt"
                )
            ids = list(item)
        else:
            raise ApiError(
                400, "'prompt' items should be strings or lists of token ids", param="prompt"
            )
        if not ids:
            raise ApiError(400, "'prompt' is empty", param="prompt")
        out.append(ids)
    return out


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


# -- request bodies ----


async def read_json(request, limit: int) -> dict:
    """The body as a JSON object, refusing (413) more than `limit` bytes before reading them."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body over {limit} bytes (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except RecursionError:  # "[[[[..." nested past Python's stack: a client's error, not ours
        raise ApiError(400, "request body is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body should be a JSON object, got {type(body).__name__}")
    return body


# -- responses ------------------------------------------------------------------------------------


def usage(results: list[dict]) -> dict:
    """OpenAI's usage object summed over a request's prompts."""
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_response(job: Job, chat: bool, choices: list[tuple], counts: dict) -> dict:
    """A whole (non-streamed) answer; `choices` is [(index, text, finish_reason)]."""
    if chat:
        items = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, text, finish in choices
        ]
    else:
        items = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
            for i, text, finish in choices
        ]
    return {
        **_envelope(job, "chat.completion" if chat else "text_completion", items),
        "usage": counts,
    }


def stream_chunk(
    job: Job,
    chat: bool,
    index: int | None,
    *,
    role: str | None = None,
    text: str | None = None,
    finish: str | None = None,
) -> dict:
    """One server-sent chunk; `index` None gives the empty-choices chunk that carries usage."""
    if index is None:
        choices = []
    elif chat:
        delta: dict = {}
        if role is not None:
            delta["role"] = role
        if text is not None:
            delta["content"] = text
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]
    return _envelope(job, "chat.completion.chunk" if chat else "text_completion", choices)


def _envelope(job: Job, object_name: str, choices: list[dict]) -> dict:
    """The fields every response and chunk of one request shares (OpenAI's key order)."""
    return {
        "id": job.id,
        "object": object_name,
        "created": job.created,
        "model": job.model,
        "choices": choices,
    }


def sse(payload: dict) -> str:
    """A server-sent event line."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def model_card(
    name: str, created: int, context: int, root: str | None = None, parent: str | None = None
) -> dict:
    """An entry of /v1/models (vLLM's extra fields: root, parent, max_model_len)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "graftlm",
        "root": root or name,
        "parent": parent,
        "max_model_len": context,
    }


def result_of(text: str, event) -> dict:
    """One prompt's outcome from its engine "done" event."""
    return {
        "text": text,
        "finish_reason": event.finish_reason,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
    }


def engine_error(error: BaseException | None) -> ApiError:
    """The HTTP error for an engine "error" event."""
    if isinstance(error, EngineStopped):
        return ApiError(503, str(error), "server_error", code="shutting_down")
    if isinstance(error, UnknownAdapter):
        return ApiError(404, str(error), code="model_not_found")
    return ApiError(500, f"generation failed: {error}", "server_error")
