"""Settings of the joint (heads + FFN neurons) pipelines, `cahp prune --ffn` and `cahp compare --ffn`.

Apart from `cahp.pipelines.joint` so that building the command line does not import the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cahp.budget.cost import SOURCES
from cahp.core.configs import field as cfg_field
from cahp.selectors.joint import LINKAGES, WITHIN
from cahp.selectors.joint_methods import CHOOSE_BY, COLLAPSED

__all__ = ["SPEEDUP_AT", "JointConfig", "JointSetupError"]

#: Meanings of an estimated speedup target (`JointConfig.speedup_at`).
SPEEDUP_AT = ("mean", "each")


class JointSetupError(ValueError):
    """Settings of `cahp prune --ffn` that do not go together."""


@dataclass
class JointConfig:
    """Settings of the joint pipeline beyond `PruneConfig` (defaults: see the module docstring)."""

    cost_source: str = cfg_field("measured", "cost of a head and a neuron: measured here, or multiply-adds",
                                 choices=list(SOURCES))
    cost_shapes: str = cfg_field("1x32,32x128", "shapes whose mean estimated share is the budget axis")
    speedup_at: str = cfg_field("mean", "what an estimated speedup target X bounds (--target-speedup, compare's "
                                "--speedups): the mean of the shapes' shares (mean: 1/X on average), or every "
                                "shape's share (each: at least X at every shape; the knee's axis stays the mean)",
                                choices=list(SPEEDUP_AT))
    cost_threads: int = cfg_field(1, "threads of the cost measurement")
    grid_points: int = cfg_field(14, "target shares on the curve, from 1.0 down to --min-share")
    min_share: float = cfg_field(0.25, "smallest target share on the curve (raised above the lowest reachable)")
    head_weights: str = cfg_field("0.5,1,2", "weights of head values against neuron values tried at each share")
    choose_by: str = cfg_field("loss", "what picks the head weight at each share: the held-out loss (continuous, "
                               "so splits that tie in accuracy still differ) or the held-out score",
                               choices=list(CHOOSE_BY))
    collapsed: str = cfg_field("fidelity", "the head weight kept where no split's held-out loss is below the best "
                               "constant predictor's (outputs that carry no information about the labels): the "
                               "split whose last hidden states are closest to the dense model's, the neutral "
                               "weight 1, the lowest loss regardless, or the split keeping the most heads",
                               choices=list(COLLAPSED))
    linkage: str = cfg_field("average", "linkage of the per-layer clustering", choices=list(LINKAGES))
    within: str = cfg_field("greedy", "how CAHP keeps a layer's units: by salience discounted by nearness to the "
                            "units kept before (greedy), or one most salient representative per cluster",
                            choices=list(WITHIN))
    speedup_budget: float = cfg_field(15.0, "seconds of timing per shape for the measured speedup (0: skip)")
    speedup_threads: int = cfg_field(1, "threads of the speedup measurement")

    def weights(self) -> list[float]:
        """`head_weights` as numbers, 1 first (ties in score keep the neutral split)."""
        try:
            w = [float(x) for x in self.head_weights.split(",") if x.strip()]
        except ValueError:
            raise JointSetupError(f"head weights must be comma-separated numbers, got {self.head_weights!r}") from None
        if not w or any(not x > 0 or not math.isfinite(x) for x in w):
            raise JointSetupError(f"head weights must be positive numbers, got {self.head_weights!r}")
        return sorted(set(w), key=lambda x: (abs(math.log(x)), x))
