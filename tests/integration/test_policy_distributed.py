"""The policy under torch.distributed: two CPU processes, gloo backend, on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from arkd.policy import GreedySearch, LearnedPolicy, StepContext, compute_features

WORLD = 2
STEPS = 4


def local_batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each process sees different data, with a different number of counted tokens."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    b = 2 + rank
    s, t = 2 * torch.randn(b, 5, 7, generator=g), 2 * torch.randn(b, 5, 7, generator=g)
    mask = torch.rand(b, 5, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


def flat_params(policy: LearnedPolicy) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in policy.network.parameters()])


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        result: dict = {"features": compute_features(*local_batch(rank, 0)).batch()}
        for granularity in ("batch", "sequence", "token"):
            # Different seeds on purpose: construction must broadcast rank 0's parameters.
            policy = LearnedPolicy(granularity=granularity, lr=1e-2, seed=rank, apply="sample")
            initial = flat_params(policy)
            alphas = []
            for step in range(STEPS):
                paired = step % 2 == 0  # alternate the paired credit and the legacy self-credit
                ctx = StepContext(
                    features=compute_features(*local_batch(rank, step)),
                    progress=step / STEPS,
                    step=step,
                    candidates=2 if paired else 1,
                )
                alpha = policy.select(ctx)
                alphas.append(alpha.clone())
                if paired:  # the trainer's paired rewards are reduced over processes: the same everywhere
                    policy.update(torch.tensor([0.01 * step, -0.02]))
                else:
                    policy.update(-((alpha - 0.2 - 0.3 * rank) ** 2))  # rank-dependent rewards
            result[granularity] = {
                "initial": initial,
                "final": flat_params(policy),
                "alphas": alphas,
                "norm_mean": policy.norm.mean,
                "scale": policy.state_dict()["scale"]["value"],
            }
        greedy = GreedySearch(candidates=[0.0, 0.25, 0.5, 0.75, 1.0])
        ctx = StepContext(
            features=compute_features(*local_batch(rank, 0)), lookahead=lambda a: -((a - 0.5 * rank) ** 2)
        )
        result["greedy"] = float(greedy.select(ctx))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalisation: with torch 2.13's gloo, a worker that has destroyed its group still
    # aborts now and then ("terminate called without an active exception", SIGABRT) while the interpreter tears
    # down, after its result is written (1 run in ~10 here). The results are checked by the parent, not the exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_policy_is_identical_across_two_gloo_processes(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))

    # Feature means are token-weighted over both processes' counted tokens.
    stats = [compute_features(*local_batch(rank, 0)) for rank in range(WORLD)]
    tokens = torch.cat([f.token()[f.mask] for f in stats])
    torch.testing.assert_close(r0["features"], tokens.mean(0))
    torch.testing.assert_close(r1["features"], r0["features"])

    for granularity in ("batch", "sequence", "token"):
        a, b = r0[granularity], r1[granularity]
        torch.testing.assert_close(a["initial"], b["initial"])  # broadcast at construction
        torch.testing.assert_close(a["final"], b["final"])  # averaged gradients keep them identical
        assert not torch.allclose(a["initial"], a["final"])  # and they did learn
        torch.testing.assert_close(a["norm_mean"], b["norm_mean"])
        assert a["scale"] == b["scale"]
    for alpha0, alpha1 in zip(r0["batch"]["alphas"], r1["batch"]["alphas"]):
        assert alpha0.shape == () and torch.equal(alpha0, alpha1)  # one alpha for the global batch

    # Greedy averages the look-ahead rewards over processes: -(a^2 + (a - 0.5)^2) / 2 peaks at 0.25.
    assert r0["greedy"] == r1["greedy"] == 0.25
