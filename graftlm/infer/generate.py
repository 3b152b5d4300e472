"""Batched generation with one adapter per row, and the loader generate/chat/serve share.

Prompts are sorted by length and batched with left padding, so rows in a batch carry little
padding; each row may name its own adapter (or none), of any method, and `row_adapters`
applies each row's adapter inside one forward pass. Greedy unless a temperature is given.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graftlm.adapters.base_model import quantize_base
from graftlm.adapters.folder import atomic_write_bytes, read_config, read_graft
from graftlm.adapters.io import load_any, quantization
from graftlm.adapters.switch import adapter_names, row_adapters, set_adapter
from graftlm.data.dataset import prompt_for_generation, read_rows
from graftlm.errors import GraftError
from graftlm.kernels.small_batch_linear import use_small_batch_kernel
from graftlm.models.load import BUILTIN_NAME, is_local_model, load_model

logger = logging.getLogger("graftlm")


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens: greedy when temperature is 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise GraftError(
                f"max_new_tokens should be a positive integer, got {self.max_new_tokens!r}"
            )
        if self.temperature < 0:
            raise GraftError(f"temperature should be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise GraftError(f"top_p should be in (0, 1], got {self.top_p!r}")


def parse_dtype(name: str) -> torch.dtype:
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise GraftError(f"dtype should be float32 or bfloat16, got {name!r}")
    return table[name]


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`), if it names one."""
    try:
        return read_config(adapter_dir).get("base_model_name_or_path") or None
    except GraftError:
        pass
    try:  # a model folder (full fine-tuning) has no adapter_config.json: graftlm.json names it
        return read_graft(adapter_dir).get("base_model") or None
    except GraftError:
        return None


def base_for_adapters(adapter_dirs: Iterable[str | os.PathLike]) -> str:
    """The base model to load when no ``--model`` is given: the first base an adapter names that
    this machine holds (see `is_loadable`), else the built-in model where none names a base.

    Raises:
        GraftError: adapters name bases, and none of them is here (a hub id other than the
            built-in model's, or a path missing on this machine): graftlm never downloads, so
            the user must pass ``--model``.
    """
    missing = []
    for folder in adapter_dirs:
        name = adapter_base_model(folder)
        if not name:
            continue
        if is_loadable(name):
            return name
        missing.append((folder, name))
    if missing:
        folder, name = missing[0]
        raise GraftError(
            f"adapter {os.fspath(folder)!r} was trained on base model {name!r} "
            "(base_model_name_or_path), which is not on this machine and cannot be downloaded "
            f"(graftlm works offline): pass --model with that model's folder or .gguf file (or "
            f"{BUILTIN_NAME!r})"
        )
    return BUILTIN_NAME


def load_for_inference(
    model: str | None,
    adapters: dict[str, str] | None = None,
    *,
    dtype: str = "float32",
    force: bool = False,
    nf4: bool = False,
):
    """Load a base model and any number of named adapters (of any methods) onto it.

    Args:
        model: base model name/path; None = the base the adapters name (`base_for_adapters`).
        adapters: `{name: folder}`; each is loaded under its name.
        dtype: "float32" or "bfloat16".
        force: load adapters despite a base fingerprint mismatch.
        nf4: load the base 4-bit (quantized as it is read) even without a QLoRA adapter among
            `adapters`: a caller that loads QLoRA adapters later (the server's registry).

    Returns:
        (model, tokenizer) with the first adapter active.

    Raises:
        GraftError: an unreadable adapter folder (before the base is loaded), or one that does
            not fit the base.
    """
    adapters = adapters or {}
    quantized = [quantization(path) == "nf4" for path in adapters.values()]
    if model is None:
        model = base_for_adapters(adapters.values())
    nf4 = nf4 or any(quantized)  # QLoRA: every adapter runs on the 4-bit base it was trained on
    base, tokenizer = load_model(model, dtype=parse_dtype(dtype), quantize="nf4" if nf4 else None)
    if nf4:
        quantize_base(base)  # the fingerprint (the base came back 4-bit)
    for name, path in adapters.items():
        load_any(base, path, name=name, force=force)
    if adapters:
        set_adapter(base, next(iter(adapters)))
    base.eval()
    use_small_batch_kernel(base)  # decode steps: a few rows per product, see the module
    return base, tokenizer


def is_loadable(name: str) -> bool:
    """Whether `name` is the built-in model (or its hub id) or a path on this machine."""
    return is_local_model(name)


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(tid, int):
            ids.add(tid)
    return sorted(ids)


def _decoding(sampling: SamplingConfig) -> dict:
    """`generate` kwargs for greedy (temperature 0) or nucleus sampling."""
    if sampling.temperature > 0:
        return {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,
        }
    # None, not the model's generation_config values: greedy must not inherit a sampling setup
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    adapters: Sequence[str | None] | None = None,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
) -> list[str]:
    """Complete each prompt text (already chat-templated); rows may use different adapters.

    Args:
        model: base model with adapters loaded (or none).
        tokenizer: its tokenizer.
        prompts: prompt strings, e.g. from `data.prompt_for_generation`.
        adapters: per-row adapter name (None = base model); None = the active adapter(s).
        sampling: decoding settings (greedy by default).
        batch_size: rows per forward pass.

    Returns:
        The generated continuations, in the order of `prompts`, without special tokens.
    """
    sampling = sampling or SamplingConfig()
    if adapters is not None and len(adapters) != len(prompts):
        raise GraftError(f"{len(adapters)} adapter names for {len(prompts)} prompts")
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[str] = [""] * len(prompts)
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else eos_ids(model, tokenizer)[0]
    )
    eos = eos_ids(model, tokenizer)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = encoded[i]
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos,
        )
        kwargs.update(_decoding(sampling))
        if adapters is not None:
            with row_adapters(model, [adapters[i] for i in rows]):
                output = model.generate(**kwargs)
        else:
            output = model.generate(**kwargs)
        for r, i in enumerate(rows):
            text = tokenizer.decode(output[r, width:], skip_special_tokens=True)
            results[i] = _cut_at_stop(text, sampling.stop)
    return results


def stream(
    model: nn.Module, tokenizer, prompt: str, sampling: SamplingConfig | None = None
) -> Iterator[str]:
    """Yield pieces of text as they are generated for one prompt (the active adapter)."""
    from transformers import TextIteratorStreamer  # heavy: only `graftlm chat` streams

    sampling = sampling or SamplingConfig()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    eos = eos_ids(model, tokenizer)
    kwargs = dict(
        **ids,
        max_new_tokens=sampling.max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
        eos_token_id=eos,
    )
    kwargs.update(_decoding(sampling))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as exc:  # surface the worker's error in the caller's thread
            errors.append(exc)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    yield from streamer
    worker.join()
    if errors:
        raise errors[0]


def generate_file(
    model: nn.Module,
    tokenizer,
    input_path: str,
    output_path: str,
    *,
    sampling: SamplingConfig,
    batch_size: int,
    default_adapter: str | None,
) -> int:
    """Generate for every row of a JSONL/CSV/Parquet file; write each row plus `"output"`.

    A row's own `"adapter"` field picks its adapter (served in the same batches).

    Returns:
        The number of rows written.
    """
    rows, _ = read_rows(input_path, require_answer=False)
    prompts = [prompt_for_generation(row, tokenizer) for row in rows]
    known = adapter_names(model)
    per_row = []
    for row in rows:
        name = row.get("adapter", default_adapter)
        if name not in (None, "base") and name not in known:
            raise GraftError(
                f"{row.get('_where', input_path)}: adapter {name!r} is not loaded (loaded: {known})"
            )
        per_row.append(name)
    outputs = generate(
        model, tokenizer, prompts, adapters=per_row, sampling=sampling, batch_size=batch_size
    )
    lines = []
    for row, text in zip(rows, outputs):
        clean = {k: v for k, v in row.items() if not k.startswith("_")}
        clean["output"] = text
        lines.append(json.dumps(clean, ensure_ascii=False))
    atomic_write_bytes(Path(output_path), ("\n".join(lines) + "\n").encode("utf-8"))
    return len(rows)
