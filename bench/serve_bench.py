"""Many adapters on one base: batched heterogeneous LoRA against the alternatives, and a load test.

On the built-in model (SmolLM2-135M-Instruct, fp32, one thread) with 8 adapters (rank 8-16 on
every linear layer, random B) and 8 chat prompts of ~40 tokens:

1. one decode step of the 8-row batch, isolating what the adapters cost on top of the base:
   graftlm's per-row bank (lora_rows.py: at a decode step one C call per layer reads each row's
   A and B in place), its per-adapter loop (what the bank replaces), one adapter for
   all rows, and Hugging Face PEFT's mixed batch (`adapter_names=[...]`);
2. whole generations of `--tokens` tokens per prompt (eos ignored, so every setup does the same
   work): graftlm's engine with 8 different adapters, the same with one adapter, PEFT's mixed
   batch `generate`, and swapping adapters per request (load, generate alone, unload);
3. `graftlm serve` on loopback, 64 concurrent openai clients over the 8 adapters with a small
   `max_tokens`: p50/p99 latency, throughput, failed requests.

    OMP_NUM_THREADS=1 .venv/bin/python bench/serve_bench.py --out bench/results/serve.txt

Figures drift by +-20% on shared machines: compare ratios from one run (`--repeats 2` runs
every whole-generation setup twice, interleaved, and keeps the faster run).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

QUESTIONS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain in detail how a bicycle gear system works.",
    "Describe the history of the printing press at length.",
    "Tell me everything about how bees make honey.",
    "Write a detailed recipe for a vegetable soup with steps.",
    "Explain how rainbows form, with as much detail as you can.",
    "Describe a day in the life of a medieval blacksmith.",
    "Write a long letter from a sailor to his family at home.",
]


def make_adapters(model, folder: Path, count: int) -> dict[str, str]:
    """`count` adapters of rank 8..16 on every linear layer, B random (so each one matters)."""
    import graftlm
    from graftlm.methods.lora.config import LoraConfig

    folders = {}
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        name = f"a{i}"
        rank = 8 + (8 * i) // max(count - 1, 1)
        graftlm.inject(model, LoraConfig(rank=rank, alpha=2 * rank), name=name)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f"lora_B.{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.002)
        folders[name] = str(graftlm.save_adapter(model, folder / name, name=name))
        graftlm.delete_adapter(model, name)
    return folders


def engine_run(engine, prompts: list[list[int]], adapters: list[str | None], tokens: int) -> float:
    """Submit every prompt at once; seconds until the last one finishes."""
    from graftlm.infer.generate import SamplingConfig
    from graftlm.serve.scheduler import Request

    done = threading.Semaphore(0)
    errors = []

    def on_event(event):
        if event.kind == "error":
            errors.append(event.error)
        if event.kind in ("done", "error"):
            done.release()

    start = time.perf_counter()
    for ids, adapter in zip(prompts, adapters):
        engine.submit(Request(ids, adapter, SamplingConfig(max_new_tokens=tokens), on_event))
    for _ in prompts:
        done.acquire()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def left_padded(prompts: list[list[int]], pad: int) -> dict:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def hf_generate(model, inputs: dict, tokens: int, pad: int, **kwargs) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # eos ignored, as in the engine runs
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            **kwargs,
        )
    assert out.shape[1] == inputs["input_ids"].shape[1] + tokens
    return time.perf_counter() - start


MIXED = "graftlm, 8 adapters (per-row bank)"


def step_benchmark(model, registry, peft_model, prompts, repeats: int) -> None:
    """One decode forward (8 rows, ~40 cached tokens each): where each setup spends its time."""
    import copy

    from graftlm.methods.lora import layer as lora
    from graftlm.methods.lora.inject import row_adapters

    names = registry.names()
    internal = [e.internal for e in registry.acquire(names)]
    width = min(map(len, prompts))
    ids = torch.tensor([p[:width] for p in prompts])
    last = ids[:, -1:]
    with torch.inference_mode():
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        peft_cache = copy.deepcopy(cache)

    def ours(rows, loop=False):
        def run():
            # loop: LoraLinear's own per-adapter loop, without the bank (what lora_rows replaces)
            saved = lora.gathered_rows_forward
            lora.gathered_rows_forward = (lambda *args: None) if loop else saved
            try:
                with row_adapters(model, rows), torch.inference_mode():
                    c = copy.deepcopy(cache)
                    start = time.perf_counter()
                    model(input_ids=last, cache=c, use_cache=True, logits_to_keep=1)
                    return time.perf_counter() - start
            finally:
                lora.gathered_rows_forward = saved

        return run

    def peft_run(adapter_names):
        def step(c, kwargs):
            start = time.perf_counter()
            peft_model(input_ids=last, cache=c, use_cache=True, logits_to_keep=1, **kwargs)
            return time.perf_counter() - start

        def run():
            with torch.inference_mode():
                c = copy.deepcopy(peft_cache)
                if adapter_names is None:  # entering disable_adapter() is not part of a step
                    with peft_model.disable_adapter():
                        return step(c, {})
                return step(c, {"adapter_names": adapter_names})

        return run

    peft_names = list(peft_model.peft_config)
    setups = {
        "base model alone (graftlm, no adapter rows)": ours([None] * len(prompts)),
        MIXED: ours(internal),
        "graftlm, 8 adapters (per-adapter loop)": ours(internal, loop=True),
        "graftlm, 1 adapter": ours([internal[0]] * len(prompts)),
        "PEFT, adapters disabled": peft_run(None),
        "PEFT mixed batch, 8 adapters": peft_run(peft_names),
        "PEFT mixed batch, 1 adapter": peft_run([peft_names[0]] * len(prompts)),
    }
    for run in setups.values():
        run()  # warm up (builds the per-row banks)
    best = {label: float("inf") for label in setups}
    for _ in range(repeats):  # interleaved, so that drifting load hits every setup alike
        for label, run in setups.items():
            best[label] = min(best[label], run())
    registry.release([registry.entry(n) for n in names])
    base = best["base model alone (graftlm, no adapter rows)"]
    peft_base = best["PEFT, adapters disabled"]
    print(f"\none decode step, {len(prompts)} rows x {width} cached tokens, best of {repeats}\n")
    print(f"{'setup':<46} {'ms':>7} {'over its base':>14}")
    for label, seconds in best.items():
        over = seconds - (peft_base if label.startswith("PEFT") else base)
        print(f"{label:<46} {1000 * seconds:7.1f} {1000 * over:+11.1f} ms")
    ours8 = best[MIXED] - base
    theirs8 = best["PEFT mixed batch, 8 adapters"] - peft_base
    mixed_peft = best["PEFT mixed batch, 8 adapters"]
    print(
        f"\nadapter cost of a mixed step: PEFT {1000 * theirs8:.0f} ms, graftlm "
        f"{1000 * ours8:.0f} ms ({theirs8 / max(ours8, 1e-4):.1f}x less)"
        f"\nmixed step: graftlm {mixed_peft / best[MIXED]:.2f}x "
        f"faster than PEFT; the ceiling with free adapters (PEFT's mixed step / the base step) "
        f"is {mixed_peft / base:.2f}x"
    )


def batch_benchmarks(args, model, registry, peft_model, folders, prompts, tokenizer) -> None:
    """Whole generations: 8 requests of `tokens` tokens each, every setup doing the same work."""
    from graftlm.methods.lora.files import load_adapter
    from graftlm.methods.lora.inject import delete_adapter
    from graftlm.serve.scheduler import Engine

    names = list(folders)
    engine = Engine(model, tokenizer, registry, max_batch=len(prompts))
    engine.eos = set()  # every row generates exactly `tokens` tokens
    engine.start()
    pad = tokenizer.pad_token_id
    swapped = len(prompts) // 2  # sequential and alike: half of them give the rate

    def mixed():
        return engine_run(engine, prompts, names, args.tokens)

    def one():
        return engine_run(engine, prompts, [names[0]] * len(prompts), args.tokens)

    def peft_mixed():
        inputs = left_padded(prompts, pad)
        return hf_generate(peft_model, inputs, args.tokens, pad, adapter_names=names)

    def swap():
        # the whole request on a model that holds one adapter at a time
        start = time.perf_counter()
        for ids, name in list(zip(prompts, names))[:swapped]:
            load_adapter(model, folders[name], name="swap")
            hf_generate(model, left_padded([ids], pad), args.tokens, pad)
            delete_adapter(model, "swap")
        return (time.perf_counter() - start) * len(prompts) / swapped

    setups = {
        "graftlm engine, 8 rows x 8 adapters": mixed,
        "graftlm engine, 8 rows x 1 adapter": one,
        "PEFT mixed batch generate (adapter_names=...)": peft_mixed,
        "swap per request (load, generate alone, unload)": swap,
    }
    best = {label: float("inf") for label in setups}
    for _ in range(args.repeats):
        for label, run in setups.items():
            best[label] = min(best[label], run())
    engine.stop()
    generated = len(prompts) * args.tokens
    print(
        f"\nwhole generations: {len(prompts)} chat prompts ({min(map(len, prompts))}-"
        f"{max(map(len, prompts))} tokens), {args.tokens} new tokens each, greedy, prefill "
        f"included; best of {args.repeats} (swap: {swapped} requests, scaled to {len(prompts)})\n"
    )
    print(f"{'setup':<50} {'seconds':>8} {'tokens/s':>9}")
    for label, seconds in best.items():
        print(f"{label:<50} {seconds:8.2f} {generated / seconds:9.1f}")
    rate = {label: generated / s for label, s in best.items()}
    labels = list(setups)
    print(
        f"\n8 adapters / 1 adapter:        {rate[labels[0]] / rate[labels[1]]:.2f}x (target >= 0.8x)"
        f"\n8 adapters / PEFT mixed batch: {rate[labels[0]] / rate[labels[2]]:.2f}x (target >= 3x)"
        f"\n8 adapters / swap per request: {rate[labels[0]] / rate[labels[3]]:.2f}x"
    )


def load_test(args, folders) -> None:
    import openai

    from graftlm.serve.app import create_server

    with socket_port() as port:
        pass
    server, state = create_server(
        "smollm2-135m-instruct",
        folders,
        port=port,
        max_batch=args.max_batch,
        log_level="error",
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600
    )
    names = list(folders)
    latencies, failures = [], []
    barrier = threading.Barrier(args.clients)

    def one_client(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            # /v1/completions on the bare question (~12 tokens): the chat template's default
            # system prompt would triple the prefill work of this small load test
            reply = client.completions.create(
                model=names[i % len(names)],
                prompt=QUESTIONS[i % len(QUESTIONS)],
                max_tokens=args.load_tokens,
            )
            assert reply.choices[0].text is not None
            latencies.append(time.perf_counter() - start)
        except Exception as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(args.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(60)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    print(
        f"\nload test: graftlm serve on loopback, {args.clients} concurrent clients over "
        f"{len(names)} adapters, max_tokens {args.load_tokens}, --max-batch {args.max_batch}"
    )
    print(
        f"  {len(latencies)} ok, {len(failures)} failed in {wall:.1f} s "
        f"({len(latencies) / wall:.2f} requests/s)"
    )
    if latencies:
        print(
            f"  latency p50 {statistics.median(latencies):.2f} s, p99 {p99:.2f} s, "
            f"max {latencies[-1]:.2f} s"
        )
    for failure in failures[:5]:
        print(f"  failure: {failure}")


class socket_port:
    """A free loopback port (closed again before use)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--load-tokens", type=int, default=8, help="max_tokens in the load test")
    parser.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument(
        "--no-small-batch-kernel",
        action="store_true",
        help="graftlm decodes with torch's F.linear instead of its small-batch C kernel "
        "(the load test's server is unaffected)",
    )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from graftlm.data.dataset import prompt_for_generation
    from graftlm.kernels.small_batch_linear import use_small_batch_kernel
    from graftlm.models.load import load_model

    buffer = io.StringIO()
    tee = Tee(sys.stdout, buffer)
    with redirect_stdout(tee), tempfile.TemporaryDirectory() as tmp:
        import peft

        from graftlm.serve.adapter_pool import AdapterRegistry

        model, tokenizer = load_model("smollm2-135m-instruct")
        model.eval()
        if not args.no_small_batch_kernel:  # as graftlm generate / serve load it
            use_small_batch_kernel(model)
        print(
            f"torch {torch.__version__}, peft {peft.__version__}, {torch.get_num_threads()} "
            f"thread(s), load average {os.getloadavg()[0]:.1f}; SmolLM2-135M-Instruct fp32; "
            f"{len(QUESTIONS)} adapters of rank 8-16 on all linear layers"
        )
        folders = make_adapters(model, Path(tmp), len(QUESTIONS))
        registry = AdapterRegistry(model)
        for name, path in folders.items():
            registry.register(name, path, load=True)
        peft_base, _ = load_model("smollm2-135m-instruct")
        names = list(folders)
        peft_model = peft.PeftModel.from_pretrained(
            peft_base, folders[names[0]], adapter_name=names[0]
        )
        for name in names[1:]:
            peft_model.load_adapter(folders[name], adapter_name=name)
        peft_model.eval()
        prompts = [
            tokenizer(prompt_for_generation({"prompt": q}, tokenizer), add_special_tokens=False)[
                "input_ids"
            ]
            for q in QUESTIONS
        ]
        step_benchmark(model, registry, peft_model, prompts, repeats=4)
        batch_benchmarks(args, model, registry, peft_model, folders, prompts, tokenizer)
        del model, peft_model, peft_base, registry
        load_test(args, folders)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        Path(args.out).write_text(buffer.getvalue())


class Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


if __name__ == "__main__":
    main()
