"""SessionManager: models loaded lazily (at most one per family) under a memory budget, or clients of
remote servers (vlm.remote), and answers followed in background threads while each family's engine (or
remote server) generates them.

UI-agnostic. The manager holds only what users share (the loaded models, each answering every request
through its engine); each user's history and cancel event belong to the caller (the Gradio session),
which starts a `Generation` per answer.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import cancellation, progress
from .conversation import Media, drop_oldest_turn, media_items, normalize
from .errors import Cancelled, ContextLengthError, InputError, OutOfMemoryError, VLMError
from .families import is_segmentation
from .media import partial_videos
from .reasoning import Report

Progress = Callable[[float, str], None]  # (fraction done, message)
POLL_SECONDS = 0.1  # how often a request waiting for a remote family's slot looks at its cancel event
# Segmentation slides model-sized windows over the image resized to a short side of ~224 pixels: the
# window count (time) and the logits (memory) grow with the aspect ratio, so very long strips are refused.
MAX_SEGMENT_ASPECT = 32


class MemoryBudgetError(VLMError):
    """A model does not fit the memory budget even with every other model unloaded."""


@dataclass(frozen=True)
class Limits:
    """Caps on one request."""

    max_new_tokens: int = 2048
    max_images: int = 8
    max_frames: int = 64
    max_seconds: float = 300.0
    max_message_chars: int = 16_000  # text of one message (or the system prompt)
    max_conversation_chars: int = 100_000  # all text of a conversation (~25k tokens: fits a 32k context)
    context_overflow: str = "error"  # a prompt longer than the context: "error", or "truncate" the oldest turns


@dataclass
class LoadedModel:
    family: str
    source: str  # what was asked for: hub repo id or local directory
    pipeline: Any
    nbytes: int  # estimated memory of the weights
    last_used: float = field(default_factory=time.monotonic)


class SessionManager:
    """Loads models on first use, one per family, evicting the least recently used ones to fit `budget`.

    `resolve(source) -> directory` finds or downloads a checkpoint, `identify(directory) -> family` reads
    its family (None: cannot tell), `estimate(directory) -> bytes` sizes it and `load(directory) -> pipeline`
    builds it; the defaults use vlm.hub, config.json and vlm.load. A chat model's engine runs up to
    `family_concurrency` requests at once (None: as many as `kv_budget_bytes` of KV cache hold, per family);
    the others wait in its queue. A segmentation model runs `family_concurrency` (or one) at a time. A
    family in `remote` is served by another server: `remote[family]()` connects a client (e.g. a vlm.remote
    RemotePipeline) that streams like a pipeline, holds no weights, counts against no budget and runs
    `remote_concurrency` requests at once (the server batches them); it has no engine.
    """

    def __init__(self, budget_bytes: int | None = None, limits: Limits = Limits(),
                 family_concurrency: int | None = None, device: str = "auto", dtype: str = "auto",
                 resolve: Callable[[str], Path] | None = None, estimate: Callable[[Path], int] | None = None,
                 load: Callable[[Path], Any] | None = None, identify: Callable[[Path], str | None] | None = None,
                 remote: Mapping[str, Callable[[], Any]] | None = None, remote_concurrency: int = 8,
                 kv_budget_bytes: int | None = None):
        self.budget = budget_bytes
        self.limits = limits
        engine = {"kv_budget_bytes": kv_budget_bytes, "max_batch": family_concurrency}
        self._resolve = resolve or _hub_resolve
        self._identify = identify or checkpoint_family
        self._estimate = estimate or (lambda directory: estimate_bytes(directory, device, dtype))
        self._load = load or (lambda directory: _vlm_load(directory, device, dtype, engine))
        self._models: dict[str, LoadedModel] = {}
        self._remote = dict(remote or {})
        self._clients: dict[str, Any] = {}  # connected remote clients by family
        self._state = threading.Lock()  # guards _models and _clients
        self._loading = threading.Lock()  # one load at a time: concurrent requests for a family load it once
        self.concurrency, self.remote_concurrency = family_concurrency, remote_concurrency
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    # -------------------------------------------------------------------------------------- models
    def get(self, family: str, source: str, progress: Progress | None = None) -> Any:
        """The pipeline of `family` loaded from `source`, loading it (once) if needed; for a remote family,
        its client (whatever `source`).

        A checkpoint of another family is refused (InputError) before anything is unloaded."""
        report = progress or (lambda fraction, message: None)
        if self.is_remote(family):
            return self._connect(family, report)
        cached = self._lookup(family, source)
        if cached is not None:
            return cached
        with self._loading:
            cached = self._lookup(family, source)
            if cached is not None:
                return cached
            report(0.0, f"Finding {source} (downloading it if needed)…")
            directory = self._resolve(source)
            found = self._identify(directory)
            if found is not None and found != family:
                raise InputError(f"{source} is a {found} checkpoint, not a {family} one: pick a checkpoint of "
                                 f"{family}, or the {found} family.")
            nbytes = self._estimate(directory)
            report(0.3, f"Estimated memory {format_bytes(nbytes)}; making room…")
            self._make_room(family, nbytes)
            report(0.4, f"Loading {family} weights ({format_bytes(nbytes)})…")
            pipeline = self._load(directory)
            with self._state:
                self._models[family] = LoadedModel(family, source, pipeline, nbytes)
            report(1.0, f"{family} loaded ({format_bytes(nbytes)}).")
            return pipeline

    def _connect(self, family: str, report: Progress) -> Any:
        with self._state:
            client = self._clients.get(family)
        if client is None:
            report(0.0, f"Connecting to the server of {family}…")
            client = self._remote[family]()
            with self._state:
                client = self._clients.setdefault(family, client)
        return client

    def loaded(self) -> dict[str, LoadedModel]:
        """A snapshot of the loaded models by family."""
        with self._state:
            return {name: replace(entry) for name, entry in self._models.items()}

    def unload(self, family: str) -> bool:
        """Forget `family`'s model or remote client (generations still running keep theirs until they end)."""
        with self._state:
            entry = self._models.pop(family, None) or self._clients.pop(family, None)
        if entry is not None:
            _free_memory()
        return entry is not None

    def _lookup(self, family: str, source: str) -> Any:
        with self._state:
            entry = self._models.get(family)
            if entry is None or entry.source != source:
                return None
            entry.last_used = time.monotonic()
            return entry.pipeline

    def _make_room(self, family: str, nbytes: int) -> None:
        """Drop `family`'s other checkpoint and the least recently used families until `nbytes` fit.

        Nothing is dropped when the model would not fit even alone.
        """
        with self._state:
            others = sorted((e for e in self._models.values() if e.family != family), key=lambda e: e.last_used)
            used = sum(e.nbytes for e in others)
            if self.budget is not None and nbytes > self.budget:
                raise MemoryBudgetError(
                    f"{family} needs about {format_bytes(nbytes)} but the memory budget is "
                    f"{format_bytes(self.budget)}; raise VLM_MEMORY_BUDGET_GB or use a smaller checkpoint.")
            evict = [family] if family in self._models else []
            for entry in others:
                if self.budget is None or used + nbytes <= self.budget:
                    break
                evict.append(entry.family)
                used -= entry.nbytes
            for name in evict:
                del self._models[name]
        if evict:
            _free_memory()

    # ------------------------------------------------------------------------------------- requests
    @contextmanager
    def slot(self, family: str, cancel: threading.Event | None = None) -> Iterator[bool]:
        """Wait for one of `family`'s slots (none for a local chat family without `family_concurrency`: its
        requests wait in its engine's queue, told their place); yields False if `cancel` was set while waiting."""
        if self.slots(family) is None:
            yield True
            return
        with self._state:
            semaphore = self._slots.setdefault(family, threading.BoundedSemaphore(self.slots(family)))
        while not semaphore.acquire(timeout=POLL_SECONDS):
            if cancel is not None and cancel.is_set():
                yield False
                return
        try:
            yield True
        finally:
            semaphore.release()

    def is_remote(self, family: str) -> bool:
        """Is `family` served by another server (no engine here)?"""
        return family in self._remote

    def slots(self, family: str) -> int | None:
        """How many of `family`'s requests run at once (None: as many as its engine's KV budget holds); a
        local chat family's engine batches them, a UI may admit as many at a time."""
        if self.is_remote(family):
            return self.remote_concurrency
        if is_segmentation(family):
            return self.concurrency or 1
        return self.concurrency

    def check_text(self, conversation: Any) -> None:
        """Raise InputError when a message or the whole conversation has more text than the caps allow
        (counted before anything is tokenized)."""
        if not isinstance(conversation, (list, tuple)):
            return  # normalize() says what is wrong with it
        total = 0
        for message in conversation:
            chars = text_chars(message)
            if chars > self.limits.max_message_chars and message.get("role") != "assistant":
                raise InputError(f"A message has {chars:,} characters; this server takes at most "
                                 f"{self.limits.max_message_chars:,} per message. Shorten it.")
            total += chars
        if total > self.limits.max_conversation_chars:
            raise InputError(f"The conversation has {total:,} characters; this server takes at most "
                             f"{self.limits.max_conversation_chars:,}. Clear the chat (or start a new one) to go on.")

    def check(self, conversation: Any, options: dict[str, Any]) -> None:
        """Raise InputError when a request exceeds the caps (text, tokens, images, video frames), and
        MemoryAdmissionError when its media would need more memory than the server has left."""
        from .admission import admit, video_frames

        self.check_text(conversation)
        tokens = options.get("max_new_tokens")
        if tokens is not None and tokens > self.limits.max_new_tokens:
            raise InputError(f"max_new_tokens is {tokens}; this server allows at most {self.limits.max_new_tokens}.")
        media = media_items(normalize(conversation))
        images = sum(m.kind == "image" for m in media)
        if images > self.limits.max_images:
            raise InputError(f"The conversation holds {images} images; this server allows at most "
                             f"{self.limits.max_images}. Clear the chat or send fewer images.")
        for item in media:
            if item.kind == "video":
                frames = video_frames(item.source, options.get("fps"), options.get("num_frames"))
                if frames > self.limits.max_frames:
                    advice = ("Ask for fewer frames" if options.get("num_frames") else
                              "Lower the video fps, or give a number of frames instead of an fps")
                    raise InputError(f"The video would use {frames} frames; this server allows at most "
                                     f"{self.limits.max_frames}. {advice}.")
        admit(conversation, options)

    def generate(self, family: str, source: str, conversation: Any, cancel: threading.Event | None = None,
                 fit_frames: bool = False, **options: Any) -> "Generation":
        """Start answering `conversation` in a background thread; see Generation. With `fit_frames`, videos
        sampled by rate are sampled at a lower one when they would exceed the frame cap (and the answer's
        notes say so: vlm.admission.fit_frame_rate)."""
        return Generation(self, family, source, conversation, options, cancel or threading.Event(), fit_frames)

    def segment(self, family: str, source: str, image: Any, labels: Any, progress: Progress | None = None,
                **options: Any) -> Any:
        """Segment `image` with `labels` (in the calling thread, within the family's concurrency limit)."""
        from .admission import admit_media

        image = segmentable(image)
        admit_media([Media("image", image)], {})
        with self.slot(family):
            return self.get(family, source, progress).segment(image, labels, **options)


# ------------------------------------------------------------------------------------------ generation
@dataclass(frozen=True)
class Stats:
    seconds_to_first_token: float | None
    tokens: int
    seconds: float  # from the request to the last token
    visual_tokens: int | None  # image and video tokens in the prompt (None: not counted or not reported)
    dropped_turns: int = 0  # oldest exchanges left out to fit the context
    notes: tuple[str, ...] = ()  # what the user should know about the inputs (e.g. a damaged video cut short)
    prompt_tokens: int | None = None
    prefilled_tokens: int | None = None  # prompt tokens run by the model (the rest came from a reused KV cache)

    @property
    def tokens_per_second(self) -> float | None:
        """Decoding speed after the first token."""
        if self.seconds_to_first_token is None or self.tokens < 2:
            return None
        decoding = self.seconds - self.seconds_to_first_token
        return (self.tokens - 1) / decoding if decoding > 0 else None


@dataclass(frozen=True)
class Snapshot:
    """What a generation has produced so far."""

    version: int
    status: str  # a line for the user while no text has arrived ("Loading…", "Waiting…")
    thinking: str
    answer: str
    done: bool = False
    finish: str | None = None  # when done: "stop" | "length" (token budget) | "cancelled" | "timeout" | "error"
    error: BaseException | None = None
    stats: Stats | None = None  # when done; while streaming, the figures so far (tokens, seconds, time to first token)
    step: progress.Step | None = None  # the work under way before the first token, with its numbers


class Generation:
    """One answer produced in a background thread; `updates()` hands its progress to the caller.

    Deltas whose `kind` attribute is "thinking" go to `thinking`, the rest to `answer`. While the request
    waits for room in its engine, the status says its place in the queue. Setting the cancel event (or
    `cancel()`) stops the model within one step, and the request's place in the engine's batch (or a remote
    family's slot) is free as soon as the pipeline returns (a request cancelled while it waits for a slot,
    for its model or in the engine's queue never starts); a request running longer than the time cap is
    cancelled with finish "timeout". Exceptions end up in `Snapshot.error`.
    """

    def __init__(self, manager: SessionManager, family: str, source: str, conversation: Any,
                 options: dict[str, Any], cancel: threading.Event, fit_frames: bool = False):
        self.family, self.source = family, source
        self._manager, self._conversation, self._options = manager, conversation, options
        self._cancel, self._fit_frames = cancel, fit_frames
        self._timed_out = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._snapshot = Snapshot(0, "Waiting for a free slot…", "", "")
        self._thread = threading.Thread(target=self._run_cancellable, name=f"vlm-session-{family}", daemon=True)
        self._thread.start()
        _generations.add(self)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def updates(self, interval: float = 0.05) -> Iterator[Snapshot]:
        """Yield a snapshot whenever something changed, at most once per `interval`, the last one done."""
        seen = -1
        while True:
            finished = self._done.wait(interval)
            if finished:  # its thread is about to end; wait until it has freed its tensors
                self._thread.join()
            snap = self.snapshot()
            if snap.version != seen:
                seen = snap.version
                yield snap
            if finished:
                return

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._snapshot = replace(self._snapshot, version=self._snapshot.version + 1, **changes)

    def _run_cancellable(self) -> None:
        with cancellation.scope(self._cancel):  # video probing and decoding, the vision encoders look at it
            self._run()

    def _run(self) -> None:
        manager = self._manager
        timer = threading.Timer(manager.limits.max_seconds, self._time_up)
        timer.daemon = True
        start = time.perf_counter()
        first: float | None = None
        texts = {"thinking": "", "answer": ""}
        tokens, report = 0, Report(None, None, None)
        finish, error, stats, notes = "stop", None, None, ()
        try:
            if self._fit_frames:
                from .admission import fit_frame_rate

                self._options, note = fit_frame_rate(self._conversation, self._options, manager.limits.max_frames)
                notes = (note,) if note else ()
            manager.check(self._conversation, self._options)
            steps = progress.Steps(len(media_items(normalize(self._conversation))),
                                   lambda step: self._update(step=step))
            timer.start()
            with manager.slot(self.family, self._cancel) as acquired:
                if acquired:
                    self._update(status=f"Loading {self.family}…")
                    pipeline = manager.get(self.family, self.source,
                                           lambda _, message: self._update(status=message))
                if acquired and not self._cancel.is_set():
                    self._update(status="Reading the inputs…")
                    start = time.perf_counter()
                    # a damaged video: its frames before the damage, said so; the steps before the first token shown
                    with partial_videos() as partial, progress.reporting(steps):
                        conversation, deltas, dropped = self._open_stream(pipeline)
                        for delta in deltas:
                            tokens = delta.tokens
                            if delta.report is not None:  # the last delta: how the request went
                                report = delta.report
                                continue
                            first = first or time.perf_counter()
                            part = "thinking" if delta.kind == "thinking" else "answer"
                            texts[part] += delta
                            live = Stats(first - start, tokens, time.perf_counter() - start, None)
                            self._update(**{part: texts[part]}, step=None, stats=live)
                        stats = Stats(None if first is None else first - start, tokens, time.perf_counter() - start,
                                      report.visual_tokens, dropped, notes + tuple(video.message for video in partial),
                                      report.prompt_tokens, steps.prefilled)
            # the family's slot (a remote one) or the request's place in the engine is free from here on
            if self._timed_out.is_set():
                finish = "timeout"
            elif self._cancel.is_set():
                finish = "cancelled"
            elif report.finish == "length":
                finish = "length"
        except Cancelled:
            finish = "timeout" if self._timed_out.is_set() else "cancelled"
        except Exception as exc:  # handed to the caller, who shows it in that user's chat
            finish, error = "error", _out_of_memory(exc) or exc
        finally:
            timer.cancel()
            if timer.is_alive():
                timer.join()
            if isinstance(error, OutOfMemoryError):  # the failed request's tensors are unreachable by now
                _free_memory()
            self._update(status="", done=True, finish=finish, error=error, stats=stats, step=None)
            self._done.set()

    def _open_stream(self, pipeline: Any) -> tuple[Any, Iterator[Any], int]:
        """Start the pipeline's stream: (conversation used, deltas, exchanges dropped).

        With `context_overflow="truncate"`, a prompt longer than the context (or than the KV budget holds)
        loses its oldest exchanges (system prompt and last question kept) until it fits; otherwise
        ContextLengthError stands.
        """
        conversation, dropped = self._conversation, 0
        queue = {} if self._manager.is_remote(self.family) else {"on_queue": self._queued}  # no engine there
        while True:
            deltas = pipeline.stream(conversation, cancel=self._cancel, **queue, **self._options)
            try:
                first = next(deltas)
            except StopIteration:
                return conversation, iter(()), dropped
            except ContextLengthError as exc:
                shorter = drop_oldest_turn(conversation) if self._manager.limits.context_overflow == "truncate" \
                    else None
                if shorter is None:
                    raise exc from None
                conversation, dropped = shorter, dropped + 1
                self._update(status=f"The conversation is longer than the context: leaving out the oldest "
                                    f"{dropped} exchange(s)…")
                continue
            return conversation, itertools.chain([first], deltas), dropped

    def _queued(self, place: int) -> None:
        """The engine's news of this request's place in its queue (0: it runs)."""
        self._update(status=f"Waiting for room: {place} request(s) ahead in the queue…" if place else
                     "Reading the prompt…")

    def _time_up(self) -> None:
        self._timed_out.set()
        self._cancel.set()


# ---------------------------------------------------------------------------------------------- helpers
_generations: "weakref.WeakSet[Generation]" = weakref.WeakSet()


@atexit.register
def _stop_generations() -> None:
    """At exit, cancel the generations still running and wait for their threads (whose vision encoders may be
    embedding a prompt), then for the engines' schedulers: see `vlm.engine.engine.stop_engines`."""
    from .engine.engine import EXIT_SECONDS, stop_engines

    running = list(_generations)
    for generation in running:
        generation.cancel()
    deadline = time.monotonic() + EXIT_SECONDS
    for generation in running:
        generation.join(max(0.0, deadline - time.monotonic()))
    stop_engines()


def _out_of_memory(exc: BaseException) -> OutOfMemoryError | None:
    """An OutOfMemoryError with advice when `exc` (or its cause) is an out-of-memory error, else None."""
    import torch

    cause: BaseException | None = exc
    while cause is not None:
        text = str(cause).lower()
        if isinstance(cause, (MemoryError, torch.OutOfMemoryError)) or (
                isinstance(cause, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)):
            return OutOfMemoryError("The server ran out of memory for this request. Try fewer or smaller images, "
                                    "fewer video frames, fewer new tokens or a shorter chat (Clear), then ask again.")
        cause = cause.__cause__
    return None


def segmentable(image: Any) -> Any:
    """`image`, refused (InputError) when its aspect ratio exceeds MAX_SEGMENT_ASPECT (read from its header,
    before anything is decoded)."""
    from .media import image_header

    header = image_header(image)
    ratio = max(header.width, header.height) / max(1, min(header.width, header.height))
    if ratio > MAX_SEGMENT_ASPECT:
        raise InputError(f"The image is {header.width}x{header.height}, a 1:{ratio:.0f} strip; segmentation takes "
                         f"aspect ratios up to 1:{MAX_SEGMENT_ASPECT}. Crop it and try again.")
    return image


def text_chars(message: Any) -> int:
    """Characters of text in a message (a string content, or its text parts)."""
    content = message.get("content") if isinstance(message, dict) else None
    parts = [content] if isinstance(content, str) else content if isinstance(content, (list, tuple)) else []
    texts = [p.get("text") if isinstance(p, dict) else p for p in parts]
    return sum(len(t) for t in texts if isinstance(t, str))


def checkpoint_family(directory: Path) -> str:
    """The family a checkpoint directory's config.json names."""
    from .checkpoint import read_config
    from .families import detect_family

    return detect_family(read_config(directory)).name


def estimate_bytes(directory: Path, device: str = "auto", dtype: str = "auto") -> int:
    """Memory of a checkpoint's weights once loaded: floating tensors in the load dtype, others as stored."""
    from .checkpoint import resolve_device, resolve_dtype, weights_bytes

    return weights_bytes(Path(directory), resolve_dtype(dtype, resolve_device(device)))


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KB"."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def _hub_resolve(source: str) -> Path:
    from .hub import resolve

    return resolve(source)


def _vlm_load(directory: Path, device: str, dtype: str, engine: dict[str, Any]) -> Any:
    from . import load
    from .pipeline import ChatPipeline

    pipeline = load(directory, device=device, dtype=dtype)
    if isinstance(pipeline, ChatPipeline):
        pipeline.engine_options.update(engine)
    return pipeline


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
