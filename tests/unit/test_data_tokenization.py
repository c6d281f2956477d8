"""Tokenization limits, response masks, padding and collators against hand-computed expectations."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from arkd.data import (
    Example,
    PromptCollator,
    TokenizedDataset,
    TrainingCollator,
    shift_for_next_token,
    tokenize_examples,
)


class CharTokenizer:
    """One token per character (id = code point), end-of-text 1, BOS 2: easy to reason about by hand."""

    eos_token_id = 1
    bos_token_id = 2

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False  # arkd never lets a tokenizer add BOS on its own
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def ex(prompt: str, response: str) -> Example:
    return Example(instruction="i", input="", references=[response, "other"], prompt=prompt)


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


TOK = CharTokenizer()
EOS = CharTokenizer.eos_token_id


def test_prompt_and_response_ids_end_with_eos():
    items, report = tokenize_examples([ex("ab", "xyz")], TOK, max_prompt_length=4, max_length=10)
    assert items[0].prompt_ids == ids("ab")
    assert items[0].response_ids == ids("xyz") + [EOS]  # references[0] only
    assert (report.total, report.kept, report.prompts_over_limit, report.responses_truncated) == (1, 1, 0, 0)


def test_prompt_exactly_at_the_limit_is_kept():
    items, report = tokenize_examples([ex("abcd", "x")], TOK, max_prompt_length=4, max_length=10)
    assert items[0].prompt_ids == ids("abcd") and report.prompts_over_limit == 0


def test_overlong_prompts_are_dropped_and_counted(caplog):
    data = [ex("abcdef", "x"), ex("ab", "y"), ex("abcde", "z")]
    with caplog.at_level(logging.WARNING, logger="arkd.data"):
        items, report = tokenize_examples(data, TOK, max_prompt_length=4, max_length=10)
    assert [it.index for it in items] == [1]
    assert (report.total, report.kept, report.prompts_over_limit, report.dropped) == (3, 1, 2, 2)
    assert report.longest_prompt == 6
    assert "2 prompts over 4 tokens (longest 6): 2 dropped" in caplog.text


def test_overlong_prompts_truncated_right_keep_the_head():
    items, report = tokenize_examples(
        [ex("abcdef", "x")], TOK, max_prompt_length=4, max_length=10, overlong_prompt="truncate"
    )
    assert items[0].prompt_ids == ids("abcd")
    assert (report.prompts_over_limit, report.prompts_truncated, report.dropped) == (1, 1, 0)


def test_overlong_prompts_truncated_left_keep_the_tail():
    items, _ = tokenize_examples(
        [ex("abcdef", "x")], TOK, max_prompt_length=4, max_length=10, overlong_prompt="truncate", truncation_side="left"
    )
    assert items[0].prompt_ids == ids("cdef")


def test_left_truncation_keeps_bos_in_front():
    items, _ = tokenize_examples(
        [ex("abcdef", "x")],
        TOK,
        max_prompt_length=4,
        max_length=10,
        overlong_prompt="truncate",
        truncation_side="left",
        add_bos=True,
    )
    assert items[0].prompt_ids == [2] + ids("def")


def test_overlong_prompt_error_names_the_row():
    with pytest.raises(ValueError, match="example 1: the prompt has 5 tokens, over max_prompt_length=4"):
        tokenize_examples([ex("ab", "x"), ex("abcde", "y")], TOK, max_prompt_length=4, max_length=10,
                          overlong_prompt="error")  # fmt: skip


def test_response_cut_to_max_length_loses_eos():
    items, report = tokenize_examples([ex("abc", "uvwxyz")], TOK, max_prompt_length=4, max_length=7)
    assert items[0].response_ids == ids("uvwx")  # 3 + 4 = 7 tokens, no room for the end-of-text token
    assert report.responses_truncated == 1


def test_response_that_fits_with_eos_exactly_is_not_cut():
    items, report = tokenize_examples([ex("abc", "uvw")], TOK, max_prompt_length=4, max_length=7)
    assert items[0].response_ids == ids("uvw") + [EOS] and report.responses_truncated == 0


def test_add_bos():
    items, _ = tokenize_examples([ex("ab", "x")], TOK, max_prompt_length=4, max_length=10, add_bos=True)
    assert items[0].prompt_ids == [2] + ids("ab")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_prompt_length": 8, "max_length": 8}, "expected 0 < max_prompt_length < max_length"),
        ({"max_prompt_length": 0}, "expected 0 < max_prompt_length < max_length"),
        ({"overlong_prompt": "skip"}, "overlong_prompt must be one of drop, truncate, error, got 'skip'"),
        ({"truncation_side": "middle"}, "truncation_side must be one of right, left, got 'middle'"),
    ],
)
def test_bad_limits(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tokenize_examples([ex("ab", "x")], TOK, **kwargs)


def test_tokenizer_without_eos():
    class NoEos(CharTokenizer):
        eos_token_id = None

    with pytest.raises(ValueError, match="the tokenizer has no end-of-text token"):
        tokenize_examples([ex("ab", "x")], NoEos())


def test_dataset_with_every_prompt_over_the_limit_is_an_error():
    with pytest.raises(ValueError, match="no examples left after tokenization .*1 prompts over 2 tokens"):
        TokenizedDataset([ex("abc", "x")], TOK, max_prompt_length=2, max_length=8)
    with pytest.raises(ValueError, match="no examples to tokenize"):
        TokenizedDataset([], TOK)


# --- collators ---------------------------------------------------------------------------------------------


PAD = 0


def test_training_collator_right_pads_and_masks_response_and_eos_only():
    ds = TokenizedDataset([ex("ab", "xyz"), ex("abcd", "q")], TOK, max_prompt_length=4, max_length=10)
    batch = TrainingCollator(PAD)([ds[0], ds[1]])
    a, b, x, y, z, c, d, q = ids("abxyzcdq")
    assert batch["input_ids"].tolist() == [[a, b, x, y, z, EOS], [a, b, c, d, q, EOS]]
    ds2 = TokenizedDataset([ex("abc", "x"), ex("a", "xyz")], TOK, max_prompt_length=4, max_length=10)
    batch = TrainingCollator(PAD)([ds2[0], ds2[1]])
    assert batch["input_ids"].tolist() == [[a, b, c, x, EOS], [a, x, y, z, EOS]]
    ds3 = TokenizedDataset([ex("abc", "xy"), ex("a", "x")], TOK, max_prompt_length=4, max_length=10)
    batch = TrainingCollator(PAD)([ds3[0], ds3[1]])
    assert batch["input_ids"].tolist() == [[a, b, c, x, y, EOS], [a, x, EOS, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [
        [False, False, False, True, True, True],
        [False, True, True, False, False, False],
    ]
    assert batch["labels"].tolist() == [[-100, -100, -100, x, y, EOS], [-100, x, EOS, -100, -100, -100]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool and batch["labels"].dtype == torch.long


def test_padding_is_never_counted_even_when_pad_equals_eos():
    ds = TokenizedDataset([ex("abc", "xy"), ex("a", "x")], TOK, max_prompt_length=4, max_length=10)
    batch = TrainingCollator(EOS)([ds[0], ds[1]])
    assert batch["input_ids"][1].tolist() == ids("ax") + [EOS, EOS, EOS, EOS]
    assert batch["loss_mask"][1].tolist() == [False, True, True, False, False, False]
    assert batch["loss_mask"].sum().item() == 3 + 2


def test_pad_to_multiple_of():
    ds = TokenizedDataset([ex("abc", "xy")], TOK, max_prompt_length=4, max_length=10)
    batch = TrainingCollator(PAD, pad_to_multiple_of=4)([ds[0]])
    assert batch["input_ids"].shape == (1, 8) and batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 2


def test_prompt_collator_left_pads_and_carries_texts():
    data = [ex("abc", "x"), ex("a", "y")]
    ds = TokenizedDataset(data, TOK, max_prompt_length=4, max_length=10)
    batch = PromptCollator(PAD)([ds[1], ds[0]])
    a, b, c = ids("abc")
    assert batch["input_ids"].tolist() == [[PAD, PAD, a], [a, b, c]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert batch["index"].tolist() == [1, 0]
    assert batch["prompts"] == ["a", "abc"]
    assert batch["references"] == [["y", "other"], ["x", "other"]]


def test_collators_reject_empty_batches_and_missing_pad():
    with pytest.raises(ValueError, match="cannot collate an empty batch"):
        TrainingCollator(PAD)([])
    with pytest.raises(ValueError, match="cannot collate an empty batch"):
        PromptCollator(PAD)([])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        TrainingCollator(None)


def test_shift_for_next_token_shapes_and_alignment():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    shifted_logits, shifted_mask = shift_for_next_token(logits, mask)
    assert shifted_logits.shape == (2, 4, 3) and shifted_mask.shape == (2, 4)
    assert torch.equal(shifted_logits, logits[:, :4]) and torch.equal(shifted_mask, mask[:, 1:])
    # position 1 of row 0 (the last prompt token) predicts the first response token
    assert shifted_mask[0].tolist() == [False, True, True, True]


# --- with a real (tiny) model: the masks agree with Hugging Face's label convention ------------------------


# The `tiny` fixture (tests/conftest.py): a tokenizer trained on these texts and a model (in training mode).
TINY_TEXTS = ["the cat sat on the mat", "a dog ran to the park", "### Response:\n", "1 2 3 4 5 6 7 8 9"] * 5
TINY = dict(kind="lm", texts=TINY_TEXTS, vocab_size=300, n_layer=1, n_head=2, n_embd=16, n_positions=64, seed=3,
            eval_model=False)  # fmt: skip


def test_masked_cross_entropy_equals_hugging_face_labels_loss_with_gradients(tiny):
    tokenizer, model = tiny
    data = [ex("the cat sat\n", "on the mat"), ex("a dog\n", "ran"), ex("### Response:\n", "1 2 3")]
    ds = TokenizedDataset(data, tokenizer, max_prompt_length=16, max_length=32)
    batch = TrainingCollator(tokenizer.pad_token_id)([ds[i] for i in range(3)])
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    hf_grad = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted, mask = shift_for_next_token(logits, batch["loss_mask"])
    targets = batch["input_ids"][:, 1:]
    ours = F.cross_entropy(shifted[mask], targets[mask])
    ours.backward()
    torch.testing.assert_close(ours, out.loss)
    torch.testing.assert_close(model.transformer.wte.weight.grad, hf_grad)
    n_response = sum(len(tokenizer(d.response)["input_ids"]) + 1 for d in data)
    assert mask.sum().item() == n_response


def test_right_padding_does_not_change_a_rows_loss(tiny):
    tokenizer, model = tiny
    data = [ex("a dog\n", "ran"), ex("the cat sat on the mat\n", "and the dog ran to the park")]
    ds = TokenizedDataset(data, tokenizer, max_prompt_length=16, max_length=40)
    collate = TrainingCollator(tokenizer.pad_token_id)

    def per_row_loss(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shifted, mask = shift_for_next_token(logits, batch["loss_mask"])
        token_loss = F.cross_entropy(shifted.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        return (token_loss * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        alone = per_row_loss(collate([ds[0]]))
        padded = per_row_loss(collate([ds[0], ds[1]]))
    assert collate([ds[0], ds[1]])["attention_mask"][0].eq(0).any()  # row 0 really is padded
    torch.testing.assert_close(padded[0], alone[0])


def test_left_padded_generation_equals_unpadded_generation(tiny):
    tokenizer, model = tiny
    data = [ex("a dog\n", "x"), ex("the cat sat on the mat\n", "y")]
    ds = TokenizedDataset(data, tokenizer, max_prompt_length=16, max_length=40, overlong_prompt="truncate")
    collate = PromptCollator(tokenizer.pad_token_id)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    model.eval()
    with torch.no_grad():
        batch = collate([ds[0], ds[1]])
        together = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        single = collate([ds[0]])
        alone = model.generate(input_ids=single["input_ids"], attention_mask=single["attention_mask"], **kwargs)
    width = batch["input_ids"].shape[1]
    assert batch["attention_mask"][0, 0] == 0  # row 0 really is left-padded
    assert together[0, width:].tolist() == alone[0, single["input_ids"].shape[1] :].tolist()


def _bos_adding_tokenizer():
    """A tiny BPE that, like Llama-3's, puts a BOS token first when it adds its special tokens."""
    from tokenizers import processors

    from arkd.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=400, corpus_size=400, seed=0)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tokenizer


def test_training_prompts_are_the_evaluation_prompts_with_add_bos_auto():
    from arkd.data import Example, TokenizedDataset
    from arkd.data.tokenization import resolve_add_bos, tokenizer_adds_bos
    from arkd.evaluation.generation import encode_prompts
    from arkd.models import build_tiny_tokenizer

    plain = build_tiny_tokenizer(vocab_size=400, corpus_size=400, seed=0)  # GPT-2-like: BOS = EOS, never added
    with_bos = _bos_adding_tokenizer()
    assert plain.bos_token_id is not None and not tokenizer_adds_bos(plain)
    assert tokenizer_adds_bos(with_bos)
    examples = [
        Example(instruction="i", input="", prompt="what is one plus two", references=["three"]),
        Example(instruction="i", input="", prompt="a b c", references=["d"]),
    ]
    for tokenizer in (plain, with_bos):
        dataset = TokenizedDataset(
            examples, tokenizer, max_prompt_length=64, max_length=96, add_bos=resolve_add_bos("auto", tokenizer)
        )
        evaluated = encode_prompts(tokenizer, [e.prompt for e in examples], 64)
        assert [dataset[i]["prompt_ids"] for i in range(2)] == evaluated
    assert dataset[0]["prompt_ids"][0] == with_bos.bos_token_id
    assert resolve_add_bos(False, with_bos) is False
    with pytest.raises(ValueError, match="data.add_bos must be auto, true or false"):
        resolve_add_bos("yes", plain)
