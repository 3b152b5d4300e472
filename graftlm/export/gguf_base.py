"""The base model a GGUF export is written against: architecture, head counts and tensor shapes
(from a GGUF file's header or a Hugging Face Llama folder's config), and its embedding fingerprint.

Both GGUF writers (`graftlm.export.gguf_adapter`, `graftlm.export.gguf_merged`) start here: the
adapter file needs the base's shapes and q/k head counts; the merged file also copies a GGUF base's
metadata, tokenizer and tensors through the `GGUFBase.reader` kept here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from graftlm.errors import GraftError
from graftlm.export.llama_layout import SUPPORTED_ARCHITECTURES, llama_hparams
from graftlm.infer.generate import base_for_adapters
from graftlm.methods.lora.files import read_adapter_config
from graftlm.methods.lora.inject import embedding_hash as hash_table
from graftlm.models.load import BUILTIN_NAME, HUB_ALIASES, builtin_gguf_path, gguf_in_folder


@dataclass(frozen=True)
class GGUFBase:
    """What the writers need to know about a base model.

    Attributes:
        path: the ``.gguf`` file, or the Hugging Face folder.
        is_gguf: which of the two `path` is.
        arch: GGUF architecture name (``"llama"``).
        n_head: attention heads (q).
        n_head_kv: key/value heads (k, v).
        shapes: llama.cpp tensor name (``"blk.0.attn_q.weight"``) -> numpy shape ``(out, in)``.
        reader: the `gguf.GGUFReader` of a GGUF base (parsing the header takes seconds).
    """

    path: Path
    is_gguf: bool
    arch: str
    n_head: int
    n_head_kv: int
    shapes: dict[str, tuple[int, ...]]
    reader: Any = field(default=None, compare=False, repr=False)


def resolve_base(model: str | None, adapter: str | os.PathLike) -> GGUFBase:
    """The base to export against: `model`, else the one the adapter names, else the built-in
    (`graftlm.infer.generate.base_for_adapters`, as `graftlm merge` and `generate` pick it).

    Raises:
        GraftError: the base is missing, not GGUF / HF, or of an architecture without a map here.
    """
    read_adapter_config(adapter)  # a missing or broken adapter fails before the base is parsed
    name = model or base_for_adapters([adapter])
    if name.strip().lower() in (BUILTIN_NAME, *HUB_ALIASES) and not os.path.exists(name):
        return read_gguf_base(builtin_gguf_path())
    path = Path(name).expanduser()
    if path.is_file():
        return read_gguf_base(path)
    if (path / "config.json").is_file():
        return read_hf_base(path)
    if path.is_dir():
        return read_gguf_base(gguf_in_folder(path))
    raise GraftError(
        f"base model {name!r} not found: pass the built-in name {BUILTIN_NAME!r}, a .gguf file "
        "or a Hugging Face folder with --model"
    )


def read_gguf_base(path: str | os.PathLike) -> GGUFBase:
    """Architecture, head counts and tensor shapes from a GGUF file's header.

    Parsing the header takes seconds (the tokenizer's arrays); the result is remembered for the
    same file (path, size, mtime, inode), as its tensors are memory-mapped, not read.
    """
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise GraftError(f"could not read GGUF file {str(path)!r}: {exc}") from None
    return _read_gguf_base(path, (st.st_size, st.st_mtime_ns, st.st_ino))


@functools.lru_cache(maxsize=2)
def _read_gguf_base(path: Path, stamp: tuple[int, int, int]) -> GGUFBase:
    reader = gguf_reader(path)
    arch = _field_value(reader, "general.architecture")
    _check_arch(arch, str(path))
    n_head = _field_value(reader, f"{arch}.attention.head_count")
    n_head_kv = _field_value(reader, f"{arch}.attention.head_count_kv", default=n_head)
    if not isinstance(n_head, int) or not isinstance(n_head_kv, int):
        raise GraftError(
            f"{path}: per-layer head counts ({arch}.attention.head_count = {n_head!r}) are not "
            "supported by graftlm's GGUF export"
        )
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    return GGUFBase(Path(path), True, arch, n_head, n_head_kv, shapes, reader)


def read_hf_base(folder: str | os.PathLike) -> GGUFBase:
    """Architecture, head counts and tensor shapes of a Hugging Face Llama folder's config."""
    folder = Path(folder)
    hp = llama_hparams(folder)
    hidden, inter, heads, kv, head_dim = (
        hp["hidden_size"],
        hp["intermediate_size"],
        hp["n_head"],
        hp["n_head_kv"],
        hp["head_dim"],
    )
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(hp["n_layer"]):
        shapes.update(
            {
                f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
                f"blk.{i}.attn_k.weight": (kv * head_dim, hidden),
                f"blk.{i}.attn_v.weight": (kv * head_dim, hidden),
                f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
                f"blk.{i}.ffn_gate.weight": (inter, hidden),
                f"blk.{i}.ffn_up.weight": (inter, hidden),
                f"blk.{i}.ffn_down.weight": (hidden, inter),
            }
        )
    shapes["token_embd.weight"] = (hp["vocab_size"], hidden)
    if not hp["tied"]:
        shapes["output.weight"] = (hp["vocab_size"], hidden)
    return GGUFBase(folder, False, "llama", heads, kv, shapes)


def _check_arch(arch: Any, where: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GraftError(
            f"{where}: architecture {arch!r} has no llama.cpp tensor-name map in graftlm's GGUF "
            f"export (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def gguf_reader(path: Path) -> Any:
    """A `gguf.GGUFReader` of `path` (tensors memory-mapped, not read).

    Raises:
        GraftError: the file is missing or not GGUF.
    """
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct.error, OSError, ...
        raise GraftError(f"could not read GGUF file {str(path)!r}: {exc}") from None


def _field_value(reader: Any, key: str, default: Any = None) -> Any:
    entry = reader.fields.get(key)
    if entry is None:
        if default is not None:
            return default
        raise GraftError(f"{reader.data.filename}: GGUF key {key!r} is missing")
    try:
        value = entry.contents()
    except (ValueError, IndexError, TypeError) as exc:  # not UTF-8 (found by tests/fuzz), ...
        raise GraftError(
            f"{reader.data.filename}: GGUF key {key!r} is unreadable ({type(exc).__name__}: {exc})"
        ) from None
    return int(value) if isinstance(value, (np.integer,)) else value


def embedding_hash(base: GGUFBase) -> str | None:
    """The base's ``weights_sha256`` as `graftlm.methods.lora.inject.base_fingerprint` computes it on the
    loaded model (same dequantization as transformers' GGUF loader), or None without a table."""
    if base.is_gguf:
        t = next((t for t in base.reader.tensors if t.name == "token_embd.weight"), None)
        if t is None:
            return None
        table = gguf.quants.dequantize(t.data, t.tensor_type).reshape(base.shapes[t.name])
        return hash_table(torch.from_numpy(np.ascontiguousarray(table)))
    for file in sorted(base.path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                return hash_table(f.get_tensor("model.embed_tokens.weight"))
    return None
