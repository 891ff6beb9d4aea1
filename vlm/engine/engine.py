"""The Engine: one loaded chat model serving every request at once (see the package docstring)."""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import cancellation
from ..caching import Prefix, PrefixPool
from ..errors import Cancelled, KVBudgetError
from ..generation import Decoding, LogitsProcessor, Sampling
from ..layers.attention import KVCache, Rows
from ..model import ChatModel, request_ids
from .pace import Pace
from .turns import Turns

TOKEN, END, ERROR = "token", "end", "error"
EXIT_SECONDS = 10  # how long the interpreter's exit waits for a scheduler to leave its step
_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@dataclass
class Request:
    """One conversation's model inputs (as its family's processor built them, on the model's device) and
    how to answer it."""

    inputs: Mapping[str, Any]
    sampling: Sampling
    stop_ids: frozenset[int]
    processors: Sequence[LogitsProcessor] = ()  # applied to this request's logits before sampling
    cancel: threading.Event | None = None
    deadline: float | None = None  # time.monotonic() after which the answer ends with "timeout"
    on_queue: Callable[[int], None] | None = None  # told the request's place in the queue as it changes (0: running)
    on_prompt: Callable[[int, int], None] | None = None  # told (prompt positions in the cache, prompt length)


class Handle:
    """A submitted request: iterating it yields its token ids as they are generated (a stop id last, if
    it stopped), then `finish_reason` says why it ended: "stop", "length", "cancelled" or "timeout". A
    failure in the model is raised to the iterating thread."""

    def __init__(self):
        self.visual_tokens: int | None = None  # image and video positions in the prompt, once it is embedded
        self.position: int | None = None  # place in the queue while waiting, 0 while running, None when over
        self.finish_reason: str | None = None
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def __iter__(self) -> "Handle":
        return self

    def __next__(self) -> int:
        kind, value = self._items.get()
        if kind == TOKEN:
            return value
        self._items.put((kind, value))  # iterating again ends again
        if kind == ERROR:
            raise value
        raise StopIteration

    def cancel(self) -> None:
        """End the request within one step (its tokens so far stay delivered)."""
        self._cancelled.set()

    def _end(self, reason: str) -> None:
        self.finish_reason, self.position = reason, None
        self._items.put((END, reason))

    def _fail(self, error: BaseException) -> None:
        self.finish_reason, self.position = "error", None
        self._items.put((ERROR, error))


class _Sequence:
    """The engine's state of one request: its prompt, how much of it the cache holds, its decoding."""

    def __init__(self, request: Request, handle: Handle, embeds: torch.Tensor, content: torch.Tensor,
                 extras: dict[str, Any]):
        self.request, self.handle = request, handle
        self.ids = request_ids(request.inputs)
        self.positions = request.inputs["positions"][:, 0]  # (P, L)
        self.embeds, self.content, self.extras = embeds, content, extras
        self.first_decoded = int(request.inputs["next_position"][0])  # position of the first generated token
        self.next_position = self.first_decoded
        self.decoding = Decoding(self.ids, request.sampling, request.stop_ids, request.processors)
        self.cache: KVCache | None = None
        self.done = 0  # prompt positions in the cache
        self.started = False  # whether a step has read (or is reading) rows of its prompt
        self.pending: int | None = None  # the last token picked, not yet in the cache

    @property
    def prompt_length(self) -> int:
        return self.ids.shape[0]

    def tell_prompt(self) -> None:
        if self.request.on_prompt is not None:
            self.request.on_prompt(self.done, self.prompt_length)

    def ended(self, now: float) -> str | None:
        return _over(self.request, self.handle, now)

    def prefix(self) -> Prefix:
        """The cache with the token ids, positions (P, n) and content ids of its n positions."""
        n = self.cache.length
        decoded = torch.arange(self.first_decoded, self.first_decoded + max(0, n - self.prompt_length),
                               device=self.positions.device).expand(self.positions.shape[0], -1)
        positions = torch.cat([self.positions[:, :n], decoded], dim=1)
        content = torch.cat([self.content[:n], self.content.new_zeros(max(0, n - self.prompt_length))])
        return Prefix(self.decoding.history[0, :n].clone(), positions, content, self.cache)


def _over(request: Request, handle: Handle, now: float) -> str | None:
    """Why a request is over before its answer ends: "cancelled", "timeout" (its deadline passed), or None."""
    if handle._cancelled.is_set() or (request.cancel is not None and request.cancel.is_set()):
        return "cancelled"
    if request.deadline is not None and now >= request.deadline:
        return "timeout"
    return None


class _AllOver:
    """Set (`is_set()`, as a `vlm.cancellation` scope reads it) once every one of the requests is over: the
    work done for them (embedding a prompt, a step's layers) then stops at its next check."""

    def __init__(self, requests: list[tuple[Request, Handle]]):
        self.requests = requests

    def is_set(self) -> bool:
        now = time.monotonic()
        return all(_over(request, handle, now) is not None for request, handle in self.requests)


@dataclass
class _Step:
    decodes: list[_Sequence]
    prompts: list[tuple[_Sequence, int]]  # (sequence, prompt rows this step)


class Engine:
    """Serves every request for one model from a scheduler thread (started on demand, gone when idle).

    `kv_budget_bytes` bounds the KV caches of running requests plus those kept for reuse (default: a
    share of the free memory); `max_batch` bounds how many requests run at once (default: what the
    budget holds); `chunk_tokens` fixes the prompt rows of a step that also decodes (default: measured,
    see `Pace`, with `prefill_ratio`).
    """

    def __init__(self, model: ChatModel, kv_budget_bytes: int | None = None, max_batch: int | None = None,
                 chunk_tokens: int | None = None, prefill_ratio: float = 0.6):
        self.model = model
        self.spec = model.cache_spec()
        self.kv_budget = kv_budget_bytes if kv_budget_bytes is not None else default_kv_budget(self.spec.device)
        self.max_batch = max_batch
        self.prefixes = PrefixPool()
        self.pace = Pace(prefill_ratio, chunk_tokens)
        self.turns = Turns(model.encoder_modules(), self.pace.encoder_slice)
        self._lock = threading.Lock()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._reserved = 0  # bytes of the running requests' caches
        self._thread: threading.Thread | None = None  # the scheduler thread while it serves
        self._threads: list[threading.Thread] = []  # those started and not yet gone (one may still free its step)
        _engines.add(self)

    # ------------------------------------------------------------------------------------------ public
    def submit(self, request: Request) -> Handle:
        """Embed the request's prompt in the calling thread (its vision modules taking turns with the
        running steps), queue it and return its handle (ended "cancelled" at once when the request is
        cancelled while its prompt is embedded). Raises what embedding raises (e.g. InputError), and
        KVBudgetError for a request that could never fit the KV budget."""
        ids = request_ids(request.inputs)
        need = self.spec.nbytes(ids.shape[0] + request.sampling.max_new_tokens)
        if need > self.kv_budget:
            raise KVBudgetError(
                f"This request needs {need / 2**20:.0f} MB of KV cache ({ids.shape[0]} prompt tokens + "
                f"{request.sampling.max_new_tokens} new ones); this server allows {self.kv_budget / 2**20:.0f} MB. "
                "Ask for fewer new tokens, shorten the conversation, or use fewer or smaller images or frames.")
        handle = Handle()
        with torch.inference_mode(), cancellation.scope(_AllOver([(request, handle)])):
            try:
                with self.turns.embedding():
                    embedded = self.model.embed(request.inputs)
            except Cancelled:
                handle._end(_over(request, handle, time.monotonic()) or "cancelled")
                return handle
        handle.visual_tokens = int((embedded.content != 0).sum())
        sequence = _Sequence(request, handle, embedded.embeds, embedded.content, embedded.extras)
        with self._lock:
            self._waiting.append(sequence)
            self._tell_positions()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="vlm-engine", daemon=True)
                self._thread.start()
                self._threads = [t for t in self._threads if t.is_alive()] + [self._thread]
        return handle

    def active(self) -> int:
        """Requests waiting or running."""
        with self._lock:
            return len(self._waiting) + len(self._running)

    def clear(self) -> None:
        """Forget the KV caches kept for reuse."""
        self.prefixes.clear()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel every request and wait (up to `timeout` seconds) for the scheduler thread to end."""
        with self._lock:
            for sequence in [*self._waiting, *self._running]:
                sequence.handle.cancel()
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:  # until each has freed its last step's tensors too
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # --------------------------------------------------------------------------------------- scheduler
    def _serve(self) -> None:
        """The scheduler thread: steps while there are requests, then ends."""
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        self._end_requests()
                        self._admit()
                        if not self._running:
                            self._thread = None
                            return
                        step = self._plan()
                    self._run(step)
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            with self._lock:
                for sequence in [*self._waiting, *self._running]:
                    self._finish(sequence, error=exc)
                self._thread = None
            raise

    def _end_requests(self) -> None:
        now = time.monotonic()
        for sequence in [*self._waiting, *self._running]:
            reason = sequence.ended(now)
            if reason is not None:
                self._finish(sequence, reason)

    def _admit(self) -> None:
        """Start waiting requests in order while the batch and the KV budget have room."""
        while self._waiting and (self.max_batch is None or len(self._running) < self.max_batch):
            sequence = self._waiting[0]
            capacity = sequence.prompt_length + sequence.request.sampling.max_new_tokens
            reused = self.prefixes.take(sequence.ids, sequence.positions, sequence.content)
            size = max(reused[0].cache.nbytes if reused else 0, self.spec.nbytes(capacity))
            while self._reserved + self.prefixes.nbytes + size > self.kv_budget and self.prefixes.evict():
                pass
            if self._reserved + self.prefixes.nbytes + size > self.kv_budget:
                if reused:
                    self.prefixes.put(reused[0])
                break
            self._waiting.popleft()
            try:
                sequence.cache, sequence.done = self._allocate(capacity, reused)
            except (MemoryError, torch.OutOfMemoryError) as exc:  # the budget exceeds what the device has
                self._finish(sequence, error=exc)
                continue
            self._reserved += sequence.cache.nbytes
            self._running.append(sequence)
            sequence.tell_prompt()
        if self._waiting and not self._running:  # cannot happen (submit checks the budget); never hang
            self._finish(self._waiting[0], error=KVBudgetError("This request does not fit the KV budget."))
        self._tell_positions()

    def _allocate(self, capacity: int, reused: tuple[Prefix, int] | None) -> tuple[KVCache, int]:
        """A cache for `capacity` positions, and how many of them are already filled (from a reused prefix)."""
        if reused is None:
            return self.spec.new(capacity), 0
        (*_, cache), keep = reused
        cache.truncate(keep)
        cache.reserve(capacity)
        return cache, keep

    def _plan(self) -> _Step:
        decodes = [s for s in self._running if s.pending is not None]
        # prompts not begun first: each one's first chunk is read at once (`Pace.prompt_rows`, fresh)
        reading = sorted((s for s in self._running if s.pending is None), key=lambda s: s.started)
        pending = sum(s.prompt_length - s.done for s in reading)
        budget = self.pace.prompt_rows(len(decodes), pending, fresh=not reading[0].started) if pending else 0
        prompts = []
        for sequence in reading:
            rows = min(sequence.prompt_length - sequence.done, budget)
            if rows > 0:
                prompts.append((sequence, rows))
                sequence.started = True
                budget -= rows
        return _Step(decodes, prompts)

    def _run(self, step: _Step) -> None:
        """One forward over the step's rows, then a token for every request that decoded or finished its
        prompt and is not over. A step whose requests are all cancelled (or out of time) meanwhile stops
        between two layers; the next step drops them."""
        started = time.perf_counter()
        over = _AllOver([(s.request, s.handle) for s in [*step.decodes, *(s for s, _ in step.prompts)]])
        try:
            with self.turns.scheduler(), cancellation.scope(over):
                logits, emitting = self._forward(step)
        except Cancelled:
            return
        except Exception as exc:  # a new prompt is the likely cause: those fail, decoding goes on next step
            culprits = [s for s, _ in step.prompts] if step.decodes and step.prompts else \
                [*step.decodes, *(s for s, _ in step.prompts)]
            with self._lock:
                for sequence in culprits:
                    self._finish(sequence, error=exc)
            return
        self.pace.observe(len(step.decodes), sum(rows for _, rows in step.prompts), time.perf_counter() - started)
        with self._lock:
            for sequence in step.decodes:
                sequence.next_position += 1
            for sequence, rows in step.prompts:
                sequence.done += rows
                sequence.tell_prompt()
                if sequence.done == sequence.prompt_length:
                    sequence.embeds = None  # in the cache now
            now = time.monotonic()
            argmax = logits.argmax(-1).tolist() if any(s.decoding.greedy for s in emitting) else []
            for row, sequence in enumerate(emitting):
                if sequence.ended(now) is not None:  # ends before the next step, without this token
                    continue
                decoding = sequence.decoding
                try:
                    sequence.pending = decoding.record(argmax[row]) if decoding.greedy else \
                        decoding.pick(logits[row:row + 1])
                except Exception as exc:
                    self._finish(sequence, error=exc)
                    continue
                sequence.handle._items.put((TOKEN, sequence.pending))
                if sequence.decoding.finish is not None:
                    self._finish(sequence, sequence.decoding.finish)

    def _forward(self, step: _Step) -> tuple[torch.Tensor, list[_Sequence]]:
        """Logits (R, V) of the rows that pick a token, and whose they are."""
        device = self.spec.device
        parts, positions, caches, counts, extras, last = [], [], [], [], [], []
        if step.decodes:
            tokens = torch.tensor([s.pending for s in step.decodes], device=device)
            parts.append(self.model.embed_tokens(tokens))
            axes = step.decodes[0].positions.shape[0]
            positions.append(torch.tensor([s.next_position for s in step.decodes], device=device).expand(axes, -1))
            last += range(len(step.decodes))
        for s in step.decodes:
            caches.append(s.cache), counts.append(1), extras.append(s.extras)
        offset = len(step.decodes)
        for s, rows in step.prompts:
            parts.append(s.embeds[s.done:s.done + rows])
            positions.append(s.positions[:, s.done:s.done + rows])
            caches.append(s.cache), counts.append(rows), extras.append(s.extras)
            offset += rows
            if s.done + rows == s.prompt_length:
                last.append(offset - 1)
        hidden = self.model.forward(torch.cat(parts), torch.cat(positions, dim=1), Rows(caches, counts, extras))
        emitting = [*step.decodes, *(s for s, rows in step.prompts if s.done + rows == s.prompt_length)]
        return self.model.logits(hidden[last]), emitting

    def _finish(self, sequence: _Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        """End a request (the lock is held): its cache goes to the prefix pool unless it failed."""
        if sequence in self._running:
            self._running.remove(sequence)
            self._reserved -= sequence.cache.nbytes
            if error is None and sequence.cache.length:
                self.prefixes.put(sequence.prefix())
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        sequence.cache = sequence.embeds = None
        if error is not None:
            sequence.handle._fail(error)
        else:
            sequence.handle._end(reason)

    def _tell_positions(self) -> None:
        for place, sequence in enumerate([*self._running, *self._waiting]):
            position = max(0, place + 1 - len(self._running))
            if sequence.handle.position != position:
                sequence.handle.position = position
                if sequence.request.on_queue is not None:
                    sequence.request.on_queue(position)


def default_kv_budget(device: torch.device) -> int:
    """Half the free memory of a GPU, else a quarter of the memory the system has available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as info:
            available = next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        available = 8 << 30
    return available // 4


@atexit.register
def stop_engines() -> None:
    """At exit, end the schedulers between two steps: a daemon thread still inside a torch op (even one
    freeing a tensor) while the interpreter finalizes aborts the process ("terminate called without an
    active exception")."""
    for engine in list(_engines):
        engine.stop(EXIT_SECONDS)
