"""Which Gradio sessions the server keeps, and when a session ends.

Gradio keeps the state of every session (the gr.State values and its own copy of the page, ~50 KB) and by
default drops the oldest session beyond a count, so a flood of one-call API sessions pushes out a real
user's chat. Here sessions are bounded by count, by the bytes their state holds, and by idle time. When
over a bound, sessions are dropped least recently used first: empty ones (nothing is lost), then those
unused for `keep_seconds`. A session that is running an event, or holds something and was used within
`keep_seconds`, is never dropped for another one: a new session that finds no room is refused (its user
is told to try again). A session ends when it is dropped, unused for `idle_seconds`, or its tab closes;
`on_end` then deletes its uploads. The chat tab tells a user whose session was dropped (vlm/ui/chat.py).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError

SESSION_BYTES = 64 * 1024  # Gradio's own part of a session: a copy of the page's configuration
SWEEP_SECONDS = 1.0  # idle sessions and the memory bound are looked at at most this often (and for new sessions)


@dataclass(frozen=True)
class SessionLimits:
    capacity: int = 1000  # sessions kept
    memory_bytes: int = 512 * 2**20  # what their states hold, SESSION_BYTES each at least
    idle_seconds: float = 3600.0  # a session unused this long ends
    keep_seconds: float = 600.0  # a session used this recently is not dropped for another one


class Sessions:
    """The policy, installed on the StateHolder of a launched Gradio app (`install`)."""

    def __init__(self, limits: SessionLimits = SessionLimits(), on_end: Callable[[str], None] = lambda session: None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits, self.on_end, self.clock = limits, on_end, clock
        self.holder: Any = None
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}  # session -> when it was last used (monotonic)
        self._running: Counter[str] = Counter()  # session -> requests of it being processed
        self._refused: set[str] = set()  # new sessions that found no room (kept until the next one comes)
        self._swept = 0.0

    def install(self, holder: Any) -> None:
        """Replace the holder's eviction (Gradio's StateHolder.update, called on every use of a session)."""
        self.holder = holder
        holder.update = self.update

    # ------------------------------------------------------------------------- called by Gradio and the gate
    def update(self, session: str) -> None:
        """`session` is being used (Gradio just looked it up, creating it if new): enforce the bounds."""
        now = self.clock()
        data = self.holder.session_data
        with self.holder.lock:
            new = session not in self._used or session in self._refused
            self._used[session] = now
            if session in data:
                data.move_to_end(session)
            ended = self._enforce(session, now) if new or now - self._swept >= SWEEP_SECONDS else []
        for gone in ended:
            self.on_end(gone)

    def admit(self, session: str) -> None:
        """Raise InputError when `session` was refused for lack of room."""
        if session in self._refused:
            raise InputError("The server holds as many conversations as it can right now; try again in a few "
                             "minutes.")

    def enter(self, session: str) -> None:
        with self._lock:
            self._running[session] += 1

    def leave(self, session: str) -> None:
        with self._lock:
            self._running[session] -= 1
            if self._running[session] <= 0:
                del self._running[session]

    def end(self, session: str) -> None:
        """`session` is over (its tab closed): forget its state and delete its uploads."""
        with self.holder.lock:
            self._drop(session)
        self.on_end(session)

    # ----------------------------------------------------------------------------------------- policy
    def _enforce(self, current: str, now: float) -> list[str]:
        """Drop idle sessions, then sessions as needed to fit the bounds; the sessions that ended. A new
        (empty) `current` session that still finds no room is refused; it stays (Gradio is looking it up)
        until the next session drops it."""
        self._swept = now
        limits, data = self.limits, self.holder.session_data
        ended = [s for s in list(data) if s != current and not self._busy(s)
                 and now - self._used.get(s, now) > limits.idle_seconds]
        sizes = {s: session_bytes(state) for s, state in data.items() if s not in ended}

        def full() -> bool:
            return len(sizes) > limits.capacity or sum(sizes.values()) > limits.memory_bytes

        candidates = [s for s in sizes if s != current and not self._busy(s)]  # least recently used first
        empty = [s for s in candidates if sizes[s] <= SESSION_BYTES]
        unused = [s for s in candidates if s not in empty and now - self._used.get(s, 0) >= limits.keep_seconds]
        for session in empty + unused:
            if not full():
                break
            ended.append(session)
            del sizes[session]
        for session in ended:
            self._drop(session)
        if full() and sizes.get(current, 0) <= SESSION_BYTES:
            self._refused.add(current)
        else:
            self._refused.discard(current)
        return ended

    def _busy(self, session: str) -> bool:
        """Running a request, or an answer of it is being written."""
        state = self.holder.session_data.get(session)
        values = state.state_data.values() if state is not None else ()
        return self._running[session] > 0 or any(getattr(v, "busy", False) for v in values)

    def _drop(self, session: str) -> None:
        self.holder.session_data.pop(session, None)
        self.holder.time_last_used.pop(session, None)
        self._used.pop(session, None)
        self._refused.discard(session)


def session_bytes(state: Any) -> int:
    """Estimated memory of a Gradio SessionState: Gradio's part and what its gr.State values hold."""
    return SESSION_BYTES + sum(state_bytes(value) for value in state.state_data.values())


def state_bytes(value: Any) -> int:
    """Bytes a gr.State value holds: its `nbytes` if it has one, else the tensors and images among its fields."""
    import torch
    from PIL import Image

    if value is None:
        return 0
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    fields = vars(value).values() if hasattr(value, "__dict__") else ()
    return sum(f.nbytes if isinstance(f, torch.Tensor) else f.width * f.height * len(f.getbands())
               if isinstance(f, Image.Image) else 0 for f in fields)
