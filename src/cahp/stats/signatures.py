"""CAHP steps 1-2: padding-aware behavioural signatures and head-to-head distances.

One streaming pass over a calibration sample. For every batch, `iter_attention`
gives each head's attention distribution for every real query token over the
real keys (padded query rows dropped, padded keys exactly zero); accumulators
add the batch's head-to-head divergences and per-head entropies, then the
batch's attention is dropped. Memory therefore depends on the batch, not on the
calibration size, and the same sentence padded to any length contributes the
same statistics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.core import distributed
from cahp.core.allocator import release_freed_memory
from cahp.data.batching import split_batches
from cahp.model.capture import iter_attention
from cahp.model.heads import kept_heads
from cahp.stats.distances import DISTANCES, DistanceAccumulator

log = logging.getLogger(__name__)

#: Default bound on the attention one forward pass of the signature pass holds:
#: examples x width**2 x heads <= this many float32 cells (4 MiB). Larger
#: batches are cut (`cahp.data.batching.split_batches`); the statistics are sums over
#: real query rows, so the cut changes them by rounding only, and peak memory
#: no longer depends on how long the longest sentence of the sample is.
MAX_ATTENTION_CELLS = 2**20


class EntropyAccumulator:
    """Mean attention entropy (nats) per head over real query rows.

    ``add_batch(P)`` with P (R, H, K); ``result()`` -> (H,) float64.
    """

    def __init__(self, num_heads: int):
        self.sums = torch.zeros(num_heads, dtype=torch.float64)
        self.count = 0

    def add_batch(self, P: torch.Tensor) -> None:
        # entr(x) = -x log x, 0 at x = 0: padded keys add nothing.
        self.sums += torch.special.entr(P.float()).sum(-1).sum(0).double().cpu()
        self.count += int(P.shape[0])

    def result(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("EntropyAccumulator has seen no rows")
        return self.sums / self.count


@dataclass
class Signatures:
    """What the calibration pass measured.

    Attributes:
        head_ids: (layer, head) of every flat index, layer-major, original numbering.
        distances: kind -> (H, H) float64 mean per-row divergence (units in `cahp.stats.distances`).
        entropy: (H,) mean attention entropy per head (nats).
        rows: real query rows seen; examples: calibration examples seen.
        seconds: kind -> seconds spent in that distance's accumulation; "forward" -> model passes.
    """

    head_ids: list[tuple[int, int]]
    distances: dict[str, torch.Tensor]
    entropy: torch.Tensor
    rows: int
    examples: int
    seconds: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict:
        return {
            "head_ids": torch.tensor(self.head_ids, dtype=torch.long),
            "entropy": self.entropy,
            "rows": self.rows,
            "examples": self.examples,
            "seconds": dict(self.seconds),
            **{f"distance_{k}": v for k, v in self.distances.items()},
        }

    @classmethod
    def from_state_dict(cls, s: dict) -> Signatures:
        return cls(
            head_ids=[tuple(x) for x in s["head_ids"].tolist()],
            distances={k[len("distance_"):]: v for k, v in s.items() if k.startswith("distance_")},
            entropy=s["entropy"],
            rows=int(s["rows"]),
            examples=int(s["examples"]),
            seconds=dict(s.get("seconds", {})),
        )


def collect_signatures(
    model: nn.Module,
    batches: Iterable[dict],
    kinds: Sequence[str] = ("js",),
    progress: bool = True,
    reduce=None,
    max_attention_cells: int | None = MAX_ATTENTION_CELLS,
) -> Signatures:
    """Stream ``batches`` through ``model`` and accumulate head signatures.

    Args:
        model: dense or pruned supported model (any attention implementation).
        batches: padded batches (see `cahp.data.batching`), e.g. a calibration sample.
        kinds: distances to accumulate (subset of `cahp.stats.distances.DISTANCES`).
        reduce: optional callable applied to every accumulator's (sums, count)
            before the results are taken (all-reduce across processes). None:
            under torchrun each rank streams its share of the batches
            (`cahp.core.distributed.shard`) and the sums are all-reduced
            (`cahp.core.distributed.all_reduce_sum`); with one process, nothing.
            A callable: the caller has sharded ``batches`` itself.
        max_attention_cells: batches whose attention (examples x width**2 x heads)
            exceeds this are cut into smaller ones; None: batches as given.

    Returns:
        `Signatures`; distances are symmetric with a zero diagonal.
    """
    unknown = [k for k in kinds if k not in DISTANCES]
    if unknown:
        raise ValueError(f"unknown distance {unknown}; choose from {', '.join(DISTANCES)}")
    if reduce is None:
        batches, reduce = distributed.shard(batches), distributed.all_reduce_sum
    kept = kept_heads(model.config)
    head_ids = [(layer, h) for layer, hs in sorted(kept.items()) for h in hs]
    n = len(head_ids)
    if max_attention_cells is not None:
        batches = split_batches(batches, max(1, max_attention_cells // max(n, 1)))
    accs = {k: DistanceAccumulator(n, k) for k in kinds}
    ent = EntropyAccumulator(n)
    seconds = {k: 0.0 for k in kinds}
    seconds["forward"] = 0.0
    examples = 0
    t = time.perf_counter()
    bar = tqdm(iter_attention(model, batches), desc="signatures", disable=not distributed.show_progress(progress),
               mininterval=2)
    for att in bar:
        seconds["forward"] += time.perf_counter() - t
        P = att.real_rows()  # (R, H, K)
        examples += att.attention_mask.shape[0]
        for k, acc in accs.items():
            t = time.perf_counter()
            acc.add_batch(P)
            seconds[k] += time.perf_counter() - t
        ent.add_batch(P)
        del att, P
        release_freed_memory()
        t = time.perf_counter()
    if reduce is not None:
        for acc in (*accs.values(), ent):
            acc.sums, acc.count = reduce(acc.sums, acc.count)
        examples = reduce(torch.zeros(1), examples)[1]
    if ent.count == 0:
        raise ValueError("the calibration batches held no real token")
    log.info("signatures: %d examples, %d real query rows, %d heads", examples, ent.count, n)
    return Signatures(
        head_ids=head_ids,
        distances={k: acc.result() for k, acc in accs.items()},
        entropy=ent.result(),
        rows=ent.count,
        examples=examples,
        seconds=seconds,
    )
