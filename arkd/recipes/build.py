"""The building blocks the recipes share: the accelerator, models from their config, the training stream, the
learning-rate schedule, and quiet third-party logging."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from arkd.errors import ConfigError
from arkd.trainer import BatchStream

__all__ = [
    "build_model",
    "check_one_job",
    "check_processes_agree",
    "make_accelerator",
    "make_loader",
    "make_scheduler",
    "quiet_libraries",
]


def make_accelerator(cfg: DictConfig):
    """The ``accelerate.Accelerator`` of a run (precision, CPU, gradient accumulation from ``cfg.trainer``)."""
    from accelerate import Accelerator

    precision = str(cfg.trainer.precision)
    if precision not in ("no", "fp16", "bf16", "fp32"):
        raise ConfigError(f"trainer.precision must be no, fp16 or bf16, got {precision!r}.")
    return Accelerator(
        mixed_precision="no" if precision == "fp32" else precision,
        cpu=bool(cfg.trainer.cpu),
        gradient_accumulation_steps=int(cfg.trainer.grad_accum),
        step_scheduler_with_optimizer=False,
    )


def check_one_job(accelerator: Any, *, cpu_key: str = "trainer.cpu") -> None:
    """Refuse a launch whose processes did not join one distributed job: ``torchrun`` / ``accelerate launch`` of N
    processes (``WORLD_SIZE`` = N) where accelerate started fewer (on CPUs without ``trainer.cpu=true``), which would
    run N independent single-process jobs into one run directory."""
    import os

    launched = os.environ.get("WORLD_SIZE", "1")
    launched = int(launched) if launched.isdigit() else 1
    if launched > accelerator.num_processes:
        raise ConfigError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but they did not join one distributed job "
            f"(each runs alone: {accelerator.num_processes} process(es), {accelerator.distributed_type}); on CPUs "
            f"set {cpu_key}=true (gloo), on GPUs give every process one; expected one job, not {launched} "
            "independent runs writing into one run directory."
        )


def check_processes_agree(record: dict[str, Any], what: str = "run") -> None:
    """Refuse, on every process, processes that were not asked the same (``record``: the resolved config, the models'
    fingerprints); a no-op in one process."""
    from arkd import distributed as pdist

    if pdist.world_size() < 2:
        return
    problem = pdist.disagreement(record)
    if problem is not None:
        raise ConfigError(
            f"the {pdist.world_size()} processes of this {what} were not asked the same: {problem}; expected one "
            "command (the same arguments, models and data) for every process."
        )


def build_model(node: DictConfig, tokenizer: Any) -> torch.nn.Module:
    """Instantiate a model config; a ``vocab_size: null`` (tiny models) is filled with ``len(tokenizer)``; a
    ``lora`` mapping (r, alpha, dropout, target_modules) wraps the model in LoRA adapters
    (:func:`arkd.models.apply_lora`)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from arkd.teacher_cache import model_node

    node = model_node(node)  # a teacher's cache keys (teacher.cache_dir, teacher.top_k) are not the model's
    lora = node.get("lora") if isinstance(node, DictConfig) else None
    if isinstance(node, DictConfig) and "lora" in node:
        plain = OmegaConf.to_container(node, resolve=False)
        plain.pop("lora")
        node = OmegaConf.create(plain, parent=node._get_parent())
    if "vocab_size" in node and node.vocab_size is None:
        model = instantiate(node, vocab_size=len(tokenizer))
    else:
        model = instantiate(node)
    if lora is not None:
        from arkd.models import apply_lora

        model = apply_lora(model, **OmegaConf.to_container(lora, resolve=True))
    return model


def make_loader(
    dataset: Any, collate: Any, batch_size: int, seed: int, accelerator: Any, group_by_length: int | None = None
) -> BatchStream:
    """An endless, seeded, resumable stream of training batches sharded over the accelerator's processes
    (``group_by_length``: batches per length-sorted group, see ``arkd.data.build_dataloader``)."""
    from arkd.data import build_dataloader

    loader = build_dataloader(
        dataset,
        batch_size=batch_size,
        collate_fn=collate,
        shuffle=True,
        seed=seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        drop_last=True,
        group_by_length=group_by_length,
    )
    return BatchStream(loader)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, max_steps: int):
    """Warm-up then decay (``transformers.get_scheduler``: linear, cosine, constant_with_warmup, ...)."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def quiet_libraries() -> None:
    """Keep the console to arkd's own progress bars (no per-file bars of transformers' loading and saving)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
