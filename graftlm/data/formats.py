"""Row formats: which keys make each format, one row's validation, and rows as chat messages.

A data file holds one row format, detected from its first valid row::

    chat               {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    prompt_completion  {"prompt": str, "completion": str}
    alpaca             {"instruction": str, "input": str (optional), "output": str}
    text               {"text": str}

Extra keys in a row are ignored. Reading files is `graftlm.data.readers`; rendering rows through
a chat template is `graftlm.data.chat_template`.
"""

from __future__ import annotations

import re
from typing import Any

from graftlm.errors import GraftError

FORMATS = ("chat", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile("[\ud800-\udfff]")
WHERE = "_where"  # key read_rows adds to each row: "file:line", for later error messages

# The key that identifies each format, in order of precedence when a row has several.
_FORMAT_KEYS = (
    ("messages", "chat"),
    ("prompt", "prompt_completion"),
    ("instruction", "alpaca"),
    ("text", "text"),
)


def format_of(row: dict) -> str | None:
    """The format a row's keys name (see `_FORMAT_KEYS`), or None."""
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
    fmt = format_of(row)
    if fmt is None:
        raise GraftError(unknown_format(row))
    return fmt


def unknown_format(row: dict) -> str:
    """The problem of a row whose keys name no format."""
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
    return _surrogate_problem(value, f"field {key!r}")


def _surrogate_problem(text: str, what: str) -> str | None:
    r"""JSON's "\ud800" escapes decode to half a UTF-16 pair, which no tokenizer can encode."""
    match = _SURROGATE.search(text)
    if match is None:
        return None
    return (
        f"{what} holds a lone UTF-16 surrogate ({match.group()!r}) at character {match.start() + 1}"
    )


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
        problem = _surrogate_problem(content, f"message {i} content")
        if problem:
            return problem
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


def reference_answer(row: dict) -> str | None:
    """The expected answer in a row: the trailing assistant turn, the completion or the output.

    Returns:
        The answer text, or None when the row carries none (or is a text row).
    """
    fmt = format_of(row) if isinstance(row, dict) else None
    answer = None
    if fmt == "chat" and isinstance(row["messages"], list) and row["messages"]:
        last = row["messages"][-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            answer = last.get("content")
    elif fmt in ("prompt_completion", "alpaca"):
        answer = row.get("completion" if fmt == "prompt_completion" else "output")
    return answer if isinstance(answer, str) else None
