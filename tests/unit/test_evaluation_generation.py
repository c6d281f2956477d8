"""Protocol generation: decoding settings, prompt truncation, left padding, seeds, output cleaning, evaluate_model."""

from __future__ import annotations

import itertools

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
from arkd.evaluation.generation import (
    _generation_config,
    _sampling_processors,
    encode_prompts,
    left_pad,
    row_generator,
    sample_rows,
)

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


# The `tiny` fixture (tests/conftest.py): a tokenizer trained on TEXTS and a model in eval mode.
TINY = dict(kind="lm", texts=TEXTS * 3, vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=128, seed=0,
            eval_model=True)  # fmt: skip


def test_protocol_decoding_defaults():
    d = DecodingConfig()
    assert (d.do_sample, d.temperature, d.top_p, d.top_k) == (True, 1.0, 1.0, 0)
    assert (d.no_repeat_ngram_size, d.max_new_tokens, d.max_prompt_tokens) == (6, 256, 256)
    config = _generation_config(d, eos_id=0, pad_id=0)
    # transformers selects greedily over the processed scores; the sampling is arkd's per-row sampler
    assert not config.do_sample and config.top_k is None and config.top_p is None and config.temperature is None
    assert config.no_repeat_ngram_size == 6 and config.max_new_tokens == 256 and config.num_beams == 1
    assert config.eos_token_id == 0 and config.pad_token_id == 0
    assert not GREEDY.do_sample
    assert [type(p).__name__ for p in _sampling_processors(d, [])] == ["_RowSampler"]  # temperature 1, no filters
    warped = _sampling_processors(DecodingConfig(temperature=0.7, top_k=5, top_p=0.9), [])
    names = ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "_RowSampler"]
    assert [type(p).__name__ for p in warped] == names  # the order generate applies them in when sampling
    with pytest.raises(ValueError, match="top_p"):
        DecodingConfig(top_p=0.0)


def test_clean_output_follows_the_protocol():
    assert clean_output("  Hello<n>world <|endoftext|> junk after") == "Hello\nworld"
    assert clean_output("no end token<n><n>") == "no end token"
    assert clean_output("<|endoftext|>everything cut") == ""
    assert clean_output("keep <|endoftext|>", eos_token=None) == "keep <|endoftext|>"
    assert clean_output("\n\t answer \n") == "answer"


def test_legacy_cleanup_equals_transformers_clean_up_tokenization(tiny):
    tokenizer, _ = tiny
    text = "I do n't know , he said . Is it ? Yes ! It 's mine ' you 're sure ' I 've I 'm"
    assert legacy_cleanup(text) == tokenizer.clean_up_tokenization(text)
    assert legacy_cleanup(text) == "I don't know, he said. Is it? Yes! It's mine'you're sure'I've I'm"


def test_prompts_are_cut_to_their_first_tokens_and_newlines_decoded(tiny):
    tokenizer, _ = tiny
    full = tokenizer(PROMPTS[3], add_special_tokens=True)["input_ids"]
    cut = encode_prompts(tokenizer, [PROMPTS[3]], max_prompt_tokens=5)[0]
    assert cut == full[:5] and len(full) > 5
    marked = encode_prompts(tokenizer, ["a<n>b"], max_prompt_tokens=256)[0]
    assert marked == tokenizer("a\nb")["input_ids"]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_the_checkpoints_own_generation_config_does_not_leak_in(tiny):
    """transformers fills unset generate() settings from the model's generation_config.json; arkd's decoding must
    not change with them."""
    import copy

    tokenizer, model = tiny
    noisy = copy.deepcopy(model)
    gc = noisy.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k = True, 0.3, 0.5, 3
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.min_new_tokens = 3.0, 2, 12
    for decoding in (DecodingConfig(max_new_tokens=12), DecodingConfig(max_new_tokens=12, no_repeat_ngram_size=0),
                     DecodingConfig(do_sample=False, max_new_tokens=12)):  # fmt: skip
        run = lambda m: generate(m, tokenizer, PROMPTS, seed=10, batch_size=5, decoding=decoding, progress=False)  # noqa: E731, B023
        assert run(noisy) == run(model)


def test_a_seed_fixes_the_generations(tiny):
    tokenizer, model = tiny
    decoding = DecodingConfig(max_new_tokens=12)
    first = generate(model, tokenizer, PROMPTS, seed=10, batch_size=2, decoding=decoding, progress=False)
    again = generate(model, tokenizer, PROMPTS, seed=10, batch_size=2, decoding=decoding, progress=False)
    other = generate(model, tokenizer, PROMPTS, seed=20, batch_size=2, decoding=decoding, progress=False)
    assert first == again
    assert first != other
    assert len(first) == len(PROMPTS) and all(isinstance(t, str) for t in first)


def test_sampling_depends_on_the_row_not_on_batching_or_order(tiny):
    """Each row samples from its own (seed, row) stream: the batch size, the order of the prompts and a split into
    shards (each passing its rows' ids) leave every row's generation unchanged."""
    tokenizer, model = tiny
    decoding = DecodingConfig(max_new_tokens=12)
    run = lambda prompts, bs, rows=None: generate(  # noqa: E731
        model, tokenizer, prompts, seed=10, batch_size=bs, decoding=decoding, row_ids=rows, progress=False
    )
    reference = run(PROMPTS, 5)
    assert run(PROMPTS, 1) == reference and run(PROMPTS, 2) == reference
    backwards = list(range(len(PROMPTS)))[::-1]
    assert run([PROMPTS[i] for i in backwards], 3, backwards) == reference[::-1]
    odd, even = [1, 3], [0, 2, 4]
    assert run([PROMPTS[i] for i in odd], 2, odd) == [reference[i] for i in odd]
    assert run([PROMPTS[i] for i in even], 2, even) == [reference[i] for i in even]
    # the row id matters: the same prompt as row 0 and as row 1 samples differently
    same = run([PROMPTS[0]] * 2, 2)
    assert same[0] == reference[0] and same[1] != same[0]
    with pytest.raises(ValueError, match="row_ids has 1 entries for 5 prompts"):
        run(PROMPTS, 2, [0])


def _naive_sample(model, tokenizer, prompt: str, *, seed: int, row: int, max_new: int, ngram: int) -> str:
    """One prompt, no batch, no KV cache: softmax of the last logits with repeated n-grams banned, then the first
    token whose cumulative probability exceeds u * total, u drawn from the row's generator."""
    ids = tokenizer(prompt.replace("<n>", "\n"))["input_ids"]
    generator, new = row_generator(seed, row), []
    eos = tokenizer.eos_token_id
    for _ in range(max_new):
        seq = ids + new
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].double()
        if len(seq) >= ngram - 1:
            tail = seq[len(seq) - ngram + 1 :]
            for i in range(len(seq) - ngram + 1):
                if seq[i : i + ngram - 1] == tail:
                    logits[seq[i + ngram - 1]] = float("-inf")
        probs = torch.softmax(logits, dim=0).tolist()
        u = torch.rand(1, generator=generator, dtype=torch.float64).item()
        token = next(i for i, c in enumerate(itertools.accumulate(probs)) if c > u * sum(probs))
        if token == eos:
            break
        new.append(token)
    text = legacy_cleanup(tokenizer.decode(new, skip_special_tokens=True))
    return text.replace("<n>", "\n").strip()


@torch.no_grad()
def test_sampling_equals_a_naive_per_row_reference(tiny):
    tokenizer, model = tiny
    ours = generate(
        model, tokenizer, PROMPTS, seed=30, batch_size=3, decoding=DecodingConfig(max_new_tokens=10), progress=False
    )
    expected = [
        _naive_sample(model, tokenizer, p, seed=30, row=row, max_new=10, ngram=6) for row, p in enumerate(PROMPTS)
    ]
    assert ours == expected


def test_sample_rows_never_draws_a_banned_token_and_follows_the_probabilities():
    scores = torch.tensor([[float("-inf"), 0.0, float("-inf"), 1.0, float("-inf")]] * 3)
    edges = sample_rows(scores, torch.tensor([0.0, 0.5, 1.0 - 2**-53], dtype=torch.float64))
    assert edges.tolist() == [1, 3, 3]  # u = 0 and u -> 1 land on tokens with mass, never on -inf ones
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.3, -1.0, 2.0, 0.0])
    n = 20000
    draws = sample_rows(logits.expand(n, 4), torch.rand(n, generator=generator, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=4).double() / n
    probs = torch.softmax(logits.double(), 0)
    assert torch.all((freq - probs).abs() < 4 * (probs * (1 - probs) / n).sqrt() + 1e-3)


def test_row_streams_differ_by_seed_and_row():
    draw = lambda seed, row: torch.rand(4, generator=row_generator(seed, row)).tolist()  # noqa: E731
    assert draw(10, 0) == draw(10, 0)
    assert len({tuple(draw(s, r)) for s in (10, 20, -1) for r in (0, 1, 2**40)}) == 9


def test_greedy_left_padded_batches_equal_one_prompt_at_a_time(tiny):
    tokenizer, model = tiny
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

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        tail = torch.tensor(self.continuations[: input_ids.shape[0]])
        return torch.cat([input_ids, tail], dim=1)


def test_responses_are_cut_at_the_first_end_of_text(tiny):
    tokenizer, _ = tiny
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
    tokenizer, model = tiny
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
    assert report["num_processes"] == 1 and report["rows_per_process"] == [3]
    single = evaluate_model(model, tokenizer, examples[:1], seeds=[10], max_new_tokens=4, progress=False)
    assert single["rougeL"]["std"] is None
    with pytest.raises(ValueError, match="at least one seed"):
        evaluate_model(model, tokenizer, examples, seeds=[], progress=False)
