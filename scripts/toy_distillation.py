"""Toy distillation: which alpha strategy aligns a free student with a heavy-tailed teacher fastest?

Fixed teacher distributions (Zipf-like, one per "context", over a small vocabulary) and a student that is a free
logit table, trained by SGD on ``alpha * FKL + (1 - alpha) * RKL`` over minibatches of contexts for a fixed number of
steps. The score is the final alignment ``D = (FKL + RKL) / 2`` over all contexts (lower is better). Strategies: FKL
only, RKL only, constant 0.5, AKL's head/tail rule, the greedy one-step search, and the learned ARKD policy (batch and
token granularity) trained by REINFORCE from the same-batch improvement reward.

    python scripts/toy_distillation.py --seeds 0 1 2 3 4 --plot toy_alpha.png

Prints one row per strategy (mean and std of the final D over seeds, and the mean alpha over training).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from arkd.losses.functional import bidirectional_kl
from arkd.policy import (
    AKLHeuristic,
    AlphaStrategy,
    ConstantAlpha,
    GreedySearch,
    LearnedPolicy,
    StepContext,
    compute_features,
)
from arkd.reward import alignment, linear_lookahead, same_batch_improvement


@dataclass
class ToyConfig:
    """Sizes of the toy problem (defaults: about a second per strategy and seed on one CPU core)."""

    contexts: int = 256
    vocab: int = 64
    batch: int = 4
    seq_len: int = 16
    steps: int = 300
    lr: float = 8.0
    zipf_low: float = 0.8
    zipf_high: float = 1.6
    init_scale: float = 2.0


@dataclass
class ToyResult:
    final_d: float
    final_fkl: float
    final_rkl: float
    alphas: list[float] = field(default_factory=list)


def make_problem(cfg: ToyConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits ``[C, V]`` (Zipf-like: ``-s log rank`` with s per context, random token order, small noise)
    and the student's initial logits ``[C, V]``."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(cfg.vocab, generator=g) for _ in range(cfg.contexts)]).float() + 1
    s = cfg.zipf_low + (cfg.zipf_high - cfg.zipf_low) * torch.rand(cfg.contexts, 1, generator=g)
    teacher = -s * ranks.log() + 0.3 * torch.randn(cfg.contexts, cfg.vocab, generator=g)
    student = cfg.init_scale * torch.randn(cfg.contexts, cfg.vocab, generator=g)
    return teacher, student


def _kl_parts(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    log_q, log_p = student.log_softmax(-1), teacher.log_softmax(-1)
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    return float(fkl), float(rkl)


def run(strategy: AlphaStrategy, cfg: ToyConfig, seed: int, reward_granularity: str | None = None) -> ToyResult:
    """Train the free student with ``strategy`` choosing alpha every step; returns the final alignment.

    Args:
        strategy: any ``AlphaStrategy``; if it ``needs_reward``, it gets the same-batch improvement every step at
            ``reward_granularity`` (default: the strategy's granularity).
        cfg: problem sizes.
        seed: seeds the problem and the minibatch order.
    """
    teacher, init = make_problem(cfg, seed)
    theta = init.clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=cfg.lr)
    g = torch.Generator().manual_seed(seed + 1000)
    n = cfg.batch * cfg.seq_len
    alphas = []
    for step in range(cfg.steps):
        idx = torch.randperm(cfg.contexts, generator=g)[:n].view(cfg.batch, cfg.seq_len)
        t_logits = teacher[idx]
        s_logits = theta[idx]
        mask = torch.ones(cfg.batch, cfg.seq_len, dtype=torch.bool)
        features = compute_features(s_logits, t_logits, mask, **strategy.feature_options)
        lookahead = None
        if isinstance(strategy, GreedySearch):
            lookahead = _lookahead(theta, idx, t_logits, mask, cfg.lr)
        ctx = StepContext(features=features, progress=step / max(cfg.steps - 1, 1), step=step, lookahead=lookahead)
        alpha = strategy.select(ctx)
        alphas.append(float(alpha.float().mean()))
        loss = bidirectional_kl(s_logits, t_logits, mask, alpha=alpha, reduction="sum") / cfg.batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        if strategy.needs_reward:
            with torch.no_grad():
                reward = same_batch_improvement(
                    s_logits, theta[idx], t_logits, mask, granularity=reward_granularity or strategy.granularity
                )
            strategy.update(reward)
    with torch.no_grad():
        fkl, rkl = _kl_parts(theta, teacher)
    return ToyResult(final_d=0.5 * (fkl + rkl), final_fkl=fkl, final_rkl=rkl, alphas=alphas)


def _lookahead(
    theta: torch.Tensor, idx: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor, lr: float
) -> Callable[[float], float]:
    """One-step look-ahead on the current batch from two backward passes (``linear_lookahead``)."""
    rows = theta.detach()[idx].clone().requires_grad_(True)
    grads = {}
    for name, a in (("fkl", 1.0), ("rkl", 0.0)):
        loss = bidirectional_kl(rows, t_logits, mask, alpha=a, reduction="sum") / idx.shape[0]
        (grads[name],) = torch.autograd.grad(loss, rows)
    # Rows of theta picked twice in a batch would add their gradients; randperm never repeats a context.
    d_before = alignment(rows.detach(), t_logits, mask)

    def reward_fn(params: dict[str, torch.Tensor]) -> float:
        return float(d_before - alignment(params["rows"], t_logits, mask))

    return linear_lookahead(
        {"rows": rows.detach()}, {"rows": grads["fkl"]}, {"rows": grads["rkl"]}, lr=lr, reward_fn=reward_fn
    )


def strategies(cfg: ToyConfig, seed: int) -> dict[str, Callable[[], AlphaStrategy]]:
    """The compared strategies, built fresh for every seed."""
    learned = dict(hidden_size=32, lr=1e-2, entropy_coef=1e-3, baseline_momentum=0.9, seed=seed)
    return {
        "FKL only (alpha=1)": lambda: ConstantAlpha(alpha=1.0),
        "RKL only (alpha=0)": lambda: ConstantAlpha(alpha=0.0),
        "constant 0.5": lambda: ConstantAlpha(alpha=0.5),
        "akl (mu=0.5)": lambda: AKLHeuristic(mu=0.5),
        "greedy (5 candidates)": lambda: GreedySearch(candidates=[0.0, 0.25, 0.5, 0.75, 1.0]),
        "learned, batch": lambda: LearnedPolicy(granularity="batch", **learned),
        "learned, token": lambda: LearnedPolicy(granularity="token", **learned),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=ToyConfig.steps)
    parser.add_argument("--plot", default=None, help="write the alpha trajectories (seed 0) to this PNG")
    args = parser.parse_args()
    cfg = ToyConfig(steps=args.steps)
    torch.set_num_threads(1)
    names = list(strategies(cfg, 0))
    results: dict[str, list[ToyResult]] = {name: [] for name in names}
    for seed in tqdm(args.seeds, desc="seeds"):
        for name, build in strategies(cfg, seed).items():
            results[name].append(run(build(), cfg, seed))
    init_d = []
    for seed in args.seeds:
        teacher, student = make_problem(cfg, seed)
        fkl, rkl = _kl_parts(student, teacher)
        init_d.append(0.5 * (fkl + rkl))
    print(f"toy distillation: {cfg}")
    print(
        f"seeds {args.seeds}; initial D = {sum(init_d) / len(init_d):.4f}; final D = (FKL + RKL) / 2, lower is better"
    )
    print(f"{'strategy':<24} {'final D mean':>12} {'std':>8} {'FKL':>8} {'RKL':>8} {'mean alpha':>10}  per seed")
    for name in names:
        ds = [r.final_d for r in results[name]]
        mean = sum(ds) / len(ds)
        std = math.sqrt(sum((d - mean) ** 2 for d in ds) / max(len(ds) - 1, 1))
        fkl = sum(r.final_fkl for r in results[name]) / len(ds)
        rkl = sum(r.final_rkl for r in results[name]) / len(ds)
        alpha = sum(sum(r.alphas) / len(r.alphas) for r in results[name]) / len(ds)
        per_seed = " ".join(f"{d:.4f}" for d in ds)
        print(f"{name:<24} {mean:>12.4f} {std:>8.4f} {fkl:>8.4f} {rkl:>8.4f} {alpha:>10.3f}  {per_seed}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            ax.plot(results[name][0].alphas, label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("alpha (mean over the batch)")
        ax.set_title(f"toy distillation, seed {args.seeds[0]}: alpha trajectories")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
