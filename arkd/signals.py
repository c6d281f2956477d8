"""SIGINT / SIGTERM during training: finish the step in progress and checkpoint instead of dying mid-write."""

from __future__ import annotations

import signal
import sys
from typing import Any

__all__ = ["StopSignals"]


class StopSignals:
    """While active (main thread only), the first SIGINT / SIGTERM sets ``received`` instead of killing the
    process, so the loop can finish its step and checkpoint; a second one raises ``KeyboardInterrupt`` at once."""

    def __init__(self, announce: bool) -> None:
        self.received: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        if self.announce:
            print(
                f"\narkd: {signal.Signals(signum).name} received: finishing the current step and writing a "
                "checkpoint (send it again to stop at once).",
                file=sys.stderr,
                flush=True,
            )

    def agreed(self, accelerator: Any) -> int:
        """The signal number when any process received SIGINT / SIGTERM (0 otherwise), agreed by all processes."""
        value = float(self.received or 0)
        if accelerator.num_processes > 1:
            import torch

            flag = torch.tensor(value, device=accelerator.device)
            value = accelerator.reduce(flag, reduction="max").item()
        return int(value)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
