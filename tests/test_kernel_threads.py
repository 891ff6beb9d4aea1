"""vlm.kernels.threads: a kernel call site keeps the faster of parallel and single-threaded calls and tries the
other again, more rarely while it keeps losing, sooner once it wins."""

from __future__ import annotations

from types import SimpleNamespace

from vlm.kernels import threads as threads_module
from vlm.kernels.threads import MAX_INTERVAL, MIN_INTERVAL, ThreadChoice


def _threads(monkeypatch, count: int) -> None:
    """The module sees `count` intra-op threads (its own torch name patched: other threads keep the real one)."""
    monkeypatch.setattr(threads_module, "torch", SimpleNamespace(get_num_threads=lambda: count))


def _calls(choice: ThreadChoice, seconds: dict[bool, float], count: int) -> list[bool]:
    chosen = []
    for _ in range(count):
        parallel = choice.choose()
        chosen.append(parallel)
        choice.record(parallel, seconds[parallel])
    return chosen


def test_the_faster_is_kept_and_the_other_tried_ever_more_rarely(monkeypatch):
    _threads(monkeypatch, 2)
    choice = ThreadChoice()
    chosen = _calls(choice, {True: 1.0, False: 3.0}, 2 + MIN_INTERVAL * (1 + 2 + 4))
    assert chosen[:2] == [True, False]  # each tried once
    tries = [i for i, parallel in enumerate(chosen) if not parallel][1:]
    assert [b - a for a, b in zip(tries, tries[1:])] == [2 * MIN_INTERVAL, 4 * MIN_INTERVAL]
    _calls(choice, {True: 1.0, False: 3.0}, 40 * MAX_INTERVAL)
    assert choice.interval == MAX_INTERVAL


def test_a_busy_machine_turns_the_choice_and_a_quiet_one_turns_it_back(monkeypatch):
    _threads(monkeypatch, 2)
    choice = ThreadChoice()
    _calls(choice, {True: 1.0, False: 3.0}, 100)
    busy = _calls(choice, {True: 30.0, False: 3.0}, 100)  # parallel calls now wait for the other core
    assert busy[-50:] == [False] * 50
    quiet = _calls(choice, {True: 1.0, False: 3.0}, 2 * MAX_INTERVAL)
    assert quiet[-50:] == [True] * 50


def test_one_thread_never_runs_parallel(monkeypatch):
    _threads(monkeypatch, 1)
    assert not ThreadChoice().choose()


def test_run_times_the_call(monkeypatch):
    _threads(monkeypatch, 2)
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(threads_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    choice = ThreadChoice()
    assert choice.run(lambda parallel: f"parallel={parallel}") == "parallel=True"
    assert choice.seconds == {True: 2.0, False: None}
