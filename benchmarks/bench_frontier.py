"""Heads + FFN neurons (issue 19): `cahp compare --ffn` for a named configuration, the accuracy / speed frontier.

    python benchmarks/bench_frontier.py minilm_sst5                                  # all defaults (long)
    python benchmarks/bench_frontier.py minilm_sst5 --seeds 1 --speedups 2 --no-knee  # one target, one seed

Runs `cahp.pipelines.compare_ffn.run_compare_ffn` in the output folder of the
prune benchmark for the same model and task (``runs/bench/prune-MODEL-TASK``,
or ``--output-dir``), so it reuses that folder's fine-tuned dense model,
statistics, cost table, joint curve and every (method, target, seed) result
already computed: an interrupted benchmark resumes. The dense model is
fine-tuned as `cahp prune` does by default. Writes
``results/frontier_<configuration>.json`` (or ``--result-name``): the compare
report plus provenance; `render` turns it into tables and a frontier figure
(``docs/images/frontier_<configuration>.png``), regenerated from the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, meta_lines, metadata, write_result  # noqa: E402
from cahp.core.configs import add_dataclass_args, from_args  # noqa: E402
from cahp.pipelines.compare import CompareConfig  # noqa: E402
from cahp.pipelines.compare_ffn import run_compare_ffn  # noqa: E402
from cahp.pipelines.joint_config import JointConfig  # noqa: E402
from cahp.pipelines.report_ffn import render_ffn_markdown  # noqa: E402
from cahp.pipelines.stages import PruneConfig  # noqa: E402
from cahp.train.finetune import FinetuneConfig  # noqa: E402
from cahp.train.teacher import KD_FIELDS  # noqa: E402

log = logging.getLogger("bench_frontier")

# configuration name -> (model, task); results/frontier_<name>.json
CONFIGS = {
    "minilm_sst5": ("minilm-l6", "sst5"),
    "minilm_mnli_small": ("minilm-l6", "mnli-small"),
    "minilm_sst2": ("minilm-l6", "sst2"),
    "mpnet_sst5": ("mpnet-base", "sst5"),
}
IMAGES = REPO / "docs" / "images"


def run(name: str, args) -> Path:
    model, task = CONFIGS[name]
    out = Path(args.output_dir) if args.output_dir else REPO / "runs" / "bench" / f"prune-{model}-{task}"
    cfg = PruneConfig(model=model, task=task, output_dir=str(out), data_dir=args.data_dir or "", ffn=True,
                      seed=args.seed)
    ft = FinetuneConfig(seed=args.seed, epochs=args.epochs, max_train_examples=args.max_train_examples,
                        kd_alpha=args.kd_alpha, kd_temperature=args.kd_temperature)
    ccfg = from_args(CompareConfig, args)
    joint = from_args(JointConfig, args)
    result = run_compare_ffn(cfg, ft, ccfg, joint, progress=not args.quiet, dense_ft=FinetuneConfig(seed=args.seed))
    report = dict(result.report)
    report["configuration"] = name
    report["output_dir"] = str(out)
    report["bench_settings"] = {"prune": asdict(cfg), "finetune": asdict(ft), "compare": asdict(ccfg),
                                "joint": asdict(joint)}
    return write_result(args.result_name or f"frontier_{name}", report, metadata())


def result_stem(result: dict) -> str:
    """The results file's stem: ``--result-name`` of its recorded command, else frontier_CONFIGURATION."""
    argv = shlex.split((result.get("meta") or {}).get("command", ""))
    if "--result-name" in argv[:-1]:
        return argv[argv.index("--result-name") + 1]
    return f"frontier_{result.get('configuration', result['model'] + '_' + result['task'])}"


def render(result: dict) -> str:
    """Markdown from a results/frontier_*.json file: the frontier figure, tables, verdicts (generated)."""
    from cahp.pipelines.plots import plot_frontier

    image = IMAGES / f"{result_stem(result)}.png"
    plot_frontier(result, image)
    body = render_ffn_markdown(result).splitlines()
    body = [("#" + line if line.startswith("## ") else line) for line in body[1:]]
    return (meta_lines(result["meta"]) + f"![frontier](docs/images/{image.name})\n\n"
            + "\n".join(body).strip("\n") + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configuration", choices=list(CONFIGS))
    p.add_argument("--output-dir", default="", help="run folder (default: runs/bench/prune-MODEL-TASK)")
    p.add_argument("--data-dir", default="", help="task data folder (default: ../shared/data)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--epochs", type=int, default=FinetuneConfig.epochs, help="epochs of the fine-tuning after pruning")
    p.add_argument("--max-train-examples", type=int, default=0, help="fine-tune after pruning on the first N (0: all)")
    kd = {f.name: f for f in dataclasses.fields(FinetuneConfig) if f.name in KD_FIELDS}
    for name, f in kd.items():
        p.add_argument("--" + name.replace("_", "-"), type=float, default=f.default, help=f.metadata["help"])
    p.add_argument("--result-name", default="", help="results file stem (default: frontier_CONFIGURATION)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_args(p.add_argument_group("comparison"), CompareConfig)
    add_dataclass_args(p.add_argument_group("joint"), JointConfig)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(f"wrote {run(args.configuration, args)}")


if __name__ == "__main__":
    main()
