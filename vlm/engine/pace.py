"""How much prompt work the engine takes on while other requests decode, measured as it runs.

A step that decodes D requests and prefills C prompt rows costs about a decode step plus C times the cost
of a prompt row (the weights are read once for all rows). Giving each such step `ratio` x a decode step
of prompt work keeps running answers at 1 / (1 + ratio) of their pace while a prompt is read, whatever
the model and the machine: on a 2-core CPU that is a few tokens of prompt per step, on a GPU hundreds.
"""

from __future__ import annotations

FIRST_GUESS_ROWS = 16  # prompt rows per decoding step before anything is measured
FIRST_GUESS_SECONDS = 0.05  # a decode step's time before one is measured
SMOOTHING = 0.3  # weight of the newest measurement in the running averages


class Pace:
    """Prompt rows per step (`prompt_rows`) and vision encoders' time slices (`encoder_slice`), from the
    steps' measured durations (`observe`). `fixed` rows per step (tests) turn the measurement off."""

    def __init__(self, ratio: float = 0.75, fixed: int | None = None, most: int = 2048):
        self.ratio, self.fixed, self.most = ratio, fixed, most
        self.decode_seconds: float | None = None  # a step that only decodes
        self.row_seconds: float | None = None  # what one more prompt row adds to a step

    def prompt_rows(self, decoding: bool) -> int:
        """Prompt rows the next step may take: `most` when nothing decodes, else about `ratio` decode steps' worth."""
        if self.fixed is not None:
            return self.fixed
        if not decoding:
            return self.most
        if self.decode_seconds is None or not self.row_seconds:
            return FIRST_GUESS_ROWS
        return max(1, min(self.most, int(self.ratio * self.decode_seconds / self.row_seconds)))

    def encoder_slice(self) -> float:
        """Seconds an embedding thread may compute before handing the turn back to a waiting scheduler."""
        return self.ratio * (self.decode_seconds or FIRST_GUESS_SECONDS)

    def observe(self, decode_rows: int, prompt_rows: int, seconds: float) -> None:
        if not prompt_rows:
            self.decode_seconds = _average(self.decode_seconds, seconds)
        elif not decode_rows:
            self.row_seconds = _average(self.row_seconds, seconds / prompt_rows)  # an upper bound: no decode step to subtract
        elif self.decode_seconds is not None:
            self.row_seconds = _average(self.row_seconds, max(seconds - self.decode_seconds, 0.0) / prompt_rows)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
