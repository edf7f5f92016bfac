"""Tests for cahp.stats.distances: per-row divergences between heads and their accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from cahp.stats.distances import DISTANCES, SKL_EPS, DistanceAccumulator, row_divergence_sums

BOUNDS = {"js": math.log(2.0), "hellinger": 1.0, "jm": math.sqrt(2.0), "skl": 2 * math.log(1 / SKL_EPS)}


def make_batch(R: int, H: int, K: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random attention rows (R, H, K) with per-row padding: keys >= the row's length are exact zeros."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, H, K, generator=g, dtype=torch.float64) * 2.0
    lengths = torch.randint(1, K + 1, (R,), generator=g)
    pad = torch.arange(K)[None, :] >= lengths[:, None]  # (R, K)
    logits = logits.masked_fill(pad[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).to(dtype)


def reference(P: torch.Tensor, kind: str) -> np.ndarray:
    """Slow per-row, per-pair loop in float64: mean over rows."""
    A = P.double().numpy()
    R, H, _ = A.shape
    out = np.zeros((H, H))
    for r in range(R):
        for h in range(H):
            for g in range(H):
                p, q = A[r, h], A[r, g]
                if kind == "js":
                    d = jensenshannon(p, q) ** 2  # scipy: sqrt of JS, natural log by default
                elif kind in ("hellinger", "jm"):
                    bc = np.sum(np.sqrt(p * q))
                    d = math.sqrt(max(0.0, 1.0 - bc))
                    if kind == "jm":
                        d *= math.sqrt(2.0)
                else:
                    lp, lq = np.log(np.maximum(p, SKL_EPS)), np.log(np.maximum(q, SKL_EPS))
                    d = np.sum((p - q) * (lp - lq))
                out[h, g] += d
    np.fill_diagonal(out, 0.0)
    return out / R


def check_matrix(D: torch.Tensor, kind: str) -> None:
    assert D.dtype == torch.float64
    assert torch.isfinite(D).all()
    assert torch.equal(D, D.T)
    assert torch.all(torch.diagonal(D) == 0)
    assert D.min() >= 0
    assert D.max() <= BOUNDS[kind] + 1e-9


@pytest.mark.parametrize("kind", DISTANCES)
def test_matches_reference_float64(kind: str) -> None:
    P = make_batch(R=7, H=5, K=9, seed=1)
    got = row_divergence_sums(P, kind, compute_dtype=torch.float64) / P.shape[0]
    np.testing.assert_allclose(got.numpy(), reference(P, kind), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", DISTANCES)
def test_matches_reference_float32(kind: str) -> None:
    P = make_batch(R=11, H=6, K=13, seed=2)
    got = row_divergence_sums(P.float(), kind) / P.shape[0]
    atol = 2e-3 if kind in ("hellinger", "jm") else 1e-5  # sqrt amplifies float32 rounding near 0
    np.testing.assert_allclose(got.numpy(), reference(P, kind), rtol=1e-4, atol=atol)
    check_matrix(got, kind)


@pytest.mark.parametrize("kind", DISTANCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_heads_give_zero(kind: str, dtype: torch.dtype) -> None:
    base = make_batch(R=20, H=3, K=12, seed=3)
    P = torch.cat([base, base[:, :1]], dim=1)  # head 3 is a copy of head 0
    D = row_divergence_sums(P.to(dtype), kind, compute_dtype=dtype) / P.shape[0]
    tol = 1e-12 if dtype == torch.float64 else (2e-3 if kind in ("hellinger", "jm") else 1e-6)
    assert D[0, 3] <= tol and D[3, 0] <= tol
    assert D[0, 1] > 10 * tol  # distinct heads are not collapsed
    check_matrix(D, kind)


@pytest.mark.parametrize("kind", DISTANCES)
def test_symmetry_bounds_and_extremes(kind: str) -> None:
    # Disjoint supports hit the upper bound of the bounded kinds.
    P = torch.zeros(4, 3, 6)
    P[:, 0, :3] = 1 / 3
    P[:, 1, 3:] = 1 / 3
    P[:, 2] = 1 / 6
    D = row_divergence_sums(P, kind) / 4
    check_matrix(D, kind)
    if kind == "js":
        assert D[0, 1] == pytest.approx(math.log(2), abs=1e-6)
    elif kind == "hellinger":
        assert D[0, 1] == pytest.approx(1.0, abs=1e-6)
    elif kind == "jm":
        assert D[0, 1] == pytest.approx(math.sqrt(2), abs=1e-6)
    else:
        # Each side: 3 * (1/3) * (log(1/3) - log(eps)); finite thanks to the eps floor.
        expected = 2 * (math.log(1 / 3) - math.log(SKL_EPS))
        assert D[0, 1] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", DISTANCES)
def test_chunking_does_not_change_result(kind: str) -> None:
    P = make_batch(R=37, H=7, K=10, seed=4).float()
    full = row_divergence_sums(P, kind, chunk_rows=10_000)
    for chunk in (1, 5, 16):
        torch.testing.assert_close(row_divergence_sums(P, kind, chunk_rows=chunk), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DISTANCES)
def test_padding_invariance(kind: str) -> None:
    P = make_batch(R=15, H=6, K=8, seed=5).float()
    padded = torch.cat([P, torch.zeros(15, 6, 5)], dim=2)
    torch.testing.assert_close(row_divergence_sums(padded, kind), row_divergence_sums(P, kind), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DISTANCES)
def test_accumulator_over_batches_matches_one_shot(kind: str) -> None:
    shapes = [(9, 4), (13, 11), (6, 7)]
    batches = [make_batch(R, 5, K, seed=10 + i).float() for i, (R, K) in enumerate(shapes)]
    acc = DistanceAccumulator(5, kind)
    for P in batches:
        acc.add_batch(P)
    assert acc.count == 28
    Kmax = max(P.shape[2] for P in batches)
    joined = torch.cat([torch.nn.functional.pad(P, (0, Kmax - P.shape[2])) for P in batches], dim=0)
    one_shot = row_divergence_sums(joined, kind) / joined.shape[0]
    torch.testing.assert_close(acc.result(), one_shot, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.result().numpy(), reference(joined, kind), rtol=1e-4, atol=2e-3)
    check_matrix(acc.result(), kind)

    # merge == single accumulator
    a, b = DistanceAccumulator(5, kind), DistanceAccumulator(5, kind)
    a.add_batch(batches[0])
    b.add_batch(batches[1])
    b.add_batch(batches[2])
    assert a.merge(b) is a
    assert a.count == acc.count
    torch.testing.assert_close(a.result(), acc.result(), rtol=1e-12, atol=1e-12)

    # state_dict round trip, then resume
    restored = DistanceAccumulator(5, kind)
    restored.load_state_dict(a.state_dict())
    assert restored.count == a.count
    assert torch.equal(restored.sums, a.sums)
    restored.add_batch(batches[0])
    a.add_batch(batches[0])
    assert torch.equal(restored.result(), a.result())


def test_accumulator_errors() -> None:
    acc = DistanceAccumulator(4, "js")
    with pytest.raises(ValueError, match="no rows"):
        acc.result()
    with pytest.raises(ValueError, match="heads"):
        acc.add_batch(torch.full((2, 3, 5), 0.2))
    with pytest.raises(ValueError, match=r"\(R, H, K\)"):
        acc.add_batch(torch.full((3, 5), 0.2))
    acc.add_batch(torch.empty(0, 4, 5))  # an empty batch is a no-op
    assert acc.count == 0
    with pytest.raises(ValueError, match="valid kinds"):
        DistanceAccumulator(4, "cosine")
    with pytest.raises(ValueError, match="merge"):
        acc.merge(DistanceAccumulator(4, "skl"))
    with pytest.raises(ValueError, match="merge"):
        acc.merge(DistanceAccumulator(5, "js"))
    with pytest.raises(ValueError, match="kind"):
        acc.load_state_dict(DistanceAccumulator(4, "skl").state_dict())
    with pytest.raises(ValueError, match="shape"):
        acc.load_state_dict(DistanceAccumulator(3, "js").state_dict())
    with pytest.raises(ValueError, match="valid kinds"):
        row_divergence_sums(torch.full((2, 3, 5), 0.2), "l2")
    with pytest.raises(ValueError, match="chunk_rows"):
        row_divergence_sums(torch.full((2, 3, 5), 0.2), "js", chunk_rows=0)
    bad = torch.full((2, 3, 5), 0.2)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        row_divergence_sums(bad, "hellinger")


def test_single_head_and_empty() -> None:
    one_head = row_divergence_sums(torch.full((3, 1, 4), 0.25), "js")
    assert torch.equal(one_head, torch.zeros(1, 1, dtype=torch.float64))
    no_rows = row_divergence_sums(torch.empty(0, 3, 4), "skl")
    assert torch.equal(no_rows, torch.zeros(3, 3, dtype=torch.float64))
