"""A progress line for training: one self-rewriting line on a terminal, plain periodic lines otherwise.

The ETA is the mean time of the recent steps (a moving window of `window` steps) times the steps left. The
first `skip` steps of a process are left out of it: they compile kernels and warm caches (the first Numba step
takes seconds), and would make the ETA of a short run absurd. Until a step past those has been timed, the ETA
shows "--:--".
"""
from __future__ import annotations

import collections
import sys
import time


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours}:{minutes:02d}:{seconds % 60:02d}" if hours else f"{minutes}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps: int, stream=None, plain_every: int = 50, start_step: int = 0, window: int = 20,
                 skip: int = 2, clock=time.perf_counter):
        self.total, self.stream = total_steps, stream or sys.stdout
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_every = max(1, plain_every)
        self.start_step, self.skip, self.clock = start_step, max(0, skip), clock
        self.step_seconds = collections.deque(maxlen=max(1, window))
        self._last_time = clock()

    def eta(self, step: int):
        """Seconds left after `step`, from the recent step times; None while none has been timed yet."""
        if not self.step_seconds:
            return None
        return sum(self.step_seconds) / len(self.step_seconds) * (self.total - step)

    def update(self, step: int, loss: float, aux: float, tokens_per_second: float,
               experts_per_token: float | None = None) -> None:
        """Report that `step` (1-based) of `total` finished. experts_per_token: shown ("| 1.7 experts/token") when
        given; the loop gives it for the routers whose count varies (top_p, relu, expert choice, null experts)."""
        now = self.clock()
        if step - self.start_step > self.skip:
            self.step_seconds.append(now - self._last_time)
        self._last_time = now
        eta = self.eta(step)
        fraction = step / self.total
        experts = "" if experts_per_token is None else f"{experts_per_token:.2f} experts/token | "
        text = (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | aux {aux:.4f} | {experts}"
                f"{tokens_per_second:,.0f} tok/s | ETA {'--:--' if eta is None else _duration(eta)}")
        if self.interactive:
            filled = int(24 * fraction)
            self.stream.write(f"\r[{'#' * filled}{'.' * (24 - filled)}] {text}")
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif step % self.plain_every == 0 or step == self.total or step == self.start_step + 1:
            self.stream.write(text + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.interactive:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
