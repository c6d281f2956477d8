"""Generation under the protocol's decoding, and ``evaluate_model`` (generation + metrics over several seeds).

What LMOps ``minillm/`` does, and what this module reproduces (see docs/evaluation.md for the sources):

- the prompt string's ``"<n>"`` becomes a newline; it is encoded with the model's tokenizer (GPT-2 adds no BOS) and
  only its **first** ``max_prompt_tokens`` (256) tokens are kept (``prompt_ids[:256]``: long prompts lose their end);
- prompts are left-padded with the end-of-text id and decoded together with the KV cache;
- sampling with temperature 1, top_p 1, top_k 0 (no top-k filter), ``no_repeat_ngram_size`` 6, at most 256 new
  tokens, one sample per prompt; the seed is set once before the first batch, so a seed and a batch size fix the
  generations;
- each response is decoded with special tokens skipped, cut at the first end-of-text, ``"<n>"`` turned into a
  newline and stripped.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

PROTOCOL_SEEDS = (10, 20, 30, 40, 50)


@dataclass(frozen=True)
class DecodingConfig:
    """Decoding settings; the defaults are the protocol's.

    Attributes:
        do_sample: sample (True, the protocol) or decode greedily (False).
        temperature: softmax temperature when sampling.
        top_p: nucleus threshold (1.0: no filter).
        top_k: top-k filter (0: none).
        no_repeat_ngram_size: ban any n-gram of this size from repeating (0: off).
        max_new_tokens: most tokens generated per prompt.
        max_prompt_tokens: prompts keep their first this many tokens.
        repetition_penalty: optional repetition penalty (None: off, as in the protocol).
        clean_up_tokenization_spaces: apply transformers 4.x's ``clean_up_tokenization`` to decoded responses
            (" ." -> ".", " n't" -> "n't", ...; see ``legacy_cleanup``). True by default: GPT-2's tokenizer did it
            in the transformers 4.x the protocol's code ran on; transformers 5 no longer does it for BPE tokenizers,
            so arkd applies the same replacements itself whatever the installed version.
    """

    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256
    max_prompt_tokens: int = 256
    repetition_penalty: float | None = None
    clean_up_tokenization_spaces: bool = True

    def __post_init__(self) -> None:
        checks = {
            "temperature": self.temperature > 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "no_repeat_ngram_size": self.no_repeat_ngram_size >= 0,
            "max_new_tokens": self.max_new_tokens >= 1,
            "max_prompt_tokens": self.max_prompt_tokens >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"decoding setting {name}={getattr(self, name)!r} is out of range.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


GREEDY = DecodingConfig(do_sample=False)


_LEGACY_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def legacy_cleanup(text: str) -> str:
    """transformers 4.x ``clean_up_tokenization``: remove the space before punctuation and English contractions.

    The same ten replacements, in the same order, that ``PreTrainedTokenizerBase.clean_up_tokenization`` made when
    ``tokenizer.decode`` ran with ``clean_up_tokenization_spaces=True`` (GPT-2's default then).
    """
    for old, new in _LEGACY_CLEANUP:
        text = text.replace(old, new)
    return text


def clean_output(text: str, eos_token: str | None = "<|endoftext|>") -> str:
    """The protocol's output cleaning: cut at the first end-of-text, ``"<n>"`` -> newline, strip.

    Args:
        text: a decoded response (special tokens usually already skipped).
        eos_token: the end-of-text string to cut at (``None``: no cut).
    """
    if eos_token:
        cut = text.find(eos_token)
        if cut >= 0:
            text = text[:cut]
    return text.replace("<n>", "\n").strip()


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids of each prompt: ``"<n>"`` -> newline, the tokenizer's own special tokens, the first tokens kept."""
    ids = tokenizer([p.replace("<n>", "\n") for p in prompts], add_special_tokens=True)["input_ids"]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"prompt {empty[0]} encodes to no token; every prompt needs at least one token.")
    return [row[:max_prompt_tokens] for row in ids]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``input_ids`` and ``attention_mask`` (both long ``[B, T]``, T = longest row)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


def _generation_config(decoding: DecodingConfig, eos_id: int, pad_id: int):
    from transformers import GenerationConfig

    options: dict[str, Any] = {
        "do_sample": decoding.do_sample,
        "max_new_tokens": decoding.max_new_tokens,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size or None,
        "repetition_penalty": decoding.repetition_penalty,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "num_beams": 1,
        "use_cache": True,
    }
    if decoding.do_sample:
        # top_k=0 and top_p=1.0 switch those filters off: plain sampling from softmax(logits / temperature).
        options.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**options)


def _model_device(model) -> torch.device:
    try:
        return model.device
    except AttributeError:
        return next(model.parameters()).device


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    seed: int,
    batch_size: int = 16,
    decoding: DecodingConfig | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Generate one cleaned response per prompt under the protocol's decoding.

    Args:
        model: a causal LM (``transformers`` ``generate`` API).
        tokenizer: its tokenizer; its end-of-text token ends generation and pads the prompts (on the left).
        prompts: ``N`` prompt strings (``"<n>"`` stands for a newline).
        seed: set with ``transformers.set_seed`` once before the first batch: the same seed with the same
            ``batch_size`` (and device) gives the same generations.
        batch_size: prompts per ``generate`` call.
        decoding: decoding settings (default: the protocol's sampling; ``GREEDY`` for greedy decoding).
        progress: show a progress bar over batches.
        desc: the progress bar's label.

    Returns:
        ``N`` cleaned response strings, in the order of ``prompts``.
    """
    from transformers import set_seed

    decoding = decoding or DecodingConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; generation needs an end-of-text token to stop at.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    config = _generation_config(decoding, eos_id, pad_id)
    stop_ids = {eos_id, pad_id}
    device = _model_device(model)
    was_training = model.training
    model.eval()
    encoded = encode_prompts(tokenizer, prompts, decoding.max_prompt_tokens)
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    if progress:
        from arkd.progress import progress_bar

        batches = progress_bar(batches, desc=desc, unit="batch")
    set_seed(seed)
    outputs: list[str] = []
    try:
        for rows in batches:
            input_ids, attention_mask = left_pad(rows, pad_id)
            sequences = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            for response in sequences[:, input_ids.shape[1] :].tolist():
                end = next((i for i, tok in enumerate(response) if tok in stop_ids), len(response))
                text = tokenizer.decode(response[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if decoding.clean_up_tokenization_spaces:
                    text = legacy_cleanup(text)
                outputs.append(clean_output(text, tokenizer.eos_token))
    finally:
        model.train(was_training)
    return outputs


@dataclass
class BertScoreSettings:
    """BERTScore settings for ``evaluate_model`` (see ``arkd.evaluation.metrics.bertscore``)."""

    model_type: str = "roberta-large"
    num_layers: int | None = 17
    batch_size: int = 64
    idf: bool = False
    rescale_with_baseline: bool = False
    lang: str | None = None
    device: str | None = None


def evaluate_model(
    model,
    tokenizer,
    examples: Sequence[Any],
    *,
    seeds: Sequence[int] = PROTOCOL_SEEDS,
    batch_size: int = 16,
    decoding: DecodingConfig | None = None,
    max_new_tokens: int | None = None,
    bertscore: BertScoreSettings | None = None,
    rouge_workers: int | None = None,
    progress: bool = True,
    desc: str = "",
) -> dict[str, Any]:
    """Generate for every example under every seed and score the generations with the protocol's metrics.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        examples: rows with ``.prompt`` and ``.references`` (``arkd.data.Example``), or dicts with ``prompt`` and
            ``references`` (or ``output``).
        seeds: one generation pass per seed (protocol: 10, 20, 30, 40, 50).
        batch_size: prompts per ``generate`` call.
        decoding: decoding settings (default: the protocol's sampling).
        max_new_tokens: overrides ``decoding.max_new_tokens`` when given (e.g. short validation passes).
        bertscore: BERTScore settings, or None to skip BERTScore.
        rouge_workers: processes for Rouge-L (None: every core from 2000 rows on).
        progress: progress bars for generation and scoring.
        desc: label prefix for the progress bars (e.g. the dataset's name).

    Returns:
        A dict with ``n_rows``, ``seeds``, ``decoding`` (the settings used), one entry per metric (``rougeL``,
        ``exact_match`` and, with BERTScore, ``bertscore_f1``, ``bertscore_precision``, ``bertscore_recall``), each
        ``{"mean", "std", "per_seed"}`` on the 0-100 scale (``per_seed`` maps the seed, as a string, to the
        protocol's number for that seed; ``std`` is the sample std over seeds, None for one seed), ``bertscore``
        (the BERTScore settings, when enabled), ``generations`` (seed -> ``N`` cleaned responses) and ``per_row``
        (seed -> metric -> ``N`` per-row scores in [0, 1], for paired comparisons).
    """
    from arkd.evaluation.metrics import bertscore as bertscore_fn
    from arkd.evaluation.metrics import exact_match_per_row, mean_x100, rouge_l_per_row

    if not examples:
        raise ValueError("evaluate_model needs at least one example; got none.")
    if not seeds:
        raise ValueError("evaluate_model needs at least one seed; got none.")
    decoding = decoding or DecodingConfig()
    if max_new_tokens is not None:
        decoding = replace(decoding, max_new_tokens=max_new_tokens)
    prompts = [_field(ex, "prompt") for ex in examples]
    references = [_references(ex) for ex in examples]
    prefix = f"{desc} " if desc else ""
    generations: dict[str, list[str]] = {}
    per_row: dict[str, dict[str, list[float]]] = {}
    per_seed: dict[str, dict[int, float]] = {}
    bert_settings: dict[str, Any] | None = None
    for seed in (int(s) for s in seeds):
        outputs = generate(
            model,
            tokenizer,
            prompts,
            seed=seed,
            batch_size=batch_size,
            decoding=decoding,
            progress=progress,
            desc=f"{prefix}generate (seed {seed})",
        )
        rows = {
            "rougeL": rouge_l_per_row(outputs, references, workers=rouge_workers, progress=progress),
            "exact_match": exact_match_per_row(outputs, references),
        }
        if bertscore is not None:
            result = bertscore_fn(
                outputs,
                references,
                model_type=bertscore.model_type,
                num_layers=bertscore.num_layers,
                batch_size=bertscore.batch_size,
                idf=bertscore.idf,
                rescale_with_baseline=bertscore.rescale_with_baseline,
                lang=bertscore.lang,
                device=bertscore.device,
                progress=progress,
            )
            rows["bertscore_f1"] = result["f1_per_row"]
            for part in ("f1", "precision", "recall"):
                per_seed.setdefault(f"bertscore_{part}", {})[seed] = result[part]
            bert_settings = {k: v for k, v in result.items() if k not in ("f1", "precision", "recall", "f1_per_row")}
        for name in ("rougeL", "exact_match"):
            per_seed.setdefault(name, {})[seed] = mean_x100(rows[name])
        generations[str(seed)] = outputs
        per_row[str(seed)] = rows
    report: dict[str, Any] = {"n_rows": len(examples), "seeds": [int(s) for s in seeds], "decoding": decoding.to_dict()}
    for name, values in per_seed.items():
        report[name] = summarize(values)
    if bert_settings is not None:
        report["bertscore"] = bert_settings
    report["generations"] = generations
    report["per_row"] = per_row
    return report


def summarize(per_seed: dict[int, float]) -> dict[str, Any]:
    """``{"mean", "std", "per_seed"}`` of one metric over seeds: mean and sample std (ddof=1; None for one seed)."""
    values = list(per_seed.values())
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
        "per_seed": {str(seed): value for seed, value in per_seed.items()},
    }


def _field(example: Any, name: str) -> Any:
    if isinstance(example, dict):
        return example[name]
    return getattr(example, name)


def _references(example: Any) -> list[str]:
    if isinstance(example, dict) and "references" not in example and "output" in example:
        refs = example["output"]
    else:
        refs = _field(example, "references")
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs or any(not isinstance(r, str) for r in refs):
        raise ValueError(f"an example has references {refs!r}; expected a non-empty list of strings.")
    return refs
