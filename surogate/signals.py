"""Graceful stop on SIGINT / SIGTERM: finish the current optimizer step, save a checkpoint, exit 0.

    with graceful_stop():          # installs the handlers (main thread only), restores the previous ones on exit
        run(cfg, plan)             # the trainer polls `stop_requested()` after every optimizer step

The first signal only sets a flag: the step in flight completes (stopping inside a backward or an optimizer step
would leave nothing consistent to save), the trainer writes a checkpoint and raises `TrainingInterrupted`, and
`surogate.train` prints the exact command that resumes the run. A second Ctrl-C quits at once (KeyboardInterrupt)
without saving; the previous checkpoint is intact, because checkpoints are renamed into place atomically.

Reading the flag is a host-side boolean: no device synchronization. Distributed runs must agree on the step at which
they stop (each rank saves or collectively reduces at the same step): all-reduce the flag before acting on it.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TrainingInterrupted", "graceful_stop", "request_stop", "stop_requested"]

_requested: str | None = None  # name of the signal that asked us to stop, if any


class TrainingInterrupted(Exception):
    """Training stopped early on request; a checkpoint of `step` was saved."""

    def __init__(self, step: int, checkpoint: str | None, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name} after optimizer step {step}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


def stop_requested() -> str | None:
    """The name of the signal that requested a stop (SIGINT / SIGTERM), or None."""
    return _requested


def request_stop(name: str = "request") -> None:
    """Ask the trainer to stop after its current optimizer step (what the signal handler does; tests call it)."""
    global _requested
    _requested = name


def _handler(signum: int, frame) -> None:
    name = signal.Signals(signum).name
    if _requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # second Ctrl-C: quit now, without saving
    request_stop(name)
    print(
        f"\n{name}: stopping after the current optimizer step and saving a checkpoint"
        + (" (Ctrl-C again to quit at once without saving)" if signum == signal.SIGINT else ""),
        file=sys.stderr,
        flush=True,
    )


@contextmanager
def graceful_stop() -> Iterator[None]:
    """Install the SIGINT/SIGTERM handlers for the duration of the block (a no-op outside the main thread)."""
    global _requested
    _requested = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _requested = None
