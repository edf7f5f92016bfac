"""Joint (heads + FFN neurons) selectors behind `JointMethod`: CAHP's and the baselines it is compared with.

Every method returns units whose estimated share of dense latency (the
problem's cost table) is at most the target; they differ in how they split the
budget between layers and kinds and which units they keep:

- ``cahp`` (`CahpJoint`): `allocate` by salience per cost (`fair_values`,
  several head weights, the one of lowest held-out loss), then per layer the
  salient and complementary units (`JointSelector`; ``within="greedy"``, the
  default: salience discounted by nearness to the units kept before,
  `greedy_order`; ``within="clusters"``: clusters of the layer's distances,
  each cluster's most salient member).
- ``gradient`` (`GradientJoint`): the same allocation with head weight 1 and,
  per layer, the most salient units: CAHP without the redundancy discount
  and without the split search (an ablation as much as a baseline).
- ``random`` (`RandomJoint`): the same allocation of seeded uniform values.
- ``p-pruning`` (`PPruningJoint`): P-pruning-style, the same share of every
  layer's heads and neurons (uniform ratio, the largest meeting the target),
  each layer's units clustered and the most salient member of each cluster
  kept. P-pruning clusters unit outputs; here neurons are clustered on their
  activation correlations over the calibration tokens (a neuron's output is
  its activation times a fixed column, so the two agree up to sign) and heads
  on CAHP's head distances (head outputs are not collected).
- ``layer-drop`` (`LayerDropJoint`): keep every unit of the first N layers and
  nothing of the rest, N the largest that meets the target: what a user tries first.
- ``fisher`` / ``fisher-tuned``: Kwon et al.'s mask search (`cahp.selectors.joint_fisher`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cahp.budget.cost import estimated_latency
from cahp.budget.joint_curve import fair_values
from cahp.selectors.joint import (
    LINKAGES,
    WITHIN,
    Allocation,
    JointSelectionError,
    JointSelector,
    allocate,
    head_selection,
    neuron_selection,
)
from cahp.selectors.joint_base import HeldOut, JointMethod, JointProblem, JointSelection

__all__ = ["CHOOSE_BY", "COLLAPSED", "CahpJoint", "GradientJoint", "LayerDropJoint", "PPruningJoint", "RandomJoint",
           "ordered_weights", "top_units"]


def ordered_weights(weights) -> list[float]:
    """Distinct positive head weights, the neutral 1 first, then by distance from it (ties in score keep 1)."""
    w = [float(x) for x in weights]
    if not w or any(not x > 0 or not math.isfinite(x) for x in w):
        raise JointSelectionError(f"head weights must be positive numbers, got {weights!r}")
    return sorted(set(w), key=lambda x: (abs(math.log(x)), x))


def top_units(values: np.ndarray, present: np.ndarray, counts: list[int]) -> dict[int, list[int]]:
    """Per layer, the ``counts[layer]`` present units of largest value ({layer: sorted original indices})."""
    out = {}
    for layer, k in enumerate(counts):
        ids = np.flatnonzero(present[layer])
        if k > len(ids):
            raise JointSelectionError(f"layer {layer} holds {len(ids)} units: it cannot keep {k}")
        order = ids[np.argsort(-values[layer, ids], kind="stable")]  # ties: the lower index first
        out[layer] = sorted(int(i) for i in order[:k])
    return out


def _allocate(problem: JointProblem, head_values, neuron_values, share: float) -> Allocation:
    return allocate(problem.table, head_values, neuron_values, share, heads_present=problem.heads_present,
                    neurons_present=problem.neurons_present)


#: What `CahpJoint` compares its candidates by: the held-out loss (lower wins; the score where the scorer gives
#: no loss), or the held-out score (the curve's metric, higher wins).
CHOOSE_BY = ("loss", "score")

#: What `CahpJoint` keeps where no candidate's held-out loss is below ``problem.chance_loss`` (every split's
#: outputs carry no information about the labels, so their losses differ by how a collapsed output is
#: calibrated, not by what it keeps): the candidate whose last hidden states are closest to the dense model's
#: (``HeldOut.fidelity``; the neutral weight where a candidate has none), the neutral head weight (the first
#: reachable of `ordered_weights`), the lowest loss all the same, or the candidate keeping the most heads.
COLLAPSED = ("fidelity", "neutral", "lowest", "heads")


@dataclass
class CahpJoint(JointMethod):
    """CAHP for heads and neurons (the method of `cahp prune --ffn`; see `cahp.pipelines.joint`).

    For each head weight (`ordered_weights`), `allocate` the fair values
    (`fair_values`) to the target share and pick the units per layer with
    `JointSelector` (rule ``within``); with a ``problem.score`` the best candidate by
    ``choose_by`` is kept (`best`; ties: the earlier weight), without one the
    first weight's. Candidates are memoised by their counts (the selection is
    a function of them), so a curve over many shares scores each distinct
    allocation once.

    ``choose_by="loss"`` (the default) because the metric is a step function
    of the logits: pruned hard, every split may predict one class before
    fine-tuning, so all tie at the majority-class accuracy and the tie rule,
    not the data, would choose; their held-out losses still order them.

    Pruned harder still, every split's loss is at or above the best constant predictor's
    (``problem.chance_loss``): none tells the labels apart better than their frequencies, and the losses
    differ in the third decimal by how the collapsed outputs are calibrated. The labels cannot choose there.
    ``collapsed="fidelity"`` (the default) asks the representation instead: it keeps the candidate whose last
    hidden states are closest to the dense model's (``HeldOut.fidelity``, mean cosine over real tokens), which
    is what the one fine-tuning starts from and a new classifier reads; it does not pass through the collapsed
    classifier. ``collapsed="neutral"`` keeps the neutral weight, the split of plain salience per cost, as an
    exact tie would; ``collapsed="lowest"`` keeps the lowest loss regardless; ``collapsed="heads"`` keeps the
    candidate that keeps the most heads (ties: the earlier), on the view that the one fine-tuning recovers more
    from kept attention than from kept neurons (ours; not the default, see docs/METHOD.md for its evidence).
    """

    head_weights: tuple[float, ...] = (1.0, 0.5, 2.0)
    linkage: str = "average"
    choose_by: str = "loss"
    within: str = "greedy"
    collapsed: str = "fidelity"
    name: str = "cahp"
    _selector: dict = field(default_factory=dict, init=False, repr=False)
    _scores: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.linkage not in LINKAGES:
            raise JointSelectionError(f"unknown linkage {self.linkage!r}; choose from {', '.join(LINKAGES)}")
        if self.choose_by not in CHOOSE_BY:
            raise JointSelectionError(f"unknown choose_by {self.choose_by!r}; choose from {', '.join(CHOOSE_BY)}")
        if self.within not in WITHIN:
            raise JointSelectionError(f"unknown within-layer rule {self.within!r}; choose from {', '.join(WITHIN)}")
        if self.collapsed not in COLLAPSED:
            raise JointSelectionError(f"unknown rule for collapsed splits {self.collapsed!r}; choose from "
                                      f"{', '.join(COLLAPSED)}")
        self.head_weights = tuple(ordered_weights(self.head_weights))

    def settings(self) -> dict:
        return {"head_weights": list(self.head_weights), "linkage": self.linkage, "choose_by": self.choose_by,
                "within": self.within, "collapsed": self.collapsed}

    def selector(self, problem: JointProblem) -> JointSelector:
        """The problem's per-layer merge trees, built once per problem object."""
        if self._selector.get("problem") is not problem:
            D = problem.require("head_distances", "CAHP's joint selection")
            stats = problem.require("neuron_stats", "CAHP's joint selection")
            self._selector.clear()
            self._scores.clear()
            self._selector.update(problem=problem, selector=JointSelector(D, problem.head_ids, problem.head_salience,
                                                                          stats, method=self.linkage,
                                                                          within=self.within))
        return self._selector["selector"]

    def allocation(self, share: float, problem: JointProblem, weight: float) -> Allocation:
        """The counts per layer for one head weight."""
        return _allocate(problem, *fair_values(problem.table, problem.head_salience, problem.neuron_salience, weight),
                         share)

    def candidates(self, share: float, problem: JointProblem) -> list[dict]:
        """Every head weight's allocation that reaches ``share``: {"head_weight", "allocation", "selection",
        "score", "loss", "fidelity"} (None without ``problem.score``; then only the first weight is tried)."""
        weights = self.head_weights if problem.score is not None else self.head_weights[:1]
        out = []
        for w in weights:
            try:
                alloc = self.allocation(share, problem, w)
            except JointSelectionError:
                continue  # this split cannot reach the share; another weight may
            heads, neurons = self.selector(problem).select(alloc)
            sel = JointSelection(heads=heads, neurons=neurons)
            key = (tuple(alloc.heads), tuple(alloc.neurons))
            if problem.score is not None and key not in self._scores:
                self._scores[key] = HeldOut.of(problem.score(sel))
            held = self._scores.get(key)
            out.append({"head_weight": w, "allocation": alloc, "selection": sel,
                        "score": None if held is None else held.score, "loss": None if held is None else held.loss,
                        "fidelity": None if held is None else held.fidelity})
        return out

    def collapsed_split(self, cands: list[dict], chance_loss: float | None) -> bool:
        """Whether the held-out losses cannot choose: ``choose_by="loss"``, every candidate with a loss and none
        below ``chance_loss`` (the best constant predictor's; None: no such bound, the losses always choose)."""
        return (self.choose_by == "loss" and chance_loss is not None and bool(cands)
                and all(c["loss"] is not None and c["loss"] >= chance_loss for c in cands))

    def decided_by(self, cands: list[dict], chance_loss: float | None = None) -> str:
        """What `best` compares: "loss", "score", "fidelity" (collapsed, every candidate has one), "heads"
        (collapsed under ``collapsed="heads"``) or "neutral" (collapsed under ``collapsed="neutral"``, or
        "fidelity" with a candidate lacking it)."""
        if self.collapsed_split(cands, chance_loss) and self.collapsed != "lowest":
            if self.collapsed == "heads":
                return "heads"
            fidelity = self.collapsed == "fidelity" and all(c.get("fidelity") is not None for c in cands)
            return "fidelity" if fidelity else "neutral"
        if self.choose_by == "loss" and all(c["loss"] is not None for c in cands):
            return "loss"
        return "score"

    def best(self, cands: list[dict], chance_loss: float | None = None) -> dict:
        """The candidate kept, by `decided_by`: the lowest loss, the highest score, the highest fidelity, the most
        heads, or the neutral (first) candidate; ties keep the earlier (the neutral weight 1 comes first)."""
        rule = self.decided_by(cands, chance_loss)
        if rule == "neutral":
            return cands[0]
        if rule == "fidelity":
            return max(cands, key=lambda c: c["fidelity"])
        if rule == "heads":
            return max(cands, key=lambda c: sum(c["allocation"].heads))
        if rule == "loss":
            return min(cands, key=lambda c: c["loss"])  # min and max keep the first of equals
        if any(c["score"] is None for c in cands):
            return cands[0]
        return max(cands, key=lambda c: c["score"])

    def select(self, share: float, problem: JointProblem) -> JointSelection:
        cands = self.candidates(share, problem)
        if not cands:
            raise JointSelectionError(f"no head weight reaches an estimated share of {share}")
        best = self.best(cands, problem.chance_loss)
        collapsed = self.collapsed_split(cands, problem.chance_loss)
        sel = best["selection"]
        rule = self.decided_by(cands, problem.chance_loss)
        sel.info = {"head_weight": best["head_weight"], "heldout_score": best["score"], "heldout_loss": best["loss"],
                    "heldout_fidelity": best["fidelity"], "choose_by": self.choose_by,
                    "chance_loss": problem.chance_loss, "collapsed": collapsed, "decided_by": rule,
                    "neutral_fallback": rule == "neutral",
                    "candidates": [{"head_weight": c["head_weight"], "heldout_score": c["score"],
                                    "heldout_loss": c["loss"], "heldout_fidelity": c["fidelity"],
                                    "estimated_share": c["allocation"].share} for c in cands]}
        return sel


@dataclass
class GradientJoint(JointMethod):
    """The allocation of `CahpJoint` at head weight 1, and per layer the units of largest ``|dL/dgate|``."""

    name: str = "gradient"

    def select(self, share: float, problem: JointProblem) -> JointSelection:
        hv, nv = fair_values(problem.table, problem.head_salience, problem.neuron_salience, 1.0)
        alloc = _allocate(problem, hv, nv, share)
        return JointSelection(heads=top_units(hv, problem.heads_present, alloc.heads),
                              neurons=top_units(nv, problem.neurons_present, alloc.neurons))


@dataclass
class RandomJoint(JointMethod):
    """The allocation of seeded uniform unit values (on the fair scale, so neither kind is favoured)."""

    seed: int = 0
    name: str = "random"
    seeded = True

    def select(self, share: float, problem: JointProblem) -> JointSelection:
        rng = np.random.default_rng(self.seed)
        h = rng.uniform(size=problem.heads_present.shape) * problem.heads_present
        n = rng.uniform(size=problem.neurons_present.shape) * problem.neurons_present
        hv, nv = fair_values(problem.table, h, n, 1.0)
        alloc = _allocate(problem, hv, nv, share)
        return JointSelection(heads=top_units(hv, problem.heads_present, alloc.heads),
                              neurons=top_units(nv, problem.neurons_present, alloc.neurons))


@dataclass
class PPruningJoint(JointMethod):
    """P-pruning-style: one keep ratio for every layer's heads and neurons, cluster representatives per layer.

    The ratio is the largest (bisection on its rounded counts, each layer
    keeping at least one head) whose estimated share meets the target; each
    layer then keeps the most salient member of each of its clusters
    (`head_selection`, `neuron_selection`, the linkage of `CahpJoint`).
    """

    linkage: str = "average"
    name: str = "p-pruning"

    def counts(self, ratio: float, problem: JointProblem) -> tuple[list[int], list[int]]:
        """Per-layer kept counts at one keep ratio (at least one head per layer that holds any)."""
        nh = problem.heads_present.sum(1)
        nn_ = problem.neurons_present.sum(1)
        heads = [min(int(h), max(1, round(ratio * int(h)))) if h else 0 for h in nh]
        neurons = [round(ratio * int(n)) for n in nn_]
        return heads, neurons

    def select(self, share: float, problem: JointProblem) -> JointSelection:
        D = problem.require("head_distances", "P-pruning-style selection")
        stats = problem.require("neuron_stats", "P-pruning-style selection")
        lo, hi = 0.0, 1.0
        if estimated_latency(problem.table, *self.counts(lo, problem)) > share:
            raise JointSelectionError(f"a uniform ratio cannot reach an estimated share of {share} (one head per "
                                      "layer stays)")
        if estimated_latency(problem.table, *self.counts(hi, problem)) <= share:
            lo = hi
        for _ in range(40):  # the share is monotone in the ratio: keep the largest ratio that meets the target
            if hi - lo < 1e-6:
                break
            mid = (lo + hi) / 2
            if estimated_latency(problem.table, *self.counts(mid, problem)) <= share:
                lo = mid
            else:
                hi = mid
        heads, neurons = self.counts(lo, problem)
        kept_heads = head_selection(D, problem.head_ids, problem.head_salience, heads, method=self.linkage)
        kept_neurons = neuron_selection(stats, neurons, method=self.linkage)
        return JointSelection(heads=kept_heads, neurons=kept_neurons, info={"ratio": lo})


@dataclass
class LayerDropJoint(JointMethod):
    """Keep the first N layers whole and nothing of the others; N the largest meeting the target (at least 1)."""

    name: str = "layer-drop"

    def select(self, share: float, problem: JointProblem) -> JointSelection:
        hp, np_ = problem.heads_present, problem.neurons_present
        L = problem.n_layers
        for n_layers in range(L, 0, -1):
            heads = [int(hp[i].sum()) if i < n_layers else 0 for i in range(L)]
            neurons = [int(np_[i].sum()) if i < n_layers else 0 for i in range(L)]
            if sum(heads) and estimated_latency(problem.table, heads, neurons) <= share:
                return JointSelection(
                    heads={i: np.flatnonzero(hp[i]).tolist() if i < n_layers else [] for i in range(L)},
                    neurons={i: np.flatnonzero(np_[i]).tolist() if i < n_layers else [] for i in range(L)},
                    info={"layers_kept": n_layers})
        raise JointSelectionError(f"keeping one layer already exceeds an estimated share of {share}")
