"""Instruction data for distillation: formats, the protocol's prompt template, tokenization with response-only
loss masks, collators, resumable data loaders, the Dolly preparation and the offline synthetic tasks.

See docs/data.md. The batch dict and the :class:`Example` type are part of docs/architecture.md's contract.
"""

from arkd.data.collate import IGNORE_INDEX, PromptCollator, TrainingCollator, shift_for_next_token
from arkd.data.dolly import DollyReport, prepare_dolly
from arkd.data.example import Example
from arkd.data.formats import FieldNames, load_examples, write_jsonl
from arkd.data.loading import (
    ResumableDataLoader,
    ResumableSampler,
    TokenizedDataset,
    build_dataloader,
)
from arkd.data.splits import held_out_splits
from arkd.data.synthetic import generate_synthetic, synthetic_corpus, synthetic_splits, write_synthetic_splits
from arkd.data.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, decode_newlines, format_prompt
from arkd.data.tokenization import TokenizationReport, TokenizedExample, tokenize_examples

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "DollyReport",
    "Example",
    "FieldNames",
    "PromptCollator",
    "ResumableDataLoader",
    "ResumableSampler",
    "TokenizationReport",
    "TokenizedDataset",
    "TokenizedExample",
    "TrainingCollator",
    "build_dataloader",
    "decode_newlines",
    "format_prompt",
    "generate_synthetic",
    "held_out_splits",
    "load_examples",
    "prepare_dolly",
    "shift_for_next_token",
    "synthetic_corpus",
    "synthetic_splits",
    "tokenize_examples",
    "write_jsonl",
    "write_synthetic_splits",
]
