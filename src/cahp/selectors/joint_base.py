"""The contract of joint (heads + FFN neurons) selectors: one problem in, one selection out, at a latency share.

Every joint method (`cahp.selectors.joint_methods`, `cahp.selectors.joint_fisher`)
is a `JointMethod`: ``select(share, problem)`` returns the heads and neurons to
keep so that the estimated share of dense latency (``problem.table``, the
budget axis of `cahp prune --ffn`) is at most ``share``. `cahp compare --ffn`
builds every method by name from `JOINT_METHODS`-style registries and never
branches on which one it got; what a method needs beyond the statistics (the
dense model and the calibration batches for Kwon et al.'s per-batch gradients
and mask tuning, a held-out scorer for CAHP's choice of the head/neuron split)
it takes from the `JointProblem` and fails with a clear message when absent.

A selection keeps original indices ({layer: [heads]}, {layer: [neurons]});
optional gate values (mask tuning) are (layers, heads) / (layers, d_ff) tensors
in original numbering, zero off the kept units, to be folded into the output
projections after surgery.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from cahp.budget.cost import CostTable, estimated_latency

__all__ = ["HeldOut", "JointMethod", "JointProblem", "JointSelection", "check_selection", "counts_of"]

#: Tolerance of the share check (float sums of block costs).
SHARE_TOL = 1e-9


@dataclass(frozen=True)
class HeldOut:
    """A selection's held-out result through gates.

    ``score``: the curve's metric (accuracy, Pearson, fidelity...; higher is better). ``loss``: the mean
    held-out loss (cross-entropy, or squared error for regression; lower is better), None where the
    objective has none. A loss is continuous where a metric ties: pruned hard enough, every candidate
    predicts one class and scores the same (chance) accuracy, while their losses still differ.
    ``fidelity``: the mean cosine of the selection's last hidden states with the dense model's over the real
    tokens (higher is closer; None where not measured). It does not pass through the classifier, so it still
    orders selections whose outputs have all collapsed to the label frequencies.
    """

    score: float
    loss: float | None = None
    fidelity: float | None = None

    @classmethod
    def of(cls, value) -> HeldOut:
        """A `HeldOut` from a scorer's result: a `HeldOut`, or a bare score (no loss)."""
        return value if isinstance(value, HeldOut) else cls(score=float(value))


@dataclass
class JointProblem:
    """What joint selectors may use. Arrays are in original numbering; absent units hold 0 and are masked.

    Attributes:
        table: the cost table shares are estimated with (e.g. `cahp.budget.joint_curve.combined_table`).
        head_salience, head_fisher: ``(layers, heads)`` mean ``|dL/dgate|`` and ``(dL/dgate)^2``.
        neuron_salience, neuron_fisher: ``(layers, d_ff)`` likewise for the FFN neurons.
        heads_present, neurons_present: bool masks of the units the model holds.
        head_distances: ``(n, n)`` distances of the heads held, rows in ``head_ids`` order (None: not given).
        head_ids: (layer, head) of each row of ``head_distances``.
        neuron_stats: a `cahp.stats.neurons.NeuronStats` with per-layer correlations (None: not given).
        model: the dense model the statistics describe (data-driven methods: gradients, mask tuning).
        batches: calibration batches (labelled, padded) for those methods.
        score: held-out result of a `JointSelection` through gates, a `HeldOut` (or a bare score, higher is
            better), for methods that choose among candidates; None: such methods take their default candidate.
        seed: seed of seeded methods that have none of their own.
        chance_loss: the held-out loss of the best constant predictor on the data ``score`` uses
            (`cahp.train.metrics.chance_loss`); a selection whose loss is not below it predicts the labels no
            better than their frequencies. None: no such bound (a scorer without a labelled loss).
    """

    table: CostTable
    head_salience: np.ndarray
    head_fisher: np.ndarray
    neuron_salience: np.ndarray
    neuron_fisher: np.ndarray
    heads_present: np.ndarray
    neurons_present: np.ndarray
    head_distances: np.ndarray | None = None
    head_ids: Sequence[tuple[int, int]] = ()
    neuron_stats: Any = None
    model: Any = None
    batches: Sequence[dict] | None = None
    score: Callable[[JointSelection], HeldOut | float] | None = None
    seed: int = 0
    chance_loss: float | None = None

    @property
    def n_layers(self) -> int:
        return self.table.n_layers

    def require(self, what: str, who: str):
        """``getattr(self, what)``, or a one-line error naming the method that needs it."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"{who} needs the joint problem's {what}")
        return value


@dataclass
class JointSelection:
    """Kept heads and neurons ({layer: original indices}), optional tuned gate values, what the method reports."""

    heads: dict[int, list[int]]
    neurons: dict[int, list[int]]
    head_gates: torch.Tensor | None = None
    neuron_gates: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def counts(self, n_layers: int) -> tuple[list[int], list[int]]:
        """(heads per layer, neurons per layer)."""
        return counts_of(self.heads, n_layers), counts_of(self.neurons, n_layers)

    def share(self, table: CostTable) -> float:
        """Estimated share of dense latency under ``table``."""
        return estimated_latency(table, *self.counts(table.n_layers))

    def masks(self, head_shape: tuple[int, int], neuron_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(head mask (layers, heads), neuron mask (layers, d_ff)) bool."""
        hm = torch.zeros(head_shape, dtype=torch.bool)
        nm = torch.zeros(neuron_shape, dtype=torch.bool)
        for layer, hs in self.heads.items():
            hm[int(layer), list(hs)] = True
        for layer, ns in self.neurons.items():
            nm[int(layer), list(ns)] = True
        return hm, nm

    def gate_values(self, head_shape, neuron_shape) -> tuple[torch.Tensor, torch.Tensor]:
        """(head gates, neuron gates) float: the tuned values where given, else the masks as 0/1."""
        hm, nm = self.masks(head_shape, neuron_shape)
        hg = self.head_gates.float() if self.head_gates is not None else hm.float()
        ng = self.neuron_gates.float() if self.neuron_gates is not None else nm.float()
        return hg, ng

    def to_dict(self) -> dict:
        """JSON-ready: kept units with string layer keys, gates as lists (None when not tuned), info."""
        return {
            "heads": {str(k): [int(x) for x in v] for k, v in sorted(self.heads.items())},
            "neurons": {str(k): [int(x) for x in v] for k, v in sorted(self.neurons.items())},
            "head_gates": None if self.head_gates is None else self.head_gates.tolist(),
            "neuron_gates": None if self.neuron_gates is None else self.neuron_gates.tolist(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> JointSelection:
        return cls(
            heads={int(k): list(v) for k, v in d["heads"].items()},
            neurons={int(k): list(v) for k, v in d["neurons"].items()},
            head_gates=None if d.get("head_gates") is None else torch.tensor(d["head_gates"]),
            neuron_gates=None if d.get("neuron_gates") is None else torch.tensor(d["neuron_gates"]),
            info=dict(d.get("info") or {}),
        )


def counts_of(kept: dict, n_layers: int) -> list[int]:
    """Per-layer counts of a {layer: [indices]} mapping (layers not listed keep 0)."""
    return [len(kept.get(i, kept.get(str(i), []))) for i in range(n_layers)]


class JointMethod(ABC):
    """A joint selector: heads and neurons to keep for an estimated latency share.

    Subclasses are dataclasses whose fields are their settings (``name`` excepted);
    ``seeded`` says whether the selection depends on the seed (then ``seed`` is a field).
    """

    name: str = "joint"
    seeded: ClassVar[bool] = False

    @abstractmethod
    def select(self, share: float, problem: JointProblem) -> JointSelection:
        """Units to keep so that ``problem.table``'s estimated share is at most ``share`` (in (0, 1])."""

    def settings(self) -> dict:
        """The method's settings (its dataclass fields but ``name`` and private ones), for cache keys and reports."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and f.name != "name" and not f.name.startswith("_")}


def check_selection(sel: JointSelection, problem: JointProblem, share: float, who: str = "selection") -> float:
    """The selection's estimated share, after checking it keeps only units the model holds, within ``share``.

    Raises:
        ValueError: a unit the model does not hold, no head at all, or a share above the target.
    """
    for kind, kept, present in (("head", sel.heads, problem.heads_present),
                                ("neuron", sel.neurons, problem.neurons_present)):
        for layer, units in kept.items():
            units = list(units)
            if len(set(units)) != len(units):
                raise ValueError(f"{who}: layer {layer} lists a {kind} twice")
            if units and not bool(np.asarray(present)[int(layer), units].all()):
                raise ValueError(f"{who}: layer {layer} keeps a {kind} the model does not hold")
    if not sum(len(v) for v in sel.heads.values()):
        raise ValueError(f"{who} keeps no head")
    got = sel.share(problem.table)
    if got > share + SHARE_TOL:
        raise ValueError(f"{who} has an estimated share of {got:.4f}, above its target {share:.4f}")
    return got
