"""What every graftlm reader promises whatever its input: rows (or a result), or a `GraftError`
that names the file; never another exception, never a hang, never memory beyond a bound (each
case gets `CASE_SECONDS` and may raise the process's peak RSS by at most `CASE_MEMORY_BYTES`).

Each `check_*` function takes the bytes (or the pieces) a hypothesis strategy drew, writes them
where the reader expects a file, runs the reader and checks that promise. The suite runs them
with a fixed seed and few examples (tests/fuzz/test_fuzz.py); bench/fuzz.py runs them longer
and records what it tried in bench/results/fuzz.txt.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import signal
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from graftlm.errors import GraftError

# -- strategies -------------------------------------------------------------------------------

# odd Unicode: BOM, NUL, lone surrogates, right-to-left marks, combining marks, emoji, controls
ODD_CHARS = "\ufeff\x00\ud800\udfff\u202e\u200f\u0301\U0001f600\x1b\r\u2028\uffff"
odd_text = st.text(
    alphabet=st.one_of(st.characters(codec=None), st.sampled_from(ODD_CHARS)), max_size=24
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    odd_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)
    ),
    max_leaves=12,
)


def deep(depth: int, kind: str = "list") -> str:
    """JSON nested `depth` deep, past Python's recursion limit for large depths."""
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


# rows that look like each format, with any value in any field
def _row(keys: tuple[str, ...]):
    return st.fixed_dictionaries({k: st.one_of(odd_text, json_values) for k in keys})


message = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), json_values),
        "content": st.one_of(odd_text, json_values),
    }
)
rows = st.one_of(
    st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), json_values)}),
    _row(("prompt", "completion")),
    _row(("instruction", "input", "output")),
    _row(("text",)),
    json_values,
)

# -- files ------------------------------------------------------------------------------------


@contextmanager
def scratch():
    """A fresh temp folder for one example (hypothesis runs many examples in one test)."""
    folder = Path(tempfile.mkdtemp(prefix="graftlm-fuzz-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# the bounds on one case: generous for a loaded 2-core machine, far below what a reader that
# loops or trusts a declared size (a header saying 2**60 bytes) would take
CASE_SECONDS = 60
CASE_MEMORY_BYTES = 512 << 20


class CaseTooSlow(AssertionError):
    """A reader ran past `CASE_SECONDS` on one case: a hang, as far as a user can tell."""


@contextmanager
def time_limit(seconds: float):
    """Raise `CaseTooSlow` in the main thread once `seconds` have passed (SIGALRM)."""

    def expire(signum, frame):
        raise CaseTooSlow(f"a reader ran for more than {seconds} s on one case")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def expect_rows_or_error(call, names: str):
    """Run `call` within the case's bounds; its result, or None after a `GraftError` whose
    message names `names`."""
    peak_before = peak_rss_bytes()
    with time_limit(CASE_SECONDS):
        try:
            result = call()
        except GraftError as exc:
            assert names in str(exc), f"the error does not name {names!r}: {exc}"
            result = None
    grown = peak_rss_bytes() - peak_before
    assert grown <= CASE_MEMORY_BYTES, f"one case raised the peak RSS by {grown >> 20} MiB"
    return result


# -- data readers -----------------------------------------------------------------------------


def check_data_file(raw: bytes, suffix: str, tokenizer=None) -> None:
    """A data file of any bytes: rows (tokenized when a tokenizer is given) or a GraftError."""
    from graftlm.data.dataset import load_dataset, read_rows

    with scratch() as folder:
        path = folder / f"data{suffix}"
        path.write_bytes(raw)
        if tokenizer is None:
            expect_rows_or_error(lambda: read_rows(path, require_answer=False), str(path))
        else:
            expect_rows_or_error(lambda: load_dataset(path, tokenizer, 64), str(path))


def jsonl_bytes(values: list, extra: list[bytes]) -> bytes:
    lines = [json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass") for v in values]
    return b"\n".join(lines + extra) + b"\n"


def csv_bytes(values: list) -> bytes:
    import csv

    text = io.StringIO()
    writer = csv.writer(text)
    keys = sorted({k for v in values if isinstance(v, dict) for k in v if isinstance(k, str)})
    writer.writerow(keys or ["text"])
    for v in values:
        cells = v if isinstance(v, dict) else {}
        writer.writerow(
            [
                c if isinstance(c := cells.get(k), str) else json.dumps(c, ensure_ascii=False)
                for k in keys
            ]
        )
    return text.getvalue().encode("utf-8", "surrogatepass")


def parquet_bytes(values: list) -> bytes | None:
    """The values as a Parquet table (None when pyarrow cannot hold them as columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [v for v in values if isinstance(v, dict)] or [{"text": "x"}]
    try:
        table = pa.Table.from_pylist(records)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None
    sink = io.BytesIO()
    try:
        pq.write_table(table, sink)
    except (pa.ArrowException, TypeError, ValueError):  # e.g. a struct column with no field
        return None
    return sink.getvalue()


# -- adapter folders --------------------------------------------------------------------------

LORA_CONFIG = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": None,
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj", "v_proj"],
    "lora_dropout": 0.0,
    "bias": "none",
}


def lora_tensors(hidden: int = 64, layers: int = 2, rank: int = 2) -> dict[str, torch.Tensor]:
    tensors = {}
    for i in range(layers):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            out = hidden if proj == "q_proj" else hidden // 2
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, hidden)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank)
    return tensors


def safetensors_header(raw: bytes, header: dict) -> bytes:
    """A safetensors file of `header` (any JSON) over `raw` data bytes."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + raw


def check_adapter_folder(config: bytes, weights: bytes, graft: bytes | None, model) -> None:
    """An adapter folder of any files: loaded onto `model` (then removed) or a GraftError."""
    from graftlm.adapters.inspect import describe
    from graftlm.adapters.io import load_any
    from graftlm.adapters.switch import delete_adapter

    with scratch() as folder:
        (folder / "adapter_config.json").write_bytes(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        if graft is not None:
            (folder / "graftlm.json").write_bytes(graft)
        expect_rows_or_error(lambda: describe(folder), str(folder))
        loaded = expect_rows_or_error(
            lambda: load_any(model, folder, name="fuzzed", force=True), str(folder)
        )
        if loaded is not None:
            delete_adapter(model, "fuzzed")


# -- GGUF -------------------------------------------------------------------------------------


def check_gguf(raw: bytes) -> None:
    """A GGUF file of any bytes: its header read for export, or a GraftError."""
    from graftlm.export.gguf_base import read_gguf_base

    with scratch() as folder:
        path = folder / "model.gguf"
        path.write_bytes(raw)
        expect_rows_or_error(lambda: read_gguf_base(path), str(path.resolve()))


def check_gguf_load(raw: bytes) -> None:
    """`load_model` of a GGUF file of any bytes: a model, or a GraftError naming the file."""
    from graftlm.models.load import load_model

    with scratch() as folder:
        path = folder / "model.gguf"
        path.write_bytes(raw)
        expect_rows_or_error(
            lambda: load_model(path, cache_dir=folder / "cache"), str(path.resolve())
        )


# -- checkpoints ------------------------------------------------------------------------------


def check_checkpoint(meta: bytes, tensors: bytes, run) -> None:
    """A checkpoint folder of any files: read, checked and restored into `run`, or a GraftError."""
    from graftlm.train import checkpoint

    with scratch() as out:
        folder = out / checkpoint.FOLDER
        folder.mkdir()
        (folder / checkpoint.META).write_bytes(meta)
        (folder / checkpoint.TENSORS).write_bytes(tensors)

        def read_and_restore():
            state = checkpoint.read(out)
            if state is not None:
                checkpoint.check_settings(state, run.cfg)
                run.restore(state)

        expect_rows_or_error(read_and_restore, str(out))


def safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()})


def truncations(raw: bytes) -> st.SearchStrategy[bytes]:
    """`raw` cut at any length, or with a byte changed."""
    cut = st.integers(0, max(len(raw) - 1, 0)).map(lambda n: raw[:n])
    flipped = st.tuples(st.integers(0, max(len(raw) - 1, 0)), st.integers(0, 255)).map(
        lambda t: raw[: t[0]] + bytes([t[1]]) + raw[t[0] + 1 :]
    )
    return st.one_of(cut, flipped)


def environment_note() -> str:
    return f"pid {os.getpid()}"
