"""What every endpoint of `graftlm serve` shares: the engine, the base's name, the limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ServerState:
    """Everything the endpoints share.

    Attributes:
        engine: the batching engine (owns the model).
        base_name: the base model's name in `model` fields.
        api_key: the Bearer key clients must send (None: loopback clients only).
        max_prompt_tokens: the longest prompt accepted, in tokens.
        max_tokens_limit: the most tokens a request may generate.
        max_body_bytes: the largest request body accepted.
        context: the model's context length (prompt + generated tokens).
        created: when the server started (Unix time), the `created` of its model cards.
        adapter_root: the real path of the one folder `/v1/load_lora_adapter` may load from;
            None: runtime loading is off (`graftlm.serve.limits`).
        max_queue: the most prompts waiting for a batch row; past it requests get 429.
        request_timeout: seconds a request may take, from its first byte to its last token.
    """

    engine: Any
    base_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1 << 20
    context: int = 2048
    created: int = 0
    adapter_root: Path | None = None
    max_queue: int = 256
    request_timeout: float = 600.0

    @property
    def registry(self):
        return self.engine.registry
