"""CAHP's verdict against each method: paired bootstraps on the same test examples.

- pooled (the verdict): per-example correctness averaged over the seeds of
  each method, then a paired bootstrap of method minus CAHP over the test
  examples (`cahp.train.evaluate.paired_bootstrap`).
- per seed: the same paired bootstrap for each seed, with a verdict each.
- verdict, CAHP's: "win" when the 95% interval of (method - CAHP) lies below 0,
  "loss" when it lies above 0, else "tie".
"""

from __future__ import annotations

import numpy as np

from cahp.train.evaluate import paired_bootstrap

__all__ = ["STATISTICS", "VERDICT_RULE", "compare_to_cahp", "verdict"]

VERDICT_RULE = (
    "verdicts are CAHP's: win = the 95% paired-bootstrap interval of (method - CAHP) is below 0, "
    "loss = it is above 0, tie = it contains 0 (the difference is within the confidence interval)"
)
STATISTICS = (
    "paired bootstrap over the test examples of per-example correctness averaged over seeds "
    "(method minus CAHP); per-seed paired bootstraps are reported beside it"
)


def verdict(ci95) -> str:
    """CAHP's verdict from the 95% interval of (method - CAHP): "win", "loss" or "tie"."""
    lo, hi = ci95
    if hi < 0:
        return "win"
    if lo > 0:
        return "loss"
    return "tie"


def compare_to_cahp(method: list[np.ndarray], cahp: list[np.ndarray], n_bootstrap: int, seed: int,
                    seeds: list | None = None) -> dict:
    """Pooled and per-seed paired bootstraps of a method against CAHP on the same test examples.

    ``method`` / ``cahp``: per-seed boolean correctness arrays. Per-seed pairs
    are taken index by index; a single CAHP (or method) array is paired with
    every seed of the other.
    """
    pooled = paired_bootstrap(np.mean(method, 0), np.mean(cahp, 0), n_bootstrap=n_bootstrap, seed=seed)
    pooled["verdict"] = verdict(pooled["ci95"])
    per_seed = []
    n = max(len(method), len(cahp))
    for i in range(n):
        m, c = method[min(i, len(method) - 1)], cahp[min(i, len(cahp) - 1)]
        r = paired_bootstrap(m, c, n_bootstrap=n_bootstrap, seed=seed)
        r["verdict"] = verdict(r["ci95"])
        if seeds is not None:
            r["seed"] = seeds[i]
        per_seed.append(r)
    counts = {v: sum(r["verdict"] == v for r in per_seed) for v in ("win", "tie", "loss")}
    return {"pooled": pooled, "per_seed": per_seed, "per_seed_verdicts": counts}
