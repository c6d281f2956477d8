"""The SFT cache: a model that needs a supervised fine-tuning before use (the tiny job's teacher and student) is trained
once with the trainer and the cross-entropy loss, saved under ``cache_dir`` keyed by a hash of everything that decides
its weights (its model config, SFT options and seed, the data and tokenizer configs, the number of processes and
arkd's version), and loaded from there by every later run.

Runs that need the same model at the same time (a parallel sweep) each train it in a work directory of their own;
the first to finish publishes it by renaming, and the others keep the published copy and discard theirs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import arkd
from arkd.recipes.build import build_model, make_loader, make_scheduler
from arkd.trainer import RunFailedError, Trainer, TrainerConfig, TrainingInterrupted

__all__ = ["sft_cached"]


def _publish(work: Path, path: Path) -> None:
    """Move the trained model from ``work`` to ``path``, unless a concurrent run of the same SFT published it first
    (then its copy is kept and this one discarded); an incomplete ``path`` (no weights) is replaced."""
    from arkd.checkpoint import write_manifest

    shutil.copy(work / "metrics.jsonl", work / "final" / "sft_metrics.jsonl")
    write_manifest(work / "final")  # sizes and SHA-256 of every file, verified whenever the entry is reused
    if path.exists() and not (path / "model.safetensors").is_file():
        shutil.rmtree(path, ignore_errors=True)
    try:
        (work / "final").rename(path)
    except OSError:  # the target appeared meanwhile (another run finished first): a non-empty directory
        if not (path / "model.safetensors").is_file():
            raise
    shutil.rmtree(work, ignore_errors=True)


ABSENT = "absent"


def entry_problem(path: Path) -> str | None:
    """What is wrong with the cache entry ``path`` in a few words (``absent`` when there is none), or None when its
    files match its ``manifest.json`` (size and SHA-256)."""
    from arkd.checkpoint import verify_manifest

    if not path.exists():
        return ABSENT
    if not (path / "model.safetensors").is_file():
        return "model.safetensors is missing"
    return verify_manifest(path)


def _discard(path: Path) -> None:
    """Move a bad cache entry out of the way (renamed first, so no run ever loads it half-deleted), then delete it."""
    aside = path.with_name(f".bad-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another run removed it meanwhile
        return
    shutil.rmtree(aside, ignore_errors=True)


def _config_hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def sft_cached(
    role: str,
    node: DictConfig,
    options: DictConfig,
    *,
    cfg: DictConfig,
    tokenizer: Any,
    train_dataset: Any,
    collate: Any,
    accelerator: Any,
) -> tuple[torch.nn.Module, Path]:
    """Train ``node``'s model by SFT (cross-entropy on the responses) once, cache it, and load it.

    Args:
        role: "teacher" or "student" (names the cache entry and the progress bar).
        node: the model config.
        options: ``max_steps``, ``lr``, ``batch_size`` and optionally ``warmup_steps``, ``lr_schedule``,
            ``weight_decay``, ``max_grad_norm``.
        cfg: the whole config (data, tokenizer and cache_dir enter the key).
        tokenizer: the tokenizer.
        train_dataset: the tokenized training split.
        collate: the training collator.
        accelerator: the run's accelerator.

    Returns:
        The trained model (loaded from the cache) and its cache directory.
    """
    from arkd.models import load_model
    from arkd.teacher_cache import model_node

    # The SFT's data order: its own `seed` option, else the model's init seed, else the run's seed. It enters the key,
    # so two runs share a cached model only when they would train the same one (the matrix pins `teacher.seed`).
    sft_seed = int(options.get("seed", node.get("seed", cfg.seed)))
    key = _config_hash(
        role,
        sft_seed,
        _container(model_node(node)),  # without teacher.cache_dir / top_k: the same SFT'd teacher either way
        _container(options),
        _container(cfg.data),
        _container(cfg.tokenizer),
        accelerator.num_processes,
        arkd.__version__,
    )
    from arkd.checkpoint import model_problem
    from arkd.distributed import broadcast_object

    root = Path(str(cfg.cache_dir)).expanduser()
    path = root / f"{role}-sft-{key}"
    train = partial(
        _train_sft, role, node, options, path, cfg=cfg, tokenizer=tokenizer, train_dataset=train_dataset,
        collate=collate, accelerator=accelerator, sft_seed=sft_seed,
    )  # fmt: skip
    # Every entry is verified before it is used (its files against its manifest, then the model's outputs on a probe
    # input); a bad one is named, discarded and trained again, once.
    for attempt in range(2):
        problem = broadcast_object(entry_problem(path) if accelerator.is_main_process else None)
        if problem is None:
            accelerator.print(f"arkd: reusing the SFT'd {role} from {path}")
        else:
            if problem != ABSENT:
                accelerator.print(f"arkd: the cached SFT'd {role} {path} is corrupt ({problem}); training it again.")
                if accelerator.is_main_process:
                    _discard(path)
                accelerator.wait_for_everyone()
            train()
        model = load_model(path)
        unhealthy = model_problem(model)
        if unhealthy is None:
            return model, path
        if problem is not None or attempt:  # trained just now: the trainer publishes only a healthy model
            raise RunFailedError(f"the SFT'd {role} at {path} is not healthy: {unhealthy}.")
        accelerator.print(f"arkd: the cached SFT'd {role} {path} is not healthy ({unhealthy}); training it again.")
        if accelerator.is_main_process:
            _discard(path)
        accelerator.wait_for_everyone()
    raise AssertionError("unreachable")


def _train_sft(
    role: str,
    node: DictConfig,
    options: DictConfig,
    path: Path,
    *,
    cfg: DictConfig,
    tokenizer: Any,
    train_dataset: Any,
    collate: Any,
    accelerator: Any,
    sft_seed: int,
) -> None:
    """Train ``node``'s model by SFT in a work directory of this run's own and publish it as ``path``."""
    from arkd.distributed import broadcast_object
    from arkd.run_dir import check_writable

    root = path.parent
    if accelerator.is_main_process:  # before the training, not after it
        check_writable(root, "cache directory (cache_dir)")
    accelerator.print(f"arkd: training the {role} by SFT ({int(options.max_steps)} steps); cached at {path}")
    model = build_model(node, tokenizer)
    max_steps = int(options.max_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(options.lr), weight_decay=float(options.get("weight_decay", 0.0))
    )
    scheduler = make_scheduler(
        optimizer, str(options.get("lr_schedule", "cosine")), int(options.get("warmup_steps", 0)), max_steps
    )
    # This run's own work directory (the same on every process): a concurrent run of the same SFT never
    # touches it.
    work = root / broadcast_object(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    accelerator.wait_for_everyone()
    accelerator.gradient_accumulation_steps = 1
    trainer = Trainer(
        student=model,
        teacher=None,
        tokenizer=tokenizer,
        batches=make_loader(train_dataset, collate, int(options.batch_size), sft_seed, accelerator),
        strategy=None,
        loss=None,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        config=TrainerConfig(
            max_steps=max_steps,
            kd_weight=0.0,
            ce_weight=1.0,
            max_grad_norm=float(options.get("max_grad_norm", 1.0)),
            log_interval=max(1, max_steps // 20),
            save_interval=0,
            keep_last=1,
            output_dir=str(work),
            progress=bool(cfg.trainer.progress),
            progress_desc=f"sft {role}",
        ),
    )
    try:
        trainer.fit()
    except TrainingInterrupted as err:  # its work directory is not resumed: say so instead of offering a resume
        _drop_work(work, accelerator)
        name = signal.Signals(err.signum).name
        raise TrainingInterrupted(
            f"stopped by {name} during the {role}'s SFT, after step {trainer.state.step} of {max_steps}; the SFT "
            "is not checkpointed for resuming and starts again on the next run",
            err.signum,
            None,
        ) from None
    except BaseException:  # a failed SFT leaves nothing in the cache
        _drop_work(work, accelerator)
        raise
    if accelerator.is_main_process:
        _publish(work, path)
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = int(cfg.trainer.grad_accum)


def _drop_work(work: Path, accelerator: Any) -> None:
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
