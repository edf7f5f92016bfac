"""`plot_frontier` (frontier.png of `cahp compare --ffn`, labelled and embedding): the score key, labels and dense
reference lines it draws, from small hand-written reports (seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from cahp.pipelines import plots

EMBEDDING = {"key": "spearman", "ylabel": "similarity task: test Spearman x 100", "untuned": "distillation",
             "title": "tiny / embedding: heads + FFN neurons", "teacher": True}


def _report(score: str, finetuned: bool, labelled: bool) -> dict:
    """Two targets, cahp and random (random not timed: its x is 1 / estimated share), gradient unreachable."""
    targets = [{"label": "2x", "share": 0.5}, {"label": "3x", "share": 0.33}]
    results = {}
    for j, t in enumerate(targets):
        results[t["label"]] = {"gradient": {"unreachable": "over budget"}}
        for i, m in enumerate(("cahp", "random")):
            r = {"estimated_share": 0.5 - 0.2 * j + 0.05 * i,
                 "measured_speedup": {"8x128": {"speedup": 2.0 + j}, "1x64": {"speedup": 1.5 + j}} if i == 0 else None,
                 "no_finetune": {score: 0.7 - 0.1 * j - 0.1 * i}}
            if finetuned:
                r["finetuned"] = {score: 0.8 - 0.1 * j - 0.1 * i}
            results[t["label"]][m] = r
    report = {"model": "tiny", "task": "sst2", "objective": "embedding", "test_split": "test", "targets": targets,
              "cost_table": {"shapes": ["8x128", "1x64"]}, "results": results}
    if labelled:
        report["dense"] = {"test": {"test": {score: 0.9}}, "control": {score: 0.92} if finetuned else None}
        report["heads_only"] = {"k": 7, "finetuned": {score: 0.85}, "measured_speedup": {"8x128": {"speedup": 1.3}}}
    else:
        report["dense"] = {score: 0.88, "pearson": 0.87}
    return report


@pytest.fixture
def captured(monkeypatch):
    """The figures `plot_frontier` would save, instead of saving them."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    return figs


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.lines}


def test_labelled_default_reads_accuracy_with_the_dense_control(captured, tmp_path):
    plots.plot_frontier(_report("accuracy", finetuned=True, labelled=True), tmp_path / "f.png")
    ax = captured[0].axes[0]
    lines = _lines(ax)
    assert np.allclose(lines["cahp"].get_xdata(), [2.0, 3.0]) and np.allclose(lines["cahp"].get_ydata(), [80, 70])
    # random was not timed: x = 1 / estimated share (0.55 at 2x, 0.35 at 3x), points in speedup order
    assert np.allclose(lines["random"].get_xdata(), [1 / 0.55, 1 / 0.35])
    assert np.allclose(lines["random"].get_ydata(), [70, 60])
    assert "gradient" not in lines  # unreachable everywhere: no line
    assert np.allclose(lines["dense control"].get_ydata(), [92, 92])
    assert np.allclose(lines["dense model pruned from"].get_ydata(), [90, 90])
    assert np.allclose(lines["heads-only CAHP (k* = 7)"].get_ydata(), [85])
    assert ax.get_ylabel() == "test accuracy (%)" and ax.get_title() == "tiny / sst2: heads + FFN neurons"
    assert ax.get_xlabel().startswith("measured speedup at 8x128")


def test_labelled_without_fine_tuning_says_so(captured, tmp_path):
    plots.plot_frontier(_report("accuracy", finetuned=False, labelled=True), tmp_path / "f.png", shape="1x64")
    ax = captured[0].axes[0]
    lines = _lines(ax)
    assert np.allclose(lines["cahp"].get_xdata(), [1.5, 2.5]) and np.allclose(lines["cahp"].get_ydata(), [70, 60])
    assert np.allclose(lines["dense"].get_ydata(), [90, 90]) and "dense model pruned from" not in lines
    assert ax.get_ylabel() == "test accuracy (%), no fine-tuning"
    assert ax.get_xlabel().startswith("measured speedup at 1x64")


def test_embedding_reads_spearman_against_the_teacher(captured, tmp_path):
    plots.plot_frontier(_report("spearman", finetuned=True, labelled=False), tmp_path / "f.png", **EMBEDDING)
    ax = captured[0].axes[0]
    lines = _lines(ax)
    assert np.allclose(lines["cahp"].get_ydata(), [80, 70])
    assert np.allclose(lines["dense (teacher)"].get_ydata(), [88, 88])
    assert not {"dense control", "dense model pruned from", "dense"} & set(lines)
    assert ax.get_ylabel() == "similarity task: test Spearman x 100"
    assert ax.get_title() == "tiny / embedding: heads + FFN neurons"
    plots.plot_frontier(_report("spearman", finetuned=False, labelled=False), tmp_path / "f.png", **EMBEDDING)
    ax = captured[1].axes[0]
    assert np.allclose(_lines(ax)["cahp"].get_ydata(), [70, 60])
    assert ax.get_ylabel() == "similarity task: test Spearman x 100, no distillation"


def test_bad_reports_get_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'accuracy' score"):  # an embedding report read with the default key
        plots.plot_frontier(_report("spearman", finetuned=True, labelled=False), tmp_path / "f.png")
    report = _report("accuracy", finetuned=True, labelled=True)
    report["cost_table"]["shapes"] = []
    with pytest.raises(ValueError, match="no cost_table shapes"):
        plots.plot_frontier(report, tmp_path / "f.png")


def test_the_figure_is_written(tmp_path):
    path = tmp_path / "frontier.png"
    plots.plot_frontier(_report("spearman", finetuned=True, labelled=False), path, **EMBEDDING)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
