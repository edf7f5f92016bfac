"""Within-layer rules of joint CAHP, side by side: how much of each layer's salience the kept units hold (issue 19).

    python benchmarks/bench_within_layer.py minilm_sst5 --counts-from frontier_minilm_sst5_3seeds_greedy
    python benchmarks/bench_within_layer.py minilm_mnli_small \
        --counts-from frontier_minilm_mnli_small_3seeds_3x_field_greedy

The per-layer counts (heads and neurons kept in each layer) come from a
committed frontier result: every (target, method) allocation in it. For each
count, in each layer that keeps some but not all of its units, three rules
choose which units stay, over the same statistics of the dense model (the
frontier's run folder, so its cached neuron statistics and signatures are read
when present):

- ``clusters``: average-linkage tree of the layer's distances cut into ``k``
  clusters, each cluster's most salient member (`select_units`, the old rule);
- ``greedy``: the first ``k`` of `greedy_order` (salience discounted by
  nearness to the units picked before; the default rule);
- ``top``: the ``k`` most salient units (no redundancy term; the gradient rule).

Per rule it reports the share of the kind's total salience the kept units hold
(summed over layers, and per layer), its overlap with ``top`` (shared units /
kept units) and the median salience rank of the kept units within their layer
(1 = most salient). No fine-tuning and no timing: statistics only.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import REPO, load_result, meta_lines, metadata, write_result  # noqa: E402
from cahp.pipelines.joint import neuron_stats  # noqa: E402
from cahp.pipelines.stages import PruneConfig, prepare_run  # noqa: E402
from cahp.selectors.joint import greedy_order, head_blocks, layer_linkage, select_units  # noqa: E402
from cahp.train.finetune import FinetuneConfig  # noqa: E402

log = logging.getLogger("bench_within_layer")

# configuration name -> (model, task), as bench_frontier's (same run folder, same caches)
CONFIGS = {
    "minilm_sst5": ("minilm-l6", "sst5"),
    "minilm_mnli_small": ("minilm-l6", "mnli-small"),
}
RULES = ("clusters", "greedy", "top")


def layer_units(run, stats) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """{kind: per layer (distances (n, n), salience (n,))} of the dense model's heads and neurons."""
    D = run.signatures.distances[run.cfg.distance].double().numpy()
    blocks = head_blocks(D, run.signatures.head_ids, stats.head_salience.double().numpy(), len(stats.neuron_ids))
    neurons = [(stats.distance(layer).double().numpy(), stats.salience[layer, list(ids)].double().numpy())
               for layer, ids in enumerate(stats.neuron_ids)]
    return {"heads": [(Dl, sal) for _, Dl, sal in blocks], "neurons": neurons}


def layer_trees(units: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (`layer_linkage`, `greedy_order`): what the rules reuse for every count of that layer."""
    return [(layer_linkage(D), greedy_order(D, s)) for D, s in units]


def kept_by_rule(D: np.ndarray, s: np.ndarray, k: int, Z: np.ndarray, order: np.ndarray) -> dict[str, np.ndarray]:
    """{rule: kept positions} of one layer keeping ``k`` of its units."""
    return {"clusters": select_units(D, s, k, Z=Z), "greedy": np.sort(order[:k]),
            "top": np.sort(np.argsort(-s, kind="stable")[:k])}


def compare_rules(units: list[tuple[np.ndarray, np.ndarray]], counts: list[int],
                  trees: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """The three rules at one kind's per-layer ``counts``: totals over layers and each partly kept layer.
    ``trees``: the units' `layer_trees`, computed once for many counts (default: computed here)."""
    trees = trees if trees is not None else layer_trees(units)
    total = sum(float(s.sum()) for _, s in units)
    kept = {r: 0.0 for r in RULES}
    layers = []
    for layer, ((D, s), k, (Z, order)) in enumerate(zip(units, counts, trees)):
        n = len(s)
        if k == 0 or k == n:  # every rule keeps the same units
            for r in RULES:
                kept[r] += float(s.sum()) if k else 0.0
            continue
        rank = np.empty(n, dtype=np.int64)
        rank[np.argsort(-s, kind="stable")] = np.arange(1, n + 1)
        sets = kept_by_rule(D, s, k, Z, order)
        top = set(sets["top"].tolist())
        row = {"layer": layer, "units": n, "kept": int(k), "rules": {}}
        for r, pos in sets.items():
            kept[r] += float(s[pos].sum())
            row["rules"][r] = {"salience_share": float(s[pos].sum() / s.sum()) if s.sum() > 0 else 0.0,
                               "overlap_with_top": len(top & set(pos.tolist())) / k,
                               "median_rank": float(np.median(rank[pos]))}
        layers.append(row)
    return {"kept": int(sum(counts)), "salience_share": {r: kept[r] / total if total > 0 else 0.0 for r in RULES},
            "layers": layers}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configuration", choices=list(CONFIGS))
    p.add_argument("--counts-from", required=True, metavar="STEM",
                   help="a frontier result (benchmarks/results/STEM.json) whose allocations give the counts")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods' allocations (default: all)")
    p.add_argument("--data-dir", default="", help="data folder (default: $CAHP_DATA_DIR or ../shared/data)")
    p.add_argument("--result-name", default="", help="results file stem (default: within_layer_CONFIGURATION)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    source = load_result(args.counts_from)
    if source is None or "results" not in source:
        p.error(f"benchmarks/results/{args.counts_from}.json is missing or holds no frontier results")
    model, task = CONFIGS[args.configuration]
    if (source["model"], source["task"]) != (model, task):
        p.error(f"{args.counts_from} is {source['model']} / {source['task']}, not {model} / {task}")
    meta = metadata()
    out = REPO / "runs" / "bench" / f"prune-{model}-{task}"
    cfg = PruneConfig(model=model, task=task, output_dir=str(out), data_dir=args.data_dir, ffn=True, seed=0)
    run = prepare_run(cfg, FinetuneConfig(seed=0), out, progress=not args.quiet)
    stats, _ = neuron_stats(run, progress=not args.quiet)
    units = layer_units(run, stats)
    trees = {kind: layer_trees(u) for kind, u in units.items()}  # independent of the counts: once per kind
    rows = []
    for label, by_method in source["results"].items():
        for method, res in by_method.items():
            if args.methods and method not in args.methods:
                continue
            row = {"target": label, "method": method}
            for kind in ("heads", "neurons"):
                row[kind] = compare_rules(units[kind], res[f"{kind}_per_layer"], trees[kind])
            rows.append(row)
            log.info("%s %s: neurons %s", label, method,
                     {r: round(v, 3) for r, v in row["neurons"]["salience_share"].items()})
    result = {"model": model, "task": task, "counts_from": args.counts_from,
              "calibration_examples": cfg.calibration_examples, "distance": cfg.distance, "rows": rows}
    path = write_result(args.result_name or f"within_layer_{args.configuration}", result, meta)
    log.info("wrote %s", path)


def _median_over_layers(layers: list[dict], rule: str, key: str) -> str:
    vals = [x["rules"][rule][key] for x in layers]
    return f"{np.median(vals):.2f}" if vals else "-"


def render(result: dict) -> str:
    out = [meta_lines(result["meta"]),
           f"{result['model']} / {result['task']}: the dense model's statistics on {result['calibration_examples']} "
           f"calibration examples (head distances: {result['distance']}); per-layer counts of every allocation "
           f"in `{result['counts_from']}.json`. Each rule keeps that many units in each layer; the share is of the "
           "kind's total salience (summed over all layers, fully kept and emptied layers included), the overlap "
           "is with the most salient units of each partly kept layer, the rank is the kept units' median salience "
           "rank in their layer (1 = most salient; median over partly kept layers).\n",
           "| target | counts of | kind | kept | salience share: clusters | greedy | top | overlap with top: "
           "clusters | greedy | median rank: clusters | greedy | top |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for kind in ("heads", "neurons"):
            r = row[kind]
            share = r["salience_share"]
            cells = [_median_over_layers(r["layers"], rule, key) for rule, key in (
                ("clusters", "overlap_with_top"), ("greedy", "overlap_with_top"), ("clusters", "median_rank"),
                ("greedy", "median_rank"), ("top", "median_rank"))]
            out.append(f"| {row['target']} | {row['method']} | {kind} | {r['kept']} | {share['clusters']:.3f} | "
                       f"{share['greedy']:.3f} | {share['top']:.3f} | " + " | ".join(cells) + " |")
    for kind in ("heads", "neurons"):
        ratios = {rule: [row[kind]["salience_share"][rule] / row[kind]["salience_share"]["top"]
                         for row in result["rows"]
                         if row[kind]["salience_share"]["top"] > 0 and row[kind]["layers"]]  # a choice was made
                  for rule in ("clusters", "greedy")}
        if ratios["greedy"]:
            out.append(f"\n{kind.capitalize()}: the kept units hold {min(ratios['greedy']):.2f}-"
                       f"{max(ratios['greedy']):.2f} of the most salient units' salience under the greedy rule, "
                       f"{min(ratios['clusters']):.2f}-{max(ratios['clusters']):.2f} under cluster representatives "
                       f"(range over the {len(ratios['greedy'])} allocations with a partly kept layer).")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
