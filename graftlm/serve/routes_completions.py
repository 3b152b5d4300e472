"""`POST /v1/chat/completions` and `POST /v1/completions`: one engine request per prompt, the
answer whole or as server-sent events ending in ``data: [DONE]``.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request)
# at runtime, and fastapi is imported inside the functions (the optional `serve` extra)
import asyncio
from typing import Any

from graftlm.errors import GraftError
from graftlm.serve.limits import check_queue, timed_out
from graftlm.serve.openai_api import (
    ApiError,
    Job,
    completion_response,
    engine_error,
    error_body,
    parse_generation,
    read_json,
    result_of,
    sse,
    stream_chunk,
    usage,
)
from graftlm.serve.scheduler import Request as EngineRequest
from graftlm.serve.state import ServerState


def add_completion_routes(app: Any, state: ServerState, authorize: Any) -> None:
    """Register the two generation endpoints on `app`, behind the `authorize` dependency."""
    # fastapi is the optional `serve` extra: imported when an app is built
    from fastapi import Depends, Request

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: Request):
        return await generate(request, state, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request):
        return await generate(request, state, chat=False)


async def generate(request: Any, state: ServerState, chat: bool) -> Any:
    """Parse the body, submit its prompts, and answer: a response body, or a stream of chunks."""
    # the optional `serve` extra, as in add_completion_routes
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool

    timeout = state.request_timeout
    deadline = asyncio.get_running_loop().time() + timeout
    try:  # a body trickled in byte by byte holds a connection: it counts against the timeout
        body = await asyncio.wait_for(read_json(request, state.max_body_bytes), timeout)
    except asyncio.TimeoutError:
        raise timed_out(timeout) from None
    job = await run_in_threadpool(parse_generation, body, state, chat)
    check_queue(state.engine, state.max_queue, len(job.prompts))
    queue: asyncio.Queue = asyncio.Queue()
    requests = submit(job, queue, state)  # before any byte is sent: a refusal is still a 503
    if job.stream:
        return StreamingResponse(
            stream(job, chat, queue, requests, deadline, timeout),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    results = await collect(request, queue, requests, deadline, timeout)
    choices = [(i, result["text"], result["finish_reason"]) for i, result in enumerate(results)]
    return completion_response(job, chat, choices, usage(results))


def submit(job: Job, queue: asyncio.Queue, state: ServerState) -> list[EngineRequest]:
    """One engine request per prompt of `job`; their events arrive on `queue` as (index, event).

    Raises:
        ApiError: 503 when the engine is shutting down (the requests submitted so far cancelled).
    """
    loop = asyncio.get_running_loop()
    requests = []
    for index, prompt_ids in enumerate(job.prompts):

        def on_event(event, index=index):
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

        request = EngineRequest(prompt_ids, job.adapter, job.sampling, on_event, stream=job.stream)
        try:
            requests.append(state.engine.submit(request))
        except GraftError as exc:
            for req in requests:
                req.cancel()
            raise ApiError(503, str(exc), "server_error", code="shutting_down") from None
    return requests


async def collect(
    request: Any, queue: asyncio.Queue, requests: list, deadline: float, timeout: float
) -> list[dict]:
    """Wait for every request's "done" event; give up (and free the rows) if the client leaves
    or the loop's clock passes `deadline` (408)."""
    loop = asyncio.get_running_loop()
    results: list[dict | None] = [None] * len(requests)
    texts = [""] * len(requests)
    try:
        while any(r is None for r in results):
            left = deadline - loop.time()
            if left <= 0:
                raise timed_out(timeout)
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=min(0.5, left))
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


async def stream(
    job: Job, chat: bool, queue: asyncio.Queue, requests: list, deadline: float, timeout: float
):
    """The server-sent events of a streamed answer, ending in ``data: [DONE]``.

    A client that disconnects cancels this generator where it waits (Starlette watches the
    connection), and `finally` frees the rows at the engine's next step.
    """
    loop = asyncio.get_running_loop()
    finished: list[dict | None] = [None] * len(requests)
    try:
        if chat:
            for i in range(len(requests)):
                yield sse(stream_chunk(job, chat, i, role="assistant", text=""))
        while any(r is None for r in finished):
            try:
                index, event = await asyncio.wait_for(queue.get(), deadline - loop.time())
            except asyncio.TimeoutError:
                yield sse(error_body(timed_out(timeout)))
                break
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
