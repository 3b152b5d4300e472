"""The base model under the adapters: its fingerprint, the check of a folder against it, and
turning its linear layers to 4 bits for QLoRA adapters (kept on their own 4-bit grid where the
base is already 4-bit, as the built-in GGUF Q4_1 model is).

A fingerprint identifies a base (architecture, layer shapes, a hash of a few embedding rows);
`graftlm.json` records the one an adapter was trained on, and loading compares it with the
model's, so an adapter does not silently run on a base it was not trained for.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from graftlm.adapters.folder import read_graft
from graftlm.adapters.modules import is_linear, linear_dims
from graftlm.adapters.state import adapter_state
from graftlm.errors import GraftError
from graftlm.methods.lora.layer import LoraEmbedding, LoraLayerBase, LoraLinear
from graftlm.models.gguf_cache import MARKER as GGUF_CONVERSION_MARKER
from graftlm.models.load import model_folder
from graftlm.models.weights import StreamedLoadUnsupported, iter_tensors, weight_files
from graftlm.quant.base_linears import quantize_model_linears
from graftlm.quant.q4_grid import Q4GridTensor, find_q4_grid


def base_fingerprint(model: nn.Module) -> dict:
    """Identify a base model: architecture, layer shapes, and a hash of a few weight slices.

    Computed once, before any adapter touches the weights (merging or PiSSA change them), and
    kept in the model's AdapterState. The weight hash reads input-embedding rows cast to bf16,
    which stay the same whether the base is loaded in fp32, bf16, or with 4-bit linear layers.
    """
    state = adapter_state(model)
    if state.fingerprint is not None:
        return state.fingerprint
    config = getattr(model, "config", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    shapes = hashlib.sha256()
    for name, module in model.named_modules():
        # a LoRA layer keeps its base's name and sizes: it counts as the layer it adapts
        if isinstance(module, LoraLinear):
            shapes.update(f"{name}:{module.out_features}x{module.in_features};".encode())
        elif isinstance(module, (LoraEmbedding, nn.Embedding)):
            shapes.update(f"{name}:{module.num_embeddings}x{module.embedding_dim};".encode())
        elif is_linear(module) and not isinstance(module, LoraLayerBase):
            out_f, in_f = linear_dims(module)
            shapes.update(f"{name}:{out_f}x{in_f};".encode())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    table = embeddings.weight.detach() if embeddings is not None else None
    state.fingerprint = {
        "architecture": arch,
        "model_type": getattr(config, "model_type", None),
        "shapes_sha256": shapes.hexdigest()[:16],
        "weights_sha256": embedding_hash(table),
    }
    return state.fingerprint


def embedding_hash(table: torch.Tensor | None) -> str:
    """The ``weights_sha256`` of a base fingerprint: the first, middle and last 8 rows of the
    input-embedding table `(vocab, dim)`, as bf16 (also computed from GGUF files on export)."""
    weights = hashlib.sha256()
    if table is not None:
        rows = torch.cat(
            [table[:8], table[table.shape[0] // 2 : table.shape[0] // 2 + 8], table[-8:]]
        )
        weights.update(rows.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return weights.hexdigest()[:16]


def check_fingerprint(model: nn.Module, graft: dict, folder: os.PathLike, force: bool) -> None:
    """Compare the base fingerprint in `graft` (a folder's graftlm.json) with `model`'s.

    Raises:
        GraftError: another architecture; other weights of the same architecture, unless
            `force`. Folders without a fingerprint (trained elsewhere) pass.
    """
    expected = graft.get("base_fingerprint")
    if not expected:
        return  # trained elsewhere (PEFT, ...): shapes are checked key by key instead
    found = base_fingerprint(model)
    if expected.get("architecture") != found.get("architecture"):
        raise GraftError(
            f"{folder}: adapter was trained on a {expected.get('architecture')} base, "
            f"this model is a {found.get('architecture')}"
        )
    if expected.get("weights_sha256") != found.get("weights_sha256") and not force:
        raise GraftError(
            f"{folder}: adapter was trained on a different base model with the same architecture "
            f"(weights fingerprint {expected.get('weights_sha256')} != {found.get('weights_sha256')}); "
            "pass force=True (CLI: --force) to load it anyway"
        )


def check_base(model: nn.Module, folder: os.PathLike, force: bool) -> None:
    """`check_fingerprint` against the folder's own graftlm.json (if it has one)."""
    check_fingerprint(model, read_graft(folder), folder, force)


def quantize_base(model: nn.Module) -> None:
    """Turn the base's linear layers into NF4 (QLoRA), once; a no-op if already quantized.

    The fingerprint is taken first (it reads the embeddings and the layer shapes, which
    quantizing keeps), so a QLoRA adapter and a LoRA adapter trained on the same base carry the
    same fingerprint. A base loaded with `load_model(..., quantize="nf4")` is already quantized,
    into the same layers.
    """
    base_fingerprint(model)
    if any(getattr(m, "is_quantized_linear", False) for m in model.modules()):
        return
    quantize_model_linears(model, grids=grids_in_files(model))


def grids_in_files(model: nn.Module) -> dict[str, Q4GridTensor] | None:
    """`{linear layer name: its 4-bit grid}` for the base's linear weights that are already 4-bit
    (`graftlm.quant.q4_grid`), read in full precision from the fp32 files of its GGUF conversion
    (`models/gguf_cache.py`: the built-in model's included); None for any other model (then the
    weights in memory are looked at instead, which only an fp32 load can carry).

    The files, not the weights in memory, because a base loaded in bf16 holds its 4-bit values
    rounded to bf16, which no longer sit on their grid; training and inference read the same
    files, so an adapter always meets the base it was trained on. A file whose first linear
    weight is off a grid holds a full-precision model: nothing more is read (a large model's
    files are not read a second time for nothing).
    """
    if not getattr(getattr(model, "config", None), "name_or_path", ""):
        return None  # not loaded from files (a model built in memory)
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return None  # an fp32 load holds the exact values: looked at layer by layer, no read
    try:
        folder = model_folder(model)
        if not (folder / GGUF_CONVERSION_MARKER).is_file():
            return None
        files = weight_files(folder)
    except (GraftError, StreamedLoadUnsupported):
        return None
    wanted = {
        f"{name}.weight": name
        for name, module in model.named_modules()
        if is_linear(module) and name.rsplit(".", 1)[-1] != "lm_head"  # never quantized
    }
    grids = {}
    for path in files:
        for key, weight in iter_tensors(path, set(wanted)):
            grid = find_q4_grid(weight)
            if grid is None and not grids:
                return grids
            if grid is not None:
                grids[wanted[key]] = grid
    return grids
