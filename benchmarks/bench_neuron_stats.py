"""Cost of the neuron statistics + joint selection against plain forward passes, and their memory (issue 19).

    python benchmarks/bench_neuron_stats.py            # minilm-l6, 1,024 SST-5 training sentences
    python benchmarks/bench_neuron_stats.py --quick    # smoke run (writes to the temporary folder, not results/)

Time: over the same length-bucketed batches (batch 32, as `cahp prune --ffn`'s
calibration pass), interleaved, median of --reps: (a) the plain forward passes
(no gradients, no hooks); (b) `collect_neuron_stats` (forward and backward
with head and neuron gates, per-layer activation correlations); (c) the joint
selection for one target share (`JointSelector`: every layer's merge trees of
heads and neurons, then `allocate` and the cut). Goal: (b + c) / a <= 3.

Memory: the highest resident memory sampled during `collect_neuron_stats` in a
fresh process per calibration size (1,024 and 4,096 examples), as
`bench_signatures` measures the signatures. Goal: within 10%.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS_DIR, meta_lines, metadata  # noqa: E402
from benchmarks.bench_signatures import _batches, measure_memory, sampled_peak  # noqa: E402
from cahp.budget.cost import mac_table  # noqa: E402
from cahp.budget.joint_curve import fair_values  # noqa: E402
from cahp.core.io import write_json  # noqa: E402
from cahp.selectors.joint import JointSelector, allocate  # noqa: E402
from cahp.stats.neurons import collect_neuron_stats  # noqa: E402
from cahp.stats.signatures import collect_signatures  # noqa: E402
from cahp.train.evaluate import model_inputs  # noqa: E402

log = logging.getLogger("bench_neuron_stats")
NAME = "neuron_stats_cost"
SHARE = 0.5  # the target share of the timed selection (2x estimated)


def select_once(model, stats, head_D, head_ids) -> dict:
    """The joint selection for `SHARE` (merge trees, allocation, cut); its seconds by part."""
    t0 = time.perf_counter()
    selector = JointSelector(head_D, head_ids, stats.head_salience.numpy(), stats)
    t1 = time.perf_counter()
    table = mac_table(model, 32, 128)
    hv, nv = fair_values(table, stats.head_salience.numpy(), stats.salience.numpy())
    alloc = allocate(table, hv, nv, SHARE)
    selector.select(alloc)
    t2 = time.perf_counter()
    return {"trees": t1 - t0, "allocate_and_cut": t2 - t1, "total": t2 - t0}


def memory_child(n: int) -> None:
    """Runs in a subprocess: RSS before, and the highest RSS sampled during, collect_neuron_stats (`sampled_peak`)."""
    model, batches = _batches(n)
    before, top, stats = sampled_peak(lambda: collect_neuron_stats(model, batches, progress=False))
    print(json.dumps({"n": n, "tokens": stats.tokens, "rss_before_mb": before, "peak_rss_mb": top,
                      "pass_growth_mb": top - before}))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--memory-child", type=int, metavar="N", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    meta = metadata()
    if args.quick:
        args.n, args.reps, args.memory_sizes = 64, 1, [64, 128]
    path = Path(tempfile.gettempdir()) / f"cahp-{NAME}-quick.json" if args.quick else RESULTS_DIR / f"{NAME}.json"
    model, batches = _batches(args.n)
    model.eval()
    sig = collect_signatures(model, batches, kinds=("js",), progress=False)  # the head distances (not timed)
    head_D = sig.distances["js"].numpy()
    times: dict[str, list[float]] = {"forward": [], "neuron_stats": [], "selection": []}
    parts = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(**model_inputs(b))
        times["forward"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats = collect_neuron_stats(model, batches, progress=False)
        times["neuron_stats"].append(time.perf_counter() - t0)
        parts.append(select_once(model, stats, head_D, sig.head_ids))
        times["selection"].append(parts[-1]["total"])
        log.info("rep %d: %s", rep, {k: round(v[-1], 2) for k, v in times.items()})
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "model": "minilm-l6", "task": "sst5 (train sample)", "examples": args.n, "tokens": stats.tokens,
        "batch_size": 32, "reps": args.reps, "share": SHARE, "seconds": times, "median_seconds": med,
        "selection_parts": parts,
        "ratio_to_forward": {"neuron_stats": med["neuron_stats"] / med["forward"],
                             "selection": med["selection"] / med["forward"],
                             "total": (med["neuron_stats"] + med["selection"]) / med["forward"]},
        **measure_memory(args.memory_sizes, __file__, ()),
    }
    write_json(path, {"meta": meta, **result})
    log.info("wrote %s; ratios %s, memory growth %.3f", path, result["ratio_to_forward"], result["memory_growth"])


def render(result: dict) -> str:
    med, r = result["median_seconds"], result["ratio_to_forward"]
    out = [meta_lines(result["meta"]),
           f"{result['examples']} SST-5 training sentences ({result['tokens']} real tokens), batch "
           f"{result['batch_size']}, median of {result['reps']} interleaved repetitions; the selection is for an "
           f"estimated share of {result['share']}.\n",
           "| pass | seconds (median) | ratio to plain forward |", "|---|---|---|",
           f"| plain forward | {med['forward']:.2f} | 1.00 |",
           f"| neuron statistics (forward + backward, gates, correlations) | {med['neuron_stats']:.2f} "
           f"| {r['neuron_stats']:.2f} |",
           f"| joint selection (merge trees, allocation, cut) | {med['selection']:.2f} | {r['selection']:.2f} |",
           f"| statistics + selection | {med['neuron_stats'] + med['selection']:.2f} | {r['total']:.2f} |",
           "", "| calibration examples | real tokens | RSS before the pass (MB) | peak RSS during the pass (MB) "
           "| growth during the pass (MB) |", "|---|---|---|---|---|"]
    for m in result["memory"]:
        out.append(f"| {m['n']} | {m['tokens']} | {m['rss_before_mb']:.0f} | {m['peak_rss_mb']:.0f} "
                   f"| {m['pass_growth_mb']:.0f} |")
    goal_t = "met" if r["total"] <= 3 else "not met"
    goal_m = "met" if abs(result["memory_growth"]) <= 0.10 else "not met"
    out.append(f"\nStatistics + selection take {r['total']:.2f}x the plain forward passes (goal at most 3x: "
               f"{goal_t}, one run). Peak memory grows by {result['memory_growth'] * 100:.1f}% from "
               f"{result['memory'][0]['n']} to {result['memory'][-1]['n']} examples (goal within 10%: {goal_m}).\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
