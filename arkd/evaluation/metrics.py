"""The protocol's metrics: Rouge-L, exact match and BERTScore (MiniLLM, microsoft/LMOps ``minillm/``).

Every public metric takes ``predictions`` (one string per row) and ``references`` (one string per row, or one list of
strings per row) and returns numbers on the 0-100 scale. Rows with several references keep their best score, as the
protocol does for S-NI.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import string
import sys
from collections.abc import Sequence
from functools import lru_cache
from importlib import metadata
from typing import Any

References = Sequence[str] | Sequence[Sequence[str]]

# Below this many rows Rouge-L runs in the calling process: starting workers would cost more than it saves.
PARALLEL_MIN_ROWS = 2000
_PUNCTUATION = frozenset(string.punctuation)


def _as_reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Check lengths and types; return one list of reference strings per row."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences with one entry per row, not a single string.")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions has {len(predictions)} rows but references has {len(references)}; expected one entry per row."
        )
    rows: list[list[str]] = []
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if not isinstance(prediction, str):
            raise TypeError(f"prediction of row {i} is {type(prediction).__name__}; expected a string.")
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"row {i} has no reference; expected at least one reference string.")
        for ref in refs:
            if not isinstance(ref, str):
                raise TypeError(f"a reference of row {i} is {type(ref).__name__}; expected a string.")
        rows.append(refs)
    return rows


@lru_cache(maxsize=1)
def _rouge_scorer():
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs "Using default tokenizer." at INFO

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_chunk(chunk: list[tuple[str, list[str]]]) -> list[float]:
    """Per-row Rouge-L F-measure (0-1), maximum over the row's references. Runs in worker processes too."""
    scorer = _rouge_scorer()
    return [
        max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in refs)
        for prediction, refs in chunk
    ]


def _resolve_workers(workers: int | None, n_rows: int) -> int:
    if workers is None:
        return (os.cpu_count() or 1) if n_rows >= PARALLEL_MIN_ROWS else 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1 or None (automatic), got {workers}.")
    return workers


def rouge_l_per_row(
    predictions: Sequence[str], references: References, *, workers: int | None = None, progress: bool = False
) -> list[float]:
    """Rouge-L F-measure of every row on the 0-1 scale, the maximum over the row's references.

    Args:
        predictions: ``N`` generated strings.
        references: ``N`` reference strings, or ``N`` lists of reference strings.
        workers: processes to use; ``None`` uses every core from ``PARALLEL_MIN_ROWS`` rows on, else 1. The result
            does not depend on it: rows are scored independently and come back in order.
        progress: show a progress bar over chunks of rows.

    Returns:
        ``N`` floats in [0, 1].
    """
    rows = list(zip(predictions, _as_reference_lists(predictions, references)))
    n_workers = _resolve_workers(workers, len(rows))
    if n_workers == 1 or len(rows) < 2:
        chunks = [rows[i : i + 500] for i in range(0, len(rows), 500)] or [[]]
        return [score for chunk in _progress(chunks, progress, "Rouge-L") for score in _rouge_chunk(chunk)]
    n_chunks = min(len(rows), n_workers * 8)
    size = math.ceil(len(rows) / n_chunks)
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    # Linux: fork (no re-import of the caller's main module, so scripts without a __main__ guard work; the workers
    # only run rouge_score). Elsewhere: spawn, the platform's safe default.
    context = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(n_workers) as pool:
        scored = list(_progress(pool.imap(_rouge_chunk, chunks), progress, "Rouge-L", total=len(chunks)))
    return [score for chunk in scored for score in chunk]


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return iterable
    from arkd.progress import progress_bar

    return progress_bar(iterable, desc=desc, total=total, unit="chunk")


def rouge_l(
    predictions: Sequence[str], references: References, *, workers: int | None = None, progress: bool = False
) -> float:
    """The protocol's Rouge-L: ``rouge_score`` Rouge-L with stemming, F-measure, max over references, mean, x100.

    ``RougeScorer(["rougeL"], use_stemmer=True).score(target=reference, prediction=generation)``; the rows' scores
    are summed in order, divided by the number of rows, multiplied by 100 and rounded to 4 decimals, exactly as
    ``compute_metrics`` of LMOps ``minillm/rouge_metric.py`` does.

    Args:
        predictions: ``N`` generated strings (``N >= 1``).
        references: ``N`` reference strings, or ``N`` lists of reference strings.
        workers: processes for scoring (``None``: every core from 2000 rows on). Same result for any value.
        progress: show a progress bar.

    Returns:
        Rouge-L on the 0-100 scale, rounded to 4 decimals.
    """
    if len(predictions) == 0:
        raise ValueError("rouge_l needs at least one row; got 0 predictions.")
    return mean_x100(rouge_l_per_row(predictions, references, workers=workers, progress=progress))


def mean_x100(scores: Sequence[float]) -> float:
    """The protocol's aggregation of per-row scores in [0, 1]: sum in row order, / rows, x100, rounded to 4 decimals."""
    total = 0.0
    for score in scores:
        total += score
    return round(100.0 * total / len(scores), 4)


def normalize_answer(text: str) -> str:
    """Exact-match normalisation of the protocol: lowercase, drop ASCII punctuation, squash whitespace.

    Articles are kept (LMOps' ``normalize_answer`` is SQuAD's without the article removal).
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match_per_row(predictions: Sequence[str], references: References) -> list[float]:
    """1.0 where the normalised prediction equals a normalised reference of its row, else 0.0 (``N`` floats)."""
    rows = _as_reference_lists(predictions, references)
    return [
        float(any(normalize_answer(prediction) == normalize_answer(ref) for ref in refs))
        for prediction, refs in zip(predictions, rows)
    ]


def exact_match(predictions: Sequence[str], references: References) -> float:
    """The protocol's exact match: normalised equality, max over references, mean x100, rounded to 4 decimals."""
    if len(predictions) == 0:
        raise ValueError("exact_match needs at least one row; got 0 predictions.")
    return mean_x100(exact_match_per_row(predictions, references))


class BertScoreLoadError(RuntimeError):
    """The BERTScore model or its tokenizer could not be loaded."""


_SCORERS: dict[tuple, Any] = {}


def _load_scorer(model_type: str, num_layers: int | None, idf: bool, rescale: bool, device: str | None, lang):
    key = (model_type, num_layers, idf, rescale, device, lang)
    if key in _SCORERS:
        return _SCORERS[key]
    if model_type.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(model_type)):
        raise BertScoreLoadError(
            f"BERTScore model directory {model_type!r} does not exist; point model_type at a local model directory "
            "(arkd-eval: bertscore.model_type=PATH bertscore.num_layers=N), or skip BERTScore explicitly "
            "(arkd-eval: bertscore.enabled=false)."
        )
    try:
        from bert_score import BERTScorer
        from bert_score.utils import model2layers

        if num_layers is None and model_type not in model2layers:
            raise ValueError(
                f"num_layers is required for {model_type!r}, which is not in bert_score's table of default layers"
            )
        scorer = BERTScorer(
            model_type=os.path.expanduser(model_type),
            num_layers=num_layers,
            idf=idf,
            rescale_with_baseline=rescale,
            lang=lang,
            device=device,
        )
    except Exception as err:  # loading fails in many ways: offline Hub, missing files, bad layer count
        raise BertScoreLoadError(
            f"BERTScore model {model_type!r} (layer {num_layers}) could not be loaded: {' '.join(str(err).split())}. "
            "Point model_type at a local model directory and give its num_layers "
            "(arkd-eval: bertscore.model_type=PATH bertscore.num_layers=N), "
            "or skip BERTScore explicitly (arkd-eval: bertscore.enabled=false)."
        ) from err
    tokenizer = scorer._tokenizer
    # Tokenizers saved without a maximum length report ~1e30, which bert_score passes on and fast tokenizers reject.
    if getattr(tokenizer, "model_max_length", 0) > 1_000_000:
        positions = getattr(scorer._model.config, "max_position_embeddings", 512)
        tokenizer.model_max_length = positions - 2 if positions > 512 else positions
    _SCORERS.clear()  # keep one model in memory at a time
    _SCORERS[key] = scorer
    return scorer


def bertscore(
    predictions: Sequence[str],
    references: References,
    *,
    model_type: str = "roberta-large",
    num_layers: int | None = 17,
    batch_size: int = 64,
    idf: bool = False,
    rescale_with_baseline: bool = False,
    lang: str | None = None,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """BERTScore with the ``bert_score`` package: precision, recall and F1 x100, maximum over references.

    Defaults are the package's for English: ``roberta-large``, layer 17, no idf, no baseline rescaling. Any local
    model directory works as ``model_type`` (give its ``num_layers``). With several references per row, the package
    keeps, per row, the maximum of each of P, R and F1 over the references.

    Args:
        predictions: ``N`` candidate strings.
        references: ``N`` reference strings or ``N`` lists of reference strings.
        model_type: Hub name or local directory of the encoder.
        num_layers: which hidden layer's embeddings are compared (``None``: the package's default for known names).
        batch_size: sentences per forward pass.
        idf: weight tokens by inverse document frequency computed on the references.
        rescale_with_baseline: rescale with the package's baseline file (needs ``lang``).
        lang: language code, only needed for baseline rescaling.
        device: ``"cuda"``, ``"cpu"``, ... (``None``: CUDA when available).
        progress: show the package's progress bar.

    Returns:
        ``{"precision", "recall", "f1"}`` (means x100, rounded to 4 decimals), ``"f1_per_row"`` (``N`` floats, 0-1),
        and the settings the number depends on: ``model_type``, ``num_layers``, ``idf``, ``rescale_with_baseline``,
        ``lang``, ``bert_score_version``, ``hash`` (the package's own settings string).

    Raises:
        BertScoreLoadError: the model cannot be loaded; the message names the settings to change.
    """
    rows = _as_reference_lists(predictions, references)
    if not rows:
        raise ValueError("bertscore needs at least one row; got 0 predictions.")
    scorer = _load_scorer(model_type, num_layers, idf, rescale_with_baseline, device, lang)
    if idf:
        scorer.compute_idf([ref for refs in rows for ref in refs])
    precision, recall, f1 = scorer.score(list(predictions), rows, verbose=progress, batch_size=batch_size)
    return {
        "precision": round(100.0 * precision.double().mean().item(), 4),
        "recall": round(100.0 * recall.double().mean().item(), 4),
        "f1": round(100.0 * f1.double().mean().item(), 4),
        "f1_per_row": [float(x) for x in f1.tolist()],
        "model_type": model_type,
        "num_layers": scorer.num_layers,
        "idf": idf,
        "rescale_with_baseline": rescale_with_baseline,
        "lang": lang,
        "bert_score_version": metadata.version("bert-score"),
        "hash": scorer.hash,
    }
