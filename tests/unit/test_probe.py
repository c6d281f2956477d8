"""arkd.policy.probe: the t value, the grid, and the report's alpha_signal summary against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from arkd.policy.lookahead import StepPreview
from arkd.policy.probe import AlphaSignalProbe, summarize, t_value


def test_t_value_is_mean_over_standard_error():
    values = [1.0, 2.0, 4.0]
    mean, sd = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert t_value(values) == pytest.approx(mean / (sd / math.sqrt(3)))
    assert t_value([1.0, 2.0]) is None
    assert t_value([0.5, 0.5, 0.5]) == math.inf and t_value([0.0, 0.0, 0.0]) == 0.0


def test_grid_is_clamped_for_a_scalar_alpha_and_shifted_for_a_tensor():
    update = lambda p, g: {n: p[n] - g[n] for n in g}  # noqa: E731
    probe = AlphaSignalProbe(delta=0.2)
    w = {"w": torch.zeros(1)}
    g = {"w": torch.ones(1)}
    assert probe.grid(StepPreview(w, g, update, alpha=0.1, direction=g)) == pytest.approx((-0.1, 0.2))
    assert probe.grid(StepPreview(w, g, update, alpha=0.95, direction=g)) == pytest.approx((-0.2, 0.05))
    assert probe.grid(StepPreview(w, g, update, alpha=torch.tensor([0.1, 0.9]), direction=g)) == (-0.2, 0.2)


def test_measure_on_a_linear_response():
    """D(theta'(alpha)) = 1 - 0.3 alpha (a step whose gain grows with alpha): slope +0.3, the best grid point hi."""
    w = {"w": torch.zeros(1)}
    preview = StepPreview(w, {"w": torch.tensor([0.5])}, lambda p, g: {n: -g[n] for n in g}, alpha=0.5,
                          direction={"w": torch.tensor([1.0])})  # fmt: skip

    def scorer(params):  # params["w"] = -(0.5 + delta), i.e. -alpha'
        return 1.0 - 0.3 * float(-params["w"])

    probe = AlphaSignalProbe(delta=0.2, window=3)
    row = probe.measure(preview, scorer, scorer)
    assert row["alpha_signal_slope"] == pytest.approx(0.3) and row["alpha_signal_slope_same"] == pytest.approx(0.3)
    assert row["alpha_signal_best"] == pytest.approx(0.7) and row["alpha_signal_t"] is None
    probe.measure(preview, scorer)
    assert probe.measure(preview, scorer)["alpha_signal_t"] == math.inf
    probe2 = AlphaSignalProbe()
    probe2.load_state_dict(probe.state_dict())
    assert probe2.slopes == probe.slopes


def test_summarize_windows_signs_and_drift():
    slopes = [1.0, 1.2, 0.8, -0.1, 0.1, 0.05, -1.0, -1.1, -0.9]  # windows of 3: clearly +, unclear, clearly -
    rows = [{"step": i + 1, "alpha_mean": 0.5 + 0.01 * i, "alpha_signal_slope": s} for i, s in enumerate(slopes)]
    rows.append({"step": 10, "split": "validation", "alpha_signal_slope": 99.0})  # ignored
    rows.append({"step": 10, "alpha_mean": 0.6})  # a row without a probe
    out = summarize(rows, window=3)
    assert out["probes"] == 9 and out["windows"] == 3
    assert out["window_t"][0] == pytest.approx(t_value(slopes[:3]))
    assert out["significant_windows"] == 2 and out["sign_agreement"] == pytest.approx(0.5)
    assert out["mean_slope"] == pytest.approx(sum(slopes) / 9) and out["mean_slope_same"] is None
    alphas = [0.5 + 0.01 * i for i in range(9)] + [0.6]
    assert out["policy_alpha_drift"] == pytest.approx(sum(alphas[-2:]) / 2 - sum(alphas[:2]) / 2)
    assert summarize([{"step": 1, "alpha_mean": 0.5}], window=3) is None


def test_probe_validation():
    with pytest.raises(ValueError, match="probe.interval"):
        AlphaSignalProbe(interval=0)
    with pytest.raises(ValueError, match="probe.delta"):
        AlphaSignalProbe(delta=0.0)
    with pytest.raises(ValueError, match="probe.window"):
        AlphaSignalProbe(window=2)


def test_summarize_horizon_probes_by_hand(tmp_path):
    """The horizon probe's block: mean, t over its slopes and the share whose sign matches the nearest one-step probe
    (hand-computed); the trajectory figure draws both."""
    from arkd.evaluation.plots import plot_alpha_trajectory

    rows = [{"step": s, "alpha_mean": 0.5, "alpha_signal_slope": v} for s, v in [(8, -1e-3), (16, -2e-3), (24, 1e-3)]]
    rows += [{"step": s, "alpha_mean": 0.5, "alpha_signal_horizon": 32, "alpha_signal_horizon_slope": v}
             for s, v in [(1, 0.2), (17, 0.4), (25, 0.3)]]  # fmt: skip
    out = summarize(rows, window=3)
    assert out["horizon"] == 32 and out["horizon_probes"] == 3
    assert out["horizon_mean_slope"] == pytest.approx(0.3)
    assert out["horizon_slope_t"] == pytest.approx(0.3 / (0.1 / 3**0.5))
    assert out["horizon_one_step_agreement"] == pytest.approx(1 / 3)  # nearest: step 8 (-), 16 (-), 24 (+)
    assert out["probes"] == 3 and out["mean_slope"] == pytest.approx(-2e-3 / 3)
    only_far = summarize([r for r in rows if "alpha_signal_horizon" in r], window=3)
    assert only_far["horizon_probes"] == 3 and only_far["horizon_one_step_agreement"] is None
    path = plot_alpha_trajectory(rows, tmp_path / "a.png")
    assert path.stat().st_size > 0
