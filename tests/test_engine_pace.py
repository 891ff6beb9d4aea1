"""vlm.engine.pace: prompt chunks are paid for by the decode steps' credit, so running answers keep about
1 / (1 + ratio) of their pace while a prompt is read, and chunks are as large as the burst allows."""

from __future__ import annotations

import math

import pytest

from vlm.engine.pace import FIRST_GUESS_ROWS, Pace

DECODE, ROW = 0.1, 0.01  # seconds of a decode-only step, and what one prompt row adds to it


def _measured(ratio: float = 0.75, burst_seconds: float = 1.0) -> Pace:
    pace = Pace(ratio, burst_seconds=burst_seconds)
    pace.observe(2, 0, DECODE)
    pace.observe(2, 10, DECODE + 10 * ROW)
    pace.credit = 0.0
    return pace


def test_before_anything_is_measured_a_first_guess_and_alone_the_most():
    pace = Pace(most=512)
    assert pace.prompt_rows(decoding=2, pending=1000) == FIRST_GUESS_ROWS
    assert pace.prompt_rows(decoding=0, pending=1000) == 512
    assert Pace(fixed=7).prompt_rows(decoding=2, pending=1000) == 7


@pytest.mark.parametrize("pending, rows", [(1000, 100), (5, 5)])
def test_a_chunk_waits_for_the_credit_that_pays_for_it(pending, rows):
    """A chunk is min(pending, burst / row cost) rows; decode-only steps earn ratio x their time each."""
    pace = _measured()
    chosen = [pace.prompt_rows(decoding=2, pending=pending) for _ in range(200)]
    first = next(i for i, r in enumerate(chosen) if r)
    assert chosen[first] == rows and set(chosen[:first]) == {0}
    assert first == math.ceil(rows * ROW / (0.75 * DECODE) - 1e-9)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 1.0])
def test_running_answers_keep_their_pace_while_a_long_prompt_is_read(ratio):
    pace = _measured(ratio)
    decode_time = prompt_time = 0.0
    for _ in range(2000):
        rows = pace.prompt_rows(decoding=2, pending=10**6)
        seconds = DECODE + rows * ROW
        pace.observe(2, rows, seconds)
        decode_time += DECODE
        prompt_time += rows * ROW
    assert prompt_time / decode_time == pytest.approx(ratio, rel=0.1)


def test_a_decode_step_is_kept_per_number_of_requests():
    pace = Pace()
    pace.observe(1, 0, 0.05)
    pace.observe(8, 0, 0.2)
    pace.observe(8, 4, 0.2 + 4 * ROW)  # measured against the 8-request step, not the latest or the 1-request one
    assert pace.row_seconds == pytest.approx(ROW)


def test_a_prompt_not_begun_gets_its_first_chunk_at_once_and_the_next_chunk_repays_it():
    pace = _measured()
    assert pace.prompt_rows(decoding=2, pending=1000, fresh=True) == 100  # no credit yet: read on credit
    pace.observe(2, 100, DECODE + 100 * ROW)
    assert pace.credit == pytest.approx(-1.0)  # the chunk's cost (1 s), the most it may owe
    chosen = [pace.prompt_rows(decoding=2, pending=900) for _ in range(100)]
    assert next(i for i, r in enumerate(chosen) if r) == math.ceil(2 * 100 * ROW / (0.75 * DECODE) - 1e-9)


def test_arrivals_read_at_once_leave_the_running_answers_their_pace_over_time():
    pace = _measured(0.75)
    decode_time = prompt_time = 0.0
    long_prompt = 10**6
    for step in range(4000):
        fresh = step % 50 == 0  # a 5-row question arrives every 50 steps, read before the long prompt
        rows = pace.prompt_rows(decoding=2, pending=long_prompt + 5, fresh=fresh)
        if fresh:
            assert rows > 0
        seconds = DECODE + rows * ROW
        pace.observe(2, rows, seconds)
        decode_time += DECODE
        prompt_time += rows * ROW
    assert prompt_time / decode_time == pytest.approx(0.75, rel=0.1)
