"""vlm.kernels.pace: a kernel call site keeps the faster of parallel and single-threaded calls and tries the
other again, more rarely while it keeps losing, sooner once it wins."""

from __future__ import annotations

import torch

from vlm.kernels import pace as pace_module
from vlm.kernels.pace import MAX_INTERVAL, MIN_INTERVAL, Pace


def _calls(pace: Pace, seconds: dict[bool, float], count: int) -> list[bool]:
    chosen = []
    for _ in range(count):
        parallel = pace.choose()
        chosen.append(parallel)
        pace.record(parallel, seconds[parallel])
    return chosen


def test_the_faster_is_kept_and_the_other_tried_ever_more_rarely(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pace = Pace()
    chosen = _calls(pace, {True: 1.0, False: 3.0}, 2 + MIN_INTERVAL * (1 + 2 + 4))
    assert chosen[:2] == [True, False]  # each tried once
    tries = [i for i, parallel in enumerate(chosen) if not parallel][1:]
    assert [b - a for a, b in zip(tries, tries[1:])] == [2 * MIN_INTERVAL, 4 * MIN_INTERVAL]
    _calls(pace, {True: 1.0, False: 3.0}, 40 * MAX_INTERVAL)
    assert pace.interval == MAX_INTERVAL


def test_a_busy_machine_turns_the_choice_and_a_quiet_one_turns_it_back(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    pace = Pace()
    _calls(pace, {True: 1.0, False: 3.0}, 100)
    busy = _calls(pace, {True: 30.0, False: 3.0}, 100)  # parallel calls now wait for the other core
    assert busy[-50:] == [False] * 50
    quiet = _calls(pace, {True: 1.0, False: 3.0}, 2 * MAX_INTERVAL)
    assert quiet[-50:] == [True] * 50


def test_one_thread_never_runs_parallel(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not Pace().choose()


def test_run_times_the_call(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(pace_module.time, "perf_counter", lambda: next(clock))
    pace = Pace()
    assert pace.run(lambda parallel: f"parallel={parallel}") == "parallel=True"
    assert pace.seconds == {True: 2.0, False: None}
