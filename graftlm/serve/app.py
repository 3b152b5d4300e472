"""`graftlm serve`: an OpenAI-compatible HTTP server over one base model and many adapters.

::

    graftlm serve --adapter tickets=adapters/tickets --adapter legal=adapters/legal

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tickets", messages=[...])   # "model": adapter name
    client.completions.create(model="smollm2-135m-instruct", prompt="...")  # or the base

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both with
`stream: true` as server-sent events ending in `data: [DONE]`), `POST /v1/load_lora_adapter`
and `POST /v1/unload_lora_adapter` (vLLM's names and bodies), `GET /health`.

Requests are decoded by `engine.Engine` (continuous batching, one adapter per row) over an
`registry.AdapterRegistry` (many adapters, an LRU memory budget). Request parsing and response
shapes live in `serve_api.py`. Without `--api-key` only loopback clients are served.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
# at runtime, and they are imported inside build_app so that the CLI starts without fastapi
import asyncio
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from graftlm.errors import GraftError
from graftlm.serve.openai_api import (
    ApiError,
    completion_response,
    engine_error,
    error_body,
    model_card,
    parse_generation,
    read_json,
    result_of,
    sse,
    stream_chunk,
    usage,
)

logger = logging.getLogger("graftlm")


@dataclass
class ServerState:
    """Everything the endpoints share.

    Attributes:
        engine: the batching engine (owns the model).
        base_name: the base model's name in `model` fields.
        api_key: the Bearer key clients must send (None: loopback clients only).
        max_prompt_tokens: the longest prompt accepted, in tokens.
        max_tokens_limit: the most tokens a request may generate.
        max_body_bytes: the largest request body accepted.
        context: the model's context length (prompt + generated tokens).
    """

    engine: Any
    base_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    context: int = 2048
    created: int = 0

    @property
    def registry(self):
        return self.engine.registry


def build_app(state: ServerState):
    """The FastAPI application serving `state` (its engine must be started by the caller)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="graftlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.graftlm = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        error = ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(error_body(error), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(error_body(error), status_code=500)

    async def authorize(request: Request) -> None:
        if state.api_key is None:
            # no key: nothing but this machine may talk to the model
            host = request.client.host if request.client else ""
            if not is_loopback(host):
                raise ApiError(
                    403,
                    "this server has no --api-key and serves loopback clients only",
                    "permission_error",
                    code="forbidden",
                )
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            key.strip().encode(), state.api_key.encode()
        ):
            raise ApiError(
                401,
                "invalid or missing API key (Authorization: Bearer ...)",
                code="invalid_api_key",
            )

    @app.get("/health")
    async def health():
        registry = state.registry
        body = {
            "status": "ok" if state.engine.alive else "engine stopped",
            **state.engine.stats(),
            "adapters_registered": len(registry.names()),
            "adapters_loaded": len(registry.loaded()),
            "adapter_bytes_loaded": registry.loaded_bytes(),
        }
        return JSONResponse(body, status_code=200 if state.engine.alive else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        cards = [model_card(state.base_name, state.created, state.context)]
        for name in state.registry.names():
            entry = state.registry._entries.get(name)  # None: unregistered meanwhile
            if entry is not None:
                path = str(entry.path)
                cards.append(model_card(name, state.created, state.context, path, state.base_name))
        return {"object": "list", "data": cards}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        return await _generate(request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        return await _generate(request, chat=False)

    async def _generate(request: Request, chat: bool):
        body = await read_json(request, state.max_body_bytes)
        job = await run_in_threadpool(parse_generation, body, state, chat)
        queue: asyncio.Queue = asyncio.Queue()
        requests = _submit(job, queue)  # before any byte is sent: a refusal is still a 503
        if job.stream:
            return StreamingResponse(
                _stream(job, chat, queue, requests),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        results = await _collect(request, queue, requests)
        choices = [(i, result["text"], result["finish_reason"]) for i, result in enumerate(results)]
        counts = usage(results)
        return completion_response(job, chat, choices, counts)

    async def _collect(request: Request, queue: asyncio.Queue, requests: list) -> list[dict]:
        results: list[dict | None] = [None] * len(requests)
        texts = [""] * len(requests)
        try:
            while any(r is None for r in results):
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        # nobody reads the answer: stop (finally frees the rows)
                        raise ApiError(499, "client closed the request") from None
                    continue
                if event.kind == "error":
                    raise engine_error(event.error)
                texts[index] += event.text
                if event.kind == "done":
                    results[index] = result_of(texts[index], event)
        finally:
            for req in requests:
                req.cancel()  # a no-op for finished ones; frees rows of abandoned ones
        return results

    async def _stream(job, chat: bool, queue: asyncio.Queue, requests: list):
        finished: list[dict | None] = [None] * len(requests)
        try:
            if chat:
                for i in range(len(requests)):
                    yield sse(stream_chunk(job, chat, i, role="assistant", text=""))
            while any(r is None for r in finished):
                index, event = await queue.get()
                if event.kind == "error":
                    error = engine_error(event.error)
                    yield sse(error_body(error))
                    break
                if event.text:
                    yield sse(stream_chunk(job, chat, index, text=event.text))
                if event.kind == "done":
                    finished[index] = result_of("", event)
                    yield sse(stream_chunk(job, chat, index, finish=event.finish_reason))
            else:
                if job.include_usage:
                    chunk = stream_chunk(job, chat, None)
                    chunk["usage"] = usage(finished)
                    yield sse(chunk)
            yield "data: [DONE]\n\n"
        finally:
            for req in requests:
                req.cancel()

    def _submit(job, queue: asyncio.Queue):
        from graftlm.serve.scheduler import Request as EngineRequest

        loop = asyncio.get_running_loop()
        requests = []
        for index, prompt_ids in enumerate(job.prompts):

            def on_event(event, index=index):
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            request = EngineRequest(
                prompt_ids, job.adapter, job.sampling, on_event, stream=job.stream
            )
            try:
                requests.append(state.engine.submit(request))
            except GraftError as exc:
                for req in requests:
                    req.cancel()
                raise ApiError(503, str(exc), "server_error", code="shutting_down") from None
        return requests

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize)])
    async def load_lora_adapter(request: Request):
        body = await read_json(request, state.max_body_bytes)
        name, path = body.get("lora_name"), body.get("lora_path")
        for field, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value:
                raise ApiError(400, f"{field!r} should be a non-empty string", param=field)
        if name == state.base_name or name in state.registry:
            raise ApiError(400, f"the adapter {name!r} has already been loaded", param="lora_name")
        try:
            await run_in_threadpool(state.registry.register, name, path, load=True)
        except GraftError as exc:
            raise ApiError(400, str(exc), param="lora_path") from None
        logger.info("loaded adapter %r from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize)])
    async def unload_lora_adapter(request: Request):
        from graftlm.serve.adapter_pool import UnknownAdapter

        body = await read_json(request, state.max_body_bytes)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'lora_name' should be a non-empty string", param="lora_name")
        try:
            await run_in_threadpool(state.registry.unregister, name)
        except UnknownAdapter:
            raise ApiError(
                404, f"the adapter {name!r} cannot be found", code="model_not_found"
            ) from None
        logger.info("unloaded adapter %r", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return app


def is_loopback(host: str) -> bool:
    # the socket peer's address (uvicorn only rewrites it from X-Forwarded-For sent by a
    # trusted local proxy); a Unix socket or anything unparsable is not loopback
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- starting the server ------------------------------------------------------------------------


def create_server(
    model: str | None = None,
    adapters: dict[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    max_prompt_tokens: int = 4096,
    max_tokens_limit: int = 1024,
    max_body_bytes: int = 1 << 20,
    adapter_memory: int | None = None,
    dtype: str = "float32",
    force: bool = False,
    log_level: str = "warning",
):
    """Load the base model and adapters, start the engine, and build the uvicorn server.

    Args:
        model: base model name/path (None: the base the first adapter names, else built-in).
        adapters: `{name: folder}` registered and loaded at start.
        host, port: where to listen.
        api_key: Bearer key clients must send (None: loopback clients only).
        max_batch: rows decoded together.
        max_prompt_tokens, max_tokens_limit, max_body_bytes: request limits (400/413 past them).
        adapter_memory: bytes of adapter weights kept loaded (least recently used unloaded).
        dtype: "float32" or "bfloat16".
        force: load adapters despite a base-fingerprint mismatch.
        log_level: uvicorn's log level.

    Returns:
        (uvicorn.Server, ServerState); `server.run()` serves until SIGINT/SIGTERM (or
        `server.should_exit = True`) and stops the engine on the way out.
    """
    try:
        import uvicorn
    except ImportError:
        raise GraftError(
            "graftlm serve needs fastapi and uvicorn: pip install 'graftlm[serve]'"
        ) from None
    from contextlib import asynccontextmanager

    from graftlm.infer.generate import load_for_inference
    from graftlm.models.load import model_id_of
    from graftlm.serve.adapter_pool import AdapterRegistry
    from graftlm.serve.scheduler import Engine

    adapters = adapters or {}
    if max_batch <= 0 or max_prompt_tokens <= 0 or max_tokens_limit <= 0 or max_body_bytes <= 0:
        raise GraftError(
            "--max-batch, --max-prompt-tokens, --max-tokens-limit and --max-body-bytes "
            "should be positive"
        )
    # load_for_inference picks the base and quantizes it for QLoRA adapters; the registry
    # then owns the adapters (it loads them under its own internal names)
    from graftlm.infer.generate import adapter_base_model, is_loadable
    from graftlm.models.load import BUILTIN_NAME

    if model is None:
        bases = (adapter_base_model(path) for path in adapters.values())
        model = next((b for b in bases if b and is_loadable(b)), BUILTIN_NAME)
    base, tokenizer = load_for_inference(model, {}, dtype=dtype, force=force)
    if any(_wants_nf4(path) for path in adapters.values()):
        from graftlm.methods.lora.inject import quantize_base

        quantize_base(base)
    base_name = model or model_id_of(base)
    if base_name in adapters:
        raise GraftError(f"--adapter {base_name}=...: that name is the base model's own")
    registry = AdapterRegistry(base, budget_bytes=adapter_memory, force=force)
    for name, path in adapters.items():
        registry.register(name, path, load=True)
    engine = Engine(base, tokenizer, registry, max_batch=max_batch)
    context = int(getattr(base.config, "max_position_embeddings", 0) or 1 << 30)
    state = ServerState(
        engine=engine,
        base_name=base_name,
        api_key=api_key,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        context=context,
        created=int(time.time()),
    )
    app = build_app(state)

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app.router.lifespan_context = lifespan
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10
    )
    return uvicorn.Server(config), state


def _wants_nf4(path: str) -> bool:
    from graftlm.methods import folder_method
    from graftlm.methods.lora.files import read_adapter_config

    return folder_method(path) == "lora" and read_adapter_config(path)[0].quantize == "nf4"


def parse_bytes(text: str) -> int:
    """`"512MB"`, `"2GiB"`, `"1000000"` -> bytes."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    raw = text.strip().lower().removesuffix("b")
    number = raw.rstrip("kmgi")
    unit = raw[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise GraftError(f"expected a size like 512MB or 2GiB, got {text!r}") from None
    if value <= 0:
        raise GraftError(f"expected a positive size, got {text!r}")
    return int(value)
