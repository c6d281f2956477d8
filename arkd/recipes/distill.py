"""The distillation recipe (``arkd-train``): ``run(cfg)`` builds every object of a training run from its composed
``train.yaml`` config, trains, and reports.

The stages, in order (each only when configured):

1. the tokenizer, the data splits, the student and the teacher, built with ``hydra.utils.instantiate``;
2. ``init_sft``: a model that needs a supervised fine-tuning first (the tiny job's teacher, and its student so that
   "before distillation" means the SFT'd student as in the papers) comes from the SFT cache
   (:func:`arkd.recipes.sft_cache.sft_cached`: trained once, reused while its config is unchanged);
3. distillation (or SFT) with :class:`arkd.trainer.Trainer`: ``metrics.jsonl``, checkpoints, ``best/``, ``final/``;
4. ``report``: teacher, student before and student after on the test split, ``report.json``,
   ``report.md`` and ``alpha_trajectory.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from arkd.compat import check_parts, check_rollout
from arkd.errors import ConfigError
from arkd.recipes.build import (
    build_model,
    check_one_job,
    check_processes_agree,
    make_accelerator,
    make_loader,
    make_scheduler,
    quiet_libraries,
)
from arkd.recipes.sft_cache import sft_cached
from arkd.teacher_cache import uses_teacher_cache
from arkd.trainer import Trainer, TrainerConfig

__all__ = ["run", "trainer_config"]

# --------------------------------------------------------------------------------------------------------------------
# Building blocks


def _validation_batches(examples: Sequence[Any], tokenizer: Any, cfg: DictConfig, collate: Any) -> list[dict]:
    from arkd.data import TokenizedDataset
    from arkd.data.tokenization import resolve_add_bos

    if not examples:
        return []
    dataset = TokenizedDataset(
        examples,
        tokenizer,
        max_prompt_length=int(cfg.data.max_prompt_length),
        max_length=int(cfg.data.max_length),
        overlong_prompt="truncate",
        add_bos=resolve_add_bos(cfg.data.get("add_bos", "auto"), tokenizer),
    )
    size = int(cfg.validation.batch_size)
    items = [dataset[i] for i in range(len(dataset))]
    return [collate(items[i : i + size]) for i in range(0, len(items), size)]


def _predict(model: Any, examples: Sequence[Any], *, tokenizer: Any, seed: int, batch_size: int, decoding: Any):
    """Validation generations for every example, the rows shared over the processes (the same on every process, and
    equal to one process's: each row samples from its own ``(seed, row)`` stream)."""
    from arkd.evaluation import generate
    from arkd.evaluation.generation import encode_prompts
    from arkd.evaluation.sharding import generate_sharded

    prompts = [example.prompt for example in examples]
    lengths = [len(row) for row in encode_prompts(tokenizer, prompts, decoding.max_prompt_tokens)]
    generate_fn = partial(generate, model, tokenizer, batch_size=batch_size, decoding=decoding)
    outputs, _ = generate_sharded(generate_fn, prompts, lengths, seed=seed, progress=False)
    return outputs


# --------------------------------------------------------------------------------------------------------------------
# The run


def trainer_config(cfg: DictConfig, *, output_dir: str | Path, distils: bool = True) -> TrainerConfig:
    """The loop's options from the config: every :class:`TrainerConfig` field the ``trainer`` group sets, and the
    run directory.

    The temperature is the loss's (``loss.temperature``; 1 without a KD loss): one temperature for the loss, the
    features, the reward and the logged FKL / RKL. The ``trainer`` group also holds the run's own keys
    (``precision``, ``cpu``, ``num_threads``, ``lr_schedule``, ``warmup_steps``, ``resume``, ...), which the recipe
    reads and the loop does not.

    Args:
        cfg: the composed ``train.yaml`` config.
        output_dir: the run directory.
        distils: False for an SFT run (no KD loss): the KD weight is 0 and the progress bar says ``sft``.
    """
    names = {f.name for f in dataclasses.fields(TrainerConfig)}
    group = OmegaConf.to_container(cfg.trainer, resolve=True)
    options = {key: value for key, value in group.items() if key in names}
    loss = cfg.get("loss")
    options.update(
        temperature=float(loss.get("temperature", 1.0)) if loss is not None else 1.0,
        output_dir=str(output_dir),
        progress_desc="distil" if distils else "sft",
    )
    if not distils:
        options["kd_weight"] = 0.0
    return TrainerConfig(**options)


def _hydra_record() -> tuple[dict[str, Any], list[str]]:
    """Hydra's group choices and the run's command-line overrides ({} and [] outside arkd-train)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        return dict(hydra.runtime.choices), [str(o) for o in hydra.overrides.task]
    except (ImportError, ValueError):  # run(cfg) outside arkd-train: no Hydra record
        return {}, []


def _strategy_record(cfg: DictConfig, takes_alpha: bool) -> dict[str, Any]:
    """What names the run's strategy in report.json (``strategy``): Hydra's ``policy`` / ``loss`` choices, the run's
    ``policy.*`` overrides, whether the loss takes alpha, and the name arkd-compare uses for it."""
    from arkd.naming import strategy_label, strategy_name

    choices, overrides = _hydra_record()
    preset, loss = choices.get("policy"), choices.get("loss")
    label = cfg.get("label")
    if preset:
        name = strategy_name(preset, overrides, loss=loss, takes_alpha=takes_alpha, label=label)
    else:
        name = strategy_label(OmegaConf.to_container(cfg, resolve=True))
    own = [o for o in overrides if o.startswith("policy.")]
    return {"name": name, "preset": preset, "overrides": own, "loss": loss, "takes_alpha": takes_alpha, "label": label}


def _unused_policy_note(cfg: DictConfig) -> str | None:
    """One sentence when the command line chose a policy that the run's loss will not use (it takes no alpha)."""
    choices, overrides = _hydra_record()
    asked = [o for o in overrides if o.lstrip("+").split("=", 1)[0].split(".", 1)[0] == "policy"]
    if not asked or cfg.get("loss") is None:
        return None
    loss = choices.get("loss") or str(cfg.loss.get("_target_"))
    return (
        f"arkd: loss={loss} does not take alpha, so {' '.join(asked)} is not used (the strategy comparison runs "
        "through loss=bidirectional_kl; docs/configs.md)."
    )


def _capabilities(loss: Any) -> Any:
    from arkd.losses import loss_capabilities

    try:
        return loss_capabilities(loss)
    except TypeError as err:
        raise ConfigError(f"loss: {err}") from None


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
    if cfg.get("rollout") is not None:
        from hydra.utils import get_class

        try:
            check_rollout(
                get_class(str(cfg.rollout._target_)), engine=None, name=_rollout_choice(cfg),
                topk_teacher=kd and bool(cfg.teacher.get("cache_dir")), validates=int(cfg.trainer.eval_interval) > 0,
            )  # fmt: skip
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if bool(cfg.trainer.get("fused_linear")) and cfg.loss is not None:
        from hydra.utils import instantiate

        try:
            check_parts(loss=instantiate(cfg.loss), fused_linear=True)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.output_dir is None:
        raise ConfigError("output_dir is not set: expected the run directory (arkd-train sets it from hydra.run.dir).")


def _open_teacher_cache(cfg: DictConfig, tokenizer: Any, accelerator: Any) -> Any:
    """The run's teacher cache (``teacher.cache_dir``), checked against this run's config; a loss or a switch that
    needs the teacher's full logits is refused first (one sentence each)."""
    from hydra.utils import instantiate

    from arkd.data.tokenization import resolve_add_bos
    from arkd.teacher_cache import TeacherCache, cache_identity

    try:
        check_parts(loss=instantiate(cfg.loss), topk_teacher=True, fused_linear=bool(cfg.trainer.fused_linear))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    add_bos = resolve_add_bos(cfg.data.get("add_bos", "auto"), tokenizer)
    identity = cache_identity(cfg, vocab_size=len(tokenizer), add_bos=add_bos)
    cache = TeacherCache(str(cfg.teacher.cache_dir), identity, device=accelerator.device)
    accelerator.print(
        f"arkd: the teacher's top-{cache.k} log-probabilities come from {cache.root} ({len(cache)} rows); the teacher "
        "is not loaded, and the report evaluates no teacher."
    )
    return cache


def _fit_vocab(teacher: Any, student: Any, tokenizer: Any) -> int:
    """Check teacher, student and tokenizer share a vocabulary (padding aside) and drop the padded rows, so the
    trainer's logits are ``len(tokenizer)`` wide (Qwen2.5: 151936 rows, 151665 tokens); a real mismatch is refused."""
    from arkd.models import MAX_VOCAB_PADDING, check_vocab, model_vocab_size, slice_to_vocab

    v_tok = len(tokenizer)
    try:
        if teacher is not None:
            vocab = check_vocab(teacher, student, tokenizer)
            slice_to_vocab(teacher, vocab)
        else:
            vocab, rows = v_tok, model_vocab_size(student)
            if not v_tok <= rows <= v_tok + MAX_VOCAB_PADDING:
                raise ValueError(
                    f"the student's output layer has {rows} rows but the tokenizer has {v_tok} tokens; expected "
                    f"between {v_tok} and {v_tok + MAX_VOCAB_PADDING} rows (a model of this tokenizer)"
                )
        slice_to_vocab(student, vocab)
    except ValueError as err:
        raise ConfigError(f"{err}.") from None
    return vocab


def _check_healthy(cfg: DictConfig, **models: Any) -> None:
    """Refuse a teacher or student whose weights or outputs on a probe input are not finite, before training (a NaN
    teacher would otherwise train with ``fkl: 0.0`` logged)."""
    from arkd.checkpoint import model_problem

    for role, model in models.items():
        if isinstance(model, torch.nn.Module) and (problem := model_problem(model)) is not None:
            node = cfg.teacher if role == "teacher" else cfg.model
            where = f"{role}.name_or_path={node.name_or_path}" if node.get("name_or_path") else f"the {role}"
            raise ConfigError(f"{where}: {problem}; expected a model that is not diverged.")


def _agreement_record(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config every process of a run must share: all of it but the per-process paths (rank 0's run
    directory is broadcast, caches may be node-local) and the console and logging settings."""
    record = OmegaConf.to_container(cfg, resolve=True)
    for key in ("output_dir", "cache_dir", "logger"):
        record.pop(key, None)
    trainer = record.get("trainer") or {}
    record["trainer"] = {k: v for k, v in trainer.items() if k not in ("num_threads", "progress")}
    return record


def _check_limits(cfg: DictConfig, tokenizer: Any, train_dataset: Any, splits: Any) -> None:
    """Sequence lengths and vocabularies against the models' configs (:mod:`arkd.recipes.limits`): the training rows
    (``data.max_length`` when a rollout generates them), the validation generations and the final report's."""
    from arkd.evaluation.generation import encode_prompts
    from arkd.recipes.limits import check_model_limits

    def longest_prompt(examples: Sequence[Any], subset: Any) -> int:
        shown = list(examples[:subset] if subset else examples)
        rows = encode_prompts(tokenizer, [e.prompt for e in shown], int(cfg.data.max_prompt_length)) if shown else []
        return max((len(row) for row in rows), default=0)

    models = {"model": cfg.model}
    if cfg.teacher is not None and cfg.loss is not None and not uses_teacher_cache(cfg):
        models["teacher"] = cfg.teacher
    longest_row = max((len(i.prompt_ids) + len(i.response_ids) for i in train_dataset.items), default=0)
    if cfg.get("rollout") is not None:
        from hydra.utils import get_class

        if get_class(str(cfg.rollout._target_)).generates:
            longest_row = max(longest_row, int(cfg.data.max_length))
    validation = longest_prompt(splits["validation"], cfg.validation.get("subset"))
    generations = [("validation.max_new_tokens", "model", validation, int(cfg.validation.max_new_tokens))]
    if cfg.report.get("enabled") and splits.get("test"):
        test = longest_prompt(splits["test"], cfg.report.get("subset"))
        for role in models:
            generations.append(("report.max_new_tokens", role, test, int(cfg.report.max_new_tokens)))
    check_model_limits(cfg, tokenizer, longest_row=longest_row, models=models, generations=generations)


def _templated(splits: dict, tokenizer: Any, cfg: DictConfig) -> dict:
    """The splits' prompts in ``data.template`` (protocol: as read; chat: the model's chat template)."""
    from arkd.data.template import apply_template

    try:
        return apply_template(splits, tokenizer, str(cfg.data.get("template", "protocol")))
    except ValueError as err:
        raise ConfigError(f"{err}.") from None


def _run_dir(cfg: DictConfig) -> Path:
    """Rank 0's run directory, on every process (ranks may resolve ``${now:...}`` a second apart)."""
    from arkd.distributed import broadcast_object

    return Path(broadcast_object(str(Path(str(cfg.output_dir)).resolve())))


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
        ``report.enabled``, the ``report`` dict.
    """
    from accelerate.utils import set_seed
    from hydra.utils import instantiate

    from arkd.config_check import check_train_config
    from arkd.data import TokenizedDataset, TrainingCollator
    from arkd.data.tokenization import resolve_add_bos
    from arkd.evaluation import DecodingConfig, rouge_l
    from arkd.run_dir import prepare_run_dir
    from arkd.run_log import MetricsLogger

    check_train_config(cfg, build=False)  # arkd-train checked more (types, unknown keys) before composing the job
    _check(cfg)
    quiet_libraries()
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
    accelerator = make_accelerator(cfg)
    check_one_job(accelerator)  # N launched processes are one job, and were asked the same
    check_processes_agree(_agreement_record(cfg))
    run_dir = _run_dir(cfg)
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
    splits = _templated(instantiate(cfg.data.splits), tokenizer, cfg)
    for name in ("train", "validation"):
        if name not in splits or not splits[name]:
            raise ConfigError(f"data.splits gave no {name!r} rows: expected train and validation examples.")
    collate = TrainingCollator(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        pack=bool(cfg.data.get("packing", False)),
    )
    train_dataset = TokenizedDataset(
        splits["train"],
        tokenizer,
        max_prompt_length=int(cfg.data.max_prompt_length),
        max_length=int(cfg.data.max_length),
        overlong_prompt="drop",
        progress=accelerator.is_main_process and len(splits["train"]) > 20000,
        add_bos=resolve_add_bos(cfg.data.get("add_bos", "auto"), tokenizer),
    )
    _check_batch_sizes(cfg, len(train_dataset), accelerator.num_processes)
    _check_limits(cfg, tokenizer, train_dataset, splits)  # positions and vocabulary, before any SFT
    # The reward split of the horizon reward / probe: training rows that distillation never trains on (the SFT stages
    # before it use the whole split, so teacher and student-before are those of every other run).
    held = _reward_rows(cfg)
    if held >= len(splits["train"]):
        raise ConfigError(
            f"reward.rows: got {held}, expected fewer than the {len(splits['train'])} training rows (they are held out "
            "of distillation as the reward split)."
        )
    distill_dataset = train_dataset
    if held:
        distill_dataset = TokenizedDataset(
            splits["train"][:-held], tokenizer, max_prompt_length=int(cfg.data.max_prompt_length),
            max_length=int(cfg.data.max_length), overlong_prompt="drop",
            add_bos=resolve_add_bos(cfg.data.get("add_bos", "auto"), tokenizer),
        )  # fmt: skip
        _check_batch_sizes(cfg, len(distill_dataset), accelerator.num_processes)
    prepared = partial(
        sft_cached, cfg=cfg, tokenizer=tokenizer, train_dataset=train_dataset, collate=collate, accelerator=accelerator
    )
    teacher = None
    if cfg.teacher is not None and cfg.loss is not None:
        if uses_teacher_cache(cfg):  # top-k log-probabilities from disk; the teacher model is never built
            teacher = _open_teacher_cache(cfg, tokenizer, accelerator)
        elif cfg.init_sft.teacher is not None:
            teacher, _ = prepared("teacher", cfg.teacher, cfg.init_sft.teacher)
        else:
            teacher = build_model(cfg.teacher, tokenizer)
    if cfg.init_sft.student is not None:
        student, student_source = prepared("student", cfg.model, cfg.init_sft.student)
    else:
        student, student_source = build_model(cfg.model, tokenizer), None
    _fit_vocab(teacher if isinstance(teacher, torch.nn.Module) else None, student, tokenizer)
    _check_healthy(cfg, teacher=teacher, student=student)
    if accelerator.num_processes > 1:  # every process holds the same models (a cache or a path may differ per node)
        from arkd.checkpoint import model_fingerprint

        models = {"student": student, "teacher": teacher if isinstance(teacher, torch.nn.Module) else None}
        check_processes_agree({k: model_fingerprint(m) if m is not None else None for k, m in models.items()})
    if cfg.trainer.get("gradient_checkpointing"):
        from arkd.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(student)

    # Strategy, loss, optimizer, schedule.
    loss = instantiate(cfg.loss) if cfg.loss is not None else None
    # The loss declares what it takes (arkd.losses.KDLoss); only a loss that takes alpha gets a strategy.
    takes_alpha = loss is not None and _capabilities(loss).takes_alpha
    strategy = instantiate(cfg.policy) if takes_alpha else None
    if not takes_alpha and (note := _unused_policy_note(cfg)) is not None:
        accelerator.print(note)
    max_steps = int(cfg.trainer.max_steps)
    optimizer = instantiate(cfg.optimizer)(params=[p for p in student.parameters() if p.requires_grad])
    scheduler = make_scheduler(optimizer, str(cfg.trainer.lr_schedule), int(cfg.trainer.warmup_steps), max_steps)
    reward = instantiate(cfg.reward) if strategy is not None and strategy.needs_reward else None
    probe = _build_probe(cfg, strategy, reward)
    rollout = _build_rollout(cfg, tokenizer, distill_dataset, teacher)

    # Validation: loss on (a subset of) the validation split, Rouge-L of generations on a subset.
    validation = list(splits["validation"])
    loss_subset = cfg.validation.loss_subset
    rouge_subset = cfg.validation.subset
    decoding = DecodingConfig(
        do_sample=bool(cfg.validation.do_sample),
        max_new_tokens=int(cfg.validation.max_new_tokens),
        max_prompt_tokens=int(cfg.data.max_prompt_length),
    )
    predict_fn = partial(
        _predict,
        tokenizer=tokenizer,
        seed=int(cfg.validation.seed),
        batch_size=int(cfg.validation.batch_size),
        decoding=decoding,
    )

    trainer_cfg = trainer_config(cfg, output_dir=run_dir, distils=loss is not None)
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
        batches=make_loader(
            distill_dataset,
            collate,
            int(cfg.data.batch_size),
            int(cfg.seed),
            accelerator,
            group_by_length=cfg.data.get("group_by_length"),
        ),
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
        rollout=rollout,
        reward_batches=_validation_batches(list(splits["train"][-held:]) if held else [], tokenizer, cfg, collate),
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
        "strategy": _strategy_record(cfg, takes_alpha),
        "best_metric": trainer_cfg.best_metric,
        "best_mode": trainer_cfg.best_mode,
        "best_value": state.best_value,
        "best_step": state.best_step if state.best_step >= 0 else None,
        "train_seconds": train_seconds,
        "rollout": _rollout_choice(cfg),
        "rollout_seconds": trainer.rollout_seconds_total,
        "rollout_share": trainer.rollout_seconds_total / train_seconds if train_seconds > 0 else None,
    }

    # Final evaluation on the test split: teacher, student before and after; report files.
    if cfg.report.enabled:
        from arkd.report import final_report

        del trainer
        accelerator.free_memory()
        summary["report"] = final_report(
            cfg,
            run_dir=run_dir,
            tokenizer=tokenizer,
            test_examples=list(splits.get("test") or []),
            teacher=teacher if isinstance(teacher, torch.nn.Module) else None,  # a cached teacher is not evaluated
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


def _rollout_choice(cfg: DictConfig) -> str | None:
    """The ``rollout`` option's name (Hydra's choice, else the source's class), None without the group."""
    if cfg.get("rollout") is None:
        return None
    choices, _ = _hydra_record()
    if choices.get("rollout"):
        return choices["rollout"]
    from arkd.config_paths import config_dir

    target = str(cfg.rollout.get("_target_", ""))
    for option in sorted((Path(config_dir()) / "rollout").glob("*.yaml")):  # run(cfg) outside arkd-train
        if f"_target_: {target}" in option.read_text():
            return option.stem
    return target.rsplit(".", 1)[-1]


def _build_rollout(cfg: DictConfig, tokenizer: Any, train_dataset: Any, teacher: Any) -> Any:
    """The ``rollout`` source (None without the group: the dataset's responses), configured with the run's
    tokenizer, seed, ``data.max_length``, cache directory and training prompts."""
    if cfg.get("rollout") is None:
        return None
    from hydra.utils import instantiate

    rollout = instantiate(cfg.rollout)
    if rollout.generates and teacher is None and cfg.loss is not None:
        raise ConfigError("the rollout generates for a distillation run, which needs a teacher: set `teacher=...`.")
    return rollout.configure(
        tokenizer=tokenizer,
        seed=int(cfg.seed),
        max_length=int(cfg.data.max_length),
        cache_dir=str(cfg.cache_dir),
        train_prompts=[item.prompt_ids for item in train_dataset.items],
    )


def _reward_rows(cfg: DictConfig) -> int:
    """Training rows held out of distillation as the reward split: ``reward.rows`` for a reward measured over real
    training steps (``reward=horizon``), else ``probe.rows`` when the probe asks at a horizon; 0 otherwise."""
    from hydra.utils import get_class

    if cfg.get("loss") is None or cfg.get("policy") is None:
        return 0
    learns = get_class(str(cfg.policy._target_)).needs_reward
    if learns and cfg.get("reward") is not None and get_class(str(cfg.reward._target_)).branches:
        return int(cfg.reward.rows)
    probe = cfg.get("probe")
    if probe is None or int(probe.get("horizon", 0)) == 0:
        return 0
    enabled = probe.get("enabled", "auto")
    return int(probe.get("rows", 64)) if enabled is True or (enabled == "auto" and learns) else 0


def _build_probe(cfg: DictConfig, strategy: Any, reward: Any = None) -> Any:
    """The alpha-signal probe of ``cfg.probe``. ``enabled: auto`` = on for strategies that learn from a one-step reward;
    under a reward that branches (``reward=horizon``, which already measures alpha over whole segments) only when
    ``probe.horizon`` > 0: the one-step probe changes no weight (bit for bit) and would cost ~30 % more steps there."""
    if strategy is None or cfg.get("probe") is None:
        return None
    options = OmegaConf.to_container(cfg.probe, resolve=True)
    enabled = options.pop("enabled", "auto")
    if enabled not in ("auto", True, False):
        raise ConfigError(f"probe.enabled must be auto, true or false, got {enabled!r}.")
    branching = reward is not None and reward.branches
    auto_on = strategy.needs_reward and (not branching or int(options.get("horizon", 0)) > 0)
    if enabled is False or (enabled == "auto" and not auto_on):
        return None
    from hydra.utils import instantiate

    return instantiate(options)


def _student_before(cfg: DictConfig, tokenizer: Any, source: Path | None) -> torch.nn.Module:
    """The student as it was before training, rebuilt for the report, its padded rows dropped as at the start."""
    from arkd.models import load_model, slice_to_vocab

    if source is not None:
        return slice_to_vocab(load_model(source), len(tokenizer))
    from accelerate.utils import set_seed

    set_seed(int(cfg.seed))
    return slice_to_vocab(build_model(cfg.model, tokenizer), len(tokenizer))


def _checkpoint_step(path: Path | None) -> int:
    if path is None:
        return 0
    return int(path.name.split("_")[-1])
