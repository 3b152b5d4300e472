"""Field accuracy: partial credit for structured answers (JSON, `key=value; ...`, `a, b`).

Exact match gives nothing for an answer with one field of four wrong; field accuracy gives 3/4.
The reference answer decides the structure:

- a JSON object: its top-level keys; a field is right when the prediction (parsed as JSON) has
  the same value under that key;
- `key=value` pairs separated by `;` (or `,`): a field is right when the prediction has the pair;
- otherwise a list split on `,` or `;`: a field is right when the prediction has the same item at
  the same position (a single label is one field, so this equals exact match there).

Whitespace around fields and keys is ignored; extra fields in a prediction do not earn credit but
cost nothing either, and an unparsable prediction scores 0.
"""

from __future__ import annotations

import json
import re

_SEPARATOR = re.compile(r"\s*[;,]\s*")


def answer_fields(text: str) -> dict[str, str] | None:
    """The fields of an answer, keyed by name (or by position); None if it has no structure."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(data, dict):
            return {str(k): json.dumps(v, sort_keys=True) for k, v in data.items()}
        return None
    separator = ";" if ";" in text else ","
    parts = [p.strip() for p in text.split(separator) if p.strip()]
    if parts and all("=" in p for p in parts):
        return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in parts)}
    return {str(i): p for i, p in enumerate(_SEPARATOR.split(text)) if p}


def field_accuracy(prediction: str, reference: str) -> float:
    """Fraction of the reference's fields that the prediction gets right (0..1)."""
    expected = answer_fields(reference)
    if not expected:
        return float(prediction.strip() == reference.strip())
    found = answer_fields(prediction) or {}
    return sum(found.get(k) == v for k, v in expected.items()) / len(expected)
