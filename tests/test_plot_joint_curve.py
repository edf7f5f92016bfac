"""`plot_joint_curve` (curve.png of `cahp prune --ffn`): the score key and the y label it is given (seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from cahp.pipelines import plots

KNEE = {"grid": [400, 700, 1000], "fitted": [0.5, 0.7, 0.8], "degree": 2}


def _points(key: str) -> list[dict]:
    return [{"estimated_share": s, key: v} for s, v in ((1.0, 0.81), (0.7, 0.74), (0.4, 0.52))]


@pytest.fixture
def captured(monkeypatch):
    """The figures `plot_joint_curve` would save, instead of saving them."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    return figs


def test_default_reads_accuracy_and_labels_it(captured, tmp_path):
    plots.plot_joint_curve(_points("accuracy"), KNEE, 0.7, tmp_path / "curve.png")
    ax = captured[0].axes[0]
    assert ax.get_ylabel() == "accuracy"
    assert np.allclose(ax.lines[0].get_ydata(), [0.81, 0.74, 0.52])
    assert ax.lines[0].get_label() == "held-out accuracy (chosen head weight per share)"


def test_key_and_ylabel_are_used(captured, tmp_path):
    label = "held-out fidelity (mean cosine)"
    plots.plot_joint_curve(_points("fidelity"), KNEE, 0.7, tmp_path / "curve.png", key="fidelity", ylabel=label)
    ax = captured[0].axes[0]
    assert ax.get_ylabel() == label
    assert np.allclose(ax.lines[0].get_ydata(), [0.81, 0.74, 0.52])
    assert ax.lines[0].get_label().startswith(label)
    with pytest.raises(KeyError):  # the default key is not in these points
        plots.plot_joint_curve(_points("fidelity"), KNEE, 0.7, tmp_path / "curve.png")


def test_the_figure_is_written(tmp_path):
    path = tmp_path / "curve.png"
    plots.plot_joint_curve(_points("score"), KNEE, 0.7, path, key="score", ylabel="dev Spearman (similarity task)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
