"""Packed SFT batches (``data.packing``): first-fit-decreasing rows, a hand-built batch, and the same loss and
gradients as the unpacked batch on GPT-2 and Llama models built from config (values and gradients), then the same
training run through the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _trainers import make_trainer
from transformers import LlamaConfig, LlamaForCausalLM

from arkd.data import TokenizedDataset, TrainingCollator, build_dataloader, generate_synthetic
from arkd.data.collate import model_inputs, pack_rows
from arkd.models import build_tiny_model, build_tiny_tokenizer


def test_first_fit_decreasing_rows():
    # Longest first: 5 opens row 0, 4 opens row 1, 3 fits nowhere (room 1 and 2), 2 fits row 1, 1 fits row 0.
    assert pack_rows([3, 5, 1, 4, 2], width=6) == [[1, 2], [3, 4], [0]]
    assert pack_rows([2, 2, 2], width=6) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([7], width=6)


def test_packed_batch_by_hand():
    # Items (prompt, response): a = ([1, 2], [3]) and b = ([4], [5, 6]); both 3 tokens long, so one row of width 3
    # each unpacked, and two items cannot share a row of width 3 either; c = ([], [7]) has 1 token.
    items = [
        {"prompt_ids": [1, 2], "response_ids": [3]},
        {"prompt_ids": [4], "response_ids": [5, 6]},
        {"prompt_ids": [], "response_ids": [7]},
    ]
    batch = TrainingCollator(0, pack=True)(items)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    # c's only token is its first: nothing of its own item predicts it, as nothing predicts position 0 unpacked.
    assert batch["loss_mask"].tolist() == [[False, False, True], [False, True, True], [False, False, False]]
    assert batch["labels"].tolist() == [[-100, -100, 3], [-100, 5, 6], [-100, -100, -100]]
    # Two short items share a row; the padding after them is a segment of its own (positions restart).
    short = [{"prompt_ids": [1], "response_ids": [2]}, {"prompt_ids": [3], "response_ids": [4]}]
    wide = [{"prompt_ids": [9, 9, 9], "response_ids": [9, 9]}] + short
    batch = TrainingCollator(0, pack=True)(wide)
    assert batch["input_ids"].tolist() == [[9, 9, 9, 9, 9], [1, 2, 3, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 0]]
    assert model_inputs(batch)["attention_mask"] is None and model_inputs(batch)["use_cache"] is False


def _ce_sum(model, batch):
    logits = model(**model_inputs(batch)).logits[:, :-1]
    mask = batch["loss_mask"][:, 1:]
    return F.cross_entropy(logits[mask].float(), batch["input_ids"][:, 1:][mask], reduction="sum"), int(mask.sum())


def _llama(vocab):
    torch.manual_seed(4)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_loss_and_gradients_equal_unpacked(family, attention):
    vocab = 300
    g = torch.Generator().manual_seed(7)
    lengths = [(3, 40), (1, 2), (5, 4), (0, 3), (8, 9), (2, 1), (12, 20), (4, 6)]  # (prompt, response) tokens
    items = [
        {"prompt_ids": torch.randint(vocab, (p,), generator=g).tolist(),
         "response_ids": torch.randint(vocab, (r,), generator=g).tolist()}
        for p, r in lengths
    ]  # fmt: skip
    if family == "gpt2":
        model = build_tiny_model(vocab, n_layer=2, n_embd=32, n_head=2, n_positions=256, seed=3)
    else:
        model = _llama(vocab)
    model.config._attn_implementation = attention
    model.eval()
    plain = TrainingCollator(0)(items)
    packed = TrainingCollator(0, pack=True)(items)
    assert packed["input_ids"].shape[0] < plain["input_ids"].shape[0]  # the point: fewer rows
    assert packed["loss_mask"][:, 1:].sum() == plain["loss_mask"][:, 1:].sum()  # the counted tokens

    results = []
    for batch in (plain, packed):
        model.zero_grad()
        total, count = _ce_sum(model, batch)
        (total / count).backward()
        results.append((total.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def _sft_trainer(tokenizer, dataset, tmp_path, pack):
    student = build_tiny_model(len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=160, seed=2)
    loader = build_dataloader(
        dataset, batch_size=6, collate_fn=TrainingCollator(tokenizer.pad_token_id, pack=pack), seed=0, rank=0,
        world_size=1, drop_last=True,
    )  # fmt: skip
    return make_trainer(
        student, None, loader, torch.optim.SGD(student.parameters(), lr=0.5), steps=3, output_dir=tmp_path,
        grad_accum=2, tokenizer=tokenizer, kd_weight=0.0, ce_weight=1.0,
    )  # fmt: skip


def test_packed_sft_training_equals_unpacked(tmp_path):
    tokenizer = build_tiny_tokenizer(vocab_size=400, corpus_size=400, seed=0)
    dataset = TokenizedDataset(generate_synthetic(48, seed=6), tokenizer, max_prompt_length=120, max_length=160)
    # Rows of very different lengths (the synthetic rows are alike): two in three cut to 4 prompt + 2 answer tokens.
    dataset = [
        {"prompt_ids": dataset[i]["prompt_ids"][: 4 if i % 3 else None],
         "response_ids": dataset[i]["response_ids"][: 2 if i % 3 else None]}
        for i in range(48)
    ]  # fmt: skip
    plain = _sft_trainer(tokenizer, dataset, tmp_path / "plain", pack=False)
    packed = _sft_trainer(tokenizer, dataset, tmp_path / "packed", pack=True)
    rows_plain = [plain.train_step() for _ in range(3)]
    rows_packed = [packed.train_step() for _ in range(3)]
    assert [r["loss"] for r in rows_packed] == pytest.approx([r["loss"] for r in rows_plain], rel=1e-5)
    assert all(p["padding_share"] < q["padding_share"] for p, q in zip(rows_packed, rows_plain))
    for a, b in zip(plain.student.parameters(), packed.student.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
