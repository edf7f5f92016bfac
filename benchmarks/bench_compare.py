"""CAHP against the baselines (issue 7): `cahp compare` for a named configuration.

    python benchmarks/bench_compare.py minilm_sst5                       # all defaults (long)
    python benchmarks/bench_compare.py minilm_sst5 --seeds 1 --epochs 2  # cheaper
    python benchmarks/bench_compare.py minilm_mnli_small --no-finetune   # part (a) only

Runs `cahp.pipelines.compare.run_compare` in the output folder of the prune benchmark
for the same model and task (``runs/bench/prune-MODEL-TASK`` under the
repository, as `bench_prune.py` writes it, ``-classifier`` appended for a decoder
pruned as a classifier; or ``--output-dir``), with the same
default settings, so it reuses that run's fine-tuned dense model, signatures,
salience and CAHP curve, and every (method, budget, seed) result it has already
computed: an interrupted benchmark resumes. Writes
``results/compare_<configuration>.json`` (or ``--result-name``) (the compare report plus provenance);
`render` turns it into tables and a plain-language verdict per method and
budget (CAHP's win / tie / loss from the paired-bootstrap interval).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_configuration_options, meta_lines, metadata, run_configurations, write_result  # noqa: E402,E501
from cahp.core.configs import add_dataclass_args, from_args  # noqa: E402
from cahp.pipelines.compare import CompareConfig, render_markdown, run_compare, verdict_lines  # noqa: E402
from cahp.pipelines.prune import PruneConfig  # noqa: E402
from cahp.train.finetune import FinetuneConfig  # noqa: E402

log = logging.getLogger("bench_compare")

# configuration name -> (model, task) or (model, task, PruneConfig settings); results/compare_<name>.json
CONFIGS = {
    "minilm_sst5": ("minilm-l6", "sst5"),
    "minilm_mnli_small": ("minilm-l6", "mnli-small"),
    "mpnet_sst5": ("mpnet-base", "sst5"),
    # issue 23 item 5: the decoder fine-tuned as a 5-class classifier, query heads scored by accuracy (folder
    # prune-smollm2-135m-sst5-classifier); heads-only magnitude reads one k/v head per query head: leave it out
    "smollm2_sst5_classifier": ("smollm2-135m", "sst5", {"decoder_head": "classifier"}),
}


def run(name: str, args) -> Path:
    model, task, *extra = CONFIGS[name]
    settings = extra[0] if extra else {}
    folder = f"prune-{model}-{task}" + (f"-{settings['decoder_head']}" if "decoder_head" in settings else "")
    out = Path(args.output_dir) if args.output_dir else REPO / "runs" / "bench" / folder
    cfg = PruneConfig(model=model, task=task, output_dir=str(out), data_dir=args.data_dir or "",
                      calibration_examples=args.calibration_examples, curve_examples=args.curve_examples,
                      seed=args.seed, **settings)
    ft = FinetuneConfig(seed=args.seed, epochs=args.epochs, max_train_examples=args.max_train_examples)
    ccfg = from_args(CompareConfig, args)
    # the dense model is fine-tuned as `cahp prune` does by default, so the folder stays a prune folder
    dense_ft = FinetuneConfig(seed=args.seed)
    result = run_compare(cfg, ft, ccfg, progress=not args.quiet, dense_ft=dense_ft)
    report = dict(result.report)
    report["configuration"] = name
    report["output_dir"] = str(out)
    report["bench_settings"] = {"prune": asdict(cfg), "finetune": asdict(ft), "compare": asdict(ccfg)}
    path = write_result(args.result_name or f"compare_{name}", report, metadata())
    for line in verdict_lines(report):
        log.info("%s", line)
    return path


def render(result: dict) -> str:
    """Markdown from a results/compare_*.json file: settings, tables, verdicts (generated, never typed)."""
    body = render_markdown(result).splitlines()
    # drop the document title; nest the sections under make_results' section heading
    body = [("#" + line if line.startswith("## ") else line) for line in body[1:]]
    return meta_lines(result["meta"]) + "\n".join(body).strip("\n") + "\n"


def overview_rows(results: dict[str, dict]) -> tuple[list[tuple[str, str, str, dict]], list[str]]:
    """(rows, baselines) over several compare results: one row per budget, (part, comparison, budget, per-method
    results), part "right after pruning" or "after one fine-tuning".

    ``results``: results-file stem -> its JSON. Part (a) rows come from files run without fine-tuning
    (a fine-tuned file's own part (a) repeats them with fewer seeds and is left out).
    """
    rows, methods = [], []
    for r in results.values():
        ft = r.get("finetuned")
        part, res = (("after one fine-tuning", ft["results"]) if ft
                     else ("right after pruning", r["no_finetune"]["results"]))
        n_seeds = len(r["settings"]["seeds"])
        for b in r["budgets"]:
            per = res[b["label"]]
            methods += [m for m in per if m != "cahp" and m not in methods]
            seeds = f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"
            name = f"{r['model']} / {r['task']}, {part} ({seeds if ft else 'random over ' + seeds})"
            rows.append((part, name, f"{b['label']} ({b['k']} of {r['heads']})", per))
    return rows, methods


def _pooled(per: dict, method: str) -> dict | None:
    return per[method]["vs_cahp"]["pooled"] if method in per else None


def verdict_totals(results: dict[str, dict], part: str | None = None) -> dict[str, dict[str, int]]:
    """Baseline -> CAHP's pooled verdict counts ({"win", "tie", "loss"}) over the rows of `overview_rows`
    (those of one ``part`` if given)."""
    rows, methods = overview_rows(results)
    totals = {m: {"win": 0, "tie": 0, "loss": 0} for m in methods}
    for row_part, _, _, per in rows:
        if part is not None and row_part != part:
            continue
        for m in methods:
            if (v := _pooled(per, m)) is not None:
                totals[m][v["verdict"]] += 1
    return totals


def render_overview(results: dict[str, dict]) -> str:
    """One table over several compare results: CAHP's verdict against each baseline, per budget."""
    rows, methods = overview_rows(results)
    lines = [
        "CAHP's verdict against each baseline (win: the 95% paired-bootstrap interval of baseline minus CAHP "
        "lies below 0; loss: above 0; tie: it contains 0), with the difference in accuracy points (baseline minus "
        "CAHP). The sections below hold the same figures with their intervals, settings and provenance.\n",
        "| comparison | budget | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for _, name, budget, per in rows:
        cells = [f"{v['verdict']} ({100 * v['diff']:+.1f})" if (v := _pooled(per, m)) else "–" for m in methods]
        lines.append(f"| {name} | {budget} | " + " | ".join(cells) + " |")
    lines.append("| **CAHP wins / ties / losses** | | "
                 + " | ".join(f"{t['win']} / {t['tie']} / {t['loss']}" for t in verdict_totals(results).values())
                 + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", choices=list(CONFIGS), help="named configurations to run, in order")
    # --methods, --budgets, --seeds, --[no-]knee, --[no-]finetune, --[no-]dense-control, --n-bootstrap:
    # cahp compare's own options and defaults
    add_dataclass_args(p.add_argument_group("comparison"), CompareConfig)
    p.add_argument("--epochs", type=int, default=FinetuneConfig.epochs,
                   help="maximum epochs of each fine-tuning after pruning (the dense model gets the defaults)")
    p.add_argument("--max-train-examples", type=int, default=0,
                   help="cap on examples of each fine-tuning after pruning (0: all)")
    p.add_argument("--calibration-examples", type=int, default=PruneConfig.calibration_examples)
    p.add_argument("--curve-examples", type=int, default=PruneConfig.curve_examples)
    p.add_argument("--seed", type=int, default=0)
    add_configuration_options(p, "prune-MODEL-TASK", "compare", result_note=" (e.g. one file for the no-fine-tuning "
                              "part over 3 seeds, another for a fine-tuned subset)")
    return p


def main() -> None:
    run_configurations(build_parser, run, log)


if __name__ == "__main__":
    main()
