"""`graftlm serve`: the flags of the OpenAI-compatible server, and running it until a signal."""

from __future__ import annotations

import argparse
import logging
import os
import signal

from graftlm.cli.combine import expand_mixes
from graftlm.cli.infer import adapter_map

logger = logging.getLogger("graftlm")


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Register `graftlm serve` on the CLI's subparsers."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server: one base model, many adapters",
        description="Serve a base model and adapters over the OpenAI API (continuous batching).",
    )
    p.add_argument(
        "--model", default=None, help="base model (default: the adapters' base, else built-in)"
    )
    p.add_argument(
        "--adapter",
        action="append",
        help="NAME=DIR (repeatable); request it as model=NAME. NAME=a:0.5,b:0.5 serves the "
        "weighted sum of adapters a and b (graftlm combine --how cat, not written by you)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="Bearer key clients must send (or $GRAFTLM_API_KEY); "
        "without one only loopback clients are served",
    )
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="most tokens per answer")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument(
        "--adapter-memory",
        default=None,
        help="bytes of adapter weights kept loaded, e.g. 2GB (least recently used unloaded)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="prompts that may wait for a batch row; past it requests get 429 with Retry-After",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds a request may take in all, queue included (408 past it)",
    )
    p.add_argument(
        "--allow-runtime-adapters",
        action="store_true",
        help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (off: a client could "
        "make the server read any file); needs --adapter-root",
    )
    p.add_argument(
        "--adapter-root",
        default=None,
        metavar="DIR",
        help="the one folder runtime loads may read from (paths leaving it are refused)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--force", action="store_true", help="load adapters despite a base mismatch")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit code."""
    # torch-backed (and the app brings the optional fastapi and uvicorn): imported in the
    # command so that `graftlm --help` answers at once
    from graftlm.serve.app import create_server, is_loopback, parse_bytes

    api_key = args.api_key or os.environ.get("GRAFTLM_API_KEY") or None
    server, state = create_server(
        args.model,
        expand_mixes(adapter_map(args.adapter)),
        host=args.host,
        port=args.port,
        api_key=api_key,
        max_batch=args.max_batch,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        adapter_memory=parse_bytes(args.adapter_memory) if args.adapter_memory else None,
        dtype=args.dtype,
        force=args.force,
        allow_runtime_adapters=args.allow_runtime_adapters,
        adapter_root=args.adapter_root,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        log_level="debug" if logger.isEnabledFor(logging.DEBUG) else "warning",
    )
    names = ", ".join([state.base_name, *state.registry.names()])
    auth = "Bearer key required" if api_key else "loopback clients only"
    if not api_key and not is_loopback(args.host):
        logger.warning("no --api-key: clients not on this machine will get 403")
    logger.info("serving %s on http://%s:%d/v1 (%s)", names, args.host, args.port, auth)
    # uvicorn turns SIGINT/SIGTERM into a graceful shutdown (finish open responses, stop the
    # engine), then re-raises the signal under the handler that was there before: a no-op for
    # SIGTERM makes a service manager's stop an ordinary exit 0 instead of death by signal
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    logger.info("server stopped")
    return 0
