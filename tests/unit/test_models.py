"""Tiny tokenizer and model, save / load through the real loading path, dtypes, vocabulary checks."""

from __future__ import annotations

import pytest
import torch

from arkd.models import (
    build_tiny_model,
    build_tiny_tokenizer,
    check_vocab,
    load_model,
    load_tokenizer,
    model_vocab_size,
    prepare_tokenizer,
    resolve_dtype,
    save_pretrained,
)

TEXTS = ["Reverse the order of the words.\ncat dog fox", "Add the two numbers.\n3 + 4\n7", "héllo wörld ✓"] * 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    model = build_tiny_model(len(tokenizer), n_layer=2, n_head=2, n_embd=16, n_positions=32, seed=1)
    out = save_pretrained(model, tokenizer, tmp_path_factory.mktemp("tiny"))
    return model, out


def test_tiny_tokenizer_is_gpt2_style(tokenizer):
    assert len(tokenizer) == 300
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.padding_side == "left"
    assert tokenizer("cat dog", add_special_tokens=True)["input_ids"] == tokenizer("cat dog")["input_ids"]  # no BOS


def test_tiny_tokenizer_round_trips_any_text(tokenizer):
    for text in ["cat dog fox", "unseen: Zürich 東京 🙂\n\n  tabs\tand spaces ", "<|endoftext|> inside"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    merged = tokenizer(" the words", add_special_tokens=False)["input_ids"]
    assert len(merged) < len(" the words")  # BPE merges were learned


def test_tiny_tokenizer_is_deterministic(tokenizer):
    again = build_tiny_tokenizer(TEXTS, vocab_size=300)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert again("Add the two numbers.")["input_ids"] == tokenizer("Add the two numbers.")["input_ids"]


def test_default_tiny_tokenizer_trains_on_the_synthetic_corpus(tmp_path):
    from arkd.data.synthetic import NUMBER_WORDS, OPPOSITES, WORDS, synthetic_corpus

    tok = build_tiny_tokenizer(texts=synthetic_corpus(500, seed=0), save_dir=tmp_path / "tok")
    default = build_tiny_tokenizer(corpus_size=500, seed=0)
    assert tok.get_vocab() == default.get_vocab()
    assert len(tok) <= 1024  # training stops once every corpus word is one token
    # the template's words and every task word are single tokens, with or without a leading space
    for word in [" Response", " instruction", " opposite"]:
        assert len(tok(word)["input_ids"]) == 1, word
    for word in [*WORDS, *OPPOSITES, *NUMBER_WORDS]:
        assert len(tok(word)["input_ids"]) == len(tok(" " + word)["input_ids"]) == 1, word
    reloaded = load_tokenizer(tmp_path / "tok")
    assert reloaded.get_vocab() == tok.get_vocab() and reloaded.pad_token_id == 0


def test_tiny_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size must be at least 258"):
        build_tiny_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(ValueError, match="no texts to train the tokenizer on"):
        build_tiny_tokenizer([], vocab_size=300)


def test_tiny_model_config_and_seed(tokenizer):
    model = build_tiny_model(len(tokenizer), n_layer=3, n_head=4, n_embd=32, n_positions=48, seed=7)
    config = model.config
    assert (config.model_type, config.n_layer, config.n_head, config.n_embd, config.n_positions) == (
        "gpt2", 3, 4, 32, 48,
    )  # fmt: skip
    assert model_vocab_size(model) == len(tokenizer) == 300
    assert config.eos_token_id == config.pad_token_id == 0
    same = build_tiny_model(len(tokenizer), n_layer=3, n_head=4, n_embd=32, n_positions=48, seed=7)
    other = build_tiny_model(len(tokenizer), n_layer=3, n_head=4, n_embd=32, n_positions=48, seed=8)
    state, same_state, other_state = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(state[k], same_state[k]) for k in state)
    assert not torch.equal(
        state["transformer.h.0.attn.c_attn.weight"], other_state["transformer.h.0.attn.c_attn.weight"]
    )


def test_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(300, n_layer=1, n_head=1, n_embd=8, n_positions=16)
    torch.testing.assert_close(torch.rand(3), expected)


def test_tiny_model_errors():
    with pytest.raises(ValueError, match=r"n_head \(3\) must divide n_embd \(16\)"):
        build_tiny_model(300, n_head=3, n_embd=16)
    with pytest.raises(ValueError, match="eos_token_id 300 is outside the vocabulary of 300 tokens"):
        build_tiny_model(300, eos_token_id=300)


def test_save_and_load_round_trip_through_the_real_loading_path(saved, tokenizer):
    model, path = saved
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    loaded = load_model(path)
    reloaded_tok = load_tokenizer(path)
    ids = torch.tensor([reloaded_tok("cat dog fox")["input_ids"]])
    assert reloaded_tok("cat dog fox")["input_ids"] == tokenizer("cat dog fox")["input_ids"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert type(loaded).__name__ == "GPT2LMHeadModel" and loaded.dtype == torch.float32


def test_load_model_in_bfloat16(saved):
    _, path = saved
    loaded = load_model(path, dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


def test_missing_checkpoint_is_one_clear_sentence(tmp_path):
    with pytest.raises(OSError, match="could not load a causal language model from .*expected a Hugging Face model"):
        load_model(tmp_path / "nothing")
    with pytest.raises(OSError, match="could not load a tokenizer from .*expected a Hugging Face model name"):
        load_tokenizer(tmp_path / "nothing")


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype 'float8'; expected one of"):
        resolve_dtype("float8")


def test_gpt2_style_tokenizer_without_pad_gets_eos_as_pad(tokenizer, tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert no_pad.pad_token is None
    prepared = prepare_tokenizer(no_pad, padding_side="right")
    assert prepared.pad_token == "<|endoftext|>" and prepared.pad_token_id == 0 and prepared.padding_side == "right"
    no_pad2 = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    no_pad2.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token_id == loaded.eos_token_id == 0 and loaded.padding_side == "left"
    batch = loaded(["cat", "cat dog fox"], padding=True)
    assert batch["attention_mask"][0][0] == 0  # left padding for generation
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'center'"):
        prepare_tokenizer(loaded, padding_side="center")
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="the tokenizer has no end-of-text"):
        prepare_tokenizer(no_eos)


# --- vocabulary checks -------------------------------------------------------------------------------------


def tiny_model(vocab: int):
    return build_tiny_model(vocab, n_layer=1, n_head=1, n_embd=8, n_positions=16)


def test_check_vocab_same_size(tokenizer):
    assert check_vocab(tiny_model(300), tiny_model(300), tokenizer) == 300


def test_check_vocab_slices_padded_embeddings(tokenizer):
    teacher, student = tiny_model(320), tiny_model(384)  # e.g. rounded up to a multiple of 64
    vocab = check_vocab(teacher, student, tokenizer)
    assert vocab == 300
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert teacher(ids).logits[..., :vocab].shape == student(ids).logits[..., :vocab].shape == (1, 3, 300)


def test_check_vocab_rejects_a_smaller_model(tokenizer):
    with pytest.raises(ValueError, match="teacher vocabulary size 300 and student vocabulary size 280 .*tokenizer's "
                       "300 tokens .*the student has 280"):  # fmt: skip
        check_vocab(tiny_model(300), tiny_model(280), tokenizer)


def test_check_vocab_rejects_a_different_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="teacher vocabulary size 50257 and student vocabulary size 300"):
        check_vocab(tiny_model(50257), tiny_model(300), tokenizer)


def test_check_vocab_rejects_a_different_teacher_tokenizer(tokenizer):
    other = build_tiny_tokenizer(["completely different words here"] * 5, vocab_size=300)
    with pytest.raises(ValueError, match=r"the teacher's tokenizer \(\d+ tokens\) and the student's \(300 tokens\) "
                       "differ"):  # fmt: skip
        check_vocab(tiny_model(300), tiny_model(300), tokenizer, teacher_tokenizer=other)
    assert check_vocab(tiny_model(300), tiny_model(300), tokenizer, teacher_tokenizer=tokenizer) == 300


def test_check_vocab_override(tokenizer, caplog):
    assert check_vocab(tiny_model(50257), tiny_model(280), tokenizer, allow_different_tokenizer=True) == 280
    assert "vocabulary check overridden" in caplog.text
