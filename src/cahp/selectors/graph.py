"""CAHP step 3, graph (affinity over heads), and step 4, clustering into exactly k groups.

Input everywhere: ``D``, an ``(n, n)`` head-to-head distance matrix (symmetric, zero diagonal,
nonnegative, finite), e.g. :meth:`cahp.stats.distances.DistanceAccumulator.result`.

Methods (:data:`CLUSTERING_METHODS`):

* ``"spectral"`` (default): spectral clustering on the affinity graph of :func:`affinity`
  (scikit-learn ``SpectralClustering(affinity="precomputed")``, labels by ``cluster_qr`` which has
  no random restarts). If it yields fewer than ``k`` non-empty clusters, clusters are split
  deterministically until there are ``k`` (see :func:`cluster`).
* ``"agglomerative"``: average-linkage agglomerative clustering on ``D`` itself.
* ``"kmedoids"``: deterministic PAM k-medoids on ``D`` (BUILD initialisation + best-improvement
  SWAP iterations).

Every method returns exactly ``k`` non-empty clusters for every ``k`` in ``1..n``. Labels are
canonical: numbered ``0..k-1`` in order of first appearance (head 0 is in cluster 0), so equal
partitions give equal label arrays.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["CLUSTERING_METHODS", "GRAPH_KERNELS", "affinity", "check_distance_matrix", "cluster"]

CLUSTERING_METHODS: tuple[str, ...] = ("spectral", "agglomerative", "kmedoids")
GRAPH_KERNELS: tuple[str, ...] = ("gaussian", "knn")

# Keyword arguments accepted by cluster() / select_heads(); the graph ones only matter for spectral.
_GRAPH_KWARGS = frozenset({"kernel", "bandwidth", "n_neighbors", "assign_labels"})


def check_distance_matrix(D: Any, atol: float = 1e-8) -> np.ndarray:
    """Validate a distance matrix and return it as a symmetric float64 array with a zero diagonal.

    Raises ValueError unless ``D`` is a finite, nonnegative, square ``(n, n)`` matrix (``n >= 1``),
    symmetric and with a zero diagonal up to ``atol`` (plus a relative ``1e-6``). Accepts numpy arrays,
    nested lists and CPU torch tensors.
    """
    if hasattr(D, "detach"):  # torch.Tensor
        D = D.detach().cpu().numpy()
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"distance matrix must be square (n, n), got shape {D.shape}")
    if D.shape[0] == 0:
        raise ValueError("distance matrix is empty (n = 0)")
    if not np.all(np.isfinite(D)):
        raise ValueError("distance matrix contains NaN or infinite values")
    if np.any(D < 0):
        raise ValueError(f"distance matrix has negative entries (min {D.min():.3g})")
    scale = float(D.max()) if D.size else 0.0
    tol = atol + 1e-6 * scale
    if np.max(np.abs(D - D.T)) > tol:
        raise ValueError(f"distance matrix is not symmetric (max |D - D.T| = {np.max(np.abs(D - D.T)):.3g})")
    if np.max(np.abs(np.diag(D))) > tol:
        raise ValueError(f"distance matrix must have a zero diagonal (max {np.max(np.abs(np.diag(D))):.3g})")
    D = (D + D.T) * 0.5
    np.fill_diagonal(D, 0.0)
    return D


def _offdiag(D: np.ndarray) -> np.ndarray:
    return D[np.triu_indices(D.shape[0], k=1)]


def affinity(
    D: Any,
    kernel: str = "gaussian",
    bandwidth: str | float = "median",
    n_neighbors: int | None = None,
) -> np.ndarray:
    """Affinity (edge-weight) matrix of the head graph from distances.

    Args:
        D: ``(n, n)`` distance matrix (see :func:`check_distance_matrix`).
        kernel: ``"gaussian"``: dense graph, ``W_ij = exp(-D_ij^2 / (2 sigma^2))``.
            ``"knn"``: the same Gaussian weights kept only on the edges of the symmetrised
            k-nearest-neighbour graph (edge ``i-j`` if ``j`` is among ``i``'s ``n_neighbors``
            nearest heads *or* vice versa); other entries are 0.
        bandwidth: ``sigma``. ``"median"`` (default) = median of the off-diagonal distances
            (upper triangle). If that is 0 (e.g. all distances are 0, or ``n == 1``), ``sigma = 1.0``
            is used so that the kernel stays defined (all-zero distances then give weight 1 everywhere).
            A positive float is used as is.
        n_neighbors: k of the k-NN graph; default ``round(sqrt(n))``, clipped to ``1..n-1``.
            Neighbours at equal distance are ranked by lower index (stable sort).

    Returns:
        ``(n, n)`` float64 symmetric array with values in ``[0, 1]`` and a **zero diagonal**
        (no self-loops; spectral clustering ignores the diagonal anyway).
    """
    D = check_distance_matrix(D)
    n = D.shape[0]
    if kernel not in GRAPH_KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels are {', '.join(GRAPH_KERNELS)}")
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be 'median' or a positive float, got {bandwidth!r}")
        off = _offdiag(D)
        sigma = float(np.median(off)) if off.size else 0.0
        if sigma <= 0.0:
            sigma = 1.0
    else:
        sigma = float(bandwidth)
        if not np.isfinite(sigma) or sigma <= 0.0:
            raise ValueError(f"bandwidth must be 'median' or a positive float, got {bandwidth!r}")
    W = np.exp(-(D**2) / (2.0 * sigma**2))
    if kernel == "knn" and n > 1:
        if n_neighbors is None:
            n_neighbors = int(round(np.sqrt(n)))
        if isinstance(n_neighbors, bool) or int(n_neighbors) != n_neighbors or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}")
        nn = min(int(n_neighbors), n - 1)
        Dx = D.copy()
        np.fill_diagonal(Dx, np.inf)  # a head is not its own neighbour
        order = np.argsort(Dx, axis=1, kind="stable")[:, :nn]
        mask = np.zeros((n, n), dtype=bool)
        mask[np.repeat(np.arange(n), nn), order.ravel()] = True
        mask |= mask.T
        W = np.where(mask, W, 0.0)
    np.fill_diagonal(W, 0.0)
    return W


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer in 1..{n}, got {k!r}")
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must be in 1..{n} (number of heads), got {k}")
    return int(k)


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel to 0..m-1 in order of first appearance."""
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first, kind="stable")  # old labels sorted by first appearance
    old = np.unique(labels)[order]
    mapping = {int(o): i for i, o in enumerate(old)}
    return np.array([mapping[int(x)] for x in labels], dtype=np.int64)


def _medoid(D: np.ndarray, members: np.ndarray) -> int:
    """Member with the smallest total distance to the other members (ties -> lowest index)."""
    sub = D[np.ix_(members, members)]
    return int(members[int(np.argmin(sub.sum(axis=1)))])


def _split_to_k(D: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Deterministically split clusters until there are exactly k non-empty ones.

    Repeatedly takes the largest cluster (ties -> the one containing the lowest index) and moves its
    member farthest from the cluster's medoid (ties -> lowest index) into a new singleton cluster.
    """
    labels = _canonical(labels)
    while labels.max() + 1 < k:
        sizes = np.bincount(labels)
        biggest = int(np.argmax(sizes))  # canonical labels: lowest label = earliest first member
        members = np.flatnonzero(labels == biggest)
        med = _medoid(D, members)
        others = members[members != med]
        far = int(others[int(np.argmax(D[med, others]))])
        labels[far] = labels.max() + 1
    return _canonical(labels)


def _spectral(D: np.ndarray, k: int, seed: int, assign_labels: str, **graph: Any) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    if assign_labels not in ("cluster_qr", "discretize", "kmeans"):
        raise ValueError(f"assign_labels must be 'cluster_qr', 'discretize' or 'kmeans', got {assign_labels!r}")
    W = affinity(D, **graph)
    model = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels=assign_labels, random_state=seed)
    with warnings.catch_warnings():
        # A disconnected graph is fine here: its components simply separate.
        warnings.filterwarnings("ignore", message=".*not fully connected.*")
        labels = model.fit_predict(W)
    return _split_to_k(D, np.asarray(labels), k)


def _agglomerative(D: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    model = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average")
    return _split_to_k(D, model.fit_predict(D), k)


def _kmedoids(D: np.ndarray, k: int, max_iter: int = 100) -> np.ndarray:
    """PAM: greedy BUILD, then best-improvement SWAP until no swap lowers the total cost.

    Fully deterministic (ties -> lowest index), so no seed is needed. Each medoid is put in its own
    cluster even when another medoid is at distance 0, so no cluster is empty.
    """
    n = D.shape[0]
    # BUILD: first the most central point, then the point that lowers the cost most.
    medoids = [int(np.argmin(D.sum(axis=1)))]
    nearest = D[medoids[0]].copy()
    while len(medoids) < k:
        gain = np.maximum(nearest[None, :] - D, 0.0).sum(axis=1)  # gain[c] if c became a medoid
        gain[medoids] = -np.inf
        c = int(np.argmax(gain))
        medoids.append(c)
        nearest = np.minimum(nearest, D[c])

    def cost_of(meds: list[int]) -> float:
        return float(D[meds].min(axis=0).sum())

    cost = cost_of(medoids)
    for _ in range(max_iter):
        Dm = D[medoids]  # (k, n)
        order = np.argsort(Dm, axis=0, kind="stable")
        d1 = np.take_along_axis(Dm, order[:1], axis=0)[0]  # nearest medoid distance
        d2 = np.take_along_axis(Dm, order[1:2], axis=0)[0] if k > 1 else np.full(n, np.inf)
        near_idx = order[0]
        candidates = np.setdiff1d(np.arange(n), medoids)
        if candidates.size == 0:
            break
        Dc = D[candidates]  # (c, n)
        best_delta, best_swap = -1e-12 * max(1.0, cost), None
        for i in range(k):
            # Cost after replacing medoid i by candidate c: points whose nearest medoid is i fall back
            # to their second nearest; everyone may move to c.
            base = np.where(near_idx == i, d2, d1)
            new_cost = np.minimum(base[None, :], Dc).sum(axis=1)  # (c,)
            j = int(np.argmin(new_cost))
            delta = float(new_cost[j]) - cost
            if delta < best_delta:
                best_delta, best_swap = delta, (i, int(candidates[j]))
        if best_swap is None:
            break
        medoids[best_swap[0]] = best_swap[1]
        cost = cost_of(medoids)

    meds = np.asarray(medoids)
    labels = np.argmin(D[meds], axis=0)
    labels[meds] = np.arange(k)
    return _canonical(labels)


def cluster(D: Any, k: int, method: str = "spectral", seed: int = 0, **graph_kwargs: Any) -> np.ndarray:
    """Cluster heads into exactly ``k`` non-empty groups.

    Args:
        D: ``(n, n)`` distance matrix (symmetric, zero diagonal, nonnegative, finite).
        k: number of clusters, ``1 <= k <= n``. ``k == 1`` gives all zeros and ``k == n`` one head
            per cluster, for every method.
        method: one of :data:`CLUSTERING_METHODS`.
        seed: random state of the spectral embedding's eigensolver (and of k-means if
            ``assign_labels="kmeans"``). Agglomerative and k-medoids are deterministic and ignore it.
        **graph_kwargs: ``kernel``, ``bandwidth``, ``n_neighbors`` (see :func:`affinity`) and
            ``assign_labels`` (``"cluster_qr"`` default, ``"discretize"`` or ``"kmeans"``). They shape
            the spectral graph only and are accepted but ignored by the distance-based methods, so
            that a pipeline can pass one configuration to every method.

    Returns:
        ``(n,)`` int64 labels in ``0..k-1``, each used at least once, numbered in order of first
        appearance. Same inputs and seed give the same labels.

    If spectral clustering yields fewer than ``k`` non-empty clusters, the largest cluster is split
    by moving its member farthest from the cluster medoid into a new cluster, until there are ``k``.
    """
    D = check_distance_matrix(D)
    n = D.shape[0]
    k = _check_k(k, n)
    if method not in CLUSTERING_METHODS:
        valid = ", ".join(CLUSTERING_METHODS)
        raise ValueError(f"unknown clustering method {method!r}; valid methods are {valid}")
    unknown = set(graph_kwargs) - _GRAPH_KWARGS
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}; accepted: {sorted(_GRAPH_KWARGS)}")
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    if method == "spectral":
        graph = dict(graph_kwargs)
        assign_labels = graph.pop("assign_labels", "cluster_qr")
        return _spectral(D, k, int(seed), assign_labels, **graph)
    if method == "agglomerative":
        return _agglomerative(D, k)
    return _kmedoids(D, k)
