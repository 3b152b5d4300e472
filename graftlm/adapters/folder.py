"""The adapter folder on disk, for every method: one reader and one writer of each file.

::

    adapter_config.json         PEFT's fields (`peft_type` says the method)
    adapter_model.safetensors   the adapter's tensors under PEFT's keys ("base_model.model.<module>...")
    graftlm.json                graftlm's own facts: method, base fingerprint, training summary

Every file is written atomically (a temp file in the same folder, then a rename), and a whole
save is all-or-nothing (`staged_folder`): its files are written into a staging folder inside the
adapter folder, which one rename commits; the commit's files then replace the folder's, and a
save killed among those renames is finished by the next reader (`finish_interrupted_save`). A
crash at any point leaves the previous adapter or the new one, never a mix. Weights are read with safetensors, never pickle
(prompt/prefix folders from older PEFT versions excepted, see `read_weights`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from graftlm import __version__
from graftlm.errors import GraftError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GRAFT_FILE = "graftlm.json"
PREFIX = "base_model.model."  # PEFT's key prefix of every tensor in the weights file


# -- writing ----------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON (insertion order kept) atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Write `tensors` (made contiguous, on the CPU) as a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata or {"format": "pt"}))


STAGING = ".graftlm-save"
"""The prefix of a save's staging folder (`.tmp-*` while written, `.commit` once complete)."""


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Write a whole save of `folder` all-or-nothing: yield a staging folder to write the files
    into; on a normal exit they replace the folder's own files of those names (others are kept).

    A crash before the commit (one rename) leaves the previous files; after it, the next
    `finish_interrupted_save` (every reader here runs it) completes the save.

    Raises:
        OSError: writing failed (disk full, read-only); the folder is left as it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_interrupted_save(folder)
    for stale in folder.glob(STAGING + ".tmp-*"):  # from a save killed before its commit
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING + ".tmp-", dir=folder))
    try:
        yield staging
        _fsync_dir(staging)
        os.rename(staging, folder / (STAGING + ".commit"))  # the commit point
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_interrupted_save(folder)


def finish_interrupted_save(folder: str | os.PathLike) -> None:
    """Complete a committed save of `folder` that was stopped while its files were moved in.

    Raises:
        GraftError: the folder holds such a save and cannot be written (read-only).
    """
    folder = Path(folder)
    commit = folder / (STAGING + ".commit")
    if not commit.is_dir():
        return
    try:
        for entry in sorted(os.listdir(commit)):
            source, target = commit / entry, folder / entry
            if source.is_dir() and target.is_dir():
                shutil.rmtree(target)
            os.replace(source, target)
        os.rmdir(commit)
        _fsync_dir(folder)
    except OSError as exc:
        raise GraftError(
            f"{folder}: holds an interrupted save ({commit.name}) that could not be finished: {exc}"
        ) from None


def _fsync_dir(folder: Path) -> None:
    """Make a folder's renames durable (a file's own fsync does not cover its name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write the weights file and `adapter_config.json` of an adapter folder."""
    folder = Path(folder)
    atomic_save_safetensors(folder / WEIGHTS_FILE, tensors)
    atomic_write_json(folder / CONFIG_FILE, config)


def peft_header(peft_type: str, base_model_name: str | None) -> dict[str, Any]:
    """The fields every PEFT `adapter_config.json` starts with, in PEFT's order."""
    return {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "inference_mode": True,
    }


def base_model_name(model) -> str | None:
    """The base's name or path as `adapter_config.json` records it (None when it has none)."""
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def write_graft(
    folder: Path,
    method: str,
    fingerprint: dict,
    tensors: dict[str, torch.Tensor],
    *,
    facts: dict | None = None,
    training: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write `graftlm.json`: method, version, time, base fingerprint, the method's own `facts`,
    the parameter count of `tensors`, then the training summary and `extra` facts."""
    graft = {
        "format_version": 1,
        "method": method,
        "graftlm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_fingerprint": fingerprint,
        **(facts or {}),
        "trainable_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    if training:
        graft["training"] = training
    if extra:
        graft.update(extra)
    atomic_write_json(Path(folder) / GRAFT_FILE, graft)


# -- reading ----------------------------------------------------------------------------------

# what a method's reader raises on a config field of the wrong type or a tensor of the wrong
# shape (found by fuzzing: tests/fuzz): a property of the folder, so a GraftError naming it
_MALFORMED = (
    TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RuntimeError,
)  # fmt: skip


@contextlib.contextmanager
def reading(folder: str | os.PathLike) -> Iterator[None]:
    """Make every error of reading or loading `folder` a one-line `GraftError` that names it.

    Raises:
        GraftError: what the block raised, prefixed with the folder unless it names it.
    """
    name = str(folder)
    try:
        yield
    except GraftError as exc:
        if name in str(exc) or str(Path(folder).resolve()) in str(exc):
            raise
        raise GraftError(f"{name}: {exc}") from None
    except RecursionError:
        raise GraftError(f"{name}: not a readable adapter folder (nested too deeply)") from None
    except _MALFORMED as exc:
        raise GraftError(
            f"{name}: not a readable adapter folder ({type(exc).__name__}: {exc})"
        ) from None


def read_config(folder: str | os.PathLike, peft_type: str | None = None) -> dict[str, Any]:
    """`adapter_config.json` of an adapter folder, as a dict.

    Args:
        folder: the adapter folder.
        peft_type: when given, the file's `peft_type` must be this one.

    Raises:
        GraftError: no such folder or file, invalid JSON, not a JSON object, another peft_type.
    """
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise GraftError(f"adapter folder {str(folder)!r} does not exist")
    finish_interrupted_save(folder)
    if not path.is_file():
        raise GraftError(
            f"{path}: not found (an adapter folder needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    data = _read_json(path)
    if not isinstance(data, dict):
        raise GraftError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if peft_type is not None and str(data.get("peft_type", "")).upper() != peft_type:
        raise GraftError(f"{path}: peft_type is {data.get('peft_type')!r}, expected {peft_type!r}")
    return data


def read_graft(folder: str | os.PathLike) -> dict[str, Any]:
    """`graftlm.json` of a folder, or {} for adapters saved elsewhere (PEFT, ...).

    Raises:
        GraftError: the file exists but is not valid JSON.
    """
    finish_interrupted_save(folder)
    path = Path(folder) / GRAFT_FILE
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict):
        raise GraftError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise GraftError(f"{path}: not valid JSON (nested too deeply)") from None
    # ValueError: JSONDecodeError, UnicodeDecodeError, a number of over 4300 digits
    except (OSError, ValueError) as exc:
        raise GraftError(f"{path}: not valid JSON ({exc})") from None


def read_weights(folder: str | os.PathLike, *, pickled: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of `adapter_model.safetensors`.

    Args:
        pickled: fall back to `adapter_model.bin` (read with `torch.load(weights_only=True)`)
            when there is no safetensors file; older PEFT wrote prompt/prefix folders so.

    Raises:
        GraftError: missing, truncated or corrupt file (only a pickle file, unless `pickled`).
    """
    folder = Path(folder)
    finish_interrupted_save(folder)
    path = folder / WEIGHTS_FILE
    legacy = folder / "adapter_model.bin"
    if not path.is_file():
        if pickled and legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
        if legacy.is_file():
            raise GraftError(
                f"{folder}: only adapter_model.bin (pickle) found; graftlm reads safetensors "
                "only. Convert it with PEFT (save_pretrained(safe_serialization=True)) first"
            )
        raise GraftError(f"{path}: not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for bad headers / short files
        raise GraftError(f"{path}: cannot read, file is truncated or corrupt ({exc})") from None


def weight_shapes(folder: str | os.PathLike, filename: str = WEIGHTS_FILE) -> dict[str, list[int]]:
    """{key: shape} of the folder's weights file (or `filename`, another safetensors file in
    it), from its header alone (no tensor is read).

    Raises:
        GraftError: missing, truncated or corrupt file.
    """
    finish_interrupted_save(folder)
    path = Path(folder) / filename
    if not path.is_file():
        raise GraftError(f"{path}: not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for bad headers
        raise GraftError(f"{path}: cannot read, file is truncated or corrupt ({exc})") from None


def parameter_count(shapes: dict[str, list[int]]) -> int:
    """How many numbers tensors of these shapes hold."""
    total = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        total += count
    return total


def strip_prefix(key: str) -> str:
    """A weights-file key without PEFT's `base_model.model.` prefix."""
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


def group_keys(
    tensors: dict[str, Any], pattern: re.Pattern
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Sort a weights file's entries by module.

    Each key, less PEFT's `base_model.model.` prefix, is matched whole against `pattern`, whose
    groups `module` and `kind` name the module and the tensor within it
    (`model.layers.0.mlp.down_proj` and `ia3_l`).

    Returns:
        ({module: {kind: value}}, {key: value} of the keys that did not match, as in the file).
    """
    groups: dict[str, dict[str, Any]] = {}
    others: dict[str, Any] = {}
    for key, value in tensors.items():
        match = pattern.fullmatch(strip_prefix(key))
        if match is None:
            others[key] = value
        else:
            groups.setdefault(match.group("module"), {})[match.group("kind")] = value
    return groups, others
