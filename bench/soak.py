"""Soak `graftlm serve`: a real server on loopback, many concurrent clients, good and bad traffic.

The server runs as its own process (`python -m graftlm serve --api-key ...`) over a tiny random
Llama and three LoRA adapters (so that the clients, not the model, are what is tested). Each
client loops until
the time is up, picking one of:

    valid      a chat or completions request, streamed or not, to the base or an adapter:
               its text must equal the answer the same prompt gets alone (`generate`)
    malformed  a body that is not JSON, or JSON of the wrong shape / types
    unknown    a model that does not exist
    oversize   a body past --max-body-bytes
    bad key    a wrong or missing Authorization header
    abort      a streamed request whose client reads one chunk and hangs up

It reports requests served, answers by status, 5xx (must be 0), wrong answers (must be 0),
p50/p99 latency of valid requests, and the server's resident memory at the start and the end.

    python bench/soak.py --minutes 5 --clients 64 --out bench/results/soak.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import helpers  # noqa: E402

import graftlm  # noqa: E402
from graftlm.data.dataset import prompt_for_generation  # noqa: E402
from graftlm.infer.generate import SamplingConfig, generate, load_for_inference  # noqa: E402

KEY = "soak-key-0123456789"
PROMPTS = ["hello there", "a", "the quick brown fox", "xyz 123", "ok ok", "tell me", "zz", "abc"]
MAX_TOKENS = 12
ADAPTERS = {
    "alpha": graftlm.LoraConfig(rank=4, alpha=8, targets="all-linear"),
    "beta": graftlm.LoraConfig(rank=8, alpha=8, targets=("q_proj", "v_proj"), use_rslora=True),
    "gamma": graftlm.LoraConfig(rank=2, alpha=4, targets=("o_proj", "down_proj")),
}
KINDS = {  # share of each kind of request
    "valid": 0.55,
    "malformed": 0.1,
    "unknown": 0.07,
    "oversize": 0.05,
    "bad_key": 0.08,
    "abort": 0.15,
}


def make_adapter(folder: Path, config, seed: int) -> str:
    model = helpers.tiny_llama()
    graftlm.inject(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return str(graftlm.save_adapter(model, folder))


def solo_answers(model: str, adapters: dict[str, str]) -> dict[tuple, str]:
    """{(model name, prompt, chat): the text the prompt gets alone}, from `generate`."""
    reference, tokenizer = load_for_inference(model, adapters)
    sampling = SamplingConfig(max_new_tokens=MAX_TOKENS)
    answers = {}
    for name in [None, *adapters]:
        for chat in (False, True):
            texts = [
                prompt_for_generation({"messages": [{"role": "user", "content": p}]}, tokenizer)
                if chat
                else p
                for p in PROMPTS
            ]
            for prompt, text in zip(PROMPTS, texts):
                out = generate(reference, tokenizer, [text], adapters=[name], sampling=sampling)
                answers[(name or model, prompt, chat)] = out[0]
    return answers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Tally:
    def __init__(self) -> None:
        self.kinds: Counter = Counter()
        self.statuses: Counter = Counter()
        self.server_errors: list[str] = []
        self.wrong: list[str] = []
        self.latencies: list[float] = []
        self.busy = 0


async def valid(client, url, tally, rng, answers, base):
    model = rng.choice([base, *ADAPTERS])
    prompt, chat, stream = rng.choice(PROMPTS), rng.random() < 0.5, rng.random() < 0.5
    body = {"model": model, "max_tokens": MAX_TOKENS, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    if stream:
        text, status = "", None
        async with client.stream("POST", url + path, json=body, headers=AUTH) as response:
            status = response.status_code
            if status == 200:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        tally.server_errors.append(f"stream error {chunk['error']}")
                        break
                    for choice in chunk["choices"]:
                        text += (choice.get("delta") or {}).get("content") or choice.get("text", "")
            else:
                await response.aread()
    else:
        response = await client.post(url + path, json=body, headers=AUTH)
        status = response.status_code
        if status == 200:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
    tally.statuses[status] += 1
    if status == 429:
        tally.busy += 1
        return
    if status >= 500:
        tally.server_errors.append(f"{status} on a valid request")
        return
    tally.latencies.append(time.perf_counter() - start)
    expected = answers[(model, prompt, chat)]
    if status != 200 or text != expected:
        tally.wrong.append(f"{model} {prompt!r} chat={chat} stream={stream}: {status} {text!r}")


BAD_BODIES = [
    b"{not json",
    b"[1, 2, 3]",
    b'{"model": "alpha", "messages": "x"}',
    b'{"model": "alpha", "prompt": "a", "max_tokens": -1}',
    b'{"model": "alpha", "prompt": "a", "max_tokens": 1000000000}',
    b'{"model": "alpha", "prompt": 7}',
    b'{"model": ["alpha"], "prompt": "a"}',
    b'{"model": "alpha", "prompt": "a", "n": 3}',
    b'{"model": "alpha", "prompt": "a", "temperature": "hot"}',
    b"[" * 50_000 + b"]" * 50_000,
    b"\xff\xfe\x00",
]


async def bad(client, url, tally, rng, kind, base):
    path = rng.choice(["/v1/chat/completions", "/v1/completions"])
    headers = AUTH
    if kind == "malformed":
        content = rng.choice(BAD_BODIES)
    elif kind == "unknown":
        content = json.dumps({"model": "no-such-model", "prompt": "a"}).encode()
    elif kind == "oversize":
        content = json.dumps({"model": base, "prompt": "x" * (2 << 20)}).encode()
    else:  # bad_key
        content = json.dumps({"model": base, "prompt": "a", "max_tokens": 2}).encode()
        headers = rng.choice([{"Authorization": "Bearer wrong"}, {}])
    response = await client.post(url + path, content=content, headers=headers)
    tally.statuses[response.status_code] += 1
    if response.status_code >= 500:
        tally.server_errors.append(f"{response.status_code} on {kind}: {response.text[:200]}")
    elif set(response.json().get("error", {})) != {"message", "type", "param", "code"}:
        tally.wrong.append(f"{kind}: not an OpenAI-shaped error: {response.text[:200]}")


async def abort(client, url, tally, rng, base):
    body = {"model": rng.choice([base, *ADAPTERS]), "prompt": rng.choice(PROMPTS)}
    body.update(max_tokens=MAX_TOKENS, stream=True)
    async with client.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as r:
        tally.statuses[r.status_code] += 1
        if r.status_code >= 500:
            tally.server_errors.append(f"{r.status_code} on abort")
        async for _ in r.aiter_bytes():
            break  # hang up after the first chunk


AUTH = {"Authorization": f"Bearer {KEY}"}


async def client_loop(index, url, deadline, tally, answers, base, seed):
    rng = random.Random(seed * 1000 + index)
    kinds, weights = zip(*KINDS.items())
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            tally.kinds[kind] += 1
            try:
                if kind == "valid":
                    await valid(client, url, tally, rng, answers, base)
                elif kind == "abort":
                    await abort(client, url, tally, rng, base)
                else:
                    await bad(client, url, tally, rng, kind, base)
            except httpx.HTTPError as exc:
                tally.server_errors.append(f"{kind}: transport error {type(exc).__name__}: {exc}")


def run_soak(seconds: float, clients: int, *, seed: int = 0) -> dict:
    """Start a server, run `clients` clients for `seconds`, stop it; the report as a dict."""
    with tempfile.TemporaryDirectory(prefix="graftlm-soak-") as tmp:
        work = Path(tmp)
        model = str(helpers.save_tiny_model_dir(work / "tiny", "llama"))
        base = model
        folders = {
            name: make_adapter(work / "root" / name, cfg, i)
            for i, (name, cfg) in enumerate(ADAPTERS.items())
        }
        answers = solo_answers(model, folders)
        port = free_port()
        command = [
            sys.executable, "-m", "graftlm", "serve", "--model", model, "--port", str(port),
            "--api-key", KEY, "--max-batch", "16", "--max-body-bytes", str(1 << 20),
            "--max-prompt-tokens", "256", "--max-tokens-limit", "64",
        ]  # fmt: skip
        for name, folder in folders.items():
            command += ["--adapter", f"{name}={folder}"]
        env = dict(os.environ, MKL_CBWR="AUTO,STRICT")
        server = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "the server did not come up"
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            rss_start = rss_bytes(server.pid)
            tally = Tally()
            start = time.monotonic()

            async def main():
                end = time.monotonic() + seconds
                await asyncio.gather(
                    *(client_loop(i, url, end, tally, answers, base, seed) for i in range(clients))
                )

            asyncio.run(main())
            wall = time.monotonic() - start
            time.sleep(1.0)
            health = httpx.get(url + "/health", timeout=5).json()
            rss_end = rss_bytes(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    lat = sorted(tally.latencies)
    return {
        "seconds": round(wall, 1),
        "clients": clients,
        "requests": sum(tally.kinds.values()),
        "by_kind": dict(tally.kinds),
        "by_status": {str(k): v for k, v in sorted(tally.statuses.items())},
        "valid_served": len(lat),
        "busy_429": tally.busy,
        "server_errors_5xx": len(tally.server_errors),
        "wrong_answers": len(tally.wrong),
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "health_after": {k: health[k] for k in ("running", "waiting", "loaded_adapters")},
        "examples_5xx": tally.server_errors[:5],
        "examples_wrong": tally.wrong[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="append the report to this file")
    args = parser.parse_args()
    report = run_soak(args.minutes * 60, args.clients, seed=args.seed)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        cpu = os.popen("lscpu | grep 'Model name'").read().strip()
        with open(args.out, "a", encoding="utf-8") as f:
            stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            f.write(f"# {stamp}: {' '.join(sys.argv[1:])} ({cpu}, {os.cpu_count()} cores)\n")
            f.write(text + "\n")
    if report["server_errors_5xx"] or report["wrong_answers"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
