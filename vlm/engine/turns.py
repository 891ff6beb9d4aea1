"""Turns on the compute between the engine's scheduler and the threads that embed prompts.

Encoding an image or a video can take seconds; run in one go it would stop every running answer for that
long. A thread embedding a prompt therefore computes its vision modules only while it holds the turn, and
hands it to the scheduler between two modules once it has held it for a slice of time; the scheduler
hands it back after its step. A turn checked only between modules overruns its slice by up to one module
(a ViT's attention over thousands of patches: as long as a decode step); the overrun is owed, taken off
the next slices, and a turn that owes a whole slice is skipped while the scheduler waits, so over time the
encoders take the slices' share. Decoding keeps its pace while media are encoded, and only one computation
runs at a time, so none competes with another for the cores. An embedding thread stops with
`vlm.errors.Cancelled` as soon as its request is cancelled (its `vlm.cancellation` scope), between two
modules or while it waits for the turn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn

from .. import cancellation
from ..errors import Cancelled

SCHEDULER = "scheduler"
POLL_SECONDS = 0.05  # how often a thread waiting for its turn looks at its cancel event


class Turns:
    """Who computes now: the scheduler (one step at a time) or one embedding thread (a slice at a time).

    `modules` are the ones only embedding runs (vision towers): before each of them, an embedding thread
    takes the turn if it has not, gives it up when the scheduler waits and its slice is over, and stops
    with `Cancelled` when its request is cancelled. Text-only prompts never run such a module, so they
    never wait. Embedding threads are served in order; the scheduler goes next whenever it waits.
    """

    def __init__(self, modules: Iterable[nn.Module], slice_seconds: Callable[[], float]):
        self._slice = slice_seconds
        self._changed = threading.Condition()
        self._owner: object | None = None
        self._queue: deque[object] = deque()  # embedding threads waiting for the turn, in order
        self._scheduler_waiting = False
        self._owed = 0.0  # seconds the embedding threads held the turn beyond their slices, not yet repaid
        self._local = threading.local()
        for module in modules:
            module.register_forward_pre_hook(self._before_module)

    @contextmanager
    def scheduler(self) -> Iterator[None]:
        """Hold the turn for one step of the scheduler."""
        with self._changed:
            if self._owner is None:
                self._owner = SCHEDULER
            else:
                self._scheduler_waiting = True
                self._changed.wait_for(lambda: self._owner is SCHEDULER)
        try:
            yield
        finally:
            with self._changed:
                self._hand_on()

    @contextmanager
    def embedding(self) -> Iterator[None]:
        """Mark the calling thread as embedding a prompt, until the block ends."""
        state = self._local
        state.token, state.since = object(), None
        try:
            yield
        finally:
            if state.since is not None:
                with self._changed:
                    self._owed += max(0.0, time.monotonic() - state.since - state.allowed)
                    self._hand_on()
            state.token = None

    def _before_module(self, module: nn.Module, args: tuple) -> None:
        state = self._local
        if getattr(state, "token", None) is None:  # the scheduler, or a call from outside the engine
            return
        cancellation.check()
        if state.since is None:
            self._take(state)
        elif self._scheduler_waiting and time.monotonic() - state.since >= state.allowed:
            with self._changed:
                self._owed += time.monotonic() - state.since - state.allowed
                self._hand_on()
            state.since = None
            self._take(state)

    def _take(self, state: threading.local) -> None:
        """Wait for the turn (in order), watching the request's cancellation; while the scheduler waits, skip
        turns that what is owed would use up (each repays a slice)."""
        with self._changed:
            while True:
                if self._owner is None and not self._queue and not self._scheduler_waiting:
                    self._owner = state.token
                else:
                    self._queue.append(state.token)
                    while self._owner is not state.token:
                        self._changed.wait(POLL_SECONDS)
                        if self._owner is not state.token and cancellation.requested():
                            self._queue.remove(state.token)
                            raise Cancelled("The request was cancelled.")
                turn = self._slice()
                if self._owed < turn or not self._scheduler_waiting:
                    state.allowed, self._owed = turn - self._owed, 0.0
                    break
                self._owed -= turn
                self._hand_on()
        state.since = time.monotonic()

    def _hand_on(self) -> None:
        """Give the turn away (the lock is held): after the scheduler, to the first embedding thread
        waiting; after an embedding thread, to the scheduler if it waits, else the next thread."""
        if self._owner is not SCHEDULER and self._scheduler_waiting:
            self._owner, self._scheduler_waiting = SCHEDULER, False
        else:
            self._owner = self._queue.popleft() if self._queue else None
        self._changed.notify_all()
