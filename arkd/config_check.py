"""Check every value of a composed ``arkd-train`` config before anything is built.

:func:`check_train_config` raises :class:`arkd.errors.ConfigError` with one sentence naming the key, the value it
got and what was expected. It checks

- types, against the config tree's own defaults (``reference``: the same command's group choices composed without
  its key overrides): ``trainer.max_steps=abc`` or ``=3.5`` where an integer is expected;
- ranges and choices of every key the recipe reads (:data:`RULES`): ``trainer.max_steps=0``,
  ``trainer.on_nonfinite=bogus``, ``optimizer.lr=-1``;
- keys nothing reads: a ``+`` key is accepted only where a ``_target_`` callable takes it as an argument
  (``+model.dropout=0.1``), ``init_sft`` options only among :data:`SFT_OPTIONS`;
- keys removed with ``~`` that the recipe needs;
- the loss and alpha-strategy objects themselves (their constructors check their hyper-parameters; both are cheap).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

from arkd.errors import ConfigError

# Keys of the options of `init_sft.teacher` / `init_sft.student` (arkd.recipes.sft_cache.sft_cached reads these).
SFT_OPTIONS = {"max_steps", "lr", "batch_size", "warmup_steps", "lr_schedule", "weight_decay", "max_grad_norm", "seed"}
# Keys of `model.lora` (the arguments of arkd.models.apply_lora, which the recipe's build_model calls).
LORA_OPTIONS = ("r", "alpha", "dropout", "target_modules")
# Hydra's own keys inside a `_target_` node.
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Nodes whose keys go through to a library as they are (checked by that library).
_FREE_NODES = ("logger.wandb", "hydra")
_MISSING = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(low: int | None = None) -> tuple[Callable[[Any], bool], str]:
    if low is None:
        return _is_int, "an integer"
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _number(low: float | None = None, high: float | None = None, *, open_low: bool = False):
    def check(v: Any) -> bool:
        if not _is_number(v):
            return False
        if low is not None and (v <= low if open_low else v < low):
            return False
        return high is None or v <= high

    if low is not None and high is not None:
        text = f"a number in {'(' if open_low else '['}{low}, {high}]"
    elif low is not None:
        text = f"a number {'>' if open_low else '>='} {low}"
    else:
        text = "a finite number"
    return check, text


def _choice(*options: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), "one of " + ", ".join(options)


def _nullable(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    check, text = rule
    return (lambda v: v is None or check(v)), f"null or {text}"


def _bool() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def _seeds(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(s) for s in v)


def _scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType)


def _lr_schedule() -> tuple[Callable[[Any], bool], str]:
    names = _scheduler_names()
    return (lambda v: v in names), "a transformers scheduler name: " + ", ".join(names)


def _resume(v: Any) -> bool:
    return v is None or (isinstance(v, str) and v != "")


# The direction of each validation metric trainer.best_metric may name (TrainerConfig's default best_mode, too).
BEST_MODES = {"val_rougeL": "max", "val_loss": "min", "val_fkl": "min", "val_rkl": "min"}


# Ranges and choices of the keys the recipe reads (path -> rule); `*` matches any one key.
RULES: dict[str, tuple[Callable[[Any], bool], str] | Callable[[], tuple[Callable[[Any], bool], str]]] = {
    "seed": _int(0),
    "name": ((lambda v: isinstance(v, str) and v != ""), "a non-empty name"),
    "trainer.max_steps": _int(1),
    "trainer.grad_accum": _int(1),
    "trainer.precision": _choice("no", "fp16", "bf16", "fp32"),
    "trainer.cpu": _bool(),
    "trainer.num_threads": _nullable(_int(1)),
    "trainer.max_grad_norm": _nullable(_number(0)),
    "trainer.lr_schedule": _lr_schedule,
    "trainer.warmup_steps": _int(0),
    "trainer.kd_weight": _number(0),
    "trainer.ce_weight": _number(0),
    "trainer.feature_mu": _number(0, 1, open_low=True),
    "trainer.log_interval": _int(1),
    "trainer.eval_interval": _int(0),
    "trainer.save_interval": _int(0),
    "trainer.keep_last": _int(0),
    "trainer.resume": (_resume, "null, auto or a checkpoint directory"),
    "trainer.overwrite": _bool(),
    "trainer.resume_accept_changes": _bool(),
    "trainer.on_nonfinite": _choice("skip", "stop"),
    "trainer.max_skipped": _int(0),
    "trainer.max_skipped_fraction": _number(0, 1),
    "trainer.progress": _bool(),
    "trainer.fused_linear": _bool(),
    "trainer.best_metric": _choice(*BEST_MODES),
    "trainer.best_mode": _choice("max", "min"),
    "trainer.gradient_checkpointing": _bool(),
    "data.template": _choice("protocol", "chat"),
    "model.init": _choice("from_teacher", "fresh"),
    "model.layers": (
        lambda v: (
            (_is_int(v) and v >= 1)
            or (isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(i) and i >= 0 for i in v))
        ),
        "a number of blocks >= 1 or a list of block indices",
    ),
    "model.lora": (
        (lambda v: v is None or isinstance(v, Mapping)),
        "null or a mapping of r, alpha, dropout, target_modules",
    ),
    "model.lora.r": _int(1),
    "model.lora.alpha": _number(0, open_low=True),
    "model.lora.dropout": _number(0, 1),
    "model.lora.target_modules": _nullable(
        (
            (lambda v: isinstance(v, (list, tuple)) and all(isinstance(m, str) and m for m in v)),
            "a list of module names",
        )
    ),
    "teacher.cache_dir": ((lambda v: v is None or (isinstance(v, str) and v != "")), "null or a directory"),
    "teacher.top_k": _int(1),
    "data.batch_size": _int(1),
    "data.max_prompt_length": _int(1),
    "data.max_length": _int(2),
    "data.group_by_length": _nullable(_int(1)),
    "data.packing": _bool(),
    "data.add_bos": ((lambda v: v == "auto" or isinstance(v, bool)), "auto, true or false"),
    "optimizer.lr": _number(0),
    "optimizer.weight_decay": _number(0),
    "optimizer.eps": _number(0, open_low=True),
    "optimizer.betas": (
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
        "two numbers in [0, 1)",
    ),
    "reward.interval": _int(1),
    "reward.candidates": _int(2),
    "reward.held_out": _choice("next", "same"),
    "reward.equal_norm": _bool(),
    "reward.horizon": _int(1),
    "reward.continue_from": _choice("best", "mean"),
    "reward.rows": _int(1),
    "probe.enabled": ((lambda v: v == "auto" or isinstance(v, bool)), "auto, true or false"),
    "probe.interval": _int(1),
    "probe.window": _int(3),
    "probe.same_batch": _bool(),
    "probe.equal_norm": _bool(),
    "probe.horizon": _int(0),
    "probe.horizon_interval": _int(1),
    "probe.rows": _int(1),
    "validation.subset": _nullable(_int(1)),
    "validation.loss_subset": _nullable(_int(1)),
    "validation.batch_size": _int(1),
    "validation.seed": _int(0),
    "validation.do_sample": _bool(),
    "validation.max_new_tokens": _int(1),
    "report.enabled": _bool(),
    "report.subset": _nullable(_int(1)),
    "report.seeds": (_seeds, "a non-empty list of integer seeds"),
    "report.do_sample": _bool(),
    "report.max_new_tokens": _int(1),
    "report.batch_size": _int(1),
    "report.student": _choice("best", "final"),
    "report.head_top_p": _number(0, 1, open_low=True),
    "report.diversity": _bool(),
    "report.models": (
        lambda v: (
            isinstance(v, (list, tuple))
            and len(v) > 0
            and all(m in ("teacher", "student_before", "student_after") for m in v)
        ),
        "a non-empty list of teacher, student_before, student_after",
    ),
    "init_sft.*.max_steps": _int(1),
    "init_sft.*.lr": _number(0, open_low=True),
    "init_sft.*.batch_size": _int(1),
    "init_sft.*.warmup_steps": _int(0),
    "init_sft.*.lr_schedule": _lr_schedule,
    "init_sft.*.weight_decay": _number(0),
    "init_sft.*.max_grad_norm": _nullable(_number(0)),
    "init_sft.*.seed": _int(0),
}


def _rule_for(path: str):
    parts = path.split(".")
    for pattern, rule in RULES.items():
        pattern_parts = pattern.split(".")
        if len(pattern_parts) == len(parts) and all(p in ("*", q) for p, q in zip(pattern_parts, parts)):
            return rule() if callable(rule) and not isinstance(rule, tuple) else rule
    return None


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    return repr(value)


def _fail(path: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{path}: got {_show(value)}, expected {expected}.")


def _type_of(reference: Any) -> tuple[Callable[[Any], bool], str] | None:
    """The type the config tree's default implies (None: no constraint)."""
    if isinstance(reference, bool):
        return _bool()
    if _is_int(reference):
        return _int()
    if isinstance(reference, float):
        return _number()
    if isinstance(reference, (list, tuple)):
        return (lambda v: isinstance(v, (list, tuple))), "a list"
    return None


def _target_parameters(target: str) -> tuple[set[str], bool] | None:
    """The keyword names a `_target_` accepts and whether it takes any (**kwargs); None when it cannot be read."""
    from hydra.utils import get_method

    try:
        fn = get_method(target)
        signature = inspect.signature(fn)
    except Exception:  # an unimportable target is reported by instantiate, with its own message
        return None
    names = {n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def _walk(value: Any, reference: Any, path: str) -> None:
    if any(path == node or path.startswith(node + ".") for node in _FREE_NODES):
        return
    rule = _rule_for(path) if path else None
    if rule is not None:
        check, expected = rule
        if not check(value):
            _fail(path, value, expected)
    elif reference is not _MISSING and reference is not None and not isinstance(reference, Mapping):
        implied = _type_of(reference)
        if implied is not None and value is not None and not implied[0](value):
            _fail(path, value, implied[1])
        if value is None and _is_number(reference) and not isinstance(reference, bool):
            _fail(path, value, implied[1] if implied else "a value")
    if not isinstance(value, Mapping):
        return
    ref = reference if isinstance(reference, Mapping) else {}
    target = value.get("_target_")
    accepted = _target_parameters(str(target)) if isinstance(target, str) else None
    for key, child in value.items():
        child_path = f"{path}.{key}" if path else str(key)
        if key in _HYDRA_KEYS:
            continue
        if child_path == "model.lora":  # read by the recipe (arkd.recipes.build.build_model), whatever the target
            _check_lora(child)
        elif key not in ref:
            if path.startswith("init_sft.") and path.count(".") == 1:
                if key not in SFT_OPTIONS:
                    raise ConfigError(
                        f"{child_path}: nothing reads this key; expected SFT options among "
                        f"{', '.join(sorted(SFT_OPTIONS))}."
                    )
            elif isinstance(target, str):
                if accepted is not None and not accepted[1] and key not in accepted[0]:
                    raise ConfigError(
                        f"{child_path}: {target} takes no argument {key!r}; expected one of "
                        f"{', '.join(sorted(accepted[0]))}."
                    )
            elif isinstance(reference, Mapping):
                known = ", ".join(sorted(str(k) for k in ref)) or "none"
                where = f"in {path}" if path else "at the top level"
                raise ConfigError(
                    f"{child_path}: nothing reads this key (a `+` override?); expected one of the keys {where}: "
                    f"{known}."
                )
        _walk(child, ref.get(key, _MISSING), child_path)
    if target is None and reference is not _MISSING and isinstance(reference, Mapping):
        for key in ref:
            if key not in value and key not in _HYDRA_KEYS:
                path_text = f"{path}.{key}" if path else str(key)
                raise ConfigError(f"{path_text} was removed; expected the key (its default: {_show(ref[key])}).")


def _check_lora(value: Any) -> None:
    if isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k not in LORA_OPTIONS)
        if unknown:
            raise ConfigError(
                f"model.lora.{unknown[0]}: nothing reads this key; expected LoRA options among "
                f"{', '.join(LORA_OPTIONS)}."
            )


def _check_gguf_files(plain: Mapping) -> None:
    """Every GGUF file a tokenizer, model or teacher config names exists (a missing package says how to install it)."""
    from arkd.gguf import is_gguf, resolve_gguf

    for group, key in (
        ("tokenizer", "name_or_path"),
        ("model", "name_or_path"),
        ("model", "teacher"),
        ("teacher", "name_or_path"),
    ):
        node = plain.get(group)
        value = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(value, str) and is_gguf(value):
            try:
                resolve_gguf(value)
            except FileNotFoundError as err:
                raise ConfigError(f"{group}.{key}: {err}") from None


def check_train_config(cfg: Any, reference: Any | None = None, *, build: bool = True) -> None:
    """Check a composed ``train.yaml`` config; raise :class:`ConfigError` (one sentence) at the first problem.

    Args:
        cfg: the composed config (DictConfig or a plain dict; interpolations are resolved here).
        reference: the same group choices composed without key overrides (types and known keys); None checks the
            rules of :data:`RULES` only.
        build: also build the loss and the alpha strategy (cheap; their constructors check their hyper-parameters).
    """
    plain = _container(cfg)
    ref = _container(reference) if reference is not None else _MISSING
    if ref is _MISSING:
        _walk_rules(plain, "")
    else:
        _walk(plain, ref, "")
    trainer = plain.get("trainer") or {}
    metric, mode = trainer.get("best_metric"), trainer.get("best_mode")
    if mode in ("max", "min") and metric in BEST_MODES and mode != BEST_MODES[metric]:
        raise ConfigError(
            f"trainer.best_mode: got {mode!r} for trainer.best_metric={metric}, expected {BEST_MODES[metric]!r} "
            f"({'higher' if BEST_MODES[metric] == 'max' else 'lower'} is better)."
        )
    data = plain.get("data") or {}
    if _is_int(data.get("max_length")) and _is_int(data.get("max_prompt_length")):
        if data["max_length"] <= data["max_prompt_length"]:
            raise ConfigError(
                f"data.max_length: got {data['max_length']}, expected more than data.max_prompt_length "
                f"({data['max_prompt_length']}) so that a response fits."
            )
    distils = plain.get("loss") is not None and trainer.get("kd_weight", 1) != 0
    sft_teacher = (plain.get("init_sft") or {}).get("teacher") is not None
    if data.get("packing") is True and (distils or sft_teacher):
        raise ConfigError(
            "data.packing=true is exact only for SFT (loss=cross_entropy, no teacher): with a teacher the alpha "
            "strategies' per-sequence features and rewards would see several packed items as one sequence; set "
            "data.packing=false (data.group_by_length keeps the padding low)."
        )
    _check_gguf_files(plain)
    if build:
        _build_cheap_objects(cfg)


def _walk_rules(value: Any, path: str) -> None:
    if path:
        rule = _rule_for(path)
        if rule is not None and not rule[0](value):
            _fail(path, value, rule[1])
    if isinstance(value, Mapping) and not any(path == n or path.startswith(n + ".") for n in _FREE_NODES):
        for key, child in value.items():
            _walk_rules(child, f"{path}.{key}" if path else str(key))


def _container(cfg: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception as err:  # an interpolation that cannot resolve (e.g. a missing environment variable)
            raise ConfigError(f"the config does not resolve: {' '.join(str(err).split())}") from None
    return cfg


def _build_cheap_objects(cfg: Any) -> None:
    """Instantiate the loss and the alpha strategy: their constructors check their own hyper-parameters."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    for group in ("loss", "policy", "reward", "probe", "rollout"):
        if node.get(group) is None:
            continue
        try:
            options = node[group]
            if group == "probe":  # `enabled` is read by the recipe, not by the probe
                options = OmegaConf.create({k: v for k, v in options.items() if k != "enabled"})
            instantiate(options)
        except Exception as err:
            cause = err.__cause__ if err.__cause__ is not None else err
            message = " ".join(str(cause).split())
            raise ConfigError(f"{group}: {message} (building {node[group].get('_target_')}).") from None
