"""The command line: help, clear errors without tracebacks, and real runs on a slice of real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cahp.cli import main

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("prune", "finetune", "evaluate", "info"):
        assert cmd in out


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "cahp", "--help"], capture_output=True, text=True, check=True).stdout
    assert "prune" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--model", "./no/such/folder", "--task", "sst5"], "does not exist"),
        (["evaluate", "--model", "minilm-l6", "--task", "nosuchtask-xyz"], "nosuchtask-xyz"),
        (["finetune", "--model", "minilm-l6", "--task", "sst5", "--data-dir", "/nonexistent/dir"], "/nonexistent"),
        (["prune", "--model", "minilm-l6", "--task", "sst5", "--keep", "3", "--keep-ratio", "0.5"], "not both"),
    ],
)
def test_clear_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.integration
def test_finetune_evaluate_prune_real_minilm(tmp_path):
    """minilm-l6 on a slice of real SST-5: finetune, evaluate, prune with --finetuned."""
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", "minilm-l6", "--task", "sst5", "--data-dir", str(DATA),
                 "--output-dir", str(ft), "--epochs", "1", "--max-train-examples", "128", "--no-test"]) == 0
    report = json.loads((ft / "finetune.json").read_text())
    assert report["finetune"]["history"][0]["dev"]["n"] == 1101
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(ft / "model"), "--task", "sst5", "--data-dir", str(DATA),
                 "--split", "dev", "--bootstrap", "100", "--output", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["splits"]["dev"]["accuracy"] == pytest.approx(report["finetune"]["best_dev"]["accuracy"])
    pr = tmp_path / "prune"
    assert main(["prune", "--model", str(ft / "model"), "--task", "sst5", "--data-dir", str(DATA), "--finetuned",
                 "--output-dir", str(pr), "--calibration-examples", "64", "--curve-examples", "128",
                 "--grid-step", "12", "--keep-ratio", "0.5", "--skip-final-finetune"]) == 0
    r = json.loads((pr / "report.json").read_text())
    assert r["heads_kept"] == 36 and r["heads_before"] == 72
    assert r["parameters"]["before"] - r["parameters"]["after"] == 36 * (3 * (32 * 384 + 32) + 384 * 32)
    for name in ("curve.png", "heads.png", "distances.png", "log.txt"):
        assert (pr / name).is_file()


def test_prefixed_dataclass_options_parse_back_without_clashing():
    """`add_dataclass_args(prefix=...)` names the options --prefix-field and `from_args` reads them back, beside
    another config's field of the same name (here n_bootstrap, in CompareConfig and DecodeTimingConfig)."""
    import argparse

    from cahp.bench.decode import DecodeTimingConfig
    from cahp.core.configs import add_dataclass_args, from_args
    from cahp.pipelines.compare import CompareConfig

    p = argparse.ArgumentParser()
    add_dataclass_args(p, CompareConfig)
    add_dataclass_args(p, DecodeTimingConfig, prefix="timing")
    args = p.parse_args(["--n-bootstrap", "300", "--timing-n-bootstrap", "40", "--timing-seconds", "2.5",
                         "--timing-batch-sizes", "2", "4"])
    timing = from_args(DecodeTimingConfig, args, prefix="timing")
    assert from_args(CompareConfig, args).n_bootstrap == 300
    assert (timing.n_bootstrap, timing.seconds, timing.batch_sizes) == (40, 2.5, [2, 4])
    assert timing.new_tokens == DecodeTimingConfig().new_tokens


def test_cahp_compare_help_lists_the_decode_timing_options(capsys):
    from cahp.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "--timing-seconds" in out and "--timing-new-tokens" in out and "--timing-batch-sizes" in out


def test_the_cli_log_handler_follows_sys_stderr(monkeypatch):
    """``main`` called again after the stderr it first logged to was replaced and closed (a notebook, a test under
    capture) logs to the new one instead of printing logging's own traceback."""
    import io
    import logging

    from cahp.cli import _StderrHandler

    first, second = io.StringIO(), io.StringIO()
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("cahp", logging.INFO, __file__, 1, "hello", None, None)
    monkeypatch.setattr(sys, "stderr", first)
    handler.handle(record)
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    handler.handle(record)
    assert second.getvalue() == "hello\n"
