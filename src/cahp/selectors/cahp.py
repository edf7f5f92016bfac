"""CAHP step 5, representatives: in every cluster of the head graph, keep the most salient head.

`select_heads` runs steps 3-5 on one budget (graph and clustering from
`cahp.selectors.graph`, then `representatives`); `CAHPSelector` is CAHP as a
`HeadSelector`, a peer of the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, check_budget
from cahp.selectors.graph import check_distance_matrix, cluster

__all__ = ["CAHPSelector", "representatives", "select_heads"]


def representatives(labels: Any, salience: Any) -> np.ndarray:
    """For each cluster, the member with the highest salience.

    Args:
        labels: ``(n,)`` integer cluster labels (any integer values; every distinct value is a cluster).
        salience: ``(n,)`` finite salience scores (higher = more important), e.g. ``|dL/dg_h|``.

    Returns:
        ``(m,)`` int64 flat head indices, sorted ascending, one per distinct label (``m`` = number of
        clusters). Ties in salience go to the lowest head index.
    """
    labels = np.asarray(labels)
    salience = np.asarray(salience, dtype=np.float64)
    if labels.ndim != 1 or salience.ndim != 1:
        raise ValueError(f"labels and salience must be 1-D, got shapes {labels.shape} and {salience.shape}")
    if labels.shape != salience.shape:
        raise ValueError(f"labels has {labels.shape[0]} entries but salience has {salience.shape[0]}")
    if labels.size == 0:
        raise ValueError("labels is empty")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if not np.all(np.isfinite(salience)):
        raise ValueError("salience contains NaN or infinite values")
    return most_salient_members(labels, salience)


def most_salient_members(labels: np.ndarray, salience: np.ndarray) -> np.ndarray:
    """`representatives` without its input checks (for callers that built valid arrays): each cluster's most
    salient member, ties to the lowest index, sorted int64; vectorised for thousands of units."""
    order = np.lexsort((np.arange(len(labels)), -salience, labels))  # by label, then salience down, then index
    first = np.ones(len(order), dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    return np.sort(order[first]).astype(np.int64)


def select_heads(
    D: Any,
    salience: Any,
    k: int,
    method: str = "spectral",
    seed: int = 0,
    **graph_kwargs: Any,
) -> np.ndarray:
    """Kept head set S(k): cluster the heads into ``k`` groups and keep each group's most salient head.

    Args:
        D: ``(n, n)`` head distance matrix (flat head index = ``layer * heads_per_layer + head``).
        salience: ``(n,)`` head salience.
        k: number of heads to keep, ``1 <= k <= n``.
        method, seed, graph_kwargs: see :func:`cahp.selectors.graph.cluster`.

    Returns:
        ``(k,)`` int64 sorted flat head indices.
    """
    D = check_distance_matrix(D)
    salience = np.asarray(salience, dtype=np.float64)
    if salience.shape != (D.shape[0],):
        raise ValueError(f"salience must have shape ({D.shape[0]},) to match D, got {salience.shape}")
    labels = cluster(D, k, method=method, seed=seed, **graph_kwargs)
    return representatives(labels, salience)


@dataclass
class CAHPSelector(HeadSelector):
    """CAHP: cluster the head graph into k groups, keep each group's most salient head.

    Uses ``stats.distances[distance]`` (step 2) and ``stats.salience`` (mean
    |dL/dgate|); ``seed`` is the clustering's, a setting fixed per run, so the
    selection does not vary with a compare seed.
    """

    distance: str = "js"
    clustering: str = "spectral"
    seed: int = 0
    kernel: str = "gaussian"
    bandwidth: str | float = "median"
    name: str = "cahp"

    def select(self, k: int, stats: HeadStats, ctx: SelectionContext | None = None) -> torch.Tensor:
        """Bool (layers, heads) mask of the k representatives."""
        k = check_budget(k, stats)
        if self.distance not in stats.distances:
            raise ValueError(f"no {self.distance!r} distances were computed (have: {sorted(stats.distances)})")
        if stats.salience is None:
            raise ValueError("CAHP needs head salience")
        # the graph settings only shape the spectral graph; the distance-based methods ignore them
        graph = {"kernel": self.kernel, "bandwidth": self.bandwidth} if self.clustering == "spectral" else {}
        chosen = select_heads(
            stats.distances[self.distance].numpy(), stats.flat(stats.salience), k,
            method=self.clustering, seed=self.seed, **graph,
        )
        return stats.mask_of(chosen)

    def settings(self) -> dict:
        """Distance, clustering, its seed, and the spectral graph's kernel and bandwidth."""
        return {"distance": self.distance, "clustering": self.clustering, "seed": self.seed,
                "kernel": self.kernel, "bandwidth": self.bandwidth}
