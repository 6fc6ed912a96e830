"""Serving many adapters: decode tokens/s of 32 concurrent sequences, and an HTTP load test.

    python bench/serving.py [--steps 4] [--rounds 8] [--targets all-linear | q_proj,v_proj]
                            [--requests 200] [--clients 16] [--threads N]

Part 1 decodes 32 sequences (one prompt each, greedy) on the embedded model with 1, 8 or 32
distinct rank-16 adapters, and with 32 active out of 128 registered (cold in host memory until
their requests are admitted), against the bare base model and against PEFT's mixed-batch forward
(``adapter_names``) on the same prompts. Every variant keeps its 32 sequences running, and each
round times a few decode steps of every variant in turn, so machine noise hits them alike;
tokens/s are medians over rounds, ratios are medians of per-round ratios. Part 2 starts
``rankwise serve`` on 127.0.0.1 with the 128 adapters and sends ``--requests`` completions from
``--clients`` concurrent clients over mixed adapters. Writes docs/benchmarks.md (section
"serving").
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import httpx
import peft
import torch
from peft import PeftModel
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, write_section  # noqa: E402

from rankwise.adapters.inject import adaptable_modules, module_kinds  # noqa: E402
from rankwise.adapters.peft_format import LoraWeights, read_adapter, write_adapter  # noqa: E402
from rankwise.models import load_model  # noqa: E402
from rankwise.serve.engine import Engine, EngineConfig  # noqa: E402
from rankwise.serve.requests import GenerationRequest  # noqa: E402

BATCH, RANK, REGISTERED = 32, 16, 128
KEY = "bench-key"


def random_adapter(model: torch.nn.Module, seed: int, targets: list[str]) -> LoraWeights:
    """A rank-16 adapter with random factors, big enough to change the greedy text."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, linear in adaptable_modules(model).items():
        if name.rpartition(".")[2] in targets:
            a = torch.randn(RANK, linear.in_features, generator=gen) / linear.in_features**0.5
            factors[name] = (a, torch.randn(linear.out_features, RANK, generator=gen) * 0.02)
    return LoraWeights(factors, {m: 2.0 * RANK for m in factors}, base_model="SmolLM2")


def prompts(tokenizer, count: int) -> list[list[int]]:
    """Snippets of Python's own documentation, 12 to 40 tokens."""
    texts = [t for t in topics.values() if len(t) > 400]
    return [
        tokenizer(texts[i][: 100 + 7 * i])["input_ids"][: 12 + (i * 5) % 29] for i in range(count)
    ]


class EngineBatch:
    """32 sequences running in a rankwise engine; ``names[i]`` is sequence i's adapter."""

    def __init__(self, engine: Engine, prompts: list[list[int]], names: list[str | None]):
        self.engine, self.prompts, self.names = engine, prompts, names

    def start(self, length: int) -> None:
        """Submit and prefill (loading adapters into slots): nothing here is timed."""
        for p, n in zip(self.prompts, self.names, strict=True):
            request = GenerationRequest(p, n, max_tokens=length, ignore_eos=True)
            self.engine.submit(request, lambda e: None)
        while self.engine.queue.waiting:
            self.engine.step()

    def step(self) -> None:
        self.engine.step()


class HFBatch:
    """32 left-padded sequences decoded with the model's own forward and a DynamicCache."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], names: list | None):
        self.model, self.prompts = model, prompts
        self.extra = {} if names is None else {"adapter_names": names}

    @torch.no_grad()
    def start(self, length: int) -> None:
        width = max(len(p) for p in self.prompts)
        ids = torch.zeros(len(self.prompts), width, dtype=torch.long)
        self.mask = torch.zeros(len(self.prompts), width, dtype=torch.long)
        for i, p in enumerate(self.prompts):
            ids[i, width - len(p) :], self.mask[i, width - len(p) :] = torch.tensor(p), 1
        self.positions = self.mask.sum(1, keepdim=True) - 1
        self.cache = DynamicCache()
        self.forward(ids, (self.mask.cumsum(1) - 1).clamp(min=0))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        logits = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
            **self.extra,
        ).logits
        self.next = logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.next)], 1)
        self.positions = self.positions + 1
        self.forward(self.next, self.positions)


def engine(model, tokenizer, folder: Path, names: list[str], hot: int) -> tuple[Engine, list]:
    """A rankwise engine on its own copy of the model with ``names`` registered."""
    config = EngineConfig(max_batch=BATCH, hot_slots=hot, max_rank=RANK)
    served = Engine(copy.deepcopy(model), tokenizer, config)
    read_times = []
    for name in names:
        start = time.perf_counter()
        weights = read_adapter(folder / name)
        read_times.append(time.perf_counter() - start)
        served.register(name, weights)
    return served, read_times


def decode_table(args, loaded, folder: Path, names: list[str]) -> tuple[str, dict]:
    """Every variant keeps 32 sequences running; each round times ``--steps`` steps of each."""
    model, tokenizer = loaded.model, loaded.tokenizer
    batch_prompts = prompts(tokenizer, BATCH)
    mixes = {k: [names[i % k] for i in range(BATCH)] for k in (1, 8, 32)}
    engines = {k: engine(model, tokenizer, folder, names[:k], k) for k in (1, 8, 32)}
    many, read_times = engine(model, tokenizer, folder, names, BATCH)
    # Hot slots filled in shuffled order, so rows and slots do not line up by accident.
    warm = mixes[32][:]
    random.Random(0).shuffle(warm)
    engines[32][0].generate([GenerationRequest([1], n, max_tokens=1) for n in warm])
    theirs = PeftModel.from_pretrained(
        copy.deepcopy(model), folder / names[0], adapter_name=names[0]
    )
    for name in names[1:BATCH]:
        theirs.load_adapter(folder / name, adapter_name=name)
    theirs.eval()  # active adapter names[0]: PEFT's plain path for the one-adapter row
    base = Engine(model, tokenizer, EngineConfig(max_batch=BATCH))
    variants = {
        "base/engine": EngineBatch(base, batch_prompts, [None] * BATCH),
        "base/hf": HFBatch(model, batch_prompts, None),
        **{f"ours/{k}": EngineBatch(engines[k][0], batch_prompts, mixes[k]) for k in mixes},
        "ours/128": EngineBatch(many, batch_prompts, names[-BATCH:]),  # cold: loaded on admission
        "peft/1": HFBatch(theirs, batch_prompts, None),
        **{f"peft/{k}": HFBatch(theirs, batch_prompts, mixes[k]) for k in (8, 32)},
    }
    strategies = {"gathered/32": "gathered", "grouped/32": "grouped", "ours/32": "auto"}
    variants.update({key: variants["ours/32"] for key in ("gathered/32", "grouped/32")})
    length = 3 * args.rounds * args.steps + 8  # the 32-adapter batch also runs two strategies
    for key, batch in variants.items():
        if key not in ("gathered/32", "grouped/32"):
            batch.start(length)
    rates: dict[str, list[float]] = {key: [] for key in variants}
    for r in range(args.rounds):
        for key, batch in variants.items():
            engines[32][0].planner.set_strategy(strategies.get(key, "auto"))
            start = time.perf_counter()
            for _ in range(args.steps):
                batch.step()
            rates[key].append(BATCH * args.steps / (time.perf_counter() - start))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()))
    engines[32][0].planner.set_strategy("auto")
    bases = [max(a, b) for a, b in zip(rates["base/engine"], rates["base/hf"], strict=True)]

    def rate(key: str) -> str:
        return f"{statistics.median(rates[key]):.0f}"

    def ratio(key: str, to: list[float] | str = bases) -> float:
        ref = rates[to] if isinstance(to, str) else to
        return statistics.median(a / b for a, b in zip(rates[key], ref, strict=True))

    rows = [
        ["none (bare base model)", rate("base/engine"), "1.00", f"{rate('base/hf')} (no PEFT)", ""]
    ]
    for k in (1, 8, 32):
        rows.append(
            [
                f"{k} distinct",
                rate(f"ours/{k}"),
                f"{ratio(f'ours/{k}'):.2f}",
                rate(f"peft/{k}"),
                f"{ratio(f'ours/{k}', f'peft/{k}'):.1f}x",
            ]
        )
    rows.append(
        ["32 active of 128 registered", rate("ours/128"), f"{ratio('ours/128'):.2f}", "", ""]
    )
    table_strategies = [
        [label, rate(key), f"{ratio(key):.2f}"]
        for label, key in (
            ("auto (grouped + slot-major)", "ours/32"),
            ("grouped only", "grouped/32"),
            ("gathered (A[idx] + bmm)", "gathered/32"),
        )
    ]
    loads = many.pool.load_times
    stats = {
        "load_ms": 1000 * statistics.mean(loads),
        "load_max_ms": 1000 * max(loads),
        "read_ms": 1000 * statistics.mean(read_times),
        "loads": len(loads),
        "peft_ratio": ratio("peft/32"),
    }
    table = (
        markdown_table(
            [
                "adapters in the batch (32 sequences)",
                "rankwise tokens/s",
                "x bare base",
                "PEFT tokens/s",
                "rankwise / PEFT",
            ],
            rows,
        )
        + "\n\nLow-rank strategy, 32 distinct adapters:\n\n"
        + markdown_table(["strategy", "tokens/s", "x bare base"], table_strategies)
    )
    return table, stats


async def load_test(url: str, args, names: list[str], tokenizer) -> dict:
    """``--requests`` completions from ``--clients`` concurrent clients; latencies and errors."""
    rng = random.Random(1)
    texts = [t for t in topics.values() if len(t) > 200]
    jobs = [
        {
            "model": rng.choice(names) if rng.random() > 0.1 else "SmolLM2-135M-Instruct",
            "prompt": rng.choice(texts)[: rng.randint(60, 240)],
            "max_tokens": rng.randint(8, 24),
            "temperature": 0,
        }
        for _ in range(args.requests)
    ]
    latencies, errors, tokens = [], [], 0
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            job = queue.get_nowait()
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/completions", json=job)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                tokens += response.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as err:
                errors.append(repr(err))

    headers = {"Authorization": f"Bearer {KEY}"}
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, headers=headers) as http:
        await asyncio.gather(*(client(http) for _ in range(args.clients)))
        pool = (await http.get(f"{url}/admin/adapters")).json()
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "completed": len(latencies),
        "errors": errors,
        "seconds": seconds,
        "tokens": tokens,
        "p50": latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else float("nan"),
        "server_loads": pool["loads"],
        "server_load_ms": pool["mean_load_ms"],
    }


def serve_and_load(args, folder: Path, names: list[str], tokenizer) -> dict:
    command = [
        sys.executable,
        "-m",
        "rankwise.commands.serve",
        "--adapters",
        str(folder),
        "--port",
        "0",
        "--api-key",
        KEY,
        "--max-batch",
        str(BATCH),
        "--scan-interval",
        "0",
        "--log-level",
        "warning",
        *(["--threads", str(args.threads)] if args.threads else []),
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if "http://" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        result = asyncio.run(load_test(line.strip().rsplit(" ", 1)[-1], args, names, tokenizer))
    finally:
        server.send_signal(signal.SIGTERM)
        result_code = server.wait(timeout=60)
    return {**result, "exit": result_code}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument(
        "--targets",
        default="all-linear",
        help="modules every adapter adapts: all-linear, or names such as q_proj,v_proj",
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads here and in the server (default: torch's)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model()
    kinds = module_kinds(adaptable_modules(loaded.model))
    targets = kinds if args.targets == "all-linear" else args.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [f"a{i:03d}" for i in range(REGISTERED)]
        for i, name in enumerate(names):
            write_adapter(random_adapter(loaded.model, i, targets), folder / name)
        table, stats = decode_table(args, loaded, folder, names)
        http = serve_and_load(args, folder, names, loaded.tokenizer)
    lost = args.requests - http["completed"] - len(http["errors"])
    load_headers = [
        "requests",
        "completed",
        "errors",
        "lost",
        "p50 latency s",
        "p99 latency s",
        "tokens/s",
        "slot loads",
        "mean load ms",
        "SIGTERM exit",
    ]
    load_row = [
        args.requests,
        http["completed"],
        len(http["errors"]),
        lost,
        f"{http['p50']:.2f}",
        f"{http['p99']:.2f}",
        f"{http['tokens'] / http['seconds']:.0f}",
        http["server_loads"],
        f"{http['server_load_ms'] or 0:.2f}",
        http["exit"],
    ]
    body = f"""## Serving many adapters (bench/serving.py)

Machine: {machine()}. Model: embedded {loaded.name}, fp32. Adapters: rank {RANK} on
{", ".join(targets)}, random weights. 32 concurrent sequences, prompts of 12-40 tokens,
greedy. Every variant keeps its 32 sequences running; each of {args.rounds} rounds times
{args.steps} decode steps of every variant in turn. Tokens/s are medians over rounds; "x bare
base" is the median of per-round ratios to the faster bare-base run of that round (rankwise
engine, or the model's own forward with a DynamicCache). PEFT {peft.__version__} runs its
mixed-batch forward (`adapter_names`; the 1-adapter row its plain forward) in that same
DynamicCache loop; its 32-adapter batch ran at {stats["peft_ratio"]:.2f}x the bare base model.

{table}

Adapter loading: reading a PEFT folder from disk {stats["read_ms"]:.1f} ms on average; copying
it from host memory into a hot slot {stats["load_ms"]:.2f} ms on average
(max {stats["load_max_ms"]:.2f} ms, {stats["loads"]} loads).

HTTP load test: `rankwise serve` on 127.0.0.1 with {REGISTERED} adapters ({BATCH} hot slots),
{args.clients} concurrent clients, {args.requests} `/v1/completions` requests over random
adapters (10% base model), 8-24 new tokens each, greedy.

{markdown_table(load_headers, [load_row])}

Whole run: {time.perf_counter() - started:.0f} s.
"""
    if http["errors"]:
        body += "\nFirst errors: " + "; ".join(http["errors"][:3]) + "\n"
    print(body)
    write_section("serving", body)


if __name__ == "__main__":
    main()
