"""``arkd-train config=NAME [overrides]``: the Hydra entry point of arkd's distillation recipe.

Also runs as ``accelerate launch -m arkd.cli.train config=NAME``; rank 0 alone writes and prints. This module only
parses and checks the command line, reports errors as one sentence and calls :func:`arkd.recipes.distill.run`
(importable and testable without this CLI). The recipe is imported lazily: a bad command line is reported before
torch is imported.
"""

from __future__ import annotations

import os
import sys

from arkd.config_paths import config_dir

__all__ = ["available_configs", "check_overrides", "main"]

_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
_HYDRA_FLAGS_WITH_VALUE |= {"--config-dir", "-cd", "--info", "--experimental-rerun"}


# Launchers of configs/hydra/launcher/ and the plugin's own: they need the optional `slurm` extra.
_SUBMITIT_LAUNCHERS = {"slurm", "slurm_local", "submitit_slurm", "submitit_local"}


def _submitit_plugin_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ImportError:
        return False


def available_configs() -> list[str]:
    """The experiment names ``config=NAME`` accepts (the files of ``configs/config/``)."""
    return sorted(path.stem for path in (config_dir() / "config").glob("*.yaml"))


def _rank() -> int:
    for key in ("RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _split(argv: list[str]) -> tuple[list[str], bool, bool]:
    """Overrides, whether it is a multirun, and whether other Hydra flags were given."""
    overrides, multirun, flags = [], False, False
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.startswith("-"):
            flags = True
            skip = arg in _HYDRA_FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return overrides, multirun, flags


def _group_options(group: str) -> list[str] | None:
    """The options of config group ``group`` (a folder of the tree), or None when it is not a group."""
    folder = config_dir() / group
    if not folder.is_dir():
        return None
    return sorted(path.stem for path in folder.glob("*.yaml"))


def _check_group_choice(key: str, value: str) -> str | None:
    if key.startswith("hydra") or "." in key:
        return None
    options = _group_options(key)
    if options is None or value in ("", "null"):
        return None
    for name in value.split(","):
        if name not in options:
            return f"unknown {key} '{name}'; expected one of: {', '.join(options)}."
    return None


def _combinations(overrides: list[str], limit: int = 256) -> list[list[str]]:
    """The single-run override lists of a sweep (Hydra's basic sweeper: the product of the swept values)."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            key = text.split("=", 1)[0]
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([text])
    return [list(c) for c in itertools.islice(itertools.product(*choices), limit)]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def check_overrides(argv: list[str]) -> str | None:
    """One sentence describing what is wrong with the command line, or None when it composes and checks.

    Checks that every ``config=NAME`` and every group choice (``policy=NAME``, ...) names an option (listing the
    valid ones), then composes the config of each run (each combination of a sweep) through Hydra's compose API,
    turning Hydra's error into its first sentence, and checks every value (:func:`arkd.config_check.
    check_train_config`: types, ranges, choices, keys nothing reads) before anything is built.
    """
    overrides, multirun, flags = _split(argv)
    names = available_configs()
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == "config" and value and value != "null":
            for name in value.split(","):
                if name not in names:
                    return f"unknown config '{name}'; expected one of: {', '.join(names)}."
        elif (problem := _check_group_choice(key, value)) is not None:
            return problem
        if key == "hydra/launcher" and value in _SUBMITIT_LAUNCHERS and not _submitit_plugin_installed():
            return (
                f"hydra/launcher={value} needs Hydra's submitit plugin, which is not installed; "
                'expected `pip install ".[slurm]"` (hydra-submitit-launcher) first.'
            )
    if flags:
        return None
    from arkd.config_check import check_train_config
    from arkd.errors import ConfigError

    plain = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        runs = _combinations(plain) if multirun else [plain]
    except Exception as err:  # a sweep Hydra cannot parse: Hydra reports it
        message = " ".join(str(err).split("\n")[0].split())
        return f"bad override ({message}); see `arkd-train --help` and docs/configs.md."
    references: dict[tuple[str, ...], object] = {}
    for run_overrides in runs:
        try:
            cfg = _compose(run_overrides)
        except Exception as err:  # Hydra / OmegaConf composition errors: report their first sentence
            from arkd.cli._keys import unknown_key_sentence

            if (unknown := unknown_key_sentence(err, run_overrides, _compose)) is not None:
                return unknown
            message = " ".join(str(err).split("\n")[0].split())
            return f"bad override ({message}); see `arkd-train --help` and docs/configs.md."
        # The reference: the same group choices without key overrides (the tree's own types and keys).
        choices = tuple(o for o in run_overrides if "." not in o.split("=", 1)[0] and not o.startswith(("+", "~")))
        choices = tuple(o for o in choices if _group_options(o.split("=", 1)[0]) is not None)
        if choices not in references:
            references[choices] = _compose(list(choices))
        try:
            check_train_config(cfg, references[choices])
        except ConfigError as err:
            prefix = f"in the sweep run {' '.join(run_overrides)}: " if multirun and len(runs) > 1 else ""
            return prefix + str(err)
    if not multirun:
        _CHECKED[tuple(argv)] = cfg  # claim_run_dir reuses it
    return None


_CHECKED: dict[tuple[str, ...], object] = {}  # the command line -> its composed config, once checked


def claim_run_dir(argv: list[str]) -> tuple[str, int] | None:
    """Before Hydra writes ``.hydra/`` into the run directory: take its lock and refuse what the run would refuse
    (another job in it, another run in it, a resume with changed keys), so that a refused command writes nothing
    into it. Returns ``(sentence, exit status)`` or None. Only for one run on rank 0 whose ``hydra.run.dir`` is
    fixed (a ``${now:...}`` directory is new: it is checked and locked when the run starts)."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    overrides, multirun, flags = _split(argv)
    if multirun or flags or _rank() > 0:
        return None
    explicit = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    checked = _CHECKED.pop(tuple(argv), None)
    if explicit and "${" not in explicit[-1] and checked is not None:  # the common case: no second composition
        cfg, run_dir = OmegaConf.create(OmegaConf.to_container(checked)), Path(explicit[-1]).resolve()
    else:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        except Exception:  # noqa: BLE001 - composition errors were reported by check_overrides
            return None
        finally:
            GlobalHydra.instance().clear()
        raw = str(OmegaConf.to_container(cfg.hydra.run, resolve=False).get("dir", ""))
        if "${now:" in raw:
            return None
        run_dir = Path(str(cfg.hydra.run.dir)).resolve()
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra")
    if cfg.get("output_dir") is None:
        cfg.output_dir = str(run_dir)
    from arkd.errors import ConfigError, OutputError
    from arkd.run_dir import prepare_run_dir

    try:
        prepare_run_dir(cfg, run_dir, is_main=True, report=lambda message: None, dry_run=True)
    except ConfigError as err:
        return _one_line(err), 2
    except OutputError as err:
        return _one_line(err), 1
    except Exception:  # noqa: BLE001 - anything else (an interpolation only Hydra resolves): the run checks again
        return None
    return None


def _task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from arkd.distributed_env import export_distributed_env

    # A Slurm job of several tasks started by submitit (hydra/launcher=slurm): one process per GPU and no launcher,
    # so derive RANK, WORLD_SIZE, MASTER_ADDR, ... from Slurm's variables before the Accelerator is built. A no-op
    # outside Slurm, for one task, and under accelerate launch / torchrun (RANK already set).
    try:
        export_distributed_env()
    except ValueError as err:
        print(f"arkd-train: {err}", file=sys.stderr)
        sys.exit(1)

    from arkd.checkpoint import CheckpointError
    from arkd.errors import ConfigError
    from arkd.recipes.distill import run
    from arkd.trainer import NonFiniteLossError, RunFailedError, TrainingInterrupted

    if cfg.output_dir is None:
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    from hydra.errors import InstantiationException

    failures = (NonFiniteLossError, RunFailedError, CheckpointError, OSError, InstantiationException)
    try:
        summary = run(cfg)
    except TrainingInterrupted as err:
        # A preemption (SIGTERM) or Ctrl-C: the step was finished and checkpointed; 128 + the signal, as a shell does.
        then = "; run the same command with trainer.resume=auto to continue." if err.checkpoint else "."
        _say(f"arkd-train: {err}{then}")
        sys.exit(128 + err.signum)
    except KeyboardInterrupt:
        _say("arkd-train: interrupted; the run directory keeps its newest complete checkpoint (trainer.resume=auto).")
        sys.exit(130)
    except ConfigError as err:  # bad input found once the run's data or directory is known: as on the command line
        print(f"arkd-train: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except failures as err:
        print(f"arkd-train: {_describe(err)}", file=sys.stderr)
        sys.exit(1)
    if _rank() == 0:
        print(f"arkd-train: done; run directory {summary['run_dir']}")


def _describe(err: BaseException) -> str:
    """One line for a failure; a bare file-system error gets its path and a plain description."""
    from arkd.errors import OutputError, describe_os_error

    if isinstance(err, OSError) and not isinstance(err, OutputError) and err.errno is not None:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{describe_os_error(err)}."
    return _one_line(err)


def _one_line(err: BaseException) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _say(message: str) -> None:
    if _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: check the command line, then hand it to Hydra."""
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("--help", "-h", "--hydra-help") for a in argv):
        error = check_overrides(argv)
        if error is not None:
            print(f"arkd-train: {error}", file=sys.stderr)
            sys.exit(2)
        refused = claim_run_dir(argv)
        if refused is not None:
            from arkd.run_dir import release_run_dirs

            release_run_dirs()
            print(f"arkd-train: {refused[0]}", file=sys.stderr)
            sys.exit(refused[1])
    if _rank() > 0:  # only rank 0 writes: no .hydra/ folder, no log file, no run directory of its own
        argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
        if not any(a.startswith("hydra.run.dir=") for a in argv):
            argv.append("hydra.run.dir=.")
    sys.argv = [sys.argv[0]] + argv
    try:
        hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_task)()
    finally:
        from arkd.run_dir import release_run_dirs

        release_run_dirs()


if __name__ == "__main__":
    main()
