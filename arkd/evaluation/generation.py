"""Generation under the protocol's decoding, and ``evaluate_model`` (generation + metrics over several seeds).

What LMOps ``minillm/`` does, and what this module reproduces (see docs/evaluation.md for the sources):

- the prompt string's ``"<n>"`` becomes a newline; it is encoded with the model's tokenizer (GPT-2 adds no BOS) and
  only its **first** ``max_prompt_tokens`` (256) tokens are kept (``prompt_ids[:256]``: long prompts lose their end);
- prompts are left-padded with the end-of-text id and decoded together with the KV cache;
- sampling with temperature 1, top_p 1, top_k 0 (no top-k filter), ``no_repeat_ngram_size`` 6, at most 256 new
  tokens, one sample per prompt;
- each response is decoded with special tokens skipped, cut at the first end-of-text, ``"<n>"`` turned into a
  newline and stripped.

Where arkd departs from LMOps: each row draws its tokens from its own random stream, seeded by ``(seed, row)``
(:func:`row_generator`), instead of one stream shared by the whole pass. A row's generation then depends on the seed,
the row's index and the model, not on the batch size, the order of the rows or how they are split over processes;
rows are sorted longest prompt first before batching (less padding), and sharded over processes by
:mod:`arkd.evaluation.sharding`.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
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
    """``generate``'s settings: the length, the n-gram ban and the repetition penalty; token selection is greedy
    over the processed scores, and sampling (when ``decoding.do_sample``) is :class:`_RowSampler`'s, which leaves
    all the mass on the token it drew.

    Every setting that adds a logits processor is given a value (the neutral one where ``decoding`` has none):
    ``generate`` fills a ``None`` from the checkpoint's own ``generation_config.json`` (which may set a repetition
    penalty or an n-gram ban), which would silently change the protocol's decoding.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=decoding.max_new_tokens,
        min_new_tokens=0,
        min_length=0,
        no_repeat_ngram_size=decoding.no_repeat_ngram_size,
        repetition_penalty=decoding.repetition_penalty if decoding.repetition_penalty is not None else 1.0,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        num_beams=1,
        use_cache=True,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def _model_device(model) -> torch.device:
    try:
        return model.device
    except AttributeError:
        return next(model.parameters()).device


def row_seed(seed: int, row: int) -> int:
    """The 63-bit seed of one row under one seed: the first 8 bytes of ``blake2b("{seed}:{row}")`` (different rows
    and seeds get unrelated streams; any integers are accepted)."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(row)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def row_generator(seed: int, row: int) -> torch.Generator:
    """The CPU random stream of one row under one seed: a ``torch.Generator`` seeded with :func:`row_seed`."""
    return torch.Generator(device="cpu").manual_seed(row_seed(seed, row))


def sample_rows(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from ``softmax(scores)`` by inverse-CDF sampling with the given uniform draws.

    Row ``i`` gets the first token whose cumulative probability exceeds ``uniforms[i] * total`` (computed in
    float64), so a token of probability 0 (filtered to ``-inf``) is never drawn and each row's token depends only on
    its own scores and its own draw.

    Args:
        scores: ``[B, V]`` processed logits (``-inf`` for banned tokens).
        uniforms: ``[B]`` draws in [0, 1).

    Returns:
        ``[B]`` long token ids.
    """
    probs = torch.softmax(scores.double(), dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(device=cdf.device, dtype=torch.float64) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=scores.shape[-1] - 1)
    drawn = probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if bool((drawn <= 0).any()):  # rounding put the target at the very end: take the last token with mass
        last = scores.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
        tokens = torch.where(drawn > 0, tokens, last)
    return tokens


class _RowSampler:
    """A logits processor that draws each row's next token with that row's generator and returns scores with all
    the mass on it (``generate`` runs greedy selection over them, so it picks the drawn token)."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        tokens = sample_rows(scores, uniforms)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens.unsqueeze(1), 0.0)


def _sampling_processors(decoding: DecodingConfig, generators: Sequence[torch.Generator]) -> list:
    """Temperature, top-k and top-p (as ``generate`` applies them when sampling, in that order), then the sampler."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors: list = []
    if decoding.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_k:
        processors.append(TopKLogitsWarper(top_k=decoding.top_k))
    if decoding.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=decoding.top_p))
    return [*processors, _RowSampler(generators)]


def decode_response(tokenizer, response: Sequence[int], decoding: DecodingConfig, stop_ids: set[int]) -> str:
    """A generated token list as the protocol's cleaned text: cut at the first stop id, decoded with special tokens
    skipped, the transformers 4.x clean-up (when set), then :func:`clean_output`."""
    response = list(response)
    end = next((i for i, tok in enumerate(response) if tok in stop_ids), len(response))
    text = tokenizer.decode(response[:end], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if decoding.clean_up_tokenization_spaces:
        text = legacy_cleanup(text)
    return clean_output(text, tokenizer.eos_token)


def stop_ids_of(tokenizer) -> tuple[int, int]:
    """The tokenizer's end-of-text id and pad id (the eos when it has no pad token); refuses a tokenizer without eos."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; generation needs an end-of-text token to stop at.")
    return eos_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id


def length_order(encoded: Sequence[Sequence[int]]) -> list[int]:
    """Row indices longest first (ties in row order): batches of similar lengths need less padding."""
    return sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    seed: int,
    batch_size: int = 16,
    decoding: DecodingConfig | None = None,
    row_ids: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Generate one cleaned response per prompt under the protocol's decoding.

    Rows are batched longest prompt first; each row samples from its own random stream
    (:func:`row_generator` of ``seed`` and its row id), so the responses do not depend on ``batch_size``, on the
    order of ``prompts`` or on which other rows share a batch (up to the last-bit differences a batch's padding
    width can make in the model's logits).

    Args:
        model: a causal LM (``transformers`` ``generate`` API).
        tokenizer: its tokenizer; its end-of-text token ends generation and pads the prompts (on the left).
        prompts: ``N`` prompt strings (``"<n>"`` stands for a newline).
        seed: the pass's seed; with a row's id it seeds that row's random stream.
        batch_size: prompts per ``generate`` call.
        decoding: decoding settings (default: the protocol's sampling; ``GREEDY`` for greedy decoding).
        row_ids: each prompt's row index in its dataset (default ``0 .. N-1``); a shard of a dataset passes the
            rows' indices in the whole dataset, so that it samples what the unsharded pass samples.
        progress: show a progress bar over batches.
        desc: the progress bar's label.

    Returns:
        ``N`` cleaned response strings, in the order of ``prompts``.
    """
    from transformers import LogitsProcessorList

    decoding = decoding or DecodingConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    row_ids = list(range(len(prompts))) if row_ids is None else [int(r) for r in row_ids]
    if len(row_ids) != len(prompts):
        raise ValueError(f"row_ids has {len(row_ids)} entries for {len(prompts)} prompts; expected one per prompt.")
    eos_id, pad_id = stop_ids_of(tokenizer)
    config = _generation_config(decoding, eos_id, pad_id)
    stop_ids = {eos_id, pad_id}
    device = _model_device(model)
    was_training = model.training
    model.eval()
    encoded = encode_prompts(tokenizer, prompts, decoding.max_prompt_tokens)
    order = length_order(encoded)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from arkd.progress import progress_bar

        batches = progress_bar(batches, desc=desc, unit="batch")
    outputs: list[str | None] = [None] * len(prompts)
    try:
        for batch in batches:
            input_ids, attention_mask = left_pad([encoded[i] for i in batch], pad_id)
            processors = []
            if decoding.do_sample:
                processors = _sampling_processors(decoding, [row_generator(seed, row_ids[i]) for i in batch])
            sequences = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
            )
            for i, response in zip(batch, sequences[:, input_ids.shape[1] :].tolist()):
                outputs[i] = decode_response(tokenizer, response, decoding, stop_ids)
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]


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
    generate_fn: Callable[..., list[str]] | None = None,
    shard: bool = True,
    teacher=None,
    head_top_p: float = 0.9,
    diversity: bool = True,
) -> dict[str, Any]:
    """Generate for every example under every seed and score the generations with the protocol's metrics, and
    the distribution-level ones (:mod:`arkd.evaluation.distribution`).

    Under a process group (``torchrun`` / ``accelerate launch``) every process must call this with the same
    arguments: each generates its share of the rows (:mod:`arkd.evaluation.sharding`), the main process scores the
    gathered generations, and every process returns the same report, equal to a single process's.

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
        generate_fn: the generation backend, ``(prompts, *, seed, row_ids, progress, desc) -> list[str]``
            (default: :func:`generate` with ``model``, ``tokenizer``, ``batch_size`` and ``decoding``; e.g.
            :class:`arkd.evaluation.vllm_backend.VLLMGenerator`).
        shard: share the rows over the processes of a process group (False: this process generates every row,
            e.g. when only one process calls this).
        teacher: a teacher sharing the tokenizer; when given, ``fkl``, ``rkl``, ``head_recall`` and ``tail_recall``
            are measured teacher-forced on the references (``head_top_p``: the head's mass threshold).
        head_top_p: p of the teacher's top-p head (0.9).
        diversity: add ``distinct_1``, ``distinct_2`` (all samples of all seeds) and ``self_bleu`` (between the
            seeds' samples of each prompt; only with two seeds or more).

    Returns:
        A dict with ``n_rows``, ``seeds``, ``decoding`` (the settings used), one entry per metric (``rougeL``,
        ``exact_match`` and, with BERTScore, ``bertscore_f1``, ``bertscore_precision``, ``bertscore_recall``), each
        ``{"mean", "std", "per_seed"}`` on the 0-100 scale (``per_seed`` maps the seed, as a string, to the
        protocol's number for that seed; ``std`` is the sample std over seeds, None for one seed), the
        distribution-level metrics as pooled blocks (``{"mean", "std": None, "per_seed": {}}``), ``bertscore``
        (the BERTScore settings, when enabled), ``generations`` (seed -> ``N`` cleaned responses) and ``per_row``
        (seed -> metric -> ``N`` per-row scores in [0, 1], for paired comparisons), ``num_processes`` and
        ``rows_per_process`` (how many rows each process generated per seed).
    """
    from arkd import distributed as pdist
    from arkd.evaluation.sharding import generate_sharded

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
    if generate_fn is None:
        generate_fn = partial(generate, model, tokenizer, batch_size=batch_size, decoding=decoding)
    sharded = shard and pdist.is_distributed()
    lengths = [len(row) for row in encode_prompts(tokenizer, prompts, decoding.max_prompt_tokens)]
    generations: dict[str, list[str]] = {}
    rows_per_process = [len(prompts)]
    for seed in (int(s) for s in seeds):
        label = f"{prefix}generate (seed {seed})"
        if sharded:
            outputs, rows_per_process = generate_sharded(
                generate_fn, prompts, lengths, seed=seed, progress=progress, desc=label
            )
        else:
            outputs = generate_fn(prompts, seed=seed, row_ids=range(len(prompts)), progress=progress, desc=label)
        generations[str(seed)] = outputs
    protocol = partial(_report, examples, seeds, decoding, generations, references, bertscore, rouge_workers, progress)

    def score(rows: list[int]) -> dict[str, Any]:
        report = protocol(rows)
        report.update(
            distribution_blocks(
                generations,
                model=model,
                teacher=teacher,
                tokenizer=tokenizer,
                examples=examples,
                top_p=head_top_p,
                batch_size=batch_size,
                max_prompt_length=decoding.max_prompt_tokens,
                max_length=decoding.max_prompt_tokens + decoding.max_new_tokens,
                diversity=diversity,
            )
        )
        return report

    if not sharded:
        return score(rows_per_process)
    # Scored once, on the main process; the others receive its report (or its error, so that none waits forever).
    report, error = None, None
    if pdist.rank() == 0:
        try:
            report = score(rows_per_process)
        except Exception as err:
            error = err
    report, message = pdist.broadcast_object((report, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"scoring failed on the main process ({message}).")
    return report


def _report(examples, seeds, decoding, generations, references, bertscore, rouge_workers, progress, rows_per_process):
    report = _score(generations, references, bertscore, rouge_workers, progress)
    report = {"n_rows": len(examples), "seeds": [int(s) for s in seeds], "decoding": decoding.to_dict(), **report}
    report["num_processes"] = len(rows_per_process)
    report["rows_per_process"] = list(rows_per_process)
    return report


def _score(
    generations: dict[str, list[str]],
    references: list[list[str]],
    bertscore: BertScoreSettings | None,
    rouge_workers: int | None,
    progress: bool,
) -> dict[str, Any]:
    """The metrics of every seed's generations: summaries, BERTScore settings, generations and per-row scores."""
    from arkd.evaluation.metrics import bertscore as bertscore_fn
    from arkd.evaluation.metrics import exact_match_per_row, mean_x100, rouge_l_per_row

    per_row: dict[str, dict[str, list[float]]] = {}
    per_seed: dict[str, dict[int, float]] = {}
    bert_settings: dict[str, Any] | None = None
    for key, outputs in generations.items():
        seed = int(key)
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
        per_row[key] = rows
    report: dict[str, Any] = {name: summarize(values) for name, values in per_seed.items()}
    if bert_settings is not None:
        report["bertscore"] = bert_settings
    report["generations"] = generations
    report["per_row"] = per_row
    return report


def distribution_blocks(
    generations: dict[str, list[str]],
    *,
    model=None,
    teacher=None,
    tokenizer=None,
    examples: Sequence[Any] = (),
    top_p: float = 0.9,
    batch_size: int = 16,
    max_prompt_length: int = 256,
    max_length: int = 512,
    diversity: bool = True,
) -> dict[str, dict[str, Any]]:
    """The distribution-level score blocks of one model on one dataset (:mod:`arkd.evaluation.distribution`).

    ``distinct_1`` / ``distinct_2`` over every sample of every seed and ``self_bleu`` (two seeds or more) when
    ``diversity``; ``fkl``, ``rkl``, ``head_recall``, ``tail_recall`` when a ``teacher`` is given (a metric that is
    undefined, such as the tail recall of a teacher with no tail, is left out).
    """
    from arkd.evaluation.distribution import distinct_n, pooled_block, self_bleu, teacher_forced_metrics

    blocks: dict[str, dict[str, Any]] = {}
    if diversity:
        texts = [t for outputs in generations.values() for t in outputs]
        blocks["distinct_1"] = pooled_block(distinct_n(texts, 1))
        blocks["distinct_2"] = pooled_block(distinct_n(texts, 2))
        value = self_bleu(generations)
        if value is not None:
            blocks["self_bleu"] = pooled_block(value)
    if teacher is not None:
        tf = teacher_forced_metrics(
            model,
            teacher,
            tokenizer,
            examples,
            top_p=top_p,
            batch_size=batch_size,
            max_prompt_length=max_prompt_length,
            max_length=max_length,
        )
        for key in ("fkl", "rkl", "head_recall", "tail_recall"):
            if math.isfinite(tf[key]):
                blocks[key] = pooled_block(tf[key])
    return blocks


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
