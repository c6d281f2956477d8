"""The vLLM backend's requests and decoding, against a recording stand-in for ``vllm`` (vLLM itself needs a CUDA
machine and is not installed in CI; tests/integration/test_eval_cli.py runs the real one where it is)."""

from __future__ import annotations

import random
import sys
from types import ModuleType, SimpleNamespace

import pytest

from arkd.evaluation.generation import GREEDY, DecodingConfig, decode_response, encode_prompts, row_seed
from arkd.models import build_tiny_tokenizer

PROMPTS = ["Name a colour.<n>", "the grass is green and the sky", "Count"]


class FakeParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class FakeLLM:
    """Records its arguments; 'generates' tokens drawn from a Random seeded with the request's seed."""

    instances: list[FakeLLM] = []
    vocab = 50

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.instances.append(self)

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append((requests, params))
        outs = []
        for p in params:
            rng = random.Random(p.seed if p.temperature else 0)
            ids = [rng.randrange(3, self.vocab) for _ in range(p.max_tokens)]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeLLM, FakeParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer([" ".join(PROMPTS)] * 3, vocab_size=260)


def test_requests_carry_the_prompt_ids_and_one_seed_per_row(fake_vllm, tokenizer):
    from arkd.evaluation.vllm_backend import VLLMGenerator

    decoding = DecodingConfig(no_repeat_ngram_size=0, max_new_tokens=7, max_prompt_tokens=4)
    generator = VLLMGenerator("/models/m", tokenizer, decoding, dtype="bfloat16", gpu_memory_utilization=0.5)
    llm = FakeLLM.instances[0]
    assert llm.kwargs == {"model": "/models/m", "tokenizer": "/models/m", "dtype": "bfloat16",
                          "gpu_memory_utilization": 0.5}  # fmt: skip
    out = generator(PROMPTS, seed=10, row_ids=[4, 0, 2])
    requests, params = llm.calls[0]
    assert [r["prompt_token_ids"] for r in requests] == encode_prompts(tokenizer, PROMPTS, 4)
    assert [p.seed for p in params] == [row_seed(10, 4), row_seed(10, 0), row_seed(10, 2)]
    eos = tokenizer.eos_token_id
    for p in params:
        assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.n) == (1.0, 1.0, -1, 7, 1)  # top_k 0 -> vLLM's -1
        assert p.repetition_penalty == 1.0 and p.stop_token_ids == [eos] and p.allowed_token_ids is None
    # responses are decoded and cleaned as the hf backend does it
    expected = [decode_response(tokenizer, _ids(p), decoding, {eos}) for p in params]
    assert out == expected
    # a row's text depends on its seed and row only: alone, it gets the same
    assert generator([PROMPTS[1]], seed=10, row_ids=[0]) == [out[1]]


def _ids(p):
    rng = random.Random(p.seed)
    return [rng.randrange(3, FakeLLM.vocab) for _ in range(p.max_tokens)]


def test_greedy_padded_vocabulary_and_refusals(fake_vllm, tokenizer):
    from arkd.evaluation.vllm_backend import VLLMGenerator

    greedy = DecodingConfig(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=3)
    generator = VLLMGenerator("m", tokenizer, greedy, vocab_rows=len(tokenizer) + 9)
    params = generator.sampling_params(10, 0)
    assert params.temperature == 0.0 and not hasattr(params, "seed")
    assert params.allowed_token_ids == list(range(len(tokenizer)))  # padded rows never sampled
    with pytest.raises(ValueError, match="no_repeat_ngram_size=6"):
        VLLMGenerator("m", tokenizer, GREEDY)


def test_missing_vllm_is_one_sentence(monkeypatch, tokenizer):
    from arkd.evaluation.vllm_backend import VLLMGenerator, VLLMUnavailable

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(VLLMUnavailable, match=r"needs the vllm package, which is not installed; expected `pip install"):
        VLLMGenerator("m", tokenizer, DecodingConfig(no_repeat_ngram_size=0))
