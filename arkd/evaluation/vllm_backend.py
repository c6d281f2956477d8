"""A vLLM generation backend for ``evaluate_model`` / ``arkd-eval backend=vllm`` (optional: ``pip install ".[vllm]"``).

:class:`VLLMGenerator` is a ``generate_fn``: the same prompts as the ``hf`` backend (``"<n>"`` -> newline, the
tokenizer's own encoding, the first ``max_prompt_tokens`` tokens, passed to vLLM as token ids), the same stop ids
and the same output cleaning (:func:`arkd.evaluation.generation.decode_response`); temperature, top-p, top-k,
``max_new_tokens`` and the repetition penalty map to vLLM's ``SamplingParams``. Each row gets its own request seed,
:func:`arkd.evaluation.generation.row_seed` of ``(seed, row)``, so its generation does not depend on the batch or on
the other rows, as with ``hf``; but vLLM's sampler is not arkd's, so the two backends sample different (equally
distributed) texts for the same seed. vLLM has no n-gram ban: ``decoding.no_repeat_ngram_size`` (6 in the protocol)
must be 0 with this backend, which is therefore not the protocol's decoding. A padded embedding matrix is kept to
the tokenizer's ids with ``allowed_token_ids``.

vLLM is not installed on arkd's CI machine (no GPU); the code here is covered by tests that replace ``vllm`` with
a recording stand-in, and by one test that runs real vLLM, skipped where it is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arkd.evaluation.generation import DecodingConfig, decode_response, encode_prompts, row_seed, stop_ids_of

INSTALL_HINT = 'pip install ".[vllm]" (vLLM needs a CUDA machine)'


class VLLMUnavailable(ImportError):
    """``backend=vllm`` without the ``vllm`` package; the message is one sentence."""


def check_vllm_decoding(decoding: DecodingConfig) -> None:
    """Refuse the decoding settings vLLM cannot reproduce, in one sentence (ValueError)."""
    if decoding.no_repeat_ngram_size:
        raise ValueError(
            f"backend=vllm has no n-gram ban but decoding.no_repeat_ngram_size={decoding.no_repeat_ngram_size}; "
            "set decoding.no_repeat_ngram_size=0 (not the protocol's decoding) or backend=hf."
        )


def import_vllm() -> Any:
    """The ``vllm`` module, or :class:`VLLMUnavailable` naming the extra to install."""
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailable(
            f"backend=vllm needs the vllm package, which is not installed; expected `{INSTALL_HINT}`, or backend=hf."
        ) from err
    return vllm


class VLLMGenerator:
    """Generate with vLLM; called as ``generator(prompts, *, seed, row_ids, progress, desc) -> list[str]``.

    Args:
        model_path: the model directory or Hub name vLLM loads.
        tokenizer: arkd's tokenizer of the model (prompts are encoded and responses decoded with it).
        decoding: the decoding settings (``no_repeat_ngram_size`` must be 0).
        tokenizer_path: the tokenizer's directory for vLLM (default: ``model_path``).
        dtype: the weights' dtype for vLLM (``float32``, ``bfloat16``, ``float16``).
        vocab_rows: the model's output rows; more than ``len(tokenizer)`` restricts sampling to the tokenizer's ids.
        llm: an already built ``vllm.LLM`` (default: built from the arguments above).
        **options: further ``vllm.LLM`` arguments (``gpu_memory_utilization``, ``max_model_len``, ...).
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        decoding: DecodingConfig,
        *,
        tokenizer_path: str | None = None,
        dtype: str = "float32",
        vocab_rows: int | None = None,
        llm: Any = None,
        **options: Any,
    ) -> None:
        check_vllm_decoding(decoding)
        self.vllm = import_vllm()
        self.tokenizer = tokenizer
        self.decoding = decoding
        self.eos_id, self.pad_id = stop_ids_of(tokenizer)
        tokens = len(tokenizer)
        self.allowed = list(range(tokens)) if vocab_rows is not None and vocab_rows > tokens else None
        self.llm = llm or self.vllm.LLM(
            model=str(model_path), tokenizer=str(tokenizer_path or model_path), dtype=dtype, **options
        )

    def sampling_params(self, seed: int, row: int) -> Any:
        """The request settings of one row."""
        d = self.decoding
        sampled = {"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k or -1, "seed": row_seed(seed, row)}
        return self.vllm.SamplingParams(
            n=1,
            max_tokens=d.max_new_tokens,
            repetition_penalty=d.repetition_penalty or 1.0,
            stop_token_ids=sorted({self.eos_id, self.pad_id}),
            allowed_token_ids=self.allowed,
            detokenize=False,
            **(sampled if d.do_sample else {"temperature": 0.0}),
        )

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        seed: int,
        row_ids: Sequence[int],
        progress: bool = False,
        desc: str = "generate",
    ) -> list[str]:
        encoded = encode_prompts(self.tokenizer, prompts, self.decoding.max_prompt_tokens)
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        params = [self.sampling_params(seed, int(row)) for row in row_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=progress)
        stop = {self.eos_id, self.pad_id}
        return [decode_response(self.tokenizer, out.outputs[0].token_ids, self.decoding, stop) for out in outputs]
