"""CAHP under the grouped-query constraint: the budget is in key/value heads, selections keep whole KV groups.

Ours, not the paper's (the paper prunes encoders, where every head has its own
keys and values). In a grouped-query decoder several query heads read one
key/value head; removing query heads alone leaves the KV cache as it was, and
the KV cache is what generation pays for. So the unit of selection here is the
**KV group**: a key/value head together with the query heads that read it.

- Signature of a group: the attention signatures of its query heads (each
  query head attends through the group's keys, so they are the group's
  behaviour). Distance between two groups: the mean of the head distance
  (step 2, e.g. Jensen-Shannon) over every pair of their query heads; a group's
  distance to itself is 0 (`group_distances`).
- Steps 3-4 run unchanged on the group graph: the groups are clustered into
  exactly k clusters (`cahp.selectors.graph.cluster`).
- Step 5: in every cluster the group with the largest **summed** salience of
  its query heads stays (summed: removing a group removes all of its heads at
  once, and the first-order loss change of gating several heads is the sum of
  their gate gradients).
- Budget: k = kept KV heads over all layers (layers may end uneven or empty),
  so the KV cache per token shrinks exactly by the share of KV heads removed.
  Query heads are not pruned inside kept groups.

How the k groups are spread over the layers (`GroupCAHPSelector.kv_allocation`):

- ``"salience"`` (ours): layer l keeps n_l groups, n_l = how
  many of the top-k groups by summed salience lie in layer l (ties to the
  lower group index, as gqa-gradient); a layer with 0 < n_l < its groups
  clusters its own groups into n_l clusters (the same distance, clustering,
  seed and graph settings, on that layer's block of `group_distances`) and
  keeps each cluster's most salient group (n_l = 1: the layer's most salient
  group); n_l = all keeps all, n_l = 0 none. The total is k and the per-layer
  counts equal gqa-gradient's; only which groups of a partly kept layer stay
  can differ. Why: under the global rule the groups of a layer whose groups
  look alike (SmolLM2's layer 0) fall into one cluster whose representative,
  the group of largest summed salience, lies in another layer, so that layer
  is emptied first and perplexity explodes, while the salience ranking keeps
  it (RESULTS.md, the SmolLM2 sections with both rules).
- ``"greedy"`` (ours, the default): the per-layer counts of ``"salience"``, and inside a
  partly kept layer the first n_l groups of `cahp.selectors.joint.greedy_order`
  on that layer's block of `group_distances` and the summed saliences (the
  within-layer rule of joint CAHP on encoders): the most salient group first,
  then each next group by its summed salience discounted by its nearness to the
  groups taken. Why: cutting a layer's 2-4 groups into n_l clusters makes the
  unusual groups singletons, and a singleton stays however little salience it
  has; the greedy order keeps a salient group unless it duplicates one kept.
  The default since it measured better than ``"salience"`` against
  gqa-gradient on SmolLM2 (docs/METHOD.md says how; RESULTS.md has the runs).
- ``"global"`` (as the encoders' heads): one clustering of all groups of all
  layers into k clusters, as above.

Baselines at the same KV-head budgets, behind the same contract
(`KVGroupSelector`): random groups (seeded, nested in k), magnitude (L2 norm
of the group's own weights: its query heads' q rows and o columns and its k/v
rows), gradient (summed mean |dL/dgate| of the group's query heads) and Fisher
(summed diagonal Fisher of those gates). Ties go to the lower group index.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.model.heads import kept_heads, kept_kv_heads
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, require
from cahp.selectors.cahp import representatives
from cahp.selectors.graph import cluster
from cahp.selectors.joint import greedy_order

__all__ = ["GQA_SELECTORS", "GQAStats", "GroupCAHPSelector", "GroupFisherSelector", "GroupGradientSelector",
           "GroupMagnitudeSelector", "GroupRandomSelector", "KVBudgetError", "KVGroupSelector", "KV_ALLOCATIONS",
           "KV_ALLOCATION_CHOICES",
           "check_kv_budget", "check_kv_mask", "kv_allocation_rule", "gqa_stats", "group_distances", "group_magnitudes"]


class KVBudgetError(ValueError):
    """A KV-head budget outside 1..the number of KV heads, or a selection that breaks a KV group."""


@dataclass
class GQAStats(HeadStats):
    """`HeadStats` of a grouped-query model, plus the KV head each original query head reads.

    Attributes:
        kv_of: (original query heads per layer,) the original KV head of each query head
            (`cahp.model.heads.kv_head_of`).

    A group is (layer, KV head) with the flat indices of the query heads it still has;
    groups are ordered layer-major, then by KV head.
    """

    kv_of: list[int] = field(default_factory=list)

    @property
    def groups(self) -> list[tuple[int, int, list[int]]]:
        """(layer, KV head, flat query-head indices) of every group the model still has."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, (layer, h) in enumerate(self.head_ids):
            out.setdefault((layer, self.kv_of[h]), []).append(i)
        return [(layer, kv, members) for (layer, kv), members in sorted(out.items())]

    @property
    def n_kv(self) -> int:
        """Number of KV heads (groups) the model still has."""
        return len(self.groups)

    def group_sum(self, per_head: torch.Tensor) -> np.ndarray:
        """(L, H) per-query-head values -> (groups,) their sums over each group's query heads."""
        flat = self.flat(per_head)
        return np.array([flat[members].sum() for _, _, members in self.groups])

    def mask_of_groups(self, group_indices) -> torch.Tensor:
        """Bool (L, H) mask of every query head of the given groups."""
        groups = self.groups
        return self.mask_of([i for g in group_indices for i in groups[int(g)][2]])


def gqa_stats(stats: HeadStats, model_or_config) -> GQAStats:
    """``stats`` with the model's query-to-KV map (`GQAStats`)."""
    config = getattr(model_or_config, "config", model_or_config)
    return GQAStats(head_ids=stats.head_ids, shape=stats.shape, distances=stats.distances, salience=stats.salience,
                    fisher=stats.fisher, entropy=stats.entropy, kv_of=get_adapter(config).kv_head_of(config))


def check_kv_budget(k: int, stats: GQAStats) -> int:
    """``k`` as an int, or a `KVBudgetError` unless 1 <= k <= the number of KV heads."""
    n = stats.n_kv
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n:
        raise KVBudgetError(f"cannot keep {k} KV heads: the model has {n}; choose 1..{n}")
    return int(k)


def check_kv_mask(mask: torch.Tensor, k: int, stats: GQAStats) -> torch.Tensor:
    """Raise unless ``mask`` keeps exactly k whole KV groups of heads the model has."""
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(stats.shape):
        raise KVBudgetError(f"a selection must be a bool {tuple(stats.shape)} mask, got {mask.dtype} "
                            f"{tuple(mask.shape)}")
    if bool((mask & ~stats.mask_of(range(stats.n))).any()):
        raise KVBudgetError("the selection keeps heads the model no longer has")
    flat = stats.flat(mask.double()).astype(bool)
    kept = 0
    for layer, kv, members in stats.groups:
        n_on = int(flat[members].sum())
        if n_on not in (0, len(members)):
            raise KVBudgetError(f"the selection splits KV group {kv} of layer {layer} ({n_on} of its "
                                f"{len(members)} query heads)")
        kept += n_on > 0
    if kept != k:
        raise KVBudgetError(f"the selection keeps {kept} KV heads, not {k}")
    return mask


def group_distances(stats: GQAStats, kind: str) -> np.ndarray:
    """(groups, groups) mean head distance between the query heads of two groups; 0 on the diagonal."""
    if kind not in stats.distances:
        raise ValueError(f"no {kind!r} distances were computed (have: {sorted(stats.distances)})")
    D = stats.distances[kind].double().numpy()
    groups = stats.groups
    # one-hot membership (groups, n): M D M^T / (|A| |B|) is the mean over pairs of query heads
    M = np.zeros((len(groups), stats.n))
    for g, (_, _, members) in enumerate(groups):
        M[g, members] = 1.0 / len(members)
    G = M @ D @ M.T
    G = (G + G.T) / 2
    np.fill_diagonal(G, 0.0)
    return np.maximum(G, 0.0)


@torch.no_grad()
def group_magnitudes(model: nn.Module, stats: GQAStats) -> np.ndarray:
    """(groups,) L2 norm of each group's own weights: its query heads' q rows (and biases) and o columns,
    and its KV head's k and v rows (and biases)."""
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    kept_q, kept_kv = kept_heads(model.config), kept_kv_heads(model.config)
    out = []
    for layer, kv, members in stats.groups:
        lh = adapter.heads(adapter.layers(model)[layer])
        sq = torch.zeros((), dtype=torch.float64)
        for i in members:
            pos = kept_q[layer].index(stats.head_ids[i][1])  # the head's slice of the (pruned) projections
            rows = slice(pos * d, (pos + 1) * d)
            sq += lh.o.weight[:, rows].double().square().sum() + lh.q.weight[rows].double().square().sum()
            if lh.q.bias is not None:
                sq += lh.q.bias[rows].double().square().sum()
        rows = slice(kept_kv[layer].index(kv) * d, (kept_kv[layer].index(kv) + 1) * d)
        for proj in (lh.k, lh.v):
            sq += proj.weight[rows].double().square().sum()
            if proj.bias is not None:
                sq += proj.bias[rows].double().square().sum()
        out.append(float(sq.sqrt()))
    return np.array(out)


class KVGroupSelector(HeadSelector):
    """A rule that keeps k whole KV groups (k = KV heads) of a grouped-query model.

    `select` takes a `GQAStats` and returns the bool (layers, query heads) mask of
    every query head of the kept groups (`check_kv_mask` holds for it).
    """

    budget_unit: ClassVar[str] = "kv_heads"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """Bool (layers, heads) mask of the query heads of the k kept KV groups."""
        if not isinstance(stats, GQAStats):
            raise ValueError(f"the {self.name} selector needs GQAStats (the query-to-KV map of the model)")
        k = check_kv_budget(k, stats)
        return stats.mask_of_groups(sorted(self.select_groups(k, stats, ctx)))

    @abstractmethod
    def select_groups(self, k: int, stats: GQAStats, ctx: SelectionContext | None) -> list[int]:
        """Indices into ``stats.groups`` of the k groups to keep."""


def _top_groups(scores: np.ndarray, k: int) -> list[int]:
    """The k groups of highest score (ties: lower group index first)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k].tolist()


#: How `GroupCAHPSelector` spreads the KV-head budget over layers (see the module docstring).
KV_ALLOCATIONS: tuple[str, ...] = ("global", "salience", "greedy")
#: what ``--kv-allocation`` accepts: the rules, and ``"auto"`` (resolved by `kv_allocation_rule`)
KV_ALLOCATION_CHOICES: tuple[str, ...] = ("auto", *KV_ALLOCATIONS)


def kv_allocation_rule(given: str) -> str:
    """The rule ``--kv-allocation given`` runs: ``"auto"`` (the command's default) is ``"greedy"``."""
    return "greedy" if given == "auto" else given


@dataclass
class GroupCAHPSelector(KVGroupSelector):
    """CAHP on KV groups: cluster the group graph into k clusters, keep each cluster's most salient group.

    ``kv_allocation``: ``"salience"`` gives each layer the count the summed-salience ranking gives it and
    clusters within each layer; ``"greedy"`` (default) takes the same counts and the greedy order within each layer;
    ``"global"`` clusters all groups of all layers at once (module docstring).
    The field is named as `cahp.pipelines.stages.PruneConfig.kv_allocation`, so `make_selector`'s shared
    settings reach it and no other selector.
    """

    distance: str = "js"
    clustering: str = "spectral"
    seed: int = 0
    kernel: str = "gaussian"
    bandwidth: str | float = "median"
    kv_allocation: str = "greedy"
    name: str = "gqa-cahp"

    def __post_init__(self):
        if self.kv_allocation not in KV_ALLOCATIONS:
            raise ValueError(f"kv_allocation must be one of {', '.join(KV_ALLOCATIONS)}, got {self.kv_allocation!r}")

    def select_groups(self, k: int, stats: GQAStats, ctx: SelectionContext | None) -> list[int]:
        """Representatives (largest summed salience) of the clusters of `group_distances`: k clusters of all
        groups ("global"), or per layer as many clusters as the summed-salience ranking keeps there ("salience")."""
        if stats.salience is None:
            raise ValueError("CAHP needs head salience")
        salience = stats.group_sum(stats.salience)  # (groups,)
        D = group_distances(stats, self.distance)  # (groups, groups)
        if self.kv_allocation in ("salience", "greedy"):
            return self._within_layers(k, stats, D, salience)
        return representatives(self._cluster(D, k), salience).tolist()

    def _cluster(self, D: np.ndarray, k: int) -> np.ndarray:
        """(n,) labels of ``D``'s n groups in exactly k clusters, with the selector's clustering settings."""
        graph = {"kernel": self.kernel, "bandwidth": self.bandwidth} if self.clustering == "spectral" else {}
        return cluster(D, k, method=self.clustering, seed=self.seed, **graph)

    def _within_layers(self, k: int, stats: GQAStats, D: np.ndarray, salience: np.ndarray) -> list[int]:
        """The "salience" and "greedy" allocations: per-layer counts of the top-k groups by summed salience,
        then inside each partly kept layer, on that layer's (n_layer, n_layer) block of ``D``, CAHP's cluster
        representatives ("salience") or the first groups of the greedy order ("greedy")."""
        layer_of = np.array([layer for layer, _, _ in stats.groups])  # (groups,) layer of each group
        counts = np.bincount(layer_of[_top_groups(salience, k)], minlength=int(layer_of.max()) + 1)
        kept: list[int] = []
        for layer in np.unique(layer_of):
            idx = np.flatnonzero(layer_of == layer)  # this layer's groups, ascending (ties: lower index)
            n_keep = int(counts[layer])
            if n_keep == 0:
                continue
            if n_keep == len(idx):  # nothing to choose; also spares the clustering a layer of one group
                kept += idx.tolist()
                continue
            # here 1 <= n_keep < len(idx) (so the layer has >= 2 groups): `cluster` takes every such count;
            # n_keep = 1 keeps the layer's most salient group under either rule
            block = D[np.ix_(idx, idx)]
            if self.kv_allocation == "greedy":
                kept += idx[greedy_order(block, salience[idx])[:n_keep]].tolist()
                continue
            kept += idx[representatives(self._cluster(block, n_keep), salience[idx])].tolist()
        return kept

    @property
    def tag(self) -> str:
        """``gqa-cahp``, plus ``-<allocation>`` unless it is "global": the file name of its cached curve, so
        runs of both allocations in one folder keep one curve each ("global", the default before "salience",
        keeps the name it had)."""
        return self.name if self.kv_allocation == "global" else f"{self.name}-{self.kv_allocation}"

    def settings(self) -> dict:
        """Distance, clustering, its seed, the spectral graph's kernel and bandwidth, and the allocation
        unless it is "global"."""
        out = {"distance": self.distance, "clustering": self.clustering, "seed": self.seed,
               "kernel": self.kernel, "bandwidth": self.bandwidth, "unit": "kv_group"}
        # settings() is part of the curve and compare cache keys and of the reports: "global" (the only rule
        # before this setting existed) leaves it out so that the keys, caches and results made then stay valid
        if self.kv_allocation != "global":
            out["allocation"] = self.kv_allocation
        return out


@dataclass
class GroupRandomSelector(KVGroupSelector):
    """k groups drawn uniformly at random (seeded); nested in k: the first k of one permutation of the groups."""

    seed: int = 0
    name: str = "gqa-random"
    seeded: ClassVar[bool] = True

    def select_groups(self, k: int, stats: GQAStats, ctx: SelectionContext | None) -> list[int]:
        """The first k groups of the seed's permutation."""
        return np.random.default_rng(self.seed).permutation(stats.n_kv)[:k].tolist()

    def settings(self) -> dict:
        """The seed."""
        return {"seed": self.seed, "unit": "kv_group"}


@dataclass
class GroupMagnitudeSelector(KVGroupSelector):
    """Keep the k groups whose own weights have the largest L2 norm (`group_magnitudes`)."""

    name: str = "gqa-magnitude"

    def select_groups(self, k: int, stats: GQAStats, ctx: SelectionContext | None) -> list[int]:
        """Top k groups by weight norm of ``ctx.model``."""
        return _top_groups(group_magnitudes(require(ctx, "model", self.name), stats), k)

    def settings(self) -> dict:
        """The unit only."""
        return {"unit": "kv_group"}


@dataclass
class GroupGradientSelector(KVGroupSelector):
    """Keep the k groups of largest summed salience (mean |dL/dgate|) over their query heads."""

    name: str = "gqa-gradient"

    def select_groups(self, k: int, stats: GQAStats, ctx: SelectionContext | None) -> list[int]:
        """Top k groups by summed salience."""
        if stats.salience is None:
            raise ValueError("the gradient selector needs stats.salience")
        return _top_groups(stats.group_sum(stats.salience), k)

    def settings(self) -> dict:
        """The unit only."""
        return {"unit": "kv_group"}


@dataclass
class GroupFisherSelector(KVGroupSelector):
    """Keep the k groups of largest summed diagonal Fisher (mean (dL/dgate)^2) over their query heads."""

    name: str = "gqa-fisher"

    def select_groups(self, k: int, stats: GQAStats, ctx: SelectionContext | None) -> list[int]:
        """Top k groups by summed Fisher."""
        if stats.fisher is None:
            raise ValueError("the Fisher selector needs stats.fisher")
        return _top_groups(stats.group_sum(stats.fisher), k)

    def settings(self) -> dict:
        """The unit only."""
        return {"unit": "kv_group"}


GQA_SELECTORS: dict[str, type[KVGroupSelector]] = {
    "gqa-cahp": GroupCAHPSelector,
    "gqa-random": GroupRandomSelector,
    "gqa-magnitude": GroupMagnitudeSelector,
    "gqa-gradient": GroupGradientSelector,
    "gqa-fisher": GroupFisherSelector,
}
"""Registry names of the KV-group selectors (registered in `cahp.selectors.registry`)."""
