"""The trainer loop on tiny models (CPU): token normalisation against a naive reference (values and gradients),
gradient-accumulation invariance, non-finite handling, the reward path, checkpoints and their safe loading."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _trainers import make_trainer

from arkd import checkpoint as ckpt
from arkd.data import build_dataloader
from arkd.losses import BidirectionalKLLoss
from arkd.models import build_tiny_model
from arkd.policy import ConstantAlpha, LearnedPolicy
from arkd.reward import PairedReward, SameBatchReward, alignment
from arkd.trainer import NonFiniteLossError

# The `tiny` fixture (tests/conftest.py): a tokenizer, a tokenized synthetic dataset, a collator and a teacher shared
# by the tests, of these sizes.
TINY = dict(kind="world", vocab_size=512, corpus_size=1000, examples=64, max_prompt_length=120, max_length=160,
            n_embd=32, n_positions=160, eval_teacher=False, with_rows=False)  # fmt: skip


def _trainer(
    tiny,
    tmp_path,
    *,
    batch_size,
    grad_accum,
    steps,
    strategy=None,
    loss=None,
    optimizer="sgd",
    reward=None,
    probe=None,
    dropout=0.0,
    **options,
):
    tokenizer, dataset, collate, teacher = tiny
    student = build_tiny_model(len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=160, seed=2, dropout=dropout)
    if optimizer == "sgd":
        opt = torch.optim.SGD(student.parameters(), lr=options.pop("lr", 1.0))
    else:
        opt = torch.optim.AdamW(student.parameters(), lr=options.pop("lr", 1e-3))
    loader = build_dataloader(
        dataset, batch_size=batch_size, collate_fn=collate, seed=0, rank=0, world_size=1, drop_last=True
    )
    return make_trainer(
        student, copy.deepcopy(teacher), loader, opt, steps=steps, output_dir=tmp_path, grad_accum=grad_accum,
        tokenizer=tokenizer, strategy=strategy if strategy is not None else ConstantAlpha(alpha=0.3),
        loss=loss if loss is not None else BidirectionalKLLoss(reduction="sum"),
        reward=reward if reward is not None else PairedReward(), probe=probe,
        max_grad_norm=options.pop("max_grad_norm", None), **options,
    )  # fmt: skip


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

    takes_alpha, needs_target_ids, has_schedule = True, False, False  # the KDLoss declarations

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


def _first_batches(tiny, batch_size, n):
    loader = build_dataloader(tiny[1], batch_size=batch_size, collate_fn=tiny[2], seed=0, rank=0, world_size=1,
                              drop_last=True)  # fmt: skip
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _hand_d(model, teacher, batch) -> float:
    """D = (FKL + RKL) / 2 per counted token, written out by hand (eval mode)."""
    model.eval()
    with torch.no_grad():
        s = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    m = batch["loss_mask"][:, 1:]
    p, q = torch.softmax(t[m], -1), torch.softmax(s[m], -1)
    return float(((p * (p.log() - q.log())).sum(-1) + (q * (q.log() - p.log())).sum(-1)).mean() / 2)


def _spy(policy, name, log):
    original = getattr(policy, name)

    def wrapped(*args):
        result = original(*args)
        log.append((args, result))
        return result

    setattr(policy, name, wrapped)


def test_paired_reward_every_interval_one_reward_per_candidate(tiny, tmp_path):
    policy = LearnedPolicy(granularity="batch", seed=0)
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=1, steps=4, strategy=policy,
                       reward=PairedReward(interval=2, candidates=3), lr=0.5)  # fmt: skip
    calls = []
    _spy(policy, "update", calls)
    rows = [trainer.train_step() for _ in range(4)]
    assert len(calls) == 2 and calls[0][0][0].shape == (3,)  # steps 2 and 4, one reward per candidate
    assert [r["reward"] is not None for r in rows] == [False, True, False, True]
    assert all(r["policy_updated"] == 1.0 for r in rows if r["reward"] is not None)
    assert all(0 <= r["alpha_mean"] <= 1 and r["policy_entropy"] is not None for r in rows)


def test_paired_rewards_are_explicit_steps_scored_on_the_next_batch(tiny, tmp_path):
    """r_k = D(theta; next batch) - D(theta_k; next batch), theta_k an explicit SGD step of the window's loss at
    candidate alpha_k, recomputed by hand; the applied step is the policy's mean."""
    policy = LearnedPolicy(granularity="batch", seed=0)
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=1, steps=1, strategy=policy,
                       reward=PairedReward(interval=1, candidates=3), lr=0.5)  # fmt: skip
    student0 = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.student))
    teacher = trainer.accelerator.unwrap_model(trainer.teacher)
    batch, next_batch = _first_batches(tiny, 4, 2)
    updates, proposals = [], []
    _spy(policy, "update", updates)
    _spy(policy, "candidate_actions", proposals)
    row = trainer.train_step()
    candidates = [float(c) for c in proposals[0][1]]
    base = _hand_d(copy.deepcopy(student0), teacher, next_batch)
    expected = []
    for alpha in candidates:
        model = copy.deepcopy(student0)
        model.eval()
        _naive_window_loss(model, teacher, [batch], alpha).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
        expected.append(base - _hand_d(model, teacher, next_batch))
    got = updates[0][0][0]
    assert got.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert row["reward"] == pytest.approx(sum(expected) / 3, rel=1e-4, abs=1e-7)
    # the applied step is the mean's, not a candidate's
    applied = copy.deepcopy(student0)
    _naive_window_loss(applied, teacher, [batch], row["alpha_mean"]).backward()
    with torch.no_grad():
        for p in applied.parameters():
            p -= 0.5 * p.grad
    for x, y in zip(applied.parameters(), trainer.accelerator.unwrap_model(trainer.student).parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_step_preview_is_the_real_adamw_step_with_clipping(tiny, tmp_path):
    """The probe's preview at delta = 0 is where the trainer's step lands; at delta it is an explicit AdamW step
    (same state, clipping) of the loss at alpha + delta."""
    from arkd.policy import AlphaSignalProbe, ConstantAlpha

    records = []

    class Recording(AlphaSignalProbe):
        def measure(self, preview, held_out, same=None):
            params = {n: p.detach().clone() for n, p in preview.params.items()}
            records.append((preview.params_at(0.0), preview.params_at(0.2), params))
            return super().measure(preview, held_out, same)

    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=2, steps=3, strategy=ConstantAlpha(alpha=0.3),
                       optimizer="adamw", lr=1e-2, max_grad_norm=0.05, probe=Recording(interval=1))  # fmt: skip
    model = trainer.accelerator.unwrap_model(trainer.student)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher)
    batches = _first_batches(tiny, 4, 6)
    for step in range(3):
        state = copy.deepcopy(trainer.optimizer.state_dict())
        before = copy.deepcopy(model)
        row = trainer.train_step()
        assert row["alpha_signal_slope"] is not None and row["alpha_signal_best"] is not None
        at_zero, at_delta, _ = records[-1]
        for name, p in model.named_parameters():
            torch.testing.assert_close(at_zero[name], p.detach(), rtol=1e-5, atol=1e-7)
        # explicit: alpha 0.5 from the same state
        other = copy.deepcopy(before)
        other.train()
        opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
        opt.load_state_dict(state)
        _naive_window_loss(other, teacher, batches[2 * step : 2 * step + 2], 0.5).backward()
        torch.nn.utils.clip_grad_norm_(other.parameters(), 0.05)
        opt.step()
        # g + delta * dg/dalpha equals the direct gradient up to float rounding, which Adam's g / sqrt(v) magnifies on
        # entries whose gradient is near 0 (a few in 16k differ by ~1e-5, 0.1 % of a step at lr 1e-2)
        for name, p in other.named_parameters():
            torch.testing.assert_close(at_delta[name], p.detach(), rtol=1e-4, atol=5e-5)


def test_same_batch_reward_is_alignment_improvement_on_the_same_batch(tiny, tmp_path):
    """The legacy reward: D_before - D_after recomputed by hand from the weights before and after the step."""
    policy = LearnedPolicy(granularity="batch", seed=0)
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=1, steps=1, strategy=policy,
                       reward=SameBatchReward(interval=1), lr=0.5)  # fmt: skip
    student0 = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.student))
    teacher = trainer.accelerator.unwrap_model(trainer.teacher)
    (batch,) = _first_batches(tiny, 4, 1)
    rewards = []
    _spy(policy, "update", rewards)
    trainer.train_step()
    expected = _hand_d(student0, teacher, batch) - _hand_d(
        copy.deepcopy(trainer.accelerator.unwrap_model(trainer.student)), teacher, batch
    )
    assert float(rewards[0][0][0]) == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize(
    ("reward", "granularity"),
    [
        (PairedReward(interval=1), "batch"),
        (PairedReward(interval=1), "sequence"),
        (SameBatchReward(interval=1), "sequence"),
    ],
)
def test_a_step_that_changes_nothing_earns_zero_reward_under_dropout(tiny, tmp_path, reward, granularity):
    """model dropout 0.1, lr 0: every logged reward and probe slope is 0 (no noise the action did not cause)."""
    from arkd.policy import AlphaSignalProbe

    policy = LearnedPolicy(granularity=granularity, seed=0)
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=2, steps=3, strategy=policy, reward=reward,
                       optimizer="adamw", lr=0.0, dropout=0.1, probe=AlphaSignalProbe(interval=1))  # fmt: skip
    rows = [trainer.train_step() for _ in range(3)]
    assert all(r["reward"] is not None and abs(r["reward"]) <= 1e-6 for r in rows)
    assert all(abs(r["alpha_signal_slope"]) <= 1e-6 and abs(r["alpha_signal_slope_same"]) <= 1e-6 for r in rows)


def test_one_alpha_per_optimizer_step_and_every_micro_batch_credited(tiny, tmp_path):
    batch_policy = LearnedPolicy(granularity="batch", seed=0)
    selects = []
    _spy(batch_policy, "select", selects)
    trainer = _trainer(tiny, tmp_path / "b", batch_size=2, grad_accum=4, steps=2, strategy=batch_policy,
                       reward=PairedReward(interval=1))  # fmt: skip
    for _ in range(2):
        trainer.train_step()
    assert len(selects) == 2  # one per optimiser step, not one per micro-batch

    seq_policy = LearnedPolicy(granularity="sequence", seed=0, apply="sample")
    updates = []
    _spy(seq_policy, "update", updates)
    trainer = _trainer(tiny, tmp_path / "s", batch_size=2, grad_accum=4, steps=1, strategy=seq_policy,
                       reward=SameBatchReward(interval=1))  # fmt: skip
    trainer.train_step()
    (per_batch,) = updates[0][0]
    assert len(per_batch) == 4 and all(r.shape == (2,) for r in per_batch)  # every micro-batch's actions

    paired = LearnedPolicy(granularity="sequence", seed=0)
    pending = []
    original = paired.update

    def record(reward):
        pending.append([p.candidates.shape for p in paired._pending])
        return original(reward)

    paired.update = record
    trainer = _trainer(tiny, tmp_path / "p", batch_size=2, grad_accum=4, steps=1, strategy=paired,
                       reward=PairedReward(interval=1, candidates=2))  # fmt: skip
    row = trainer.train_step()
    assert pending[0] == [torch.Size([2, 2])] * 4 and row["reward"] is not None


def test_teacher_runs_once_per_batch_when_previews_peek(tiny, tmp_path):
    """The next batch's teacher logits computed for a preview are the next step's: one teacher forward per batch."""
    from arkd.policy import AlphaSignalProbe

    policy = LearnedPolicy(granularity="batch", seed=0)
    trainer = _trainer(tiny, tmp_path, batch_size=4, grad_accum=1, steps=4, strategy=policy,
                       reward=PairedReward(interval=2), probe=AlphaSignalProbe(interval=1))  # fmt: skip
    calls = []
    teacher = trainer.teacher
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        for _ in range(4):
            trainer.train_step()
    finally:
        handle.remove()
    assert len(calls) == 5  # 4 steps' batches + the batch after the last step (peeked by its probe)


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
    from arkd.policy import AlphaSignalProbe

    policy = LearnedPolicy(granularity="sequence", seed=0)
    # a reward and a probe at step 2: the checkpoint is written while the next batch is peeked (and its teacher
    # logits cached); the resumed run must draw that batch again
    a = _trainer(tiny, tmp_path / "a", batch_size=2, grad_accum=1, steps=4, strategy=policy, optimizer="adamw",
                 reward=PairedReward(interval=2), probe=AlphaSignalProbe(interval=2))  # fmt: skip
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
        reward=PairedReward(interval=2),
        probe=AlphaSignalProbe(interval=2),
    )
    b.load_checkpoint(path)
    rest_b = [b.train_step()["loss"] for _ in range(2)]
    assert rest_a == pytest.approx(rest_b, rel=1e-6)
    assert (
        a.control.probe.slopes == pytest.approx(b.control.probe.slopes, rel=1e-6) and len(b.control.probe.slopes) == 2
    )
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

    trainer.window.batches = Spy()  # the window draws the batches
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


def test_probe_works_for_every_kind_of_strategy(tiny, tmp_path):
    """The probe is available to any strategy: per-token alphas (AKL) are shifted by +-delta, greedy chooses from
    the same previews."""
    from arkd.policy import AKLHeuristic, AlphaSignalProbe, GreedySearch

    for name, strategy in (("akl", AKLHeuristic()), ("greedy", GreedySearch(candidates=(0.0, 1.0)))):
        trainer = _trainer(tiny, tmp_path / name, batch_size=4, grad_accum=2, steps=2, strategy=strategy,
                           optimizer="adamw", probe=AlphaSignalProbe(interval=1, window=3))  # fmt: skip
        rows = [trainer.train_step() for _ in range(2)]
        for row in rows:
            assert math.isfinite(row["alpha_signal_slope"]) and math.isfinite(row["alpha_signal_slope_same"])
            assert row["reward"] is None  # nothing learns here
        if name == "greedy":
            assert all(r["alpha_mean"] in (0.0, 1.0) for r in rows)


def test_fused_linear_path_equals_the_logits_path(tiny, tmp_path):
    """trainer.fused_linear=true: the same losses, rewards, probe slopes and weights as the logits path, with the
    learned policy, the paired reward, the probe and a CE term (sequence granularity: per-sequence alphas). SGD:
    Adam's g / sqrt(v) would magnify float-rounding differences of near-zero gradient entries."""
    from arkd.policy import AlphaSignalProbe

    rows, weights = {}, {}
    for fused in (False, True):
        trainer = _trainer(tiny, tmp_path / str(fused), batch_size=4, grad_accum=2, steps=3,
                           strategy=LearnedPolicy(granularity="sequence", seed=0), optimizer="sgd", lr=0.5,
                           max_grad_norm=1.0, reward=PairedReward(interval=1), probe=AlphaSignalProbe(interval=1),
                           fused_linear=fused, ce_weight=0.5)  # fmt: skip
        rows[fused] = [trainer.train_step() for _ in range(3)]
        weights[fused] = {
            n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()
        }
    for a, b in zip(rows[False], rows[True]):
        for key in ("loss", "kd", "ce", "fkl", "rkl", "alpha_mean", "grad_norm", "reward", "alpha_signal_slope"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    for name in weights[False]:
        torch.testing.assert_close(weights[True][name], weights[False][name], rtol=1e-4, atol=1e-6)


def test_fused_linear_refuses_what_it_cannot_do(tiny, tmp_path):
    from arkd.losses import ForwardKLLoss

    with pytest.raises(ValueError, match="use loss=bidirectional_kl"):
        _trainer(tiny, tmp_path / "a", batch_size=2, grad_accum=1, steps=1, loss=ForwardKLLoss(reduction="sum"),
                 fused_linear=True)  # fmt: skip
    with pytest.raises(ValueError, match="reward=same_batch compares"):
        _trainer(tiny, tmp_path / "b", batch_size=2, grad_accum=1, steps=1, reward=SameBatchReward(),
                 fused_linear=True)  # fmt: skip
