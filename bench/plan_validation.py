"""`graftlm plan` against measured runs: predicted vs measured peak RSS and step time.

Every row runs `graftlm train --steps 4` in a fresh process (its peak RSS from `wait4`, so the
parent's memory never counts) right after `graftlm plan --json` for the same settings. Models:
the built-in one and two randomly initialised Llama-family models built from configs (~0.5B and
~1.1B parameters; random weights take exactly the memory real ones do), saved once as bf16
safetensors with the built-in's tokenizer. The data is synthetic text, every row longer than
`--seq-len`, so every sequence of a step has exactly `--seq-len` tokens.

Criterion (issue #20): peak within 15%, step time within 30%. Step times on a shared machine
drift with the other jobs' load: the load average is printed beside each row. The step time is
the median of steps 2-4 (the first pays one-time costs: kernel compilation, the allocator's
growth; one step alone drifted by up to 20% between runs of a memory-bound full fine-tune).

A clean step time: `--threads 1` (given to `graftlm train --threads` and to the plan's rate
measurement, so the plan predicts the thread count it is checked against) with `--pin 0 --lock
/tmp/core0.lock`, which runs every timed process (each training run, and the plan's rate
measurement) as `flock LOCK taskset -c 0 ...`: one row per hold of the lock, on a core kept
quiet for measurements. Measurements are kept (WORK/measured.json, by settings and threads):
run the rows in chunks (`--only`, `--methods`, `--shapes`), then `--reuse` prints the whole
table, every kept row re-planned.

    python bench/plan_validation.py                   # all rows
    python bench/plan_validation.py --only builtin    # one model
    python bench/plan_validation.py --threads 1 --pin 0 --lock /tmp/core0.lock --only builtin
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.gettempdir()) / "graftlm-plan-bench"
RESULT = REPO / "bench" / "results" / "plan_validation.txt"
MEASURED = WORK / "measured.json"  # kept measurements: --reuse re-plans without re-training

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
    "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048, "rope_theta": 10000.0, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2,
}  # fmt: skip
MODELS = {
    "builtin": "smollm2-135m-instruct",
    # ~0.5B: hidden 1024, 24 layers, GQA 16/8
    "llama-0.5b": {**LLAMA, "hidden_size": 1024, "intermediate_size": 5120,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8},
    # ~1.1B: TinyLlama's shape with the built-in's vocabulary
    "llama-1.1b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 5632,
                   "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4},
}  # fmt: skip
# (method, batch, micro-batch, seq-len): two batch shapes per method
SHAPES = {
    "builtin": [(2, 2, 128), (4, 2, 256)],
    "llama-0.5b": [(1, 1, 64), (2, 2, 128)],
    "llama-1.1b": [(1, 1, 64), (2, 2, 128)],
}
METHODS = ("lora", "qlora", "full")
STEPS = 4  # per measured run: the first is a warm-up, the median of the others is the step time


def make_model(name: str, config: dict) -> Path:
    """A random model folder (bf16 safetensors + the built-in's tokenizer), made once."""
    folder = WORK / name
    if (folder / "model.safetensors").is_file():
        return folder
    code = f"""
import json, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
from graftlm.models.load import model_folder, load_tokenizer
config = AutoConfig.for_model(**json.loads({json.dumps(json.dumps(config))}))
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for n, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for b in model.buffers():
        pass
model.config.torch_dtype = torch.bfloat16
out = Path({str(folder)!r})
model.save_pretrained(out)
load_tokenizer("smollm2-135m-instruct").save_pretrained(out)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    return folder


def make_data(rows: int) -> Path:
    path = WORK / f"text{rows}.jsonl"
    if not path.is_file():
        rng = random.Random(0)
        words = "the of and to in is was for on that with as by at from his her an were".split()
        with path.open("w") as f:
            for _ in range(rows):
                text = " ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(1200))
                f.write(json.dumps({"text": text}) + "\n")
    return path


# how timed processes run: `flock LOCK taskset -c CORE` in front (--pin, --lock), and the torch
# thread count (--threads); set once by main()
TIMED: dict = {"prefix": [], "threads": None}


def timed(cmd: list[str]) -> list[str]:
    """`cmd` as a timed process runs: pinned and under the lock where asked."""
    return [*TIMED["prefix"], *cmd]


def run(cmd: list[str]) -> tuple[int, str, int, float]:
    """(exit status, output, peak RSS bytes of that process alone, its CPU seconds)."""
    env = dict(os.environ, MKL_CBWR="AUTO,STRICT", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO
    )
    output = proc.stdout.read().decode(errors="replace")
    # flock and taskset exec or wait for the child: wait4 on the wrapper reports the largest
    # RSS among it and its waited-for children, which is the training process's
    _, status, usage = os.wait4(proc.pid, 0)
    return status, output, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


PLAN_ALL = """
import json, sys, torch
from graftlm.plan.report import PlanRequest, plan_run
from graftlm.plan.shapes import model_shape, read_config
threads = json.loads(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
for line in sys.stdin:
    model, method, batch, micro, seq_len = json.loads(line)
    request = PlanRequest(method=method, batch_size=batch, micro_batch_size=micro, seq_len=seq_len)
    plan = plan_run(model_shape(*read_config(model)), request, model, with_full=False)
    print(json.dumps(plan.to_dict()), flush=True)
"""


def predict(rows: list[tuple]) -> list[dict]:
    """`graftlm plan`'s JSON for every row, each in a fresh process (rates and step parts
    measured per plan; a --low-memory run's allocator settings are process-wide)."""
    env = dict(os.environ, MKL_CBWR="AUTO,STRICT", PYTHONPATH=str(REPO))
    plans = []
    for row in rows:
        done = subprocess.run(
            timed([sys.executable, "-c", PLAN_ALL, json.dumps(TIMED["threads"])]),
            input=json.dumps(row), capture_output=True, text=True, env=env, cwd=REPO, check=True,
        )  # fmt: skip
        plans += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return plans


def measured(
    model: str, method: str, batch: int, micro: int, seq_len: int, reuse: bool, rounds: int
) -> dict:
    """The peak and step time of these settings, with their plan (kept from an earlier run with
    `reuse`).

    Each of `rounds` rounds measures the run and plans it right after; the row keeps the median
    of each. This machine's speed drifts by up to 2x over minutes (a VM on a shared host: one
    row's step took 3.9 s at 17:00 and 6.8 s at 19:00), and a plan and a run made a minute apart
    see the same host, so the rounds pair them."""
    settings = ["--method", method, "--batch-size", str(batch), "--micro-batch-size", str(micro),
                "--seq-len", str(seq_len)]  # fmt: skip
    key = _key(model, method, f"{batch}x{seq_len}/{micro}")
    kept = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    if not (reuse and key in kept):
        results, plans = [], []
        for _ in range(rounds):
            results.append(measure(model, settings, batch))
            if "error" in results[-1]:
                return results[-1]
            plans.append(predict([(model, method, batch, micro, seq_len)])[0])
            print(f"  round: measured {results[-1]['measured_step_s']:.2f} s, "
                  f"planned {plans[-1]['step_seconds']:.2f} s", flush=True)  # fmt: skip
        result = dict(results[0])
        for name in ("measured_peak", "measured_step_s", "load"):
            result[name] = statistics.median(r[name] for r in results)
        plan = dict(plans[0])
        plan["step_seconds"] = statistics.median(p["step_seconds"] for p in plans)
        result["rounds"] = [
            [r["measured_step_s"], p["step_seconds"]] for r, p in zip(results, plans)
        ]
        result["plan"] = plan
        kept[key] = result
        MEASURED.write_text(json.dumps(kept, indent=1))
    return kept[key]


def _key(model: str, method: str, shape: str) -> str:
    """A measurement's key: the settings, and the thread count when one was given."""
    threads = TIMED["threads"]
    return f"{Path(model).name}-{method}-{shape}" + (f"-t{threads}" if threads else "")


def _keep_plan(key: str, plan: dict) -> None:
    kept = json.loads(MEASURED.read_text())
    kept[key]["plan"] = plan
    MEASURED.write_text(json.dumps(kept, indent=1))


def _kept(model: str, method: str, shape: str) -> bool:
    kept = json.loads(MEASURED.read_text()) if MEASURED.is_file() else {}
    return _key(model, method, shape) in kept


# the forgetting meter runs generation after training when graftlm has it: a job of its own,
# which the plan does not cover (and which takes minutes here)
NO_EXTRAS: list[str] = []


def measure(model: str, settings: list[str], batch: int) -> dict:
    """Peak RSS and the median step time of steps 2.. of `graftlm train --steps STEPS` in a
    fresh process."""
    out = WORK / "runs" / "run"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    threads = ["--threads", str(TIMED["threads"])] if TIMED["threads"] else []
    status, output, peak, cpu = run(
        timed([sys.executable, "-m", "graftlm", "train", "--model", model, "--data",
               str(make_data(3 * batch)), "--out", str(out), "--steps", str(STEPS), "--quiet",
               *settings, *threads, *NO_EXTRAS])
    )  # fmt: skip
    wall = time.perf_counter() - start
    if status:
        return {"error": output[-600:]}
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "tokens_per_s" in s]
    step_s = statistics.median(s["tokens"] / s["tokens_per_s"] for s in steps[1:])
    return {
        "measured_peak": peak,
        "measured_step_s": step_s,
        "load": (load + os.getloadavg()[0]) / 2,
        "wall_s": wall,
        "cpu_s": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=list(MODELS), action="append", help="models to run")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to run")
    parser.add_argument("--shapes", default="0,1", help="batch shapes to run (indices, 0,1)")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument(
        "--budget-min", type=float, default=30.0, help="start no new training run after this"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep earlier measurements of the same settings"
    )
    parser.add_argument("--threads", type=int, help="torch threads of training and the plan")
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure and plan each row this often (medians)"
    )
    parser.add_argument("--pin", type=int, help="run timed processes on this core (taskset)")
    parser.add_argument("--lock", help="hold this file's lock (flock) for each timed process")
    args = parser.parse_args()
    TIMED["threads"] = args.threads
    if args.lock:
        TIMED["prefix"] += ["flock", args.lock]
    if args.pin is not None:
        TIMED["prefix"] += ["taskset", "-c", str(args.pin)]
    WORK.mkdir(parents=True, exist_ok=True)
    trains = subprocess.run(
        [sys.executable, "-c", "from graftlm.methods import REGISTRY; print(' '.join(REGISTRY))"],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    ).stdout.split()  # fmt: skip
    help_text = subprocess.run(
        [sys.executable, "-m", "graftlm", "train", "--help"], capture_output=True, text=True,
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    ).stdout  # fmt: skip
    if "--no-forgetting" in help_text:
        NO_EXTRAS.append("--no-forgetting")
    header = (
        f"{'model':22}{'method':7}{'batch':>10}{'ckpt':>5}{'peak pred':>11}{'measured':>10}"
        f"{'err':>7}{'step pred':>11}{'measured':>10}{'err':>7}{'FLOP model':>11}{'err':>7}"
        f"{'load':>6}  rounds: measured/planned s"
    )
    threads = f"{args.threads} torch thread(s)" if args.threads else "all cores"
    where = " ".join(TIMED["prefix"]) or "unpinned"
    lines = [
        f"graftlm plan vs graftlm train --steps {STEPS} (peak RSS of the process; the median "
        f"time of steps 2-{STEPS})",
        f"machine: {os.cpu_count()} CPUs, {threads}, timed processes: {where}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        header,
    ]
    print("\n".join(lines), flush=True)
    deadline = time.monotonic() + args.budget_min * 60
    chosen_models = args.only or list(MODELS)
    chosen_methods = args.methods.split(",")
    chosen_shapes = [int(i) for i in args.shapes.split(",")]
    # every model's first batch shape before any second one: a short budget still covers all;
    # rows not chosen are shown from kept measurements (--reuse), so chunks make one table
    for index in range(2):
        for key in MODELS:
            config = MODELS[key]
            model = config if isinstance(config, str) else str(make_model(key, config))
            for method in METHODS:
                batch, micro, seq_len = SHAPES[key][index]
                shape = f"{batch}x{seq_len}/{micro}"
                chosen = key in chosen_models and method in chosen_methods
                chosen = chosen and index in chosen_shapes
                kept = _kept(model, method, shape)
                why = None
                if method not in trains:
                    why = f"graftlm train has no --method {method}"
                elif not chosen and not (args.reuse and kept):
                    why = "not measured"
                elif time.monotonic() > deadline and not (args.reuse and kept):
                    why = f"out of the {args.budget_min:g} min budget"
                if why:
                    lines.append(f"{key:22}{method:7}{shape:>10}  not run: {why}")
                    print(lines[-1], flush=True)
                    continue
                reuse = args.reuse or not chosen
                result = measured(model, method, batch, micro, seq_len, reuse, args.rounds)
                if "error" in result:
                    lines.append(
                        f"{key:22}{method:7}{shape:>10}  failed: {result['error'][-300:]!r}"
                    )
                    print(lines[-1], flush=True)
                    continue
                print(f"measured {key} {method} {shape}: {result}", flush=True)
                # planned right away (a chunk cut short still has its rows) and kept beside the
                # measurement; a row of another chunk shows its kept plan
                plan = result.get("plan")
                if plan is None:
                    plan = predict([(model, method, batch, micro, seq_len)])[0]
                    _keep_plan(_key(model, method, shape), plan)
                lines.append(_row(key, method, shape, plan, result))
                print(lines[-1], flush=True)
                Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


def _row(key: str, method: str, shape: str, plan: dict, r: dict) -> str:
    """One line of the table: the plan against the measurement."""
    peak_err = plan["peak_bytes"] / r["measured_peak"] - 1
    time_err = plan["step_seconds"] / r["measured_step_s"] - 1
    flops_s = plan.get("flops_step_seconds", plan["step_seconds"])
    flops_err = flops_s / r["measured_step_s"] - 1
    return (
        f"{key:22}{method:7}{shape:>10}{'on' if plan['activation_checkpointing'] else 'off':>5}"
        f"{plan['peak_bytes'] / 1e9:>9.2f}GB{r['measured_peak'] / 1e9:>8.2f}GB"
        f"{peak_err:>+7.0%}{plan['step_seconds']:>10.2f}s"
        f"{r['measured_step_s']:>9.2f}s{time_err:>+7.0%}{flops_s:>10.2f}s{flops_err:>+7.0%}"
        f"{r['load']:>6.1f}" + "".join(f"  {m:.2f}/{q:.2f}" for m, q in r.get("rounds", []))
        # each round's measured / planned step seconds
    )


if __name__ == "__main__":
    main()
