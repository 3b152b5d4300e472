"""Run an exported GGUF in llama.cpp (through `llama-cpp-python`) the way `graftlm generate` runs.

Used by the tests and `bench/gguf_accuracy.py` to check that llama.cpp answers like graftlm, and
usable to check an export by hand::

    from graftlm.export.llamacpp_run import LlamaCpp
    with LlamaCpp("base.gguf", lora_path="adapter.gguf") as llm:
        print(llm.generate([prompt_text], max_new_tokens=32))

The prompt text is the chat-templated text of `graftlm.data.dataset.prompt_for_generation`; llama.cpp
tokenizes it with special tokens parsed and no BOS added, as graftlm does
(``add_special_tokens=False``), and decodes greedily until its end-of-generation token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from graftlm.errors import GraftError


class LlamaCpp:
    """A llama.cpp model (optionally with one LoRA adapter file) for greedy generation.

    Args:
        model_path: a GGUF model file.
        lora_path: a GGUF LoRA adapter file, or None.
        lora_scale: the adapter's multiplier (llama-cli's ``--lora-scaled``); 1.0 = as trained.
        n_ctx: context length to allocate.
        n_threads: CPU threads (default: ``$OMP_NUM_THREADS``, else all cores).

    Raises:
        GraftError: llama-cpp-python is not installed, or llama.cpp refused a file.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        lora_path: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
        n_ctx: int = 2048,
        n_threads: int | None = None,
    ) -> None:
        try:  # llama-cpp-python is optional (a C++ build): only the tests and bench run it
            from llama_cpp import Llama
        except ImportError:
            raise GraftError(
                "llama-cpp-python is not installed: CMAKE_ARGS='-DLLAVA_BUILD=OFF' "
                "pip install --no-deps llama-cpp-python numpy typing-extensions diskcache jinja2"
            ) from None
        threads = n_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
        try:
            self.llm: Any = Llama(
                model_path=str(model_path),
                lora_path=str(lora_path) if lora_path else None,
                lora_scale=lora_scale,
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                seed=0,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            what = f"{model_path}" + (f" with adapter {lora_path}" if lora_path else "")
            raise GraftError(f"llama.cpp could not load {what}: {exc}") from None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt text (special tokens parsed, no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 256) -> list[str]:
        """Greedy continuation of each prompt text, without the end-of-generation token."""
        from llama_cpp import llama_cpp as lib  # optional, as in __init__ (loaded by now)

        vocab = lib.llama_model_get_vocab(self.llm._model.model)
        results = []
        for prompt in prompts:
            out: list[int] = []
            for token in self.llm.generate(self.tokenize(prompt), temp=0.0, repeat_penalty=1.0):
                if lib.llama_vocab_is_eog(vocab, token) or len(out) >= max_new_tokens:
                    break
                out.append(token)
            results.append(self.llm.detokenize(out).decode("utf-8", errors="replace"))
        return results

    def close(self) -> None:
        """Free the model (and adapter) now rather than at garbage collection."""
        self.llm.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
