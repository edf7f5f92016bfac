"""CAHP's verdict against each method: paired bootstraps on the same test examples.

- pooled (the verdict): per-example correctness averaged over the seeds of
  each method, then a paired bootstrap of method minus CAHP over the test
  examples (`cahp.train.evaluate.paired_bootstrap`).
- per seed: the same paired bootstrap for each seed, with a verdict each.
- verdict, CAHP's: "win" when the 95% interval of (method - CAHP) lies below 0,
  "loss" when it lies above 0, else "tie".
- held-out NLL of a causal LM (`paired_nll`, the decoder compare's): per-sentence
  NLL sums and token counts (`cahp.budget.perplexity.sentence_nll`) resampled by
  sentence, each model's token-weighted mean NLL recomputed on every resample;
  lower is better, so CAHP's verdict (`nll_verdict`) is `verdict` on CAHP - method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cahp.train.evaluate import paired_bootstrap
from cahp.train.metrics import bootstrap_indices

__all__ = ["STATISTICS", "VERDICT_RULE", "compare_to_cahp", "nll_verdict", "paired_nll", "verdict"]

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


# --- held-out NLL of a causal LM: per-sentence sums, token-weighted ----------------------------------


def nll_verdict(ci95) -> str:
    """CAHP's verdict from the 95% interval of (method - CAHP) in NLL, lower better: "win" when it lies above
    0, "loss" when below, else "tie" (`verdict` on CAHP - method)."""
    lo, hi = ci95
    return verdict((-hi, -lo))


def _pooled_nll(recs: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """((sentences,) per-sentence NLL averaged over ``recs`` (seeds), (sentences,) tokens); refuses records
    that scored different sentences."""
    tokens = np.asarray(recs[0]["tokens"], dtype=np.float64)
    for r in recs[1:]:
        if not np.array_equal(np.asarray(r["tokens"], dtype=np.float64), tokens):
            raise ValueError("the records scored different held-out sentences: no paired comparison")
    return np.mean([np.asarray(r["nll"], dtype=np.float64) for r in recs], 0), tokens


def _nll_summary(diff: float, boots: np.ndarray) -> dict:
    """``{"diff", "ci95", "p_value", "verdict", "perplexity_ratio", "perplexity_ratio_ci95"}`` of NLL
    differences; two-sided p = twice the share of resamples on the other side of 0 (capped at 1)."""
    p = 2 * float((boots <= 0).mean()) if diff >= 0 else 2 * float((boots >= 0).mean())
    ci = [float(x) for x in np.percentile(boots, [2.5, 97.5])]
    return {"diff": float(diff), "ci95": ci, "p_value": min(1.0, p), "verdict": nll_verdict(ci),
            "perplexity_ratio": math.exp(diff), "perplexity_ratio_ci95": [math.exp(x) for x in ci]}


def paired_nll(method: Sequence[dict], cahp: Sequence[dict], n_bootstrap: int, seed: int,
               seeds: Sequence | None = None) -> dict:
    """Pooled and per-seed paired bootstraps over held-out sentences of (method - CAHP) mean NLL.

    Args:
        method, cahp: per-seed `cahp.budget.perplexity.sentence_nll` records of the same sentences; a single
            record on one side is paired with every seed of the other.
        n_bootstrap: resamples (of sentences, with replacement; the same resamples for every model).
        seed: seed of the resamples.
        seeds: the seed of each per-seed comparison, recorded beside it.

    Returns:
        ``{"pooled": summary, "per_seed": [summary, ...], "per_seed_verdicts": {"win", "tie", "loss"}}`` with
        each summary's ``diff`` (nats per token; > 0: the method's perplexity is higher than CAHP's), ``ci95``,
        ``p_value``, ``verdict`` (`nll_verdict`) and the perplexity ratio method / CAHP with its interval.
    """
    if not method or not cahp:
        raise ValueError("paired_nll needs at least one record on each side")
    m_nll, tokens = _pooled_nll(method)
    c_nll, c_tokens = _pooled_nll(cahp)
    if not np.array_equal(tokens, c_tokens):
        raise ValueError("the method and CAHP scored different held-out sentences: no paired comparison")
    chunks = list(bootstrap_indices(len(tokens), n_bootstrap, seed))
    denom = np.concatenate([tokens[idx].sum(1) for idx in chunks])

    def resampled(nll: np.ndarray) -> np.ndarray:
        return np.concatenate([nll[idx].sum(1) for idx in chunks]) / denom

    def compare(a: np.ndarray, b: np.ndarray) -> dict:
        return _nll_summary(float(a.sum() - b.sum()) / float(tokens.sum()), resampled(a) - resampled(b))

    pooled = compare(m_nll, c_nll)
    per_seed = []
    for i in range(max(len(method), len(cahp))):
        a = np.asarray(method[min(i, len(method) - 1)]["nll"], dtype=np.float64)
        b = np.asarray(cahp[min(i, len(cahp) - 1)]["nll"], dtype=np.float64)
        r = compare(a, b)
        if seeds is not None:
            r["seed"] = seeds[i]
        per_seed.append(r)
    counts = {v: sum(r["verdict"] == v for r in per_seed) for v in ("win", "tie", "loss")}
    return {"pooled": pooled, "per_seed": per_seed, "per_seed_verdicts": counts}
