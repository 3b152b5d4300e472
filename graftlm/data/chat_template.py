"""Rows through a tokenizer's chat template: the prompt of a generation input, the tokens that
close a turn, and the character spans of the assistant turns a training row learns.
"""

from __future__ import annotations

from typing import Any

from graftlm.data.formats import WHERE, detect_format, row_problem, to_messages, user_text
from graftlm.errors import GraftError


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
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
