"""One process against `torchrun --nproc_per_node 2` on the same `cahp prune` (issue 5).

    python benchmarks/bench_distributed.py --model runs/bench/finetuned-minilm-l6-sst5

Both runs start from the same fine-tuned minilm-l6 / SST-5 folder (--finetuned,
--skip-final-finetune: the stages that pass over data for statistics, the
curve and evaluation). One process gets 2 threads, each of the 2 ranks 1
thread, so both use the 2 cores. Records both wall times and whether k*, the
kept heads, the curve and the scores are identical, and the largest difference
of the cached statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import REPO, meta_lines, metadata, write_result  # noqa: E402

log = logging.getLogger("bench_distributed")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "runs" / "bench" / "finetuned-minilm-l6-sst5"))
    p.add_argument("--task", default="sst5")
    p.add_argument("--calibration-examples", type=int, default=512)
    p.add_argument("--curve-examples", type=int, default=500)
    p.add_argument("--port", type=int, default=29533)
    args = p.parse_args()
    meta = metadata()
    common = ["--model", args.model, "--task", args.task, "--finetuned", "--skip-final-finetune",
              "--calibration-examples", str(args.calibration_examples), "--curve-examples", str(args.curve_examples),
              "--overwrite"]
    runs = {
        "1 process x 2 threads": ([sys.executable, "-m", "cahp", "prune"], {"OMP_NUM_THREADS": "2"}, "dist-1p"),
        "torchrun 2 processes x 1 thread": (
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(args.port),
             "-m", "cahp", "prune"], {"OMP_NUM_THREADS": "1"}, "dist-2p"),
    }
    out = {}
    for label, (cmd, env, folder) in runs.items():
        d = REPO / "runs" / "bench" / folder
        t0 = time.perf_counter()
        subprocess.run([*cmd, *common, "--output-dir", str(d)], check=True, env={**os.environ, **env},
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        out[label] = {"wall_seconds": wall, "dir": d, "report": json.loads((d / "report.json").read_text())}
        log.info("%s: %.1f s", label, wall)
    (a, b) = (out[k] for k in runs)
    same = {k: a["report"][k] == b["report"][k] for k in ("k_star", "heads_kept", "kept_heads", "curve", "scores")}
    diffs = {}
    for f in ("signatures-js.pt", "salience.pt"):
        x, y = (torch.load(r["dir"] / "stages" / f, weights_only=False) for r in (a, b))
        diffs[f] = {k: float((x[k] - y[k]).abs().max()) for k in x
                    if torch.is_tensor(x[k]) and x[k].is_floating_point()}
    result = {
        "model": args.model, "task": args.task, "settings": common,
        "runs": {k: {"wall_seconds": v["wall_seconds"], "stage_seconds": v["report"]["stage_seconds"],
                     "k_star": v["report"]["k_star"]} for k, v in out.items()},
        "identical": same, "max_abs_diff": diffs,
    }
    write_result("distributed", result, meta)
    log.info("identical: %s; diffs %s", same, diffs)


def render(result: dict) -> str:
    out = [meta_lines(result["meta"]),
           f"`cahp prune {' '.join(result['settings'])}` from the fine-tuned minilm-l6 / SST-5 model.\n",
           "| run | wall seconds | k* |", "|---|---|---|"]
    for k, v in result["runs"].items():
        out.append(f"| {k} | {v['wall_seconds']:.0f} | {v['k_star']} |")
    out.append("\nIdentical between the two: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                          for k, v in result["identical"].items()) + ".")
    out.append("Largest absolute difference of the cached statistics: " + "; ".join(
        f"{f}: " + ", ".join(f"{k} {v:.1e}" for k, v in d.items()) for f, d in result["max_abs_diff"].items()) + "\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
