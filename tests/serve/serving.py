"""What the server tests share: a real server on loopback in a thread, adapters with random
weights on the tiny Llama, and the solo answer a served request must equal."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import helpers
import openai
import torch

import graftlm
from graftlm.data.dataset import prompt_for_generation
from graftlm.infer.generate import SamplingConfig, generate
from graftlm.methods.lora.config import LoraConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_adapter(folder: Path, config: LoraConfig, seed: int) -> Path:
    model = helpers.tiny_llama()
    graftlm.inject(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return graftlm.save_adapter(model, folder)


class Server:
    """A server running in a background thread; `stop()` shuts it down as SIGTERM would."""

    def __init__(self, model_dir: Path, adapters: dict[str, str], **kwargs) -> None:
        from graftlm.serve.app import create_server

        self.port = free_port()
        self.server, self.state = create_server(
            str(model_dir), adapters, port=self.port, log_level="error", **kwargs
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def solo(reference, tokenizer, prompt: str, adapter: str | None, max_tokens: int, chat: bool):
    """The text `graftlm generate` gives for this prompt with this adapter alone."""
    if chat:
        prompt = prompt_for_generation(
            {"messages": [{"role": "user", "content": prompt}]}, tokenizer
        )
    sampling = SamplingConfig(max_new_tokens=max_tokens)
    return generate(reference, tokenizer, [prompt], adapters=[adapter], sampling=sampling)[0]
