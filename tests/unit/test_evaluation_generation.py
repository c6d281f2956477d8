"""Protocol generation: decoding settings, prompt truncation, left padding, seeds, output cleaning, evaluate_model."""

from __future__ import annotations

import pytest
import torch

from arkd.evaluation import (
    GREEDY,
    DecodingConfig,
    clean_output,
    evaluate_model,
    exact_match,
    generate,
    legacy_cleanup,
    rouge_l,
)
from arkd.evaluation.generation import _generation_config, encode_prompts, left_pad
from arkd.models import build_tiny_model, build_tiny_tokenizer

TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nName a colour.\n\n### Response:\nThe sky is blue and the grass is green.",
    "### Instruction:\nCount to five.\n\n### Response:\none two three four five",
]
PROMPTS = [
    "### Instruction:\nName a colour.\n\n### Response:\n",
    "Below is an instruction.<n>### Response:<n>",
    "Count",
    "### Instruction:\nCount to five, then name a colour and describe the sky.\n\n### Response:\n",
    "the grass",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer(TEXTS * 3, vocab_size=300)
    model = build_tiny_model(len(tokenizer), n_layer=2, n_head=2, n_embd=32, n_positions=128, seed=0)
    return model.eval(), tokenizer


def test_protocol_decoding_defaults():
    d = DecodingConfig()
    assert (d.do_sample, d.temperature, d.top_p, d.top_k) == (True, 1.0, 1.0, 0)
    assert (d.no_repeat_ngram_size, d.max_new_tokens, d.max_prompt_tokens) == (6, 256, 256)
    config = _generation_config(d, eos_id=0, pad_id=0)
    assert config.do_sample and config.top_k == 0 and config.top_p == 1.0 and config.temperature == 1.0
    assert config.no_repeat_ngram_size == 6 and config.max_new_tokens == 256 and config.num_beams == 1
    assert config.eos_token_id == 0 and config.pad_token_id == 0
    assert not _generation_config(GREEDY, eos_id=0, pad_id=0).do_sample
    with pytest.raises(ValueError, match="top_p"):
        DecodingConfig(top_p=0.0)


def test_clean_output_follows_the_protocol():
    assert clean_output("  Hello<n>world <|endoftext|> junk after") == "Hello\nworld"
    assert clean_output("no end token<n><n>") == "no end token"
    assert clean_output("<|endoftext|>everything cut") == ""
    assert clean_output("keep <|endoftext|>", eos_token=None) == "keep <|endoftext|>"
    assert clean_output("\n\t answer \n") == "answer"


def test_legacy_cleanup_equals_transformers_clean_up_tokenization(tiny):
    _, tokenizer = tiny
    text = "I do n't know , he said . Is it ? Yes ! It 's mine ' you 're sure ' I 've I 'm"
    assert legacy_cleanup(text) == tokenizer.clean_up_tokenization(text)
    assert legacy_cleanup(text) == "I don't know, he said. Is it? Yes! It's mine'you're sure'I've I'm"


def test_prompts_are_cut_to_their_first_tokens_and_newlines_decoded(tiny):
    _, tokenizer = tiny
    full = tokenizer(PROMPTS[3], add_special_tokens=True)["input_ids"]
    cut = encode_prompts(tokenizer, [PROMPTS[3]], max_prompt_tokens=5)[0]
    assert cut == full[:5] and len(full) > 5
    marked = encode_prompts(tokenizer, ["a<n>b"], max_prompt_tokens=256)[0]
    assert marked == tokenizer("a\nb")["input_ids"]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_seed_and_batch_size_fix_the_generations(tiny):
    model, tokenizer = tiny
    decoding = DecodingConfig(max_new_tokens=12)
    first = generate(model, tokenizer, PROMPTS, seed=10, batch_size=2, decoding=decoding, progress=False)
    again = generate(model, tokenizer, PROMPTS, seed=10, batch_size=2, decoding=decoding, progress=False)
    other = generate(model, tokenizer, PROMPTS, seed=20, batch_size=2, decoding=decoding, progress=False)
    assert first == again
    assert first != other
    assert len(first) == len(PROMPTS) and all(isinstance(t, str) for t in first)


def test_sampling_equals_a_direct_generate_call(tiny):
    """The wrapper's sampling equals transformers' generate with the protocol's settings written out here."""
    from transformers import GenerationConfig, set_seed

    model, tokenizer = tiny
    prompts = PROMPTS[:2]
    ours = generate(
        model, tokenizer, prompts, seed=30, batch_size=2, decoding=DecodingConfig(max_new_tokens=10), progress=False
    )
    rows = [tokenizer(p.replace("<n>", "\n"))["input_ids"] for p in prompts]
    width = max(map(len, rows))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    config = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, no_repeat_ngram_size=6, max_new_tokens=10,
        eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    set_seed(30)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    expected = []
    for row in out[:, width:].tolist():
        row = row[: row.index(0)] if 0 in row else row
        expected.append(legacy_cleanup(tokenizer.decode(row, skip_special_tokens=True)).replace("<n>", "\n").strip())
    assert ours == expected


def test_greedy_left_padded_batches_equal_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    decoding = DecodingConfig(do_sample=False, max_new_tokens=12)
    batched = generate(model, tokenizer, PROMPTS, seed=10, batch_size=5, decoding=decoding, progress=False)
    alone = [
        generate(model, tokenizer, [p], seed=10, batch_size=1, decoding=decoding, progress=False)[0] for p in PROMPTS
    ]
    assert batched == alone


class _ScriptedModel(torch.nn.Module):
    """A stand-in whose generate() returns fixed continuations, to test how responses are cut and decoded."""

    def __init__(self, continuations: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuations = continuations

    def generate(self, input_ids, attention_mask, generation_config):
        tail = torch.tensor(self.continuations[: input_ids.shape[0]])
        return torch.cat([input_ids, tail], dim=1)


def test_responses_are_cut_at_the_first_end_of_text(tiny):
    _, tokenizer = tiny
    hello = tokenizer("The sky", add_special_tokens=False)["input_ids"]
    blue = tokenizer(" is blue", add_special_tokens=False)["input_ids"]
    n = len(hello) + len(blue) + 1
    continuations = [
        hello + [0] + blue,  # end-of-text in the middle: what follows is dropped
        (hello + blue + [0] * n)[:n],  # finished early, padded with end-of-text
    ]
    model = _ScriptedModel(continuations)
    out = generate(model, tokenizer, ["a", "b"], seed=1, batch_size=2, progress=False)
    assert out == ["The sky", "The sky is blue"]


def test_evaluate_model_report(tiny):
    model, tokenizer = tiny
    examples = [
        {"prompt": PROMPTS[0], "references": ["The sky is blue.", "green"]},
        {"prompt": PROMPTS[2], "output": "one two three"},
        {"prompt": PROMPTS[4], "references": ["is green"]},
    ]
    report = evaluate_model(model, tokenizer, examples, seeds=[10, 20], batch_size=2, max_new_tokens=8, progress=False)
    assert report["n_rows"] == 3 and report["seeds"] == [10, 20]
    assert report["decoding"]["max_new_tokens"] == 8 and report["decoding"]["top_k"] == 0
    references = [["The sky is blue.", "green"], ["one two three"], ["is green"]]
    for seed in ("10", "20"):
        outputs = report["generations"][seed]
        assert report["rougeL"]["per_seed"][seed] == rouge_l(outputs, references)
        assert report["exact_match"]["per_seed"][seed] == exact_match(outputs, references)
        assert len(report["per_row"][seed]["rougeL"]) == 3
    values = list(report["rougeL"]["per_seed"].values())
    assert report["rougeL"]["mean"] == pytest.approx(sum(values) / 2, abs=1e-4)
    assert report["rougeL"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, abs=1e-4)
    assert "bertscore_f1" not in report
    single = evaluate_model(model, tokenizer, examples[:1], seeds=[10], max_new_tokens=4, progress=False)
    assert single["rougeL"]["std"] is None
    with pytest.raises(ValueError, match="at least one seed"):
        evaluate_model(model, tokenizer, examples, seeds=[], progress=False)
