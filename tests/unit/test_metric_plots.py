"""The strategy x metric heatmap and the head / tail recall figure (arkd.evaluation.plots)."""

from __future__ import annotations

import pytest

from arkd.evaluation.plots import plot_head_tail, plot_metric_heatmap


def test_metric_heatmap_writes_a_png_and_checks_shapes(tmp_path):
    path = plot_metric_heatmap(
        ["fkl", "rkl"], ["Rouge-L", "FKL", "Tail recall"], [[16.2, 0.82, 7.25], [14.9, None, 6.66]],
        tmp_path / "h.png", higher_is_better=[True, False, None],
    )  # fmt: skip
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2 rows x 3 columns"):
        plot_metric_heatmap(["a", "b"], ["x", "y", "z"], [[1, 2, 3]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="one per column"):
        plot_metric_heatmap(["a"], ["x", "y"], [[1, 2]], tmp_path / "bad.png", higher_is_better=[True])
    with pytest.raises(ValueError, match="no value"):
        plot_metric_heatmap(["a"], ["x"], [[None]], tmp_path / "bad.png")


def test_head_tail_figure(tmp_path):
    path = plot_head_tail(["fkl", "rkl"], [(0.61, 0.01), (0.65, 0.01)], [(7.3, 0.3), (6.7, 0.3)], tmp_path / "ht.png")
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match="one \\(mean, std\\) head and tail pair per strategy"):
        plot_head_tail(["fkl"], [(0.6, 0.0)], [], tmp_path / "bad.png")
