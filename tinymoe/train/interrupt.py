"""Ctrl-C during training: acted on between two steps, so the checkpoint written then is a whole step."""
from __future__ import annotations

import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (or another KeyboardInterrupt). `step`: the step the checkpoint at `path`
    holds (0 and path None when nothing was saved); `saved_now`: whether it was written by this interruption."""

    def __init__(self, step: int, path, saved_now: bool):
        super().__init__(step, path, saved_now)
        self.step, self.path, self.saved_now = step, path, saved_now



class DeferredInterrupt:
    """While active (main thread, default SIGINT handler only), the first Ctrl-C only sets `requested`, which
    the loop checks between steps; the handler is then restored, so a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc_info):
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
        return False
