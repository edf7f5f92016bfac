"""Figures: of a prune run (curve, fit and knee; kept heads and neurons; distances) and of compare reports
(labelled, embedding, decoder, --ffn)."""

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


def plot_curve(points: list[dict], knee: dict, path: Path, title: str = "", key: str = "accuracy",
               ylabel: str = "accuracy") -> None:
    """S(k) (each point's ``key``) against heads kept, with the polynomial fit and the knee."""
    ks = [p["k"] for p in points]
    acc = [p[key] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, acc, "o", label="S(k) on held-out data")
    ax.plot(knee["grid"], knee["fitted"], "-", label=f"polynomial fit (degree {knee['degree']})")
    fallback = f" ({knee['fallback']})" if knee.get("fallback") else ""
    ax.axvline(knee["k"], color="C3", ls="--", label=f"k* = {knee['k']}{fallback}")
    ax.set_xlabel("heads kept")
    ax.set_ylabel(ylabel)
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


def plot_compare_curves(report: dict, path: Path) -> None:
    """compare.png: held-out score against heads kept without fine-tuning, one line per method."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, c) in enumerate(report["no_finetune"]["curves"].items()):
        acc = np.array(c["accuracy"]) * 100
        style = {"lw": 2.5, "color": "C3", "zorder": 5} if method == "cahp" else {"lw": 1.2, "color": f"C{i % 10}"}
        ax.plot(c["ks"], acc, "o-", ms=3, label=method, **style)
        if c.get("per_seed"):
            std = np.array(c["accuracy_std"]) * 100
            ax.fill_between(c["ks"], acc - std, acc + std, alpha=0.15, color=style["color"])
    for b in report["budgets"]:
        ax.axvline(b["k"], color="grey", ls=":", lw=0.8)
        ax.text(b["k"], ax.get_ylim()[1], f" {b['label']}", rotation=90, va="top", fontsize=7, color="grey")
    ax.set_xlabel("heads kept")
    ax.set_ylabel("held-out accuracy (%), no fine-tuning")
    ax.set_title(f"{report['model']} / {report['task']}: head selection without fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def plot_compare_layers(report: dict, path: Path) -> None:
    """compare_layers.png: kept heads per layer of every method at each budget, with the mean relative depth."""
    budgets = report["budgets"]
    res = report["no_finetune"]["results"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 3.6), squeeze=False)
    for ax, b in zip(axes[0], budgets):
        for i, (method, s) in enumerate(res[b["label"]].items()):
            per_layer = s["heads_per_layer_mean"] if len(s.get("seeds") or []) > 1 else s["heads_per_layer"]
            style = {"lw": 2.5, "color": "C3"} if method == "cahp" else {"lw": 1.0, "color": f"C{i % 10}"}
            ax.plot(range(len(per_layer)), per_layer, "o-", ms=3,
                    label=f"{method} ({s['mean_relative_depth']:.2f})", **style)
        ax.set_title(f"{b['label']}: {b['k']} heads", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("heads kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, title="method (mean rel. depth)", title_fontsize=6)
    _save(fig, path)


def plot_joint_curve(points: list[dict], knee: dict, share_star: float, path: Path, title: str = "",
                     steps: int = 1000, key: str = "accuracy", ylabel: str = "accuracy") -> None:
    """curve.png of `cahp prune --ffn`: held-out score against estimated latency share, the fit and the knee.

    ``knee`` is a `find_knee` result on the integer axis ``share * steps``
    (`cahp.budget.joint_curve.knee_share`), drawn back on the share axis.
    ``key``: the points' score entry; ``ylabel``: what that score is (the
    embedding objective's curve holds fidelity or dev Spearman, not accuracy).
    """
    x = [p["estimated_share"] for p in points]
    score = [p[key] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    name = "held-out accuracy" if ylabel == "accuracy" else ylabel
    ax.plot(x, score, "o", label=f"{name} (chosen head weight per share)")
    ax.plot(np.asarray(knee["grid"]) / steps, knee["fitted"], "-", label=f"polynomial fit (degree {knee['degree']})")
    fallback = f" ({knee['fallback']})" if knee.get("fallback") else ""
    ax.axvline(share_star, color="C3", ls="--", label=f"knee: share {share_star:.3f}{fallback}")
    ax.invert_xaxis()  # dense on the left, as on the heads-only curve read from many heads to few
    ax.set_xlabel("estimated latency, share of dense")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_kept_structure(heads: list[int], heads_total: list[int], neurons: list[int], neurons_total: list[int],
                        path: Path, title: str = "") -> None:
    """structure.png: share of heads and of FFN neurons each layer keeps, side by side (counts on the bars)."""
    layers = np.arange(len(heads))
    h = np.asarray(heads) / np.maximum(np.asarray(heads_total), 1)
    n = np.asarray(neurons) / np.maximum(np.asarray(neurons_total), 1)
    fig, ax = plt.subplots(figsize=(max(5, len(heads) * 0.7), 3.8))
    bars_h = ax.bar(layers - 0.2, h, 0.4, label="heads", color="C0")
    bars_n = ax.bar(layers + 0.2, n, 0.4, label="FFN neurons", color="C2")
    for bars, counts in ((bars_h, heads), (bars_n, neurons)):
        for bar, c in zip(bars, counts):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, str(c), ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(layers)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("layer")
    ax.set_ylabel("share kept")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_frontier(report: dict, path: Path, shape: str | None = None, *, key: str = "accuracy",
                  ylabel: str | None = None, untuned: str = "fine-tuning", title: str | None = None,
                  teacher: bool = False) -> None:
    """frontier.png of a `cahp compare --ffn` report: test score against measured speedup, one line per method.

    The score (each part's ``key``, x 100) after fine-tuning where the report has it (else without it, said in
    the axis label); the x axis is the measured speedup at ``shape`` (default: the first cost shape), the
    estimated one where a result was not timed. Heads-only CAHP (the paper, where the report has it) and the
    dense model are marked.

    Args:
        key: the score entry of each result's ``finetuned`` / ``no_finetune`` part (and of the dense scores).
        ylabel: what the score is (default: "<test split> accuracy (%)").
        untuned: the name of the step after pruning, for the label of a report without it
            (", no fine-tuning" by default; the embedding objective's is "distillation").
        title: default "<model> / <task>: heads + FFN neurons".
        teacher: the dense model is the distillation teacher (the embedding objective): one reference line at
            ``report["dense"][key]``, as there is no dense control; False: the labelled report's dense test
            score (and its fine-tuned control).
    """
    shape = shape or ((report.get("cost_table") or {}).get("shapes") or [None])[0]
    if shape is None:
        raise ValueError("plot_frontier needs a shape: the report has no cost_table shapes")
    finetuned = any("finetuned" in r for t in report["results"].values() for r in t.values())
    part = "finetuned" if finetuned else "no_finetune"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(m for t in report["results"].values() for m in t))
    for i, m in enumerate(methods):
        pts = []
        for t in report["targets"]:
            r = report["results"][t["label"]].get(m, {})
            if part not in r:
                continue
            ms = r.get("measured_speedup") or {}
            x = ms[shape]["speedup"] if shape in ms else 1 / r["estimated_share"]
            if key not in r[part]:
                raise ValueError(f"plot_frontier: {m} at {t['label']} has no {key!r} score in {part!r}")
            pts.append((x, r[part][key] * 100))
        if not pts:
            continue
        pts.sort()
        others = [c for c in range(10) if c != 3]  # C3 (red) is CAHP's alone
        style = {"lw": 2.5, "color": "C3", "zorder": 5} if m == "cahp" else \
            {"lw": 1.2, "color": f"C{others[i % len(others)]}"}
        ax.plot(*zip(*pts), "o-", ms=5 if m == "cahp" else 4, label=m, **style)
    ho = report.get("heads_only") or {}
    ho_score = (ho.get("finetuned") or {}).get(key) if finetuned else None
    if ho_score is not None and shape in (ho.get("measured_speedup") or {}):
        ax.plot(ho["measured_speedup"][shape]["speedup"], ho_score * 100, "*", ms=13, color="k",
                label=f"heads-only CAHP (k* = {ho['k']})", zorder=6)
    dense = report["dense"]
    if teacher:  # the pruned models are distilled towards the dense one: it is the only reference
        ax.axhline(dense[key] * 100, color="grey", ls="--", lw=1, label="dense (teacher)")
        ax.plot(1.0, dense[key] * 100, "s", color="grey")
    else:
        ref = (dense.get("control") or {}).get(key) if finetuned else None
        ref = ref if ref is not None else dense["test"][report["test_split"]][key]
        ax.axhline(ref * 100, color="grey", ls="--", lw=1, label="dense control" if finetuned else "dense")
        ax.plot(1.0, ref * 100, "s", color="grey")
        if finetuned:  # the dense model every method starts from, before its extra fine-tuning
            first = dense["test"][report["test_split"]][key] * 100
            ax.axhline(first, color="grey", ls=":", lw=1, label="dense model pruned from")
    ax.set_xlabel(f"measured speedup at {shape}, 1 thread (dense / pruned latency)")
    ylabel = ylabel or f"{report['test_split']} accuracy (%)"
    ax.set_ylabel(ylabel + ("" if finetuned else f", no {untuned}"))
    ax.set_title(title or f"{report['model']} / {report['task']}: heads + FFN neurons")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_perplexity(report: dict, path: Path, *, cahp: str) -> None:
    """compare.png of a decoder comparison: held-out perplexity against KV heads kept, one line per method (after
    the fine-tuning solid, without it dashed), the dense model (and its fine-tuned control) as horizontal lines.

    ``cahp``: the name CAHP runs under in the report (its KV-group selector), drawn thick in C3.
    """
    parts = [("no_finetune", "--", "no fine-tuning")]
    if report.get("finetuned"):
        parts.append(("finetuned", "-", "fine-tuned"))
    budgets = sorted(report["budgets"], key=lambda b: b["k"])
    others = [f"C{j}" for j in range(10) if j != 3]  # C3 is CAHP's alone
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(report["settings"]["methods_run"]):
        color = "C3" if method == cahp else others[i % len(others)]
        for part, ls, what in parts:
            res = report[part]["results"]
            ax.plot([b["k"] for b in budgets], [res[b["label"]][method]["perplexity"] for b in budgets], ls,
                    marker="o", ms=3, color=color, lw=2.2 if method == cahp else 1.0,
                    label=f"{method} ({what})")
    ax.axhline(report["dense"]["perplexity"], color="k", ls=":", lw=1, label="dense")
    control = (report.get("finetuned") or {}).get("dense_control")
    if control:
        ax.axhline(control["perplexity"], color="k", ls="-.", lw=1, label="dense, fine-tuned (control)")
    ax.set_xlabel(f"KV heads kept (of {report['kv_heads']})")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title(f"{report['model']} / {report['task']} text: KV heads kept against perplexity", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def plot_spearman(report: dict, path: Path) -> None:
    """compare.png of an embedding comparison: test Spearman against heads kept, one line per method (after
    distillation when it ran, without it dashed), the dense model as a horizontal line."""
    parts = [("no_finetune", "--", "no distillation")]
    if report.get("finetuned"):
        parts.append(("finetuned", "-", "distilled"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted(report["budgets"], key=lambda b: b["k"])
    methods = list(report["no_finetune"]["results"][budgets[0]["label"]])
    others = [f"C{j}" for j in range(10) if j != 3]  # C3 is CAHP's alone
    for i, method in enumerate(methods):
        color = "C3" if method == "cahp" else others[i % len(others)]
        for part, ls, what in parts:
            res = report[part]["results"]
            ys = [res[b["label"]][method]["spearman"] * 100 for b in budgets]
            ax.plot([b["k"] for b in budgets], ys, ls, marker="o", ms=3, color=color, label=f"{method} ({what})",
                    lw=2.2 if method == "cahp" else 1.0)
    ax.axhline(report["dense"]["spearman"] * 100, color="k", ls=":", lw=1, label="dense")
    ax.set_xlabel("heads kept")
    ax.set_ylabel("similarity task: test Spearman x 100")
    ax.set_title(f"{report['model']} / {report['objective']}: heads kept against test Spearman")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)
