"""GGUF export for llama.cpp: a LoRA adapter file, or base + adapter merged into one model file.

::

    graftlm export --adapter DIR --format gguf --out adapter.gguf [--outtype f32|f16|bf16|q8_0]
    graftlm export --adapter DIR --format gguf-merged --out model.gguf [--quant f16|q8_0|q4_0|q4_1]

**Adapter file** (llama.cpp's format, as its ``convert_lora_to_gguf.py`` writes it):
``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``, the base's
``general.architecture``, and per adapted matrix ``blk.{i}.attn_q.weight.lora_a`` (numpy shape
``(r, in)``, ggml ``[in, r]``) and ``.lora_b`` (``(out, r)``) — PEFT's A and B orientation, which is
the one llama.cpp checks when it loads the file. The rows of B for q and k are permuted like the
base's q/k weights (`graftlm.export.llama_layout.permute_qk`).

**One scale per file.** llama.cpp multiplies every module's B·A x by ``alpha / r`` with one
``alpha`` for the whole file and r the module's own rank (the width of its B). PEFT's scale is
``alpha_m / r_m`` (``alpha_m / sqrt(r_m)`` with rsLoRA), with per-module ``rank_pattern`` /
``alpha_pattern`` overrides. The writer keeps the file's ``alpha`` = the config's ``alpha`` and
multiplies each B by ``scale_m · r_m / alpha``, so every module keeps its true scale under
llama.cpp (and ``--lora-scaled F`` still scales the whole adapter by F).

**Merged file** (``gguf-merged``): the base with ``scale · B·A`` added to each adapted weight, one
GGUF that llama.cpp runs without an adapter. Two kinds of base:

- a GGUF file (the built-in model, or any ``.gguf`` of a supported architecture): metadata and
  tokenizer are copied from the source file; each adapted tensor is dequantized, merged in fp32 and
  written as ``--quant``; every other tensor is copied byte for byte (re-quantizing it would only
  lose precision).
- a Hugging Face Llama folder (``model_type: llama``): merged by `graftlm.export.merged_folder.merge_to_folder`,
  then written by `graftlm.export.llama_layout.write_llama_folder` (hyperparameters, tensors, and a GPT-2
  style BPE tokenizer whose pre-tokenizer llama.cpp knows; see that module for what is refused).

Refused with a `GraftError`, never dropped: an architecture without a tensor-name map, embedding
adapters, ``modules_to_save``, trained biases, modules llama.cpp has no tensor for, and (unless
``force``) an adapter whose base fingerprint does not match the base's embedding rows.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graftlm.errors import GraftError
from graftlm.export.llama_layout import (
    LORA_TENSORS,
    SUPPORTED_ARCHITECTURES,
    encode,
    file_type,
    gguf_name,
    merged_kind,
    new_writer,
    permute_qk,
    qk_heads,
    write_file,
)

logger = logging.getLogger(__name__)

ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
"""Tensor types for ``--format gguf`` (those llama.cpp's own LoRA converter offers)."""

MERGED_QUANTS = ("f16", "q8_0", "q4_0", "q4_1")
"""Types for the adapted weights of ``--format gguf-merged``."""

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")


# -- the base model -------------------------------------------------------------------------------


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
    """The base to export against: `model`, else the one the adapter names, else the built-in.

    As `graftlm merge` does, a base name that is neither the built-in name nor a local path falls
    back to the built-in model.

    Raises:
        GraftError: the base is missing, not GGUF / HF, or of an architecture without a map here.
    """
    from graftlm.infer.generate import adapter_base_model
    from graftlm.methods.lora.files import read_adapter_config
    from graftlm.models.load import BUILTIN_NAME, builtin_gguf_path

    read_adapter_config(adapter)  # a missing or broken adapter fails before the base is parsed
    name = model or adapter_base_model(adapter) or BUILTIN_NAME
    if model is None and not (name.lower() == BUILTIN_NAME or os.path.exists(name)):
        name = BUILTIN_NAME
    if name.lower() == BUILTIN_NAME:
        return read_gguf_base(builtin_gguf_path())
    path = Path(name).expanduser()
    if path.is_file():
        return read_gguf_base(path)
    if (path / "config.json").is_file():
        return read_hf_base(path)
    if path.is_dir():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it holds {', '.join(ggufs)}: pass that file)" if ggufs else ""
        raise GraftError(f"base model folder {str(path)!r} has no config.json{hint}")
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
    reader = _reader(path)
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
    from graftlm.export.llama_layout import llama_hparams

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


def _reader(path: Path) -> Any:
    import gguf

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
    value = entry.contents()
    return int(value) if isinstance(value, (np.integer,)) else value


def embedding_hash(base: GGUFBase) -> str | None:
    """The base's ``weights_sha256`` as `graftlm.methods.lora.inject.base_fingerprint` computes it on the
    loaded model (same dequantization as transformers' GGUF loader), or None without a table."""
    import torch

    from graftlm.methods.lora.inject import embedding_hash as hash_table

    if base.is_gguf:
        import gguf

        t = next((t for t in base.reader.tensors if t.name == "token_embd.weight"), None)
        if t is None:
            return None
        table = gguf.quants.dequantize(t.data, t.tensor_type).reshape(base.shapes[t.name])
        return hash_table(torch.from_numpy(np.ascontiguousarray(table)))
    from safetensors import safe_open

    for file in sorted(base.path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if "model.embed_tokens.weight" in f.keys():
                return hash_table(f.get_tensor("model.embed_tokens.weight"))
    return None


# -- the adapter -----------------------------------------------------------------------------------


@dataclass
class LoraPair:
    """One adapted matrix, ready for llama.cpp.

    Attributes:
        module: Hugging Face module name (``model.layers.0.self_attn.q_proj``).
        tensor: llama.cpp base tensor (``blk.0.attn_q.weight``).
        a: ``(r, in)`` float32, as trained.
        b: ``(out, r)`` float32 as trained, rows in llama.cpp's order (permuted for q and k).
        scale: the module's true scale (alpha_m / r_m, or alpha_m / sqrt(r_m) with rsLoRA).
    """

    module: str
    tensor: str
    a: np.ndarray
    b: np.ndarray
    scale: float

    def delta(self) -> np.ndarray:
        """``scale · B·A`` in llama.cpp's row order, ``(out, in)`` float32 (computed in fp32)."""
        import torch

        a = torch.from_numpy(self.a)
        b = torch.from_numpy(self.b)
        return (b @ a).mul_(self.scale).numpy()


def lora_pairs(
    adapter: str | os.PathLike, base: GGUFBase, *, force: bool = False
) -> tuple[Any, list[LoraPair]]:
    """Read an adapter folder as llama.cpp tensors for `base` (B rows permuted for q and k).

    Returns:
        (LoraConfig, pairs in block order); each pair's B is unscaled (see `LoraPair`).

    Raises:
        GraftError: listing every tensor or setting llama.cpp cannot take (embedding adapters,
            modules_to_save, biases, modules without a llama.cpp tensor, shape mismatches);
            or the adapter's base fingerprint names another base (unless `force`).
    """
    from graftlm.methods.lora.files import read_adapter_config, read_adapter_weights

    config, graft = read_adapter_config(adapter)
    expected = (graft.get("base_fingerprint") or {}).get("weights_sha256")
    if expected and not force:
        base_hash = embedding_hash(base)
        if base_hash is not None and base_hash != expected:
            raise GraftError(
                f"{adapter}: adapter was trained on a different base model than {str(base.path)!r} "
                f"(weights fingerprint {expected} != {base_hash}); pass --force to export it anyway"
            )
    weights = read_adapter_weights(adapter)
    problems: list[str] = []
    if config.modules_to_save:
        problems.append(
            f"modules_to_save {list(config.modules_to_save)!r} (whole trained modules have no "
            "place in a llama.cpp LoRA file)"
        )
    found: dict[str, dict[str, Any]] = {}
    others = []
    for key, tensor in weights.items():
        match = _LORA_KEY.match(key)
        if match:
            found.setdefault(match.group("module"), {})[match.group("kind")] = tensor
        else:
            others.append(key)
    embeddings = [k for k in others if ".lora_embedding_" in k]
    if embeddings:
        problems.append(f"embedding adapters are not exported ({_listing(embeddings)})")
    rest = [k for k in others if k not in embeddings]
    if rest:
        problems.append(f"tensors other than LoRA A/B ({_listing(rest)}: biases or saved modules)")

    pairs = []
    unmapped, mismatched = [], []
    for module, ab in sorted(found.items(), key=lambda kv: _block_order(kv[0])):
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: lora_{'B' if 'A' in ab else 'A'} is missing")
            continue
        name = gguf_name(module)
        if name is None or name.split(".")[-1] not in LORA_TENSORS:
            unmapped.append(module)
            continue
        tensor = f"{name}.weight"
        a = ab["A"].float().numpy()
        b = ab["B"].float().numpy()
        base_shape = base.shapes.get(tensor)
        if base_shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            mismatched.append(
                f"{module}: A {tuple(a.shape)}, B {tuple(b.shape)}; base {tensor} is "
                f"{'absent' if base_shape is None else base_shape}"
            )
            continue
        heads = qk_heads(tensor, base.n_head, base.n_head_kv)
        if heads is not None:
            b = permute_qk(b, heads)
        pairs.append(
            LoraPair(module, tensor, a, np.ascontiguousarray(b), config.scaling_for(module))
        )
    if unmapped:
        problems.append(f"modules without a llama.cpp LoRA tensor: {_listing(unmapped)}")
    if mismatched:
        problems.append(f"shapes do not match the base {str(base.path)!r}: {_listing(mismatched)}")
    if problems:
        raise GraftError(f"{adapter}: cannot export to llama.cpp: " + "; ".join(problems))
    if not pairs:
        raise GraftError(f"{adapter}: no LoRA tensors to export")
    if config.quantize == "nf4":
        logger.warning(
            "%s is a QLoRA adapter, trained against an NF4 copy of the base; llama.cpp applies it "
            "to the base as stored in the GGUF file",
            adapter,
        )
    return config, pairs


def _listing(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _block_order(module: str) -> tuple[int, str]:
    match = re.search(r"\.layers\.(\d+)\.", module)
    return (int(match.group(1)) if match else -1, module)


# -- writing ---------------------------------------------------------------------------------------


def export_adapter_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    outtype: str = "f32",
    force: bool = False,
) -> Path:
    """Write a llama.cpp LoRA adapter file (run it with ``llama-cli -m BASE --lora OUT``).

    Args:
        adapter: a PEFT-format adapter folder.
        out: the ``.gguf`` file to write (replaced if it exists).
        model: the base (built-in name, ``.gguf`` file or HF Llama folder); default: the base
            the adapter names, else the built-in model. Only its architecture, head counts and
            shapes are read.
        outtype: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the A and B tensors.
        force: export although the adapter's base fingerprint names another base.

    Returns:
        The written path.

    Raises:
        GraftError: unknown `outtype`, unsupported architecture or adapter contents (see
            `lora_pairs`).
    """
    import gguf

    if outtype not in ADAPTER_OUTTYPES:
        raise GraftError(
            f"--outtype should be one of {', '.join(ADAPTER_OUTTYPES)}, got {outtype!r}"
        )
    base = resolve_base(model, adapter)
    config, pairs = lora_pairs(adapter, base, force=force)
    writer = new_writer(base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, config.alpha)
    writer.add_name(Path(adapter).resolve().name)
    writer.add_file_type(file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for pair in pairs:
        rank = pair.a.shape[0]
        # llama.cpp scales by alpha / rank; fold the rest of the module's true scale into B
        fold = pair.scale * rank / config.alpha
        b = pair.b if fold == 1.0 else pair.b * np.float32(fold)
        writer.add_tensor(f"{pair.tensor}.lora_a", *_tensor(pair.a, outtype, pair.tensor))
        writer.add_tensor(f"{pair.tensor}.lora_b", *_tensor(b, outtype, pair.tensor))
    return write_file(writer, Path(out))


def _tensor(weights: np.ndarray, kind: str, name: str) -> tuple[np.ndarray, None, Any]:
    data, qtype = encode(weights, kind, name)
    return data, None, qtype  # add_tensor(name, tensor, raw_shape, raw_dtype)


def export_merged_gguf(
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    quant: str = "f16",
    force: bool = False,
) -> Path:
    """Write base + adapter merged as one GGUF model file (run it with ``llama-cli -m OUT``).

    Args:
        adapter: a PEFT-format adapter folder.
        out: the ``.gguf`` file to write (replaced if it exists).
        model: the base: built-in name or ``.gguf`` file (metadata, tokenizer and unadapted tensors
            copied from it), or a Hugging Face Llama folder; default as `export_adapter_gguf`.
        quant: type of the merged weights: ``f16``, ``q8_0``, ``q4_0`` or ``q4_1`` (1-D tensors
            stay f32; the embedding table and output head stay q8_0 under the 4-bit types).
        force: merge although the adapter's base fingerprint names another base.

    Returns:
        The written path.
    """
    if quant not in MERGED_QUANTS:
        raise GraftError(f"--quant should be one of {', '.join(MERGED_QUANTS)}, got {quant!r}")
    base = resolve_base(model, adapter)
    if base.is_gguf:
        _, pairs = lora_pairs(adapter, base, force=force)
        return _merge_into_gguf(base, pairs, Path(out), quant)
    return _merge_hf_folder(adapter, base, Path(out), quant, force)


def _merge_into_gguf(base: GGUFBase, pairs: list[LoraPair], out: Path, quant: str) -> Path:
    import gguf

    reader = base.reader or _reader(base.path)
    writer = new_writer(base.arch, use_temp_file=True)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    skip = {"general.architecture", "general.file_type"}
    for entry in reader.fields.values():
        if not entry.name.startswith("GGUF.") and entry.name not in skip:
            copy_field(writer, entry)
    writer.add_file_type(file_type(quant))
    by_tensor = {pair.tensor: pair for pair in pairs}
    plain = (
        gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8,
        gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
        gguf.GGMLQuantizationType.I64,
    )  # fmt: skip
    kept, noise, total = 0.0, 0.0, 0.0
    for t in reader.tensors:
        pair = by_tensor.get(t.name)
        if pair is None:
            raw = None if t.tensor_type in plain else t.tensor_type
            writer.add_tensor(t.name, t.data, raw_dtype=raw)
            continue
        shape = (pair.b.shape[0], pair.a.shape[1])
        base_weights = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        delta = pair.delta()
        weights = base_weights.astype(np.float32) + delta
        if not np.isfinite(weights).all():
            raise GraftError(f"{pair.module}: the merged weight has NaN or inf; not writing it")
        data, qtype = encode(weights, merged_kind(t.name, quant), t.name)
        writer.add_tensor(t.name, data, raw_dtype=qtype)
        # what rounding did to the fine-tune: the part of the change that survives (projection
        # of written - base on delta) and the rounding error, both against the size of delta
        written = gguf.quants.dequantize(data, qtype).reshape(shape)
        kept += float(np.vdot(written - base_weights, delta))
        noise += float(np.square(written - weights).sum())
        total += float(np.vdot(delta, delta))
    share, error = (kept / total, (noise / total) ** 0.5) if total else (1.0, 0.0)
    message = (
        "%s: after rounding to %s the merged weights keep %.0f%% of the adapter's change, "
        "with a rounding error %.2fx the change's size"
    )
    if share < 0.5 or error > 3.0:
        logger.warning(
            message + ": much of the fine-tune is lost. Keep it with --format gguf (the adapter "
            "file on this base) or --quant q8_0/f16",
            out,
            quant,
            100 * share,
            error,
        )
    else:
        logger.info(message, out, quant, 100 * share, error)
    return write_file(writer, out)


def copy_field(writer: Any, entry: Any) -> None:
    """Copy one metadata key of a `gguf.GGUFReader` to a writer, types kept, strings as bytes
    (so tokens that are not valid UTF-8 survive)."""
    import gguf

    types = entry.types
    main = types[0]
    if main == gguf.GGUFValueType.ARRAY:
        if len(types) != 2:
            raise GraftError(f"GGUF key {entry.name!r}: nested arrays are not supported")
        sub = types[1]
        if sub == gguf.GGUFValueType.STRING:
            value: Any = [bytes(entry.parts[i]) for i in entry.data]
        else:
            value = (
                np.concatenate([entry.parts[i] for i in entry.data]).tolist() if entry.data else []
            )
        if not value:
            return
        writer.add_key_value(entry.name, value, main, sub_type=sub)
    elif main == gguf.GGUFValueType.STRING:
        writer.add_key_value(entry.name, bytes(entry.parts[entry.data[0]]), main)
    else:
        writer.add_key_value(entry.name, entry.parts[entry.data[0]].tolist()[0], main)


def _merge_hf_folder(
    adapter: str | os.PathLike, base: GGUFBase, out: Path, quant: str, force: bool
) -> Path:
    import shutil
    import tempfile

    from graftlm.export.llama_layout import write_llama_folder
    from graftlm.export.merged_folder import merge_to_folder

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".graftlm-merge-", dir=out.parent) as tmp:
        merged = merge_to_folder(adapter, Path(tmp) / "merged", model=str(base.path), force=force)
        write_llama_folder(merged, out, quant=quant)
        shutil.rmtree(merged, ignore_errors=True)
    return out
