"""The one exception type a user sees: the CLI prints its message as one line and exits non-zero."""

from __future__ import annotations

from typing import Any


class GraftError(Exception):
    """A problem the user can act on (bad input, bad config, missing file, mismatched adapter)."""


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Refuse a setting outside its fixed set of values.

    Args:
        name: the setting as the user wrote it (a config field or a JSON key).
        value: what was given.
        choices: the values allowed.

    Raises:
        GraftError: ``"<name> should be one of <choices>, got <value!r>"``.
    """
    if value not in choices:
        raise GraftError(f"{name} should be one of {choices}, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    """Refuse a setting that is not a number in [0, 1) (a dropout, a warm-up share, a decay).

    Raises:
        GraftError: ``"<name> should be in [0, 1), got <value!r>"``.
    """
    if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise GraftError(f"{name} should be in [0, 1), got {value!r}")
