"""Datasets of tokenized examples and data loaders with deterministic, resumable shuffling.

The order of a run's batches is a pure function of ``(seed, epoch, rank, world_size)``: epoch ``e`` visits the
permutation ``torch.randperm(n, generator=seed + e)``, and rank ``r`` of ``w`` processes takes every ``w``-th
index of it from position ``r`` (the tail padded by wrapping around, as ``DistributedSampler`` does, unless
``drop_last``). A checkpoint stores ``ResumableDataLoader.state_dict()`` (epoch and the number of this rank's
samples already delivered); loading it makes the next iteration continue with the very next sample.

The loader never touches the global torch generator: every ``DataLoader`` iterator draws a base seed (for its
workers) when it is created, and a resumed run creates one more iterator than the uninterrupted run did, so drawing
it from the global generator would shift the dropout stream of every later step. Each iterator's base seed comes from
the loader's own generator, reseeded from ``(seed, epoch, position)``, so worker seeds, too, are a function of the
data position alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from arkd.data.example import Example
from arkd.data.tokenization import tokenize_examples


class TokenizedDataset(Dataset):
    """Examples tokenized once under the protocol's limits (see :func:`arkd.data.tokenize_examples`).

    Each item is a dict: ``index`` (position in ``examples``), ``prompt_ids``, ``response_ids`` (lists of ints),
    ``prompt`` (str) and ``references`` (list of str), which both collators understand.

    Args:
        examples: the rows (e.g. from :func:`arkd.data.load_examples`).
        tokenizer: a Hugging Face tokenizer with an end-of-text token.
        max_prompt_length: the most prompt tokens.
        max_length: the most prompt plus response tokens.
        overlong_prompt: ``"drop"`` (training), ``"truncate"`` (evaluation) or ``"error"``; counted either way in
            ``self.report``.
        truncation_side: ``"right"`` (keep the first tokens, MiniLLM) or ``"left"``.
        add_bos: prepend the BOS token to prompts (off in the GPT-2 protocol).
        progress: show a progress bar while tokenizing.

    Raises:
        ValueError: when no example is left (for instance every prompt was over the limit).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        *,
        max_prompt_length: int = 256,
        max_length: int = 512,
        overlong_prompt: str = "drop",
        truncation_side: str = "right",
        add_bos: bool = False,
        progress: bool = False,
    ) -> None:
        if not examples:
            raise ValueError("no examples to tokenize; expected at least one")
        self.examples = list(examples)
        self.items, self.report = tokenize_examples(
            self.examples,
            tokenizer,
            max_prompt_length=max_prompt_length,
            max_length=max_length,
            overlong_prompt=overlong_prompt,
            truncation_side=truncation_side,
            add_bos=add_bos,
            progress=progress,
        )
        if not self.items:
            raise ValueError(f"no examples left after tokenization ({self.report.summary()})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        example = self.examples[item.index]
        return {
            "index": item.index,
            "prompt_ids": item.prompt_ids,
            "response_ids": item.response_ids,
            "prompt": example.prompt,
            "references": example.references,
        }

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample (prompt + response + end-of-text), for length-grouped batching."""
        return [len(item.prompt_ids) + len(item.response_ids) for item in self.items]

    @property
    def num_response_tokens(self) -> int:
        """Tokens counted by the loss over the whole dataset (responses plus end-of-text tokens)."""
        return sum(len(item.response_ids) for item in self.items)


class ResumableSampler(Sampler[int]):
    """Deterministic (optionally shuffled) per-rank sampler whose position can be saved and restored.

    Args:
        num_samples: the dataset's length (or the dataset itself).
        shuffle: permute each epoch (from ``seed + epoch``); False visits ``0 .. n-1`` in order.
        seed: the shuffling seed, shared by all ranks.
        rank: this process's rank.
        world_size: the number of processes; each gets ``ceil(n / world_size)`` indices per epoch
            (``floor`` with ``drop_last``).
        drop_last: drop the tail that does not divide evenly instead of wrapping around.
        lengths: per-sample lengths (tokens); with ``group_size``, batches of similar length (below).
        group_size: with ``lengths``: this rank's shuffled order is cut into groups of ``group_size`` samples
            (a multiple of the batch size, e.g. 50 batches), each group sorted by length, longest first, so that
            consecutive batches hold samples of similar length and little padding (HF's length-grouped sampling).
            The groups stay in random order and the epoch is still a permutation of the rank's samples, so the
            position and resume work as without grouping.
    """

    def __init__(
        self,
        num_samples: int | Sequence,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        group_size: int | None = None,
    ) -> None:
        n = num_samples if isinstance(num_samples, int) else len(num_samples)
        if n < 1:
            raise ValueError(f"the sampler needs at least one sample, got {n}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank={rank} and world_size={world_size}")
        if drop_last and n < world_size:
            raise ValueError(f"drop_last with {n} samples leaves nothing for {world_size} processes")
        self.n = n
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # samples of this epoch to skip on the next iteration (set when resuming)
        if (lengths is None) != (group_size is None):
            raise ValueError("length grouping needs both lengths (one per sample) and group_size")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths holds {len(lengths)} values; expected one per sample ({n})")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.lengths = None if lengths is None else [int(x) for x in lengths]
        self.group_size = group_size

    @property
    def per_rank(self) -> int:
        """Indices one rank visits in a full epoch."""
        return self.n // self.world_size if self.drop_last else -(-self.n // self.world_size)

    def __len__(self) -> int:
        return self.per_rank

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's full index list for ``epoch`` (before skipping ``start``)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        if total > len(order):
            order = (order * -(-total // len(order)))[:total]
        mine = order[:total][self.rank :: self.world_size]
        if self.lengths is None or not self.shuffle:
            return mine
        grouped: list[int] = []
        for start in range(0, len(mine), self.group_size):
            group = mine[start : start + self.group_size]
            grouped += sorted(group, key=lambda i: -self.lengths[i])  # stable: ties keep the random order
        return grouped

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.start :])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to visit next; a different epoch than the current one starts at its beginning."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start = 0

    def state_dict(self) -> dict:
        """The position to resume from: ``{"epoch", "position", "seed", "world_size"}``."""
        return {"epoch": self.epoch, "position": self.start, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["epoch"]``, skipping its first ``state["position"]`` samples of this rank."""
        for key in ("epoch", "position"):
            if key not in state:
                raise ValueError(f"sampler state is missing '{key}'; expected the dict of state_dict()")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']} but this sampler has seed {self.seed}")
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(
                f"sampler state was saved with world_size {state['world_size']}, this run has {self.world_size}"
            )
        if not 0 <= state["position"] <= self.per_rank:
            raise ValueError(f"sampler position {state['position']} is outside 0..{self.per_rank}")
        self.epoch = int(state["epoch"])
        self.start = int(state["position"])


def _batch_size_of(batch) -> int:
    if isinstance(batch, dict):
        return len(batch["input_ids"])
    return len(batch)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that knows which samples it has delivered.

    ``state_dict()`` counts the samples handed to the caller (not those prefetched by workers), so a checkpoint
    written after a step resumes with the very next batch. A full pass advances the sampler to the next epoch;
    breaking out of a pass keeps the position, so the next ``iter()`` continues where it stopped.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, **kwargs) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._delivered = sampler.start

    def __iter__(self) -> Iterator:
        sampler = self.sampler
        epoch = sampler.epoch
        self._delivered = sampler.start
        # The iterator's base seed (workers) from the loader's own generator, a function of the position only.
        self.generator.manual_seed((sampler.seed * 1_000_003 + epoch * 10_007 + sampler.start) % (2**63 - 1))
        finished = False
        try:
            for batch in super().__iter__():
                self._delivered += _batch_size_of(batch)
                yield batch
            finished = True
        finally:
            if finished:
                sampler.epoch, sampler.start, self._delivered = epoch + 1, 0, 0
            else:
                sampler.start = self._delivered

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to visit next (see :meth:`ResumableSampler.set_epoch`)."""
        self.sampler.set_epoch(epoch)
        self._delivered = self.sampler.start

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed", "world_size"}`` where position counts delivered samples of this rank."""
        state = self.sampler.state_dict()
        state["position"] = self._delivered
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` on the next iteration."""
        self.sampler.load_state_dict(state)
        self._delivered = self.sampler.start


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn,
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    group_by_length: int | None = None,
) -> ResumableDataLoader:
    """A data loader with deterministic shuffling from ``seed`` and a resumable position.

    Args:
        dataset: e.g. a :class:`TokenizedDataset`.
        batch_size: samples per batch on this rank.
        collate_fn: a :class:`~arkd.data.TrainingCollator` or :class:`~arkd.data.PromptCollator`.
        shuffle: shuffle each epoch (from ``seed + epoch``); off for evaluation.
        seed: the shuffling seed.
        rank: this process's rank (None: from ``torch.distributed`` when initialised, else ``RANK``, else 0).
        world_size: the number of processes (None: likewise, else ``WORLD_SIZE``, else 1).
        drop_last: drop an incomplete last batch (and the uneven tail across ranks).
        num_workers: loader worker processes.
        pin_memory: pin batches in page-locked memory (GPU runs).
        group_by_length: batches of similar length: each rank's shuffled order is cut into groups of this many
            batches, each sorted by length (``ResumableSampler``'s ``group_size``); the dataset must have
            ``lengths`` (:class:`TokenizedDataset` does). None: plain shuffling.

    Returns:
        A :class:`ResumableDataLoader`; its ``state_dict()`` goes into checkpoints.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    grouping: dict = {}
    if group_by_length is not None:
        if group_by_length < 1:
            raise ValueError(f"data.group_by_length must be null or >= 1 (batches per group), got {group_by_length}")
        if not hasattr(dataset, "lengths"):
            name = type(dataset).__name__
            raise ValueError(f"group_by_length needs a dataset with per-sample lengths; {name} has none")
        grouping = {"lengths": dataset.lengths, "group_size": group_by_length * batch_size}
    rank = _default_rank() if rank is None else rank
    world_size = _default_world_size() if world_size is None else world_size
    sampler = ResumableSampler(
        len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, **grouping
    )
    return ResumableDataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        collate_fn=collate_fn,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


def _default_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _default_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
