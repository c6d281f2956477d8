"""The trainer never reports success it did not have: failed runs raise one sentence and write no final/, best/ is
only written from finite weights, SIGINT/SIGTERM finish the step and checkpoint, validation leaves the training
random streams where they were, and a checkpoint that fails its checksums is refused."""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from _trainers import make_trainer

from arkd import checkpoint as ckpt
from arkd.data import build_dataloader
from arkd.losses import BidirectionalKLLoss
from arkd.models import build_tiny_model
from arkd.policy import ConstantAlpha
from arkd.trainer import RunFailedError, TrainerConfig, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The `tiny` fixture (tests/conftest.py): tokenizer, dataset, collator and teacher of these sizes.
TINY = dict(kind="world", vocab_size=300, corpus_size=400, examples=32, max_prompt_length=96, max_length=128,
            n_embd=16, n_positions=128, eval_teacher=False, with_rows=False)  # fmt: skip


def _trainer(tiny, run_dir, *, steps=4, loss=None, validation=False, **options):
    tokenizer, dataset, collate, teacher = tiny
    student = build_tiny_model(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=128, seed=2)
    loader = build_dataloader(dataset, batch_size=2, collate_fn=collate, seed=0, rank=0, world_size=1, drop_last=True)
    return make_trainer(
        student, copy.deepcopy(teacher), loader, torch.optim.SGD(student.parameters(), lr=0.1), steps=steps,
        output_dir=run_dir, tokenizer=tokenizer, strategy=ConstantAlpha(alpha=0.5),
        loss=loss if loss is not None else BidirectionalKLLoss(reduction="sum"), max_grad_norm=None,
        validation_batches=[collate([dataset[i] for i in range(2)])] if validation else None, **options,
    )  # fmt: skip


class _NaNFrom(torch.nn.Module):
    """A KD loss that is NaN from the given call on (every step skipped from there)."""

    takes_alpha, needs_target_ids, has_schedule = True, False, False  # the KDLoss declarations

    def __init__(self, first: int) -> None:
        super().__init__()
        self.inner, self.first, self.calls = BidirectionalKLLoss(reduction="sum"), first, 0

    def forward(self, s, t, m, alpha=None):
        self.calls += 1
        value = self.inner(s, t, m, alpha=alpha)
        return value * float("nan") if self.calls >= self.first else value


def test_too_many_skipped_steps_fail_the_run_without_final(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, steps=4, loss=_NaNFrom(2), save_interval=1, keep_last=1)
    with pytest.raises(RunFailedError) as info:
        trainer.fit()
    message = str(info.value)
    assert "3 of 4 steps (75%) were skipped" in message and "trainer.max_skipped_fraction=0.1" in message
    assert "final/ was not written" in message and "\n" not in message
    assert not (tmp_path / "final").exists()
    # step 1 was the last healthy checkpoint: rotation (keep_last=1) kept it next to the newest
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [1, 4]
    assert f"the last healthy checkpoint is {tmp_path / 'checkpoints' / 'step_0000001'}" in message


def test_the_threshold_is_a_share_and_one_accepts_every_skip(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, steps=4, loss=_NaNFrom(2), max_skipped_fraction=1.0)
    assert trainer.fit().skipped_steps == 3
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_non_finite_weights_fail_the_run_and_never_become_best(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, steps=3, validation=True, eval_interval=1, best_metric="val_loss")
    original = trainer.train_step

    def diverge():
        row = original()
        if trainer.state.step == 2:
            with torch.no_grad():
                next(trainer.student.parameters()).fill_(float("inf"))
        return row

    trainer.train_step = diverge
    with pytest.raises(RunFailedError, match=r"weights are not finite after step 3.*final/ was not written"):
        trainer.fit()
    assert not (tmp_path / "final").exists()
    assert trainer.state.best_step == 1  # best/ holds the finite step-1 model, never the diverged one
    weights = ckpt.load_weights(tmp_path / "best" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_stops(tiny, tmp_path, signum):
    trainer = _trainer(tiny, tmp_path, steps=6)
    original = trainer.train_step

    def signalled():
        if trainer.state.step == 2:
            os.kill(os.getpid(), signum)  # arrives mid-step: the step still completes
        return original()

    trainer.train_step = signalled
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    assert info.value.signum == signum and trainer.state.step == 3
    assert str(info.value) == (
        f"stopped by {signal.Signals(signum).name} after step 3 of 6; "
        f"checkpoint {tmp_path / 'checkpoints' / 'step_0000003'} written"
    )
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    resumed = _trainer(tiny, tmp_path, steps=6)
    assert resumed.fit(resume_from=ckpt.latest_checkpoint(tmp_path / "checkpoints", verify=True)).step == 6


def test_validation_leaves_the_training_random_streams_where_they_were(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, steps=2, validation=True)

    def reseeding_validate():
        torch.manual_seed(10)  # as sampled generations do (transformers.set_seed)
        torch.rand(5)
        return {"val_loss": 1.0}

    trainer.validate = reseeding_validate
    torch.manual_seed(123)
    state = torch.get_rng_state()
    trainer._validate_and_keep_best(1)
    after = torch.rand(3)
    torch.set_rng_state(state)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)


def test_a_corrupt_checkpoint_is_refused_in_one_sentence(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, steps=2, save_interval=1)
    trainer.fit()
    path = tmp_path / "checkpoints" / "step_0000002"
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"cannot resume from .*state\.pt fails its SHA-256 checksum"):
        _trainer(tiny, tmp_path, steps=4).load_checkpoint(path)


def test_stale_temporaries_are_cleaned_when_training_starts(tiny, tmp_path):
    (tmp_path / "checkpoints" / ".tmp_step_0000002_999").mkdir(parents=True)
    (tmp_path / ".tmp_best").mkdir()
    _trainer(tiny, tmp_path, steps=1).fit()
    assert not (tmp_path / "checkpoints" / ".tmp_step_0000002_999").exists()
    assert not (tmp_path / ".tmp_best").exists()


def test_a_second_signal_stops_at_once(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, steps=6)
    original = trainer.train_step

    def signalled_twice():
        if trainer.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return original()

    trainer.train_step = signalled_twice
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.step == 1 and not (tmp_path / "checkpoints").exists()


def test_a_failing_final_write_keeps_the_previous_final(tiny, tmp_path, monkeypatch):
    import errno

    from arkd.errors import OutputError

    trainer = _trainer(tiny, tmp_path, steps=1)
    trainer.fit()
    before = ckpt.load_weights(tmp_path / "final" / "model.safetensors")
    model = trainer.accelerator.unwrap_model(trainer.student)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full)
    with pytest.raises(OutputError, match=r"cannot write .*final: no space left on the device; the previous final/"):
        trainer._save_model("final")
    after = ckpt.load_weights(tmp_path / "final" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / ".tmp_final").exists()


def test_best_mode_follows_the_known_metric_or_must_be_given():
    assert TrainerConfig(max_steps=1, best_metric="val_loss").best_mode == "min"
    assert TrainerConfig(max_steps=1).best_mode == "max"
    with pytest.raises(ValueError, match="trainer.best_mode is needed for best_metric='val_bleu'"):
        TrainerConfig(max_steps=1, best_metric="val_bleu")
    with pytest.raises(ValueError, match="'max' or 'min'"):
        TrainerConfig(max_steps=1, best_mode="down")
