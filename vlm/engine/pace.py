"""How much prompt work the engine takes on while other requests decode, measured as it runs.

While a prompt waits and others decode, every decode-only step earns the prompt `ratio` x that step's time
of credit; once the credit pays for a chunk of the prompt, the next step reads that chunk along with its
decodes, and spends what the chunk added to the step. Running answers thus keep about 1 / (1 + ratio) of
their pace while a prompt is read, whatever the model and the machine. A prompt's first chunk is read at
once, on credit (a debt of at most `burst_seconds` that the next chunks wait for): a short question's first
token comes one step after it arrives, and the running answers lose no more over time. The default 0.6 is
measured: on llava_onevision_0.5b two text answers kept 50-53% of their rate while a third user's image was
read (one run 22%; 47-56% on a Zen 4 EPYC, 55% once the encoders' overrun turns were repaid), 44% with
0.75. Chunks are as large as `burst_seconds` allows, because a prompt's rows are far cheaper read many at
a time (one batched matmul per weight, and on CPU the decode kernels' few-row path left alone): on a 2-core
CPU tens of rows a chunk for text, hundreds for an image; on a GPU the credit is earned in a step or two.
"""

from __future__ import annotations

FIRST_GUESS_ROWS = 16  # prompt rows per decoding step before anything is measured
FIRST_GUESS_SECONDS = 0.05  # a decode step's time before one is measured
SMOOTHING = 0.3  # weight of the newest measurement in the running averages


class Pace:
    """Prompt rows per step (`prompt_rows`) and vision encoders' time slices (`encoder_slice`), from the
    steps' measured durations (`observe`). `fixed` rows per step (tests) turn the measurement off.

    A decode step's time depends on how many requests it decodes, so it is kept per count; a prompt row's
    cost is what a chunk adds to a step that also decodes, over the decode-only step of as many requests.
    """

    def __init__(self, ratio: float = 0.6, fixed: int | None = None, most: int = 2048, burst_seconds: float = 1.0):
        self.ratio, self.fixed, self.most, self.burst_seconds = ratio, fixed, most, burst_seconds
        self.decode_seconds: dict[int, float] = {}  # requests decoded -> seconds of a step that only decodes
        self.last_decode: float | None = None  # the latest decode-only step
        self.row_seconds: float | None = None  # what one prompt row adds to a step that decodes
        self.credit = 0.0  # seconds of prompt work earned by the decode-only steps while a prompt waited

    def prompt_rows(self, decoding: int, pending: int, fresh: bool = False) -> int:
        """Prompt rows the next step reads (of `pending` waiting) while it decodes `decoding` requests: `most`
        when it decodes none, a chunk once the credit pays for it or at once for a prompt not begun (`fresh`),
        else none (the step earns credit)."""
        if self.fixed is not None:
            return self.fixed
        if not decoding:
            return self.most
        decode = self._decode(decoding)
        if decode is None or self.row_seconds is None:
            return FIRST_GUESS_ROWS
        rows = max(1, min(pending, self.most, int(self.burst_seconds / max(self.row_seconds, 1e-9))))
        if fresh or self.credit >= rows * self.row_seconds:
            return rows
        self.credit += self.ratio * decode
        return 0

    def encoder_slice(self) -> float:
        """Seconds an embedding thread may compute before handing the turn back to a waiting scheduler."""
        return self.ratio * (self.last_decode or FIRST_GUESS_SECONDS)

    def observe(self, decode_rows: int, prompt_rows: int, seconds: float) -> None:
        if not prompt_rows:
            self.decode_seconds[decode_rows] = self.last_decode = _average(self.decode_seconds.get(decode_rows), seconds)
        elif decode_rows and (decode := self._decode(decode_rows)) is not None:
            added = max(seconds - decode, 0.0)
            self.row_seconds = _average(self.row_seconds, added / prompt_rows)
            self.credit = max(-self.burst_seconds, self.credit - added)

    def _decode(self, requests: int) -> float | None:
        """A decode-only step's time for `requests` (measured, else that of the nearest count measured)."""
        if not self.decode_seconds:
            return None
        return self.decode_seconds[min(self.decode_seconds, key=lambda count: abs(count - requests))]


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
