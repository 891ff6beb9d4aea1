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
    steps' measured durations (`observe`). `fixed` rows per step (tests) turn the measurement off.

    A decode step's time depends on how many requests it decodes, so it is kept per count; a prompt row's
    cost is measured in steps that also decode (what it is used for: a prompt-only step reads rows several
    times cheaper, batched), as the step's time beyond a decode-only step of as many requests.
    """

    def __init__(self, ratio: float = 0.75, fixed: int | None = None, most: int = 2048):
        self.ratio, self.fixed, self.most = ratio, fixed, most
        self.decode_seconds: dict[int, float] = {}  # requests decoded -> seconds of a step that only decodes
        self.last_decode: float | None = None  # the latest decode-only step
        self.row_seconds: float | None = None  # what one more prompt row adds to a step that decodes

    def prompt_rows(self, decoding: int) -> int:
        """Prompt rows the next step may take while it decodes `decoding` requests: `most` when it decodes
        none, else about `ratio` decode steps' worth."""
        if self.fixed is not None:
            return self.fixed
        if not decoding:
            return self.most
        decode = self._decode(decoding)
        if decode is None or not self.row_seconds:
            return FIRST_GUESS_ROWS
        return max(1, min(self.most, int(self.ratio * decode / self.row_seconds)))

    def encoder_slice(self) -> float:
        """Seconds an embedding thread may compute before handing the turn back to a waiting scheduler."""
        return self.ratio * (self.last_decode or FIRST_GUESS_SECONDS)

    def observe(self, decode_rows: int, prompt_rows: int, seconds: float) -> None:
        if not prompt_rows:
            self.decode_seconds[decode_rows] = self.last_decode = _average(self.decode_seconds.get(decode_rows), seconds)
        elif decode_rows and (decode := self._decode(decode_rows)) is not None:
            self.row_seconds = _average(self.row_seconds, max(seconds - decode, 0.0) / prompt_rows)

    def _decode(self, requests: int) -> float | None:
        """A decode-only step's time for `requests` (measured, else that of the nearest count measured)."""
        if not self.decode_seconds:
            return None
        return self.decode_seconds[min(self.decode_seconds, key=lambda count: abs(count - requests))]


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
