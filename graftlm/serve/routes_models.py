"""`GET /v1/models` (the base and every registered adapter), and vLLM's
`POST /v1/load_lora_adapter` / `POST /v1/unload_lora_adapter` to change the adapters served
(off unless `--allow-runtime-adapters`, and confined to `--adapter-root`: `graftlm.serve.limits`).
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
# at runtime, and fastapi is imported inside the function (the optional `serve` extra)
import logging
from typing import Any

from graftlm.errors import GraftError
from graftlm.serve.adapter_pool import UnknownAdapter
from graftlm.serve.limits import hide_root, runtime_adapter_path, runtime_adapters_off
from graftlm.serve.openai_api import ApiError, model_card, read_json
from graftlm.serve.state import ServerState

logger = logging.getLogger("graftlm")


def add_model_routes(app: Any, state: ServerState, authorize: Any) -> None:
    """Register the model list and the adapter load/unload endpoints, behind `authorize`."""
    # fastapi is the optional `serve` extra: imported when an app is built
    from fastapi import Depends, Request
    from fastapi.responses import PlainTextResponse
    from starlette.concurrency import run_in_threadpool

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": model_cards(state)}

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(authorize)])
    async def load_lora_adapter(request: Request):
        body = await read_json(request, state.max_body_bytes)
        name, path = body.get("lora_name"), body.get("lora_path")
        for field, value in (("lora_name", name), ("lora_path", path)):
            if not isinstance(value, str) or not value:
                raise ApiError(400, f"{field!r} should be a non-empty string", param=field)
        folder = runtime_adapter_path(state.adapter_root, path)
        if name == state.base_name or name in state.registry:
            raise ApiError(400, f"the adapter {name!r} has already been loaded", param="lora_name")
        try:
            await run_in_threadpool(state.registry.register, name, folder, load=True)
        except GraftError as exc:
            message = hide_root(str(exc), state.adapter_root)
            raise ApiError(400, message, param="lora_path") from None
        logger.info("loaded adapter %r from %s", name, folder)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(authorize)])
    async def unload_lora_adapter(request: Request):
        body = await read_json(request, state.max_body_bytes)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'lora_name' should be a non-empty string", param="lora_name")
        if state.adapter_root is None:  # changing the adapters served is one switch, both ways
            raise runtime_adapters_off()
        try:
            await run_in_threadpool(state.registry.unregister, name)
        except UnknownAdapter:
            raise ApiError(
                404, f"the adapter {name!r} cannot be found", code="model_not_found"
            ) from None
        logger.info("unloaded adapter %r", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def model_cards(state: ServerState) -> list[dict]:
    """The base's card, then one per registered adapter (with its folder and base)."""
    cards = [model_card(state.base_name, state.created, state.context)]
    for name in state.registry.names():
        try:
            entry = state.registry.entry(name)
        except UnknownAdapter:  # unregistered meanwhile
            continue
        path = str(entry.path)
        cards.append(model_card(name, state.created, state.context, path, state.base_name))
    return cards
