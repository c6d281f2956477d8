"""arkd-eval's journal of generations: every batch of generated rows is appended to disk as soon as it exists, so an
evaluation interrupted by a full disk, a file-size limit, a crash or Ctrl-C keeps every complete row, and the same
command continues from them instead of sampling them again (on the GPU protocol, hours of work).

The journal is a folder ``generations.partial/`` in the output directory: ``identity.json`` (what the evaluation
was asked: the resolved config, the model's fingerprint, the tokenizer and the rows, so that rows of another
evaluation are never reused) and one ``rank{r}.jsonl`` per process, a line per generated row (dataset, seed, row,
generation), flushed and synced after every batch. A line without its newline (the write that was interrupted) is
ignored and its row generated again. The folder is removed once ``generations.jsonl`` and ``results.json`` are in
place; it is never mistaken for results (those are written under temporary names and renamed, results.json last).

Rows are generated in the batches an uninterrupted pass makes (the longest prompts first, ``batch_size`` rows at a
time), so the journal changes no generation; each row samples from its own random stream, so a resumed pass draws
what the uninterrupted one would have drawn.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL_DIR", "GenerationJournal"]

JOURNAL_DIR = "generations.partial"


class GenerationJournal:
    """The generated rows of one evaluation, on disk and in memory.

    Args:
        out: the evaluation's output directory.
        rank: this process's rank (it appends to ``rank{rank}.jsonl``).
    """

    def __init__(self, out: str | os.PathLike, rank: int = 0) -> None:
        self.folder = Path(out) / JOURNAL_DIR
        self.rank = rank
        self.done: dict[tuple[str, int, int], str] = {}

    # -- set-up (main process), then every process reads ----------------------------------------------------------

    def claim(self, identity: dict[str, Any], *, overwrite: bool) -> str | None:
        """On the main process: keep a journal of the same evaluation, start a new one, or refuse another
        evaluation's (unless ``overwrite``). Returns the refusal as a few words, or None."""
        record = self.folder / "identity.json"
        text = json.dumps(identity, sort_keys=True, default=str)
        if self.folder.is_dir():
            try:
                same = record.read_text(encoding="utf-8") == text
            except OSError:
                same = False
            if same:
                return None
            if not overwrite:
                return (
                    f"the output directory holds the generations of another, interrupted evaluation ({self.folder}: "
                    "another model, data or settings)"
                )
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        tmp = record.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, record)
        return None

    def load(self) -> int:
        """Read every process's complete rows; returns how many there are."""
        self.done.clear()
        own = self.folder / f"rank{self.rank}.jsonl"
        if own.is_file():  # drop a line an interrupted write cut short, so that the next append starts a line
            data = own.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(own, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        for file in sorted(self.folder.glob("rank*.jsonl")):
            for line in file.read_text(encoding="utf-8", errors="replace").split("\n")[:-1]:  # complete lines only
                try:
                    row = json.loads(line)
                    self.done[(str(row["dataset"]), int(row["seed"]), int(row["row"]))] = str(row["generation"])
                except (ValueError, KeyError, TypeError):
                    continue  # a damaged line: its row is generated again
        return len(self.done)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- generation -------------------------------------------------------------------------------------------------

    def append(self, dataset: str, seed: int, rows: Sequence[tuple[int, str]]) -> None:
        """Append generated rows and sync them to disk."""
        lines = "".join(
            json.dumps({"dataset": dataset, "seed": seed, "row": row, "generation": text}, ensure_ascii=False) + "\n"
            for row, text in rows
        )
        file = self.folder / f"rank{self.rank}.jsonl"
        try:
            with open(file, "a", encoding="utf-8") as handle:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:  # a full disk, a file-size limit: the rows written before stay
            from arkd.errors import OutputError, describe_os_error

            raise OutputError(
                f"cannot write the generated rows to {file}: {describe_os_error(err)}; the {len(self.done)} rows "
                "written before are kept, and the same command continues from them."
            ) from None
        for row, text in rows:
            self.done[(dataset, seed, row)] = text

    def wrap(
        self,
        generate_fn: Callable[..., list[str]],
        dataset: str,
        *,
        tokenizer: Any,
        max_prompt_tokens: int,
        chunk: int,
    ) -> Callable[..., list[str]]:
        """``generate_fn`` (``(prompts, *, seed, row_ids, progress, desc) -> list[str]``) that reuses the journal's
        rows and journals the others, ``chunk`` rows (one batch) at a time, longest prompts first."""
        from arkd.evaluation.generation import encode_prompts, length_order
        from arkd.progress import progress_bar

        def journaled(prompts, *, seed, row_ids=None, progress=True, desc="generate"):
            rows = list(range(len(prompts))) if row_ids is None else [int(r) for r in row_ids]
            out: list[str | None] = [self.done.get((dataset, int(seed), r)) for r in rows]
            todo = [i for i, text in enumerate(out) if text is None]
            if todo:
                encoded = encode_prompts(tokenizer, [prompts[i] for i in todo], max_prompt_tokens)
                order = [todo[j] for j in length_order(encoded)]
                bar = progress_bar(total=len(order), desc=desc, unit="row", disable=not progress)
                for start in range(0, len(order), chunk):
                    part = order[start : start + chunk]
                    texts = generate_fn(
                        [prompts[i] for i in part], seed=seed, row_ids=[rows[i] for i in part], progress=False,
                        desc=desc,
                    )  # fmt: skip
                    for i, text in zip(part, texts):
                        out[i] = text
                    self.append(dataset, int(seed), [(rows[i], out[i]) for i in part])
                    bar.update(len(part))
                bar.close()
            return out

        return journaled
