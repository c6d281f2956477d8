"""Rollout sources (arkd.rollout): generated batches against hand-built ones, GKD's coin at lmbda 0 / 1, the SeqKD
cache (reused, invalidated when the teacher changes), DistiLLM's schedule and replay buffer across a save and load,
MiniLLM's mixture sampler against transformers' sampling, and the on_policy feature (old policy states load)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from arkd.data import TrainingCollator
from arkd.models import build_tiny_model
from arkd.rollout import (
    DatasetResponses,
    DistiLLMRollout,
    GKDRollout,
    MiniLLMMixRollout,
    SeqKDRollout,
    prompt_lengths,
    sample_mixture,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = PAD = 0
TOKENIZER = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def _dataset_batch(rows):
    return TrainingCollator(PAD)([{"prompt_ids": p, "response_ids": r} for p, r in rows])


class _Scripted(torch.nn.Module):
    """A 'student' whose generate() returns scripted new tokens and records the prompts it was given."""

    def __init__(self, new_tokens):
        super().__init__()
        self.new_tokens = torch.tensor(new_tokens)
        self.calls = []

    def generate(self, input_ids, attention_mask, generation_config, logits_processor=()):
        self.calls.append((input_ids.clone(), attention_mask.clone(), list(logits_processor)))
        return torch.cat([input_ids, self.new_tokens[: input_ids.shape[0]]], dim=1)


def _gkd(lmbda, student, max_length=None, seed=0):
    source = GKDRollout(lmbda=lmbda, temperature=0.9, max_new_tokens=4)
    source.configure(tokenizer=TOKENIZER, seed=seed, max_length=max_length)
    source.bind(student=student, teacher=None, device=torch.device("cpu"))
    return source


def test_generated_batch_masks_match_a_hand_built_case():
    # prompts [5, 6, 7] and [9] (dataset responses [8, EOS] and [10, 11, EOS]); the student writes 3 4 EOS and 2 EOS
    batch = _dataset_batch([([5, 6, 7], [8, EOS]), ([9], [10, 11, EOS])])
    assert prompt_lengths(batch) == [3, 1]
    student = _Scripted([[3, 4, EOS, PAD], [2, EOS, PAD, PAD]])
    out = _gkd(1.0, student).draw(batch, step=1, max_steps=10)
    prompts, mask, _ = student.calls[0]
    assert prompts.tolist() == [[5, 6, 7], [PAD, PAD, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]  # left-padded
    warpers = student.calls[0][2]  # sampled at temperature 0.9 by the per-row sampler, no top-k / top-p filter
    assert [type(w).__name__ for w in warpers] == ["TemperatureLogitsWarper", "_RowSampler"]
    assert warpers[0].temperature == 0.9
    assert out["input_ids"].tolist() == [[5, 6, 7, 3, 4, EOS], [9, 2, EOS, PAD, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    F, T = False, True
    assert out["loss_mask"].tolist() == [[F, F, F, T, T, T], [F, T, T, F, F, F]]  # generated tokens + EOS counted
    assert out["labels"].tolist() == [[-100, -100, -100, 3, 4, EOS], [-100, 2, EOS, -100, -100, -100]]
    assert out["on_policy"].tolist() == [1.0, 1.0]


def test_a_response_without_eos_and_one_over_max_length_are_cut_without_eos():
    batch = _dataset_batch([([5, 6, 7], [8, EOS]), ([9], [10, EOS])])
    student = _Scripted([[3, 4, 5, 6], [2, 3, 4, EOS]])  # row 0 never ends; row 1 ends at its 4th token
    out = _gkd(1.0, student, max_length=5).draw(batch, step=1, max_steps=10)
    # row 0: prompt 3 + at most 2 tokens; row 1: prompt 1 + 4 tokens (2 3 4 EOS) fits exactly
    assert out["input_ids"].tolist() == [[5, 6, 7, 3, 4], [9, 2, 3, 4, EOS]]
    assert out["loss_mask"].sum(dim=1).tolist() == [2, 4]


def test_lmbda_zero_never_generates_and_lmbda_one_never_uses_the_dataset():
    batch = _dataset_batch([([5, 6], [8, EOS]), ([9], [10, EOS])])
    never, always = _Scripted([[3, EOS]] * 2), _Scripted([[3, EOS]] * 2)
    zero, one = _gkd(0.0, never), _gkd(1.0, always)
    for step in range(1, 51):
        kept = zero.draw(batch, step=step, max_steps=50)
        for key in batch:
            assert torch.equal(kept[key], batch[key])
        assert kept["on_policy"].tolist() == [0.0, 0.0]
        made = one.draw(batch, step=step, max_steps=50)
        assert made["on_policy"].tolist() == [1.0, 1.0] and made["input_ids"][0, 2].item() == 3
    assert not never.calls and len(always.calls) == 50


def test_the_gkd_coin_is_lmbda_on_average_and_the_same_on_every_process():
    batch = _dataset_batch([([5, 6], [8, EOS])])
    ranks = []
    for rank in (0, 1):
        source = _gkd(0.5, _Scripted([[3, EOS]]), seed=7)
        source.bind(student=source.student, teacher=None, device=torch.device("cpu"), rank=rank, world_size=2)
        ranks.append([float(source.draw(batch, step=1, max_steps=1)["on_policy"][0]) for _ in range(400)])
    assert ranks[0] == ranks[1]
    assert 0.42 < sum(ranks[0]) / 400 < 0.58


def test_preview_is_what_the_next_draw_returns_and_is_kept_in_the_state():
    batch = _dataset_batch([([5, 6], [8, EOS])])
    source = _gkd(1.0, _Scripted([[3, EOS]]))
    ahead = source.preview(batch, step=2, max_steps=4)
    state = source.state_dict()
    assert source.draw(batch, step=2, max_steps=4) is ahead and len(source.student.calls) == 1
    resumed = _gkd(1.0, _Scripted([[4, EOS]]))  # would generate something else
    resumed.load_state_dict(state)
    again = resumed.draw(batch, step=2, max_steps=4)
    assert torch.equal(again["input_ids"], ahead["input_ids"]) and not resumed.student.calls


def test_dataset_responses_pass_the_batch_through():
    batch = _dataset_batch([([5, 6], [8, EOS])])
    out = DatasetResponses().draw(batch, step=1, max_steps=1)
    assert all(out[k] is batch[k] for k in batch) and out["on_policy"].tolist() == [0.0]


def _tiny(seed, vocab=40):
    return build_tiny_model(vocab, n_layer=1, n_embd=16, n_head=2, n_positions=64, seed=seed).eval()


def test_mixture_sampling_at_a_equal_0_and_1_is_the_protocol_sampling_of_student_and_teacher():
    from transformers import GenerationConfig, LogitsProcessorList

    from arkd.evaluation.generation import DecodingConfig, _sampling_processors, row_generator

    student, teacher = _tiny(1), _tiny(2)
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [9, 10, 11, 12, 13]])
    mask = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    config = GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    for weight, model in ((0.0, student), (1.0, teacher)):
        ours = sample_mixture(
            student, teacher, ids, mask, teacher_weight=weight, temperature=1.0, top_p=1.0, max_new_tokens=6,
            eos_id=EOS, pad_id=PAD, generators=[row_generator(3, r) for r in range(2)],
        )  # fmt: skip
        processors = _sampling_processors(DecodingConfig(top_k=0), [row_generator(3, r) for r in range(2)])
        theirs = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
        )[:, 5:]
        assert ours.shape[1] >= 1 and torch.equal(ours, theirs[:, : ours.shape[1]]), weight


def test_mixture_rollout_marks_the_student_share():
    batch = _dataset_batch([([5, 6], [8, EOS]), ([9], [10, EOS])])
    source = MiniLLMMixRollout(teacher_weight=0.2, max_new_tokens=5)
    source.configure(tokenizer=TOKENIZER, seed=0, max_length=32)
    source.bind(student=_tiny(1), teacher=_tiny(2), device=torch.device("cpu"))
    out = source.draw(batch, step=1, max_steps=1)
    assert out["on_policy"].tolist() == pytest.approx([0.8, 0.8])
    assert out["input_ids"][:, :1].tolist() == [[5], [9]] and out["loss_mask"][0, :2].tolist() == [False, False]


def _seqkd(tmp_path, teacher, prompts):
    source = SeqKDRollout(max_new_tokens=5, batch_size=2)
    source.configure(tokenizer=TOKENIZER, seed=0, max_length=32, cache_dir=tmp_path, train_prompts=prompts)
    source.bind(student=None, teacher=teacher, device=torch.device("cpu"))
    return source


def test_seqkd_cache_is_reused_and_invalidated_when_the_teacher_changes(tmp_path, monkeypatch):
    prompts = [[5, 6, 7], [9], [5, 6, 7], [11, 12]]
    teacher = _tiny(2)
    first = _seqkd(tmp_path, teacher, prompts)
    assert first.reused is False and first.cache_path.is_file() and len(first.responses) == 3
    batch = _dataset_batch([([9], [10, EOS]), ([5, 6, 7], [8, EOS])])
    out = first.draw(batch, step=1, max_steps=1)
    assert out["input_ids"][0, 1 : 1 + len(first.responses[(9,)])].tolist() == first.responses[(9,)]
    assert out["on_policy"].tolist() == [0.0, 0.0]

    def no_generation(self):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(SeqKDRollout, "_prepare", no_generation)
    second = _seqkd(tmp_path, teacher, prompts)
    assert second.reused is True and second.cache_path == first.cache_path and second.responses == first.responses
    monkeypatch.undo()

    changed = _tiny(2)
    with torch.no_grad():
        changed.lm_head.weight[3, 0] += 0.5  # one weight of the teacher differs
    third = _seqkd(tmp_path, changed, prompts)
    assert third.reused is False and third.cache_path != first.cache_path


def test_seqkd_refuses_a_prompt_it_has_no_generation_for(tmp_path):
    source = _seqkd(tmp_path, _tiny(2), [[5, 6]])
    with pytest.raises(ValueError, match="do not cover"):
        source.draw(_dataset_batch([([7], [8, EOS])]), step=1, max_steps=1)


def test_distillm_raises_its_probability_as_the_paper_does():
    source = DistiLLMRollout()
    assert source.probability == 0.0
    for loss, expected in ((2.0, 0.0), (2.05, 0.0), (2.1, 0.1), (2.15, 0.1), (2.2, 0.2), (1.0, 0.2)):
        source.observe_validation({"val_loss": loss})
        assert source.probability == pytest.approx(expected)
    assert source.reference_loss == pytest.approx(2.2)
    for _ in range(20):
        source.reference_loss = None
        source.observe_validation({"val_loss": 0.0})
        source.observe_validation({"val_loss": 1.0})
    assert source.probability == 1.0


def _distillm(capacity=3):
    source = DistiLLMRollout(init_probability=1.0, capacity=capacity, max_new_tokens=3)
    source.configure(tokenizer=TOKENIZER, seed=0, max_length=32)
    source.bind(student=_tiny(1), teacher=None, device=torch.device("cpu"))
    return source


def test_distillm_fills_its_buffer_then_replays_and_survives_a_save_and_load():
    batch = _dataset_batch([([5, 6], [8, EOS]), ([9], [10, EOS])])
    source = _distillm()
    source.draw(batch, step=1, max_steps=10)
    source.draw(batch, step=2, max_steps=10)
    assert len(source.buffer) == 3  # capacity 3: the oldest of the four sequences dropped
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    resumed = _distillm()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(3, 10):  # late steps: s = p * (1 - step / 10) is small, so most batches are replays
        a, b = source.draw(batch, step=step, max_steps=10), resumed.draw(batch, step=step, max_steps=10)
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["on_policy"].tolist() == [1.0, 1.0]
    assert [torch.equal(x, y) for (x, _), (y, _) in zip(source.buffer, resumed.buffer)] == [True] * 3
    assert resumed.probability == 1.0


def test_rollout_options_are_checked_in_one_sentence():
    with pytest.raises(ValueError, match=r"rollout.lmbda must be in \[0, 1\]"):
        GKDRollout(lmbda=1.5)
    with pytest.raises(ValueError, match="rollout.replay_ratio"):
        DistiLLMRollout(replay_ratio="sometimes")
    with pytest.raises(ValueError, match="rollout.temperature"):
        MiniLLMMixRollout(temperature=0)


def test_the_on_policy_feature_is_the_batch_share_on_counted_tokens():
    from arkd.policy.features import FEATURE_NAMES, compute_features

    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[True, True, False, False], [False, True, True, True]])
    f = compute_features(s, t, mask, on_policy=torch.tensor([1.0, 0.8]))
    torch.testing.assert_close(f.on_policy, torch.tensor([[1, 1, 0, 0], [0, 0.8, 0.8, 0.8]]))
    assert float(f.batch()[FEATURE_NAMES.index("on_policy")]) == pytest.approx((2 + 2.4) / 5)
    assert compute_features(s, t, mask).on_policy.abs().sum() == 0


def test_a_policy_state_from_before_the_on_policy_feature_loads_and_acts_the_same():
    from arkd.policy.features import FEATURE_NAMES
    from arkd.policy.learned import ON_POLICY_COLUMN, LearnedPolicy

    policy = LearnedPolicy(seed=3)
    with torch.no_grad():
        policy.network.zero_weight.zero_()
    state = policy.state_dict()
    old = dict(state)  # what an arkd before the feature wrote: no zero_weight, 8 normalised statistics
    old["network"] = {k: v for k, v in state["network"].items() if k != "zero_weight"}
    groups = [dict(g) for g in state["optimizer"]["param_groups"]]
    groups[-1]["params"] = groups[-1]["params"][:-1]
    old["optimizer"] = {"state": {}, "param_groups": groups}
    keep = [i for i in range(len(FEATURE_NAMES)) if i != ON_POLICY_COLUMN]
    old["norm"] = {**state["norm"], "mean": state["norm"]["mean"][keep], "var": state["norm"]["var"][keep]}
    fresh = LearnedPolicy(seed=99)
    fresh.load_state_dict(old)
    x = torch.randn(5, policy.in_features)
    x[:, ON_POLICY_COLUMN] = 0.0
    torch.testing.assert_close(fresh.network(x).mean, policy.network(x).mean, rtol=0, atol=0)
    assert fresh.network.zero_weight.abs().sum() == 0 and fresh.norm.mean.numel() == len(FEATURE_NAMES)


def test_the_report_says_generation_s_share_of_the_training_time():
    from arkd.report import report_markdown

    score = {"mean": 20.0, "std": None, "per_seed": {"10": 20.0}}
    report = {
        "experiment": "tiny",
        "test_rows": 8,
        "decoding": {"do_sample": False, "max_new_tokens": 8, "no_repeat_ngram_size": 0},
        "seeds": [10],
        "results": {"student_after": {"rougeL": score, "exact_match": score}},
        "student_after": "final",
        "student_after_step": 6,
        "training": {
            "steps": 6,
            "train_seconds": 10.0,
            "rollout": "gkd",
            "rollout_seconds": 2.5,
            "rollout_share": 0.25,
        },
    }
    assert "Rollout `gkd`: generation took 2.5 s, 25.0% of the training time." in report_markdown(report)
