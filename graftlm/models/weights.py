"""Read a Hugging Face folder's safetensors weights into a built model, one tensor at a time.

The files are read with ordinary reads, not mapped: pages of a mapped file count in the
process's resident memory for as long as the mapping lives, so mapping a float32 checkpoint to
load it in bf16 holds the file and the cast copy at once. Each tensor is read into a buffer of its
own size, copied (and cast) into the model's parameter, and dropped.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length,
a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": ...},
then the data, offsets counted from the end of the header.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from graftlm.errors import GraftError

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# A header is a few hundred KB even for large models; a larger length means a damaged file.
_MAX_HEADER = 100 * 1024 * 1024


class StreamedLoadUnsupported(Exception):
    """The folder's weights cannot be streamed into the model as they are (no safetensors file,
    names that need transformers' key conversions): load it with `from_pretrained` instead."""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: the single file, or the shards its index names.

    Raises:
        StreamedLoadUnsupported: the folder has neither.
    """
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    index = folder / SHARD_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GraftError(f"{index}: not a safetensors shard index ({e})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    raise StreamedLoadUnsupported(f"{folder} has no {SINGLE_FILE} or {SHARD_INDEX}")


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file and the offset at which its data starts.

    Raises:
        GraftError: the file is not a readable safetensors file (names the file and the fault).
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise GraftError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise GraftError(f"{path}: header length {length} is not plausible (damaged file)")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        raise GraftError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def iter_tensors(path: Path, wanted: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the tensors of one safetensors file, in file order, each read into
    its own fresh buffer (never a view of a mapping).

    Raises:
        GraftError: a damaged file, an unknown dtype, or data that does not fit its shape.
    """
    header, data_start = read_header(path)
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, entry in entries:
            if wanted is not None and name not in wanted:
                continue
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise GraftError(
                    f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}"
                )
            begin, end = entry["data_offsets"]
            shape = list(entry["shape"])
            tensor = torch.empty(shape, dtype=dtype)
            if tensor.numel() * tensor.element_size() != end - begin:
                raise GraftError(
                    f"{path}: tensor {name!r} of shape {shape} and dtype {entry['dtype']} does "
                    f"not fit its {end - begin} bytes"
                )
            f.seek(data_start + begin)
            if end > begin:
                view = memoryview(tensor.view(torch.uint8).reshape(-1).numpy())
                if f.readinto(view) != end - begin:
                    raise GraftError(f"{path}: file ends inside tensor {name!r} (truncated)")
            yield name, tensor


def load_weights_streamed(
    model: nn.Module, folder: Path, take: Callable[[str, torch.Tensor], bool] | None = None
) -> None:
    """Copy the folder's tensors into `model`'s parameters and persistent buffers, cast to their
    dtype, one tensor in memory at a time.

    `take(name, tensor)`, where given, sees each tensor first, as read (before any cast); where
    it returns True it has used the tensor itself and nothing is copied (a layer quantized as
    it is read: `graftlm.quant.base_linears.LinearsToFourBit`).

    Tensors the model ties to another (lm_head to the input embedding) may be absent from the
    files; the caller re-ties them.

    Raises:
        StreamedLoadUnsupported: the files do not name the model's tensors one to one, or a shape
            differs (transformers' loader knows the conversions some checkpoints need).
        GraftError: a damaged file.
    """
    files = weight_files(folder)
    targets = model.state_dict(keep_vars=True)
    headers = {path: read_header(path)[0] for path in files}
    in_files = {name: entry for header in headers.values() for name, entry in header.items()}
    tied = _tied_names(model)
    missing = set(targets) - set(in_files) - tied
    unexpected = set(in_files) - set(targets)
    if missing or unexpected:
        raise StreamedLoadUnsupported(
            f"names differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    mismatched = [n for n, e in in_files.items() if list(e["shape"]) != list(targets[n].shape)]
    if mismatched:
        raise StreamedLoadUnsupported(f"shapes differ: {mismatched[:3]}")
    with torch.no_grad():
        for path in files:
            for name, tensor in iter_tensors(path):
                if take is None or not take(name, tensor):
                    targets[name].copy_(tensor)
                del tensor


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names of tensors that share storage with an earlier name (tied weights)."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        pointer = tensor.data_ptr()
        if tensor.numel() and pointer in seen:
            tied.add(name)
        seen.add(pointer)
    return tied
