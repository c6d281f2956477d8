"""Teacher, student and tokenizer: loading by Hugging Face name or local path, tiny offline ones, vocabulary checks.

Real models load through ``AutoModelForCausalLM`` / ``AutoTokenizer`` (safetensors weights, ``trust_remote_code``
off unless asked for). The offline default and the tests use a byte-level BPE tokenizer trained on the synthetic
corpus (:func:`build_tiny_tokenizer`) and small GPT-2 models built from a config (:func:`build_tiny_model`); saved
with :func:`save_pretrained`, they load back through the very same :func:`load_tokenizer` / :func:`load_model`.

Pad tokens: GPT-2-style tokenizers have none, so the end-of-text token pads (padding is never counted: the
attention and loss masks are 0 there). Tokenizers come back with ``padding_side="left"``, what batched generation
needs; arkd's training collator pads on the right by itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

logger = logging.getLogger("arkd.models")

EOS_TOKEN = "<|endoftext|>"
MAX_VOCAB_PADDING = 1024  # embedding rows a checkpoint may add beyond its tokenizer (rounding, reserved slots)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """Turn ``"float32"``, ``"bfloat16"``, ``"fp16"``, ... into a ``torch.dtype`` (``"auto"`` passes through)."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; expected one of {', '.join(sorted(_DTYPES))} or 'auto'")
    return _DTYPES[key]


def prepare_tokenizer(tokenizer, *, padding_side: str = "left"):
    """Give a tokenizer a pad token (its end-of-text token when it has none) and a padding side.

    Raises:
        ValueError: a tokenizer with neither a pad nor an end-of-text token, or a bad ``padding_side``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got '{padding_side}'")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no end-of-text (eos) token; expected one to end responses")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    padding_side: str = "left",
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_cache_dir: str | os.PathLike | None = None,
):
    """Load a tokenizer by Hugging Face name or local directory, with a pad token and a padding side.

    Args:
        name_or_path: e.g. ``"gpt2"``, a directory written by ``save_pretrained``, or a GGUF file (a ``.gguf`` path
            or ``pkg://PACKAGE/FILE.gguf``: the tokenizer stored in it, :mod:`arkd.gguf`).
        padding_side: ``"left"`` (generation) or ``"right"``.
        trust_remote_code: allow code shipped with the checkpoint (off by default).
        revision: a Hub branch, tag or commit.
        gguf_cache_dir: where a GGUF file's converted copy is cached (None: ``$ARKD_CACHE`` or ``~/.cache/arkd``).

    Returns:
        A ``PreTrainedTokenizerBase`` whose pad token is set (end-of-text for GPT-2-style tokenizers).
    """
    from transformers import AutoTokenizer

    name_or_path = _local_gguf(name_or_path, gguf_cache_dir)

    kwargs = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load a tokenizer from '{name_or_path}' ({err}); expected a Hugging Face model name or a "
            "local directory written by save_pretrained"
        ) from err
    return prepare_tokenizer(tokenizer, padding_side=padding_side)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    use_safetensors: bool | None = True,
    attn_implementation: str | None = None,
    gguf_cache_dir: str | os.PathLike | None = None,
):
    """Load a causal language model by Hugging Face name or local directory.

    A GGUF file (a ``.gguf`` path or ``pkg://PACKAGE/FILE.gguf``) is dequantised once and cached
    (:mod:`arkd.gguf`); a directory holding a LoRA adapter (``adapter_config.json``, a student trained with
    ``model.lora``) is loaded with peft on its base model and merged.

    Args:
        name_or_path: e.g. ``"gpt2-xl"``, a directory written by ``save_pretrained``, or a GGUF file.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (or short forms) or ``"auto"``.
        trust_remote_code: allow code shipped with the checkpoint (off by default).
        revision: a Hub branch, tag or commit.
        use_safetensors: True loads safetensors weights only (no pickle); None also accepts ``.bin`` files.
        attn_implementation: e.g. ``"sdpa"`` or ``"flash_attention_2"`` (None: the library's default).
        gguf_cache_dir: where a GGUF file's converted copy is cached (None: ``$ARKD_CACHE`` or ``~/.cache/arkd``).

    Returns:
        The model (``PreTrainedModel``), in train mode, on the CPU.
    """
    from transformers import AutoModelForCausalLM

    name_or_path = _local_gguf(name_or_path, gguf_cache_dir)
    if (Path(str(name_or_path)) / "adapter_config.json").is_file():
        return load_lora_merged(name_or_path, dtype=dtype)
    kwargs = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code, "use_safetensors": use_safetensors}
    if revision is not None:
        kwargs["revision"] = revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(
            f"could not load a causal language model from '{name_or_path}' ({err}); expected a Hugging Face model "
            "name or a local directory written by save_pretrained (with safetensors weights)"
        ) from err


def _local_gguf(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None) -> str | os.PathLike:
    """A GGUF reference becomes its cached float copy's directory; anything else is returned as it is."""
    from arkd.gguf import gguf_pretrained_dir, is_gguf

    if not is_gguf(name_or_path):
        return name_or_path
    return gguf_pretrained_dir(name_or_path, cache_dir)


def build_tiny_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    vocab_size: int = 1024,
    save_dir: str | os.PathLike | None = None,
    padding_side: str = "left",
    corpus_size: int = 2000,
    seed: int = 0,
):
    """Train a GPT-2-style byte-level BPE tokenizer offline, wrapped as a ``PreTrainedTokenizerFast``.

    Byte-level, so any text encodes; ``<|endoftext|>`` (id 0) is the end-of-text, BOS, unknown and pad token,
    as in GPT-2. Training is deterministic: equal texts and sizes give equal vocabularies.

    Args:
        texts: the training texts (None: :func:`arkd.data.synthetic.synthetic_corpus` of ``corpus_size`` rows
            from ``seed``, the offline default).
        vocab_size: the largest vocabulary, including the 256 byte symbols and the special token; training stops
            earlier when every word of the corpus is a single token (the default synthetic corpus gives about
            670), so use ``len(tokenizer)`` for the model (or a larger size: :func:`check_vocab` slices).
        save_dir: when given, the tokenizer is saved there with ``save_pretrained``.
        padding_side: ``"left"`` (generation) or ``"right"``.
        corpus_size: rows of the default synthetic corpus.
        seed: seed of the default synthetic corpus.

    Returns:
        The tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes, the special token, a merge), got {vocab_size}")
    if texts is None:
        from arkd.data.synthetic import synthetic_corpus

        texts = synthetic_corpus(corpus_size, seed)
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to train the tokenizer on; expected at least one string")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    tokenizer = prepare_tokenizer(tokenizer, padding_side=padding_side)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_tiny_model(
    vocab_size: int,
    *,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    n_positions: int = 256,
    dropout: float = 0.0,
    eos_token_id: int = 0,
    seed: int = 0,
):
    """A small GPT-2 (``GPT2LMHeadModel``) with random weights from ``seed``; the global RNG is left untouched.

    Args:
        vocab_size: rows of the (tied) embedding; ``len(tokenizer)``.
        n_layer: transformer blocks.
        n_head: attention heads (must divide ``n_embd``).
        n_embd: hidden size.
        n_positions: the longest sequence.
        dropout: residual, embedding and attention dropout.
        eos_token_id: end-of-text (also BOS and pad) id; 0 for :func:`build_tiny_tokenizer`.
        seed: initialisation seed.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise ValueError(f"n_head ({n_head}) must divide n_embd ({n_embd})")
    if not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary of {vocab_size} tokens")
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model


def save_pretrained(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save a model (safetensors) and its tokenizer to one directory that :func:`load_model` and
    :func:`load_tokenizer` read back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def model_vocab_size(model) -> int:
    """Rows of the model's output layer (the size of its logits' last dimension)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_vocab(
    teacher,
    student,
    tokenizer,
    *,
    teacher_tokenizer=None,
    allow_different_tokenizer: bool = False,
) -> int:
    """Check that teacher and student share a vocabulary; return the number of logits to keep.

    Embedding sizes that exceed the tokenizer's vocabulary only by padding (at most ``MAX_VOCAB_PADDING`` rows,
    e.g. 50272 rows for OPT's 50265 tokens) are fine: logits are sliced to ``len(tokenizer)``.

    Args:
        teacher: the teacher model.
        student: the student model.
        tokenizer: the (student's) tokenizer.
        teacher_tokenizer: the teacher's tokenizer when it was loaded separately; it must have the same
            vocabulary as ``tokenizer``.
        allow_different_tokenizer: the explicit override: skip the checks and keep the first
            ``min(teacher, student, tokenizer)`` logits (only meaningful when those ids mean the same tokens).

    Returns:
        The common vocabulary size ``V``; KD losses use ``logits[..., :V]``.

    Raises:
        ValueError: vocabularies that differ beyond padding, naming both sizes.
    """
    v_tok = len(tokenizer)
    v_teacher, v_student = model_vocab_size(teacher), model_vocab_size(student)
    if allow_different_tokenizer:
        common = min(v_tok, v_teacher, v_student)
        logger.warning(
            "vocabulary check overridden: teacher %d, student %d, tokenizer %d; keeping the first %d logits",
            v_teacher,
            v_student,
            v_tok,
            common,
        )
        return common
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"the teacher's tokenizer ({len(teacher_tokenizer)} tokens) and the student's ({v_tok} tokens) differ; "
            "expected one shared tokenizer, or allow_different_tokenizer=True"
        )
    for role, size in (("teacher", v_teacher), ("student", v_student)):
        if not v_tok <= size <= v_tok + MAX_VOCAB_PADDING:
            raise ValueError(
                f"teacher vocabulary size {v_teacher} and student vocabulary size {v_student} do not match the "
                f"tokenizer's {v_tok} tokens up to padding (the {role} has {size}); expected both to be at least "
                f"{v_tok} and at most {v_tok + MAX_VOCAB_PADDING} (a shared tokenizer), or "
                "allow_different_tokenizer=True"
            )
    return v_tok


def slice_to_vocab(model, vocab_size: int):
    """Drop the embedding and output rows beyond ``vocab_size`` (a padded matrix), in place; return the model.

    Qwen2.5 checkpoints carry 151936 rows for a 151665-token tokenizer, GPT-2 variants 50304 for 50257: the extra rows
    never stand for a token, so dropping them is exact for the kept logits (``logits[..., :V]`` of the padded model
    equal the sliced model's logits) and keeps the softmax, the KD losses and generation to real tokens. Tied input
    and output embeddings stay tied (``resize_token_embeddings``); ``model.config.vocab_size`` becomes ``V``.

    Args:
        model: a ``PreTrainedModel``.
        vocab_size: the vocabulary to keep (:func:`check_vocab`'s result, normally ``len(tokenizer)``).

    Raises:
        ValueError: the model has fewer rows than ``vocab_size``.
    """
    rows = model_vocab_size(model)
    if rows < vocab_size:
        raise ValueError(
            f"the model's output layer has {rows} rows but {vocab_size} tokens must be kept; expected at least "
            f"{vocab_size} rows (a model of this tokenizer)"
        )
    if rows > vocab_size:
        model.resize_token_embeddings(vocab_size)
        logger.info("vocabulary: dropped %d padded embedding rows (%d -> %d)", rows - vocab_size, rows, vocab_size)
    return model


# --------------------------------------------------------------------------------------------------------------------
# Students made from a teacher, LoRA, gradient checkpointing

STUDENT_INITS = ("from_teacher", "fresh")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of transformer blocks (Llama / Qwen / Mistral ``model.layers``, GPT-2 ``transformer.h``)."""
    base = getattr(model, "base_model", model)
    for path in ("layers", "h", "decoder.layers"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}; expected model.layers or .h")


def select_layers(total: int, layers: int | Sequence[int]) -> list[int]:
    """The teacher's blocks a pruned student keeps: ``n`` evenly spaced ones, the first and the last always among
    them (``round(linspace(0, total - 1, n))``), or an explicit list of indices.

    Raises:
        ValueError: a count outside ``[1, total]``, or indices that are out of range, repeated or not increasing.
    """
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= total:
            raise ValueError(f"model.layers: got {layers}, expected a number of blocks between 1 and {total}")
        if layers == 1:
            return [0]
        return [round(i * (total - 1) / (layers - 1)) for i in range(layers)]
    chosen = [int(i) for i in layers]
    if not chosen or any(not 0 <= i < total for i in chosen) or chosen != sorted(set(chosen)):
        raise ValueError(f"model.layers: got {chosen}, expected increasing, distinct block indices in [0, {total - 1}]")
    return chosen


def student_from_teacher(
    teacher: str | os.PathLike,
    *,
    init: str = "from_teacher",
    layers: int | Sequence[int] = 6,
    dtype: str = "float32",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
):
    """A student with the teacher's architecture, tokenizer and vocabulary, and fewer transformer blocks.

    ``init="from_teacher"`` is depth pruning (DistilBERT took every other layer of BERT; Minitron prunes depth and
    retrains by distillation): the student keeps the teacher's embeddings, final norm and output head, and the
    weights of the selected blocks (:func:`select_layers`), in order. ``init="fresh"`` builds the same smaller
    architecture with random weights (``seed``). The student is written once to
    ``cache_dir/students/<hash>/`` (keyed by the teacher's files, ``init``, the blocks and the seed) and loaded from
    there, so that it has a directory of its own (a LoRA adapter trained on it names it as its base).

    Args:
        teacher: the teacher's name or path (a GGUF reference too, as for :func:`load_model`).
        init: ``"from_teacher"`` (pruned) or ``"fresh"`` (random weights).
        layers: how many blocks (evenly spaced, first and last kept) or which ones.
        dtype: the student's dtype.
        seed: the initialisation seed of ``init="fresh"``.
        cache_dir: the cache root (None: ``$ARKD_CACHE`` or ``~/.cache/arkd``).
    """
    import hashlib
    import json
    import shutil

    from arkd.checkpoint import COMPLETE, MANIFEST, file_digest, verify_checkpoint
    from arkd.gguf import default_cache_dir

    if init not in STUDENT_INITS:
        raise ValueError(f"model.init: got {init!r}, expected one of {', '.join(STUDENT_INITS)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = Path(str(_local_gguf(teacher, root)))
    teacher_files = (
        {f.name: f.stat().st_size for f in sorted(source.iterdir()) if f.is_file()} if source.is_dir() else str(source)
    )
    key = json.dumps(
        {
            "teacher": str(teacher),
            "files": teacher_files,
            "init": init,
            "layers": layers,
            "seed": seed if init == "fresh" else None,
        },
        sort_keys=True,
        default=list,
    )
    target = root / "students" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not target.is_dir() or verify_checkpoint(target) is not None:
        shutil.rmtree(target, ignore_errors=True)
        model = _make_student(load_model(source, dtype="float32"), init, layers, seed)
        tmp = target.parent / f".tmp_{target.name}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            files = {f.name: {"size": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps({"student": json.loads(key), "files": files}, indent=2) + "\n")
            (tmp / COMPLETE).write_text("")
            try:
                tmp.rename(target)
            except OSError:
                if verify_checkpoint(target) is not None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_model(target, dtype=dtype)


def _make_student(teacher, init: str, layers: int | Sequence[int], seed: int):
    """The student model in memory: the teacher's config with fewer blocks, weights copied (pruned) or fresh."""
    import copy

    from transformers import AutoModelForCausalLM

    blocks = decoder_layers(teacher)
    chosen = select_layers(len(blocks), layers)
    config = copy.deepcopy(teacher.config)
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(config, name):
            setattr(config, name, len(chosen))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in chosen]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    if init == "fresh":
        return student
    prefix = {id(m): n for n, m in teacher.named_modules()}[id(blocks)]
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith(prefix + "."):
            index, _, rest = name[len(prefix) + 1 :].partition(".")
            if int(index) not in chosen:
                continue
            name = f"{prefix}.{chosen.index(int(index))}.{rest}"
        state[name] = tensor.clone()
    student.load_state_dict(state, strict=True)
    return student


def apply_lora(
    model, *, r: int = 8, alpha: float = 16, dropout: float = 0.0, target_modules: Sequence[str] | None = None
):
    """Wrap a model in LoRA adapters (peft): only the adapters train; the base weights are frozen.

    Args:
        model: the student.
        r: the adapters' rank.
        alpha: LoRA's scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapters' input.
        target_modules: names of the linear layers that get adapters (None: peft's default for the architecture,
            the attention projections for Llama).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("model.lora needs the 'peft' package; install it with `pip install 'arkd[lora]'`.") from None
    config = LoraConfig(
        r=int(r),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(target_modules) if target_modules is not None else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_lora_merged(path: str | os.PathLike, *, dtype: str = "float32"):
    """A LoRA student saved by arkd-train (``adapter_config.json`` + adapter weights): its base model (the
    adapter config's ``base_model_name_or_path``) with the adapters merged in."""
    import json

    from peft import PeftModel

    base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise OSError(f"{path}/adapter_config.json names no base model; expected base_model_name_or_path")
    return PeftModel.from_pretrained(load_model(base, dtype=dtype), str(path)).merge_and_unload()


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (less memory, one more
    forward); non-reentrant, so it also works when only LoRA adapters have gradients."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
