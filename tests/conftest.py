"""Fixtures shared by the whole suite.

Tiny random models (fast, function scope, a fresh model per test)::

    tiny_llama, tiny_qwen2, tiny_gpt2   # one model each; see helpers.py for their shapes
    tiny_model_factory                  # the callable: tiny_model_factory("qwen2", seed=1)
    tiny_tokenizer                      # byte-level, ChatML template, pad = eos = <|im_end|>
    tiny_model_dir                      # a saved tiny llama + tokenizer folder (for load_model/CLI)

The built-in model (session scope; loaded once from the user's cache, so only the very first run on
a machine pays the ~1 min GGUF conversion)::

    smollm2             # (model, tokenizer), fp32. SHARED: never inject, train or merge into it
    smollm2_copy        # deep copies of (model, tokenizer): yours to modify, ~0.3 s
    smollm2_tokenizer   # the tokenizer alone

Tests that use ``smollm2`` or ``smollm2_copy`` are marked ``slow`` automatically, so
``pytest -m "not slow"`` runs the fast suite.
"""

from __future__ import annotations

import copy
import os

# MKL's matrix products can round the same values differently at another memory alignment
# (measured here: 12 of 15 offsets of a 3 x 64 input gave other bits). The tiny random models'
# greedy text flips on such differences, so a test comparing two loads of one model (the server
# and `graftlm generate`) would depend on where the allocator put a tensor. MKL's strict
# conditional numerical reproducibility removes that, at no measured cost. MKL reads it at its
# first call, after this; the CLI subprocesses of the tests inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import helpers  # noqa: E402
import pytest  # noqa: E402

_SLOW_FIXTURES = {"smollm2", "smollm2_copy"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def tiny_llama():
    return helpers.tiny_llama()


@pytest.fixture
def tiny_qwen2():
    return helpers.tiny_qwen2()


@pytest.fixture
def tiny_gpt2():
    return helpers.tiny_gpt2()


@pytest.fixture
def tiny_model_factory():
    return helpers.tiny_model_factory


@pytest.fixture
def tiny_tokenizer():
    return helpers.tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path):
    return helpers.save_tiny_model_dir(tmp_path / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def smollm2():
    from graftlm.models.load import load_model

    model, tokenizer = load_model("smollm2-135m-instruct")
    return model, tokenizer


@pytest.fixture
def smollm2_copy(smollm2):
    # deepcopy keeps lm_head tied to embed_tokens (one tensor, copied once); the tokenizer is
    # copied too, since callers set padding_side on it
    model, tokenizer = smollm2
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from graftlm.models.load import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
