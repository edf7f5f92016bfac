"""Built-in single-sentence and GLUE tasks: ``sst5``, ``sst2``, ``rte`` and the regression task ``stsb``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cahp.data.folder import DataRoot
from cahp.data.holdout import Lazy, holdout_loader
from cahp.data.readers import float_label, int_label, named_label, read_tsv, text_field
from cahp.data.sst import read_sst_trees
from cahp.data.types import Example, Task

logger = logging.getLogger(__name__)

SST5_LABEL_NAMES = ("very negative", "negative", "neutral", "positive", "very positive")
SST2_LABEL_NAMES = ("negative", "positive")
RTE_LABEL_NAMES = ("entailment", "not_entailment")
#: STS-B's similarity score: a float from 0 (unrelated) to 5 (same meaning).
STSB_LABEL_NAMES = ("similarity",)
STSB_RANGE = (0.0, 5.0)


def no_kwargs(name: str, kwargs: dict[str, Any], allowed: Sequence[str] = ()) -> None:
    """Raise TypeError naming the options in ``kwargs`` that task ``name`` does not take (beyond ``allowed``)."""
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise TypeError(f"task {name!r} takes no option(s) {', '.join(extra)}")


def _glue_split_files(glue: Path) -> dict[str, Path]:
    # train and dev are both cut from train.tsv; GLUE's dev.tsv is the test split
    return {"train": glue / "train.tsv", "dev": glue / "train.tsv", "test": glue / "dev.tsv"}


def _sst_tree_files(root: DataRoot) -> dict[str, Path]:
    base = root.require() / "sst5"
    return {split: base / f"{split}.txt" for split in ("train", "dev", "test")}


def make_sst5(root: DataRoot, **kwargs: Any) -> Task:
    """Build ``sst5`` from ``<data>/sst5/{train,dev,test}.txt``; the files must exist."""
    no_kwargs("sst5", kwargs)
    files = _sst_tree_files(root)
    for path in files.values():
        if not path.is_file():
            raise root.missing(path, what="SST-5 tree file")

    def load(split: str) -> list[Example]:
        return [Example(text, None, label) for _, label, text in read_sst_trees(files[split])]

    return Task(
        name="sst5",
        num_labels=5,
        label_names=SST5_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
        description=f"SST-5 PTB trees in {files['train'].parent}",
        split_files=dict(files),
        loader=load,
    )


def _sst2_from_tsv(path: Path) -> list[Example]:
    rows = read_tsv(path, ("sentence", "label"))
    return [
        Example(text_field(r, "sentence", path, ln), None, int_label(r["label"], 2, path, ln))
        for ln, r in rows
    ]


def make_sst2(root: DataRoot, holdout: float = 0.05, **kwargs: Any) -> Task:
    """Build ``sst2`` from GLUE SST-2 (train minus a ``holdout`` share is train) or, failing that, the SST-5 trees."""
    no_kwargs("sst2", kwargs)
    data = root.require()
    glue = data / "glue" / "SST-2"
    common = dict(
        name="sst2",
        num_labels=2,
        label_names=SST2_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
    )
    if (glue / "train.tsv").is_file():
        for p in (glue / "train.tsv", glue / "dev.tsv"):
            if not p.is_file():
                raise root.missing(p, what="GLUE SST-2 file")
        files = {
            "full_train": Lazy(lambda: _sst2_from_tsv(glue / "train.tsv")),
            "test": Lazy(lambda: _sst2_from_tsv(glue / "dev.tsv")),
        }
        return Task(
            **common,
            description=f"GLUE SST-2 in {glue}: train.tsv minus a {holdout:.0%} hold-out (dev); "
            "the GLUE dev.tsv is test",
            split_files=_glue_split_files(glue),
            loader=holdout_loader(files, "full_train", holdout),
        )
    trees = _sst_tree_files(root)
    if all(p.is_file() for p in trees.values()):
        logger.info("sst2: %s not found, deriving SST-2 from the SST-5 trees", glue)

        def load(split: str) -> list[Example]:
            return [
                Example(text, None, 0 if label < 2 else 1)
                for _, label, text in read_sst_trees(trees[split])
                if label != 2
            ]

        return Task(
            **common,
            description=f"SST-2 derived from the SST-5 trees in {trees['train'].parent} "
            "(label 2 dropped, 0-1 -> 0, 3-4 -> 1)",
            split_files=dict(trees),
            loader=load,
        )
    raise root.missing(glue / "train.tsv", trees["train"], what="SST-2 data (GLUE TSV or SST-5 trees)")


def _rte_from_tsv(path: Path) -> list[Example]:
    rows = read_tsv(path, ("sentence1", "sentence2", "label"))
    return [
        Example(
            text_field(r, "sentence1", path, ln),
            text_field(r, "sentence2", path, ln),
            named_label(r["label"], RTE_LABEL_NAMES, path, ln),
        )
        for ln, r in rows
    ]


def make_rte(root: DataRoot, holdout: float = 0.10, **kwargs: Any) -> Task:
    """Build ``rte`` from GLUE RTE: train.tsv minus a ``holdout`` share is train, dev.tsv is test."""
    no_kwargs("rte", kwargs)
    glue = root.require() / "glue" / "RTE"
    for p in (glue / "train.tsv", glue / "dev.tsv"):
        if not p.is_file():
            raise root.missing(p, what="GLUE RTE file")
    files = {
        "full_train": Lazy(lambda: _rte_from_tsv(glue / "train.tsv")),
        "test": Lazy(lambda: _rte_from_tsv(glue / "dev.tsv")),
    }
    return Task(
        name="rte",
        is_pair=True,
        num_labels=2,
        label_names=RTE_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
        description=f"GLUE RTE in {glue}: train.tsv minus a {holdout:.0%} hold-out (dev); "
        "the GLUE dev.tsv is test",
        split_files=_glue_split_files(glue),
        loader=holdout_loader(files, "full_train", holdout),
    )


def _stsb_from_tsv(path: Path) -> list[Example]:
    rows = read_tsv(path, ("sentence1", "sentence2", "score"))
    return [
        Example(
            text_field(r, "sentence1", path, ln),
            text_field(r, "sentence2", path, ln),
            float_label(r["score"], path, ln, *STSB_RANGE),
        )
        for ln, r in rows
    ]


def make_stsb(root: DataRoot, holdout: float = 0.10, **kwargs: Any) -> Task:
    """Build ``stsb``, a regression task: GLUE STS-B's train.tsv minus a ``holdout`` share is train, the
    hold-out is dev, and the GLUE dev.tsv is test (GLUE's test file has no scores)."""
    no_kwargs("stsb", kwargs)
    glue = root.require() / "glue" / "STS-B"
    for p in (glue / "train.tsv", glue / "dev.tsv"):
        if not p.is_file():
            raise root.missing(p, what="GLUE STS-B file")
    files = {
        "full_train": Lazy(lambda: _stsb_from_tsv(glue / "train.tsv")),
        "test": Lazy(lambda: _stsb_from_tsv(glue / "dev.tsv")),
    }
    return Task(
        name="stsb",
        is_pair=True,
        num_labels=1,
        label_names=STSB_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
        description=f"GLUE STS-B in {glue} (regression, scores 0..5): train.tsv minus a {holdout:.0%} "
        "hold-out (dev); the GLUE dev.tsv is test",
        task_type="regression",
        split_files=_glue_split_files(glue),
        loader=holdout_loader(files, "full_train", holdout),
    )
