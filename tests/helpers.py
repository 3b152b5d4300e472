"""Tiny models and a tiny tokenizer for fast tests; import them as ``from helpers import ...``.

(pytest puts ``tests/`` on ``sys.path`` because ``tests/conftest.py`` lives there and ``tests/`` has
no ``__init__.py``.) Fixtures wrapping these live in ``conftest.py``.

Each model is a randomly initialised causal LM built from a transformers config, seeded, float32, in
eval mode, a few hundred thousand parameters, and covers one family of layer shapes:

- ``llama``: like SmolLM2 (GQA with 4 query / 2 key-value heads, no biases, tied embeddings);
- ``qwen2``: bias on q/k/v projections, untied lm_head;
- ``gpt2``: ``Conv1D`` layers (weight stored ``[in, out]``) with a fused ``c_attn``, tied embeddings.

Their vocabulary (:data:`TINY_VOCAB`) covers :func:`tiny_tokenizer`, so model and tokenizer can be
used together, e.g. for training-loop tests without the real model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TINY_KINDS = ("llama", "qwen2", "gpt2")
TINY_VOCAB = 288  # >= the tiny tokenizer's 260 tokens, rounded up like real vocabularies

# ids shared by the tiny tokenizer and the tiny model configs; as in SmolLM2, bos is <|im_start|>
# and eos is <|im_end|> (which is also the pad token unless asked otherwise)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")
BOS_ID, EOS_ID, SEPARATE_PAD_ID = 1, 2, 3

# SmolLM2's ChatML template without its default system prompt (which would cost ~80 tokens at one
# token per byte).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _common(**overrides):
    base = dict(
        vocab_size=TINY_VOCAB, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID
    )
    base.update(overrides)
    return base


def _build(config, model_cls, seed: int):
    # fork_rng: building a model must not reset the random stream of the test calling it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float().eval()


def tiny_llama(seed: int = 0, **config_overrides):
    """A 2-layer Llama (hidden 64, 4 heads / 2 kv heads, tied embeddings), like a small SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **_common(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            **config_overrides,
        )
    )
    return _build(config, LlamaForCausalLM, seed)


def tiny_qwen2(seed: int = 0, **config_overrides):
    """A 2-layer Qwen2 (hidden 64, 4 heads / 2 kv heads, q/k/v bias, untied lm_head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **_common(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            use_sliding_window=False,
            **config_overrides,
        )
    )
    return _build(config, Qwen2ForCausalLM, seed)


def tiny_gpt2(seed: int = 0, **config_overrides):
    """A 2-layer GPT-2 (hidden 64, 4 heads, Conv1D layers, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        **_common(n_embd=64, n_layer=2, n_head=4, n_positions=512, **config_overrides)
    )
    return _build(config, GPT2LMHeadModel, seed)


_BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def tiny_model_factory(kind: str = "llama", seed: int = 0, **config_overrides):
    """A fresh tiny model of `kind` (one of :data:`TINY_KINDS`); same seed, same weights."""
    if kind not in _BUILDERS:
        raise ValueError(f"tiny model kind must be one of {TINY_KINDS}, got {kind!r}")
    return _BUILDERS[kind](seed=seed, **config_overrides)


def tiny_tokenizer(*, separate_pad: bool = False, pad: bool = True):
    """A byte-level tokenizer: one token per UTF-8 byte (ids 4..259) plus the special tokens
    ``<|endoftext|>`` (0, unk), ``<|im_start|>`` (1, bos), ``<|im_end|>`` (2, eos) and ``<pad>`` (3),
    with a ChatML chat template. Lossless on any text, no bos added when encoding.

    Args:
        separate_pad: pad with ``<pad>`` (id 3) instead of eos ``<|im_end|>`` (id 2, as SmolLM2).
        pad: ``False`` leaves the pad token unset (to test code that must set one).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *byte_chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, so a string becomes exactly its bytes
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    # registered as special in the backend: never split, dropped by decode(skip_special_tokens=True)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    kwargs = {}
    if pad:
        kwargs["pad_token"] = "<pad>" if separate_pad else "<|im_end|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        **kwargs,
    )
    return tokenizer


def save_tiny_model_dir(path: str | Path, kind: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model and the tiny tokenizer as a Hugging Face folder (what ``load_model`` and
    the CLI accept as ``--model``); returns the folder."""
    path = Path(path)
    tiny_model_factory(kind, seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


LABELS = ["red", "green", "blue"]


def write_chat(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` chat rows whose answer is one of LABELS, named in the question."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            label = rng.choice(LABELS)
            user = f"item {i} is {label}" + " !" * rng.randint(0, 6)
            handle.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": user},
                            {"role": "assistant", "content": label},
                        ]
                    }
                )
                + "\n"
            )
    return path


def base_cfg(tmp_path: Path, model_dir: Path, **overrides):
    """A short LoRA TrainConfig on `write_chat` rows: rank 4, 6 steps of 8, checkpoints every 2."""
    from graftlm.train.config import TrainConfig

    values = dict(
        data=str(write_chat(tmp_path / "train.jsonl", 40)),
        out=str(tmp_path / "out"),
        model=str(model_dir),
        rank=4,
        batch_size=8,
        steps=6,
        save_every=2,
        dtype="float32",
        lr=1e-2,
        forgetting=False,  # the meter has its own tests (tests/infer/test_forgetting.py)
    )
    values.update(overrides)
    return TrainConfig(**values)
