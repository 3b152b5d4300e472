"""Row formats and data-file readers, shared by training and generation.

A data file holds one row format, detected from its first valid row::

    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    prompt_completion  {"prompt": str, "completion": str}
    alpaca             {"instruction": str, "input": str (optional), "output": str}
    text               {"text": str}

Extra keys in a row are ignored. Files are JSONL (one object a line), CSV (header row; a chat
``messages`` cell holds JSON) or Parquet. Every problem names the file and line (CSV: the row's
first line, the header being line 1; Parquet: ``row N``), so a user can fix a file in one pass.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graftlm.errors import GraftError

logger = logging.getLogger("graftlm")

FORMATS = ("chat", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant")
WHERE = "_where"  # key read_rows adds to each row: "file:line", for later error messages
MAX_LISTED = 10  # problems spelled out in one error; the rest are counted

# The key that identifies each format, in order of precedence when a row has several.
_FORMAT_KEYS = (
    ("messages", "chat"),
    ("prompt", "prompt_completion"),
    ("instruction", "alpaca"),
    ("text", "text"),
)
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}


# ---------------------------------------------------------------------------------------------
# Row formats


def _detect(row: dict) -> str | None:
    for key, fmt in _FORMAT_KEYS:
        if key in row:
            return fmt
    return None


def detect_format(row: Any) -> str:
    """Name the format of one row, from its keys.

    Args:
        row: one decoded data row.

    Returns:
        ``"chat"``, ``"prompt_completion"``, ``"alpaca"`` or ``"text"``.

    Raises:
        GraftError: the row is not an object, or has none of the identifying keys.
    """
    if not isinstance(row, dict):
        raise GraftError(f"a data row must be a JSON object, got {type(row).__name__}")
    fmt = _detect(row)
    if fmt is None:
        raise GraftError(_unknown_format(row))
    return fmt


def _unknown_format(row: dict) -> str:
    return (
        f"no known row format in keys {sorted(map(str, row))}; expected 'messages', "
        "'prompt' + 'completion', 'instruction' + 'output', or 'text'"
    )


def _string_problem(row: dict, key: str, *, required: bool, allow_empty: bool) -> str | None:
    value = row.get(key)
    if value is None:
        return f"missing field {key!r}" if required else None
    if not isinstance(value, str):
        return f"field {key!r} must be a string, got {type(value).__name__}"
    if not allow_empty and not value.strip():
        return f"empty {key!r}"
    return None


def _chat_problem(messages: Any, require_answer: bool) -> str | None:
    if messages is None:
        return "missing field 'messages'"
    if not isinstance(messages, list):
        return (
            f"'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}"
        )
    if not messages:
        return "'messages' is empty"
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return f"message {i} must be an object with 'role' and 'content', got {type(message).__name__}"
        for key in ("role", "content"):
            if message.get(key) is None:
                return f"message {i} is missing field {key!r}"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {i} content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"message {i} ({role}) has empty content"
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        return (
            "no assistant turn: a training chat needs at least one assistant message to learn from"
        )
    return None


def row_problem(row: Any, fmt: str, *, require_answer: bool = True) -> str | None:
    """Check one row against a format.

    Args:
        row: the decoded row.
        fmt: one of `FORMATS`.
        require_answer: training rows need something to learn (an assistant turn, a completion, an
            output); generation inputs may end with the question.

    Returns:
        A short description of the first problem, or None when the row is valid.
    """
    if not isinstance(row, dict):
        return f"not a JSON object (got {type(row).__name__})"
    if fmt == "chat":
        return _chat_problem(row.get("messages"), require_answer)
    if fmt == "prompt_completion":
        fields = [("prompt", True, False), ("completion", require_answer, not require_answer)]
    elif fmt == "alpaca":
        fields = [("instruction", True, False), ("input", False, True)]
        fields.append(("output", require_answer, not require_answer))
    elif fmt == "text":
        fields = [("text", True, False)]
    else:
        raise ValueError(f"unknown row format {fmt!r}; expected one of {FORMATS}")
    for key, required, allow_empty in fields:
        problem = _string_problem(row, key, required=required, allow_empty=allow_empty)
        if problem:
            return problem
    return None


def to_messages(row: dict, fmt: str) -> list[dict[str, str]]:
    """Turn a valid chat, prompt/completion or Alpaca row into chat messages.

    The prompt (or instruction, plus ``"\\n\\n"`` and the input when there is one) becomes the user
    turn; the completion or output, when present, the assistant turn.

    Raises:
        ValueError: for text rows, which are not conversations.
    """
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if fmt == "text":
        raise ValueError("text rows are not conversations")
    messages = [{"role": "user", "content": user_text(row, fmt)}]
    answer = row.get("completion" if fmt == "prompt_completion" else "output")
    if answer:
        messages.append({"role": "assistant", "content": answer})
    return messages


def user_text(row: dict, fmt: str) -> str:
    """The prompt of a prompt/completion row, or an Alpaca row's instruction and input."""
    if fmt == "prompt_completion":
        return row["prompt"]
    extra = row.get("input")
    return row["instruction"] + (f"\n\n{extra}" if extra and extra.strip() else "")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_for_generation(row: dict, tokenizer: Any) -> str:
    """The text a model continues for one generation input row.

    Chat rows lose a trailing assistant turn and go through the chat template with the generation
    prompt. ``{"prompt": ...}`` and Alpaca rows become one user turn the same way when the tokenizer
    has a chat template, and stay plain text otherwise (as in training). Text rows are returned as is.
    The result already holds the template's special tokens: tokenize it with
    ``add_special_tokens=False``.

    Args:
        row: a generation input row (any of the four formats; no answer needed).
        tokenizer: a Hugging Face tokenizer.

    Returns:
        The prompt text.

    Raises:
        GraftError: the row is invalid, or is a chat row and the tokenizer has no chat template.
    """
    where = row.get(WHERE, "input row") if isinstance(row, dict) else "input row"
    try:
        fmt = detect_format(row)
    except GraftError as err:
        raise GraftError(f"{where}: {err}") from None
    problem = row_problem(row, fmt, require_answer=False)
    if problem:
        raise GraftError(f"{where}: {problem}")
    if fmt == "text":
        return row["text"]
    if not has_chat_template(tokenizer):
        if fmt == "chat":
            raise GraftError(
                f"{where}: chat rows need a tokenizer with a chat template; this one has none"
            )
        return user_text(row, fmt)
    messages = to_messages(row, fmt)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise GraftError(f"{where}: nothing to prompt with once the trailing answer is dropped")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def reference_answer(row: dict) -> str | None:
    """The expected answer in a row: the trailing assistant turn, the completion or the output.

    Returns:
        The answer text, or None when the row carries none (or is a text row).
    """
    fmt = _detect(row) if isinstance(row, dict) else None
    answer = None
    if fmt == "chat" and isinstance(row["messages"], list) and row["messages"]:
        last = row["messages"][-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            answer = last.get("content")
    elif fmt in ("prompt_completion", "alpaca"):
        answer = row.get("completion" if fmt == "prompt_completion" else "output")
    return answer if isinstance(answer, str) else None


# ---------------------------------------------------------------------------------------------
# Rendering through a chat template


class TemplateProblem(Exception):
    """A row the chat template cannot render or label; reported with its file:line."""


def end_tokens(tokenizer: Any) -> list[str]:
    """The special tokens that may close a turn: eos, and whatever the template puts after a
    user message (found by rendering a probe), unless it opens the assistant header instead."""
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(added, "special", False):
            specials.add(str(added))
    # Longest first, so "<|im_end|>" wins over a hypothetical "<|im" at the same position.
    specials = sorted((t for t in specials if t), key=len, reverse=True)
    enders = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    probe = [{"role": "user", "content": "graftlm probe"}]
    try:
        before = tokenizer.apply_chat_template(probe, tokenize=False)
        prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may refuse a lone user turn; eos alone then
        return enders
    header = prompt[len(before) :].lstrip() if prompt.startswith(before) else ""
    opener = next((t for t in specials if header.startswith(t)), None)
    after = before.find("graftlm probe") + len("graftlm probe")
    while after < len(before) and before[after].isspace():
        after += 1
    token = next((t for t in specials if before.startswith(t, after)), None)
    if token and token != opener and token not in enders:
        enders.append(token)
    return enders


def render_chat(
    messages: list[dict], tokenizer: Any, enders: list[str]
) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation once and find the character span of each assistant turn to learn.

    A span is the turn's content plus the end-of-turn token right after it (past whitespace only),
    if any. Each turn's start comes from rendering the conversation before it with the generation
    prompt, so content that also appears in a header or an earlier turn is not mistaken for it; if
    a template rewrites history (the prefix differs), the search scans forward from the previous
    turn instead.
    """
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # jinja raises its own errors for conversations a template refuses
        raise TemplateProblem(f"the chat template refused the conversation: {err}") from None
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = cursor
        if i > 0:
            try:
                prompt = tokenizer.apply_chat_template(
                    messages[:i], tokenize=False, add_generation_prompt=True
                )
            except Exception:
                prompt = None
            if prompt and text.startswith(prompt) and len(prompt) >= cursor:
                start = len(prompt)
        content = message["content"]
        pos = text.find(content, start)
        if pos < 0:  # some templates trim the content
            content = content.strip()
            pos = text.find(content, start)
        if pos < 0:
            raise TemplateProblem(
                f"the chat template does not reproduce message {i + 1} (assistant) verbatim, "
                "so its tokens cannot be labelled"
            )
        end = after = pos + len(content)
        while after < len(text) and text[after].isspace():
            after += 1
        token = next((t for t in enders if text.startswith(t, after)), None)
        if token:
            end = after + len(token)
        spans.append((pos, end))
        cursor = end
    return text, spans


# ---------------------------------------------------------------------------------------------
# Collecting problems


class RowErrors:
    """Collects bad rows so a user sees many problems in one run instead of one per run."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[tuple[int, str, str]] = []  # (order, where, problem)

    def add(self, order: int, where: str, problem: str) -> None:
        self.items.append((order, where, problem))

    def __len__(self) -> int:
        return len(self.items)

    def finish(self, *, skip: bool, total: int) -> None:
        """Raise one error listing the problems, or log them as warnings when skipping."""
        if not self.items:
            return
        self.items.sort()
        count = len(self.items)
        shown = self.items[:MAX_LISTED]
        if skip:
            for _, where, problem in shown:
                logger.warning("skipping bad row %s: %s", where, problem)
            logger.warning("skipped %d bad rows of %d in %s", count, total, self.source)
            return
        listed = "".join(f"\n  {where}: {problem}" for _, where, problem in shown)
        more = f"\n  ... and {count - MAX_LISTED} more" if count > MAX_LISTED else ""
        raise GraftError(
            f"{self.source}: {count} bad rows of {total} (fix them, or skip them with "
            f"skip_bad_rows=True / --skip-bad-rows):{listed}{more}"
        )


# ---------------------------------------------------------------------------------------------
# File readers: each yields (where, row, problem) with exactly one of row / problem set.

Read = Iterator[tuple[str, Any, "str | None"]]


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"


def _jsonl_rows(path: Path) -> Read:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, _not_utf8(raw, err)
                continue
            if not line.strip():
                continue  # a blank line holds no row
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as err:
                yield where, None, f"not valid JSON: {err.msg} at column {err.colno}"


def _csv_rows(path: Path) -> Read:
    # Decode line by line (a UTF-8 sequence never contains b"\n") so a bad byte names its line;
    # the csv module then sees text and handles quoted fields that span lines.
    lines, bad = [], {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                bad[number] = _not_utf8(raw, err)
                lines.append(raw.decode("utf-8", errors="replace"))
    # Long texts exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    if 1 in bad:
        raise GraftError(f"{path}:1: header is {bad[1]}")
    header = [name.strip() for name in header]
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield f"{path}:{start}", None, f"not valid CSV: {err}"
            start = reader.line_num + 1
            continue
        where, first, start = f"{path}:{start}", start, reader.line_num + 1
        problems = [bad[n] for n in range(first, start) if n in bad]
        if problems:
            yield where, None, problems[0]
        elif not record:
            continue  # blank line
        elif len(record) != len(header):
            yield where, None, f"{len(record)} fields but the header has {len(header)}"
        else:
            row = dict(zip(header, record))
            messages = row.get("messages")
            if isinstance(messages, str):
                try:
                    row["messages"] = json.loads(messages)
                except json.JSONDecodeError as err:
                    yield where, None, f"column 'messages' is not valid JSON: {err.msg}"
                    continue
            yield where, row, None


def _parquet_rows(path: Path) -> Read:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GraftError("reading Parquet files needs pyarrow: pip install pyarrow") from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row, None
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise GraftError(f"{path}: not a readable Parquet file: {err}") from None


def read_rows_counted(
    path: str | Path, *, skip_bad_rows: bool = False, require_answer: bool = True
) -> tuple[list[dict], str, int]:
    """`read_rows`, also returning the number of bad rows skipped."""
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if not path.exists():
        raise GraftError(f"data file not found: {path}")
    if path.is_dir():
        raise GraftError(f"{path} is a directory; expected a .jsonl, .csv or .parquet file")
    if kind is None:
        raise GraftError(
            f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .csv or .parquet"
        )
    reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind]

    errors = RowErrors(str(path))
    valid: list[tuple[int, str, dict, str]] = []
    total = 0
    for order, (where, row, problem) in enumerate(reader(path)):
        total += 1
        fmt = None
        if problem is None and isinstance(row, dict):
            fmt = _detect(row)
            problem = _unknown_format(row) if fmt is None else None
        if problem is None:
            problem = row_problem(row, fmt or "text", require_answer=require_answer)
        if problem:
            errors.add(order, where, problem)
        else:
            valid.append((order, where, row, fmt))
    if total == 0:
        raise GraftError(f"{path} is empty: no rows")

    # The first valid row fixes the format: one bad first row should not hide the file's format.
    file_fmt = valid[0][3] if valid else None
    rows = []
    for order, where, row, fmt in valid:
        if fmt != file_fmt:
            errors.add(
                order,
                where,
                f"row is in {fmt} format but the file's first valid row ({valid[0][1]}) is in "
                f"{file_fmt} format; use one format per file",
            )
        else:
            rows.append({**row, WHERE: where})
    errors.finish(skip=skip_bad_rows, total=total)
    if not rows:
        raise GraftError(f"{path}: no valid rows ({len(errors)} bad rows skipped)")
    return rows, file_fmt, len(errors)


def read_rows(
    path: str | Path, *, skip_bad_rows: bool = False, require_answer: bool = True
) -> tuple[list[dict], str]:
    """Read and validate every row of a data file.

    Args:
        path: a ``.jsonl`` (or ``.json``/``.ndjson`` holding JSON Lines), ``.csv`` or ``.parquet`` file.
        skip_bad_rows: log bad rows as warnings and skip them instead of raising.
        require_answer: rows must carry an answer (assistant turn, completion, output), as training
            needs; pass False for generation inputs.

    Returns:
        ``(rows, format)``: each row is the file's row plus a ``"_where"`` key (``"file:line"``, or
        ``"file:row N"`` for Parquet); drop it before writing rows back out. ``format`` is one of
        `FORMATS`.

    Raises:
        GraftError: the file is missing, empty or of an unknown type; or it has bad rows (the first
            ten listed with file:line and problem, plus the total) and ``skip_bad_rows`` is False; or
            no valid row is left.
    """
    rows, fmt, _ = read_rows_counted(
        path, skip_bad_rows=skip_bad_rows, require_answer=require_answer
    )
    return rows, fmt
