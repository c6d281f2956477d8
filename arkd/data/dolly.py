"""The protocol's Dolly preparation: raw ``databricks-dolly-15k`` to train / validation / test JSONL files.

Steps (MiniLLM, ``tools/process_data_dolly.py``, with a fixed-seed split):

1. read the raw rows (``instruction``, ``context``, ``response``, ``category``), ``context`` becoming ``input``;
2. build every prompt with the protocol template and tokenize it (GPT-2 tokenizer, no BOS);
3. drop the rows whose prompt is longer than ``max_prompt_length`` (256) tokens: counted and reported;
4. shuffle the remaining rows with ``random.Random(seed)`` and split them: the first ``n_test`` (500) rows are the
   test set, the next ``n_validation`` (1000) the validation set, the rest (about 12.5k) the training pool;
5. write ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` in the MiniLLM schema (instruction, input, output,
   prompt, topic).

The split differs from MiniLLM's released files (their shuffle is not published); for the published protocol's
exact evaluation sets use the files in ``../shared/data/dolly``.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from arkd.data.example import Example
from arkd.data.formats import load_examples, write_jsonl

logger = logging.getLogger("arkd.data")


@dataclass
class DollyReport:
    """Counts of one preparation run."""

    raw: int
    dropped_long_prompts: int
    longest_prompt: int
    sizes: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the console."""
        sizes = ", ".join(f"{name} {n}" for name, n in self.sizes.items())
        return (
            f"{self.raw} raw rows; {self.dropped_long_prompts} dropped with prompts over the limit "
            f"(longest {self.longest_prompt} tokens); {sizes}"
        )


def prepare_dolly(
    source: str | os.PathLike,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    seed: int = 1234,
    n_validation: int = 1000,
    n_test: int = 500,
    max_prompt_length: int = 256,
    split: str = "train",
) -> DollyReport:
    """Prepare the Dolly splits (see the module docstring) and write them to ``out_dir``.

    Args:
        source: ``"databricks/databricks-dolly-15k"`` or a local JSONL file in the raw Dolly schema.
        tokenizer: the tokenizer that measures prompts (GPT-2 in the protocol).
        out_dir: where ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl`` go.
        seed: the shuffling seed.
        n_validation: validation rows (1000).
        n_test: test rows (500).
        max_prompt_length: the longest prompt kept, in tokens (256).
        split: the Hugging Face split to read.

    Returns:
        A :class:`DollyReport` with the counts and the files written.

    Raises:
        ValueError: too few rows left for the requested validation and test sizes (or any reader error).
    """
    examples = load_examples(source, format="dolly", split=split)
    prompt_ids = tokenizer([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in prompt_ids]
    kept: list[Example] = [ex for ex, n in zip(examples, lengths) if n <= max_prompt_length]
    report = DollyReport(raw=len(examples), dropped_long_prompts=len(examples) - len(kept), longest_prompt=max(lengths))
    if len(kept) <= n_validation + n_test:
        raise ValueError(
            f"{source}: {len(kept)} rows left after dropping {report.dropped_long_prompts} long prompts; expected more "
            f"than n_validation + n_test = {n_validation + n_test}"
        )
    random.Random(seed).shuffle(kept)
    splits = {
        "test": kept[:n_test],
        "valid": kept[n_test : n_test + n_validation],
        "train": kept[n_test + n_validation :],
    }
    out = Path(out_dir)
    for name, rows in splits.items():
        report.sizes[name] = len(rows)
        report.files[name] = str(write_jsonl(rows, out / f"{name}.jsonl"))
    logger.warning("Dolly preparation: %s", report.summary())
    return report
