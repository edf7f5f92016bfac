"""Tests for cahp.selectors.graph (affinity graph, exact-k clustering) and cahp.selectors.cahp."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cahp.selectors.cahp import representatives, select_heads
from cahp.selectors.graph import CLUSTERING_METHODS, affinity, check_distance_matrix, cluster


def random_distances(n: int, seed: int, dim: int = 4) -> np.ndarray:
    X = np.random.default_rng(seed).normal(size=(n, dim))
    return np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))


def block_distances(sizes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups of duplicate heads (distance 0 inside a group), groups 0.6-1.0 apart, shuffled."""
    rng = np.random.default_rng(seed)
    g = len(sizes)
    group = np.repeat(np.arange(g), sizes)
    B = rng.uniform(0.6, 1.0, size=(g, g))
    B = (B + B.T) / 2
    np.fill_diagonal(B, 0.0)
    perm = rng.permutation(group.size)
    group = group[perm]
    return B[np.ix_(group, group)], group


def assert_exact_k(labels: np.ndarray, n: int, k: int) -> None:
    assert labels.shape == (n,)
    assert labels.dtype == np.int64
    assert set(labels.tolist()) == set(range(k))


# ---------------------------------------------------------------------------------------- affinity


def test_affinity_gaussian_median_bandwidth() -> None:
    D = random_distances(9, seed=0)
    W = affinity(D)
    sigma = np.median(D[np.triu_indices(9, 1)])
    expected = np.exp(-(D**2) / (2 * sigma**2))
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(W, expected)
    assert np.array_equal(W, W.T)
    assert np.all(np.diag(W) == 0)
    np.testing.assert_allclose(affinity(D, bandwidth=2.0)[0, 1], np.exp(-(D[0, 1] ** 2) / 8.0))


def test_affinity_all_zero_distances_uses_unit_bandwidth() -> None:
    W = affinity(np.zeros((4, 4)))
    assert np.all(W[~np.eye(4, dtype=bool)] == 1.0)
    assert np.all(np.diag(W) == 0)


def test_affinity_knn_is_symmetric_and_sparse() -> None:
    D = random_distances(16, seed=1)
    W = affinity(D, kernel="knn")  # k = round(sqrt(16)) = 4
    assert np.array_equal(W, W.T)
    assert np.all(np.diag(W) == 0)
    degree = (W > 0).sum(axis=1)
    assert degree.min() >= 4 and degree.max() < 15
    dense = affinity(D)
    np.testing.assert_allclose(W[W > 0], dense[W > 0])  # kept edges carry the Gaussian weights
    nearest = np.argsort(D + np.diag(np.full(16, np.inf)), axis=1)[:, 0]
    assert np.all(W[np.arange(16), nearest] > 0)
    assert (affinity(D, kernel="knn", n_neighbors=1) > 0).sum() < (W > 0).sum()


def test_affinity_errors() -> None:
    D = random_distances(5, seed=2)
    with pytest.raises(ValueError, match="valid kernels"):
        affinity(D, kernel="cosine")
    with pytest.raises(ValueError, match="bandwidth"):
        affinity(D, bandwidth=0.0)
    with pytest.raises(ValueError, match="bandwidth"):
        affinity(D, bandwidth="mean")
    with pytest.raises(ValueError, match="n_neighbors"):
        affinity(D, kernel="knn", n_neighbors=0)


# ---------------------------------------------------------------------------------------- cluster


@pytest.mark.parametrize("method", CLUSTERING_METHODS)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 24])
def test_exact_k_for_every_k(method: str, n: int) -> None:
    D = random_distances(n, seed=n)
    for k in range(1, n + 1):
        assert_exact_k(cluster(D, k, method=method), n, k)
    assert np.all(cluster(D, 1, method=method) == 0)
    assert np.array_equal(cluster(D, n, method=method), np.arange(n))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 14),
    data=st.data(),
    method=st.sampled_from(CLUSTERING_METHODS),
    kernel=st.sampled_from(["gaussian", "knn"]),
    duplicates=st.booleans(),
)
def test_exact_k_property(n: int, data: st.DataObject, method: str, kernel: str, duplicates: bool) -> None:
    seed = data.draw(st.integers(0, 10_000))
    k = data.draw(st.integers(1, n))
    D = random_distances(n, seed=seed)
    if duplicates:  # many ties and zero distances: the hard case for exact k
        D = np.round(D, 0)
        np.fill_diagonal(D, 0.0)
    assert_exact_k(cluster(D, k, method=method, seed=seed, kernel=kernel), n, k)


def test_all_zero_distances_still_give_k_clusters() -> None:
    for method in CLUSTERING_METHODS:
        for k in range(1, 7):
            assert_exact_k(cluster(np.zeros((6, 6)), k, method=method), 6, k)


@pytest.mark.parametrize("method", CLUSTERING_METHODS)
@pytest.mark.parametrize("seed", range(6))
def test_duplicate_heads_share_a_cluster(method: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(1, 6, size=int(rng.integers(2, 9))).tolist()
    D, group = block_distances(sizes, seed)
    labels = cluster(D, len(sizes), method=method, seed=seed)
    # The partition equals the groups: one label per group, distinct groups, distinct labels.
    assert len({(int(g), int(lab)) for g, lab in zip(group, labels)}) == len(sizes)
    assert_exact_k(labels, group.size, len(sizes))


@pytest.mark.parametrize("seed", range(4))
def test_duplicate_heads_share_a_cluster_knn_graph(seed: int) -> None:
    # With groups larger than n_neighbors the k-NN graph falls apart into the groups.
    sizes = np.random.default_rng(seed).integers(6, 9, size=4).tolist()
    D, group = block_distances(sizes, seed)
    labels = cluster(D, 4, method="spectral", seed=seed, kernel="knn", n_neighbors=5)
    assert len({(int(g), int(lab)) for g, lab in zip(group, labels)}) == 4


@pytest.mark.parametrize("method", CLUSTERING_METHODS)
def test_deterministic(method: str) -> None:
    D = random_distances(30, seed=7)
    for k in (2, 5, 11, 29):
        a = cluster(D, k, method=method, seed=3)
        b = cluster(D, k, method=method, seed=3)
        assert np.array_equal(a, b)
        assert a[0] == 0  # canonical numbering by first appearance


def test_kmedoids_recovers_well_separated_groups() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.concatenate([c + rng.normal(scale=0.3, size=(6, 2)) for c in centers])
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    for method in CLUSTERING_METHODS:
        labels = cluster(D, 3, method=method)
        assert [len(set(labels[i * 6 : (i + 1) * 6])) for i in range(3)] == [1, 1, 1]


def test_cluster_errors() -> None:
    D = random_distances(5, seed=0)
    for bad_k in (0, 6, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            cluster(D, bad_k)
    with pytest.raises(ValueError, match="valid methods are spectral, agglomerative, kmedoids"):
        cluster(D, 2, method="dbscan")
    with pytest.raises(ValueError, match="square"):
        cluster(np.zeros((3, 4)), 2)
    asym = D.copy()
    asym[0, 1] += 0.5
    with pytest.raises(ValueError, match="symmetric"):
        cluster(asym, 2)
    neg = D.copy()
    neg[0, 1] = neg[1, 0] = -0.1
    with pytest.raises(ValueError, match="negative"):
        cluster(neg, 2)
    nan = D.copy()
    nan[0, 1] = nan[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster(nan, 2)
    diag = D + np.eye(5)
    with pytest.raises(ValueError, match="diagonal"):
        cluster(diag, 2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        cluster(D, 2, linkage="ward")


def test_check_distance_matrix_accepts_torch() -> None:
    torch = pytest.importorskip("torch")
    D = random_distances(4, seed=0)
    np.testing.assert_allclose(check_distance_matrix(torch.from_numpy(D)), D)


# ---------------------------------------------------------------------------------------- selection


def test_representatives_most_salient_per_cluster() -> None:
    labels = np.array([0, 1, 0, 2, 1, 2, 2])
    salience = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 0.3, 0.2])
    # cluster 0 -> head 2; cluster 1 -> head 4; cluster 2 -> tie 0.3 between 3 and 5 -> 3
    assert representatives(labels, salience).tolist() == [2, 3, 4]
    assert representatives(np.array([5, 5, 9]), np.array([1.0, 2.0, 0.0])).tolist() == [1, 2]


def test_representatives_errors() -> None:
    with pytest.raises(ValueError, match="entries"):
        representatives(np.array([0, 1]), np.array([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        representatives(np.array([0, 1]), np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="integers"):
        representatives(np.array([0.0, 1.0]), np.array([1.0, 2.0]))


@pytest.mark.parametrize("method", CLUSTERING_METHODS)
def test_select_heads_one_per_cluster(method: str) -> None:
    D, group = block_distances([3, 4, 2, 5], seed=11)
    salience = np.random.default_rng(0).uniform(size=group.size)
    kept = select_heads(D, salience, 4, method=method)
    assert kept.tolist() == sorted(kept.tolist()) and kept.size == 4
    assert sorted(group[kept].tolist()) == [0, 1, 2, 3]  # one head from every group
    for g in range(4):
        members = np.flatnonzero(group == g)
        assert members[np.argmax(salience[members])] in kept
    for k in (1, 7, group.size):
        assert select_heads(D, salience, k, method=method).size == k
    assert select_heads(D, salience, 1, method=method).tolist() == [int(np.argmax(salience))]
    with pytest.raises(ValueError, match="salience"):
        select_heads(D, salience[:-1], 2, method=method)
