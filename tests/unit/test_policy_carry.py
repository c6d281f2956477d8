"""policy.init_from: a learned policy carried across runs (arkd.policy.learned.carried_policy_state, adopt)."""

from __future__ import annotations

import pytest
import torch

from arkd.checkpoint import STATE_FILE, write_checkpoint
from arkd.policy import ConstantAlpha, LearnedPolicy
from arkd.policy.learned import carried_policy_state


def _trained(seed: int = 1) -> LearnedPolicy:
    """A policy whose network, Adam moments, statistics and counters differ from a fresh one's."""
    policy = LearnedPolicy(seed=seed)
    loss = sum((p**2).sum() for p in policy.network.parameters())
    loss.backward()
    policy.optimizer.step()
    policy.norm.update(torch.randn(16, policy.in_features - 3) * 3 + 1)
    policy._num_updates, policy._recent_reward, policy._baseline = 7, 0.25, -0.5
    return policy


def _run_dir(tmp_path, strategy_state, name="run"):
    run = tmp_path / name
    write_checkpoint(run / "checkpoints", 20, model_state=None, state={"strategy": strategy_state}, rng_states=[{}])
    return run


def test_a_carried_policy_is_the_other_runs_policy_with_its_own_seed_and_lr(tmp_path):
    source = _trained()
    run = _run_dir(tmp_path, source.state_dict())
    fresh = LearnedPolicy(seed=2, lr=0.0)
    carried = LearnedPolicy(seed=2, lr=0.0, init_from=str(run))
    for mine, theirs in zip(carried.network.parameters(), source.network.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    moments = [s["exp_avg"] for s in carried.optimizer.state_dict()["state"].values()]
    assert moments and all(
        torch.equal(m, s["exp_avg"]) for m, s in zip(moments, source.optimizer.state_dict()["state"].values())
    )
    assert [g["lr"] for g in carried.optimizer.param_groups] == [0.0]  # its own lr: the frozen control stays frozen
    assert torch.equal(carried._rng_state, fresh._rng_state)  # its own sampling stream
    assert carried.norm.state_dict().keys() == source.norm.state_dict().keys()
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(source.norm.state_dict()[k]))
               for k, v in carried.norm.state_dict().items())  # fmt: skip
    assert carried._num_updates == 7 and carried._baseline == -0.5 and carried._buffer == []
    assert carried.init_from == str(run)
    # the same from the checkpoint directory and from its state.pt
    checkpoint = next((run / "checkpoints").iterdir())
    for where in (checkpoint, checkpoint / STATE_FILE):
        state, expected = carried_policy_state(where), source.state_dict()
        assert state["network"].keys() == expected["network"].keys()
        assert all(torch.equal(state["network"][k], expected["network"][k]) for k in expected["network"])


def test_init_from_refuses_what_it_cannot_carry_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"^policy.init_from: no checkpoint at .*missing; expected a run directory"):
        LearnedPolicy(init_from=str(tmp_path / "missing"))
    constant = _run_dir(tmp_path, ConstantAlpha(alpha=0.5).state_dict(), "constant")
    with pytest.raises(ValueError, match=r"holds no learned policy's state \(a run of policy=learned\)\.$"):
        LearnedPolicy(init_from=str(constant))
    corrupt = _run_dir(tmp_path, _trained().state_dict(), "corrupt")
    state_file = next((corrupt / "checkpoints").iterdir()) / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"fails its manifest .*; expected a complete one\.$"):
        LearnedPolicy(init_from=str(corrupt))
    wider = _run_dir(tmp_path, LearnedPolicy(hidden_size=32).state_dict(), "wider")
    with pytest.raises(ValueError, match=r"^policy.init_from: the carried policy does not fit this one .*features\.$"):
        LearnedPolicy(hidden_size=64, init_from=str(wider))
