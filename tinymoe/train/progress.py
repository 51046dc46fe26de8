"""A progress line for training: one self-rewriting line on a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_steps: int, stream=None, plain_every: int = 50, start_step: int = 0):
        self.total, self.stream = total_steps, stream or sys.stdout
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.plain_every = max(1, plain_every)
        self.start_time, self.start_step = time.perf_counter(), start_step

    def update(self, step: int, loss: float, aux: float, tokens_per_second: float) -> None:
        """Report that `step` (1-based) of `total` finished."""
        elapsed = time.perf_counter() - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        fraction = step / self.total
        text = (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | aux {aux:.4f} | "
                f"{tokens_per_second:,.0f} tok/s | ETA {_duration(eta)}")
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
