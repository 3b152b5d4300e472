"""What `graftlm serve` refuses beyond a malformed body: an adapter loaded at runtime from
outside `--adapter-root`, more waiting requests than `--max-queue`, and an answer that takes
longer than `--request-timeout`.

Loading adapters at runtime (`/v1/load_lora_adapter`) is off unless the server was started with
`--allow-runtime-adapters` (vLLM gates it the same way, `VLLM_ALLOW_RUNTIME_LORA_UPDATING`): a
client holding the key could otherwise make the server open any file on its disk. When on, a
`lora_path` is resolved inside the adapter root, symlinks included, and a path that leaves it is
refused with one message whether or not anything exists there, so the answer reveals nothing
about the rest of the disk.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from graftlm.errors import GraftError
from graftlm.serve.openai_api import ApiError

RETRY_AFTER_S = 1
"""A full queue's `Retry-After`: a short answer's time here, after which a retry usually fits."""


def check_adapter_root(root: str | os.PathLike | None, allow: bool) -> Path | None:
    """The adapter root `create_server` keeps: its real path, or None when runtime loading is off.

    Raises:
        GraftError: runtime loading is on without a root, or the root is not a folder.
    """
    if not allow:
        return None
    if root is None:
        raise GraftError(
            "--allow-runtime-adapters needs --adapter-root DIR: the one folder clients may load "
            "adapters from"
        )
    real = Path(os.path.realpath(os.path.expanduser(os.fspath(root))))
    if not real.is_dir():
        raise GraftError(f"--adapter-root {os.fspath(root)!r} is not a folder")
    return real


def runtime_adapter_path(root: Path | None, requested: str) -> Path:
    """The folder a `/v1/load_lora_adapter` request may load: `requested` resolved inside `root`.

    Args:
        root: the real path of `--adapter-root`, or None when runtime loading is off.
        requested: the request's `lora_path`, relative to the root (an absolute path is
            accepted only if it lies inside the root).

    Raises:
        ApiError: 403 when runtime loading is off, or when the path (or a file in its folder,
            through a symlink) leaves the root; the same words for every path outside.
    """
    if root is None:
        raise runtime_adapters_off()
    refused = ApiError(
        403,
        "'lora_path' should name an adapter folder inside this server's adapter root, "
        "relative to it",
        "permission_error",
        param="lora_path",
        code="path_not_allowed",
    )
    if "\x00" in requested or ".." in PurePath(requested).parts:
        raise refused
    # realpath resolves symlinks of the parts that exist and leaves the rest as written, so a
    # missing path and an existing one outside the root take the same branch
    candidate = Path(os.path.realpath(root / requested))
    if candidate == root or not _inside(candidate, root):
        raise refused
    if candidate.is_dir():
        for entry in os.scandir(candidate):  # adapter_model.safetensors -> /etc/shadow
            if not _inside(Path(os.path.realpath(entry.path)), root):
                raise refused
    return candidate


def runtime_adapters_off() -> ApiError:
    """The 403 of a load or unload on a server started without `--allow-runtime-adapters`."""
    return ApiError(
        403,
        "loading and unloading adapters at runtime is off on this server (start it with "
        "--allow-runtime-adapters --adapter-root DIR)",
        "permission_error",
        code="runtime_adapters_disabled",
    )


def hide_root(message: str, root: Path | None) -> str:
    """An error message about a runtime adapter with the root's own path left out."""
    return message if root is None else message.replace(str(root), "<adapter-root>")


def check_queue(engine, waiting_limit: int, rows: int) -> None:
    """Refuse (429, with `Retry-After`) a request whose rows would queue past `waiting_limit`.

    Only waiting rows count: a row decoding in the batch is being served.
    """
    waiting = engine.stats()["waiting"]
    if waiting + rows > waiting_limit:
        raise ApiError(
            429,
            f"the server is busy ({waiting} requests waiting, --max-queue {waiting_limit}); "
            f"retry in {RETRY_AFTER_S} s",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


def timed_out(timeout: float) -> ApiError:
    """The error of a request that ran past `--request-timeout` (its rows are cancelled)."""
    return ApiError(
        408,
        f"the request took longer than this server's limit of {timeout:g} s (--request-timeout)",
        "timeout_error",
        code="timeout",
    )


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
