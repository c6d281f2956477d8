"""Teacher-student statistics the alpha strategies decide from, and their running normalisation.

``compute_features`` reads the logits the training step already has (no extra forward), detached, in fp32, and
returns per-token statistics with batch / sequence / token views. At position t, with p the teacher's and q the
student's next-token distribution (softmax of logits / temperature):

- ``fkl``  = KL(p || q) = sum_v p_v (log p_v - log q_v)
- ``rkl``  = KL(q || p) = sum_v q_v (log q_v - log p_v)
- ``teacher_entropy`` = H(p), ``student_entropy`` = H(q)
- ``head_gap`` / ``tail_gap``: AKL's gaps (Wu et al. 2025). Sort p descending; the head is the prefix whose
  cumulative teacher mass is <= mu (the top-1 token always belongs to it); g_head = sum_{v in head} |p_v - q_v|,
  g_tail = sum_{v not in head} |p_v - q_v|.
- ``top1_agreement`` = 1[argmax p = argmax q], ``teacher_confidence`` = max_v p_v
- ``on_policy``: the student's share of the distribution the token's sequence was sampled from (1: the student's
  own sample, 0: a dataset or teacher response, ``1 - a`` for MiniLLM's mixture; ``arkd.rollout``), the same on
  every counted token of a sequence; 0 when the batch carries no ``on_policy``.
- ``todi_alpha`` = sum_v p_v sigmoid(log p_v - log q_v): the teacher-weighted mean of ToDi's per-vocabulary weights,
  a token-level summary used by ``ToDiHeuristic`` (not an input of the policy network).

The network also sees training progress, the recent reward and the loss trend; those come from the strategy's own
history (see ``arkd.policy.strategies.LearnedPolicy``), not from the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from arkd import distributed as pdist
from arkd.losses.topk import TopKTeacher, coarse_log_probs

#: Per-token statistics fed to the policy network, in this order.
FEATURE_NAMES: tuple[str, ...] = (
    "fkl",
    "rkl",
    "teacher_entropy",
    "student_entropy",
    "head_gap",
    "tail_gap",
    "top1_agreement",
    "teacher_confidence",
    "on_policy",
)


@dataclass
class Features:
    """Per-token teacher-student statistics of one batch, with batch / sequence / token views.

    Every statistic is a float32 tensor ``[B, T]`` holding 0 where ``mask`` is False.

    Attributes:
        fkl, rkl, teacher_entropy, student_entropy, head_gap, tail_gap, top1_agreement, teacher_confidence,
        on_policy, todi_alpha: ``[B, T]`` per-token statistics (see the module docstring).
        mask: ``[B, T]`` bool, True where the token is counted.
        temperature: the temperature the distributions were computed at.
        mu: AKL's head mass threshold used for ``head_gap`` / ``tail_gap``.
    """

    fkl: torch.Tensor
    rkl: torch.Tensor
    teacher_entropy: torch.Tensor
    student_entropy: torch.Tensor
    head_gap: torch.Tensor
    tail_gap: torch.Tensor
    top1_agreement: torch.Tensor
    teacher_confidence: torch.Tensor
    on_policy: torch.Tensor
    todi_alpha: torch.Tensor
    mask: torch.Tensor
    temperature: float = 1.0
    mu: float = 0.5
    _batch_cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> torch.Size:
        """``[B, T]``."""
        return self.mask.shape

    @property
    def device(self) -> torch.device:
        return self.mask.device

    def token(self) -> torch.Tensor:
        """All ``FEATURE_NAMES`` stacked per token: ``[B, T, F]`` (zeros where not counted)."""
        return torch.stack([getattr(self, n) for n in FEATURE_NAMES], dim=-1)

    def sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean of every feature per sequence.

        Returns:
            ``(values [B, F], counts [B])``; a sequence with no counted token has values 0 and count 0.
        """
        counts = self.mask.sum(dim=1)
        sums = self.token().sum(dim=1)
        return sums / counts.clamp_min(1).unsqueeze(-1).to(sums.dtype), counts

    def batch(self) -> torch.Tensor:
        """Token-weighted mean of every feature over the counted tokens of all processes: ``[F]``.

        Under torch.distributed this is a collective (sums and counts are all-reduced), so every process must call
        it; the result is cached on the object, later calls are free. With no counted token anywhere it is 0.
        """
        if self._batch_cache is None:
            sums = self.token().sum(dim=(0, 1))
            count = self.mask.sum().to(sums.dtype).reshape(1)
            total = pdist.all_reduce_sum(torch.cat([sums, count]))
            self._batch_cache = total[:-1] / total[-1].clamp_min(1)
        return self._batch_cache

    def batch_mean(self, name: str) -> float:
        """Batch view of one feature as a float (a collective the first time, see ``batch``)."""
        return float(self.batch()[FEATURE_NAMES.index(name)])

    @property
    def fkl_mean(self) -> float:
        """Mean forward KL over the counted tokens of all processes (for logging)."""
        return self.batch_mean("fkl")

    @property
    def rkl_mean(self) -> float:
        """Mean reverse KL over the counted tokens of all processes (for logging)."""
        return self.batch_mean("rkl")

    def akl_alpha(self) -> torch.Tensor:
        """AKL's per-token weight of FKL, g_head / (g_head + g_tail): ``[B, T]`` (0.5 where both gaps are 0)."""
        total = self.head_gap + self.tail_gap
        return torch.where(total > 0, self.head_gap / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)


def _check_inputs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"compute_features: student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"compute_features: teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if mask is not None and mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"compute_features: mask shape {tuple(mask.shape)} must be [B, T] = {tuple(student_logits.shape[:2])}"
        )


#: Logit entries per chunk of rows (fp32: 16 MiB per copy; a chunk's statistics hold about eight copies).
CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def compute_features(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    mu: float = 0.5,
    chunk_size: int | None = None,
    on_policy: torch.Tensor | None = None,
) -> Features:
    """Per-token teacher-student statistics from logits the step already has.

    Only the counted rows are processed (prompt and padding positions cost nothing), in fp32, without autograd, a
    chunk of rows at a time, so the transient memory is bounded by one chunk (about eight fp32 copies of
    ``chunk_size x V``), not by the number of tokens. AKL's head needs the teacher's probabilities in descending order
    only up to the mass ``mu``: a top-k (k = 64, doubled for the rows whose head reaches past it) replaces the
    full-vocabulary sort, with the same head and tail gaps. ``-inf`` logits (padded vocabulary, banned tokens)
    contribute 0 where the probability is 0.

    Args:
        student_logits: ``[B, T, V]`` student logits (any float dtype; detached here).
        teacher_logits: ``[B, T, V]`` teacher logits.
        mask: ``[B, T]`` bool, True = counted; None counts every position.
        temperature: softmax temperature of both distributions (> 0).
        mu: AKL's head mass threshold in (0, 1].
        chunk_size: rows per chunk (None: ``CHUNK_ELEMENTS // V``, at least 1).
        on_policy: ``[B]`` the student's share of each sequence's sampling distribution (the batch's
            ``on_policy``, ``arkd.rollout``); None: 0.

    Returns:
        A ``Features`` with ``[B, T]`` statistics (0 where not counted).
    """
    if isinstance(teacher_logits, TopKTeacher):
        return compute_features_topk(
            student_logits, teacher_logits, mask, temperature=temperature, mu=mu, chunk_size=chunk_size,
            on_policy=on_policy,
        )  # fmt: skip
    _check_inputs(student_logits, teacher_logits, mask)
    if temperature <= 0:
        raise ValueError(f"compute_features: temperature must be > 0, got {temperature}")
    if not 0 < mu <= 1:
        raise ValueError(f"compute_features: mu must be in (0, 1], got {mu}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"compute_features: chunk_size must be >= 1, got {chunk_size}")
    s_flat = student_logits.detach().reshape(-1, student_logits.shape[-1])
    rows_logits = lambda rows: s_flat.index_select(0, rows).float()  # noqa: E731
    return _chunked(rows_logits, teacher_logits, mask, temperature, mu, chunk_size, on_policy=on_policy)


@torch.no_grad()
def compute_features_from_hidden(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mu: float = 0.5,
    chunk_size: int | None = None,
    on_policy: torch.Tensor | None = None,
) -> Features:
    """:func:`compute_features` from the student's final hidden states ``[B, T, H]`` and output weight ``[V, H]``
    (and bias): each chunk's student logits ``h W^T + b`` are built in fp32 and dropped, so the ``[B, T, V]`` student
    logits never exist (the memory-light ``trainer.fused_linear`` path). The same values as ``compute_features`` of
    the full logits."""
    if student_hidden.dim() != 3 or student_hidden.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"compute_features_from_hidden: student_hidden {tuple(student_hidden.shape)} must be [B, T, H] with the "
            f"teacher logits' [B, T] = {tuple(teacher_logits.shape[:2])}"
        )
    if student_weight.shape != (teacher_logits.shape[-1], student_hidden.shape[-1]):
        raise ValueError(
            f"compute_features_from_hidden: student_weight {tuple(student_weight.shape)} must be [V, H] = "
            f"{(teacher_logits.shape[-1], student_hidden.shape[-1])}"
        )
    h_flat = student_hidden.detach().reshape(-1, student_hidden.shape[-1])
    weight = student_weight.detach().float()
    b = None if bias is None else bias.detach().float()

    def rows_logits(rows: torch.Tensor) -> torch.Tensor:
        return F.linear(h_flat.index_select(0, rows).float(), weight, b)

    shape = (*student_hidden.shape[:2], teacher_logits.shape[-1])
    return _chunked(rows_logits, teacher_logits, mask, temperature, mu, chunk_size, shape=shape, on_policy=on_policy)


def _chunked(student_rows, teacher_logits, mask, temperature, mu, chunk_size, shape=None, on_policy=None) -> Features:
    """The statistics of the counted rows, ``chunk_size`` rows at a time (``student_rows(row_indices)`` gives the
    student's fp32 logits of those rows)."""
    b, t, v = shape or teacher_logits.shape
    device = teacher_logits.device
    mask = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    t_flat = teacher_logits.detach().reshape(-1, v)
    step = chunk_size or max(1, CHUNK_ELEMENTS // max(v, 1))
    out = {name: torch.zeros(b * t, dtype=torch.float32, device=device) for name in _STATISTICS}
    for start in range(0, rows.numel(), step):
        chunk = rows[start : start + step]
        stats = _token_statistics(
            student_rows(chunk), t_flat.index_select(0, chunk).float(), temperature=temperature, mu=mu
        )
        for name, value in stats.items():
            out[name][chunk] = value
    return _features(out, mask, on_policy, temperature, mu)


def _features(out: dict, mask: torch.Tensor, on_policy, temperature: float, mu: float) -> Features:
    """``Features`` from the flat ``[B * T]`` statistics ``out`` and the batch's per-sequence ``on_policy`` share."""
    b, t = mask.shape
    views = {name: value.view(b, t) for name, value in out.items()}
    if on_policy is not None:
        share = torch.as_tensor(on_policy, dtype=torch.float32, device=mask.device).reshape(-1)
        if share.numel() != b:
            raise ValueError(f"compute_features: on_policy must be [B] = [{b}], got shape {tuple(share.shape)}")
        views["on_policy"] = torch.where(mask, share.unsqueeze(1).expand(b, t), 0.0)
    return Features(**views, mask=mask, temperature=float(temperature), mu=float(mu))


_STATISTICS = (*FEATURE_NAMES, "todi_alpha")  # on_policy: from the batch, not the logits


@torch.no_grad()
def compute_features_topk(
    student_logits: torch.Tensor,
    teacher: TopKTeacher,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    mu: float = 0.5,
    chunk_size: int | None = None,
    on_policy: torch.Tensor | None = None,
) -> Features:
    """:func:`compute_features` against a teacher known by its top-k log-probabilities and one tail bucket (the
    teacher cache): the teacher-side statistics are those of the coarsened distributions ``P`` and ``Q`` over the k
    tokens and the bucket (:mod:`arkd.losses.topk`); the student-only ones are exact.

    - ``fkl``, ``rkl``: ``KL(P || Q)``, ``KL(Q || P)`` (lower bounds of the full ones, exact at k = V);
    - ``teacher_entropy``: ``H(P)`` (the bucket as one outcome: a lower bound of ``H(p)``); ``student_entropy``:
      ``H(q)`` over the whole vocabulary (exact);
    - ``head_gap``: AKL's head inside the k tokens (the head is cut at k when the top-k mass stays <= mu);
      ``tail_gap``: the rest of the k tokens plus ``|p_R - q_R|`` for the bucket (a lower bound);
    - ``top1_agreement``, ``teacher_confidence``: exact (the teacher's top-1 is always among its top k);
    - ``todi_alpha``: over the k tokens and the bucket as one entry.

    At k = V every statistic equals :func:`compute_features` of the full logits (tested).
    """
    if student_logits.dim() != 3 or student_logits.shape[:2] != teacher.shape:
        raise ValueError(
            f"compute_features: student_logits {tuple(student_logits.shape)} must be [B, T, V] with the top-k "
            f"teacher's [B, T] = {tuple(teacher.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"compute_features: temperature must be > 0, got {temperature}")
    if not 0 < mu <= 1:
        raise ValueError(f"compute_features: mu must be in (0, 1], got {mu}")
    b, t, v = student_logits.shape
    device = student_logits.device
    mask = torch.ones(b, t, dtype=torch.bool, device=device) if mask is None else mask.to(device, torch.bool)
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    s_flat = student_logits.detach().reshape(-1, v)
    flat = teacher.reshape(-1)
    step = chunk_size or max(1, CHUNK_ELEMENTS // max(v, 1))
    out = {name: torch.zeros(b * t, dtype=torch.float32, device=device) for name in _STATISTICS}
    for start in range(0, rows.numel(), step):
        chunk = rows[start : start + step]
        stats = _topk_statistics(s_flat.index_select(0, chunk).float(), flat[chunk], temperature=temperature, mu=mu)
        for name, value in stats.items():
            out[name][chunk] = value
    return _features(out, mask, on_policy, temperature, mu)


def _topk_statistics(s: torch.Tensor, teacher: TopKTeacher, *, temperature: float, mu: float) -> dict:
    """Statistics of ``[N, V]`` fp32 student logits against ``[N]`` top-k teacher rows: a dict of ``[N]``."""
    log_Q, log_P = coarse_log_probs(s, teacher, temperature=temperature)
    log_Q, log_P = log_Q.float(), log_P.float()
    P, Q = log_P.exp(), log_Q.exp()
    zero = P.new_zeros(())
    diff = log_P - log_Q
    fkl = torch.where(P > 0, P * diff, zero).sum(-1)
    rkl = torch.where(Q > 0, -Q * diff, zero).sum(-1)
    todi = torch.where(P > 0, P * torch.sigmoid(diff), zero).sum(-1)
    h_p = -torch.where(P > 0, P * log_P, zero).sum(-1)
    log_q = F.log_softmax(s / temperature, dim=-1)
    h_q = -torch.where(log_q > float("-inf"), log_q.exp() * log_q, zero).sum(-1)
    # the k tokens in the teacher's descending order (the cache writes them so; sorted again to be sure)
    p_top, order = P[:, :-1].sort(dim=-1, descending=True)
    q_top = Q[:, :-1].gather(-1, order)
    head = p_top.cumsum(-1) <= mu
    head[:, 0] = True
    gaps = (p_top - q_top).abs()
    g_head = torch.where(head, gaps, zero).sum(-1)
    g_tail = torch.where(head, zero, gaps).sum(-1) + (P[:, -1] - Q[:, -1]).abs()
    best = teacher.indices.to(s.device).gather(-1, order[:, :1]).squeeze(-1)
    return {
        "fkl": fkl,
        "rkl": rkl,
        "teacher_entropy": h_p,
        "student_entropy": h_q,
        "head_gap": g_head,
        "tail_gap": g_tail,
        "top1_agreement": (best == log_q.argmax(-1)).float(),
        "teacher_confidence": p_top[:, 0],
        "todi_alpha": todi,
    }


def _head_gap(p: torch.Tensor, q: torch.Tensor, mu: float, k: int = 64) -> torch.Tensor:
    """AKL's g_head per row: sum of |p - q| over the teacher's top tokens with cumulative mass <= mu (top-1 always),
    from a top-k; rows whose head may reach past rank k are redone with 2k, ... up to the full vocabulary."""
    n, v = p.shape
    g_head = p.new_zeros(n)
    todo = torch.arange(n, device=p.device)
    while todo.numel():
        k = min(k, v)
        top_p, index = p[todo].topk(k, dim=-1)  # descending
        cum = top_p.cumsum(-1)
        head = cum <= mu
        head[:, 0] = True
        gap = (top_p - q[todo].gather(-1, index)).abs_()
        # the head ends inside the top-k when the mass passes mu there (cumulative sums only grow); k = V is exact
        done = (cum[:, -1] > mu) | (k == v)
        g_head[todo[done]] = torch.where(head[done], gap[done], 0.0).sum(-1)
        todo = todo[~done]
        k *= 2
    return g_head


def _token_statistics(s: torch.Tensor, t: torch.Tensor, *, temperature: float, mu: float) -> dict[str, torch.Tensor]:
    """Statistics of ``[N, V]`` fp32 student / teacher logits rows: a dict of ``[N]`` tensors."""
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    p = log_p.exp()
    q = log_q.exp()
    zero = p.new_zeros(())
    diff = log_p - log_q  # NaN where both are -inf; every use below is guarded by p > 0 or q > 0
    p_pos = p > 0
    q_pos = q > 0
    fkl = torch.where(p_pos, p * diff, zero).sum(-1)
    rkl = torch.where(q_pos, -q * diff, zero).sum(-1)
    todi = torch.where(p_pos, p * torch.sigmoid(diff), zero).sum(-1)
    del diff
    h_p = -torch.where(p_pos, p * log_p, zero).sum(-1)
    h_q = -torch.where(q_pos, q * log_q, zero).sum(-1)
    del p_pos, q_pos
    top1 = (log_p.argmax(-1) == log_q.argmax(-1)).float()
    conf = p.amax(-1)
    del log_p, log_q
    total_gap = (p - q).abs_().sum(-1)
    g_head = _head_gap(p, q, mu)
    return {
        "fkl": fkl,
        "rkl": rkl,
        "teacher_entropy": h_p,
        "student_entropy": h_q,
        "head_gap": g_head,
        "tail_gap": (total_gap - g_head).clamp_min_(0.0),
        "top1_agreement": top1,
        "teacher_confidence": conf,
        "todi_alpha": todi,
    }


class RunningNorm:
    """Running mean and variance of feature vectors, identical on every process.

    Moments are cumulative (Welford-style pooling) for the first ``1 / (1 - momentum)`` updates, then exponential
    moving averages with ``momentum``, so early estimates are not dominated by the initial value and late ones track
    a drifting distribution. Under torch.distributed the batch moments are all-reduced before pooling.

    Args:
        num_features: F, the length of a feature vector.
        momentum: weight of the past in the moving averages, in [0, 1).
        eps: floor added to the variance.
        clip: normalised values are clamped to [-clip, clip].
    """

    def __init__(self, num_features: int, *, momentum: float = 0.99, eps: float = 1e-6, clip: float = 5.0) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"RunningNorm: momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.eps = eps
        self.clip = clip
        self.mean = torch.zeros(num_features, dtype=torch.float64)
        self.var = torch.ones(num_features, dtype=torch.float64)
        self.count = 0.0

    def update(self, x: torch.Tensor) -> None:
        """Pool the rows of ``x`` ``[N, F]`` (all processes) into the running moments."""
        x = x.detach().to("cpu", torch.float64).reshape(-1, self.mean.numel())
        x = torch.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)
        moments = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([x.shape[0]])])
        moments = pdist.all_reduce_sum(moments)
        n = float(moments[-1])
        if n == 0:
            return
        f = self.mean.numel()
        batch_mean = moments[:f] / n
        batch_var = (moments[f : 2 * f] / n - batch_mean**2).clamp_min(0)
        if self.count == 0:
            self.mean, self.var = batch_mean, batch_var
        else:
            w = max(n / (self.count + n), 1 - self.momentum)  # cumulative pooling first, then a moving average
            delta = batch_mean - self.mean
            self.mean = self.mean + w * delta
            self.var = (1 - w) * self.var + w * batch_var + w * (1 - w) * delta**2
        self.count += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps)`` clamped to [-clip, clip], float32 on ``x``'s device."""
        mean = self.mean.to(x.device, torch.float32)
        std = (self.var + self.eps).sqrt().to(x.device, torch.float32)
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=1e6, neginf=-1e6)
        return ((x - mean) / std).clamp(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "var": self.var.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean = state["mean"].clone().to(torch.float64)
        self.var = state["var"].clone().to(torch.float64)
        self.count = float(state["count"])
