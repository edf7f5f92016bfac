"""cahp.pipelines.verdicts: CAHP's verdicts from paired intervals, and the paired NLL bootstrap of a causal LM."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cahp.pipelines.verdicts import nll_verdict, paired_nll, verdict


@pytest.mark.parametrize("ci, accuracy_like, nll_like", [
    ((-0.3, -0.1), "win", "loss"),  # method below CAHP: a CAHP win in accuracy, a loss in NLL
    ((0.1, 0.3), "loss", "win"),
    ((-0.1, 0.2), "tie", "tie"),
    ((0.0, 0.2), "tie", "tie"),  # an end at 0 is inside
])
def test_verdict_signs(ci, accuracy_like, nll_like):
    assert verdict(ci) == accuracy_like and nll_verdict(ci) == nll_like


def _rec(nll, tokens):
    nll = np.asarray(nll, dtype=np.float64)
    return {"nll": nll.tolist(), "tokens": list(tokens), "mean_nll": float(nll.sum() / sum(tokens))}


def test_verdict_sign_higher_method_nll_is_a_cahp_win():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 30, size=200)
    cahp = rng.gamma(2.0, 1.5, size=200) * tokens  # per-sentence NLL sums
    worse = cahp + 0.4 * tokens + rng.normal(0, 0.2, 200) * tokens  # ~0.4 nats/token more than CAHP
    r = paired_nll([_rec(worse, tokens)], [_rec(cahp, tokens)], n_bootstrap=2000, seed=0)["pooled"]
    # diff is token-weighted: (sum method - sum CAHP) / sum tokens, not a mean of per-sentence means
    assert r["diff"] == pytest.approx((worse.sum() - cahp.sum()) / tokens.sum(), rel=1e-12)
    assert r["diff"] > 0 and r["ci95"][0] > 0 and r["verdict"] == "win"
    assert r["perplexity_ratio"] == pytest.approx(math.exp(r["diff"]))
    back = paired_nll([_rec(cahp, tokens)], [_rec(worse, tokens)], n_bootstrap=2000, seed=0)["pooled"]
    assert back["diff"] == pytest.approx(-r["diff"]) and back["ci95"][1] < 0 and back["verdict"] == "loss"
    noise = cahp + rng.normal(0, 0.01, 200) * tokens
    assert paired_nll([_rec(noise, tokens)], [_rec(cahp, tokens)], 2000, 0)["pooled"]["verdict"] == "tie"
    # seeds are pooled by averaging per-sentence NLL (the same tokens): two seeds straddling CAHP tie
    two = paired_nll([_rec(cahp + 0.4 * tokens, tokens), _rec(cahp - 0.4 * tokens, tokens)], [_rec(cahp, tokens)],
                     500, 0, seeds=[0, 1])
    assert two["pooled"]["diff"] == pytest.approx(0, abs=1e-12)
    assert [s["verdict"] for s in two["per_seed"]] == ["win", "loss"] and [s["seed"] for s in two["per_seed"]] == [0, 1]
    with pytest.raises(ValueError, match="different held-out sentences"):
        paired_nll([_rec(cahp[:-1], tokens[:-1])], [_rec(cahp, tokens)], 10, 0)
