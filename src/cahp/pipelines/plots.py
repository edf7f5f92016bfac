"""Figures of a prune run: the curve with its fit and knee, kept heads, distances."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cahp.core.io import write_atomic  # noqa: E402


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def plot_curve(points: list[dict], knee: dict, path: Path, title: str = "") -> None:
    ks = [p["k"] for p in points]
    acc = [p["accuracy"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, acc, "o", label="S(k) on held-out training data")
    ax.plot(knee["grid"], knee["fitted"], "-", label=f"polynomial fit (degree {knee['degree']})")
    fallback = f" ({knee['fallback']})" if knee.get("fallback") else ""
    ax.axvline(knee["k"], color="C3", ls="--", label=f"k* = {knee['k']}{fallback}")
    ax.set_xlabel("heads kept")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_heads(mask: np.ndarray, path: Path, title: str = "") -> None:
    mask = np.asarray(mask, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4, mask.shape[1] * 0.4), max(3, mask.shape[0] * 0.4)))
    ax.imshow(mask, cmap="Greens", vmin=0, vmax=1, aspect="equal")
    ax.set_xticks(range(mask.shape[1]))
    ax.set_yticks(range(mask.shape[0]))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"kept heads ({int(mask.sum())} of {mask.size})")
    for (i, j), v in np.ndenumerate(mask):
        if v:
            ax.text(j, i, "•", ha="center", va="center", color="white", fontsize=8)
    _save(fig, path)


def plot_distances(D: np.ndarray, heads_per_layer: list[int], path: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(D, cmap="viridis")
    edges = np.cumsum(heads_per_layer)[:-1] - 0.5
    for e in edges:
        ax.axhline(e, color="white", lw=0.5)
        ax.axvline(e, color="white", lw=0.5)
    ax.set_xlabel("head (layer-major)")
    ax.set_ylabel("head (layer-major)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    _save(fig, path)
