"""``arkd-cache-teacher [--dtype D] [--shard-rows N] [--batch-size B] [--device DEV] config=NAME teacher.cache_dir=DIR
teacher.top_k=K [overrides]``: write the teacher cache of a training run (``scripts/cache_teacher.py`` runs this).

It composes the same config as ``arkd-train`` with the same overrides, builds the teacher exactly as the run would
(the SFT cache's teacher for the tiny job), runs it over every training row and every validation row and writes the
top-k log-probabilities per response token to ``teacher.cache_dir`` (:mod:`arkd.teacher_cache`). A killed run loses at
most the shard in progress: running the same command again continues. ``arkd-train`` with the same overrides then
reads the cache and never loads the teacher.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["main", "prepare_rows", "write_for_config"]


def prepare_rows(cfg: Any, tokenizer: Any) -> tuple[list[dict], Any, bool]:
    """The tokenized rows a run with ``cfg`` trains and validates on (training rows first), its training dataset
    (for the teacher's SFT) and the resolved ``data.add_bos``."""
    from hydra.utils import instantiate

    from arkd.data import TokenizedDataset
    from arkd.data.tokenization import resolve_add_bos

    add_bos = resolve_add_bos(cfg.data.get("add_bos", "auto"), tokenizer)
    splits = instantiate(cfg.data.splits)
    common = {
        "max_prompt_length": int(cfg.data.max_prompt_length),
        "max_length": int(cfg.data.max_length),
        "add_bos": add_bos,
    }
    train = TokenizedDataset(splits["train"], tokenizer, overlong_prompt="drop", **common)
    validation = TokenizedDataset(list(splits.get("validation") or []), tokenizer, overlong_prompt="truncate", **common)
    rows = [train[i] for i in range(len(train))] + [validation[i] for i in range(len(validation))]
    return rows, train, add_bos


def write_for_config(
    cfg: Any,
    *,
    dtype: str = "float32",
    shard_rows: int = 512,
    batch_size: int = 16,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the run's teacher and rows from ``cfg`` and write (or continue) its cache; returns the manifest."""
    import torch
    from hydra.utils import instantiate

    from arkd.data import TrainingCollator
    from arkd.errors import ConfigError
    from arkd.models import MAX_VOCAB_PADDING, model_vocab_size, slice_to_vocab
    from arkd.recipes.build import build_model, make_accelerator, quiet_libraries
    from arkd.recipes.sft_cache import sft_cached
    from arkd.teacher_cache import cache_identity, model_node, uses_teacher_cache, write_cache

    if not uses_teacher_cache(cfg):
        raise ConfigError("set teacher.cache_dir=DIR: the directory the teacher cache is written to.")
    quiet_libraries()
    if cfg.trainer.get("num_threads"):
        torch.set_num_threads(int(cfg.trainer.num_threads))
    tokenizer = instantiate(cfg.tokenizer)
    rows, train, add_bos = prepare_rows(cfg, tokenizer)
    collate = TrainingCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    node = model_node(cfg.teacher)
    if cfg.init_sft.get("teacher") is not None:
        accelerator = make_accelerator(cfg)
        teacher, _ = sft_cached(
            "teacher",
            node,
            cfg.init_sft.teacher,
            cfg=cfg,
            tokenizer=tokenizer,
            train_dataset=train,
            collate=collate,
            accelerator=accelerator,
        )
    else:
        teacher = build_model(node, tokenizer)
    vocab = len(tokenizer)
    width = model_vocab_size(teacher)
    if not vocab <= width <= vocab + MAX_VOCAB_PADDING:
        raise ConfigError(
            f"the teacher's output layer has {width} rows but the tokenizer has {vocab} tokens; expected between "
            f"{vocab} and {vocab + MAX_VOCAB_PADDING} rows (a model of this tokenizer)."
        )
    slice_to_vocab(teacher, vocab)
    device = device or ("cuda" if torch.cuda.is_available() and not bool(cfg.trainer.cpu) else "cpu")
    teacher.to(device)
    identity = cache_identity(cfg, vocab_size=vocab, add_bos=add_bos)
    return write_cache(
        str(cfg.teacher.cache_dir),
        teacher=teacher,
        rows=rows,
        identity=identity,
        collate=collate,
        dtype=dtype,
        shard_rows=shard_rows,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )


def _check_arguments(args: argparse.Namespace) -> str | None:
    """One sentence on a bad option value (before anything is built), or None."""
    for flag, value in (("--shard-rows", args.shard_rows), ("--batch-size", args.batch_size)):
        if value < 1:
            return f"{flag}: got {value}, expected an integer >= 1."
    if args.device is not None:
        import torch

        if not (args.device == "cpu" or args.device.startswith("cuda")):
            return f"--device: got {args.device!r}, expected cpu, cuda or cuda:N."
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            return f"--device: got {args.device!r}, but CUDA is not available here; expected --device cpu."
    return None


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="arkd-cache-teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shard-rows", type=int, default=512, help="rows per shard (the unit of atomic writes)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per teacher forward")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from arkd.cli.train import _compose, _describe, check_overrides
    from arkd.errors import ConfigError, OutputError

    problem = _check_arguments(args) or check_overrides(overrides)
    if problem is not None:
        print(f"arkd-cache-teacher: {problem}", file=sys.stderr)
        sys.exit(2)
    cfg = _compose(overrides)
    from arkd.checkpoint import CheckpointError
    from arkd.trainer import RunFailedError, TrainingInterrupted

    try:
        if cfg.teacher is not None and cfg.teacher.get("cache_dir"):
            from arkd.run_dir import check_writable

            check_writable(str(cfg.teacher.cache_dir), "teacher cache directory (teacher.cache_dir)")
        manifest = write_for_config(
            cfg,
            dtype=args.dtype,
            shard_rows=args.shard_rows,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
        )
    except ConfigError as err:
        print(f"arkd-cache-teacher: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except (TrainingInterrupted, KeyboardInterrupt):
        print(
            "arkd-cache-teacher: interrupted; the shards written so far are kept, and the same command continues "
            "from them.",
            file=sys.stderr,
        )
        sys.exit(130)
    except (OSError, OutputError, RunFailedError, CheckpointError) as err:  # a full or unwritable disk, a failed SFT
        print(f"arkd-cache-teacher: {_describe(err)}", file=sys.stderr)
        sys.exit(1)
    print(
        f"arkd-cache-teacher: done; {manifest['rows_total']} rows, {manifest['tokens_total']} tokens, top "
        f"{manifest['identity']['top_k']}, {manifest['bytes_total'] / 2**20:.1f} MiB in "
        f"{len(manifest['shards'])} shard(s) at {cfg.teacher.cache_dir}"
    )


if __name__ == "__main__":
    main()
