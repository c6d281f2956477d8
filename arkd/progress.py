"""Progress bars: tqdm's live bar in a terminal, a plain line every few percent in a log file.

Every progress bar of arkd (training steps, tokenization, generation, Rouge-L) is made by :func:`progress_bar`. When
stderr is a terminal it is an ordinary ``tqdm`` bar redrawn in place. When stderr is not a terminal (a Slurm or
``nohup`` log, ``2> run.log``), a redrawn bar would write one carriage-return-separated update per refresh (thousands
for a tiny run); there :class:`LogProgress` writes one newline-terminated line, in tqdm's format, each time another
``every_percent`` of the total is done (and every ``interval_s`` seconds when the total is unknown).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm


class LogProgress:
    """A tqdm-like counter that prints a line each ``every_percent`` of ``total`` (for log files).

    Supports what arkd uses of ``tqdm``: iteration over ``iterable``, ``update``, ``set_postfix``, ``close`` and the
    context-manager protocol.

    Args:
        iterable: what to iterate over (None: count with :meth:`update`).
        total: the number of items (default ``len(iterable)`` when it has one).
        initial: the count to start from (a resumed run).
        desc: the label at the start of each line.
        unit: the unit of the rate (``it``, ``batch``, ...).
        every_percent: write a line each time this share of ``total`` has been completed.
        interval_s: with an unknown total, write a line at most this often.
        file: where to write (default ``sys.stderr``).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        initial: int = 0,
        desc: str = "",
        unit: str = "it",
        every_percent: float = 5.0,
        interval_s: float = 30.0,
        file: IO[str] | None = None,
    ) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        if not 0 < every_percent <= 100:
            raise ValueError(f"every_percent must be in (0, 100], got {every_percent}.")
        self.iterable = iterable
        self.total = total
        self.n = initial
        self.desc = desc
        self.unit = unit
        self.every_percent = every_percent
        self.interval_s = interval_s
        self.file = file if file is not None else sys.stderr
        self.postfix = ""
        self._start = time.perf_counter()
        self._start_n = initial
        self._last_time = self._start
        self._printed_bucket = self._bucket()
        self._closed = False

    def _bucket(self) -> int:
        if not self.total:
            return 0
        return int(100.0 * min(self.n, self.total) / self.total // self.every_percent)

    def _line(self) -> str:
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else None
        return tqdm.format_meter(
            self.n, self.total, elapsed, prefix=self.desc, unit=self.unit, rate=rate, postfix=self.postfix or None
        )

    def _write(self) -> None:
        self.file.write(self._line() + "\n")
        self.file.flush()
        self._last_time = time.perf_counter()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items; write a line when another ``every_percent`` is done."""
        self.n += n
        if self.total:
            bucket = self._bucket()
            if bucket > self._printed_bucket:
                self._printed_bucket = bucket
                self._write()
        elif time.perf_counter() - self._last_time >= self.interval_s:
            self._write()

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line (``loss=0.91, alpha=0.48``); writes nothing by itself."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        """Write the last line if the count moved since the previous one."""
        if self._closed:
            return
        self._closed = True
        if self.total is None or self.n < self.total:
            self._write()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LogProgress was built without an iterable; call update() instead.")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    initial: int = 0,
    stream: IO[str] | None = None,
) -> Any:
    """A progress bar over ``iterable`` (or counted with ``update``): tqdm in a terminal, :class:`LogProgress`
    otherwise.

    Args:
        iterable: what to iterate over (None: call ``update``).
        total: the number of items (default ``len(iterable)``).
        desc: the label.
        unit: the unit of the rate.
        disable: no output at all (a plain pass-through).
        initial: the count to start from.
        stream: where the bar goes (default ``sys.stderr``); whether it is a terminal picks the kind of bar.
    """
    stream = stream if stream is not None else sys.stderr
    if disable:
        return tqdm(iterable, total=total, disable=True)
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream)
