"""cahp.pipelines.embedding_eval: the throughput's speedup intervals and the goal decided from them (issue 22)."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from cahp.bench import timing
from cahp.bench.figures import bootstrap_medians_ci
from cahp.pipelines.embedding_eval import encoding_throughput, speedup_goal, speedup_interval, speedup_text

from .test_deploy import WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

# (reps,) seconds of the dense call of each round, and the pruned model's speedup in that round
DENSE = np.array([1.0, 1.1, 0.9, 1.2, 1.0, 1.3, 0.95, 1.05])
RATIO = np.array([1.5, 1.62, 1.41, 1.55, 1.47, 1.71, 1.58, 1.44])


@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizer(vocab_file=str(vocab), do_lower_case=False)


def _throughput(monkeypatch, tokenizer, dense, pruned, n_bootstrap=500, seed=0):
    """`encoding_throughput` with the timing replaced by given per-repetition seconds (the models never run)."""
    calls = []

    def fake(runners, **kw):
        calls.append(list(runners))
        return {"dense": list(dense), "pruned": list(pruned)}

    monkeypatch.setattr(timing, "time_round_robin", fake)
    texts = [" ".join(WORDS[i: i + 3]) for i in range(20)]
    out = encoding_throughput({"dense": None, "pruned": None}, tokenizer, texts, {}, max_length=8, seed=seed,
                              config={"threads": (1,), "batch_sizes": (4,), "sentences": {4: 8},
                                      "n_bootstrap": n_bootstrap})
    assert calls == [["dense", "pruned"]]
    return out["t1_b4"]


def test_speedup_interval_is_the_bootstrap_of_the_median_per_repetition_ratio(monkeypatch, tokenizer):
    entry = _throughput(monkeypatch, tokenizer, DENSE, DENSE / RATIO)
    assert entry["reps"] == len(DENSE)
    assert entry["speedup"]["pruned"] == pytest.approx(np.median(RATIO))
    lo, hi = entry["speedup_ci95"]["pruned"]
    assert lo <= entry["speedup"]["pruned"] <= hi and lo < hi
    assert [lo, hi] == pytest.approx(bootstrap_medians_ci([RATIO], lambda m: m, 500, 0))
    assert RATIO.min() <= lo and hi <= RATIO.max()
    # a slowdown of a whole round multiplies both calls of it and changes neither figure
    drift = np.array([1.0, 3.0, 1.0, 0.5, 2.0, 1.0, 1.0, 4.0])
    again = _throughput(monkeypatch, tokenizer, DENSE * drift, DENSE * drift / RATIO)
    assert again["speedup"] == pytest.approx(entry["speedup"])
    assert again["speedup_ci95"]["pruned"] == pytest.approx([lo, hi])
    # the resamples count: another number of them moves the interval's ends
    other = _throughput(monkeypatch, tokenizer, DENSE, DENSE / RATIO, n_bootstrap=50, seed=3)
    assert other["speedup_ci95"]["pruned"] == pytest.approx(bootstrap_medians_ci([RATIO], lambda m: m, 50, 3))
    # the same speedup in every round: no spread
    flat = _throughput(monkeypatch, tokenizer, DENSE, DENSE / 2.0)
    assert flat["speedup"]["pruned"] == pytest.approx(2.0)
    assert flat["speedup_ci95"]["pruned"] == pytest.approx([2.0, 2.0])


def test_one_repetition_has_no_interval(monkeypatch, tokenizer):
    entry = _throughput(monkeypatch, tokenizer, [1.0], [0.5])
    assert entry["speedup"]["pruned"] == pytest.approx(2.0)
    assert speedup_interval(entry, "pruned") is None
    assert speedup_text(entry, "pruned") == "2.00x [no interval]"
    assert speedup_goal(entry, "pruned", 1.5) == "undecided"


@pytest.mark.parametrize("ci, verdict", [
    ([1.6, 1.9], "met"),
    ([1.5, 1.9], "met"),  # the low end at the goal
    ([1.2, 1.49], "not met"),
    ([1.4, 1.6], "undecided"),
    ([1.2, 1.5], "undecided"),  # the high end at the goal: not below it
    ([None, None], "undecided"),  # NaN once in JSON
])
def test_speedup_goal_is_decided_by_the_interval(ci, verdict):
    entry = {"speedup": {"p": 1.55}, "speedup_ci95": {"p": ci}}
    assert speedup_goal(entry, "p", 1.5) == verdict
    want = "1.55x [no interval]" if ci[0] is None else f"1.55x [{ci[0]:.2f}, {ci[1]:.2f}]"
    assert speedup_text(entry, "p") == want
    # a result from before the intervals has none
    assert speedup_goal({"speedup": {"p": 9.0}}, "p", 1.5) == "undecided"
    assert speedup_text({"speedup": {"p": 9.0}}, "p") == "9.00x [no interval]"
