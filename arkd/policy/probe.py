"""The alpha-signal probe: does alpha matter right now, and which way?

Every ``interval`` steps the probe previews the trainer's real step (:class:`arkd.policy.lookahead.StepPreview`: the
same gradient, clipping and optimiser update) with the applied alpha moved to ``alpha - delta`` and ``alpha + delta``
and scores each on data the step did not use (the next training batch) and, for comparison, on the step's own batch.
Its measurements, logged in ``metrics.jsonl``:

- ``alpha_signal_slope``: ``d reward / d alpha`` per unit alpha on the next batch,
  ``(D(theta'(lo)) - D(theta'(hi))) / (hi - lo)`` (reward = decrease of ``D = (FKL + RKL) / 2``);
- ``alpha_signal_slope_same``: the same slope on the step's own batch;
- ``alpha_signal_t``: ``mean / (sd / sqrt(n))`` of the last ``window`` next-batch slopes (null below 3 probes);
- ``alpha_signal_best``: the best alpha of the grid ``{lo, alpha, hi}`` on the next batch.

For a scalar alpha the grid is clamped to [0, 1] (``lo = max(alpha - delta, 0)``, ``hi = min(alpha + delta, 1)``).
For per-sequence or per-token alphas every entry is shifted by ``delta`` without clamping: the loss is linear in
alpha, so the shifted gradient is exact even where an entry leaves [0, 1], and the slope is the derivative of the
step's effect with respect to a uniform shift.

:func:`summarize` turns the logged rows into the ``alpha_signal`` block of ``report.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from arkd.policy.lookahead import BatchScorer, StepPreview


def t_value(values: list[float]) -> float | None:
    """``mean / (sd / sqrt(n))`` with the sample sd (n - 1); None below 3 values; +-inf when sd is 0."""
    n = len(values)
    if n < 3:
        return None
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    if var <= 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(var / n)


class AlphaSignalProbe:
    """Measure the effect of alpha on the step every ``interval`` steps (logging only: it changes nothing).

    Args:
        interval: probe every this many optimiser steps (steps ``interval, 2 interval, ...``).
        delta: half-width of the alpha grid.
        window: probes pooled by ``alpha_signal_t`` (and per window in the report).
        same_batch: also score the step's own batch (two more student forwards).
        equal_norm: compare the grid points at the norm of the applied step's gradient.
        horizon: also ask the question over this many real training steps (0: not): every ``horizon_interval``
            steps, two branches from one snapshot train ``horizon`` steps at alpha - delta and alpha + delta and are
            scored on the reward split (``arkd.branching``); logs ``alpha_signal_horizon_slope``.
        horizon_interval: steps between horizon probes (at multiples of it, step 0 included).
        rows: training rows arkd-train holds out of distillation as the reward split the horizon probe scores on
            (unless ``reward=horizon`` holds out its own ``reward.rows``).
    """

    def __init__(
        self,
        *,
        interval: int = 8,
        delta: float = 0.2,
        window: int = 6,
        same_batch: bool = True,
        equal_norm: bool = False,
        horizon: int = 0,
        horizon_interval: int = 96,
        rows: int = 64,
    ) -> None:
        if int(interval) < 1:
            raise ValueError(f"probe.interval must be >= 1, got {interval}")
        if not 0 < float(delta) <= 1:
            raise ValueError(f"probe.delta must be in (0, 1], got {delta}")
        if int(window) < 3:
            raise ValueError(f"probe.window must be >= 3 (a t value needs 3 slopes), got {window}")
        for key, value, low in (("horizon", horizon, 0), ("horizon_interval", horizon_interval, 1), ("rows", rows, 1)):
            if isinstance(value, bool) or int(value) != value or int(value) < low:
                raise ValueError(f"probe.{key} must be an integer >= {low}, got {value!r}")
        self.horizon, self.horizon_interval, self.rows = int(horizon), int(horizon_interval), int(rows)
        self.interval = int(interval)
        self.delta = float(delta)
        self.window = int(window)
        self.same_batch = bool(same_batch)
        self.equal_norm = bool(equal_norm)
        self.slopes: list[float] = []

    def horizon_options(self) -> dict[str, Any]:
        """The horizon probe's options for ``arkd.branching.Branches``."""
        return {"probe_horizon": self.horizon, "probe_interval": self.horizon_interval, "probe_delta": self.delta}

    def due(self, step: int) -> bool:
        """True when optimiser step ``step`` (1-based) is probed."""
        return step % self.interval == 0

    def grid(self, preview: StepPreview) -> tuple[float, float]:
        """The shifts ``(lo - alpha, hi - alpha)``: clamped to [0, 1] for a scalar alpha."""
        if preview.alpha.dim() == 0:
            a = float(preview.alpha)
            lo, hi = max(a - self.delta, 0.0), min(a + self.delta, 1.0)
            if hi - lo < 1e-9:  # delta so small that both sides clamp: nothing to compare
                lo, hi = a - self.delta, a + self.delta
            return lo - a, hi - a
        return -self.delta, self.delta

    def measure(
        self, preview: StepPreview, held_out: BatchScorer, same: BatchScorer | None = None
    ) -> dict[str, float | None]:
        """One probe: the slopes, the t value over the window and the best grid alpha (the row to log)."""
        d_lo, d_hi = self.grid(preview)
        at = lambda delta: preview.params_at(delta, equal_norm=self.equal_norm)  # noqa: E731 - one copy at a time
        scores = {delta: held_out(at(delta)) for delta in dict.fromkeys((d_lo, 0.0, d_hi))}
        width = d_hi - d_lo
        slope = (scores[d_lo] - scores[d_hi]) / width
        row: dict[str, float | None] = {"alpha_signal_slope": slope}
        if self.same_batch and same is not None:
            row["alpha_signal_slope_same"] = (same(at(d_lo)) - same(at(d_hi))) / width
        best = min(scores, key=lambda delta: scores[delta])
        self.slopes.append(slope)
        row["alpha_signal_t"] = t_value(self.slopes[-self.window :])
        row["alpha_signal_best"] = preview.alpha_mean + best
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"slopes": list(self.slopes)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.slopes = [float(v) for v in state.get("slopes", [])]


def summarize(rows: Iterable[Mapping[str, Any]], window: int) -> dict[str, Any] | None:
    """The ``alpha_signal`` block of ``report.json`` from ``metrics.jsonl`` training rows (None without probes).

    - ``probes``: the number of probes; ``windows``: complete non-overlapping windows of ``window`` probes;
    - ``significant_windows``: windows whose slopes have ``|t| > 2``; ``sign_agreement``: the share of significant
      windows whose slope has the majority sign (None without significant windows);
    - ``mean_slope``: the mean next-batch slope over all probes (and ``mean_slope_same`` on the step's own batch);
    - ``policy_alpha_drift``: mean ``alpha_mean`` of the last 20 % of logged steps minus that of the first 20 %.
    """
    rows = [r for r in rows if r.get("split", "train") == "train"]
    slopes = [float(r["alpha_signal_slope"]) for r in rows if r.get("alpha_signal_slope") is not None]
    horizon = _horizon_summary(rows)
    if not slopes:
        return horizon
    same = [float(r["alpha_signal_slope_same"]) for r in rows if r.get("alpha_signal_slope_same") is not None]
    ts = [t_value(slopes[i : i + window]) for i in range(0, len(slopes) - window + 1, window)]
    significant = [t for t in ts if t is not None and abs(t) > 2]
    positive = sum(1 for t in significant if t > 0)
    agreement = max(positive, len(significant) - positive) / len(significant) if significant else None
    alphas = [float(r["alpha_mean"]) for r in rows if r.get("alpha_mean") is not None]
    drift = None
    if len(alphas) >= 5:
        k = max(1, len(alphas) // 5)
        drift = sum(alphas[-k:]) / k - sum(alphas[:k]) / k
    return {
        "probes": len(slopes),
        "window": window,
        "windows": len(ts),
        "window_t": ts,
        "significant_windows": len(significant),
        "mean_slope": sum(slopes) / len(slopes),
        "mean_slope_same": sum(same) / len(same) if same else None,
        "slope_t": t_value(slopes),
        "sign_agreement": agreement,
        "policy_alpha_drift": drift,
        **(horizon or {}),
    }


def _horizon_summary(rows: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The horizon probe's part of the block (None without horizon probes): ``horizon`` (steps), ``horizon_probes``,
    ``horizon_mean_slope``, ``horizon_slope_t`` and ``horizon_one_step_agreement``, the share of horizon probes whose
    sign is that of the one-step probe logged nearest in steps (None without one-step probes)."""
    far = [(int(r["step"]), float(r["alpha_signal_horizon_slope"])) for r in rows
           if r.get("alpha_signal_horizon_slope") is not None]  # fmt: skip
    if not far:
        return None
    near = [(int(r["step"]), float(r["alpha_signal_slope"])) for r in rows if r.get("alpha_signal_slope") is not None]
    agree = None
    if near:
        signs = [(s > 0) == (min(near, key=lambda n: abs(n[0] - step))[1] > 0) for step, s in far]
        agree = sum(signs) / len(signs)
    values = [s for _, s in far]
    return {
        "horizon": next(int(r["alpha_signal_horizon"]) for r in rows if r.get("alpha_signal_horizon")),
        "horizon_probes": len(values),
        "horizon_mean_slope": sum(values) / len(values),
        "horizon_slope_t": t_value(values),
        "horizon_one_step_agreement": agree,
    }
