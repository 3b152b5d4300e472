"""`graftlm serve --api-key K` from outside: runtime adapter loading off by default and confined
to `--adapter-root`, every bad request a 4xx with an OpenAI-shaped error, a bounded queue (429
with Retry-After), a per-request timeout, a disconnected stream freeing its row, the key compared
in constant time and never logged; valid requests keep their solo answers throughout."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import helpers
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serving import Server, make_adapter, solo  # noqa: E402

from graftlm.errors import GraftError  # noqa: E402
from graftlm.infer.generate import load_for_inference  # noqa: E402
from graftlm.methods.lora.config import LoraConfig  # noqa: E402

KEY = "K-0123456789-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("hardening")
    model_dir = helpers.save_tiny_model_dir(base / "tiny", "llama")
    root = base / "root"
    root.mkdir()
    alpha = make_adapter(root / "alpha", LoraConfig(rank=4, alpha=8, targets="all-linear"), 0)
    make_adapter(root / "gamma", LoraConfig(rank=2, alpha=4, targets=("q_proj",)), 2)
    outside = make_adapter(base / "outside", LoraConfig(rank=2, alpha=4, targets=("v_proj",)), 3)
    (root / "link_out").symlink_to(outside)  # a folder symlinked out of the root
    sneaky = root / "sneaky"  # a real folder inside whose weights file points out
    sneaky.mkdir()
    for f in outside.iterdir():
        (sneaky / f.name).symlink_to(f)
    server = Server(
        model_dir,
        {"alpha": str(alpha)},
        api_key=KEY,
        allow_runtime_adapters=True,
        adapter_root=str(root),
        max_prompt_tokens=64,
        max_tokens_limit=48,
        max_batch=4,
    )
    reference, tokenizer = load_for_inference(str(model_dir), {"alpha": str(alpha)})
    yield dict(
        server=server,
        reference=reference,
        tokenizer=tokenizer,
        model_dir=model_dir,
        root=root,
        base=base,
        alpha=alpha,
        outside=outside,
    )
    server.stop()
    torch.set_num_threads(threads)


def post(server, path, body=None, *, content=None, headers=AUTH, **kwargs):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, **kwargs)


def assert_valid_answer(world, prompt="abc", max_tokens=6):
    """A valid request still gets its solo answer."""
    reply = post(
        world["server"],
        "/v1/completions",
        {"model": "alpha", "prompt": prompt, "max_tokens": max_tokens},
    )
    assert reply.status_code == 200, reply.text
    expected = solo(world["reference"], world["tokenizer"], prompt, "alpha", max_tokens, False)
    assert reply.json()["choices"][0]["text"] == expected


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == ERROR_KEYS, response.text
    assert isinstance(response.json()["error"]["message"], str)


def test_paths_outside_the_root_are_refused_alike(world):
    server, base = world["server"], world["base"]
    refused = [
        "../outside",
        "gamma/../../outside",
        str(world["outside"]),  # absolute, exists
        "/no/such/folder",  # absolute, does not exist
        "/etc",
        "link_out",  # symlink out of the root
        "sneaky",  # its files are symlinks out of the root
        "alpha\x00",
    ]
    messages = set()
    for i, path in enumerate(refused):
        response = post(server, "/v1/load_lora_adapter", {"lora_name": f"x{i}", "lora_path": path})
        assert_openai_error(response, 403)
        messages.add(response.json()["error"]["message"])
        assert f"x{i}" not in server.state.registry
    assert len(messages) == 1  # one answer whatever exists there: nothing is revealed
    message = messages.pop()
    assert str(base) not in message and "outside" not in message and "etc" not in message
    assert_valid_answer(world)
    # inside the root: relative or absolute, it loads
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "gamma"})
    assert response.status_code == 200, response.text
    unload = post(server, "/v1/unload_lora_adapter", {"lora_name": "g"})
    assert unload.status_code == 200
    absolute = str(world["root"] / "gamma")
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "g2", "lora_path": absolute})
    assert response.status_code == 200, response.text
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "g2"}).status_code == 200


def test_runtime_loading_is_off_by_default(world):
    server = Server(world["model_dir"], {"alpha": str(world["alpha"])}, api_key=KEY)
    try:
        for path in ("gamma", str(world["root"] / "gamma"), "/etc/passwd"):
            body = {"lora_name": "g", "lora_path": path}
            response = post(server, "/v1/load_lora_adapter", body)
            assert_openai_error(response, 403)
            assert response.json()["error"]["code"] == "runtime_adapters_disabled"
        assert_openai_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "alpha"}), 403)
        assert "alpha" in server.state.registry and "g" not in server.state.registry
        health = httpx.get(server.url + "/health").json()
        assert health["runtime_adapters"] is False
    finally:
        server.stop()
    with pytest.raises(GraftError, match="--adapter-root"):
        Server(world["model_dir"], {}, allow_runtime_adapters=True)


def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_answering(world):
    server = world["server"]
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}
    C, P = "/v1/chat/completions", "/v1/completions"
    huge_int = b'{"model": "alpha", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"
    cases = [
        (400, C, dict(content=b"{not json")),
        (400, C, dict(content=b"\xff\xfe\x00garbage")),
        (400, C, dict(content=b"[" * 100_000 + b"]" * 100_000)),  # nested past the stack
        (400, P, dict(content=huge_int)),  # an integer past Python's 4300 digits
        (400, C, dict(body=[1, 2])),
        (400, C, dict(body={**chat, "max_tokens": -1})),
        (400, C, dict(body={**chat, "max_tokens": 10**9})),
        (400, C, dict(body={**chat, "max_tokens": "12"})),
        (400, C, dict(body={**chat, "max_tokens": 1.5})),
        (400, C, dict(body={"model": "alpha", "messages": "x"})),
        (400, C, dict(body={"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]})),
        (400, C, dict(body={"model": 7, "messages": chat["messages"]})),
        (400, C, dict(body={**chat, "n": 2})),
        (400, C, dict(body={**chat, "stop": [str(i) for i in range(17)]})),
        (400, C, dict(body={**chat, "temperature": "hot"})),
        (400, C, dict(body={**chat, "stream": "yes"})),
        (400, P, dict(body={"model": "alpha", "prompt": "word " * 200})),  # > 64 prompt tokens
        (400, P, dict(body={"model": "alpha", "prompt": [[10**12]]})),  # id outside the vocab
        (404, C, dict(body={**chat, "model": "no-such-model"})),
        (413, P, dict(body={"model": "alpha", "prompt": "x" * (5 << 20)})),  # a 5 MB prompt
        (401, C, dict(body=chat, headers={"Authorization": "Bearer wrong"})),
        (401, C, dict(body=chat, headers={})),
        (401, C, dict(body=chat, headers={"Authorization": KEY})),  # no "Bearer"
    ]
    for i, (status, path, kwargs) in enumerate(cases):
        response = post(server, path, kwargs.pop("body", None), **kwargs)
        assert_openai_error(response, status)
        if i % 5 == 0:
            assert_valid_answer(world, prompt=f"still {i}")
    assert_valid_answer(world)


def test_api_key_is_compared_in_constant_time_and_never_logged(world, caplog, monkeypatch):
    import graftlm.serve.app as app_module

    server = world["server"]
    calls = []
    real = app_module.hmac.compare_digest

    def spy(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    caplog.set_level(logging.DEBUG)
    for name in ("", "uvicorn", "uvicorn.access", "uvicorn.error", "graftlm"):
        caplog.set_level(logging.DEBUG, logger=name)
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(server, "/v1/chat/completions", chat).status_code == 200
    wrong = {"Authorization": f"Bearer {KEY}x"}
    assert post(server, "/v1/chat/completions", chat, headers=wrong).status_code == 401
    assert post(server, "/v1/chat/completions", {"model": "alpha"}).status_code == 400
    assert len(calls) == 3
    assert caplog.records  # the logs were captured
    assert KEY not in caplog.text


def test_health_reports_queue_depth_and_loaded_adapters(world):
    health = httpx.get(world["server"].url + "/health").json()
    assert health["status"] == "ok"
    assert health["queue_depth"] == 0 and health["max_queue"] == 256
    assert health["loaded_adapters"] == ["alpha"] and health["runtime_adapters"] is True


def slow_steps(monkeypatch, server, seconds):
    """Make every engine forward take at least `seconds`: long answers take long."""
    engine = server.state.engine
    real = engine._forward

    def slow(rows, **inputs):
        time.sleep(seconds)
        return real(rows, **inputs)

    monkeypatch.setattr(engine, "_forward", slow)


def running(server):
    return httpx.get(server.url + "/health").json()["running"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(world, monkeypatch):
    server = world["server"]
    slow_steps(monkeypatch, server, 0.05)  # 48 tokens: ~2.4 s if nobody stops it
    body = {"model": "alpha", "prompt": "tell me", "max_tokens": 48, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")
        assert running(server) == 1
        left = time.monotonic()
    deadline = left + 2.0
    while running(server):
        assert time.monotonic() < deadline, "the row of a gone client is still decoding"
        time.sleep(0.02)
    freed = time.monotonic() - left
    assert freed < 0.5, f"the row was freed {freed:.2f} s after the client left"
    monkeypatch.undo()
    assert_valid_answer(world)


def test_a_full_queue_answers_429_with_retry_after(world, monkeypatch):
    server = Server(world["model_dir"], {"alpha": str(world["alpha"])}, max_batch=1, max_queue=1)
    try:
        slow_steps(monkeypatch, server, 0.03)  # each answer ~0.6 s: they overlap
        start = threading.Barrier(4)

        def ask(i):
            start.wait()
            body = {"model": "alpha", "prompt": f"q {i}", "max_tokens": 20}
            return post(server, "/v1/completions", body, headers={}, timeout=60)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(ask, range(4)))
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 1, statuses
        for i, reply in enumerate(replies):
            if reply.status_code == 429:
                assert_openai_error(reply, 429)
                assert reply.headers["retry-after"] == "1"
                assert reply.json()["error"]["code"] == "queue_full"
            else:
                expected = solo(
                    world["reference"], world["tokenizer"], f"q {i}", "alpha", 20, False
                )
                assert reply.json()["choices"][0]["text"] == expected
    finally:
        server.stop()


def test_a_request_past_its_timeout_is_408_and_frees_its_row(world, monkeypatch):
    server = Server(world["model_dir"], {"alpha": str(world["alpha"])}, request_timeout=0.5)
    try:
        slow_steps(monkeypatch, server, 0.05)  # 40 tokens: ~2 s
        body = {"model": "alpha", "prompt": "long", "max_tokens": 40}
        reply = post(server, "/v1/completions", body, headers={}, timeout=30)
        assert_openai_error(reply, 408)
        assert reply.json()["error"]["code"] == "timeout"
        with httpx.stream(
            "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30
        ) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x and x != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "timeout"
        deadline = time.monotonic() + 1.0
        while running(server):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        monkeypatch.undo()
        quick = post(server, "/v1/completions", {**body, "max_tokens": 3}, headers={})
        assert quick.status_code == 200
    finally:
        server.stop()


def test_cli_flags_reach_the_server(world, tmp_path):
    from graftlm.cli.parser import build_parser

    args = build_parser().parse_args(
        ["serve", "--allow-runtime-adapters", "--adapter-root", str(tmp_path)]
        + ["--max-queue", "7", "--request-timeout", "2.5"]
    )
    assert args.allow_runtime_adapters and args.adapter_root == str(tmp_path)
    assert args.max_queue == 7 and args.request_timeout == 2.5
    assert not build_parser().parse_args(["serve"]).allow_runtime_adapters
    assert os.path.isdir(args.adapter_root)
