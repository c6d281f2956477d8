"""Limits knowable from the config and the data, checked before any model is trained (the teacher's SFT included):
the longest sequence a model will see (a training row; a validation prompt and its new tokens) against the model's
positions, and its vocabulary against the tokenizer's. Past either limit a run would end in a bare ``IndexError``
inside the embedding, after the SFT had started."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from arkd.errors import ConfigError

__all__ = ["check_model_limits", "declared_limits"]


def declared_limits(node: DictConfig, tokenizer: Any) -> tuple[int | None, int | None, str]:
    """A model config's positions and vocabulary rows (None when the config does not say), without building the
    model, and the key that sets them (``n_positions`` of a tiny model, the Hub / local model's ``config.json``)."""
    from arkd.teacher_cache import model_node

    node = model_node(node)
    positions = node.get("n_positions")
    vocab = node.get("vocab_size") if "vocab_size" in node else None
    if "vocab_size" in node and vocab is None:
        vocab = len(tokenizer)  # filled with the tokenizer's size (arkd.recipes.build.build_model)
    source = node.get("name_or_path")
    if source is not None and (positions is None or vocab is None):
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(source))
        except (OSError, ValueError):  # loading reports it with its own sentence
            return positions, vocab, "name_or_path"
        positions = positions or getattr(config, "n_positions", None)
        positions = positions or getattr(config, "max_position_embeddings", None)
        vocab = vocab or getattr(config, "vocab_size", None)
        return positions, vocab, f"name_or_path={source}"
    return positions, vocab, "n_positions"


def check_model_limits(
    cfg: DictConfig,
    tokenizer: Any,
    *,
    longest_row: int,
    models: dict[str, DictConfig],
    generations: list[tuple[str, str, int, int]] = (),
) -> None:
    """Refuse, in one sentence naming the config key, a sequence longer than a model's positions or a vocabulary
    that does not fit the tokenizer.

    Args:
        cfg: the composed config (``data.max_length``).
        tokenizer: the run's tokenizer.
        longest_row: the longest sequence trained on (a tokenized training row, or ``data.max_length`` when a
            rollout generates the responses), in tokens.
        models: ``{"model": cfg.model, "teacher": cfg.teacher, ...}``, the configs of the models the run builds.
        generations: ``(key, model, longest_prompt, new_tokens)`` for every generation the run makes
            (``validation.max_new_tokens`` by the student, ``report.max_new_tokens`` by both, ...).
    """
    from arkd.models import MAX_VOCAB_PADDING

    tokens = len(tokenizer)
    for key, node in models.items():
        if node is None:
            continue
        positions, vocab, source = declared_limits(node, tokenizer)
        if positions is not None and longest_row > positions:
            raise ConfigError(
                f"data.max_length: the longest training row has {longest_row} tokens (data.max_length="
                f"{cfg.data.max_length}), and {key} has {positions} positions ({key}.{source}); expected rows of at "
                f"most {positions} tokens (lower data.max_length, or a model with more positions)."
            )
        for what, role, longest_prompt, new_tokens in generations:
            if role == key and positions is not None and longest_prompt + new_tokens > positions:
                raise ConfigError(
                    f"{what}: got {new_tokens}, and the longest prompt it completes has {longest_prompt} tokens, "
                    f"{longest_prompt + new_tokens} in all, but {key} has {positions} positions ({key}.{source}); "
                    f"expected at most {max(positions - longest_prompt, 0)} new tokens (or a shorter "
                    "data.max_prompt_length)."
                )
        if vocab is not None and not tokens <= int(vocab) <= tokens + MAX_VOCAB_PADDING:
            where = f"{key}.vocab_size" if source == "n_positions" else f"{key}.{source}"
            raise ConfigError(
                f"{where}: the model has {vocab} vocabulary rows and the tokenizer {tokens} tokens; expected between "
                f"{tokens} and {tokens + MAX_VOCAB_PADDING} rows (the tokenizer's own model; vocab_size: null fills "
                "in the tokenizer's size)."
            )
