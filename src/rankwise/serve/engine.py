"""The batched multi-adapter engine: continuous batching over one base model and many adapters.

Each step admits waiting requests (up to ``max_batch`` running; their adapters loaded into hot
slots on demand), prefills them together with left padding, copies their keys and values into
the running batch's cache, and then runs one decode step for every running sequence, whatever
adapter each uses. Finished sequences leave the batch at once. The engine runs in its own thread
(``start``) or is stepped by the caller (``step``, ``generate``); the HTTP server and tests use
the same code.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rankwise.adapters.peft_format import LoraWeights
from rankwise.errors import RankwiseError
from rankwise.serve.kv import SlabCache, prefill_mask, swap_remove
from rankwise.serve.plans import Planner
from rankwise.serve.slots import HostAdapter, SlotPool
from rankwise.serve.text import TextStream

log = logging.getLogger("rankwise.serve")


class UnknownModel(RankwiseError):
    """A request named a model that is neither the base model nor a registered adapter."""


class Overloaded(RankwiseError):
    """Too many requests are running or waiting."""


class ShuttingDown(RankwiseError):
    """The engine is stopping and takes no new requests."""


@dataclass
class EngineConfig:
    """Engine limits; each is also a ``rankwise serve`` flag of the same name."""

    max_batch: int = 32  # sequences decoded together in one step
    max_queued: int = 128  # requests waiting beyond the running batch before new ones get 429
    hot_slots: int = 0  # adapters held in the layers at once; 0 means max_batch
    max_rank: int = 16  # largest adapter rank accepted; every slot is padded to it
    max_prompt_tokens: int = 2048  # longest prompt accepted
    max_new_tokens: int = 1024  # largest max_tokens accepted
    prefill_tokens: int = 2048  # padded prompt tokens prefilled per step (at least one prompt)
    strategy: str = "auto"  # how a mixed batch's low-rank term is computed (serve.plans)


@dataclass
class GenerationRequest:
    """One completion: prompt token ids, the adapter (None: base model) and sampling settings."""

    prompt: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep going past end-of-sequence (benchmarks)


@dataclass
class Chunk:
    """Text produced since the last chunk; the last chunk has ``finish_reason`` and the usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Failure:
    """The request could not be finished (the engine failed or is shutting down)."""

    message: str


Event = Chunk | Failure


@dataclass(eq=False)
class Ticket:
    """A submitted request: where its events go, and a way to cancel it."""

    request: GenerationRequest
    adapter: HostAdapter | None
    sink: Callable[[Event], None]
    cancelled: bool = False

    def cancel(self) -> None:
        """Drop the request at the next step (its client went away)."""
        self.cancelled = True


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
    """One base model answering requests for many adapters, batched."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: EngineConfig | None = None,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.dtype = next(model.parameters()).dtype
        self.planner = Planner(next(model.parameters()).device, config.strategy)
        self.pool = SlotPool(
            model, self.planner, (config.hot_slots or config.max_batch) + 1, config.max_rank
        )
        self.cache = SlabCache(model.config.num_hidden_layers, config.max_batch)
        self.adapters: dict[str, HostAdapter] = {}
        self.waiting: deque[Ticket] = deque()
        self.running: list[Running] = []  # in cache row order
        self.prefilling: list[Running] = []  # admitted, not yet in the batch
        self.lock = threading.RLock()  # held while the model runs or changes
        self.wakeup = threading.Condition()  # guards ``waiting``; signals new work
        self.thread: threading.Thread | None = None
        self.stopping = False

    # Adapters -----------------------------------------------------------------------------

    def register(self, name: str, weights: LoraWeights) -> HostAdapter:
        """Validate an adapter against the base model and make it servable as ``name``."""
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
        self.check_limits(request)
        ticket = Ticket(request, adapter, sink)
        with self.wakeup:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if (
                len(self.waiting) + len(self.running)
                >= self.config.max_batch + self.config.max_queued
            ):
                raise Overloaded(
                    f"too many requests: {len(self.running)} running and {len(self.waiting)} "
                    "waiting; retry later"
                )
            self.waiting.append(ticket)
            self.wakeup.notify()
        return ticket

    def check_limits(self, request: GenerationRequest) -> None:
        """Refuse prompts and lengths the server cannot serve, naming the limit."""
        n, limit = len(request.prompt), self.config.max_prompt_tokens
        if n == 0:
            raise RankwiseError("the prompt is empty")
        if n > limit:
            raise RankwiseError(f"the prompt has {n} tokens; this server accepts at most {limit}")
        if not 1 <= request.max_tokens <= self.config.max_new_tokens:
            raise RankwiseError(
                f"max_tokens must be between 1 and {self.config.max_new_tokens}, "
                f"got {request.max_tokens}"
            )
        if n + request.max_tokens > self.context:
            raise RankwiseError(
                f"the prompt ({n} tokens) plus max_tokens ({request.max_tokens}) exceeds the "
                f"model's context of {self.context} tokens"
            )
        if any(t < 0 or t >= self.model.config.vocab_size for t in request.prompt):
            raise RankwiseError("the prompt holds token ids outside the vocabulary")

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

    # The loop -----------------------------------------------------------------------------

    def start(self) -> None:
        """Run steps in a background thread until ``stop``."""
        self.thread = threading.Thread(target=self.loop, name="rankwise-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Finish the current step, fail what is left and end the thread."""
        with self.wakeup:
            self.stopping = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()

    def loop(self) -> None:
        while True:
            with self.wakeup:
                while not (self.waiting or self.running or self.stopping):
                    self.wakeup.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                self.fail_all("internal error while generating; see the server log")
        self.fail_all("the server is shutting down")

    def fail_all(self, message: str) -> None:
        """Fail every running and waiting request and empty the batch."""
        with self.lock:
            with self.wakeup:
                tickets = [s.ticket for s in self.running + self.prefilling] + list(self.waiting)
                self.waiting.clear()
            self.pool.pins = [0] * self.pool.slots
            self.running, self.prefilling = [], []
            self.cache.keep(torch.zeros(0, dtype=torch.long))
        for ticket in tickets:
            send(ticket, Failure(message))

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit and prefill waiting requests, then decode one token for every running one.

        Runs in inference mode: the KV cache and every tensor of a step are inference tensors,
        and nothing outside ``step`` computes with them.

        Returns whether work is left (running or waiting requests).
        """
        with self.lock:
            self.drop_cancelled()
            admitted = self.admit()
            if admitted:
                self.prefill(admitted)
            if self.running:
                self.decode()
            return bool(self.running or self.waiting)

    def drop_cancelled(self) -> None:
        with self.wakeup:
            if any(t.cancelled for t in self.waiting):
                self.waiting = deque(t for t in self.waiting if not t.cancelled)
        self.leave({i for i, s in enumerate(self.running) if s.ticket.cancelled})

    def admit(self) -> list[Running]:
        """Take waiting requests in order while the batch, the prefill budget and slots allow."""
        with self.wakeup:
            candidates = list(self.waiting)
        admitted: list[Running] = []
        longest = 0
        for ticket in candidates:
            if len(self.running) + len(admitted) >= self.config.max_batch:
                break
            length = max(longest, len(ticket.request.prompt))
            if admitted and length * (len(admitted) + 1) > self.config.prefill_tokens:
                break
            slot = self.pool.acquire(ticket.adapter)
            if slot is None:  # every slot is held by a running sequence: wait for one
                continue
            longest = length
            admitted.append(self.start_sequence(ticket, slot))
        with self.wakeup:
            for seq in admitted:
                self.waiting.remove(seq.ticket)
        self.prefilling = admitted
        return admitted

    def start_sequence(self, ticket: Ticket, slot: int) -> Running:
        request = ticket.request
        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is not None:
                generator.manual_seed(request.seed)
            else:
                generator.seed()
        return Running(ticket, slot, TextStream(self.tokenizer, request.stop), generator)

    def prefill(self, seqs: list[Running]) -> None:
        """Run the new prompts together (left-padded), sample their first tokens, join the batch."""
        width = max(len(s.ticket.request.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        valid = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, seq in enumerate(seqs):
            prompt = seq.ticket.request.prompt
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            valid[i, width - len(prompt) :] = True
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.planner.forward([s.slot for s in seqs], width):
            logits = self.model(
                input_ids=ids,
                attention_mask=prefill_mask(valid, self.dtype),
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        done = self.advance(seqs, logits)
        keep = [i for i in range(len(seqs)) if i not in done]
        for i in done:
            self.pool.release(seqs[i].slot)
        if keep:
            rows = torch.tensor(keep)
            kv = [(layer.keys[rows], layer.values[rows]) for layer in cache.layers]
            self.cache.join(kv, valid[rows])
            self.running.extend(seqs[i] for i in keep)
        self.prefilling = []

    def decode(self) -> None:
        """One token for every running sequence."""
        ids = torch.tensor([[s.tokens[-1]] for s in self.running])
        positions = torch.tensor([[s.position] for s in self.running])
        mask = self.cache.decode_mask(self.dtype)
        with self.planner.forward([s.slot for s in self.running], 1):
            logits = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        self.cache.advance(1)
        self.leave(self.advance(self.running, logits))

    def leave(self, rows: set[int]) -> None:
        """Remove finished or cancelled rows from the batch and unpin their slots."""
        if not rows:
            return
        for i in rows:
            self.pool.release(self.running[i].slot)
        order = swap_remove(len(self.running), rows)
        self.cache.keep(torch.tensor(order, dtype=torch.long))
        self.running = [self.running[i] for i in order]

    def advance(self, seqs: list[Running], logits: torch.Tensor) -> set[int]:
        """Append one sampled token to each sequence, send text; the indices that finished."""
        tokens = sample(logits, seqs)
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
                send(seq.ticket, Chunk(text, finish, **usage))
            elif text:
                send(seq.ticket, Chunk(text))
        return done


def sample(logits: torch.Tensor, seqs: list[Running]) -> list[int]:
    """Greedy for temperature 0, else nucleus sampling with each request's own generator."""
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        request = seq.ticket.request
        if request.temperature > 0:
            probs = torch.softmax(logits[i].float() / request.temperature, -1)
            if request.top_p < 1:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs > request.top_p
                probs[order[outside]] = 0
            tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens


def send(ticket: Ticket, event: Event) -> None:
    """Deliver an event; a sink that fails (its client is gone) cancels the request."""
    try:
        ticket.sink(event)
    except Exception:
        log.debug("dropping an event for a request whose receiver is gone", exc_info=True)
        ticket.cancel()


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a sequence: the generation config's and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found
