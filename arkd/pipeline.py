"""``run(cfg)``: build every object of a training run from its Hydra config and train, then report.

The stages, in order (each only when configured):

1. the tokenizer, the data splits, the student and the teacher, built with ``hydra.utils.instantiate``;
2. ``init_sft``: a model that needs a supervised fine-tuning first (the tiny job's teacher, and its student so that
   "before distillation" means the SFT'd student as in the papers) is trained with the same trainer and the
   cross-entropy loss, then cached under ``cache_dir`` keyed by a hash of its model, SFT, data and tokenizer configs,
   the number of processes and arkd's version; later runs reuse it;
3. distillation (or SFT) with :class:`arkd.trainer.Trainer`: ``metrics.jsonl``, checkpoints, ``best/``, ``final/``;
4. ``eval.final``: teacher, student before and student after on the test split, ``report.json``, ``report.md`` and
   ``alpha_trajectory.png``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import arkd
from arkd.errors import ConfigError
from arkd.trainer import BatchStream, Trainer, TrainerConfig

# --------------------------------------------------------------------------------------------------------------------
# Data helpers (public: configs point at them)


def held_out_splits(
    train: Sequence[Any], validation: Sequence[Any], test: Sequence[Any] | None = None
) -> dict[str, list[Any]]:
    """Training rows without any prompt of the validation or test rows, and the held-out splits.

    Args:
        train: training examples (e.g. the raw Dolly pool).
        validation: validation examples (checkpoint selection).
        test: test examples (final evaluation only), or None.

    Returns:
        ``{"train", "validation", "test"}`` (test an empty list when None).
    """
    held = {example.prompt for example in validation} | {example.prompt for example in test or []}
    kept = [example for example in train if example.prompt not in held]
    if not kept:
        raise ConfigError("every training row also occurs in the validation or test split: expected a training pool.")
    return {"train": kept, "validation": list(validation), "test": list(test or [])}


# --------------------------------------------------------------------------------------------------------------------
# Building blocks


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


def build_model(node: DictConfig, tokenizer: Any) -> torch.nn.Module:
    """Instantiate a model config; a ``vocab_size: null`` (tiny models) is filled with ``len(tokenizer)``."""
    from hydra.utils import instantiate

    if "vocab_size" in node and node.vocab_size is None:
        return instantiate(node, vocab_size=len(tokenizer))
    return instantiate(node)


def make_loader(dataset: Any, collate: Any, batch_size: int, seed: int, accelerator: Any) -> BatchStream:
    """An endless, seeded, resumable stream of training batches sharded over the accelerator's processes."""
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
    )
    return BatchStream(loader)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, max_steps: int):
    """Warm-up then decay (``transformers.get_scheduler``: linear, cosine, constant_with_warmup, ...)."""
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def _validation_batches(examples: Sequence[Any], tokenizer: Any, cfg: DictConfig, collate: Any) -> list[dict]:
    from arkd.data import TokenizedDataset

    if not examples:
        return []
    dataset = TokenizedDataset(
        examples,
        tokenizer,
        max_prompt_length=int(cfg.data.max_prompt_length),
        max_length=int(cfg.data.max_length),
        overlong_prompt="truncate",
    )
    size = int(cfg.eval.validation.batch_size)
    items = [dataset[i] for i in range(len(dataset))]
    return [collate(items[i : i + size]) for i in range(0, len(items), size)]


def _predict(model: Any, examples: Sequence[Any], *, tokenizer: Any, seed: int, batch_size: int, decoding: Any):
    from arkd.evaluation import generate

    return generate(
        model,
        tokenizer,
        [example.prompt for example in examples],
        seed=seed,
        batch_size=batch_size,
        decoding=decoding,
        progress=False,
    )


def _config_hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# --------------------------------------------------------------------------------------------------------------------
# SFT before use (cached)


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

    # The SFT's data order: its own `seed` option, else the model's init seed, else the run's seed. It enters the key,
    # so two runs share a cached model only when they would train the same one (the matrix pins `teacher.seed`).
    sft_seed = int(options.get("seed", node.get("seed", cfg.seed)))
    key = _config_hash(
        role,
        sft_seed,
        _container(node),
        _container(options),
        _container(cfg.data),
        _container(cfg.tokenizer),
        accelerator.num_processes,
        arkd.__version__,
    )
    root = Path(str(cfg.cache_dir)).expanduser()
    path = root / f"{role}-sft-{key}"
    if not (path / "model.safetensors").is_file():
        accelerator.print(f"arkd: training the {role} by SFT ({int(options.max_steps)} steps); cached at {path}")
        model = build_model(node, tokenizer)
        max_steps = int(options.max_steps)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=float(options.lr), weight_decay=float(options.get("weight_decay", 0.0))
        )
        scheduler = make_scheduler(
            optimizer, str(options.get("lr_schedule", "cosine")), int(options.get("warmup_steps", 0)), max_steps
        )
        work = root / f".tmp-{path.name}"
        if accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
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
        trainer.fit()
        if accelerator.is_main_process:
            shutil.rmtree(path, ignore_errors=True)
            (work / "final").rename(path)
            shutil.copy(work / "metrics.jsonl", path / "sft_metrics.jsonl")
            shutil.rmtree(work, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.free_memory()
        accelerator.gradient_accumulation_steps = int(cfg.trainer.grad_accum)
    else:
        accelerator.print(f"arkd: reusing the SFT'd {role} from {path}")
    return load_model(path), path


# --------------------------------------------------------------------------------------------------------------------
# The run


def _check(cfg: DictConfig) -> None:
    kd = cfg.loss is not None and float(cfg.trainer.kd_weight) != 0
    if kd and cfg.teacher is None:
        raise ConfigError(
            "this run distils but no teacher is set: choose `teacher=...` (e.g. teacher=gpt2_xl_dolly) or use "
            "`loss=cross_entropy` for SFT."
        )
    if kd and "name_or_path" in cfg.teacher and cfg.teacher.name_or_path is None:
        raise ConfigError(
            "the teacher is missing: set `teacher.name_or_path=PATH_OR_HUB_NAME` (e.g. runs/gpt2_xl_sft/final, "
            "written by `arkd-train config=gpt2_xl_sft`)."
        )
    if cfg.output_dir is None:
        raise ConfigError("output_dir is not set: expected the run directory (arkd-train sets it from hydra.run.dir).")


def _run_dir(cfg: DictConfig, accelerator: Any) -> Path:
    """Rank 0's run directory, on every process (ranks may resolve ``${now:...}`` a second apart)."""
    path = [str(Path(str(cfg.output_dir)).resolve())]
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def _check_batch_sizes(cfg: DictConfig, rows: int, processes: int) -> None:
    """Every batch size fits the training split (drop_last: a larger one yields no batch), before any SFT."""
    sizes = [("data.batch_size", cfg.data.batch_size)]
    for role in ("teacher", "student"):
        if cfg.init_sft.get(role) is not None:
            sizes.append((f"init_sft.{role}.batch_size", cfg.init_sft[role].batch_size))
    for key, size in sizes:
        if int(size) * processes > rows:
            raise ConfigError(
                f"{key}: got {size}, expected at most {rows // processes} (the training split has {rows} rows after "
                f"tokenization, shared by {processes} process(es), and every batch must be full)."
            )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg`` (the composed ``train.yaml``), train, and report.

    Args:
        cfg: the composed config; ``output_dir`` must be set (``arkd-train`` sets it to Hydra's run directory).

    Returns:
        A summary: ``run_dir``, ``steps``, ``skipped_steps``, ``best_val_rougeL``, ``train_seconds`` and, with
        ``eval.final.enabled``, the ``report`` dict.
    """
    from accelerate.utils import set_seed
    from hydra.utils import instantiate

    from arkd.config_check import check_train_config
    from arkd.data import TokenizedDataset, TrainingCollator
    from arkd.evaluation import DecodingConfig, rouge_l
    from arkd.metrics import MetricsLogger
    from arkd.run_dir import prepare_run_dir

    check_train_config(cfg, build=False)  # arkd-train checked more (types, unknown keys) before composing the job
    _check(cfg)
    _quiet_libraries()
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
    accelerator = make_accelerator(cfg)
    run_dir = _run_dir(cfg, accelerator)
    # Before anything is built: the directory is writable and holds no other run (or this run, continued with a
    # compatible config); the checkpoint to resume from is the newest that passes its checksums.
    resume_from = prepare_run_dir(
        cfg,
        run_dir,
        is_main=accelerator.is_main_process,
        report=accelerator.print,
        barrier=accelerator.wait_for_everyone,
    )
    set_seed(int(cfg.seed))

    # Tokenizer, data, models.
    tokenizer = instantiate(cfg.tokenizer)
    splits = instantiate(cfg.data.splits)
    for name in ("train", "validation"):
        if name not in splits or not splits[name]:
            raise ConfigError(f"data.splits gave no {name!r} rows: expected train and validation examples.")
    collate = TrainingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    train_dataset = TokenizedDataset(
        splits["train"],
        tokenizer,
        max_prompt_length=int(cfg.data.max_prompt_length),
        max_length=int(cfg.data.max_length),
        overlong_prompt="drop",
        progress=accelerator.is_main_process and len(splits["train"]) > 20000,
    )
    _check_batch_sizes(cfg, len(train_dataset), accelerator.num_processes)
    prepared = partial(
        sft_cached, cfg=cfg, tokenizer=tokenizer, train_dataset=train_dataset, collate=collate, accelerator=accelerator
    )
    teacher = None
    if cfg.teacher is not None and cfg.loss is not None:
        if cfg.init_sft.teacher is not None:
            teacher, _ = prepared("teacher", cfg.teacher, cfg.init_sft.teacher)
        else:
            teacher = build_model(cfg.teacher, tokenizer)
    if cfg.init_sft.student is not None:
        student, student_source = prepared("student", cfg.model, cfg.init_sft.student)
    else:
        student, student_source = build_model(cfg.model, tokenizer), None
    if teacher is not None:
        from arkd.models import check_vocab

        check_vocab(teacher, student, tokenizer)

    # Strategy, loss, optimizer, schedule.
    loss = instantiate(cfg.loss) if cfg.loss is not None else None
    strategy = instantiate(cfg.policy) if loss is not None and getattr(loss, "takes_alpha", False) else None
    max_steps = int(cfg.trainer.max_steps)
    optimizer = instantiate(cfg.optimizer)(params=[p for p in student.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer, str(cfg.trainer.lr_schedule), int(cfg.trainer.warmup_steps), max_steps)
    reward = instantiate(cfg.reward) if strategy is not None and strategy.needs_reward else None
    probe = _build_probe(cfg, strategy)

    # Validation: loss on (a subset of) the validation split, Rouge-L of generations on a subset.
    validation = list(splits["validation"])
    loss_subset = cfg.eval.validation.loss_subset
    rouge_subset = cfg.eval.validation.subset
    decoding = DecodingConfig(
        do_sample=bool(cfg.eval.validation.do_sample),
        max_new_tokens=int(cfg.eval.validation.max_new_tokens),
        max_prompt_tokens=int(cfg.data.max_prompt_length),
    )
    predict_fn = partial(
        _predict,
        tokenizer=tokenizer,
        seed=int(cfg.eval.validation.seed),
        batch_size=int(cfg.eval.validation.batch_size),
        decoding=decoding,
    )

    trainer_cfg = TrainerConfig(
        max_steps=max_steps,
        grad_accum=int(cfg.trainer.grad_accum),
        max_grad_norm=cfg.trainer.max_grad_norm,
        kd_weight=float(cfg.trainer.kd_weight) if loss is not None else 0.0,
        ce_weight=float(cfg.trainer.ce_weight),
        temperature=float(cfg.trainer.temperature),
        feature_mu=float(cfg.trainer.feature_mu),
        log_interval=int(cfg.trainer.log_interval),
        eval_interval=int(cfg.trainer.eval_interval),
        save_interval=int(cfg.trainer.save_interval),
        keep_last=int(cfg.trainer.keep_last),
        best_metric=str(cfg.trainer.best_metric),
        on_nonfinite=str(cfg.trainer.on_nonfinite),
        max_skipped=int(cfg.trainer.max_skipped),
        max_skipped_fraction=float(cfg.trainer.max_skipped_fraction),
        output_dir=str(run_dir),
        progress=bool(cfg.trainer.progress),
        progress_desc="distil" if loss is not None else "sft",
    )
    wandb_options = OmegaConf.to_container(cfg.logger.wandb, resolve=True) if cfg.logger.wandb else None
    logger = MetricsLogger(
        run_dir,
        enabled=accelerator.is_main_process,
        wandb=wandb_options,
        config=OmegaConf.to_container(cfg, resolve=True),
        resume=resume_from is not None,
        resume_step=_checkpoint_step(resume_from),
    )
    trainer = Trainer(
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        batches=make_loader(train_dataset, collate, int(cfg.data.batch_size), int(cfg.seed), accelerator),
        strategy=strategy,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        config=trainer_cfg,
        reward=reward,
        probe=probe,
        validation_batches=_validation_batches(
            validation[:loss_subset] if loss_subset else validation, tokenizer, cfg, collate
        ),
        validation_examples=validation[:rouge_subset] if rouge_subset else validation,
        predict_fn=predict_fn,
        score_fn=rouge_l,
        logger=logger,
    )
    if resume_from is not None:
        accelerator.print(f"arkd: resuming from {resume_from}")
    started = time.perf_counter()
    state = trainer.fit(resume_from=resume_from)
    train_seconds = time.perf_counter() - started
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "best_metric": trainer_cfg.best_metric,
        "best_value": state.best_value,
        "best_step": state.best_step if state.best_step >= 0 else None,
        "train_seconds": train_seconds,
    }

    # Final evaluation on the test split: teacher, student before and after; report files.
    if cfg.eval.final.enabled:
        from arkd.report import final_report

        del trainer
        accelerator.free_memory()
        summary["report"] = final_report(
            cfg,
            run_dir=run_dir,
            tokenizer=tokenizer,
            test_examples=list(splits.get("test") or []),
            teacher=teacher,
            student_before=lambda: _student_before(cfg, tokenizer, student_source),
            summary=summary,
            accelerator=accelerator,
        )
    elif accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        accelerator.end_training()  # destroys the process group
    return summary


def _build_probe(cfg: DictConfig, strategy: Any) -> Any:
    """The alpha-signal probe of ``cfg.probe`` (``enabled: auto`` = on for strategies that learn from rewards)."""
    if strategy is None or cfg.get("probe") is None:
        return None
    options = OmegaConf.to_container(cfg.probe, resolve=True)
    enabled = options.pop("enabled", "auto")
    if enabled not in ("auto", True, False):
        raise ConfigError(f"probe.enabled must be auto, true or false, got {enabled!r}.")
    if enabled is False or (enabled == "auto" and not strategy.needs_reward):
        return None
    from hydra.utils import instantiate

    return instantiate(options)


def _quiet_libraries() -> None:
    """Keep the console to arkd's own progress bars (no per-file bars of transformers' loading and saving)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _student_before(cfg: DictConfig, tokenizer: Any, source: Path | None) -> torch.nn.Module:
    if source is not None:
        from arkd.models import load_model

        return load_model(source)
    from accelerate.utils import set_seed

    set_seed(int(cfg.seed))
    return build_model(cfg.model, tokenizer)


def _checkpoint_step(path: Path | None) -> int:
    if path is None:
        return 0
    return int(path.name.split("_")[-1])
