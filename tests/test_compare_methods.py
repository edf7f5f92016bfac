"""`MethodsBySeed`: the per-(method, selection seed) methods every compare builds."""

from types import SimpleNamespace

from cahp.pipelines.compare_methods import MethodsBySeed
from cahp.selectors.registry import SELECTORS


class _Seeded:
    seeded = True


class _Fixed:
    seeded = False


class _Compare(MethodsBySeed):
    registry = {"random": (_Seeded,), "cahp": (_Fixed,)}

    def __init__(self):
        self.cfg, self.seeds, self.calls = SimpleNamespace(seed=7), [7, 8, 9], []

    def build(self, name, seed):
        self.calls.append((name, seed))
        return SimpleNamespace(name=name, seed=seed, settings=lambda: {"seed": seed})


def test_a_seeded_method_is_built_per_compare_seed_and_a_fixed_one_once_with_the_run_seed():
    c = _Compare()
    assert c.sel_seeds("random") == [7, 8, 9] and c.sel_seeds("cahp") == [None]
    assert (c.selection_seed("random", 8), c.selection_seed("cahp", 8)) == (8, None)
    assert [c.method("random", s).seed for s in c.sel_seeds("random")] == [7, 8, 9]
    assert c.method("cahp", None).seed == 7  # --seed, as `cahp prune` builds CAHP
    assert c.method("cahp", None) is c.method("cahp", None)  # built once and kept
    assert c.calls == [("random", 7), ("random", 8), ("random", 9), ("cahp", 7)]
    assert c.method_key("random", 8) == {"method": "random", "selector": {"seed": 8}}
    assert (c.tag(None), c.tag(8)) == ("all", "s8")


def test_the_default_build_is_the_registry_with_the_run_shared_settings():
    from cahp.pipelines.stages import PruneConfig

    class Heads(MethodsBySeed):
        registry = SELECTORS

        def __init__(self):
            self.cfg, self.seeds = PruneConfig(model="minilm-l6", task="sst5", seed=3), [3]

    h = Heads()
    sel = h.method("cahp", None)
    assert type(sel) is SELECTORS["cahp"][0] and h.method_key("cahp", None)["selector"] == sel.settings()
    assert not h.seeded("cahp") and h.seeded("random")
