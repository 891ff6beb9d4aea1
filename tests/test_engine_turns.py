"""vlm.engine.turns: an embedding thread computes its vision modules while it holds the turn, between the
scheduler's steps, and what its turns overrun (a module longer than the slice) is repaid by skipped turns."""

from __future__ import annotations

import threading
import time

import pytest
from torch import nn

from vlm.engine.turns import Turns

pytestmark = pytest.mark.timeout(60)

STEP, SLICE, MODULE = 0.02, 0.01, 0.04  # seconds: a scheduler step, the encoders' slice, one (long) module


class Sleeping(nn.Module):
    def __init__(self, seconds: float, log: list[str]):
        super().__init__()
        self.seconds, self.log = seconds, log

    def forward(self, x):
        self.log.append("module")
        time.sleep(self.seconds)
        return x


def test_modules_longer_than_the_slice_are_repaid_by_skipped_turns():
    """Each 40 ms module overruns a 10 ms slice by 30 ms: the embedding thread then lets three more 20 ms steps
    run before its next module (without the debt it would run one module per step)."""
    log: list[str] = []
    module = Sleeping(MODULE, log)
    turns = Turns([module], lambda: SLICE)
    stop = threading.Event()

    def scheduler():
        while not stop.is_set():
            with turns.scheduler():
                log.append("step")
                time.sleep(STEP)

    thread = threading.Thread(target=scheduler)
    thread.start()
    time.sleep(0.1)
    with turns.embedding():
        for _ in range(6):
            module(None)
    stop.set()
    thread.join()
    during = log[log.index("module"):len(log) - log[::-1].index("module")]
    steps_between = during.count("step") / (during.count("module") - 1)
    assert steps_between >= 2.5, during  # (MODULE - SLICE) / SLICE = 3 repaid steps, each turn's one step
