"""Distribution-level metrics: where the student's distribution sits against the teacher's; how varied its samples are.

Rouge-L scores one sample against the references; it cannot tell a student that covers the teacher's long tail from
one that commits to its principal modes. These metrics can (docs/evaluation.md, "Distribution-level metrics"):

- ``fkl``, ``rkl`` — teacher-forced per-token KL(p || q) and KL(q || p) on the references (every reference of a row
  counts), in nats per token (:func:`teacher_forced_metrics`; needs the teacher);
- ``head_recall``, ``tail_recall`` — the student's probability mass on the teacher's top-p head (the smallest set of
  tokens with teacher mass >= p, p = 0.9 by default) and on the rest, each relative to the teacher's own mass there
  (1.0: the same as the teacher) — over the same teacher-forced positions;
- ``distinct_1``, ``distinct_2`` — distinct n-grams over all n-grams of all samples of all seeds, 0-100
  (:func:`distinct_n`);
- ``self_bleu`` — BLEU of each seed's sample of a prompt against the other seeds' samples of that prompt (sacrebleu),
  averaged over seeds and prompts, 0-100 (:func:`self_bleu`; needs two seeds or more).

Each value is one number per (model, dataset): the teacher-forced ones do not depend on the decoding seed and the
diversity ones pool the seeds, so their score blocks are ``{"mean": v, "std": None, "per_seed": {}}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "DISTRIBUTION_METRICS",
    "DIVERSITY_METRICS",
    "TEACHER_FORCED_METRICS",
    "distinct_n",
    "head_tail_masses",
    "pooled_block",
    "self_bleu",
    "teacher_forced_metrics",
    "token_divergences",
]

TEACHER_FORCED_METRICS = ("fkl", "rkl", "head_recall", "tail_recall")
DIVERSITY_METRICS = ("distinct_1", "distinct_2", "self_bleu")
DISTRIBUTION_METRICS = (*TEACHER_FORCED_METRICS, *DIVERSITY_METRICS)


def pooled_block(value: float) -> dict[str, Any]:
    """A score block for a metric that pools the seeds (or does not depend on them): no per-seed values."""
    return {"mean": round(float(value), 6), "std": None, "per_seed": {}}


# --------------------------------------------------------------------------------------------------------------------
# Diversity of the samples


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n: the number of different n-grams over the number of n-grams, x 100, pooled over ``texts``.

    Texts are split on whitespace; n-grams never cross from one text to the next. 0.0 when no text has ``n`` tokens.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}.")
    if isinstance(texts, str):
        raise TypeError("distinct_n takes a sequence of texts, not a single string.")
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        grams = _ngrams(text.split(), n)
        total += len(grams)
        seen.update(grams)
    return 100.0 * len(seen) / total if total else 0.0


def self_bleu(generations: dict[Any, Sequence[str]] | Sequence[Sequence[str]]) -> float | None:
    """Self-BLEU between the seeds' samples of each prompt (sacrebleu ``sentence_bleu``, its default settings).

    For prompt i and seed s, the hypothesis is seed s's sample and the references are the other seeds' samples of
    prompt i; the score (0-100) is averaged over seeds and prompts. High: the seeds say the same thing.

    Args:
        generations: seed -> one sample per prompt (or a list of such lists), every seed with the same prompts.

    Returns:
        The mean self-BLEU, or None with fewer than two seeds (it is undefined).
    """
    import sacrebleu

    passes = list(generations.values()) if isinstance(generations, dict) else list(generations)
    if len(passes) < 2:
        return None
    n_rows = len(passes[0])
    if any(len(p) != n_rows for p in passes):
        raise ValueError(f"self_bleu needs the same prompts under every seed; got {[len(p) for p in passes]} samples.")
    if n_rows == 0:
        raise ValueError("self_bleu needs at least one prompt; got none.")
    scores = []
    for i in range(n_rows):
        for s, hyp_pass in enumerate(passes):
            refs = [p[i] for j, p in enumerate(passes) if j != s]
            scores.append(sacrebleu.sentence_bleu(hyp_pass[i], refs).score)
    return math.fsum(scores) / len(scores)


# --------------------------------------------------------------------------------------------------------------------
# Teacher-forced divergences and head / tail mass


def token_divergences(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL(p || q) and KL(q || p), p = softmax(teacher), q = softmax(student), over the last dimension."""
    log_p = torch.log_softmax(teacher_logits.double(), dim=-1)
    log_q = torch.log_softmax(student_logits.double(), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    return (p * (log_p - log_q)).sum(-1), (q * (log_q - log_p)).sum(-1)


def head_tail_masses(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, top_p: float = 0.9
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student mass on the teacher's top-p head and on its tail, per position.

    The head is the smallest set of the teacher's most probable tokens whose mass reaches ``top_p`` (the token that
    crosses the threshold belongs to it, so the head is never empty); the tail is every other token.

    Returns:
        ``(p_head, q_head, p_tail, q_tail)``, each of the logits' leading shape.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    p = torch.softmax(teacher_logits.double(), dim=-1)
    q = torch.softmax(student_logits.double(), dim=-1)
    sorted_p, order = p.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # teacher mass of the tokens ranked above each one
    in_head_sorted = before < top_p
    in_head = torch.zeros_like(in_head_sorted).scatter(-1, order, in_head_sorted)
    p_head = (p * in_head).sum(-1)
    q_head = (q * in_head).sum(-1)
    return p_head, q_head, (p * ~in_head).sum(-1), (q * ~in_head).sum(-1)


def _expand_references(examples: Sequence[Any]):
    """One (prompt, reference) example per reference of every row."""
    from arkd.data.example import Example

    out = []
    for ex in examples:
        prompt = ex["prompt"] if isinstance(ex, dict) else ex.prompt
        refs = ex.get("references", ex.get("output")) if isinstance(ex, dict) else ex.references
        refs = [refs] if isinstance(refs, str) else list(refs)
        for ref in refs:
            out.append(Example(instruction="", input="", references=[ref], prompt=prompt))
    return out


@torch.no_grad()
def teacher_forced_metrics(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    *,
    top_p: float = 0.9,
    batch_size: int = 16,
    max_prompt_length: int = 256,
    max_length: int = 512,
) -> dict[str, float]:
    """``fkl``, ``rkl``, ``head_recall`` and ``tail_recall`` of ``student`` against ``teacher`` on the references.

    Every (prompt, reference) pair of every row is fed to both models (prompt tokens, then the reference and the
    end-of-text token, as in training); at each position that predicts a reference token, p is the teacher's
    next-token distribution and q the student's. Then, over all N such positions t,

        fkl = (1/N) sum_t KL(p_t || q_t),  rkl = (1/N) sum_t KL(q_t || p_t),
        head_recall = sum_t q_t(H_t) / sum_t p_t(H_t),  tail_recall = sum_t q_t(T_t) / sum_t p_t(T_t),

    with H_t the teacher's top-p head at t and T_t its complement (:func:`head_tail_masses`). The models must share
    the tokenizer; a larger embedding table (padded vocabulary) is cut to the tokenizer's size on both sides.

    Raises:
        ValueError: no example, or no position left after tokenization.
    """
    from arkd.data.collate import TrainingCollator
    from arkd.data.tokenization import tokenize_examples

    pairs = _expand_references(examples)
    if not pairs:
        raise ValueError("teacher_forced_metrics needs at least one example; got none.")
    items, _ = tokenize_examples(
        pairs,
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_length=max_length,
        overlong_prompt="truncate",
    )
    # Longest first: batches of similar lengths pad little (the sums below do not depend on the order).
    items = sorted(items, key=lambda it: -(len(it.prompt_ids) + len(it.response_ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = TrainingCollator(pad)
    vocab = len(tokenizer)
    device = next(student.parameters()).device
    t_device = next(teacher.parameters()).device
    sums = {"fkl": 0.0, "rkl": 0.0, "p_head": 0.0, "q_head": 0.0, "p_tail": 0.0, "q_tail": 0.0}
    n = 0
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate([{"prompt_ids": it.prompt_ids, "response_ids": it.response_ids} for it in chunk])
            ids, attn = batch["input_ids"], batch["attention_mask"]
            s_logits = student(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[..., :vocab]
            t_logits = teacher(input_ids=ids.to(t_device), attention_mask=attn.to(t_device)).logits[..., :vocab]
            mask = batch["loss_mask"][:, 1:].to(device)
            s = s_logits[:, :-1][mask].float()
            t = t_logits[:, :-1].to(device)[mask].float()
            fkl, rkl = token_divergences(t, s)
            p_head, q_head, p_tail, q_tail = head_tail_masses(t, s, top_p)
            sums["fkl"] += float(fkl.sum())
            sums["rkl"] += float(rkl.sum())
            for key, value in (("p_head", p_head), ("q_head", q_head), ("p_tail", p_tail), ("q_tail", q_tail)):
                sums[key] += float(value.sum())
            n += int(mask.sum())
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    if n == 0:
        raise ValueError("teacher_forced_metrics: no reference token left after tokenization; check max_length.")
    return {
        "fkl": sums["fkl"] / n,
        "rkl": sums["rkl"] / n,
        "head_recall": sums["q_head"] / sums["p_head"],
        "tail_recall": sums["q_tail"] / sums["p_tail"] if sums["p_tail"] > 0 else math.nan,
        "n_tokens": n,
    }
