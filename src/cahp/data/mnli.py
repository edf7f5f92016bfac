"""MultiNLI: the official splits (``mnli``, local files or the Hub) and the reduced ``mnli-small`` protocol."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cahp.data.builtin import no_kwargs
from cahp.data.folder import DATA_DIR_HELP, DataRoot
from cahp.data.holdout import Lazy, holdout_loader
from cahp.data.readers import INT_RE, int_label, named_label, read_jsonl, read_tsv, text_field
from cahp.data.types import Example, Task, TaskError

logger = logging.getLogger(__name__)

NLI_LABEL_NAMES = ("entailment", "neutral", "contradiction")


def _nli_label(value: Any, path: Path, lineno: int) -> int:
    """An NLI label: an int 0..2 or one of the names ``entailment``/``neutral``/``contradiction``."""
    if isinstance(value, str) and not INT_RE.fullmatch(value.strip()):
        return named_label(value, NLI_LABEL_NAMES, path, lineno)
    return int_label(value, 3, path, lineno)


def _nli_from_file(path: Path) -> list[Example]:
    if path.suffix == ".tsv":  # GLUE MNLI layout: sentence1, sentence2, gold_label
        rows = read_tsv(path, ("sentence1", "sentence2", "gold_label"))
        keys = ("sentence1", "sentence2", "gold_label")
    else:
        rows = read_jsonl(path, ("premise", "hypothesis", "label"))
        keys = ("premise", "hypothesis", "label")
    return [
        Example(
            text_field(r, keys[0], path, ln),
            text_field(r, keys[1], path, ln),
            _nli_label(r[keys[2]], path, ln),
        )
        for ln, r in rows
    ]


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _hub_mnli_loader(holdout: float) -> Callable[[str], list[Example]]:
    """Load MNLI from the Hugging Face Hub (``nyu-mll/glue``, ``mnli``); failures become TaskError."""

    def fetch(split: str) -> list[Example]:
        try:
            import datasets  # type: ignore[import-not-found]

            ds = datasets.load_dataset("nyu-mll/glue", "mnli", split=split)
            out = []
            for i, row in enumerate(ds):
                label = int(row["label"])
                if not 0 <= label < 3:
                    raise TaskError(f"Hub MNLI split {split!r} row {i}: label {label} out of range 0..2")
                out.append(Example(str(row["premise"]).strip(), str(row["hypothesis"]).strip(), label))
            return out
        except TaskError:
            raise
        except Exception as e:  # network, missing package, Hub errors, ...
            raise TaskError(
                f"MNLI's training split is missing locally and fetching it from the Hugging Face Hub "
                f"(nyu-mll/glue, mnli, split {split!r}) failed: {type(e).__name__}: {e}. Put the MNLI "
                f"files in the data directory ({DATA_DIR_HELP}) or use the task 'mnli-small'"
            ) from e

    files = {
        "full_train": Lazy(lambda: fetch("train")),
        "validation_matched": Lazy(lambda: fetch("validation_matched")),
        "validation_mismatched": Lazy(lambda: fetch("validation_mismatched")),
    }
    return holdout_loader(files, "full_train", holdout)


def _hub_allowed(allow_hub: bool) -> bool:
    if not allow_hub:
        return False
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        import importlib.util

        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def make_mnli(root: DataRoot, holdout: float = 0.02, allow_hub: bool = True, **kwargs: Any) -> Task:
    """Build ``mnli`` from local GLUE TSV or JSONL files, else from the Hub (if allowed and installed)."""
    no_kwargs("mnli", kwargs)
    common = dict(
        name="mnli",
        is_pair=True,
        num_labels=3,
        label_names=NLI_LABEL_NAMES,
        splits=("train", "dev", "validation_matched", "validation_mismatched"),
        train_split="train",
        dev_split="dev",
        test_split="validation_matched",
        extra_eval_splits=("validation_mismatched",),
        data_dir=root.path,
    )
    train_candidates: list[Path] = []
    if root.path is not None and root.path.is_dir():
        tsv, jl = root.path / "MNLI", root.path / "mnli"
        layouts = [
            (tsv / "train.tsv", (tsv / "dev_matched.tsv",), (tsv / "dev_mismatched.tsv",)),
            (
                jl / "train.jsonl",
                (jl / "validation_matched.jsonl", jl / "dev_matched.jsonl"),
                (jl / "validation_mismatched.jsonl", jl / "dev_mismatched.jsonl"),
            ),
        ]
        for train, matched, mismatched in layouts:
            train_candidates.append(train)
            if not train.is_file():
                continue
            m = _first_existing(*matched)
            mm = _first_existing(*mismatched)
            if m is None:
                raise root.missing(*matched, what="MNLI validation_matched file")
            if mm is None:
                raise root.missing(*mismatched, what="MNLI validation_mismatched file")
            files = {
                "full_train": Lazy(lambda train=train: _nli_from_file(train)),
                "validation_matched": Lazy(lambda m=m: _nli_from_file(m)),
                "validation_mismatched": Lazy(lambda mm=mm: _nli_from_file(mm)),
            }
            return Task(
                **common,
                description=f"MNLI from {train.parent}: train minus a {holdout:.0%} hold-out (dev); "
                "validation_matched is test",
                split_files={"train": train, "dev": train, "validation_matched": m, "validation_mismatched": mm},
                loader=holdout_loader(files, "full_train", holdout),
            )
    if _hub_allowed(allow_hub):
        logger.warning(
            "mnli: no local training split, will fetch nyu-mll/glue (mnli) from the Hugging Face Hub"
        )
        return Task(
            **common,
            description="MNLI from the Hugging Face Hub (nyu-mll/glue, mnli)",
            loader=_hub_mnli_loader(holdout),
        )
    looked = (
        " or ".join(str(p) for p in train_candidates) or "<data>/MNLI/train.tsv or <data>/mnli/train.jsonl"
    )
    raise TaskError(
        f"MNLI's training split is missing (looked for {looked}; data directory {root.path}, set by "
        f"{root.source}). Use the task 'mnli-small' (the reduced protocol on dev_matched.jsonl), or provide "
        f"the official MNLI files ({DATA_DIR_HELP})"
    )


def make_mnli_small(root: DataRoot, **kwargs: Any) -> Task:
    """Build ``mnli-small``: ``<data>/mnli/dev_matched.jsonl`` split by ``idx % 5`` (test 0, dev 1, train the rest)."""
    no_kwargs("mnli-small", kwargs)
    path = root.require() / "mnli" / "dev_matched.jsonl"
    if not path.is_file():
        raise root.missing(path, what="MNLI dev_matched file")

    def read() -> dict[str, list[Example]]:
        parts: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
        for ln, r in read_jsonl(path, ("idx", "premise", "hypothesis", "label")):
            idx = r["idx"]
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise TaskError(f"field 'idx' must be a non-negative integer, got {idx!r}", path, ln)
            ex = Example(
                text_field(r, "premise", path, ln),
                text_field(r, "hypothesis", path, ln),
                _nli_label(r["label"], path, ln),
            )
            parts["test" if idx % 5 == 0 else "dev" if idx % 5 == 1 else "train"].append(ex)
        return parts

    parts = Lazy(read)
    return Task(
        name="mnli-small",
        is_pair=True,
        num_labels=3,
        label_names=NLI_LABEL_NAMES,
        splits=("train", "dev", "test"),
        train_split="train",
        dev_split="dev",
        test_split="test",
        data_dir=root.path,
        description=f"reduced MNLI protocol on {path}: test idx%5==0, dev idx%5==1, train the rest "
        "(not comparable to MNLI results)",
        split_files={"train": path, "dev": path, "test": path},
        loader=lambda split: parts()[split],
    )
