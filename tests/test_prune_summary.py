"""What `cahp prune` prints after a run: the outputs it lists are the files the pipeline wrote (no model runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cahp.commands import prune as prune_command
from cahp.pipelines import embedding, stages
from cahp.pipelines import prune as prune_pipeline


@pytest.fixture
def printed(monkeypatch, capsys, tmp_path):
    """Run ``cahp prune``'s reporting on a given report; returns what it printed."""

    def run(report: dict) -> str:
        result = stages.PruneResult(output_dir=Path(tmp_path), report=report)
        monkeypatch.setattr(prune_command, "prune_configs", lambda args: (None, None))
        monkeypatch.setattr(prune_command, "from_args", lambda cls, args: None)
        monkeypatch.setattr(prune_pipeline, "run_prune", lambda cfg, ft, joint=None: result)
        monkeypatch.setattr(embedding, "summary", lambda r: "SUMMARY")
        assert prune_command.run(argparse.Namespace()) == 0
        return capsys.readouterr().out

    return run


def test_embedding_ffn_lists_structure_png(printed):
    out = printed({"objective": "embedding", "ffn": True})
    assert out.startswith("SUMMARY\n")
    assert "curve.png, heads.png, structure.png, distances.png, log.txt" in out


def test_embedding_heads_only_does_not_list_structure_png(printed):
    out = printed({"objective": "embedding"})
    assert "structure.png" not in out and "curve.png, heads.png, distances.png, log.txt" in out
