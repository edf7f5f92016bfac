"""The budget of joint (heads + FFN neurons) pruning: its latency axis, unit values on one scale, its knee.

- `combined_table`: one `CostTable` whose `estimated_latency` is the mean of
  the shares of several tables (e.g. batch 1 x 32 and 32 x 128). Each table is
  divided by its own dense total first, so every shape weighs the same however
  long its calls take; a share is linear in the block costs, so the mean of the
  shares is exactly the share of the averaged table, and `allocate` can work on
  it unchanged.
- `share_grid`: the curve's target shares, from 1.0 (dense) down; `floor_share`:
  a lower bound of every allocation's share (what stays: embeddings, LayerNorms,
  classifier, empty blocks' residual paths, one head), so the grid stops above it.
- `fair_values`: head and neuron salience on one scale (see its docstring).
- `knee_share`: the knee of score against estimated share, snapped to a grid point.
- `aim_each`: a selection whose estimated share is within a target at *every*
  shape, not only on average (`--speedup-at each`): the averaged table's target
  is tightened until the slowest shape's share is within it too; `worst_share`:
  the share it bounds, the largest of the shapes'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from cahp.budget.cost import BlockCost, CostTable, estimated_latency
from cahp.budget.knee import KneeResult, find_knee

__all__ = ["JointBudgetError", "aim_each", "combined_table", "fair_values", "floor_share", "knee_share", "share_grid",
           "worst_share"]

#: Shares are put on an integer axis of this many steps for `find_knee` (it takes integer ks).
SHARE_STEPS = 1000

#: Selections `aim_each` tries before it gives up. Every shape's share moves nearly in proportion to the
#: averaged one, so each try lands close to the bound: two or three are the rule.
AIM_TRIES = 6

#: Tolerance of `aim_each`'s bound (float sums of block costs).
AIM_TOL = 1e-9

T = TypeVar("T")


class JointBudgetError(ValueError):
    """A joint budget setting that cannot work (grid bounds, weights, tables that do not match)."""


def combined_table(tables: Sequence[CostTable]) -> CostTable:
    """The table whose estimated share is the mean of ``tables``' shares (each normalised to a dense total of 1)."""
    if not tables:
        raise JointBudgetError("no cost table to combine")
    first = tables[0]
    for t in tables[1:]:
        if t.n_layers != first.n_layers or [b.units for b in t.attention] != [b.units for b in first.attention] \
                or [b.units for b in t.ffn] != [b.units for b in first.ffn]:
            raise JointBudgetError("cost tables of different architectures cannot be combined")
    w = [1.0 / (len(tables) * t.dense_total()) for t in tables]

    def mix(blocks: list[list[BlockCost]]) -> list[BlockCost]:
        # blocks: one list per table of the same layer's block -> one averaged block per layer
        return [BlockCost(units=bs[0].units, fixed=sum(wi * b.fixed for wi, b in zip(w, bs)),
                          per_unit=sum(wi * b.per_unit for wi, b in zip(w, bs)),
                          empty=sum(wi * b.empty for wi, b in zip(w, bs)))
                for bs in zip(*blocks)]

    return CostTable(
        source="+".join(sorted({t.source for t in tables})), unit="share of dense", batch=0, seq=0,
        attention=mix([t.attention for t in tables]), ffn=mix([t.ffn for t in tables]),
        rest=sum(wi * t.rest for wi, t in zip(w, tables)),
        details={"shapes": [f"{t.batch}x{t.seq}" for t in tables]},
    )


def worst_share(tables: Sequence[CostTable], heads_per_layer: Sequence[int],
                neurons_per_layer: Sequence[int]) -> float:
    """The largest estimated share of dense latency, over ``tables`` (one per cost shape), of these kept counts."""
    return max(estimated_latency(t, heads_per_layer, neurons_per_layer) for t in tables)


def aim_each(select: Callable[[float], T | None], worst_share: Callable[[T], float], share: float,
             tries: int = AIM_TRIES) -> tuple[T | None, float]:
    """(selection, the averaged share it was aimed at) such that every shape's estimated share is ``<= share``.

    A target on the averaged table (`combined_table`) bounds the *mean* of the
    shapes' shares, so a shape slower to shrink than the others (batch 1 x 32,
    where fixed per-call costs weigh more) stays above it. Here the averaged
    target starts at ``share`` and, while the slowest shape's share ``w`` of
    the selection exceeds ``share``, is scaled by ``share / w`` (a hair below,
    so rounding cannot stall the loop) and the selection is made again.

    Args:
        select: the selection at an averaged share, or None where none reaches it.
        worst_share: the largest per-shape estimated share of a selection.
        share: the bound of every shape's share, in (0, 1].
        tries: selections made at most.

    Returns:
        ``(selection, aimed share)``; the selection is None where ``select`` gave None or ``tries`` ran out.
    """
    if not 0 < share <= 1:
        raise JointBudgetError(f"the target share must be in (0, 1], got {share!r}")
    aimed = share
    for _ in range(tries):
        sel = select(aimed)
        if sel is None:
            return None, aimed
        worst = float(worst_share(sel))
        if worst <= share + AIM_TOL:
            return sel, aimed
        aimed = aimed * share / worst * (1 - 1e-4)
    return None, aimed


def share_grid(points: int = 14, low: float = 0.25) -> list[float]:
    """``points`` target shares evenly spaced from 1.0 down to ``low`` (3 decimals), largest first."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 4:
        raise JointBudgetError(f"the share grid needs at least 4 points, got {points!r}")
    if not 0 < low < 1:
        raise JointBudgetError(f"the smallest share must be in (0, 1), got {low!r}")
    return [round(float(s), 3) for s in np.linspace(1.0, low, points)]


def floor_share(table: CostTable, min_heads: int = 1) -> float:
    """A lower bound of every allocation's share: every FFN empty, ``min_heads`` heads in the cheapest layer.

    `allocate`'s greedy may stop somewhat above it (it keeps the last heads where
    they are, not in the cheapest layer); a grid point between the two is skipped.
    """
    heads = [0] * table.n_layers
    if min_heads:
        cheapest = min(range(table.n_layers),
                       key=lambda i: table.attention[i].cost(min_heads) - table.attention[i].empty)
        heads[cheapest] = min_heads
    return estimated_latency(table, heads, [0] * table.n_layers)


def fair_values(table: CostTable, head_salience, neuron_salience, head_weight: float = 1.0):
    """Head and neuron values on one scale: each kind's salience rescaled so its mean value per cost is 1.

    A gate's ``|dL/dgate|`` is not comparable across kinds: a head gate scales a
    whole (d_head)-wide context at once, so its gradient sums its coordinates'
    contributions, which partly cancel, while the neuron gates take the absolute
    value one neuron at a time, so a head's worth of neurons adds up more
    gradient noise than one head gate sees (on an untrained model the greedy
    then keeps almost no head). So within each kind the values are divided by
    the kind's total salience and multiplied by the kind's total per-unit cost
    in the dense model: a unit of the kind's average salience is then worth
    exactly its cost, for heads and neurons alike, and the allocation removes
    the units least salient for their cost within their own kind first, with no
    kind favoured a priori. How the budget splits between kinds beyond that
    prior is the curve's decision: ``head_weight`` multiplies the head values
    (above 1 keeps more heads) and the pipeline scores a few weights per share.

    Args:
        table: the cost table the allocation uses.
        head_salience, neuron_salience: ``(layers, heads)`` / ``(layers, d_ff)`` non-negative salience.
        head_weight: positive multiplier of the head values.

    Returns:
        ``(head values, neuron values)``, float64 arrays of the input shapes.
    """
    if not head_weight > 0:
        raise JointBudgetError(f"the head weight must be positive, got {head_weight!r}")
    out = []
    for sal, blocks, weight in ((head_salience, table.attention, head_weight), (neuron_salience, table.ffn, 1.0)):
        s = np.asarray(sal, dtype=np.float64)
        cost = sum(b.per_unit * b.units for b in blocks)
        total = float(s.sum())
        if total <= 0 or cost <= 0:  # nothing measured, or units that cost nothing: leave the values as they are
            out.append(s * weight)
        else:
            out.append(s * (cost / total) * weight)
    return out[0], out[1]


def knee_share(shares: Sequence[float], scores: Sequence[float], degree: int | None = None,
               method: str = "chord") -> tuple[float, KneeResult]:
    """(knee share snapped to the nearest of ``shares``, the knee on the integer axis) of score against share.

    The axis runs the same way as heads-only's k: a lower share keeps fewer units
    and scores lower, so the knee is where removing more starts to cost sharply.
    Shares are put on an integer axis (per `SHARE_STEPS`) because `find_knee`
    takes integer counts; ties in snapping go to the larger share (keep more).
    """
    if len(shares) != len(scores) or not shares:
        raise JointBudgetError("shares and scores must be non-empty and of the same length")
    ks = [max(1, round(s * SHARE_STEPS)) for s in shares]
    knee = find_knee(ks, scores, degree=degree, method=method)
    grid = sorted(set(shares), reverse=True)
    share = min(grid, key=lambda s: (abs(s * SHARE_STEPS - knee.k), -s))
    return float(share), knee
