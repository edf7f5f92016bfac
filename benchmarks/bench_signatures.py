"""Cost of signatures + pairwise distances against plain forward passes, and their memory (issue 4).

    python benchmarks/bench_signatures.py            # minilm-l6, 1,024 SST-5 training sentences
    python benchmarks/bench_signatures.py --quick    # smoke run (writes to the temporary folder, not results/)

Time: over the same length-bucketed batches (batch 32), interleaved, median of
--reps: (a) the plain forward passes (no hooks); (b) `collect_signatures` with
one distance (capture + per-head attention + divergences + entropy). Ratio b/a
per distance.

Memory: peak resident memory of a fresh process that loads the model and runs
`collect_signatures` over N calibration examples, for N = 1,024 and 4,096 (each
in its own subprocess, so the peaks do not mix).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cahp  # noqa: E402
from benchmarks._common import RESULTS_DIR, meta_lines, metadata  # noqa: E402
from cahp.core.io import write_json  # noqa: E402
from cahp.data.batching import encode, make_batches  # noqa: E402
from cahp.data.tasks import get_task  # noqa: E402
from cahp.stats.distances import DISTANCES  # noqa: E402
from cahp.stats.signatures import collect_signatures  # noqa: E402
from cahp.train.evaluate import model_inputs  # noqa: E402

log = logging.getLogger("bench_signatures")
NAME = "signature_cost"


def _batches(n: int, data_dir=None):
    task = get_task("sst5", data_dir=data_dir)
    model, tok = cahp.load_model("minilm-l6", num_labels=task.num_labels)
    rng = np.random.default_rng(0)
    train = task.load("train")
    examples = [train[i] for i in rng.permutation(len(train))[:n]]
    ds = encode(tok, examples, 128)
    return model, make_batches(ds, 32, shuffle=False, pad_token_id=tok.pad_token_id)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def sampled_peak(fn):
    """(RSS before, highest RSS sampled every 5 ms while ``fn()`` runs, its result), in MB.

    The process-wide peak (ru_maxrss) is dominated by loading the model, so the
    pass itself is sampled: its growth above the loaded model is what scales
    (or not) with the calibration size.
    """
    import threading

    before = _rss_mb()
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    return before, max(peak[0], _rss_mb()), out


def memory_child(n: int, kind: str) -> None:
    """Runs in a subprocess: RSS before, and the highest RSS sampled during, collect_signatures (`sampled_peak`)."""
    model, batches = _batches(n)
    before, top, sig = sampled_peak(lambda: collect_signatures(model, batches, kinds=(kind,), progress=False))
    print(json.dumps({"n": n, "rows": sig.rows, "rss_before_mb": before, "peak_rss_mb": top,
                      "pass_growth_mb": top - before,
                      "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--memory-child", nargs=2, metavar=("N", "KIND"), help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help="re-measure memory only, keep the timing results")
    args = p.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    meta = metadata()
    if args.quick:
        args.n, args.reps, args.memory_sizes = 64, 1, [64, 128]
    # a smoke run never touches results/
    path = Path(tempfile.gettempdir()) / f"cahp-{NAME}-quick.json" if args.quick else RESULTS_DIR / f"{NAME}.json"
    if args.memory_only:
        if not path.is_file():
            p.error(f"--memory-only keeps the timing results of {path}, which does not exist: run without it first")
        result = json.loads(path.read_text())
        timing_meta = result.pop("meta")
        result.update(measure_memory(args.memory_sizes), memory_meta=meta)
        write_json(path, {"meta": timing_meta, **result})
        log.info("memory growth %.3f", result["memory_growth"])
        return
    model, batches = _batches(args.n)
    times: dict[str, list[float]] = {"forward": [], **{k: [] for k in DISTANCES}}
    rows = None
    for rep in range(args.reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(**model_inputs(b))
        times["forward"].append(time.perf_counter() - t0)
        for kind in DISTANCES:
            t0 = time.perf_counter()
            sig = collect_signatures(model, batches, kinds=(kind,), progress=False)
            times[kind].append(time.perf_counter() - t0)
            rows = sig.rows
        log.info("rep %d: %s", rep, {k: round(v[-1], 2) for k, v in times.items()})
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "model": "minilm-l6", "task": "sst5 (train sample)", "examples": args.n, "rows": rows, "batch_size": 32,
        "reps": args.reps, "seconds": times, "median_seconds": med,
        "ratio_to_forward": {k: med[k] / med["forward"] for k in DISTANCES},
        **measure_memory(args.memory_sizes),
    }
    write_json(path, {"meta": meta, **result})
    log.info("wrote %s", path)
    log.info("ratios %s, memory growth %.3f", result["ratio_to_forward"], result["memory_growth"])


def measure_memory(sizes, script: str = __file__, extra: tuple[str, ...] = ("js",)) -> dict:
    """``{"memory": one child's figures per size, "memory_growth": last peak / first peak - 1}``.

    Each size runs ``script --memory-child N *extra`` in a fresh process, which prints its figures as a JSON line.
    """
    memory = []
    for n in sizes:
        out = subprocess.run([sys.executable, script, "--memory-child", str(n), *extra], check=True,
                             capture_output=True, text=True).stdout
        memory.append(json.loads(out.strip().splitlines()[-1]))
        log.info("memory: %s", memory[-1])
    return {"memory": memory, "memory_growth": memory[-1]["peak_rss_mb"] / memory[0]["peak_rss_mb"] - 1}


def render(result: dict) -> str:
    med = result["median_seconds"]
    out = [meta_lines(result["meta"]),
           f"{result['examples']} SST-5 training sentences ({result['rows']} real query tokens), batch "
           f"{result['batch_size']}, median of {result['reps']} interleaved repetitions.\n",
           "| pass | seconds (median) | ratio to plain forward |", "|---|---|---|",
           f"| plain forward | {med['forward']:.2f} | 1.00 |"]
    for k, r in result["ratio_to_forward"].items():
        out.append(f"| signatures + {k} distances | {med[k]:.2f} | {r:.2f} |")
    out += ["", "| calibration examples | real query rows | RSS before the pass (MB) | peak RSS during the pass (MB) "
            "| growth during the pass (MB) |", "|---|---|---|---|---|"]
    for m in result["memory"]:
        out.append(f"| {m['n']} | {m['rows']} | {m['rss_before_mb']:.0f} | {m['peak_rss_mb']:.0f} "
                   f"| {m.get('pass_growth_mb', float('nan')):.0f} |")
    if result.get("memory_meta"):
        out.append("\nMemory re-measured (sampled during the pass) by:\n" + meta_lines(result["memory_meta"]))
    out.append(f"\nPeak memory grows by {result['memory_growth'] * 100:.1f}% from "
               f"{result['memory'][0]['n']} to {result['memory'][-1]['n']} examples (JS distances).\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
