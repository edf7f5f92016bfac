"""The methods of a compare run: one built per (method, selection seed), and the names of their results.

Every compare (heads-only, ``--ffn``, label-free, decoder) runs its methods the
same way: a method whose selection depends on the seed (the random selector) is
built once per compare seed, every other method once for all seeds (seed
``None``, built with ``--seed`` as `cahp prune` builds CAHP). `MethodsBySeed`
holds that logic once; a compare names its registry and, where a method needs
the run's own loss (the label-free Fisher searches), overrides `build`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cahp.pipelines.stages import PruneConfig, selector_settings
from cahp.selectors.registry import make_selector

__all__ = ["MethodsBySeed"]


class MethodsBySeed:
    """Per (method, selection seed) methods of one compare call, built once and kept.

    A subclass sets `registry` (name -> (class, ...), the class telling ``.seeded``) and, before it builds a
    method, ``self.cfg`` (a `PruneConfig`: its ``seed`` seeds the selections without a seed of their own) and
    ``self.seeds`` (the compare seeds). Kept methods let a method that caches passes over data reuse them.
    """

    registry: ClassVar[dict[str, tuple]]
    cfg: PruneConfig
    seeds: list[int]

    def seeded(self, name: str) -> bool:
        """Whether the method's selection depends on the compare seed (the random selector)."""
        return self.registry[name][0].seeded

    def sel_seeds(self, name: str) -> list[int | None]:
        """The compare seeds a method's selection depends on ([None]: one selection for every seed)."""
        return list(self.seeds) if self.seeded(name) else [None]

    def selection_seed(self, name: str, seed: int) -> int | None:
        """The selection seed of compare seed ``seed``: itself for a seeded method, else None (one for all)."""
        return seed if self.seeded(name) else None

    def method(self, name: str, seed: int | None) -> Any:
        """The method ``name`` for selection seed ``seed`` (None: ``--seed``), built by `build` on first use."""
        built = self.__dict__.setdefault("_methods_built", {})
        if (name, seed) not in built:
            built[(name, seed)] = self.build(name, self.cfg.seed if seed is None else seed)
        return built[(name, seed)]

    def build(self, name: str, seed: int) -> Any:
        """A head selector from the registry with the run's shared settings (distance, clustering, kernel)."""
        return make_selector(name, seed, shared=selector_settings(self.cfg))

    def method_key(self, name: str, seed: int | None) -> dict:
        """What a result's cache key says of its method: the name and every setting of the built method."""
        return {"method": name, "selector": self.method(name, seed).settings()}

    @staticmethod
    def tag(seed: int | None) -> str:
        """The seed part of a result's name ("all": one selection for every seed)."""
        return "all" if seed is None else f"s{seed}"
