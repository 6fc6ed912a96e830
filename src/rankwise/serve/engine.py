"""The batched multi-adapter engine: continuous batching over one base model and many adapters.

Each step admits waiting requests (``admission``; their adapters loaded into hot slots on
demand), prefills them together, and then decodes one token for every running sequence,
whatever adapter each uses (``runner``); finished sequences leave the batch at once. The caller
steps the engine (``step``, ``generate``) or a ``worker.EngineThread`` does; the HTTP server and
the tests use the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rankwise.adapters.peft_format import LoraWeights
from rankwise.errors import RankwiseError
from rankwise.options import Options, option
from rankwise.serve.admission import Limits, Queue
from rankwise.serve.kv import swap_remove
from rankwise.serve.plans import STRATEGIES, Planner
from rankwise.serve.requests import Chunk, Event, Failure, GenerationRequest, Ticket, UnknownModel
from rankwise.serve.runner import Runner
from rankwise.serve.sampling import eos_ids, generator_for, sample
from rankwise.serve.slots import HostAdapter, SlotPool
from rankwise.serve.text import TextStream

SHUTDOWN = Failure("the server is shutting down", "shutting_down")


AT_LEAST_ONE = "[1, inf)"


@dataclass
class EngineConfig(Options):
    """Engine limits; each is also a ``rankwise serve`` flag of the same name."""

    max_batch: int = option(32, "sequences decoded together per step", within=AT_LEAST_ONE)
    max_queued: int = option(
        128, "requests waiting beyond the batch before new ones get 429", within="[0, inf)"
    )
    hot_slots: int = option(
        0,
        "adapters held in the layers at once (0: max_batch); the rest wait in host memory",
        within="[0, inf)",
    )
    max_rank: int = option(
        16, "largest adapter rank accepted; every slot is padded to it", within=AT_LEAST_ONE
    )
    max_prompt_tokens: int = option(2048, "longest prompt accepted", within=AT_LEAST_ONE)
    max_new_tokens: int = option(1024, "largest max_tokens accepted", within=AT_LEAST_ONE)
    prefill_tokens: int = option(
        2048,
        "padded prompt tokens prefilled per step (at least one prompt)",
        within=AT_LEAST_ONE,
    )
    strategy: str = option(
        "auto", "how a mixed batch's low-rank term is computed", choices=lambda: list(STRATEGIES)
    )


@dataclass(eq=False)
class Running:
    """A sequence in the batch: its slot, position and text so far."""

    ticket: Ticket
    slot: int
    stream: TextStream
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)

    @property
    def position(self) -> int:
        """Position of the last generated token, the one the next decode step feeds."""
        return len(self.ticket.request.prompt) + len(self.tokens) - 1


class Engine:
    """One base model answering requests for many adapters, batched, on the model's device."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        self.device = next(model.parameters()).device
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.planner = Planner(self.device, config.strategy)
        self.runner = Runner(model, self.planner, config.max_batch, pad)
        self.pool = SlotPool(
            model, self.planner, (config.hot_slots or config.max_batch) + 1, config.max_rank
        )
        self.limits = Limits(
            config.max_prompt_tokens, config.max_new_tokens, self.context, model.config.vocab_size
        )
        self.queue = Queue(config.max_batch + config.max_queued)
        self.adapters: dict[str, HostAdapter] = {}
        self.running: list[Running] = []  # in cache row order
        self.prefilling: list[Running] = []  # admitted, not yet in the batch
        self.lock = threading.RLock()  # held while the model runs or changes

    # Adapters -----------------------------------------------------------------------------

    def register(self, name: str, weights: LoraWeights) -> HostAdapter:
        """Validate an adapter against the base model and make it servable as ``name``."""
        if weights.variant:
            raise RankwiseError(
                f"adapter '{name}' is a {weights.variant} adapter, which this server does not "
                "batch (it changes the base weight per adapter); serve it merged into its own "
                "copy of the base model"
            )
        too_big = {m: weights.rank(m) for m in weights.factors if weights.rank(m) > self.pool.rank}
        if too_big:
            module, rank = next(iter(too_big.items()))
            raise RankwiseError(
                f"adapter '{name}' has rank {rank} at {module}, above this server's max rank "
                f"{self.pool.rank}; restart with --max-rank {rank} or more"
            )
        adapter = HostAdapter.fold(name, weights)
        with self.lock:
            self.pool.check(weights, f"adapter '{name}'")
            self.pool.wrap(adapter)
            old = self.adapters.get(name)
            self.adapters[name] = adapter
            if old is not None:
                self.pool.forget(old)
        return adapter

    def unregister(self, name: str) -> bool:
        """Stop serving ``name``; running requests that use it still finish."""
        with self.lock:
            adapter = self.adapters.pop(name, None)
            if adapter is not None:
                self.pool.forget(adapter)
        return adapter is not None

    # Requests -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Callable[[Event], None]) -> Ticket:
        """Queue a request; raises UnknownModel, Overloaded, ShuttingDown or RankwiseError."""
        adapter = None
        if request.adapter is not None:
            adapter = self.adapters.get(request.adapter)
            if adapter is None:
                raise UnknownModel(f"the model '{request.adapter}' does not exist")
        self.limits.check(request)
        ticket = Ticket(request, adapter, sink)
        self.queue.put(ticket, len(self.running))
        return ticket

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Run requests to completion in the caller's thread, batched; their texts in order."""
        texts = [""] * len(requests)
        failures: list[str] = []

        def sink_for(i: int) -> Callable[[Event], None]:
            def sink(event: Event) -> None:
                if isinstance(event, Failure):
                    failures.append(event.message)
                else:
                    texts[i] += event.text

            return sink

        for i, request in enumerate(requests):
            self.submit(request, sink_for(i))
        while self.step():
            pass
        if failures:
            raise RankwiseError(failures[0])
        return texts

    def busy(self) -> bool:
        """Whether requests are running or waiting."""
        return bool(self.running or self.queue.waiting)

    # Steps --------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit and prefill waiting requests, then decode one token for every running one.

        Runs in inference mode: the KV cache and every tensor of a step are inference tensors,
        and nothing outside ``step`` computes with them. Once the queue is closed, waiting
        requests are answered with a shutdown failure instead of admitted.

        Returns whether work is left (running or waiting requests).
        """
        with self.lock:
            self.drop_cancelled()
            if self.queue.closed:
                self.queue.fail_waiting(SHUTDOWN)
            else:
                admitted = self.admit()
                if admitted:
                    self.prefill(admitted)
            if self.running:
                self.decode()
            return self.busy()

    def drop_cancelled(self) -> None:
        self.queue.drop_cancelled()
        self.leave({i for i, s in enumerate(self.running) if s.ticket.cancelled})

    def admit(self) -> list[Running]:
        """Waiting requests the batch, the prefill budget and the slots have room for."""
        admitted = self.queue.admit(
            self.config.max_batch - len(self.running),
            self.config.prefill_tokens,
            lambda ticket: self.pool.acquire(ticket.adapter),
        )
        self.prefilling = [self.start_sequence(ticket, slot) for ticket, slot in admitted]
        return self.prefilling

    def start_sequence(self, ticket: Ticket, slot: int) -> Running:
        request = ticket.request
        stream = TextStream(self.tokenizer, request.stop)
        return Running(ticket, slot, stream, generator_for(request, self.device))

    def prefill(self, seqs: list[Running]) -> None:
        """Run the new prompts together, sample their first tokens, join the batch."""
        logits, prefilled = self.runner.prefill(
            [s.ticket.request.prompt for s in seqs], [s.slot for s in seqs]
        )
        done = self.advance(seqs, logits)
        keep = [i for i in range(len(seqs)) if i not in done]
        for i in done:
            self.pool.release(seqs[i].slot)
        if keep:
            self.runner.join(prefilled, keep)
            self.running.extend(seqs[i] for i in keep)
        self.prefilling = []

    def decode(self) -> None:
        """One token for every running sequence."""
        seqs = self.running
        logits = self.runner.decode(
            [s.tokens[-1] for s in seqs], [s.position for s in seqs], [s.slot for s in seqs]
        )
        self.leave(self.advance(seqs, logits))

    def leave(self, rows: set[int]) -> None:
        """Remove finished or cancelled rows from the batch and unpin their slots."""
        if not rows:
            return
        for i in rows:
            self.pool.release(self.running[i].slot)
        order = swap_remove(len(self.running), rows)
        self.runner.cache.keep(order)
        self.running = [self.running[i] for i in order]

    def advance(self, seqs: list[Running], logits: torch.Tensor) -> set[int]:
        """Append one sampled token to each sequence, send text; the indices that finished."""
        tokens = sample(logits, [s.ticket.request for s in seqs], [s.generator for s in seqs])
        done = set()
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            request = seq.ticket.request
            seq.tokens.append(token)
            ended = token in self.eos and not request.ignore_eos
            if not ended:
                seq.stream.push(token)
            finish = (
                "stop" if ended else "length" if len(seq.tokens) >= request.max_tokens else None
            )
            text, stopped = seq.stream.take(final=finish is not None)
            if stopped:
                finish = "stop"
            if finish is not None:
                done.add(i)
                usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(seq.tokens)}
                seq.ticket.send(Chunk(text, finish, **usage))
            elif text:
                seq.ticket.send(Chunk(text))
        return done

    # Failing ------------------------------------------------------------------------------

    def fail_running(self, failure: Failure) -> None:
        """Answer every running (and admitted) request with ``failure``; the batch is empty."""
        with self.lock:
            tickets = [s.ticket for s in self.running + self.prefilling]
            self.running, self.prefilling = [], []
            self.pool.unpin_all()
            self.runner.cache.clear()
        for ticket in tickets:
            ticket.send(failure)

    def fail_all(self, failure: Failure) -> None:
        """Answer every running and waiting request with ``failure``."""
        self.fail_running(failure)
        self.queue.fail_waiting(failure)
