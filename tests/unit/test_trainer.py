"""The trainer loop on tiny models (CPU): token normalisation against a naive reference (values and gradients),
gradient-accumulation invariance, non-finite handling, the reward path, checkpoints and their safe loading."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from arkd import checkpoint as ckpt
from arkd.data import TokenizedDataset, TrainingCollator, build_dataloader, generate_synthetic
from arkd.losses import BidirectionalKLLoss
from arkd.models import build_tiny_model, build_tiny_tokenizer
from arkd.policy import ConstantAlpha, LearnedPolicy
from arkd.reward import alignment
from arkd.trainer import BatchStream, NonFiniteLossError, Trainer, TrainerConfig


@pytest.fixture(scope="module")
def tiny():
    """A tokenizer, a tokenized synthetic dataset, a collator and a teacher shared by the tests."""
    tokenizer = build_tiny_tokenizer(vocab_size=512, corpus_size=1000, seed=0)
    examples = generate_synthetic(64, seed=3)
    dataset = TokenizedDataset(examples, tokenizer, max_prompt_length=120, max_length=160)
    collate = TrainingCollator(tokenizer.pad_token_id)
    teacher = build_tiny_model(len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=160, seed=1)
    return tokenizer, dataset, collate, teacher


def _accelerator(grad_accum: int = 1):
    from accelerate import Accelerator

    return Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False)


def _trainer(tiny, tmp_path, *, batch_size, grad_accum, steps, strategy=None, loss=None, optimizer="sgd", **options):
    tokenizer, dataset, collate, teacher = tiny
    student = build_tiny_model(len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=160, seed=2)
    if optimizer == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=options.pop("lr", 1.0))
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    accelerator = _accelerator(grad_accum)
    loader = build_dataloader(
        dataset, batch_size=batch_size, collate_fn=collate, seed=0, rank=0, world_size=1, drop_last=True
    )
    config = TrainerConfig(
        max_steps=steps,
        grad_accum=grad_accum,
        max_grad_norm=options.pop("max_grad_norm", None),
        log_interval=1,
        output_dir=str(tmp_path),
        progress=False,
        **options,
    )
    return Trainer(
        student=student,
        teacher=copy.deepcopy(teacher),
        tokenizer=tokenizer,
        batches=BatchStream(loader),
        strategy=strategy if strategy is not None else ConstantAlpha(alpha=0.3),
        loss=loss if loss is not None else BidirectionalKLLoss(reduction="sum"),
        optimizer=opt,
        scheduler=None,
        accelerator=accelerator,
        config=config,
        reward_fn=alignment,
    )


def _naive_window_loss(student, teacher, batches, alpha: float) -> torch.Tensor:
    """alpha * FKL + (1 - alpha) * RKL averaged over every counted token of the window, written out by hand."""
    total, count = 0.0, 0
    for batch in batches:
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        with torch.no_grad():
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["loss_mask"][:, 1:]
        p, q = torch.softmax(t[mask], -1), torch.softmax(s[mask], -1)
        fkl = (p * (p.log() - q.log())).sum(-1)
        rkl = (q * (q.log() - p.log())).sum(-1)
        total = total + (alpha * fkl + (1 - alpha) * rkl).sum()
        count += int(mask.sum())
    return total / count


def test_step_is_token_mean_over_window_with_exact_gradient(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, batch_size=3, grad_accum=2, steps=1)
    student0 = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.student))
    teacher = trainer.accelerator.unwrap_model(trainer.teacher)
    # The same two micro-batches the trainer will draw (uneven padding and token counts).
    probe = build_dataloader(tiny[1], batch_size=3, collate_fn=tiny[2], seed=0, rank=0, world_size=1, drop_last=True)
    it = iter(probe)
    window = [next(it), next(it)]
    assert window[0]["loss_mask"].sum() != window[1]["loss_mask"].sum()

    reference = _naive_window_loss(student0, teacher, window, alpha=0.3)
    reference.backward()
    row = trainer.train_step()
    assert row["loss"] == pytest.approx(reference.item(), rel=1e-5)
    # SGD with lr 1 and no clipping: the update is minus the gradient of the token-mean loss.
    for (name, before), after in zip(student0.named_parameters(), trainer.student.parameters()):
        torch.testing.assert_close(before.detach() - after.detach(), before.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_invariance(tiny, tmp_path):
    # SGD: Adam's per-coordinate normalisation would blow float noise in near-zero gradients up to full steps.
    big = _trainer(tiny, tmp_path / "a", batch_size=4, grad_accum=1, steps=3, lr=0.5, max_grad_norm=1.0)
    small = _trainer(tiny, tmp_path / "b", batch_size=2, grad_accum=2, steps=3, lr=0.5, max_grad_norm=1.0)
    curve_big = [big.train_step()["loss"] for _ in range(3)]
    curve_small = [small.train_step()["loss"] for _ in range(3)]
    assert curve_big == pytest.approx(curve_small, rel=1e-5)
    for a, b in zip(big.student.parameters(), small.student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _NaNAt(torch.nn.Module):
    """A KD loss that turns NaN on the given optimizer steps (the step counter is the trainer's)."""

    takes_alpha = True

    def __init__(self, steps: set[int]) -> None:
        super().__init__()
        self.inner = BidirectionalKLLoss(reduction="sum")
        self.steps, self.calls = steps, 0

    def forward(self, s, t, m, alpha=None):
        self.calls += 1
        value = self.inner(s, t, m, alpha=alpha)
        return value * float("nan") if self.calls in self.steps else value


def test_nonfinite_skip_counts_and_leaves_weights(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, batch_size=2, grad_accum=1, steps=3, loss=_NaNAt({2}), lr=0.1)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.student.parameters()]
    row = trainer.train_step()
    assert row["skipped_steps"] == 1
    assert row["loss"] is None or not math.isfinite(row["loss"])
    for a, b in zip(before, trainer.student.parameters()):
        assert torch.equal(a, b)
    assert trainer.train_step()["skipped_steps"] == 1  # the next step trains again


def test_nonfinite_stop_names_step_and_statistics(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, batch_size=2, grad_accum=1, steps=3, loss=_NaNAt({2}), on_nonfinite="stop")
    trainer.train_step()
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss=nan.*alpha_mean=0\.3"):
        trainer.train_step()


def test_reward_updates_learned_policy_every_interval(tiny, tmp_path):
    policy = LearnedPolicy(granularity="sequence", seed=0)
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=1, steps=4, strategy=policy, reward_interval=2, lr=0.5)
    calls = []
    original = policy.update

    def spy(reward):
        calls.append(reward.clone())
        return original(reward)

    policy.update = spy
    rows = [trainer.train_step() for _ in range(4)]
    assert len(calls) == 2 and calls[0].shape == (4,)  # steps 2 and 4, one reward per sequence
    assert [r["reward"] is not None for r in rows] == [False, True, False, True]
    assert all(0 <= r["alpha_mean"] <= 1 and r["policy_entropy"] is not None for r in rows)


def test_reward_is_alignment_improvement_on_the_same_batch(tiny, tmp_path):
    """D_before - D_after recomputed by hand from the weights before and after the step."""
    policy = LearnedPolicy(granularity="batch", seed=0)
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=1, steps=1, strategy=policy, lr=0.5)
    student0 = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.student))
    teacher = trainer.accelerator.unwrap_model(trainer.teacher)
    batch = next(
        iter(build_dataloader(tiny[1], batch_size=4, collate_fn=tiny[2], seed=0, rank=0, world_size=1, drop_last=True))
    )
    rewards = []
    policy.update = lambda r: rewards.append(r) or {}
    trainer.train_step()

    def d(model):
        with torch.no_grad():
            s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        m = batch["loss_mask"][:, 1:]
        p, q = torch.softmax(t[m], -1), torch.softmax(s[m], -1)
        return float(((p * (p.log() - q.log())).sum(-1) + (q * (q.log() - p.log())).sum(-1)).mean() / 2)

    expected = d(student0) - d(trainer.accelerator.unwrap_model(trainer.student))
    assert float(rewards[0]) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_lookahead_scores_alpha_by_trial_step(tiny, tmp_path):
    """ctx.lookahead(alpha) = D(theta) - D(theta - lr * g(alpha)), checked against an explicit SGD step."""
    from arkd.trainer import make_lookahead

    trainer = _trainer(tiny, tmp_path, batch_size=2, grad_accum=1, steps=1, lr=0.5)
    batch = next(
        iter(build_dataloader(tiny[1], batch_size=2, collate_fn=tiny[2], seed=0, rank=0, world_size=1, drop_last=True))
    )
    lookahead = make_lookahead(trainer, batch)
    got = lookahead(0.25)
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.student)).eval()
    teacher = trainer.accelerator.unwrap_model(trainer.teacher)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    m = batch["loss_mask"][:, 1:]

    def d_and_loss(alpha):
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        p, q = torch.softmax(t[m], -1), torch.softmax(s[m], -1)
        fkl = (p * (p.log() - q.log())).sum(-1).mean()
        rkl = (q * (q.log() - p.log())).sum(-1).mean()
        return (fkl + rkl) / 2, alpha * fkl + (1 - alpha) * rkl

    d0, loss = d_and_loss(0.25)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    d1, _ = d_and_loss(0.25)
    assert got == pytest.approx(float((d0 - d1).detach()), rel=1e-3, abs=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_weights_round_trip_with_tied_embeddings(tmp_path):
    model = build_tiny_model(300, n_layer=1, n_embd=16, n_head=2, n_positions=32)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ckpt.save_weights(model.state_dict(), tmp_path / "m.safetensors")
    loaded = ckpt.load_weights(tmp_path / "m.safetensors")
    fresh = build_tiny_model(300, n_layer=1, n_embd=16, n_head=2, n_positions=32, seed=9)
    fresh.load_state_dict(loaded, strict=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.write_checkpoint(root, 2, model_state={"w": torch.ones(2)}, state={"a": 1}, rng_states=[])
    # A save killed half-way: the temporary directory, and a final-looking one without COMPLETE.
    (root / ".tmp_step_0000004_123").mkdir()
    (root / "step_0000006").mkdir()
    assert ckpt.latest_checkpoint(root) == root / "step_0000002"
    ckpt.write_checkpoint(root, 8, model_state={"w": torch.ones(2)}, state={"a": 2}, rng_states=[], keep_last=1)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [8]
    assert ckpt.read_state(ckpt.latest_checkpoint(root)) == {"a": 2}


class _Arbitrary:
    pass


def test_state_loading_refuses_arbitrary_objects(tmp_path):
    root = tmp_path / "step_0000001"
    root.mkdir()
    torch.save({"obj": _Arbitrary()}, root / ckpt.STATE_FILE)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        ckpt.read_state(root)


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    ckpt.restore_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_trainer_checkpoint_restores_everything(tiny, tmp_path):
    policy = LearnedPolicy(granularity="sequence", seed=0)
    a = _trainer(tiny, tmp_path / "a", batch_size=2, grad_accum=1, steps=4, strategy=policy, optimizer="adamw")
    for _ in range(2):
        a.train_step()
    path = a.save_checkpoint()
    rest_a = [a.train_step()["loss"] for _ in range(2)]

    b = _trainer(
        tiny,
        tmp_path / "b",
        batch_size=2,
        grad_accum=1,
        steps=4,
        strategy=LearnedPolicy(granularity="sequence", seed=5),
        optimizer="adamw",
    )
    b.load_checkpoint(path)
    rest_b = [b.train_step()["loss"] for _ in range(2)]
    assert rest_a == pytest.approx(rest_b, rel=1e-6)
    for x, y in zip(a.student.parameters(), b.student.parameters()):
        torch.testing.assert_close(x, y)
    for x, y in zip(a.strategy.network.parameters(), b.strategy.network.parameters()):
        torch.testing.assert_close(x, y)


def test_greedy_lookahead_predicts_the_step_the_trainer_takes(tiny, tmp_path):
    """GreedySearch's look-ahead simulates the trainer's real step (clipping, then AdamW from its state): the reward
    it predicts for the alpha it picks is the alignment gain the step then makes on the same batch."""
    from arkd.policy import GreedySearch

    class Recording(GreedySearch):
        def select(self, ctx):
            self.rewards = {a: float(ctx.lookahead(a)) for a in self.candidates}
            return super().select(ctx)

    strategy = Recording(candidates=(0.0, 0.5, 1.0))
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=1, steps=3, strategy=strategy, optimizer="adamw",
                       max_grad_norm=0.5)  # fmt: skip
    seen = []
    stream = trainer.batches

    class Spy:
        def __next__(self):
            batch = next(stream)
            seen.append(batch)
            return batch

    trainer.batches = Spy()
    for _ in range(3):  # AdamW has moments from the second step on
        before = copy.deepcopy(trainer.student)
        row = trainer.train_step()
        batch = seen[-1]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["loss_mask"][:, 1:].bool()
        with torch.no_grad():
            t = trainer.teacher(**inputs).logits[:, :-1]
            gain = alignment(before(**inputs).logits[:, :-1], t, mask) - alignment(
                trainer.student(**inputs).logits[:, :-1], t, mask
            )
        chosen = row["alpha_mean"]
        assert strategy.rewards[chosen] == max(strategy.rewards.values())
        assert strategy.rewards[chosen] == pytest.approx(float(gain), rel=1e-3, abs=1e-6)
