"""Language-modelling text from a task's sentences, kept apart by split.

A decoder is pruned on plain text: the sentences of a task (both sides of a
pair, each a text of its own), never its labels. Calibration text (signatures,
salience, the fine-tuning) comes from the training split, held-out text (the
perplexity curve and every reported perplexity) from the dev split, and the
test split is never read. Sentences of the held-out text that also occur in
the calibration text are dropped (MNLI premises repeat across examples), so no
held-out sentence was seen during calibration or fine-tuning.

`lm_batches` tokenizes texts without special tokens added by the tokenizer's
template (each sentence as the model would read it), drops texts of fewer
than two tokens (nothing to predict), sorts them by length (little padding)
and pads on the right; every batch holds ``input_ids``, ``attention_mask`` and
``labels`` (the ids, -100 on padding, for transformers' shifted LM loss).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["LMTextError", "lm_batches", "lm_texts", "split_texts"]


class LMTextError(ValueError):
    """Too little text for a language-modelling pass (a split without usable sentences)."""


def split_texts(task, split: str) -> list[str]:
    """Distinct non-empty sentences of one split of ``task`` (first occurrence order; pairs give both sides)."""
    seen: dict[str, None] = {}
    for ex in task.load(split):
        for text in (ex.text, getattr(ex, "text_pair", None)):
            if text and text.strip():
                seen.setdefault(text.strip(), None)
    return list(seen)


def lm_texts(task, calibration: int, heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(calibration texts from the training split, held-out texts from the dev split), seeded samples.

    ``calibration`` / ``heldout``: how many sentences at most (all when a split has fewer). Held-out
    sentences that occur in the training split's sample are dropped before sampling.
    """
    if calibration < 1 or heldout < 1:
        raise LMTextError(f"need at least one calibration and one held-out sentence, got {calibration}, {heldout}")
    rng = np.random.default_rng(seed)
    train = split_texts(task, task.train_split)
    calib = [train[i] for i in sorted(rng.permutation(len(train))[:calibration].tolist())]
    taken = set(calib)
    dev = [t for t in split_texts(task, task.dev_split) if t not in taken]
    held = [dev[i] for i in sorted(rng.permutation(len(dev))[:heldout].tolist())]
    if not calib or not held:
        raise LMTextError(f"task {task.name!r}: no sentence left for the "
                          f"{'calibration' if not calib else 'held-out'} text")
    return calib, held


def lm_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
               pad_token_id: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of ``texts`` for a causal LM, shortest first (deterministic).

    Returns batches with ``input_ids`` and ``attention_mask`` (B, T) int64 and ``labels`` (B, T): the ids,
    -100 where padded. Raises `LMTextError` when no text has two tokens.
    """
    if batch_size < 1:
        raise LMTextError(f"batch size must be >= 1, got {batch_size}")
    pad = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise LMTextError("no text has two tokens: nothing to predict")
    if len(ids) < len(texts):
        log.info("%d of %d texts have fewer than two tokens and are left out", len(texts) - len(ids), len(texts))
    ids.sort(key=len)  # stable: equal lengths keep their text order
    batches = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask,
                        "labels": input_ids.masked_fill(mask == 0, -100)})
    return batches
