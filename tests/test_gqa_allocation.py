"""CAHP over KV groups with the "salience" and "greedy" (the default) allocations: per-layer counts of the
summed-salience ranking, CAHP's clusters or the greedy order within each layer; the "global" allocation unchanged;
the option from PruneConfig / the CLI to the selector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from benchmarks import bench_decoder

from cahp.cli import main
from cahp.pipelines.compare import run_compare
from cahp.pipelines.decoder import prepare_decoder, prunes_as_lm
from cahp.pipelines.prune import PruneConfig, run_prune
from cahp.pipelines.stages import selector_settings
from cahp.selectors.cahp import representatives
from cahp.selectors.gqa import GQAStats, GroupCAHPSelector, check_kv_mask, group_distances
from cahp.selectors.graph import cluster
from cahp.selectors.joint import greedy_order
from cahp.selectors.registry import make_selector
from cahp.train.finetune import FinetuneConfig

from .test_decoder_prune import write_decoder_folder
from .tiny import tiny_model

METHODS = ("spectral", "agglomerative", "kmedoids")


def synthetic_stats(points: np.ndarray, group_salience: np.ndarray, groups: list[list[tuple[int, int]]],
                    kv_of: list[int], shape: tuple[int, int]) -> GQAStats:
    """`GQAStats` whose groups sit at ``points`` (every query head of a group at its group's point, so the group
    distance is the Euclidean distance of the points) with ``group_salience`` split evenly over their heads.

    ``groups``: per group (in layer-major, KV order) its (layer, query head) ids.
    """
    head_ids = [h for members in groups for h in members]
    group_of = [g for g, members in enumerate(groups) for _ in members]  # (heads,) group of each flat head
    P = points[group_of]  # (heads, 2)
    D = np.sqrt(((P[:, None] - P[None]) ** 2).sum(-1))  # (heads, heads)
    salience = torch.zeros(shape, dtype=torch.float64)  # (L, H); 0 for heads the model no longer has
    for (layer, h), g in zip(head_ids, group_of):
        salience[layer, h] = group_salience[g] / len(groups[g])
    return GQAStats(head_ids=head_ids, shape=shape, distances={"js": torch.tensor(D)}, salience=salience,
                    fisher=salience.clone(), kv_of=kv_of)


def dense_groups(layers: int, kv: int, per_group: int) -> list[list[tuple[int, int]]]:
    """(layer, query head) ids of every group of a dense model, query head h reading KV head h // per_group."""
    return [[(layer, g * per_group + j) for j in range(per_group)] for layer in range(layers) for g in range(kv)]


@pytest.fixture(scope="module")
def layer0_case() -> GQAStats:
    """3 layers x 3 KV groups of 2 query heads. Layer 0's groups (0, 1, 2) and layer 1's group 3 are alike
    (within 0.01 of each other), group 3 the most salient of all; groups 6 and 7 (layer 2) are close to each
    other, group 8 far from every group. Summed-salience order: 3, 0, 1, 2, 6, 7, 8, 4, 5."""
    points = np.array([[0, 0], [0.01, 0], [0, 0.01], [0.01, 0.01], [6, 0], [0, 6], [4, 4], [4.6, 4], [12, 12]])
    salience = np.array([9.0, 8.9, 8.8, 10.0, 0.5, 0.4, 6.0, 5.5, 1.0])
    return synthetic_stats(points, salience, dense_groups(3, 3, 2), [0, 0, 1, 1, 2, 2], (3, 6))


@pytest.fixture(scope="module")
def uneven_case() -> GQAStats:
    """4 layers of an already pruned model (KV groups of 2 query heads at most): layer 0 keeps one group, layer 1
    two (one of them with one query head), layers 2 and 3 three; random points and salience (seed 3)."""
    groups = [[(0, 2), (0, 3)],
              [(1, 0), (1, 1)], [(1, 4)],
              *dense_groups(4, 3, 2)[6:]]
    rng = np.random.default_rng(3)
    return synthetic_stats(rng.normal(size=(len(groups), 2)), rng.uniform(0.1, 2.0, size=len(groups)), groups,
                           [0, 0, 1, 1, 2, 2], (4, 6))


def kept_groups(mask: torch.Tensor, stats: GQAStats) -> list[int]:
    """Indices into ``stats.groups`` of the groups ``mask`` keeps."""
    return [g for g, (layer, _, members) in enumerate(stats.groups)
            if bool(mask[stats.head_ids[members[0]]])]


def per_layer(groups: list[int], stats: GQAStats) -> dict[int, int]:
    """layer -> how many of ``groups`` lie in it (every layer the model has, 0 included)."""
    out = {layer: 0 for layer, _, _ in stats.groups}
    for g in groups:
        out[stats.groups[g][0]] += 1
    return out


def old_global(stats: GQAStats, k: int, clustering: str, kernel: str = "gaussian", seed: int = 0) -> list[int]:
    """The rule `GroupCAHPSelector` had before the allocation setting, written out: k clusters of all groups."""
    graph = {"kernel": kernel, "bandwidth": "median"} if clustering == "spectral" else {}
    labels = cluster(group_distances(stats, "js"), k, method=clustering, seed=seed, **graph)
    return sorted(representatives(labels, stats.group_sum(stats.salience)).tolist())


@pytest.mark.parametrize("clustering", METHODS)
def test_salience_allocation_keeps_layer_0_where_global_empties_it(layer0_case, clustering):
    stats = layer0_case
    gradient = make_selector("gqa-gradient")
    salience = GroupCAHPSelector(clustering=clustering, kv_allocation="salience")
    # k = 4: the global rule keeps group 3 for the alike cluster {0, 1, 2, 3} and no group of layer 0
    glob = GroupCAHPSelector(clustering=clustering, kv_allocation="global")
    assert per_layer(glob.select_groups(4, stats, None), stats)[0] == 0
    assert sorted(salience.select_groups(4, stats, None)) == [0, 1, 2, 3]  # layer 2 gets 0 groups: none
    # k = 6: counts 3 / 1 / 2. Layer 0 whole, layer 1 its most salient group, layer 2 one group of each of its two
    # clusters {6, 7} and {8}: 6 (the more salient of the pair) and 8, where the ranking keeps 6 and 7
    mask = salience.select(6, stats)
    check_kv_mask(mask, 6, stats)
    assert kept_groups(mask, stats) == [0, 1, 2, 3, 6, 8]
    assert kept_groups(gradient.select(6, stats), stats) == [0, 1, 2, 3, 6, 7]
    assert per_layer([0, 1, 2, 3, 6, 8], stats) == per_layer([0, 1, 2, 3, 6, 7], stats) == {0: 3, 1: 1, 2: 2}
    if clustering != "spectral":  # the deterministic methods: global also empties layer 0 at k = 6 (recorded)
        assert sorted(glob.select_groups(6, stats, None)) == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("kernel", ["gaussian", "knn"])
@pytest.mark.parametrize("clustering", METHODS)
def test_salience_allocation_on_every_budget_of_uneven_layers(uneven_case, clustering, kernel):
    stats = uneven_case
    assert [len(m) for _, _, m in stats.groups] == [2, 2, 1, 2, 2, 2, 2, 2, 2]
    sums = stats.group_sum(stats.salience)
    D = group_distances(stats, "js")
    selector = GroupCAHPSelector(clustering=clustering, kernel=kernel, seed=2, kv_allocation="salience")
    for k in range(1, stats.n_kv + 1):
        mask = selector.select(k, stats)
        check_kv_mask(mask, k, stats)
        assert torch.equal(mask, GroupCAHPSelector(clustering=clustering, kernel=kernel, seed=2,
                                                   kv_allocation="salience").select(k, stats))  # deterministic
        kept = kept_groups(mask, stats)
        counts = per_layer(kept, stats)
        assert counts == per_layer(kept_groups(make_selector("gqa-gradient").select(k, stats), stats), stats)
        for layer, n_keep in counts.items():
            idx = np.array([g for g, (lay, _, _) in enumerate(stats.groups) if lay == layer])
            mine = [g for g in kept if stats.groups[g][0] == layer]
            if n_keep in (0, len(idx)):
                assert mine == ([] if n_keep == 0 else idx.tolist())
                continue
            if n_keep == 1:  # the layer's most salient group
                assert mine == [int(idx[np.argmax(sums[idx])])]
            # one group per within-layer cluster, the most salient of it
            graph = {"kernel": kernel, "bandwidth": "median"} if clustering == "spectral" else {}
            labels = cluster(D[np.ix_(idx, idx)], n_keep, method=clustering, seed=2, **graph)
            pos = [int(np.flatnonzero(idx == g)[0]) for g in mine]
            assert sorted(labels[pos].tolist()) == list(range(n_keep))
            for p in pos:
                assert sums[idx[p]] == max(sums[idx[labels == labels[p]]])


def test_greedy_allocation_keeps_a_salient_group_where_the_clusters_keep_a_lone_weak_one():
    # one layer of 3 groups: A (salience 5) and B (4) near each other, C (0.1) far from both. Keeping 2, the
    # clusters are {A, B} and {C}: A and C stay; the greedy order takes A, then B (its nearness to A discounts
    # it to 4 * 1 / 13.5, still above C's 0.1 * 1)
    stats = synthetic_stats(np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0]]), np.array([5.0, 4.0, 0.1]),
                            dense_groups(1, 3, 2), [0, 0, 1, 1, 2, 2], (1, 6))
    for clustering in METHODS:
        assert sorted(GroupCAHPSelector(clustering=clustering, kv_allocation="salience")
                      .select_groups(2, stats, None)) == [0, 2]
    greedy = GroupCAHPSelector(kv_allocation="greedy")
    assert sorted(greedy.select_groups(2, stats, None)) == [0, 1]
    assert greedy.select_groups(1, stats, None) == [0]
    # a duplicate of the kept group goes last: B moved onto A
    dup = synthetic_stats(np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]), np.array([5.0, 4.0, 0.1]),
                          dense_groups(1, 3, 2), [0, 0, 1, 1, 2, 2], (1, 6))
    assert sorted(greedy.select_groups(2, dup, None)) == [0, 2]


def test_greedy_allocation_on_every_budget_of_uneven_layers(uneven_case, layer0_case):
    selector = GroupCAHPSelector(kv_allocation="greedy")
    for stats in (uneven_case, layer0_case):
        sums = stats.group_sum(stats.salience)
        D = group_distances(stats, "js")
        for k in range(1, stats.n_kv + 1):
            mask = selector.select(k, stats)
            check_kv_mask(mask, k, stats)
            kept = kept_groups(mask, stats)
            counts = per_layer(kept, stats)
            assert counts == per_layer(kept_groups(make_selector("gqa-gradient").select(k, stats), stats), stats)
            for layer, n_keep in counts.items():  # each layer keeps the first n_keep of its greedy order
                idx = np.array([g for g, (lay, _, _) in enumerate(stats.groups) if lay == layer])
                want = idx[greedy_order(D[np.ix_(idx, idx)], sums[idx])[:n_keep]]
                assert [g for g in kept if stats.groups[g][0] == layer] == sorted(want.tolist())
    assert selector.tag == "gqa-cahp-greedy" and selector.settings()["allocation"] == "greedy"
    assert make_selector("gqa-cahp", shared=selector_settings(PruneConfig(kv_allocation="greedy"))) \
        .kv_allocation == "greedy"


@pytest.mark.parametrize("clustering", METHODS)
def test_global_allocation_is_the_old_rule(uneven_case, layer0_case, clustering):
    for stats in (uneven_case, layer0_case):
        for k in range(1, stats.n_kv + 1):
            want = stats.mask_of_groups(old_global(stats, k, clustering))
            for selector in (GroupCAHPSelector(clustering=clustering, kv_allocation="global"),
                             make_selector("gqa-cahp", 0, shared=selector_settings(PruneConfig(
                                 clustering=clustering, kv_allocation="global")))):
                assert torch.equal(selector.select(k, stats), want)


def test_settings_tag_and_a_bad_allocation():
    old = {"distance": "js", "clustering": "spectral", "seed": 0, "kernel": "gaussian", "bandwidth": "median",
           "unit": "kv_group"}
    glob = GroupCAHPSelector(kv_allocation="global")
    assert glob.settings() == old and glob.tag == "gqa-cahp"  # the keys of caches made before the setting
    salience = GroupCAHPSelector(kv_allocation="salience")
    assert salience.settings() == {**old, "allocation": "salience"} and salience.tag == "gqa-cahp-salience"
    assert GroupCAHPSelector().settings() == {**old, "allocation": "greedy"}  # the default
    assert GroupCAHPSelector().tag == "gqa-cahp-greedy"
    with pytest.raises(ValueError, match="kv_allocation must be one of global, salience, greedy, got 'layer'"):
        GroupCAHPSelector(kv_allocation="layer")
    with pytest.raises(ValueError, match="must be one of global, salience, greedy"):
        make_selector("gqa-cahp", shared=selector_settings(PruneConfig(kv_allocation="per-layer")))


def test_the_prune_option_reaches_the_kv_cahp_selector_only():
    shared = selector_settings(PruneConfig(kv_allocation="salience", clustering="kmedoids"))
    selector = make_selector("gqa-cahp", 3, shared=shared)
    assert (selector.kv_allocation, selector.clustering, selector.seed) == ("salience", "kmedoids", 3)
    assert PruneConfig().kv_allocation == "auto"  # auto: greedy on a decoder pruned by KV groups
    assert make_selector("gqa-cahp", shared=selector_settings(PruneConfig())).kv_allocation == "greedy"
    assert make_selector("gqa-cahp").kv_allocation == "greedy"
    assert make_selector("gqa-cahp", shared=selector_settings(PruneConfig(kv_allocation="global"))).kv_allocation \
        == "global"
    for name in ("cahp", "gradient", "gqa-gradient", "gqa-random"):  # no such field: the setting is ignored
        assert "allocation" not in make_selector(name, shared=shared).settings()
    args = bench_decoder.build_parser().parse_args(["smollm2_sst5", "--kv-allocation", "salience"])
    assert bench_decoder.settings("smollm2_sst5", args)[0].kv_allocation == "salience"
    assert bench_decoder.settings("smollm2_sst5", bench_decoder.build_parser().parse_args(
        ["smollm2_sst5"]))[0].kv_allocation == "auto"


@pytest.mark.parametrize("command", ["prune", "compare"])
def test_the_command_shows_the_option(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kv-allocation {auto,global,salience,greedy}" in text and "summed-salience ranking" in text


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """(root with model/ (a tiny Llama, 3 layers x 3 KV heads, groups of 2 query heads) and task/ (jsonl))."""
    return write_decoder_folder(tmp_path_factory.mktemp("allocation"), (80, 30, 10), seed=20)


def _cfgs(root, out, **kw):
    cfg = PruneConfig(model=str(root / "model"), task=str(root / "task"), output_dir=str(out),
                      calibration_examples=40, curve_examples=24, stats_batch_size=8, grid_step=1, **kw)
    return cfg, FinetuneConfig(epochs=1, lr=1e-3, batch_size=8, max_length=16, seed=0)


def test_non_default_allocation_is_refused_where_it_does_not_apply(tiny_lm, tmp_path):
    encoder = tmp_path / "encoder"
    tiny_model("bert").save_pretrained(encoder)
    cfg, ft = _cfgs(tiny_lm, tmp_path / "bad", kv_allocation="salience")
    cfg.model = str(encoder)
    for run in (run_prune, run_compare):
        with pytest.raises(ValueError, match="--kv-allocation salience applies to decoders pruned by KV groups"):
            run(cfg, ft, progress=False)
    for allocation in ("auto", "global"):  # the default, and the encoders' own rule, go with encoders
        cfg.kv_allocation = allocation
        assert prunes_as_lm(cfg) is False
    cfg, ft = _cfgs(tiny_lm, tmp_path / "bad", kv_allocation="salience", decoder_head="classifier")
    with pytest.raises(ValueError, match="--kv-allocation cannot go with --decoder-head classifier"):
        run_prune(cfg, ft, progress=False)
    cfg, ft = _cfgs(tiny_lm, tmp_path / "bad", kv_allocation="layer")
    with pytest.raises(ValueError, match="--kv-allocation must be one of auto, global, salience, greedy, got 'layer'"):
        run_prune(cfg, ft, progress=False)
    assert not (tmp_path / "bad").exists()  # refused before any work


@pytest.mark.parametrize(("allocation", "rule"), [("salience", "salience"), ("auto", "greedy"), ("greedy", "greedy")])
def test_decoder_prune_with_a_per_layer_allocation_records_it(tiny_lm, tmp_path, one_thread, allocation, rule):
    out = tmp_path / "run"
    cfg, ft = _cfgs(tiny_lm, out, kv_allocation=allocation, keep=4, skip_final_finetune=True)
    r = run_prune(cfg, ft, progress=False).report
    assert r["selector"] == {"name": "gqa-cahp", **GroupCAHPSelector(kv_allocation=rule).settings()}
    assert r["settings"]["prune"]["kv_allocation"] == allocation  # as given; the selector says what it ran
    assert (out / "stages" / f"curve-gqa-cahp-{rule}.json").is_file()
    # the saved model keeps what the selector keeps on the run's own statistics (read from its cache)
    stats = prepare_decoder(cfg, ft, out, progress=False).stats
    mask = GroupCAHPSelector(kv_allocation=rule).select(4, stats)
    groups = kept_groups(mask, stats)
    kept = {layer: [kv for g, (lay, kv, _) in enumerate(stats.groups) if lay == layer and g in groups]
            for layer in range(3)}
    assert {int(a): b for a, b in r["kept_kv_heads"].items()} == kept and r["kv_heads_kept"] == 4
    gradient = kept_groups(make_selector("gqa-gradient").select(4, stats), stats)
    assert r["kv_heads_per_layer"] == list(per_layer(gradient, stats).values())
