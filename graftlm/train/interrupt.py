"""Ctrl-C and SIGTERM during training: finish the step, write a checkpoint, stop."""

from __future__ import annotations

import logging
import signal
from typing import Any

logger = logging.getLogger("graftlm")


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and stops.

    A second Ctrl-C falls through to the default handler (immediate KeyboardInterrupt).
    """

    def __init__(self) -> None:
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, nothing to restore
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop = True
        logger.warning(
            "signal %s: finishing this step, writing a checkpoint, then stopping", signum
        )

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
