"""Progress of long work as log lines: one mechanism for every method, wherever it runs.

tqdm bars do not reach the driver from Ray actors or SuperNode subprocesses; a printed line
does (Ray forwards actor stdout, ``flwr run --stream`` and SuperNode logs show it). A line is
written at most every ``interval`` seconds, and at the end:

    [party 1] psg stage 2: step 300/1000 (30%), 45 s elapsed, ETA 105 s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def _print_line(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


class Progress:
    def __init__(
        self,
        label: str,
        total: int,
        *,
        interval: float = 10.0,
        write: Callable[[str], None] = _print_line,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.interval = label, max(int(total), 1), interval
        self._write, self._clock = write, clock
        self.done = 0
        self._started = self._last = clock()
        # The rate behind the ETA is measured from the first step on: setup before it (data, a
        # feature network trained once) is in the elapsed time, not in the time per step.
        self._first: tuple[float, int] | None = None

    def step(self, count: int = 1) -> None:
        self.done = min(self.total, self.done + count)
        now = self._clock()
        if self._first is None:
            self._first = (now, self.done)
        if self.done == self.total or now - self._last >= self.interval:
            self._last = now
            self._write(self.line(now))

    def extend(self, count: int) -> None:
        """``count`` more steps than planned (work that has to be done again)."""
        self.total += max(int(count), 0)

    def note(self, message: str) -> None:
        """A line that says what happened, under the same label as the progress lines."""
        self._write(f"{self.label}: {message}")

    def line(self, now: float | None = None) -> str:
        now = now if now is not None else self._clock()
        elapsed = now - self._started
        if self._first is not None and self.done > self._first[1]:
            rate = (now - self._first[0]) / (self.done - self._first[1])
        else:
            rate = elapsed / self.done if self.done else float("nan")
        eta = rate * (self.total - self.done)
        tail = "done" if self.done == self.total else f"ETA {eta:.0f} s"
        return (
            f"{self.label}: step {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), "
            f"{elapsed:.0f} s elapsed, {tail}"
        )


def silent(label: str, total: int) -> Progress:
    """A Progress that writes nothing (unit tests, nested work)."""
    return Progress(label, total, write=lambda _line: None)
