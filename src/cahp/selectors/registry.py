"""Every head selector by name: CAHP and the baselines, built the same way for prune and compare."""

from __future__ import annotations

import dataclasses

from cahp.selectors.base import HeadSelector
from cahp.selectors.cahp import CAHPSelector
from cahp.selectors.fisher import FisherSearchSelector
from cahp.selectors.gqa import GQA_SELECTORS
from cahp.selectors.gradient import GradientSelector
from cahp.selectors.joint_base import JointMethod
from cahp.selectors.joint_fisher import KwonJointFisher
from cahp.selectors.joint_methods import CahpJoint, GradientJoint, LayerDropJoint, PPruningJoint, RandomJoint
from cahp.selectors.layer_drop import LayerDropSelector
from cahp.selectors.simple import EntropySelector, MagnitudeSelector, RandomSelector

__all__ = ["JOINT_METHODS", "KV_SELECTORS", "SELECTORS", "make_joint_method", "make_selector"]

SELECTORS: dict[str, tuple[type[HeadSelector], dict]] = {
    "cahp": (CAHPSelector, {}),
    "random": (RandomSelector, {}),
    "magnitude": (MagnitudeSelector, {}),
    "gradient": (GradientSelector, {}),
    "gradient-layernorm": (GradientSelector, {"normalize": "layer"}),
    "gradient-iterative": (GradientSelector, {"iterative": True}),
    "entropy": (EntropySelector, {}),
    "fisher": (FisherSearchSelector, {}),
    "fisher-tuned": (FisherSearchSelector, {"tune": True}),
    "layer-drop": (LayerDropSelector, {}),
}
"""name -> (selector class, fixed settings). ``fisher`` = search + rearrangement; ``fisher-tuned`` adds tuning."""

KV_SELECTORS: dict[str, tuple[type[HeadSelector], dict]] = {name: (cls, {}) for name, cls in GQA_SELECTORS.items()}
"""Peers for grouped-query decoders (`cahp.selectors.gqa`): budgets in KV heads, whole KV groups kept. Apart
from `SELECTORS`, whose selectors count query heads."""


JOINT_METHODS: dict[str, tuple[type[JointMethod], dict]] = {
    "cahp": (CahpJoint, {}),
    "fisher": (KwonJointFisher, {}),
    "fisher-tuned": (KwonJointFisher, {"tune": True}),
    "p-pruning": (PPruningJoint, {}),
    "gradient": (GradientJoint, {}),
    "random": (RandomJoint, {}),
    "layer-drop": (LayerDropJoint, {}),
}
"""Joint (heads + FFN neurons) peers for `cahp compare --ffn` (`cahp.selectors.joint_methods`, `joint_fisher`):
budgets are estimated latency shares. ``fisher`` = Kwon et al.'s search + rearrangement; ``fisher-tuned`` adds
their mask tuning."""


def make_joint_method(name: str, seed: int = 0, shared: dict | None = None, **kw) -> JointMethod:
    """A joint method by `JOINT_METHODS` name, built as `make_selector` builds head selectors (``shared``
    settings go to the methods that have them; ``seed`` to seeded ones)."""
    if name not in JOINT_METHODS:
        raise ValueError(f"unknown joint method {name!r}; choose from {', '.join(JOINT_METHODS)}")
    cls, fixed = JOINT_METHODS[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    args = {**{k: v for k, v in (shared or {}).items() if k in fields}, **fixed, **kw, "name": name}
    if "seed" in fields:
        args.setdefault("seed", seed)
    return cls(**args)


def make_selector(name: str, seed: int = 0, shared: dict | None = None, **kw) -> HeadSelector:
    """A selector by registry name; ``seed`` goes to selectors that take one (cahp, random).

    Args:
        shared: run-wide settings (e.g. `cahp prune`'s distance, clustering and
            kernel), each given to the selectors that have a setting of that
            name and ignored by the others, so one call builds any selector of
            a run.
        kw: settings of this selector, overriding the registry's and ``shared``
            (e.g. ``make_selector("cahp", 0, distance="hellinger")``).

    The selector's ``name`` is the registry name.
    """
    known = {**SELECTORS, **KV_SELECTORS}
    if name not in known:
        raise ValueError(f"unknown selector {name!r}; choose from {', '.join(known)}")
    cls, fixed = known[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    args = {**{k: v for k, v in (shared or {}).items() if k in fields}, **fixed, **kw, "name": name}
    if "seed" in fields:
        args.setdefault("seed", seed)
    return cls(**args)
