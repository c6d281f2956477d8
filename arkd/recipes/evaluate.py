"""The evaluation recipe (``arkd-eval``): ``run(cfg)`` generates with a model on the protocol's test sets and scores
Rouge-L, exact match and BERTScore.

The config is the composed ``configs/evaluate.yaml`` (every key is documented there and in docs/evaluation.md);
:func:`compose` builds it outside the command. The run writes ``generations.jsonl``, ``results.json`` and
``results.md`` to its run directory. Bad input (a missing model or data file, an unknown dataset, a BERTScore model
that cannot be loaded) raises :class:`EvalError` with one sentence, before anything slow where it can.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from arkd.config_paths import config_dir

# What an evaluation writes (arkd.evaluation.reports.write_run_outputs); a directory holding any is refused.
OUTPUT_FILES = ("results.json", "results.md", "generations.jsonl")
KNOWN_DATASETS_HINT = "a name under `files` in configs/evaluate.yaml (dolly, dolly_valid, sni, unni) or a JSONL path"


class EvalError(Exception):
    """Bad arkd-eval input; the message is one sentence naming the key or file to fix."""


@dataclass
class DatasetSpec:
    """One dataset to evaluate: its name in the results, the local file, and the row limit."""

    name: str
    path: Path
    max_rows: int | None


def resolve_datasets(cfg: DictConfig) -> list[DatasetSpec]:
    """Map ``cfg.datasets`` entries (names or JSONL paths) to local files, downloading from the Hub if enabled."""
    names = list(cfg.datasets)
    if not names:
        raise EvalError("datasets is empty; expected at least one of dolly, sni, unni or a JSONL path.")
    specs: list[DatasetSpec] = []
    for entry in names:
        entry = str(entry)
        if entry in cfg.files:
            name = entry
            path = Path(str(cfg.data_dir)).expanduser() / str(cfg.files[entry])
            if not path.is_file():
                path = _download(cfg, name, path)
        else:
            path = Path(entry).expanduser()
            if not path.is_file():
                raise EvalError(f"unknown dataset '{entry}' in datasets: expected {KNOWN_DATASETS_HINT}.")
            name = path.stem
        if name in {s.name for s in specs}:
            raise EvalError(f"dataset '{name}' appears twice in datasets; expected each dataset once.")
        limit = cfg.max_rows if cfg.max_rows is not None else cfg.default_max_rows.get(name)
        if limit is not None and int(limit) < 1:
            raise EvalError(f"max_rows={limit} for dataset '{name}'; expected a positive number of rows or null.")
        specs.append(DatasetSpec(name=name, path=path, max_rows=None if limit is None else int(limit)))
    return specs


def _download(cfg: DictConfig, name: str, missing: Path) -> Path:
    hub = cfg.hub.get(name) if cfg.hub.enabled else None
    if hub is None:
        extra = " or hub.enabled=true on a connected machine" if name in cfg.hub else ""
        raise EvalError(
            f"dataset '{name}': file {missing} not found; set data_dir=DIR (the folder holding "
            f"{cfg.files[name]}){extra}."
        )
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=str(hub.repo), filename=str(hub.file), repo_type="dataset"))
    except Exception as err:
        raise EvalError(
            f"dataset '{name}': {missing} not found and downloading {hub.file} from the Hub dataset {hub.repo} "
            f"failed ({type(err).__name__}); set data_dir=DIR to a folder holding {cfg.files[name]}."
        ) from err


def _device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device={setting} but CUDA is not available; set device=cpu or device=auto.")
    return setting


def _looks_like_path(source: str) -> bool:
    """A path rather than a Hub name ("org/name" has one slash)."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1


def _model_sources(cfg: DictConfig) -> dict[str, str]:
    """``model_path`` and ``tokenizer_path`` as strings; a path-like value that does not exist is an error."""
    sources = {"model_path": str(cfg.model_path), "tokenizer_path": str(cfg.tokenizer_path or cfg.model_path)}
    if cfg.get("teacher_path"):
        sources["teacher_path"] = str(cfg.teacher_path)
    for key, source in sources.items():
        if _gguf(key, source):
            continue
        if not Path(source).expanduser().exists() and _looks_like_path(source):
            raise EvalError(f"{key}={source}: no such directory; expected a model directory or a Hub name.")
    return sources


def _gguf(key: str, source: str) -> bool:
    """Whether a source is a GGUF file (a ``.gguf`` path or ``pkg://PACKAGE/FILE``); a missing one is an error."""
    from arkd.gguf import is_gguf, resolve_gguf

    if not is_gguf(source):
        return False
    try:
        resolve_gguf(source)
    except FileNotFoundError as err:
        raise EvalError(f"{key}={source}: {err}") from None
    return True


def _local(source: str) -> str | Path:
    """A model source as load_model / load_tokenizer take it (a GGUF reference stays a string)."""
    from arkd.gguf import is_gguf

    return source if is_gguf(source) else Path(source).expanduser()


def _templated(loaded: dict[str, list], tokenizer: Any, cfg: DictConfig) -> dict[str, list]:
    """The datasets' prompts in ``template`` (protocol: the files' own; chat: the model's chat template)."""
    from arkd.data.template import apply_template

    try:
        return apply_template(loaded, tokenizer, str(cfg.get("template", "protocol")))
    except ValueError as err:
        raise EvalError(f"{err}.") from None


def load_model_and_tokenizer(cfg: DictConfig, device: str, *, report: bool = True):
    """Load the model (``cfg.model_path``) and its tokenizer (``cfg.tokenizer_path`` or the model's) on ``device``.

    A padded embedding matrix (more rows than the tokenizer has tokens, e.g. Qwen2.5's 151936 rows for 151665
    tokens) is sliced to the tokenizer's vocabulary (:func:`arkd.models.slice_to_vocab`), so generation never
    samples an id that stands for no token.

    Returns:
        The model (eval mode, on ``device``), the tokenizer, and the number of padded rows dropped.
    """
    from arkd.models import (
        MAX_VOCAB_PADDING,
        load_model,
        load_tokenizer,
        model_vocab_size,
        resolve_dtype,
        slice_to_vocab,
    )

    try:
        dtype = resolve_dtype(str(cfg.dtype))
    except ValueError as err:
        raise EvalError(f"dtype: {err}.") from err
    sources = _model_sources(cfg)
    _check_model_dir("model_path", sources["model_path"], tokenizer=not cfg.tokenizer_path)
    if cfg.tokenizer_path:
        _check_model_dir("tokenizer_path", sources["tokenizer_path"], weights=False)
    try:
        tokenizer = load_tokenizer(_local(sources["tokenizer_path"]))
        model = load_model(_local(sources["model_path"]), dtype=dtype)
    except OSError as err:
        raise EvalError(
            f"{_first_line(err)} (set model_path=PATH, and tokenizer_path=PATH if it lives elsewhere)."
        ) from err
    except Exception as err:  # noqa: BLE001 - a damaged weights file (safetensors' own error), an unreadable config
        raise EvalError(
            f"model_path={cfg.model_path}: the model cannot be loaded ({type(err).__name__}: {_first_line(err)}); "
            "expected a complete model directory (a model.safetensors cut short or damaged?)."
        ) from None
    _check_healthy(model, f"model_path={cfg.model_path}")
    rows, tokens = model_vocab_size(model), len(tokenizer)
    if not tokens <= rows <= tokens + MAX_VOCAB_PADDING:
        raise EvalError(
            f"model_path={cfg.model_path} has {rows} output rows for a tokenizer of {tokens} tokens; expected the "
            f"model's own tokenizer (between {tokens} and {tokens + MAX_VOCAB_PADDING} rows; set tokenizer_path=PATH)."
        )
    if rows > tokens:
        slice_to_vocab(model, tokens)
        if report:
            print(f"[arkd-eval] dropped {rows - tokens} padded embedding rows ({rows} -> {tokens}, the tokenizer's).")
    return model.to(device).eval(), tokenizer, rows - tokens


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_model_dir(key: str, source: str, *, weights: bool = True, tokenizer: bool = True) -> None:
    """A local directory that is not a model (no ``config.json``; for a tokenizer, no tokenizer file) in one
    sentence, before transformers' own error (cut off mid-sentence) is reached."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return
    if weights and not (path / "config.json").is_file():
        raise EvalError(
            f"{key}={source} is not a model directory (it has no config.json); expected a directory written by "
            "save_pretrained (e.g. a run's final/ or best/) or a Hub name."
        )
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise EvalError(
            f"{key}={source} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); expected the model's "
            "directory with its tokenizer, or tokenizer_path=PATH to one."
        )


def _check_healthy(model, key: str) -> None:
    """Refuse a model whose weights or whose outputs on a probe input are not finite, before any generation (a
    diverged model would only fail deep inside sampling, after hours of generation, or be scored as if valid)."""
    from arkd.checkpoint import model_problem

    problem = model_problem(model)
    if problem is not None:
        raise EvalError(f"{key}: {problem}; expected a model of a run that did not diverge.")


def _vllm_generator(cfg: DictConfig, decoding):
    """For ``backend=vllm``: a weightless skeleton of the model (for the results' record), its tokenizer, and the
    :class:`arkd.evaluation.vllm_backend.VLLMGenerator` that loads the weights in vLLM."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from arkd.evaluation.vllm_backend import VLLMGenerator
    from arkd.models import load_tokenizer, model_vocab_size

    sources = _model_sources(cfg)
    try:
        tokenizer = load_tokenizer(Path(sources["tokenizer_path"]).expanduser())
        config = AutoConfig.from_pretrained(str(Path(sources["model_path"]).expanduser()))
    except OSError as err:
        raise EvalError(
            f"{_first_line(err)} (set model_path=PATH, and tokenizer_path=PATH if it lives elsewhere)."
        ) from err
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # as loading does (tied input and output embeddings are counted once)
    options = OmegaConf.to_container(cfg.vllm, resolve=True) if cfg.get("vllm") else {}
    generator = VLLMGenerator(
        str(Path(sources["model_path"]).expanduser()),
        tokenizer,
        decoding,
        tokenizer_path=str(Path(sources["tokenizer_path"]).expanduser()),
        dtype=str(cfg.dtype),
        vocab_rows=model_vocab_size(skeleton),
        **options,
    )
    return skeleton, tokenizer, generator


def load_teacher(cfg: DictConfig, device: str, tokenizer):
    """The teacher of ``teacher_path`` on ``device`` (None without one); its saved tokenizer must be the model's."""
    from arkd.models import load_model, load_tokenizer, resolve_dtype

    if not cfg.get("teacher_path"):
        return None
    source = _local(str(cfg.teacher_path))
    try:
        teacher = load_model(source, dtype=resolve_dtype(str(cfg.dtype)))
    except OSError as err:
        raise EvalError(f"{_first_line(err)} (set teacher_path=PATH to the teacher's model directory).") from err
    try:
        own = load_tokenizer(source)
    except (OSError, ValueError, TypeError):
        own = None  # a teacher saved without its tokenizer: the model's is assumed
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise EvalError(
            f"teacher_path={cfg.teacher_path}: its tokenizer differs from the model's ({len(own)} vs "
            f"{len(tokenizer)} tokens); expected a teacher with the same tokenizer."
        )
    _check_healthy(teacher, f"teacher_path={cfg.teacher_path}")
    return teacher.to(device).eval()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def run(cfg: DictConfig, output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.model_path`` on ``cfg.datasets`` and write the run's files; return ``results.json``'s content.

    Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process runs this: each loads the model on
    its own device and generates its share of the rows (:mod:`arkd.evaluation.sharding`); the main process scores
    and writes. The results equal a single process's except ``settings.num_processes`` and each dataset's
    ``rows_per_process``.

    Args:
        cfg: the composed ``evaluate.yaml`` config.
        output_dir: where to write (default: ``cfg.output_dir``, else Hydra's run directory).
    """
    from arkd.evaluation.generation import DecodingConfig

    _model_sources(cfg)  # fail on a missing model_path before anything slow
    seeds = [int(s) for s in cfg.seeds]
    if not seeds:
        raise EvalError("seeds is empty; expected a list such as [10, 20, 30, 40, 50].")
    if int(cfg.batch_size) < 1:
        raise EvalError(f"batch_size={cfg.batch_size}; expected a positive integer.")
    decoding_cfg = OmegaConf.to_container(cfg.decoding, resolve=True)
    greedy = bool(decoding_cfg.pop("greedy"))
    try:
        decoding = DecodingConfig(do_sample=not greedy, **decoding_cfg)
    except (TypeError, ValueError) as err:
        raise EvalError(f"decoding: {err}") from err
    backend = _check_backend(cfg, decoding)
    _head_top_p(cfg)
    if backend == "vllm" and cfg.get("teacher_path"):
        raise EvalError(
            "teacher_path is set with backend=vllm: the teacher-forced metrics need the model's own logits; use "
            "backend=hf, or leave teacher_path unset."
        )
    specs = resolve_datasets(cfg)
    device, started = start_processes(str(cfg.device))
    try:
        return _evaluate(cfg, output_dir, specs, seeds, decoding, device, backend)
    finally:
        if started:
            end_processes()


def _head_top_p(cfg: DictConfig) -> float:
    """``distribution.head_top_p``, checked: a number in (0, 1]."""
    head_top_p = float((cfg.get("distribution") or {}).get("head_top_p", 0.9))
    if not 0.0 < head_top_p <= 1.0:
        raise EvalError(f"distribution.head_top_p={head_top_p}; expected a number in (0, 1].")
    return head_top_p


BACKENDS = ("hf", "vllm")
PROCESS_TIMEOUT = timedelta(hours=4)


def _check_backend(cfg: DictConfig, decoding) -> str:
    """``cfg.backend``, refused in one sentence when it is unknown or (vllm) cannot run this evaluation."""
    backend = str(cfg.get("backend", "hf"))
    if backend not in BACKENDS:
        raise EvalError(f"backend={backend}; expected one of {', '.join(BACKENDS)}.")
    if backend == "vllm":
        from arkd.evaluation.vllm_backend import VLLMUnavailable, check_vllm_decoding, import_vllm

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            raise EvalError(
                f"backend=vllm runs in one process (vLLM places the model on its GPUs itself, see vllm.* options), "
                f"not {world}; start it without torchrun / accelerate launch, or use backend=hf."
            )
        try:
            check_vllm_decoding(decoding)
            import_vllm()
        except (ValueError, VLLMUnavailable) as err:
            raise EvalError(str(err)) from None
    return backend


def start_processes(setting: str) -> tuple[str, bool]:
    """This process's device, and whether a process group was started here (``WORLD_SIZE`` > 1: accelerate's
    ``PartialState`` joins the launch's processes, NCCL on GPUs, gloo on CPUs; each process uses its local GPU)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _device(setting), False
    if setting not in ("auto", "cpu", "cuda"):
        raise EvalError(
            f"device={setting} names one device for {world} processes; set device=auto, device=cuda (each process "
            "uses its own GPU) or device=cpu."
        )
    _device(setting)  # device=cuda without CUDA
    import torch.distributed as dist
    from accelerate import PartialState

    started = not (dist.is_available() and dist.is_initialized())
    # The other processes wait in a collective while the main one scores a dataset (Rouge-L and BERTScore of every
    # seed), which can outlast torch's default timeout (30 minutes; less for NCCL): allow PROCESS_TIMEOUT.
    state = PartialState(cpu=setting == "cpu" or not torch.cuda.is_available(), timeout=PROCESS_TIMEOUT)
    return str(state.device), started


def end_processes() -> None:
    """Destroy the process group :func:`start_processes` started (and accelerate's record of it)."""
    import torch.distributed as dist
    from accelerate import PartialState

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    PartialState._reset_state()


def on_main(check) -> Any:
    """Run ``check()`` on the main process only; its :class:`EvalError` is raised on every process, and its value
    is returned on every process (so that no process waits for one that failed)."""
    from arkd import distributed as pdist

    value, message = None, None
    if pdist.rank() == 0:
        try:
            value = check()
        except EvalError as err:
            message = str(err)
    value, message = pdist.broadcast_object((value, message))
    if message is not None:
        raise EvalError(message)
    return value


def _evaluate(
    cfg: DictConfig, output_dir, specs: list[DatasetSpec], seeds: list[int], decoding, device: str, backend: str
):
    from arkd import distributed as pdist
    from arkd.data import load_examples
    from arkd.evaluation.generation import BertScoreSettings, evaluate_model, generate
    from arkd.evaluation.reports import (
        build_results,
        environment_info,
        generation_records,
        model_identity,
        write_run_outputs,
    )

    main = pdist.rank() == 0
    _check_agreement(_config_record(cfg))  # before anything is loaded or written

    def output_directory() -> str:
        out = Path(output_dir or cfg.output_dir or _hydra_run_dir())
        _check_output_dir(out, overwrite=bool(cfg.get("overwrite", False)))  # before any generation
        return str(out)

    out = Path(on_main(output_directory))  # the main process's directory (Hydra's may differ by a second)
    bert = None
    if cfg.bertscore.enabled:
        bert = BertScoreSettings(
            model_type=str(cfg.bertscore.model_type),
            num_layers=cfg.bertscore.num_layers,
            batch_size=int(cfg.bertscore.batch_size),
            idf=bool(cfg.bertscore.idf),
            rescale_with_baseline=bool(cfg.bertscore.rescale_with_baseline),
            lang=cfg.bertscore.lang,
            device=cfg.bertscore.device or device,
        )
        on_main(lambda: _check_bertscore(bert))  # only the main process scores
    loaded = {}
    for spec in specs:
        try:
            loaded[spec.name] = load_examples(spec.path, limit=spec.max_rows)
        except (OSError, ValueError) as err:
            raise EvalError(f"dataset '{spec.name}' ({spec.path}): {_first_line(err)}") from err
    generate_fn = None
    if backend == "vllm":
        model, tokenizer, generate_fn = _vllm_generator(cfg, decoding)
        dropped = 0  # vLLM keeps the rows; allowed_token_ids keeps sampling to the tokenizer's ids
    else:
        model, tokenizer, dropped = load_model_and_tokenizer(cfg, device, report=main)
    teacher = load_teacher(cfg, device, tokenizer)
    loaded = _templated(loaded, tokenizer, cfg)
    _check_positions(cfg, decoding, tokenizer, loaded, [("model_path", model), ("teacher_path", teacher)])
    inputs = _inputs_record(model, teacher, tokenizer, loaded, fingerprint=backend != "vllm")
    if pdist.world_size() > 1:  # every process loaded the same model, teacher, tokenizer and rows
        _check_agreement(inputs)
    journal = _open_journal(cfg, out, inputs, main=main)
    if generate_fn is None:
        generate_fn = partial(generate, model, tokenizer, batch_size=int(cfg.batch_size), decoding=decoding)
    dist_cfg = cfg.get("distribution") or {}
    head_top_p = _head_top_p(cfg)
    progress = bool(cfg.progress) and main
    reports: dict[str, dict[str, Any]] = {}
    for spec in specs:
        examples = loaded[spec.name]
        if main and spec.max_rows is not None and len(examples) < spec.max_rows:
            print(f"[arkd-eval] {spec.name}: {len(examples)} rows (fewer than max_rows={spec.max_rows}).")
        report = _journaled(
            evaluate_model,
            model,
            tokenizer,
            examples,
            seeds=seeds,
            batch_size=int(cfg.batch_size),
            decoding=decoding,
            bertscore=bert,
            rouge_workers=cfg.rouge_workers,
            progress=progress,
            desc=spec.name,
            generate_fn=journal.wrap(  # every batch of rows on disk as soon as it is generated
                generate_fn,
                spec.name,
                tokenizer=tokenizer,
                max_prompt_tokens=decoding.max_prompt_tokens,
                chunk=int(cfg.batch_size) if backend == "hf" else len(examples),
            ),
            teacher=teacher,
            head_top_p=head_top_p,
            diversity=bool(dist_cfg.get("diversity", True)),
        )
        reports[spec.name] = {"source": str(spec.path), "max_rows": spec.max_rows, **report}
    bert_settings: dict[str, Any] = {"enabled": bert is not None}
    if bert is not None:
        bert_settings.update(next(iter(reports.values()))["bertscore"])
    settings = {
        "seeds": seeds,
        "batch_size": int(cfg.batch_size),
        "decoding": decoding.to_dict(),
        "bertscore": bert_settings,
        "dtype": str(cfg.dtype),
        "backend": backend,
        "num_processes": pdist.world_size(),
    }
    if teacher is not None:
        settings["teacher"] = {"source": str(cfg.teacher_path), "head_top_p": head_top_p}
    label = str(cfg.label) if cfg.label else Path(str(cfg.model_path)).name
    identity = model_identity(
        model,
        str(cfg.model_path),
        tokenizer=tokenizer,
        tokenizer_source=str(cfg.tokenizer_path or cfg.model_path),
        hash_weights=bool(cfg.hash_weights) and main,
    )
    identity["padded_rows_dropped"] = dropped
    if backend == "vllm":  # the weights live in vLLM; the record's model is a weightless skeleton of the same config
        identity.update(dtype=str(cfg.dtype), device="vllm")
    results = build_results(
        reports,
        label=label,
        model=identity,
        settings=settings,
        environment=environment_info(device),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    # Every process got here: a results.json is written only when no process failed on its way (a process that
    # failed leaves the others waiting here until the launcher stops them).
    pdist.gather_objects(True)
    if not main:
        return results
    records = (
        record for spec in specs for record in generation_records(spec.name, loaded[spec.name], reports[spec.name])
    )
    try:
        paths = write_run_outputs(out, results, records)
    except OSError as err:
        from arkd.errors import describe_os_error

        raise EvalError(
            f"cannot write the results to {out}: {describe_os_error(err)}; the {len(journal.done)} generated rows are "
            f"kept in {journal.folder}, and the same command continues from them."
        ) from None
    journal.remove()
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"[arkd-eval] wrote {paths['results']}, {paths['markdown'].name} and {paths['generations'].name}")
    return results


def _check_positions(cfg: DictConfig, decoding, tokenizer, loaded: dict[str, list], models: list) -> None:
    """The longest prompt and its new tokens fit every model's positions (past them generation ends in a bare
    ``IndexError``, after hours of sampling), checked before any generation."""
    from arkd.evaluation.generation import encode_prompts

    longest = 0
    for rows in loaded.values():
        if rows:
            prompts = [r.prompt if hasattr(r, "prompt") else r["prompt"] for r in rows]
            longest = max(longest, max(len(x) for x in encode_prompts(tokenizer, prompts, decoding.max_prompt_tokens)))
    needed = longest + int(decoding.max_new_tokens)
    for key, model in models:
        config = getattr(model, "config", None)
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if positions is not None and needed > int(positions):
            raise EvalError(
                f"decoding.max_new_tokens={decoding.max_new_tokens}: the longest prompt has {longest} tokens "
                f"(decoding.max_prompt_tokens={decoding.max_prompt_tokens}), {needed} in all, but {key}="
                f"{cfg.get(key)} has {positions} positions; expected at most {max(int(positions) - longest, 0)} new "
                "tokens, or a smaller decoding.max_prompt_tokens."
            )


def _journaled(evaluate, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``evaluate(*args, **kwargs)``, a failing write of the journal (a full disk) as one sentence."""
    from arkd.errors import OutputError

    try:
        return evaluate(*args, **kwargs)
    except OutputError as err:
        raise EvalError(str(err)) from None


def _open_journal(cfg: DictConfig, out: Path, inputs: dict[str, Any], *, main: bool):
    """The journal of generations in ``out`` (:mod:`arkd.evaluation.journal`): an interrupted evaluation's rows are
    kept and continued from when the same evaluation runs again; another evaluation's are refused."""
    from arkd import distributed as pdist
    from arkd.evaluation.journal import GenerationJournal

    journal = GenerationJournal(out, rank=pdist.rank())
    identity = {
        "generation": {
            k: _plain(cfg.get(k)) for k in ("model_path", "tokenizer_path", "dtype", "backend", "batch_size")
        },
        "decoding": _plain(cfg.decoding),
        "inputs": inputs,
    }

    def claim() -> None:
        problem = journal.claim(identity, overwrite=bool(cfg.get("overwrite", False)))
        if problem is not None:
            raise EvalError(
                f"{problem}; expected the same command to continue it, overwrite=true, or another output_dir."
            )

    on_main(claim)
    found = journal.load()
    if main and found:
        print(f"[arkd-eval] continuing an interrupted evaluation: {found} generated rows kept in {journal.folder}.")
    return journal


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _config_record(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config every process must share (``output_dir`` aside: Hydra's may differ by a second)."""
    record = OmegaConf.to_container(cfg, resolve=True)
    record.pop("output_dir", None)
    return record


def _inputs_record(model, teacher, tokenizer, loaded: dict[str, list], *, fingerprint: bool) -> dict[str, Any]:
    """What each process loaded: the model's and teacher's fingerprints, the tokenizer, a hash of every dataset's
    rows."""
    import dataclasses
    import hashlib
    import json

    from arkd.checkpoint import model_fingerprint

    def rows_hash(rows: list) -> str:
        plain = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows]
        text = json.dumps(plain, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {
        "model": model_fingerprint(model) if fingerprint else None,
        "teacher": model_fingerprint(teacher) if teacher is not None else None,
        "tokenizer": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16],
        "rows": {name: rows_hash(rows) for name, rows in loaded.items()},
    }


def _check_agreement(record: dict[str, Any]) -> None:
    """Refuse, on every process, processes that were not asked the same (sharded results would mix them)."""
    from arkd import distributed as pdist

    problem = pdist.disagreement(record)
    if problem is not None:
        raise EvalError(
            f"the {pdist.world_size()} processes of this evaluation were not asked the same: {problem}; expected one "
            "command (the same arguments, model and data files) for every process."
        )


def _check_output_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse another evaluation's outputs (unless ``overwrite=true``) and an unwritable directory, in one sentence."""
    from arkd.errors import ConfigError, OutputError
    from arkd.run_dir import check_writable, refuse_existing_outputs

    try:
        refuse_existing_outputs(out, OUTPUT_FILES, overwrite=overwrite, key="overwrite=true")
        check_writable(out, "output directory")
    except (ConfigError, OutputError) as err:
        raise EvalError(str(err)) from None


def _check_bertscore(bert) -> None:
    """Fail before generation (which can take hours) when the BERTScore model cannot be loaded."""
    from arkd.evaluation.metrics import BertScoreLoadError, _load_scorer

    try:
        _load_scorer(bert.model_type, bert.num_layers, bert.idf, bert.rescale_with_baseline, bert.device, bert.lang)
    except BertScoreLoadError as err:
        raise EvalError(str(err)) from err


def _hydra_run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().runtime.output_dir
    except ValueError as err:
        raise EvalError("no output directory: set output_dir=DIR (needed outside the arkd-eval command).") from err


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``evaluate.yaml`` with command-line style overrides, outside the ``arkd-eval`` command."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="evaluate", overrides=list(overrides or []))
