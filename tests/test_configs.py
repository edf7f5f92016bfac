"""Dataclass configs -> argparse options."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from cahp.core.configs import add_dataclass_args, field, from_args


@dataclass
class Example:
    methods: list[str] = field(["a", "b"], "methods to run")
    budgets: list[float] = field([0.5, 0.25], "budgets")
    epochs: int = field(3, "epochs")
    lr: float | None = field(None, "learning rate")
    flag: bool = field(False, "a switch")
    mode: str = field("x", "mode", choices=["x", "y"])


def test_dataclass_args_round_trip():
    p = argparse.ArgumentParser()
    add_dataclass_args(p, Example)
    assert from_args(Example, p.parse_args([])) == Example()
    got = from_args(Example, p.parse_args(["--budgets", "0.1", "0.2", "--methods", "c", "--epochs", "5",
                                           "--lr", "0.01", "--flag", "--mode", "y"]))
    assert got == Example(methods=["c"], budgets=[0.1, 0.2], epochs=5, lr=0.01, flag=True, mode="y")
    assert Example().methods is not Example().methods  # list defaults are not shared


@dataclass
class Listed:
    methods: list[str] = field(["a", "b"], "methods to run", choices=["a", "b", "c"], metavar="METHOD")


def test_list_option_with_metavar_names_its_choices_and_rejects_others(capsys):
    p = argparse.ArgumentParser(prog="x")
    add_dataclass_args(p, Listed)
    help_text = " ".join(p.format_help().split())
    assert "--methods METHOD [METHOD ...]" in help_text
    assert "from a, b, c (default: a b)" in help_text
    assert from_args(Listed, p.parse_args(["--methods", "c", "a"])).methods == ["c", "a"]
    with pytest.raises(SystemExit):
        p.parse_args(["--methods", "d"])
    assert "invalid choice: 'd'" in capsys.readouterr().err


def test_an_instance_gives_the_defaults(capsys):
    """A script sharing a command's settings but not all its defaults passes an instance."""
    p = argparse.ArgumentParser(prog="x")
    base = Example(epochs=7, flag=True, methods=["b"])
    add_dataclass_args(p, base, skip=("mode",))
    assert from_args(Example, p.parse_args([])) == base
    assert from_args(Example, p.parse_args(["--no-flag", "--epochs", "1"])) == Example(epochs=1, methods=["b"])
    assert from_args(Example, p.parse_args([])).methods is not base.methods
    help_text = " ".join(p.format_help().split())
    assert "epochs (default: 7)" in help_text and "--mode" not in help_text
