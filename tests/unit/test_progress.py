"""Progress bars: a live tqdm bar on a terminal, one line every few percent in a log file."""

from __future__ import annotations

import io

from tqdm.auto import tqdm

from arkd.progress import LogProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_file_gets_one_line_every_five_percent() -> None:
    log = io.StringIO()
    bar = progress_bar(total=240, desc="distil", stream=log)
    assert isinstance(bar, LogProgress)
    for step in range(240):
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (step + 1):.4f}")  # every step, as the trainer does
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 20  # 5 %, 10 %, ..., 100 %: 240 updates and 240 postfix changes give 20 lines
    assert lines[0].startswith("distil:   5%") and "12/240" in lines[0]
    assert lines[-1].startswith("distil: 100%") and "240/240" in lines[-1]
    assert "loss=0.0042" in lines[-1]  # the postfix set after step 239 (1 / 240)


def test_log_file_iterable_and_early_close() -> None:
    log = io.StringIO()
    seen = list(progress_bar(range(7), desc="generate", unit="batch", stream=log))
    assert seen == list(range(7))
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("generate: 100%") and "7/7" in lines[-1]
    assert len(lines) == 7  # each of 7 items is more than 5 % of the total
    # A bar closed before its total writes where it stopped, once.
    log = io.StringIO()
    bar = LogProgress(total=100, desc="sft", file=log)
    bar.update(3)
    bar.close()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sft:   3%") and "3/100" in lines[0]


def test_resumed_bar_starts_at_initial() -> None:
    log = io.StringIO()
    bar = progress_bar(total=100, initial=50, desc="distil", stream=log)
    bar.update(5)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "55/100" in lines[0]  # 50 % -> 55 %: one bucket crossed


def test_unknown_total_writes_by_time() -> None:
    log = io.StringIO()
    bar = LogProgress(desc="tokenizing", file=log, interval_s=0.0)
    bar.update(2)
    bar.update(3)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 3 and lines[1].startswith("tokenizing: 5it")


def test_terminal_gets_tqdm_and_disable_is_silent() -> None:
    terminal = _Terminal()
    bar = progress_bar(total=10, desc="x", stream=terminal)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()
    assert "\r" in terminal.getvalue()
    quiet = io.StringIO()
    bar = progress_bar(total=10, disable=True, stream=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""
