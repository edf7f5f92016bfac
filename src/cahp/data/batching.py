"""Tokenization and length-bucketed, dynamically padded batching.

:func:`encode` tokenizes a task split once (unpadded); :func:`make_batches` / :func:`iter_batches` group
examples of similar length so that padding stays small, and :func:`collate` pads each batch to its own
longest sequence. Every batch carries an ``"index"`` tensor (positions in the :class:`EncodedDataset`) so
predictions from a length-sorted evaluation order can be mapped back to example order.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cahp.data.tasks import Example

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_INPUTS",
    "EncodedDataset",
    "collate",
    "encode",
    "iter_batches",
    "make_batches",
    "padding_fraction",
    "split_batches",
]

#: The tokenizer outputs a batch keeps and a model takes (``cahp.train.evaluate.model_inputs`` passes exactly
#: these on). ``token_type_ids`` depends on the family's tokenizer: BERT and ELECTRA make them, RoBERTa,
#: DistilBERT and MPNet tokenizers do not, so their batches simply lack the key.
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: Examples per tokenizer call in :func:`encode`.
ENCODE_CHUNK = 1000
#: A shuffled bucketing pool holds this many batches.
POOL_BATCHES = 50


@dataclass
class EncodedDataset:
    """Tokenized examples, unpadded.

    Attributes:
        features: Per example, the tokenizer outputs ``input_ids``, ``attention_mask`` and
            ``token_type_ids`` (if the tokenizer makes them) as lists of ints.
        labels: One label per example (class ids, or float scores for regression), or an empty list for
            unlabelled data.
    """

    features: list[dict[str, list[int]]]
    labels: list[int] | list[float]

    def __post_init__(self) -> None:
        if self.labels and len(self.labels) != len(self.features):
            raise ValueError(f"{len(self.features)} features but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.features)

    def lengths(self) -> list[int]:
        """Token count of each example (``len(input_ids)``).

        Returns:
            One length per example.
        """
        return [len(f["input_ids"]) for f in self.features]


def encode(tokenizer: Any, examples: Sequence[Example], max_length: int = 128) -> EncodedDataset:
    """Tokenize examples without padding.

    Single texts and pairs are both handled (pairs truncated ``"longest_first"``); the tokenizer is called
    once per chunk of :data:`ENCODE_CHUNK` examples (twice if a chunk mixes singles and pairs).

    Args:
        tokenizer: A Hugging Face tokenizer (a fast one is much quicker).
        examples: The examples to encode.
        max_length: Maximum tokens per example, special tokens included.

    Returns:
        The encoded dataset, in the order of ``examples``.
    """
    if not getattr(tokenizer, "is_fast", True):
        logger.warning("encode: tokenizer %s is not a fast tokenizer; encoding will be slow", type(tokenizer))
    features: list[dict[str, list[int]]] = [{} for _ in examples]
    for start in range(0, len(examples), ENCODE_CHUNK):
        chunk = range(start, min(start + ENCODE_CHUNK, len(examples)))
        singles = [i for i in chunk if examples[i].text_pair is None]
        pairs = [i for i in chunk if examples[i].text_pair is not None]
        for idx, is_pair in ((singles, False), (pairs, True)):
            if not idx:
                continue
            texts = [examples[i].text for i in idx]
            text_pairs = [examples[i].text_pair for i in idx] if is_pair else None
            out = tokenizer(
                texts,
                text_pair=text_pairs,
                truncation="longest_first",
                max_length=max_length,
                padding=False,
                return_attention_mask=True,
            )
            keys = [k for k in MODEL_INPUTS if k in out]
            for j, i in enumerate(idx):
                features[i] = {k: list(out[k][j]) for k in keys}
    labels = [ex.label if isinstance(ex.label, float) else int(ex.label) for ex in examples]
    return EncodedDataset(features=features, labels=labels)


def collate(
    features: list[dict[str, list[int]]], pad_token_id: int, labels: list[int] | list[float] | None = None
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence (right padding).

    ``input_ids`` are padded with ``pad_token_id``, every other key (``attention_mask``,
    ``token_type_ids``) with 0. An ``attention_mask`` is made if the features have none.

    Args:
        features: Unpadded features, all with the same keys.
        pad_token_id: The tokenizer's pad id.
        labels: Optional labels, one per feature; returned under ``"labels"`` as a LongTensor of class ids,
            or a float32 tensor when any label is a float (regression scores).

    Returns:
        ``{key: LongTensor[batch, max_len]}`` plus ``"labels"`` if given.
    """
    if not features:
        raise ValueError("collate: empty batch")
    keys = list(features[0])
    if "input_ids" not in keys:
        raise ValueError("collate: features need 'input_ids'")
    for f in features:
        if f.keys() != features[0].keys():
            raise ValueError(f"collate: features have different keys: {sorted(f)} vs {sorted(keys)}")
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        pad = pad_token_id if key == "input_ids" else 0
        rows = []
        for f, n in zip(features, lengths):
            seq = f[key]
            if len(seq) != n:
                raise ValueError(f"collate: {key!r} has length {len(seq)} but input_ids has {n}")
            rows.append(list(seq) + [pad] * (width - n))
        out[key] = torch.tensor(rows, dtype=torch.long)
    if "attention_mask" not in out:
        out["attention_mask"] = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long)
    if labels is not None:
        if len(labels) != len(features):
            raise ValueError(f"collate: {len(features)} features but {len(labels)} labels")
        is_score = any(isinstance(y, float) for y in labels)
        out["labels"] = torch.tensor(labels, dtype=torch.float32 if is_score else torch.long)
    return out


def _batch_order(
    lengths: list[int], batch_size: int, shuffle: bool, seed: int, bucket: bool, drop_last: bool
) -> list[list[int]]:
    """Group example positions into batches (see :func:`make_batches`)."""
    n = len(lengths)
    rng = random.Random(seed)
    if shuffle:
        order = list(range(n))
        rng.shuffle(order)
        if drop_last:  # drop a random remainder, not the longest examples of the last pool
            order = order[: n - n % batch_size]
        if bucket:
            pool = POOL_BATCHES * batch_size
            batches = []
            for p in range(0, len(order), pool):
                chunk = sorted(order[p : p + pool], key=lambda i: lengths[i])
                batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
            rng.shuffle(batches)
            return batches
    elif bucket:
        order = sorted(range(n), key=lambda i: (-lengths[i], i))  # longest first: memory problems show early
    else:
        order = list(range(n))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def iter_batches(
    ds: EncodedDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    bucket: bool = True,
    pad_token_id: int = 0,
    drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Like :func:`make_batches`, but collates lazily (one batch in memory at a time)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for idx in _batch_order(ds.lengths(), batch_size, shuffle, seed, bucket, drop_last):
        batch = collate(
            [ds.features[i] for i in idx],
            pad_token_id,
            [ds.labels[i] for i in idx] if ds.labels else None,
        )
        batch["index"] = torch.tensor(idx, dtype=torch.long)
        yield batch


def make_batches(
    ds: EncodedDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    bucket: bool = True,
    pad_token_id: int = 0,
    drop_last: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Build padded batches, optionally bucketed by length.

    * ``shuffle=True, bucket=True``: examples are shuffled, cut into pools of
      ``POOL_BATCHES * batch_size``, sorted by length within each pool and split into batches; then the
      order of all batches is shuffled. Little padding, still random.
    * ``shuffle=True, bucket=False``: plain random batches.
    * ``shuffle=False, bucket=True``: all examples sorted by length, longest first (ties by position);
      the usual evaluation order.
    * ``shuffle=False, bucket=False``: dataset order.

    The result depends only on the data, ``batch_size`` and ``seed`` (use e.g. ``seed + epoch`` for a new
    order per epoch). Every batch has an ``"index"`` LongTensor of positions in ``ds`` and, for labelled
    data, ``"labels"``. Each example appears exactly once, except that ``drop_last`` drops the incomplete
    batch (with shuffling: a random remainder of ``len(ds) % batch_size`` examples).

    Args:
        ds: The encoded dataset.
        batch_size: Examples per batch.
        shuffle: Randomize the order (training) or not (evaluation).
        seed: Seed of the shuffle.
        bucket: Group examples of similar length.
        pad_token_id: The tokenizer's pad id.
        drop_last: Drop the incomplete batch.

    Returns:
        The batches, as dicts of tensors (see :func:`collate`).
    """
    return list(
        iter_batches(
            ds,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            bucket=bucket,
            pad_token_id=pad_token_id,
            drop_last=drop_last,
        )
    )


def split_batches(batches: Iterable[dict[str, torch.Tensor]], max_cells: int) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``batches``, each cut along its examples so that ``examples x width**2 <= max_cells``.

    Attention over one batch holds ``examples x width x width`` cells per head, so
    this bounds the working set of anything that materialises attention (the
    signature pass) whatever sample the batches came from. Each piece is trimmed
    to its own longest sequence (right padding), which changes no real token's
    attention. A single example wider than the budget still forms a piece.

    Args:
        batches: Collated batches (see :func:`collate`): every tensor has the examples on dim 0;
            2-d tensors as wide as ``attention_mask`` are token-aligned.
        max_cells: Budget of ``examples x width**2`` per piece (>= 1).

    Yields:
        Batches (unchanged ones are passed through as they are).
    """
    if max_cells < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}")
    for batch in batches:
        mask = batch["attention_mask"]
        n, width = mask.shape
        if n * width * width <= max_cells:
            yield batch
            continue
        lengths = mask.sum(1).tolist()
        start = 0
        while start < n:
            # grow the piece while the budget holds for its (so far) longest example
            end, longest = start + 1, max(lengths[start], 1)
            while end < n:
                wider = max(longest, lengths[end])
                if (end + 1 - start) * wider * wider > max_cells:
                    break
                end, longest = end + 1, wider
            piece = {}
            for key, v in batch.items():
                v = v[start:end]
                if v.dim() == 2 and v.shape[1] == width:
                    v = v[:, :longest]
                piece[key] = v
            yield piece
            start = end


def padding_fraction(batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Share of token positions in ``batches`` that are padding (``attention_mask == 0``).

    Args:
        batches: Collated batches.

    Returns:
        Padded positions / all positions, or 0.0 for no batches.
    """
    total = 0
    padded = 0
    for b in batches:
        mask = b["attention_mask"]
        total += mask.numel()
        padded += int((mask == 0).sum())
    return padded / total if total else 0.0
