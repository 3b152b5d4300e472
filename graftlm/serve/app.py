"""`graftlm serve`: an OpenAI-compatible HTTP server over one base model and many adapters.

::

    graftlm serve --adapter tickets=adapters/tickets --adapter legal=adapters/legal

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="tickets", messages=[...])   # "model": adapter name
    client.completions.create(model="smollm2-135m-instruct", prompt="...")  # or the base

Endpoints, by group:

- `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as server-sent
  events ending in `data: [DONE]`): `graftlm.serve.routes_completions`;
- `GET /v1/models`, `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter` (vLLM's names
  and bodies): `graftlm.serve.routes_models`;
- `GET /health`: here, with the error handlers and the authorization every `/v1` route needs.

Requests are decoded by `graftlm.serve.scheduler.Engine` (continuous batching, one adapter per
row) over a `graftlm.serve.adapter_pool.AdapterRegistry` (many adapters, an LRU memory budget).
Request parsing and response shapes live in `graftlm.serve.openai_api`; what the server refuses
beyond that (runtime adapter loading, a full queue, a request past its time) in
`graftlm.serve.limits`. Without `--api-key` only loopback clients are served; the key is compared
in constant time and never logged.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
# at runtime, and they are imported inside the functions so that the CLI starts without fastapi
import asyncio
import hmac
import ipaddress
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from graftlm.adapters.io import quantization
from graftlm.errors import GraftError
from graftlm.infer.generate import base_for_adapters, load_for_inference
from graftlm.models.load import model_id_of
from graftlm.serve.adapter_pool import AdapterRegistry
from graftlm.serve.limits import check_adapter_root
from graftlm.serve.openai_api import ApiError, error_body
from graftlm.serve.routes_completions import add_completion_routes
from graftlm.serve.routes_models import add_model_routes
from graftlm.serve.scheduler import Engine
from graftlm.serve.state import ServerState

logger = logging.getLogger("graftlm")

__all__ = ["ServerState", "build_app", "create_server", "is_loopback", "parse_bytes"]


def build_app(state: ServerState):
    """The FastAPI application serving `state` (its engine must be started by the caller)."""
    # fastapi is the optional `serve` extra: imported when an app is built
    from fastapi import FastAPI

    app = FastAPI(title="graftlm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.graftlm = state
    add_error_handlers(app)
    authorize = authorizer(state)
    add_health_route(app, state)
    add_model_routes(app, state, authorize)
    add_completion_routes(app, state, authorize)
    return app


def add_error_handlers(app: Any) -> None:
    """Every error, ours or the framework's, as an OpenAI-style error body."""
    # the optional `serve` extra, as in build_app
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        error = ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code))
        return JSONResponse(error_body(error), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(error_body(error), status_code=500)


def authorizer(state: ServerState):
    """The dependency every `/v1` route runs first: the Bearer key, or a loopback client."""
    # the optional `serve` extra, as in build_app
    from fastapi import Request

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

    return authorize


def add_health_route(app: Any, state: ServerState) -> None:
    """`GET /health`: the engine's counters and the adapters' memory; 503 once it stopped."""
    # the optional `serve` extra, as in build_app
    from fastapi.responses import JSONResponse

    @app.get("/health")
    async def health():
        registry = state.registry
        stats = state.engine.stats()
        body = {
            "status": "ok" if state.engine.alive else "engine stopped",
            **stats,
            "queue_depth": stats["waiting"],
            "max_queue": state.max_queue,
            "adapters_registered": len(registry.names()),
            "adapters_loaded": len(registry.loaded()),
            "loaded_adapters": sorted(registry.loaded()),
            "adapter_bytes_loaded": registry.loaded_bytes(),
            "runtime_adapters": state.adapter_root is not None,
        }
        return JSONResponse(body, status_code=200 if state.engine.alive else 503)


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
    allow_runtime_adapters: bool = False,
    adapter_root: str | None = None,
    max_queue: int = 256,
    request_timeout: float = 600.0,
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
        allow_runtime_adapters: serve `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`
            (off by default: a client could make the server read any file).
        adapter_root: the one folder runtime loads may read from (needed with
            `allow_runtime_adapters`; paths leaving it, symlinks included, are refused).
        max_queue: prompts that may wait for a batch row; past it requests get 429.
        request_timeout: seconds a request may take in all (408 past it, its rows freed).

    Returns:
        (uvicorn.Server, ServerState); `server.run()` serves until SIGINT/SIGTERM (or
        `server.should_exit = True`) and stops the engine on the way out.
    """
    try:  # uvicorn (and fastapi) are the optional `serve` extra
        import uvicorn
    except ImportError:
        raise GraftError(
            "graftlm serve needs fastapi and uvicorn: pip install 'graftlm[serve]'"
        ) from None

    adapters = adapters or {}
    if max_batch <= 0 or max_prompt_tokens <= 0 or max_tokens_limit <= 0 or max_body_bytes <= 0:
        raise GraftError(
            "--max-batch, --max-prompt-tokens, --max-tokens-limit and --max-body-bytes "
            "should be positive"
        )
    if max_queue <= 0 or not request_timeout > 0:
        raise GraftError(
            f"--max-queue and --request-timeout should be positive, got {max_queue!r} and "
            f"{request_timeout!r}"
        )
    root = check_adapter_root(adapter_root, allow_runtime_adapters)
    engine, base_name = _start_engine(model, adapters, max_batch, adapter_memory, dtype, force)
    context = int(getattr(engine.model.config, "max_position_embeddings", 0) or 1 << 30)
    state = ServerState(
        engine=engine,
        base_name=base_name,
        api_key=api_key,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        context=context,
        created=int(time.time()),
        adapter_root=root,
        max_queue=max_queue,
        request_timeout=request_timeout,
    )
    app = build_app(state)
    app.router.lifespan_context = _lifespan(engine)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10
    )
    return uvicorn.Server(config), state


def _start_engine(
    model: str | None,
    adapters: dict[str, str],
    max_batch: int,
    adapter_memory: int | None,
    dtype: str,
    force: bool,
) -> tuple[Engine, str]:
    """Load the base, register and load the adapters, and build the engine (not yet started).

    Returns:
        (engine, the base's name in `model` fields).
    """
    # load_for_inference picks the base and quantizes it for QLoRA adapters; the registry
    # then owns the adapters (it loads them under its own internal names)
    if model is None:
        model = base_for_adapters(adapters.values())
    nf4 = any(_wants_nf4(path) for path in adapters.values())  # 4-bit as it is read
    base, tokenizer = load_for_inference(model, {}, dtype=dtype, force=force, nf4=nf4)
    base_name = model or model_id_of(base)
    if base_name in adapters:
        raise GraftError(f"--adapter {base_name}=...: that name is the base model's own")
    registry = AdapterRegistry(base, budget_bytes=adapter_memory, force=force)
    for name, path in adapters.items():
        registry.register(name, path, load=True)
    return Engine(base, tokenizer, registry, max_batch=max_batch), base_name


def _lifespan(engine: Engine):
    """The app's lifespan: the engine runs while the server does, and stops off the event loop."""

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    return lifespan


def _wants_nf4(path: str) -> bool:
    return quantization(path) == "nf4"


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
