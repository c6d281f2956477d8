"""The teacher cache: the teacher's top-k log-probabilities per response token, written once, read by training.

``scripts/cache_teacher.py`` (:func:`write_cache`) runs the teacher over every training row and every validation row
of a run's config and keeps, per response token, the k most likely next tokens, their log-probabilities at the loss's
temperature and the log of the remaining mass (an :class:`arkd.losses.TopKTeacher`). ``arkd-train ...
teacher.cache_dir=DIR`` then reads them (:class:`TeacherCache`) instead of building and running the teacher, which is
never loaded.

Layout of ``DIR``:

- ``manifest.json``: the cache's identity (what decides the teacher's outputs: the teacher's config and files, its
  SFT options, the data, the tokenizer, the prompt template, k, the temperature, the vocabulary), the shards written
  so far with their rows' keys, token counts, sizes and SHA-256 checksums, and ``complete``;
- ``shard_NNNNN.safetensors``: ``indices`` ``[tokens, k]`` int32, ``logprobs`` ``[tokens, k]`` (float32, or
  bfloat16 / float16 with ``--dtype``), ``log_tail`` ``[tokens]`` float32, ``offsets`` ``[rows + 1]`` int64.

Rows are found by content: a row's key is a hash of its token ids and its prompt length, so the batch order, the
batch size, length grouping, gradient accumulation, the number of processes and resuming all read the right rows, and
a row the cache does not hold (other data) is refused in one sentence. Every shard is written to a temporary file and
renamed into place, and the manifest is rewritten (atomically) after each shard, so a killed writer loses at most the
shard in progress and a second run continues from the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from arkd.errors import ConfigError
from arkd.losses.topk import TopKTeacher

__all__ = [
    "CACHE_KEYS",
    "FORMAT",
    "MANIFEST",
    "TeacherCache",
    "TeacherCacheError",
    "cache_identity",
    "model_node",
    "row_key",
    "uses_teacher_cache",
    "write_cache",
]

FORMAT = 1
MANIFEST = "manifest.json"
#: The keys of the ``teacher`` config group that configure the cache, not the model (stripped before building it).
CACHE_KEYS = ("cache_dir", "top_k")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TeacherCacheError(ConfigError):
    """A teacher cache that is missing, incomplete, written for another run, or corrupt (one sentence)."""


# --------------------------------------------------------------------------------------------------------------------
# Identity


def model_node(node: Any) -> Any:
    """The teacher's model config without the cache keys (what ``instantiate`` builds and the SFT cache keys on)."""
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig) or not any(key in node for key in CACHE_KEYS):
        return node
    plain = OmegaConf.to_container(node, resolve=False)
    for key in CACHE_KEYS:
        plain.pop(key, None)
    return OmegaConf.create(plain, parent=node._get_parent())


def uses_teacher_cache(cfg: Any) -> bool:
    """Whether the run reads its teacher from a cache (``teacher.cache_dir`` set)."""
    teacher = cfg.get("teacher")
    return teacher is not None and teacher.get("cache_dir") not in (None, "")


def _container(node: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _teacher_files(node: dict) -> dict[str, Any] | None:
    """Names and sizes of a local teacher's weight files and the hash of its config.json (None: no local files)."""
    path = node.get("name_or_path") if isinstance(node, dict) else None
    if not path or not Path(str(path)).expanduser().is_dir():
        return None
    root = Path(str(path)).expanduser()
    files = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    config = root / "config.json"
    return {
        "weights": [[p.name, p.stat().st_size] for p in files],
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
    }


def cache_identity(cfg: Any, *, vocab_size: int, add_bos: bool) -> dict[str, Any]:
    """Everything that decides the cached values, as plain data (compared field by field when a cache is opened).

    Args:
        cfg: the composed ``train.yaml`` config (``teacher.top_k``, ``loss.temperature``, ...).
        vocab_size: ``len(tokenizer)``, the vocabulary the distributions are over.
        add_bos: the resolved ``data.add_bos`` (whether training prompts start with a BOS token).
    """
    from arkd.data import template

    teacher = _container(model_node(cfg.teacher))
    data = _container(cfg.data)
    loss = cfg.get("loss")
    init_sft = cfg.get("init_sft") or {}
    return {
        "format": FORMAT,
        "teacher": teacher,
        "teacher_files": _teacher_files(teacher),
        "teacher_sft": _container(init_sft.get("teacher")),
        "data": {
            "splits": data.get("splits"),
            "max_prompt_length": data.get("max_prompt_length"),
            "max_length": data.get("max_length"),
            "add_bos": bool(add_bos),
        },
        "tokenizer": _container(cfg.tokenizer),
        "template": hashlib.sha256((template.PROMPT_WITH_INPUT + template.PROMPT_NO_INPUT).encode()).hexdigest()[:16],
        "top_k": int(cfg.teacher.top_k),
        "temperature": float(loss.get("temperature", 1.0)) if loss is not None else 1.0,
        "vocab_size": int(vocab_size),
    }


def _identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


_FIELD_NAMES = {
    "teacher": "the teacher (teacher.*)",
    "teacher_files": "the teacher's weight files",
    "teacher_sft": "the teacher's SFT (init_sft.teacher)",
    "data": "the data (data.splits, data.max_prompt_length, data.max_length, data.add_bos)",
    "tokenizer": "the tokenizer",
    "template": "the prompt template",
    "temperature": "the temperature (loss.temperature)",
    "vocab_size": "the vocabulary size",
    "format": "the cache format",
}


def _mismatch(where: Path, cached: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """One sentence naming the first field in which the cache's identity differs from this run's, or None."""
    if cached.get("top_k") != wanted["top_k"]:
        return (
            f"the teacher cache at {where} holds the top {cached.get('top_k')} log-probabilities per token but this "
            f"run asks for teacher.top_k={wanted['top_k']}; set teacher.top_k={cached.get('top_k')} or write a cache "
            "with this k in another teacher.cache_dir."
        )
    if cached.get("vocab_size") != wanted["vocab_size"]:
        return (
            f"the teacher cache at {where} is over a vocabulary of {cached.get('vocab_size')} tokens but this run's "
            f"tokenizer has {wanted['vocab_size']}; expected the tokenizer the cache was written with."
        )
    for key in _FIELD_NAMES:
        if json.dumps(cached.get(key), sort_keys=True, default=str) != json.dumps(
            wanted.get(key), sort_keys=True, default=str
        ):
            shown = lambda v: " ".join(json.dumps(v, sort_keys=True, default=str).split())[:160]  # noqa: E731
            return (
                f"the teacher cache at {where} was written for another run: {_FIELD_NAMES[key]} differs (cache: "
                f"{shown(cached.get(key))}; this run: {shown(wanted.get(key))}); write a cache for this config in "
                "another teacher.cache_dir (scripts/cache_teacher.py with this run's overrides)."
            )
    return None


def row_key(input_ids: Sequence[int], prompt_length: int) -> str:
    """The content key of one training row: a hash of its token ids (no padding) and its prompt length."""
    data = torch.as_tensor(list(input_ids), dtype=torch.int64).numpy().tobytes()
    return hashlib.blake2b(data + int(prompt_length).to_bytes(8, "little"), digest_size=16).hexdigest()


def _batch_rows(batch: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Per row of a (right-padded) training batch: its key and its counted positions ``t`` of ``loss_mask[:, 1:]``
    (position t predicts token t + 1)."""
    ids = batch["input_ids"].cpu()
    lengths = batch["attention_mask"].cpu().sum(dim=1).tolist()
    counted = batch["loss_mask"].cpu().bool()
    rows = []
    for r, length in enumerate(lengths):
        where = counted[r].nonzero().squeeze(-1)
        prompt = int(where[0]) if where.numel() else int(length)
        rows.append((row_key(ids[r, : int(length)].tolist(), prompt), counted[r, 1:].nonzero().squeeze(-1)))
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Files


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as handle:
        json.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TeacherCacheError(
            f"the teacher cache manifest {path} cannot be read ({type(err).__name__}); expected the JSON file "
            "scripts/cache_teacher.py writes (delete the directory and write the cache again)."
        ) from None
    if not isinstance(manifest, dict) or "identity" not in manifest or "shards" not in manifest:
        raise TeacherCacheError(
            f"{path} is not a teacher cache manifest; expected one written by scripts/cache_teacher.py."
        )
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# Writing


@torch.no_grad()
def write_cache(
    root: str | Path,
    *,
    teacher: torch.nn.Module,
    rows: Sequence[dict],
    identity: dict[str, Any],
    collate: Any,
    dtype: str = "float32",
    shard_rows: int = 512,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    chunk_elements: int = 1 << 22,
) -> dict[str, Any]:
    """Write (or continue) a teacher cache of ``rows`` under ``root``; returns the manifest.

    Args:
        root: the cache directory (``teacher.cache_dir``).
        teacher: the teacher, its output layer ``identity["vocab_size"]`` wide (padded rows dropped).
        rows: tokenized items (``prompt_ids``, ``response_ids``), in a fixed order; duplicates are written once.
        identity: :func:`cache_identity` of the run (``top_k``, ``temperature``, ``vocab_size`` are read from it).
        collate: the run's training collator (right padding).
        dtype: storage dtype of the log-probabilities (``float32``, ``bfloat16``, ``float16``).
        shard_rows: rows per shard (the unit of atomic writes and of resuming).
        batch_size: rows per teacher forward.
        device: where the teacher runs.
        progress: show a progress bar.
        chunk_elements: logit entries per top-k chunk (bounds the transient memory).

    Raises:
        TeacherCacheError: ``root`` holds a cache written for another identity.
    """
    from safetensors.torch import save_file

    from arkd.progress import progress_bar

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if shard_rows < 1 or batch_size < 1:
        raise ValueError(f"shard_rows and batch_size must be >= 1, got {shard_rows} and {batch_size}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        stale.unlink()
    # One entry per distinct row, in the given order (a row that occurs twice has one teacher output).
    keyed: dict[str, dict] = {}
    for item in rows:
        ids = list(item["prompt_ids"]) + list(item["response_ids"])
        keyed.setdefault(row_key(ids, len(item["prompt_ids"])), item)
    keys = list(keyed)
    k, temperature, vocab = int(identity["top_k"]), float(identity["temperature"]), int(identity["vocab_size"])
    manifest = _read_manifest(root)
    if manifest is not None:
        problem = _mismatch(root, manifest["identity"], identity)
        if problem is not None:
            raise TeacherCacheError(problem)
        if manifest.get("row_keys_hash") != _identity_hash({"keys": keys}) or manifest.get("shard_rows") != shard_rows:
            manifest = None  # other rows or another sharding: start again
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "identity": identity,
            "key": _identity_hash(identity),
            "dtype": dtype,
            "rows_total": len(keys),
            "shard_rows": shard_rows,
            "row_keys_hash": _identity_hash({"keys": keys}),
            "complete": False,
            "shards": [],
        }
    # Keep the shards written so far while their files are intact; rewrite from the first that is not.
    kept = []
    for entry in manifest["shards"]:
        path = root / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            break
        kept.append(entry)
    manifest["shards"] = kept
    manifest["dtype"] = manifest.get("dtype", dtype)
    store = _DTYPES[manifest["dtype"]]
    done_rows = sum(len(entry["rows"]) for entry in kept)
    was_training = teacher.training
    teacher.eval()
    bar = progress_bar(total=len(keys), initial=done_rows, desc="cache teacher", disable=not progress)
    try:
        for number in range(len(kept), -(-len(keys) // shard_rows)):
            shard_keys = keys[number * shard_rows : (number + 1) * shard_rows]
            parts: dict[str, list[torch.Tensor]] = {"indices": [], "logprobs": [], "log_tail": []}
            counts: list[int] = []
            for start in range(0, len(shard_keys), batch_size):
                items = [keyed[key] for key in shard_keys[start : start + batch_size]]
                batch = {name: value.to(device) for name, value in collate(items).items()}
                logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                if logits.shape[-1] != vocab:
                    raise TeacherCacheError(
                        f"the teacher returns {logits.shape[-1]} logits per token but the cache is over a vocabulary "
                        f"of {vocab}; expected the teacher's output layer sliced to len(tokenizer)."
                    )
                mask = batch["loss_mask"][:, 1:].bool()
                counts += mask.sum(dim=1).tolist()
                rows_logits = logits[:, :-1][mask]
                step = max(1, chunk_elements // vocab)
                for i in range(0, rows_logits.shape[0], step):
                    top = TopKTeacher.from_logits(rows_logits[i : i + step].float(), k, temperature=temperature)
                    parts["indices"].append(top.indices.to(torch.int32).cpu())
                    parts["logprobs"].append(top.logprobs.to(store).cpu())
                    parts["log_tail"].append(top.log_tail.float().cpu())
                bar.update(len(items))
            tensors = {
                "indices": torch.cat(parts["indices"]) if parts["indices"] else torch.zeros(0, k, dtype=torch.int32),
                "logprobs": torch.cat(parts["logprobs"]) if parts["logprobs"] else torch.zeros(0, k, dtype=store),
                "log_tail": torch.cat(parts["log_tail"]) if parts["log_tail"] else torch.zeros(0),
                "offsets": torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int64),
            }
            name = f"shard_{number:05d}.safetensors"
            tmp = root / f".tmp-{name}"
            save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp))
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, root / name)
            manifest["shards"].append(
                {
                    "file": name,
                    "rows": shard_keys,
                    "tokens": int(tensors["offsets"][-1]),
                    "bytes": (root / name).stat().st_size,
                    "sha256": _sha256(root / name),
                }
            )
            _write_json_atomic(root / MANIFEST, manifest)
    finally:
        bar.close()
        teacher.train(was_training)
    manifest["complete"] = True
    manifest["tokens_total"] = sum(entry["tokens"] for entry in manifest["shards"])
    manifest["bytes_total"] = sum(entry["bytes"] for entry in manifest["shards"])
    _write_json_atomic(root / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """The teacher's top-k outputs for training batches, read from a cache written by :func:`write_cache`.

    ``cache(batch)`` returns a :class:`arkd.losses.TopKTeacher` ``[B, T, k]`` on ``device``, aligned with the batch's
    unshifted positions (position t holds the teacher's distribution of token t + 1, as the teacher's logits would),
    filled where ``loss_mask[:, 1:]`` counts a token (other positions hold a harmless filler the losses never count).

    Args:
        root: the cache directory.
        identity: this run's :func:`cache_identity`; the cache must have been written for it.
        device: where the returned tensors go.

    Raises:
        TeacherCacheError: no cache, an incomplete one, one written for another identity (the first differing field
            named), or (when a shard is first read) a corrupt shard.
    """

    def __init__(self, root: str | Path, identity: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.root = Path(root).expanduser()
        manifest = _read_manifest(self.root)
        if manifest is None:
            raise TeacherCacheError(
                f"teacher.cache_dir={self.root} holds no teacher cache ({MANIFEST} is missing); write it first with "
                "`python scripts/cache_teacher.py` and this run's overrides."
            )
        problem = _mismatch(self.root, manifest["identity"], identity)
        if problem is not None:
            raise TeacherCacheError(problem)
        if not manifest.get("complete"):
            written = sum(len(entry["rows"]) for entry in manifest["shards"])
            raise TeacherCacheError(
                f"the teacher cache at {self.root} is incomplete ({written} of {manifest['rows_total']} rows written); "
                "run scripts/cache_teacher.py again with the same overrides to finish it."
            )
        self.manifest = manifest
        self.k = int(identity["top_k"])
        self.vocab_size = int(identity["vocab_size"])
        self.temperature = float(identity["temperature"])
        self.device = torch.device(device)
        self._where: dict[str, tuple[int, int]] = {}
        for number, entry in enumerate(manifest["shards"]):
            for row, key in enumerate(entry["rows"]):
                self._where[key] = (number, row)
        self._shards: dict[int, dict[str, torch.Tensor]] = {}
        self.rows_read = 0

    def __len__(self) -> int:
        return len(self._where)

    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        """A shard's tensors, checked against the manifest the first time (memory-mapped by safetensors)."""
        if number not in self._shards:
            from safetensors.torch import load_file

            entry = self.manifest["shards"][number]
            path = self.root / entry["file"]
            corrupt = (
                f"the teacher cache shard {path} is corrupt or missing (its size or SHA-256 differs from {MANIFEST}); "
                "run scripts/cache_teacher.py again with the same overrides to rewrite it."
            )
            if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
                raise TeacherCacheError(corrupt)
            try:
                tensors = load_file(str(path))
            except Exception:  # a file that passes its checksum but does not parse: written by something else
                raise TeacherCacheError(corrupt) from None
            offsets = tensors.get("offsets")
            if (
                offsets is None
                or offsets.numel() != len(entry["rows"]) + 1
                or tensors["indices"].shape != (int(offsets[-1]), self.k)
                or tensors["logprobs"].shape != tensors["indices"].shape
                or tensors["log_tail"].shape != (int(offsets[-1]),)
                or (tensors["indices"].numel() and int(tensors["indices"].max()) >= self.vocab_size)
                or (tensors["indices"].numel() and int(tensors["indices"].min()) < 0)
            ):
                raise TeacherCacheError(corrupt)
            self._shards[number] = tensors
        return self._shards[number]

    def __call__(self, batch: dict[str, torch.Tensor]) -> TopKTeacher:
        b, t = batch["input_ids"].shape
        k = self.k
        indices = torch.arange(k, dtype=torch.int64).expand(b, t, k).clone()
        # filler of the uncounted positions: a finite distribution (k tokens and the bucket at 1 / (k + 1) each)
        filler = -float(torch.log(torch.tensor(float(k + 1))))
        logprobs = torch.full((b, t, k), filler, dtype=torch.float32)
        log_tail = torch.full((b, t), filler, dtype=torch.float32)
        for r, (key, positions) in enumerate(_batch_rows(batch)):
            where = self._where.get(key)
            if where is None:
                raise TeacherCacheError(
                    f"row {r} of a batch (length {int(batch['attention_mask'][r].sum())}) is not in the teacher cache "
                    f"at {self.root}: the cache holds other rows; expected the training and validation rows of the "
                    "config it was written for (data, tokenizer, data.add_bos)."
                )
            shard = self._shard(where[0])
            start, end = int(shard["offsets"][where[1]]), int(shard["offsets"][where[1] + 1])
            if end - start != positions.numel():
                raise TeacherCacheError(
                    f"the teacher cache at {self.root} holds {end - start} tokens for a row with {positions.numel()} "
                    "response tokens; the cache is corrupt (write it again with scripts/cache_teacher.py)."
                )
            indices[r, positions] = shard["indices"][start:end].long()
            logprobs[r, positions] = shard["logprobs"][start:end].float()
            log_tail[r, positions] = shard["log_tail"][start:end]
            self.rows_read += 1
        return TopKTeacher(
            indices.to(self.device),
            logprobs.to(self.device),
            log_tail.to(self.device),
            self.vocab_size,
            self.temperature,
        )
