"""A one-line progress bar on stderr: a step callback of the pipeline (`ldm generate`), or told (done, total)
directly (`ldm batch`'s rows).

    bar = ProgressBar()
    result = pipe(request, callbacks=[bar])   # [######........................] 3/15 steps, 0.41 s/step
"""

import sys
import time


class ProgressBar:
    """A one-line progress bar on stderr: a step callback of the pipeline (`begin(total)`, then each `Step`), or
    told (done, total) directly with `show` (batch rows)."""

    def __init__(self, width: int = 30, unit: str = "steps"):
        self.width, self.unit, self.start, self.first, self.total = width, unit, time.monotonic(), None, 0

    def begin(self, total: int) -> None:
        """Before the first step: the bar shows at once (a base → refiner run draws one bar per model)."""
        self.first = None
        self.show(0, total)

    def __call__(self, step) -> None:
        self.show(step.i + 1, step.total)  # each step asked for once (the pipeline's steps: PNDM's doubled one too)

    def show(self, done: int, total: int) -> None:
        if self.first is None:
            self.first = done if done == 0 else done - 1  # a resumed batch starts part-way
            self.start = time.monotonic()
        self.total = total
        filled = self.width * done // total
        rate = "starting…" if done == self.first else \
            f"{(time.monotonic() - self.start) / (done - self.first):.2f} s/{self.unit.rstrip('s')}"
        end = "\n" if done == total else ""
        print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {self.unit}, {rate}",
              end=end, file=sys.stderr, flush=True)
