"""Whether a kernel call splits its work over the intra-op threads or runs on the calling thread.

On a quiet machine two threads read the weights faster. When other processes keep the cores busy, every
barrier of a parallel call can wait a whole time slice for the other thread to be scheduled, and one thread is
several times faster (measured here, llava_onevision_0.5b int8 under load average 4-7: 15 tok/s on one thread,
1.5 on two). A `ThreadChoice` per call site times both (an exponential average of each), uses the faster and tries
the other again now and then (that one call's time then stands for it): every MIN_INTERVAL calls, twice as
rarely each time it loses (up to MAX_INTERVAL), so trying costs little under a lasting load and the choice
follows the load when it changes.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import torch

MIN_INTERVAL, MAX_INTERVAL = 16, 512
T = TypeVar("T")


class ThreadChoice:
    def __init__(self):
        self.seconds: dict[bool, float | None] = {True: None, False: None}
        self.interval, self.countdown, self.trying = MIN_INTERVAL, MIN_INTERVAL, False

    def choose(self) -> bool:
        """Whether the next call runs parallel."""
        if torch.get_num_threads() == 1:
            return False
        for parallel, seconds in self.seconds.items():
            if seconds is None:
                return parallel
        faster = self.seconds[True] <= self.seconds[False]
        self.countdown -= 1
        self.trying = self.countdown <= 0
        return faster != self.trying

    def record(self, parallel: bool, seconds: float) -> None:
        average = self.seconds[parallel]
        # a try replaces its mode's average, which dates from before the last change of load
        self.seconds[parallel] = seconds if average is None or self.trying else 0.75 * average + 0.25 * seconds
        if self.trying:
            lost = self.seconds[parallel] > self.seconds[not parallel]
            self.interval = min(2 * self.interval, MAX_INTERVAL) if lost else MIN_INTERVAL
            self.countdown, self.trying = self.interval, False

    def run(self, call: Callable[[bool], T]) -> T:
        """call(parallel), timed."""
        parallel = self.choose()
        start = time.perf_counter()
        out = call(parallel)
        self.record(parallel, time.perf_counter() - start)
        return out
