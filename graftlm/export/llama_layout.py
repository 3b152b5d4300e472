"""How llama.cpp lays out a Llama-family model in GGUF, and a writer for Hugging Face Llama folders.

The facts the GGUF writers in `graftlm.export.gguf` share (and the tests check):

- **Tensor names.** Hugging Face ``model.layers.{i}.self_attn.q_proj`` is llama.cpp's
  ``blk.{i}.attn_q``, and so on (:data:`BLOCK_NAMES`, :data:`GLOBAL_NAMES`).
- **Row order of q and k.** llama.cpp's HF -> GGUF converter (``convert_hf_to_gguf.py``,
  ``LlamaModel.permute``) reorders the rows of every head of the q and k projections, from
  Hugging Face's rotate-half RoPE layout (first half of a head, then second half) to llama.cpp's
  interleaved pairs. Within one head of size d, HF row ``h·d + j·d/2 + k`` becomes GGUF row
  ``h·d + 2k + j``::

      HF    [x0 x1 x2 x3 | y0 y1 y2 y3]      (j = 0 half, j = 1 half)
      GGUF  [x0 y0 x1 y1 x2 y2 x3 y3]

  k uses the number of key/value heads. transformers' GGUF loader undoes it
  (``LlamaTensorProcessor``), which is how `graftlm.models.load` reads the built-in GGUF model, so
  everything graftlm trains is in HF order: a LoRA B (rows = output features) and a merged q/k
  weight must be permuted like the base before they go into a GGUF file. Permuting the rows of B
  permutes the rows of B·A, so ``permute(W + s·B·A) = permute(W) + s·permute(B)·A``.
- **Architectures.** Only ``llama`` is mapped (SmolLM, SmolLM2, Llama 2/3 and other models that
  llama.cpp converts as ``llama``); other architectures are refused by the writers.
- **Tensor types.** 1-D tensors are f32; a block type (q8_0, q4_0, q4_1: 32 values a block) needs
  rows of a multiple of 32, and a tensor with shorter rows (a LoRA B of rank 16) is written f16,
  as llama.cpp's converters do.

`write_llama_folder` turns a Hugging Face Llama folder into a GGUF llama.cpp runs. It covers
``model_type: llama`` with plain RoPE (no ``rope_scaling``), no attention/MLP biases, and a
GPT-2-style byte-level BPE ``tokenizer.json`` whose pre-tokenizer llama.cpp recognises by hash
(:data:`PRE_TOKENIZERS`: SmolLM/SmolLM2 and Llama 3); anything else is a `GraftError` that says to
use llama.cpp's own ``convert_hf_to_gguf.py`` (SentencePiece tokenizers need the `sentencepiece`
package and per-model rules that live there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import safe_open

from graftlm.errors import GraftError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
"""GGUF ``general.architecture`` values whose tensor names and q/k order are mapped here."""

BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
"""Module inside ``model.layers.{i}`` -> llama.cpp tensor inside ``blk.{i}``."""

GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
"""Modules outside the decoder blocks."""

LORA_TENSORS = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
    "output",
)
"""llama.cpp tensors a LoRA adapter file may carry for a Llama model (llama.cpp applies LoRA to
these matrix products; the embedding table is refused by graftlm's writer)."""

_BLOCK = re.compile(r"^model\.layers\.(?P<index>\d+)\.(?P<rest>.+)$")


def gguf_name(hf_module: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama module (without ``.weight``), or None.

    ``"model.layers.3.self_attn.q_proj"`` -> ``"blk.3.attn_q"``; ``"lm_head"`` -> ``"output"``.
    """
    match = _BLOCK.match(hf_module)
    if match:
        inner = BLOCK_NAMES.get(match.group("rest"))
        return f"blk.{match.group('index')}.{inner}" if inner else None
    return GLOBAL_NAMES.get(hf_module)


def permute_qk(weights: Any, n_head: int) -> Any:
    """Rows in Hugging Face order -> llama.cpp (GGUF) order, exactly as ``convert_hf_to_gguf.py``.

    Args:
        weights: a numpy array or torch tensor of shape ``(n_head * head_dim, ...)``: a q or k
            projection weight, or a LoRA B for one (rows = output features).
        n_head: query heads for q, key/value heads for k.

    Returns:
        The same values with each head's rows interleaved (same shape and type).
    """
    rows = weights.shape[0]
    _check_rows(rows, n_head)
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute_qk(weights: Any, n_head: int) -> Any:
    """GGUF order -> Hugging Face order: the inverse of :func:`permute_qk` (what transformers'
    GGUF loader applies when `graftlm.models.load` reads a GGUF file)."""
    rows = weights.shape[0]
    _check_rows(rows, n_head)
    return (
        weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def qk_heads(tensor: str, n_head: int, n_head_kv: int) -> int | None:
    """The head count to permute a llama.cpp tensor's rows with (None: not permuted).

    Args:
        tensor: llama.cpp name, with or without ``.weight`` (``"blk.0.attn_k"``).
        n_head: ``llama.attention.head_count``.
        n_head_kv: ``llama.attention.head_count_kv``.
    """
    kind = tensor.removesuffix(".weight").rsplit(".", 1)[-1]
    return {"attn_q": n_head, "attn_k": n_head_kv}.get(kind)


def _check_rows(rows: int, n_head: int) -> None:
    if n_head <= 0 or rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of an even size")


# -- tensor types and files ------------------------------------------------------------------------


def ggml_type(kind: str) -> Any:
    """``"f16"`` -> `gguf.GGMLQuantizationType.F16` (also f32, bf16, q8_0, q4_0, q4_1)."""
    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
    }[kind]


def file_type(kind: str) -> int:
    """``general.file_type`` for a file whose matrices are mostly `kind`."""
    return int(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        }[kind]
    )


def merged_kind(tensor: str, quant: str) -> str:
    """The type of a merged model's matrix: `quant`, except that the embedding table and output
    head stay q8_0 under the 4-bit types (as in the built-in Q4_1 file, whose token_embd is Q8_0)."""
    if quant in ("q4_0", "q4_1") and tensor in ("token_embd.weight", "output.weight"):
        return "q8_0"
    return quant


def encode(weights: np.ndarray, kind: str, name: str = "") -> tuple[np.ndarray, Any]:
    """A float array as GGUF tensor data of type `kind` (see the module docstring for fallbacks).

    Returns:
        (data for `gguf.GGUFWriter.add_tensor`, its ``raw_dtype``).
    """
    qtype = ggml_type(kind)
    if weights.ndim < 2:
        qtype = gguf.GGMLQuantizationType.F32
    elif weights.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        logger.debug(
            "%s: rows of %d do not fill %s blocks; writing f16", name, weights.shape[-1], kind
        )
        qtype = gguf.GGMLQuantizationType.F16
    data = gguf.quants.quantize(np.ascontiguousarray(weights, dtype=np.float32), qtype)
    return data, qtype


def new_writer(arch: str, **kwargs: Any) -> Any:
    """A `gguf.GGUFWriter` for `arch` whose chatter (endianness, file plan) stays at debug level."""
    quiet = logging.getLogger("gguf")
    if quiet.level == logging.NOTSET:
        quiet.setLevel(logging.WARNING)
    return gguf.GGUFWriter(None, arch, **kwargs)


def write_file(writer: Any, out: str | os.PathLike) -> Path:
    """Write a `gguf.GGUFWriter` next to `out` and rename it into place (never half a file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return out


# -- Hugging Face Llama folder -> GGUF -------------------------------------------------------------

# llama.cpp names a BPE pre-tokenizer by the SHA-256 of the token ids of this text
# (convert_hf_to_gguf.py, get_vocab_base_pre; the string and hashes are generated there).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) "
    "\U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}
"""``tokenizer.ggml.pre`` by the hash of CHKTXT's token ids (SmolLM/SmolLM2, Llama 3)."""

_NOT_PERSISTED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def llama_hparams(folder: str | os.PathLike) -> dict[str, Any]:
    """The hyperparameters llama.cpp needs, from a Hugging Face Llama folder's ``config.json``.

    Raises:
        GraftError: not ``model_type: llama``, a missing field, RoPE scaling, or biases.
    """
    where = Path(folder) / "config.json"
    try:
        config = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise GraftError(f"{where}: cannot read ({exc})") from None
    convert = "convert it with llama.cpp's convert_hf_to_gguf.py and pass that .gguf as --model"
    if config.get("model_type") != "llama":
        raise GraftError(
            f"{where}: model_type {config.get('model_type')!r}: graftlm writes GGUF for Hugging "
            f"Face folders of model_type 'llama' only; {convert}"
        )
    missing = [
        k
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        if not isinstance(config.get(k), int)
    ]
    if missing:
        raise GraftError(f"{where}: missing or non-integer field(s) {', '.join(missing)}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise GraftError(f"{where}: RoPE type {rope_type!r} is not supported here; {convert}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise GraftError(f"{where}: {flag}=true is not supported here; {convert}")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    return {
        "hidden_size": hidden,
        "intermediate_size": config["intermediate_size"],
        "n_layer": config["num_hidden_layers"],
        "n_head": heads,
        "n_head_kv": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or hidden // heads,
        "vocab_size": config["vocab_size"],
        "context_length": config.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def write_llama_folder(
    folder: str | os.PathLike, out: str | os.PathLike, *, quant: str = "f16"
) -> Path:
    """Write a Hugging Face Llama folder as one GGUF file llama.cpp runs.

    Args:
        folder: ``config.json``, ``*.safetensors`` and the tokenizer files (``tokenizer.json``).
        out: the ``.gguf`` file (replaced if it exists).
        quant: ``f16``, ``q8_0``, ``q4_0`` or ``q4_1`` for the matrices (see `merged_kind`).

    Returns:
        The written path.

    Raises:
        GraftError: what the module docstring lists as unsupported, or unknown tensors.
    """
    folder = Path(folder)
    hp = llama_hparams(folder)
    writer = new_writer("llama", use_temp_file=True)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.resolve().name)
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_block_count(hp["n_layer"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["n_head"])
    writer.add_head_count_kv(hp["n_head_kv"])
    writer.add_rope_freq_base(hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_file_type(file_type(quant))
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden_size"] // hp["n_head"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, folder, hp["vocab_size"])

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GraftError(f"{folder}: no *.safetensors weights (graftlm never reads pickle files)")
    unknown = []
    tensors: list[tuple[tuple[int, str], str, Any]] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if _NOT_PERSISTED.search(key) or (hp["tied"] and key == "lm_head.weight"):
                    continue
                module, _, leaf = key.rpartition(".")
                name = gguf_name(module)
                if name is None or leaf != "weight":
                    unknown.append(key)
                    continue
                tensors.append((_tensor_order(name), f"{name}.weight", (file, key)))
    if unknown:
        raise GraftError(f"{folder}: tensors without a llama.cpp name: {', '.join(unknown[:6])}")
    for _, name, (file, key) in sorted(tensors):
        with safe_open(str(file), framework="pt") as f:
            weights = f.get_tensor(key).to(torch.float32).numpy()
        heads = qk_heads(name, hp["n_head"], hp["n_head_kv"])
        if heads is not None:
            weights = permute_qk(weights, heads)
        data, qtype = encode(weights, merged_kind(name, quant), name)
        writer.add_tensor(name, data, raw_dtype=qtype)
    return write_file(writer, out)


def _tensor_order(name: str) -> tuple[int, str]:
    match = re.match(r"blk\.(\d+)\.", name)
    if match:
        return (int(match.group(1)), name)
    return (-1 if name == "token_embd" else 1 << 30, name)


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """Write a GPT-2-style BPE tokenizer as llama.cpp reads it (model ``gpt2``, ``pre``, tokens,
    token types, merges, special ids, add-bos/eos, chat template), like convert_hf_to_gguf.py.

    Raises:
        GraftError: no ``tokenizer.json``, not byte-level BPE, or an unknown pre-tokenizer.
    """
    # transformers (a second to import) only for writing a tokenizer: the name maps and q/k
    # order above load without it
    from transformers import AutoTokenizer

    convert = (
        "convert the base with llama.cpp's convert_hf_to_gguf.py and pass that .gguf as --model"
    )
    path = folder / "tokenizer.json"
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    except (OSError, json.JSONDecodeError):
        raise GraftError(f"{path}: not found or not JSON; {convert}") from None
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GraftError(
            f"{path}: only GPT-2-style byte-level BPE tokenizers are written here "
            f"(this is {model.get('type')!r}{', byte_fallback' if model.get('byte_fallback') else ''}); {convert}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    digest = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise GraftError(
            f"{path}: llama.cpp's pre-tokenizer for this tokenizer is not known to graftlm "
            f"(hash {digest[:16]}...); {convert}"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GraftError(f"{path}: token id {max(vocab.values())} >= vocab_size {vocab_size}")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    # what the tokenizer does, not what its config may claim: llama.cpp adds these itself
    probe = tokenizer("a")["input_ids"]
    special.add_special_token = {
        "bos": tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id,
    }
    special.add_to_gguf(writer, quiet=True)
