"""Property tests of every reader (tests/fuzz/properties.py says the promise): data files in each
format, adapter folders, GGUF files and checkpoints, fed arbitrary, truncated and mutated bytes.

A fixed seed (derandomize) and small inputs keep the suite's run fast and repeatable; bench/fuzz.py
runs the same properties with many more examples (bench/results/fuzz.txt).
"""

from __future__ import annotations

import json
import os
import time

import helpers
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
import properties as p  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import graftlm  # noqa: E402
from graftlm.train.config import TrainConfig  # noqa: E402

SCALE = float(os.environ.get("GRAFTLM_FUZZ_SCALE", "1"))  # bench/fuzz.py raises it


def fuzz(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        derandomize=SCALE == 1,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# -- data files ---------------------------------------------------------------------------------


@fuzz(400)
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".csv", ".parquet"]))
def test_data_files_of_arbitrary_bytes(raw, suffix):
    p.check_data_file(raw, suffix)


@fuzz(300)
@given(
    values=st.lists(p.rows, min_size=1, max_size=4),
    extra=st.lists(
        st.sampled_from(
            [
                p.deep(100_000).encode(),
                p.deep(5_000, "dict").encode(),
                b'{"text": ' + b"9" * 5000 + b"}",
                b'{"text": "\\ud800"}',
                b'{"text": NaN}',
                b"\xff\xfe\xfa",
                b"\xef\xbb\xbf{}",
                b"\x00",
                b"",
            ]
        ),
        max_size=2,
    ),
)
def test_jsonl_rows_of_any_shape(values, extra, tiny_tok):
    p.check_data_file(p.jsonl_bytes(values, extra), ".jsonl", tiny_tok)


@fuzz(150)
@given(values=st.lists(p.rows, min_size=1, max_size=4), cut=st.integers(0, 4000))
def test_csv_rows_of_any_shape(values, cut, tiny_tok):
    raw = p.csv_bytes(values)
    p.check_data_file(raw, ".csv", tiny_tok)
    p.check_data_file(raw[:cut] + b'"\x00' + raw[cut:], ".csv")


@fuzz(60)
@given(values=st.lists(p.rows, min_size=1, max_size=3), cut=st.integers(0, 3000))
def test_parquet_rows_of_any_shape(values, cut, tiny_tok):
    raw = p.parquet_bytes(values)
    if raw is not None:
        p.check_data_file(raw, ".parquet", tiny_tok)
        p.check_data_file(raw[: cut % max(len(raw), 1)], ".parquet")


# -- adapter folders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tok():
    return helpers.tiny_tokenizer()


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return helpers.tiny_llama()


VALID_WEIGHTS = p.safetensors_bytes(p.lora_tensors())
VALID_CONFIG = json.dumps(p.LORA_CONFIG).encode()


config_values = st.one_of(
    st.just(VALID_CONFIG),
    st.binary(max_size=64),
    p.json_values.map(lambda v: json.dumps(v).encode()),
    st.just(p.deep(100_000).encode()),
    st.just(b'{"r": ' + b"9" * 5000 + b"}"),
    st.dictionaries(
        st.sampled_from(sorted(p.LORA_CONFIG) + ["use_dora", "rank_pattern", "use_rslora"]),
        p.json_values,
        max_size=3,
    ).map(lambda d: json.dumps({**p.LORA_CONFIG, **d}).encode()),
    st.sampled_from(["ADALORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK", 7]).map(
        lambda t: json.dumps({**p.LORA_CONFIG, "peft_type": t}).encode()
    ),
)

weight_values = st.one_of(
    st.just(VALID_WEIGHTS),
    st.binary(max_size=64),
    p.truncations(VALID_WEIGHTS),
    st.sampled_from(
        [
            p.safetensors_bytes({k: v * float("nan") for k, v in p.lora_tensors().items()}),
            p.safetensors_bytes({k: v * float("inf") for k, v in p.lora_tensors().items()}),
            p.safetensors_bytes({k: v.to(torch.int32) for k, v in p.lora_tensors().items()}),
            p.safetensors_bytes({k: v.to(torch.bfloat16) for k, v in p.lora_tensors().items()}),
            p.safetensors_bytes(p.lora_tensors(rank=3)),  # shapes that disagree with r
            p.safetensors_bytes(p.lora_tensors(hidden=32)),  # another base's shapes
            p.safetensors_header(
                b"", {"a": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}
            ),
            p.safetensors_header(
                b"\0" * 8, {"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}
            ),
            b"\xff" * 8 + b"{}",  # a header size of 2**64 - 1
        ]
    ),
    st.dictionaries(st.text(max_size=8), p.json_values, max_size=3).map(
        lambda h: p.safetensors_header(b"\0" * 16, h)
    ),
)

graft_values = st.one_of(
    st.none(),
    st.binary(max_size=32),
    p.json_values.map(lambda v: json.dumps(v).encode()),
    st.just(p.deep(50_000, "dict").encode()),
)


@fuzz(400)
@given(config=config_values, weights=weight_values, graft=graft_values)
def test_adapter_folders_of_any_files(config, weights, graft, base):
    p.check_adapter_folder(config, weights, graft, base)


def test_a_valid_folder_still_loads(base, tmp_path):
    """The property's control: the unmutated files load (so the errors above are the mutations')."""
    from graftlm.adapters.io import load_any
    from graftlm.adapters.switch import delete_adapter

    (tmp_path / "adapter_config.json").write_bytes(VALID_CONFIG)
    (tmp_path / "adapter_model.safetensors").write_bytes(VALID_WEIGHTS)
    assert load_any(base, tmp_path, name="ok") == "lora"
    delete_adapter(base, "ok")


# -- GGUF -----------------------------------------------------------------------------------------


def gguf_file() -> bytes:
    """A small valid GGUF file: llama metadata and two tensors."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.gguf")
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_uint32("llama.attention.head_count", 4)
        writer.add_uint32("llama.attention.head_count_kv", 2)
        writer.add_array("tokenizer.ggml.tokens", ["a", "b", "\u202e"])
        writer.add_tensor("token_embd.weight", np.ones((3, 8), dtype=np.float32))
        writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb") as f:
            return f.read()


GGUF = gguf_file()


@fuzz(500)
@given(
    raw=st.one_of(
        st.binary(max_size=128).map(lambda b: b"GGUF" + b),
        p.truncations(GGUF),
        st.tuples(st.integers(4, 40), st.binary(min_size=8, max_size=8)).map(
            lambda t: GGUF[: t[0]] + t[1] + GGUF[t[0] + 8 :]  # counts and sizes overwritten
        ),
    )
)
def test_gguf_headers_of_any_bytes(raw):
    p.check_gguf(raw)


def test_a_gguf_value_that_is_not_utf8_names_file_and_key():
    """Found by bench/fuzz.py (seed 4087682006): gguf's reader decoded it with a UnicodeDecodeError."""
    from graftlm.errors import GraftError
    from graftlm.export.gguf_base import read_gguf_base

    assert GGUF.count(b"llama") >= 1
    with p.scratch() as folder:
        (folder / "m.gguf").write_bytes(GGUF.replace(b"llama", b"\x80lama", 1))
        with pytest.raises(GraftError, match="'general.architecture' is unreadable") as err:
            read_gguf_base(folder / "m.gguf")
        assert "m.gguf" in str(err.value)


def test_the_valid_gguf_reads():
    from graftlm.export.gguf_base import read_gguf_base

    with p.scratch() as folder:
        (folder / "m.gguf").write_bytes(GGUF)
        base = read_gguf_base(folder / "m.gguf")
    assert base.arch == "llama" and base.n_head == 4 and base.shapes["token_embd.weight"] == (3, 8)


@fuzz(10)
@given(raw=st.one_of(p.truncations(GGUF), st.binary(max_size=64).map(lambda b: b"GGUF" + b)))
def test_loading_a_gguf_model_of_any_bytes(raw):
    p.check_gguf_load(raw)


# -- checkpoints ----------------------------------------------------------------------------------


class Run:
    """A tiny run's model, optimizer and scheduler, as `RunCheckpoint` binds them."""

    def __init__(self) -> None:
        from graftlm.train.checkpoint import RunCheckpoint

        model = helpers.tiny_llama()
        graftlm.inject(model, graftlm.LoraConfig(rank=2, alpha=4, targets=("q_proj",)))
        params = [q for q in model.parameters() if q.requires_grad]
        names = {id(q): n for n, q in model.named_parameters() if q.requires_grad}
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        self.cfg = TrainConfig(data="d.jsonl", out="o")
        self.checkpoint = RunCheckpoint(None, self.cfg, model, optimizer, scheduler, names, {})

    def restore(self, state):
        return self.checkpoint.restore(state)

    def files(self) -> tuple[bytes, bytes]:
        """A valid checkpoint's META and TENSORS bytes."""
        from graftlm.train import checkpoint

        with p.scratch() as out:
            self.checkpoint.out = out
            self.checkpoint.write(3, 1.5)
            folder = out / checkpoint.FOLDER
            return (folder / checkpoint.META).read_bytes(), (
                folder / checkpoint.TENSORS
            ).read_bytes()


RUN = Run()
META, TENSORS = RUN.files()
META_JSON = json.loads(META)


meta_values = st.one_of(
    st.just(META),
    st.binary(max_size=48),
    p.truncations(META),
    p.json_values.map(lambda v: json.dumps(v).encode()),
    st.just(p.deep(100_000).encode()),
    st.dictionaries(st.sampled_from(sorted(META_JSON)), p.json_values, max_size=2).map(
        lambda d: json.dumps({**META_JSON, **d}).encode()
    ),
)
tensor_values = st.one_of(
    st.just(TENSORS),
    st.binary(max_size=48),
    p.truncations(TENSORS),
    st.sampled_from(
        [
            p.safetensors_bytes({"rng/torch": torch.get_rng_state()}),
            p.safetensors_bytes({"rng/torch": torch.zeros(3)}),
        ]
    ),
)


@fuzz(500)
@given(meta=meta_values, tensors=tensor_values)
def test_checkpoints_of_any_files(meta, tensors):
    p.check_checkpoint(meta, tensors, RUN)


def test_a_valid_checkpoint_restores():
    with p.scratch() as out:
        from graftlm.train import checkpoint

        (out / checkpoint.FOLDER).mkdir()
        (out / checkpoint.FOLDER / checkpoint.META).write_bytes(META)
        (out / checkpoint.FOLDER / checkpoint.TENSORS).write_bytes(TENSORS)
        state = checkpoint.read(out)
        checkpoint.check_settings(state, RUN.cfg)
        assert RUN.restore(state) == (3, 1.5)


def test_a_case_that_hangs_fails(monkeypatch):
    """The time bound is real: a reader that does not return within the limit fails its case."""
    monkeypatch.setattr(p, "CASE_SECONDS", 0.2)
    with pytest.raises(p.CaseTooSlow):
        p.expect_rows_or_error(lambda: time.sleep(5), "x")
