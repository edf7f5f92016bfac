"""Joint selection of heads and FFN neurons: per-layer complementary representatives, global allocation.

Pure functions over statistics (no model):

- `select_units` keeps ``k`` units of one layer CAHP-style: average-linkage
  agglomerative clustering of the layer's distance matrix cut into exactly
  ``k`` clusters, and each cluster's most salient member. The dendrogram is
  built once per layer (`layer_linkage`, O(n^2) time and memory: a condensed
  matrix of n (n - 1) / 2 float64) and any ``k`` is a cut of it, so the kept
  sets are nested: the set for ``k`` is contained in the set for ``k + 1``
  (a split cluster keeps its representative in one half). Deterministic: no
  random start, ties follow the linkage order.
- `allocate` chooses how many heads and neurons each layer keeps so that the
  estimated latency share (`cahp.budget.cost.estimated_latency`) reaches a
  target: greedy removal by salience per unit of cost saved. In a block that
  keeps ``c`` units the next removal is either its least salient unit (value:
  that salience; saving: ``per_unit``) or the whole block (value: the sum of
  its remaining saliences; saving: ``cost(c) - empty``, which includes the
  block's fixed cost); with costs linear in the kept count no other step can
  have a lower value per saving. The step of lowest ratio goes first, until
  the share is at most the target; then removed units are put back, best
  ratio first, while the share stays within it (the last step may overshoot).
  A unit's value is its salience (``|dL/dgate|`` or the Fisher, for heads and
  neurons alike: both gates take the loss along the path to removal), so heads
  and neurons compete on one scale.
- `greedy_order` is the other within-layer rule (``within="greedy"``): units
  ranked by salience discounted by their nearness to the units ranked before
  them, so a near-duplicate of a kept unit waits and a distinct, salient one
  does not. Keeping ``k`` is the first ``k`` of the order (nested sets too).
  Cluster representatives keep every outlier cluster's member, however little
  salience it has: cut into few clusters, a layer's tree is mostly singletons
  of unusual units and one large cluster, so the kept units hold far less of
  the layer's salience than its most salient units would (docs/METHOD.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from cahp.budget.cost import CostTable, estimated_latency
from cahp.selectors.cahp import most_salient_members
from cahp.selectors.graph import check_distance_matrix

__all__ = [
    "LINKAGES",
    "WITHIN",
    "Allocation",
    "JointSelectionError",
    "JointSelector",
    "allocate",
    "cut_linkage",
    "greedy_order",
    "head_blocks",
    "head_selection",
    "layer_inputs",
    "layer_linkage",
    "neuron_selection",
    "select_layers",
    "select_units",
]

LINKAGES = ("average", "complete", "single")

#: Within-layer rules of `JointSelector`: cluster representatives (`select_units`) or the redundancy-discounted
#: salience order (`greedy_order`).
WITHIN = ("clusters", "greedy")


class JointSelectionError(ValueError):
    """Statistics or budgets that do not fit together (shapes, counts, targets)."""


def layer_linkage(D: Any, method: str = "average") -> np.ndarray:
    """Agglomerative merge tree of one layer's ``(n, n)`` distance matrix (scipy's ``(n - 1, 4)`` format)."""
    if method not in LINKAGES:
        raise JointSelectionError(f"unknown linkage {method!r}; choose from {', '.join(LINKAGES)}")
    D = check_distance_matrix(D)
    if D.shape[0] < 2:
        return np.zeros((0, 4))
    return linkage(squareform(D, checks=False), method=method)


def cut_linkage(Z: np.ndarray, n: int, k: int) -> np.ndarray:
    """Exactly ``k`` cluster labels (0..k-1, in order of first member) for ``n`` items: the first ``n - k`` merges."""
    if not 1 <= k <= n:
        raise JointSelectionError(f"cannot cut {n} units into {k} clusters")
    parent = np.arange(2 * n - 1)
    for m in range(n - k):
        parent[int(Z[m, 0])] = parent[int(Z[m, 1])] = n + m
    # A merged node's id is larger than its children's: walking ids downwards meets every parent first.
    root = parent.copy()
    for node in range(2 * n - 2, -1, -1):
        root[node] = root[parent[node]]
    _, first, inverse = np.unique(root[:n], return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))  # clusters numbered by their first member
    return rank[inverse.reshape(-1)]


def layer_inputs(D: Any, salience: Any) -> tuple[np.ndarray, np.ndarray]:
    """One layer's checked ``(n, n)`` distances and ``(n,)`` float64 salience (the within-layer rules' inputs)."""
    D = check_distance_matrix(D)
    salience = np.asarray(salience, dtype=np.float64)
    if salience.shape != (D.shape[0],):
        raise JointSelectionError(f"salience must have shape ({D.shape[0]},) to match D, got {salience.shape}")
    return D, salience


def select_units(D: Any, salience: Any, k: int, method: str = "average", Z: np.ndarray | None = None) -> np.ndarray:
    """Keep ``k`` of a layer's units: ``k`` clusters of ``D``, each cluster's most salient member.

    Args:
        D: ``(n, n)`` distances between the layer's units (e.g. `cahp.stats.neurons.NeuronStats.distance`).
        salience: ``(n,)`` salience (higher = more important).
        k: units to keep, ``0 <= k <= n``.
        method: linkage (`LINKAGES`).
        Z: the layer's `layer_linkage`, to reuse across budgets.

    Returns:
        ``(k,)`` int64 sorted positions in ``D``'s rows.
    """
    D, salience = layer_inputs(D, salience)
    n = D.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise JointSelectionError(f"cannot keep {k!r} of {n} units")
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    if Z is None:
        Z = layer_linkage(D, method)
    return most_salient_members(cut_linkage(Z, n, int(k)), salience)


def greedy_order(D: Any, salience: Any) -> np.ndarray:
    """All of a layer's units, most wanted first: salience discounted by nearness to the units before.

    Unit ``i``'s value is ``salience[i] * min(1, d(i, S) / m)`` with ``S`` the
    units ranked so far, ``d(i, S)`` its smallest distance to them and ``m`` the
    median distance between distinct units (the layer's typical distance, so the
    rule does not depend on the distance's scale): a unit no nearer to the kept
    ones than a typical pair is ranked by its salience alone, a duplicate of a
    kept unit (distance 0) goes last. The first pick is the most salient unit;
    ties go to the lower index. O(n^2) time, O(n) memory beyond ``D``.

    Args:
        D: ``(n, n)`` distances between the layer's units.
        salience: ``(n,)`` non-negative salience (higher = more important).

    Returns:
        ``(n,)`` int64 positions in ``D``'s rows, the order of picks.
    """
    D, s = layer_inputs(D, salience)
    n = D.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    off = D[~np.eye(n, dtype=bool)]
    m = float(np.median(off)) if off.size else 0.0
    near = np.ones(n)  # min(1, d(i, S) / m) over the units picked so far; 1 before any pick
    taken = np.zeros(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    for t in range(n):
        value = np.where(taken, -np.inf, s * near)
        i = int(np.argmax(value))  # the first of equal maxima: the lower index
        order[t] = i
        taken[i] = True
        if m > 0:
            np.minimum(near, np.minimum(D[i] / m, 1.0), out=near)
    return order


def head_blocks(D: np.ndarray, head_ids: Sequence[tuple[int, int]], salience: np.ndarray,
                n_layers: int) -> list[tuple[list[int], np.ndarray, np.ndarray]]:
    """Per layer, (original heads, their ``(n_l, n_l)`` block of ``D``, their ``(n_l,)`` salience) of the heads
    whose rows ``D`` holds (``head_ids[row]`` = (layer, head); ``salience`` is ``(layers, heads)``)."""
    out = []
    for layer in range(n_layers):
        rows = [r for r, (li, _) in enumerate(head_ids) if li == layer]
        heads = [head_ids[r][1] for r in rows]
        out.append((heads, D[np.ix_(rows, rows)], salience[layer, heads] if heads else np.zeros(0)))
    return out


def select_layers(
    distances: Sequence[Any], saliences: Sequence[Any], keep: Sequence[int], ids: Sequence[Sequence[int]] | None = None,
    method: str = "average",
) -> dict[int, list[int]]:
    """`select_units` in every layer: {layer: kept ids} (``ids[layer][position]``, else positions)."""
    if not len(distances) == len(saliences) == len(keep) or (ids is not None and len(ids) != len(keep)):
        raise JointSelectionError("distances, saliences, keep (and ids) must list the same layers")
    out = {}
    for layer, (D, s, k) in enumerate(zip(distances, saliences, keep)):
        if D is None or np.size(D) == 0:
            if k:
                raise JointSelectionError(f"layer {layer} holds no unit: it cannot keep {k}")
            out[layer] = []
            continue
        pos = select_units(D, s, k, method=method)
        out[layer] = [int(ids[layer][p]) for p in pos] if ids is not None else pos.tolist()
    return out


def neuron_selection(stats, neurons_per_layer: Sequence[int], method: str = "average") -> dict[int, list[int]]:
    """Kept neurons {layer: original indices} for the counts of an `Allocation`, from a `NeuronStats`.

    In each layer `select_units` over ``stats.distance(layer)`` with the
    neurons' ``stats.salience``; a layer keeping none (or with an empty FFN) gets ``[]``.
    """
    ids = stats.neuron_ids
    if len(neurons_per_layer) != len(ids):
        raise JointSelectionError(f"neurons per layer lists {len(neurons_per_layer)} layers, the statistics {len(ids)}")
    distances = [stats.distance(i).numpy() if k and ids[i] else None for i, k in enumerate(neurons_per_layer)]
    saliences = [stats.salience[i, ids[i]].numpy() for i in range(len(ids))]
    return select_layers(distances, saliences, list(neurons_per_layer), ids=ids, method=method)


def head_selection(
    D: Any, head_ids: Sequence[tuple[int, int]], salience: Any, heads_per_layer: Sequence[int],
    method: str = "average",
) -> dict[int, list[int]]:
    """Kept heads {layer: original heads} for per-layer counts, CAHP-style within each layer.

    Args:
        D: ``(n, n)`` distances of the ``n`` heads the model holds (`cahp.stats.signatures.Signatures`).
        head_ids: (layer, head) of each row of ``D``.
        salience: ``(layers, heads)`` head salience, original numbering.
        heads_per_layer: heads each layer keeps (e.g. `Allocation.heads`).
    """
    D = check_distance_matrix(D)
    salience = np.asarray(salience, dtype=np.float64)
    if len(head_ids) != D.shape[0]:
        raise JointSelectionError(f"head_ids lists {len(head_ids)} heads, D has {D.shape[0]}")
    blocks = head_blocks(D, head_ids, salience, len(heads_per_layer))
    distances = [Dl if ids else None for ids, Dl, _ in blocks]
    return select_layers(distances, [sal for _, _, sal in blocks], list(heads_per_layer),
                         ids=[ids for ids, _, _ in blocks], method=method)


@dataclass
class Allocation:
    """Units each layer keeps, and the resulting estimated share of dense latency."""

    heads: list[int]
    neurons: list[int]
    share: float


class _Block:
    """One block's state in the greedy: its saliences (descending) and how many it keeps."""

    def __init__(self, kind: str, layer: int, cost, salience: np.ndarray):
        self.kind, self.layer, self.cost = kind, layer, cost
        self.s = np.sort(salience)[::-1]  # descending: the c kept are the first c
        self.prefix = np.concatenate([[0.0], np.cumsum(self.s)])
        self.c = len(self.s)
        self.version = 0

    def steps(self, protect_last: bool) -> list[tuple[float, int]]:
        """(value per saving, units removed) of the block's two candidate removals."""
        out = []
        if self.c >= 2 and self.cost.per_unit > 0:
            out.append((self.s[self.c - 1] / self.cost.per_unit, 1))
        saving = self.cost.cost(self.c) - self.cost.empty
        if self.c >= 1 and saving > 0 and not protect_last:
            out.append((self.prefix[self.c] / saving, self.c))
        return out


def _present_saliences(salience, present, n_layers, what) -> list[np.ndarray]:
    s = np.asarray(salience, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != n_layers:
        raise JointSelectionError(f"{what} salience must be (layers={n_layers}, units), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise JointSelectionError(f"{what} salience contains NaN or infinite values")
    mask = np.ones_like(s, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    if mask.shape != s.shape:
        raise JointSelectionError(f"{what} present mask has shape {mask.shape}, salience {s.shape}")
    return [s[i][mask[i]] for i in range(n_layers)]


def allocate(
    table: CostTable,
    head_salience: Any | None,
    neuron_salience: Any | None,
    target: float,
    heads_present: Any | None = None,
    neurons_present: Any | None = None,
    min_heads: int = 1,
) -> Allocation:
    """Kept heads and neurons per layer for an estimated latency share of at most ``target`` (see module docstring).

    Args:
        table: the `CostTable` the share is estimated with.
        head_salience, neuron_salience: ``(layers, heads)`` / ``(layers, d_ff)`` per-unit values, original
            numbering; None keeps that kind as it is (heads-only or neurons-only allocation).
        target: estimated share of dense latency to reach, in (0, 1].
        heads_present, neurons_present: bool masks of the units the model still has (default: all).
        min_heads: heads the whole model keeps at least (a model without attention ignores its context).

    Raises:
        JointSelectionError: shapes that do not match the table, or a target the allowed removals cannot reach.
    """
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 1:
        raise JointSelectionError(f"target share must be in (0, 1], got {target!r}")
    L = table.n_layers
    blocks: list[_Block] = []
    fixed_heads = fixed_neurons = None
    for kind, sal, present, costs in (
        ("heads", head_salience, heads_present, table.attention),
        ("neurons", neuron_salience, neurons_present, table.ffn),
    ):
        if sal is None:
            units = [c.units for c in costs] if present is None else np.asarray(present, bool).sum(1).tolist()
            if kind == "heads":
                fixed_heads = units
            else:
                fixed_neurons = units
            continue
        for layer, s in enumerate(_present_saliences(sal, present, L, kind)):
            if len(s) > costs[layer].units:
                raise JointSelectionError(f"layer {layer} has {len(s)} {kind}, the cost table {costs[layer].units}")
            blocks.append(_Block(kind, layer, costs[layer], s))

    def counts() -> tuple[list[int], list[int]]:
        heads = list(fixed_heads) if fixed_heads is not None else [0] * L
        neurons = list(fixed_neurons) if fixed_neurons is not None else [0] * L
        for b in blocks:
            (heads if b.kind == "heads" else neurons)[b.layer] = b.c
        return heads, neurons

    total = table.dense_total()
    cost = estimated_latency(table, *counts()) * total  # kept up to date step by step below
    n_heads = sum(counts()[0])
    heap: list = []

    def push(i: int) -> None:
        b = blocks[i]
        protect = b.kind == "heads" and n_heads - b.c < min_heads
        for ratio, m in b.steps(protect):
            heapq.heappush(heap, (ratio, -m, i, b.version, m))  # ties: the larger step, then the lower block

    for i in range(len(blocks)):
        push(i)
    while cost > target * total:
        if not heap:
            raise JointSelectionError(
                f"an estimated share of {target} cannot be reached (at best {cost / total:.4f})"
            )
        _, _, i, version, m = heapq.heappop(heap)
        b = blocks[i]
        if version != b.version or (b.kind == "heads" and n_heads - m < min_heads):
            continue  # stale, or it would leave the model with too few heads (only gets worse: drop it)
        cost -= b.cost.cost(b.c) - b.cost.cost(b.c - m)
        b.c -= m
        b.version += 1
        if b.kind == "heads":
            n_heads -= m
        push(i)
        if b.kind == "heads" and b.c == 0:  # other head blocks may now be the last ones standing
            for j, other in enumerate(blocks):
                if other.kind == "heads" and other.c and j != i:
                    other.version += 1
                    push(j)
    # Put back what fits: single units into blocks that still run, best value per cost first.
    refill = [(-b.s[b.c] / b.cost.per_unit, i) for i, b in enumerate(blocks)
              if 1 <= b.c < len(b.s) and b.cost.per_unit > 0]
    heapq.heapify(refill)
    while refill:
        _, i = heapq.heappop(refill)
        b = blocks[i]
        if cost + b.cost.per_unit > target * total:
            continue
        cost += b.cost.per_unit
        b.c += 1
        if b.c < len(b.s):
            heapq.heappush(refill, (-b.s[b.c] / b.cost.per_unit, i))
    heads, neurons = counts()
    return Allocation(heads=heads, neurons=neurons, share=estimated_latency(table, heads, neurons))


class JointSelector:
    """CAHP-style selection of kept heads and neurons for any `Allocation`, merge trees built once.

    Per layer, the heads' (rows of the head distance matrix) and the neurons'
    (`NeuronStats.distance`) `layer_linkage` is computed on construction; every
    `select` is then a cut of those trees (`cut_linkage`) and each cluster's most
    salient member, so a curve over many budgets clusters each layer once.

    Args:
        head_distances: ``(n, n)`` distances of the heads the model holds, rows in ``head_ids`` order.
        head_ids: (layer, head) of each row.
        head_salience: ``(layers, heads)``, original numbering (the representatives' ranking).
        neuron_stats: a `cahp.stats.neurons.NeuronStats` with correlations (its salience ranks neurons).
        method: linkage (`LINKAGES`).
        within: the rule in each layer (`WITHIN`): "clusters" cuts the merge trees, "greedy" keeps the
            first units of each layer's `greedy_order` (computed once, like the trees).
    """

    def __init__(self, head_distances: Any, head_ids: Sequence[tuple[int, int]], head_salience: Any, neuron_stats,
                 method: str = "average", within: str = "clusters"):
        if within not in WITHIN:
            raise JointSelectionError(f"unknown within-layer rule {within!r}; choose from {', '.join(WITHIN)}")
        self.within = within
        D = check_distance_matrix(head_distances)
        if len(head_ids) != D.shape[0]:
            raise JointSelectionError(f"head_ids lists {len(head_ids)} heads, the distances {D.shape[0]}")
        hs = np.asarray(head_salience, dtype=np.float64)
        n_layers = len(neuron_stats.neuron_ids)
        # per layer: {"heads": (ids, tree, salience), "neurons": (ids, tree, salience)}; the tree is the
        # merge tree (clusters) or the pick order (greedy)
        self.layers = []

        def tree(D_layer: np.ndarray, sal: np.ndarray) -> np.ndarray:
            return layer_linkage(D_layer, method) if within == "clusters" else greedy_order(D_layer, sal)

        for layer, (h_ids, h_D, h_sal) in enumerate(head_blocks(D, head_ids, hs, n_layers)):
            n_ids = list(neuron_stats.neuron_ids[layer])
            n_sal = neuron_stats.salience[layer, n_ids].double().numpy() if n_ids else np.zeros(0)
            h_T = tree(h_D, h_sal) if h_ids else None
            n_T = tree(neuron_stats.distance(layer).numpy(), n_sal) if n_ids else None
            self.layers.append({"heads": (h_ids, h_T, h_sal), "neurons": (n_ids, n_T, n_sal)})

    def _kind(self, kind: str, counts: Sequence[int]) -> dict[int, list[int]]:
        if len(counts) != len(self.layers):
            raise JointSelectionError(f"{kind} per layer lists {len(counts)} layers, the model has {len(self.layers)}")
        out = {}
        for layer, (entry, k) in enumerate(zip(self.layers, counts)):
            ids, T, sal = entry[kind]
            n = len(ids)
            if not 0 <= k <= n:
                raise JointSelectionError(f"layer {layer} holds {n} {kind}: it cannot keep {k}")
            if k == 0:
                out[layer] = []
            elif k == n:
                out[layer] = list(ids)
            elif self.within == "greedy":
                out[layer] = sorted(int(ids[p]) for p in T[:k])
            else:
                out[layer] = [int(ids[p]) for p in most_salient_members(cut_linkage(T, n, int(k)), sal)]
        return out

    def select(self, allocation: Allocation) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """(kept heads, kept neurons), each {layer: original indices}, for ``allocation``'s counts."""
        return self._kind("heads", allocation.heads), self._kind("neurons", allocation.neurons)
