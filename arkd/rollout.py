"""Where a training batch's responses come from: the ``rollout`` config group.

A rollout source turns each dataset batch into the batch the trainer trains on (one interface, like the alpha
strategies: the trainer never asks which source it has):

- :class:`DatasetResponses` (``rollout=none``, the default): the dataset's responses, unchanged;
- :class:`GKDRollout` (``rollout=gkd``): with probability ``lmbda`` a batch's responses are replaced by the student's
  own samples (TRL's ``GKDTrainer``: one coin per batch);
- :class:`SeqKDRollout` (``rollout=seqkd``): the teacher's generations (sequence-level KD, Kim & Rush 2016), produced
  once for every training prompt and cached on disk under a key of the teacher's weights, the prompts and the
  decoding; reused while the key is unchanged;
- :class:`DistiLLMRollout` (``rollout=distillm``): DistiLLM's adaptive off-policy schedule (Ko et al. 2024): a
  probability raised by 0.1 whenever the validation loss rises by ``loss_eps`` over the last reference, fresh student
  samples kept in a replay buffer and replayed;
- :class:`MiniLLMMixRollout` (``rollout=minillm_mix``): responses sampled from ``a * p + (1 - a) * q`` (teacher p,
  student q), MiniLLM's teacher-mixed sampling (Gu et al. 2024).

Every generated batch is built like a dataset batch (``arkd.data.TrainingCollator``): the prompt tokens of the dataset
row, then the generated tokens up to and including the first end-of-text token (a response that reaches
``max_new_tokens`` or ``data.max_length`` is cut there, without end-of-text, as a long dataset response is); the
prompt is masked out of the loss, the generated tokens and the end-of-text token are counted. Each batch carries
``on_policy`` (float ``[B]``): the student's share of the distribution its response was sampled from (1 for the
student's own samples, 0 for dataset and teacher responses, ``1 - a`` for the mixture); the alpha strategies see it as
the ``on_policy`` feature.

Generation is batched, left-padded and uses the KV cache (``arkd.evaluation.generation``'s helpers). Its randomness is
a function of ``(seed, rank, batch index)`` only, drawn under a forked random state, so it never moves the training
run's random streams, and a resumed run generates what the uninterrupted one did. Each process generates for its own
shard of the data; the replay buffer lives per process; ``state_dict`` holds everything a run needs to continue (the
batch counter, the adaptive probability, the buffer, a generated batch waiting to be trained on).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from arkd import distributed as pdist
from arkd.data.collate import TrainingCollator
from arkd.evaluation.generation import (
    DecodingConfig,
    _generation_config,
    _sampling_processors,
    left_pad,
    row_generator,
    sample_rows,
)
from arkd.rng import seeded

__all__ = [
    "DatasetResponses",
    "DistiLLMRollout",
    "GKDRollout",
    "MiniLLMMixRollout",
    "RolloutSource",
    "SeqKDRollout",
    "prompt_lengths",
    "sample_mixture",
]


def prompt_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Prompt tokens of each row of a right-padded training batch: the real tokens before the first counted one."""
    mask = batch["loss_mask"].bool()
    real = batch["attention_mask"].sum(dim=1)
    first = torch.where(mask.any(dim=1), mask.float().argmax(dim=1), real)
    return [int(v) for v in first]


def _derived_seed(*parts: Any) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches ``top_p`` (the top token always), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(-1)
    drop = cum - sorted_probs > top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(-1, keepdim=True)


def _cached_step(model: Any, previous: Any, token: torch.Tensor, mask: torch.Tensor, position: torch.Tensor) -> Any:
    """One decoding step on the KV cache of the previous output (transformers 5 names it ``cache``, 4
    ``past_key_values``)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = previous.get("cache") if previous.get("cache") is not None else previous.get("past_key_values")
    return model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True, **{name: cache})


@torch.no_grad()
def sample_mixture(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    teacher_weight: float,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Sample continuations of left-padded prompts from ``a * p + (1 - a) * q`` token by token, both models on their
    KV caches (p the teacher's, q the student's distribution at ``temperature``; ``a = teacher_weight``; top-p on the
    mixture). Each row draws with its own generator (``arkd.evaluation.generation.sample_rows``; None: fresh
    generators seeded 0, 1, ...). Finished rows continue with ``pad_id``. Returns the new tokens
    ``[B, <= max_new_tokens]``."""
    if generators is None:
        generators = [torch.Generator().manual_seed(row) for row in range(input_ids.shape[0])]
    position = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    mask = attention_mask
    s_out = student(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True)
    t_out = teacher(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens: list[torch.Tensor] = []
    position = position[:, -1:]
    for _ in range(max_new_tokens):
        q = torch.softmax(s_out.logits[:, -1].float() / temperature, dim=-1)
        p = torch.softmax(t_out.logits[:, -1].float() / temperature, dim=-1)
        probs = _top_p_filter(teacher_weight * p + (1.0 - teacher_weight) * q, top_p)
        uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        token = sample_rows(probs.log(), uniforms).to(input_ids.device)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished = finished | (token == eos_id)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = position + 1
        s_out = _cached_step(student, s_out, token.unsqueeze(-1), mask, position)
        t_out = _cached_step(teacher, t_out, token.unsqueeze(-1), mask, position)
    return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)


class RolloutSource:
    """The interface of a ``rollout`` option (see the module docstring).

    The recipe calls :meth:`configure` with the run's plain settings, the trainer :meth:`bind` with its models; per
    dataset batch the trainer calls :meth:`draw` (the batch it trains on now) or :meth:`preview` (the next batch, for
    the paired reward and the probe, without consuming it: the following ``draw`` returns the same batch). After each
    validation the trainer passes the validation row to :meth:`observe_validation`.

    Class attributes the trainer reads:
        generates: the source generates with the models (it needs :meth:`bind`, and DDP or one process).
        validates_at_start: the trainer validates once before the first step (DistiLLM's reference loss).
        needs_validation: the source adapts on validation (``trainer.eval_interval`` must be > 0).
    """

    generates: bool = False
    validates_at_start: bool = False
    needs_validation: bool = False

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.seed = 0
        self.max_length: int | None = None
        self.cache_dir: Path | None = None
        self.train_prompts: list[list[int]] = []
        self.student: Any = None
        self.teacher: Any = None
        self.device = torch.device("cpu")
        self.rank, self.world_size = 0, 1
        self._drawn = 0
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None
        self.generation_seconds = 0.0  # wall time spent generating, cumulative (the trainer logs its increments)

    # ------------------------------------------------------------------ set-up
    def configure(
        self,
        *,
        tokenizer: Any,
        seed: int,
        max_length: int | None = None,
        cache_dir: str | Path | None = None,
        train_prompts: Sequence[Sequence[int]] = (),
    ) -> RolloutSource:
        """The run's settings: its tokenizer (end-of-text and padding ids), seed, ``data.max_length``, cache
        directory and the training prompts' token ids (for a source that prepares generations for all of them)."""
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.max_length = None if max_length is None else int(max_length)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.train_prompts = [list(p) for p in train_prompts]
        return self

    def bind(self, *, student: Any, teacher: Any, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """The models to generate with (the student as trained, unwrapped) and this process's place."""
        self.student, self.teacher = student, teacher
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)

    # ------------------------------------------------------------------ per batch
    def draw(self, batch: dict[str, torch.Tensor], *, step: int, max_steps: int) -> dict[str, torch.Tensor]:
        """The batch to train on at optimiser step ``step`` (1-based) for this dataset batch; consumes it."""
        if self._pending is not None and self._pending[0] == self._drawn:
            out = self._pending[1]
        else:
            out = self._transform(batch, self._drawn, step=step, max_steps=max_steps)
        self._pending = None
        self._drawn += 1
        return out

    def preview(self, batch: dict[str, torch.Tensor], *, step: int, max_steps: int) -> dict[str, torch.Tensor]:
        """What :meth:`draw` will return for the next dataset batch ``batch``, computed now and kept until then."""
        if self._pending is None or self._pending[0] != self._drawn:
            self._pending = (self._drawn, self._transform(batch, self._drawn, step=step, max_steps=max_steps))
        return self._pending[1]

    def _transform(self, batch: dict[str, torch.Tensor], index: int, *, step: int, max_steps: int):
        raise NotImplementedError

    def observe_validation(self, row: dict[str, Any]) -> None:
        """A validation row (``val_loss``, ...), the same on every process."""

    def last_log(self) -> dict[str, Any]:
        """The source's own statistics for ``metrics.jsonl`` (none by default)."""
        return {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _dataset(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        out["on_policy"] = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float32)
        return out

    def _ids(self) -> tuple[int, int]:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("rollout: the tokenizer has no eos_token_id; generation needs an end-of-text token.")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        return int(eos), int(pad)

    def _prompts(self, batch: dict[str, torch.Tensor]) -> list[list[int]]:
        lengths = prompt_lengths(batch)
        return [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]

    def _cut(self, prompt: list[int], generated: list[int], eos: int, pad: int) -> list[int]:
        """The response: up to and including the first end-of-text (or padding) token, within ``max_length``."""
        end = next((i for i, tok in enumerate(generated) if tok in (eos, pad)), None)
        response = generated[:end] + [eos] if end is not None else list(generated)
        if self.max_length is not None:
            response = response[: max(self.max_length - len(prompt), 0)]
        return response

    def _collate(self, prompts: list[list[int]], responses: list[list[int]], on_policy: float):
        _, pad = self._ids()
        batch = TrainingCollator(pad)([{"prompt_ids": p, "response_ids": r} for p, r in zip(prompts, responses)])
        batch["on_policy"] = torch.full((len(prompts),), float(on_policy), dtype=torch.float32)
        return batch

    def _generate(self, model: Any, prompts: list[list[int]], decoding: DecodingConfig, seed: int) -> list[list[int]]:
        """Sampled (or greedy) continuations of ``prompts`` by ``model``: one left-padded ``generate`` call with the
        KV cache, each row drawing from its own random stream (``arkd.evaluation.generation``'s per-row sampler,
        seeded by ``seed`` and the row); responses cut as :meth:`_cut` says."""
        from transformers import LogitsProcessorList

        eos, pad = self._ids()
        input_ids, attention_mask = left_pad(prompts, pad)
        processors = []
        if decoding.do_sample:
            processors = _sampling_processors(decoding, [row_generator(seed, row) for row in range(len(prompts))])
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        try:
            with torch.no_grad(), seeded(seed, self.device):
                sequences = model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    generation_config=_generation_config(decoding, eos, pad),
                    logits_processor=LogitsProcessorList(processors),
                )
        finally:
            model.train(was_training)
            self.generation_seconds += time.perf_counter() - started
        new = sequences[:, input_ids.shape[1] :].tolist()
        return [self._cut(p, g, eos, pad) for p, g in zip(prompts, new)]

    def _decoding(self, do_sample: bool = True) -> DecodingConfig:
        return DecodingConfig(
            do_sample=do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            no_repeat_ngram_size=0,
            max_new_tokens=self.max_new_tokens,
        )

    def _student_batch(self, batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        if self.student is None:
            raise RuntimeError(f"{type(self).__name__}: bind() the student before drawing batches.")
        prompts = self._prompts(batch)
        seed = _derived_seed(self.seed, "student", self.rank, index)
        return self._collate(prompts, self._generate(self.student, prompts, self._decoding(), seed), 1.0)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "drawn": self._drawn,
            "pending_index": None if self._pending is None else self._pending[0],
            "pending": None if self._pending is None else {k: v.clone() for k, v in self._pending[1].items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._drawn = int(state["drawn"])
        pending = state.get("pending")
        self._pending = None if pending is None else (int(state["pending_index"]), dict(pending))


def _check_decoding(name: str, temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not temperature > 0:
        raise ValueError(f"rollout.temperature must be > 0, got {temperature} ({name}).")
    if not 0 < top_p <= 1:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {top_p} ({name}).")
    if int(max_new_tokens) < 1:
        raise ValueError(f"rollout.max_new_tokens must be >= 1, got {max_new_tokens} ({name}).")


def _check_probability(key: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"rollout.{key} must be in [0, 1], got {value}.")


class DatasetResponses(RolloutSource):
    """``rollout=none``: the dataset's responses (the batch unchanged, with ``on_policy`` 0)."""

    def _transform(self, batch, index, *, step, max_steps):
        return self._dataset(batch)


class GKDRollout(RolloutSource):
    """``rollout=gkd``: with probability ``lmbda`` a batch's responses are the student's own samples (TRL
    ``GKDTrainer``; Agarwal et al. 2024). The coin of batch ``i`` is the same on every process.

    Args:
        lmbda: the probability (TRL's default 0.5; 0: never, 1: always).
        temperature, top_p, max_new_tokens: the student's sampling (TRL: 0.9, no top-p, 128).
    """

    generates = True

    def __init__(self, lmbda: float = 0.5, temperature: float = 0.9, top_p: float = 1.0, max_new_tokens: int = 128):
        super().__init__()
        _check_probability("lmbda", lmbda)
        _check_decoding("gkd", temperature, top_p, max_new_tokens)
        self.lmbda, self.temperature, self.top_p = float(lmbda), float(temperature), float(top_p)
        self.max_new_tokens = int(max_new_tokens)

    def _transform(self, batch, index, *, step, max_steps):
        if random.Random(_derived_seed(self.seed, "gkd", index)).random() < self.lmbda:
            return self._student_batch(batch, index)
        return self._dataset(batch)


class DistiLLMRollout(RolloutSource):
    """``rollout=distillm``: DistiLLM's adaptive off-policy schedule with a replay buffer (Ko et al. 2024,
    ``finetune.py`` of github.com/jongwooko/distillm).

    A probability ``p`` starts at ``init_probability``; after each validation, when ``val_loss`` is at least
    ``loss_eps`` above the reference (the validation before training, then the last loss that raised ``p``), ``p``
    rises by ``step`` (at most 1) and that loss becomes the reference. Per batch, with ``u`` uniform and
    ``s = p * (1 - step / max_steps)`` (``replay_ratio=decreasing``; ``constant``: ``p / 2``; ``increasing``:
    ``p * step / max_steps``): ``u < s``, or ``u < p`` while the buffer holds fewer than ``capacity`` sequences, trains
    on fresh student samples (kept in the buffer, the oldest dropped first); otherwise ``u < p`` trains on a batch
    drawn uniformly from the buffer; otherwise on the dataset's responses.

    Args:
        init_probability, step, loss_eps, capacity, replay_ratio: the schedule (DistiLLM: 0.0, 0.1, 0.1, 1000,
            decreasing).
        temperature, top_p, max_new_tokens: the student's sampling (DistiLLM: 1.0, 1.0, max_length - max_prompt_length
            = 256).
    """

    generates = True
    validates_at_start = True
    needs_validation = True

    def __init__(
        self,
        init_probability: float = 0.0,
        step: float = 0.1,
        loss_eps: float = 0.1,
        capacity: int = 1000,
        replay_ratio: str = "decreasing",
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
    ):
        super().__init__()
        _check_probability("init_probability", init_probability)
        _check_probability("step", step)
        if loss_eps < 0:
            raise ValueError(f"rollout.loss_eps must be >= 0, got {loss_eps}.")
        if int(capacity) < 1:
            raise ValueError(f"rollout.capacity must be >= 1, got {capacity}.")
        if replay_ratio not in ("decreasing", "constant", "increasing"):
            raise ValueError(f"rollout.replay_ratio must be decreasing, constant or increasing, got {replay_ratio!r}.")
        _check_decoding("distillm", temperature, top_p, max_new_tokens)
        self.probability, self.step, self.loss_eps = float(init_probability), float(step), float(loss_eps)
        self.capacity, self.replay_ratio = int(capacity), replay_ratio
        self.temperature, self.top_p, self.max_new_tokens = float(temperature), float(top_p), int(max_new_tokens)
        self.reference_loss: float | None = None
        self.buffer: list[tuple[torch.Tensor, torch.Tensor]] = []  # (prompt_ids, response_ids), oldest first

    def _sampling_threshold(self, step: int, max_steps: int) -> float:
        if self.replay_ratio == "constant":
            return self.probability * 0.5
        if self.replay_ratio == "increasing":
            return self.probability * step / max_steps
        return self.probability * (1.0 - step / max_steps)

    def _transform(self, batch, index, *, step, max_steps):
        u = random.Random(_derived_seed(self.seed, "distillm", index)).random()
        p = self.probability
        if u < self._sampling_threshold(step, max_steps) or (u < p and len(self.buffer) < self.capacity):
            out = self._student_batch(batch, index)
            for row, n in enumerate(prompt_lengths(out)):
                real = int(out["attention_mask"][row].sum())
                self.buffer.append((out["input_ids"][row, :n].clone(), out["input_ids"][row, n:real].clone()))
            del self.buffer[: max(len(self.buffer) - self.capacity, 0)]
            return out
        if u < p:
            size = batch["input_ids"].shape[0]
            rng = random.Random(_derived_seed(self.seed, "replay", self.rank, index))
            chosen = rng.sample(range(len(self.buffer)), k=min(size, len(self.buffer)))
            pairs = [self.buffer[i] for i in chosen]
            return self._collate([p.tolist() for p, _ in pairs], [r.tolist() for _, r in pairs], 1.0)
        return self._dataset(batch)

    def observe_validation(self, row: dict[str, Any]) -> None:
        loss = row.get("val_loss")
        if loss is None:
            return
        loss = float(loss)
        if self.reference_loss is None:
            self.reference_loss = loss
        elif loss >= self.reference_loss + self.loss_eps:
            self.probability = min(self.probability + self.step, 1.0)
            self.reference_loss = loss

    def last_log(self) -> dict[str, Any]:
        return {"rollout_probability": self.probability, "rollout_buffer": len(self.buffer)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            probability=self.probability,
            reference_loss=self.reference_loss,
            buffer_prompts=[p.clone() for p, _ in self.buffer],
            buffer_responses=[r.clone() for _, r in self.buffer],
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.probability = float(state["probability"])
        self.reference_loss = None if state["reference_loss"] is None else float(state["reference_loss"])
        self.buffer = [(p.clone(), r.clone()) for p, r in zip(state["buffer_prompts"], state["buffer_responses"])]


class MiniLLMMixRollout(RolloutSource):
    """``rollout=minillm_mix``: every batch's responses sampled from ``a * p + (1 - a) * q`` (MiniLLM's
    teacher-mixed sampling, Gu et al. 2024; ``--teacher-mixed-alpha 0.2`` in its GPT-2 scripts).

    Args:
        teacher_weight: a, the teacher's share of the mixture.
        temperature, top_p, max_new_tokens: MiniLLM: 1.0, 1.0, 256.
    """

    generates = True

    def __init__(
        self, teacher_weight: float = 0.2, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256
    ):
        super().__init__()
        _check_probability("teacher_weight", teacher_weight)
        _check_decoding("minillm_mix", temperature, top_p, max_new_tokens)
        self.teacher_weight, self.temperature, self.top_p = float(teacher_weight), float(temperature), float(top_p)
        self.max_new_tokens = int(max_new_tokens)

    def _transform(self, batch, index, *, step, max_steps):
        if self.student is None or self.teacher is None:
            raise RuntimeError("MiniLLMMixRollout: bind() the student and the teacher before drawing batches.")
        eos, pad = self._ids()
        prompts = self._prompts(batch)
        input_ids, attention_mask = left_pad(prompts, pad)
        was_training = self.student.training
        self.student.eval()
        started = time.perf_counter()
        try:
            seed = _derived_seed(self.seed, "mix", self.rank, index)
            with seeded(seed, self.device):
                new = sample_mixture(
                    self.student, self.teacher, input_ids.to(self.device), attention_mask.to(self.device),
                    teacher_weight=self.teacher_weight, temperature=self.temperature, top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens, eos_id=eos, pad_id=pad,
                    generators=[row_generator(seed, row) for row in range(len(prompts))],
                )  # fmt: skip
        finally:
            self.student.train(was_training)
            self.generation_seconds += time.perf_counter() - started
        responses = [self._cut(p, g, eos, pad) for p, g in zip(prompts, new.tolist())]
        return self._collate(prompts, responses, 1.0 - self.teacher_weight)


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameter and buffer names, shapes, dtypes and values (what decides its generations)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class SeqKDRollout(RolloutSource):
    """``rollout=seqkd``: the teacher's generations as every batch's responses (sequence-level KD, Kim & Rush 2016).

    At :meth:`bind` the teacher generates once for every distinct training prompt (each process its shard, batched),
    and the result is written to ``cache_dir/seqkd/<key>/generations.json``; ``key`` hashes the teacher's weights, the
    prompts, the decoding, ``data.max_length`` and the seed, so a later run with the same key reuses the file and a
    changed teacher (or data, or decoding) gets new generations. Dataset batches then look their prompts up.

    Args:
        do_sample, temperature, top_p, max_new_tokens: the teacher's decoding (DistiLLM's SeqKD data,
            ``scripts/gpt2/tools/generate_data_seqkd.sh``: sampling at temperature 1.0, top-p 1.0, 256 new tokens).
        batch_size: prompts per ``generate`` call while preparing the cache.
    """

    generates = True

    def __init__(
        self,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        batch_size: int = 32,
    ):
        super().__init__()
        _check_decoding("seqkd", temperature, top_p, max_new_tokens)
        if int(batch_size) < 1:
            raise ValueError(f"rollout.batch_size must be >= 1, got {batch_size}.")
        self.do_sample, self.temperature, self.top_p = bool(do_sample), float(temperature), float(top_p)
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.responses: dict[tuple[int, ...], list[int]] = {}
        self.cache_path: Path | None = None
        self.reused: bool | None = None

    def cache_key(self) -> str:
        prompts = hashlib.sha256(json.dumps(sorted({tuple(p) for p in self.train_prompts})).encode()).hexdigest()
        record = {
            "teacher": teacher_fingerprint(self.teacher),
            "prompts": prompts,
            "decoding": self._decoding(self.do_sample).to_dict(),
            "max_length": self.max_length,
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]

    def bind(self, *, student: Any, teacher: Any, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        super().bind(student=student, teacher=teacher, device=device, rank=rank, world_size=world_size)
        if teacher is None:
            raise ValueError("rollout=seqkd trains on the teacher's generations: the run needs a teacher.")
        if self.cache_dir is None:
            raise ValueError("rollout=seqkd caches the teacher's generations: configure() needs a cache_dir.")
        self.cache_path = self.cache_dir / "seqkd" / self.cache_key() / "generations.json"
        # Verified like a checkpoint (size and SHA-256 in manifest.json, every prompt covered); a bad file is named
        # and generated again, never a permanent JSONDecodeError.
        problem = pdist.broadcast_object(self._cache_problem() if self.rank == 0 else None)
        self.reused = problem is None
        if not self.reused:
            if problem != "absent" and self.rank == 0:
                print(f"arkd: the SeqKD generations {self.cache_path} are corrupt ({problem}); generating them again.")
            self._prepare()
        rows = json.loads(self.cache_path.read_text())["rows"]
        self.responses = {tuple(p): list(r) for p, r in rows}

    def _cache_problem(self) -> str | None:
        """What is wrong with the cached generations (``absent`` when there are none), or None when they are intact
        and cover every training prompt."""
        from arkd.checkpoint import verify_manifest

        if not self.cache_path.is_file():
            return "absent"
        problem = verify_manifest(self.cache_path.parent)
        if problem is not None:
            return problem
        try:
            rows = json.loads(self.cache_path.read_text())["rows"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"{self.cache_path.name} is unreadable: {type(err).__name__}"
        if {tuple(p) for p, _ in rows} != {tuple(p) for p in self.train_prompts}:
            return f"{self.cache_path.name} does not cover the training prompts"
        return None

    def _prepare(self) -> None:
        prompts = sorted({tuple(p) for p in self.train_prompts})
        mine = prompts[self.rank :: self.world_size]
        decoding = self._decoding(self.do_sample)
        rows = []
        for start in range(0, len(mine), self.batch_size):
            chunk = [list(p) for p in mine[start : start + self.batch_size]]
            seed = _derived_seed(self.seed, "seqkd", self.rank, start)
            rows += list(zip(chunk, self._generate(self.teacher, chunk, decoding, seed)))
        gathered = [row for part in pdist.gather_objects(rows) for row in part]
        if self.rank == 0:
            from arkd.checkpoint import write_manifest

            folder = self.cache_path.parent
            (folder / "manifest.json").unlink(missing_ok=True)  # no manifest vouches for a file being replaced
            folder.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"rows": sorted(gathered)}))
            tmp.replace(self.cache_path)
            write_manifest(folder)
        pdist.broadcast_object(None)  # the other processes wait for the file

    def _transform(self, batch, index, *, step, max_steps):
        prompts = self._prompts(batch)
        missing = [i for i, p in enumerate(prompts) if tuple(p) not in self.responses]
        if missing:
            raise ValueError(
                f"rollout=seqkd: row {missing[0]} of a training batch has a prompt the teacher's generations in "
                f"{self.cache_path} do not cover; expected the prompts of the training split given to configure()."
            )
        return self._collate(prompts, [self.responses[tuple(p)] for p in prompts], 0.0)
