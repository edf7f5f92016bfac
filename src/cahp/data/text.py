"""Unlabeled text for the embedding objective: a task's training sentences (labels ignored) or a file of sentences.

- `task_texts`: the texts of a task's training split; for a sentence-pair task
  both sides, each on its own (an embedding model embeds single texts).
- `read_text_file`: a plain text file, one sentence a line, or a JSONL file
  (``.jsonl``), one JSON string or object a line, the object's text under
  ``"text"`` (else ``"sentence"``; other keys are ignored).

Either way blank lines are skipped, texts are stripped, and repeated texts are
kept once, in first-seen order: MNLI repeats a premise for each hypothesis,
and a sentence seen in both the held-out and the training share would make the
held-out fidelity optimistic. `encode_texts` tokenises the texts into an
`EncodedDataset` without labels, so no batch built from it carries any.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from cahp.data.batching import EncodedDataset, encode
from cahp.data.tasks import Example, Task

log = logging.getLogger(__name__)

__all__ = ["TEXT_KEYS", "TextFileError", "encode_texts", "read_text_file", "task_texts", "unique_texts"]

#: Keys a JSONL object's text may sit under, in the order they are looked for.
TEXT_KEYS = ("text", "sentence")


class TextFileError(ValueError):
    """A text file that cannot serve as unlabeled text: missing, unreadable, malformed or empty."""


def unique_texts(texts: Iterable[str]) -> list[str]:
    """Stripped, non-blank texts, each once, in first-seen order."""
    seen: dict[str, None] = {}
    for t in texts:
        t = t.strip()
        if t:
            seen.setdefault(t, None)
    return list(seen)


def task_texts(task: Task, split: str | None = None) -> list[str]:
    """The unique texts of ``task``'s ``split`` (default: its training split); labels are not read."""
    examples = task.load(split or task.train_split)
    texts = []
    for ex in examples:
        texts.append(ex.text)
        if ex.text_pair is not None:
            texts.append(ex.text_pair)
    out = unique_texts(texts)
    log.info("%d unique texts from %s (%s split, labels ignored)", len(out), task.name, split or task.train_split)
    return out


def read_text_file(path: str | Path) -> list[str]:
    """The unique sentences of a plain text file (one a line) or a ``.jsonl`` file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TextFileError(f"text file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TextFileError(f"cannot read text file {path}: {e.__class__.__name__}") from None
    if path.suffix.lower() == ".jsonl":
        texts = [_jsonl_text(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        texts = lines
    out = unique_texts(texts)
    if not out:
        raise TextFileError(f"text file {path} holds no text")
    log.info("%d unique texts from %s", len(out), path)
    return out


def _jsonl_text(line: str, path: Path, n: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise TextFileError(f"{path}, line {n}: not valid JSON") from None
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in TEXT_KEYS:
            if isinstance(obj.get(key), str):
                return obj[key]
    raise TextFileError(f"{path}, line {n}: expected a JSON string or an object with a {' or '.join(TEXT_KEYS)} text")


def encode_texts(tokenizer, texts: list[str], max_length: int) -> EncodedDataset:
    """Tokenise ``texts`` (unpadded, truncated at ``max_length``) into a dataset without labels."""
    ds = encode(tokenizer, [Example(t, None, 0) for t in texts], max_length)
    return EncodedDataset(features=ds.features, labels=[])
