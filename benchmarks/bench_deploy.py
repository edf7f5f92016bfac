"""Deployment (issue 20): the pruned model in PyTorch, ONNX and int8 ONNX against the dense PyTorch model.

    python benchmarks/bench_deploy.py --dense runs/prune-minilm-l6-sst5/stages/finetuned \\
        --pruned runs/prune-minilm-l6-sst5/model --task sst5                 # on a quiet machine
    python benchmarks/bench_deploy.py --dense ... --pruned ... --task sst5 --quick   # smoke run, seconds

Four systems, each scored on the task's test split and timed:

- **dense PyTorch fp32**: the fine-tuned dense model (``--dense``, e.g. the
  ``stages/finetuned`` folder of a `cahp prune` run);
- **pruned PyTorch fp32**: the pruned, fine-tuned model (``--pruned``);
- **pruned ONNX fp32**: its `cahp.deploy.onnx` export in onnxruntime;
- **pruned ONNX int8**: that export's dynamic int8 copy (`cahp.deploy.quantize`).

Accuracy: `cahp.train.evaluate` with the PyTorch model's batching for every
system (the ONNX files through `cahp.deploy.runtime.OnnxClassifier`), bootstrap
95% intervals, and the paired bootstrap of int8 - fp32 on the same examples.
Latency: `cahp.bench.latency.bench_models` with one thread by default, so
PyTorch and onnxruntime calls are interleaved round-robin in every repetition
(the attention-free floor and the dense model's exports are timed too); each
system's ratio to the dense PyTorch call comes with a 95% bootstrap interval
over repetitions. The ONNX files timed are the files scored.

Goal of issue 20: the pruned int8 ONNX model at least 3x faster than dense
PyTorch fp32 at 1 x 32 (latency ratio at most 1/3) with accuracy within 1.0
point of pruned PyTorch fp32 (the paired interval of the difference inside
[-1, +1] points). Each part is met or missed when its 95% interval is on one
side of the bound, undecided when the interval contains it; the goal is met
when both parts are, missed when either is.

Timing options are `cahp bench`'s own (`cahp.bench.config.BenchConfig`) with
this benchmark's defaults (``--shapes 1x32,32x128 --threads 1 --budget 60
--min-reps 20``). Results go to results/deploy_minilm_sst5.json (``--name``);
``--quick`` writes to the temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cahp  # noqa: E402
from benchmarks._common import meta_lines, metadata, write_result  # noqa: E402
from cahp.bench.config import DENSE, INT8_PREFIX, ONNX_PREFIX, BenchConfig  # noqa: E402
from cahp.bench.figures import ratio_ci  # noqa: E402
from cahp.bench.latency import bench_models  # noqa: E402
from cahp.bench.report import fmt_number  # noqa: E402
from cahp.core.configs import add_dataclass_args, from_args  # noqa: E402
from cahp.core.io import to_jsonable, write_json  # noqa: E402
from cahp.data.tasks import get_task  # noqa: E402
from cahp.deploy.runtime import OnnxClassifier  # noqa: E402
from cahp.train.evaluate import evaluate_examples, paired_bootstrap_metric  # noqa: E402

log = logging.getLogger("bench_deploy")
NAME = "deploy_minilm_sst5"
#: the four systems: result key -> (label in the tables, runner label in `bench_models`' timings)
SYSTEMS = {
    "dense_torch": ("dense PyTorch fp32", DENSE),
    "pruned_torch": ("pruned PyTorch fp32", "pruned"),
    "pruned_onnx": ("pruned ONNX fp32", ONNX_PREFIX + "pruned"),
    "pruned_int8": ("pruned ONNX int8", INT8_PREFIX + "pruned"),
}
#: the goal: at GOAL_SHAPE, int8 / dense latency at most GOAL_RATIO, |int8 - fp32| accuracy at most GOAL_POINTS
GOAL_SHAPE, GOAL_RATIO, GOAL_POINTS = (1, 32), 1 / 3, 1.0
# `cahp bench`'s timing settings with this benchmark's defaults; the ONNX and int8 timing are always on
DEFAULTS = BenchConfig(shapes="1x32,32x128", threads=1, budget=60.0, min_reps=20, device="cpu")
SKIPPED = ("device", "onnx", "int8")
# smoke run (--quick): these settings replace the given ones; accuracy on the first QUICK_EXAMPLES test examples
QUICK = {"shapes": "1x32,4x16", "reps": 3, "min_reps": 1, "warmup": 1, "kernel": "eager"}
QUICK_EXAMPLES, QUICK_BOOTSTRAP = 64, 200


def settings_of(args: argparse.Namespace) -> tuple[BenchConfig, dict]:
    """The timing config (``--quick`` applied, ONNX and int8 on, CPU) and the settings the result records."""
    given = {**vars(args), **(QUICK if args.quick else {}), "device": "cpu", "onnx": True, "int8": True}
    cfg = from_args(BenchConfig, argparse.Namespace(**given))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SKIPPED}
    settings.update(
        dense=str(args.dense), pruned=str(args.pruned), task=args.task, quick=args.quick,
        max_length=args.max_length, batch_size=args.batch_size,
        bootstrap=QUICK_BOOTSTRAP if args.quick else args.bootstrap,
        examples=QUICK_EXAMPLES if args.quick else None,
    )
    return cfg, settings


def score_systems(models: dict, tok, task, settings: dict) -> dict:
    """Test scores of every system (same batching), and the paired int8 - fp32 difference and agreements."""
    examples = task.load(task.test_split)
    if settings["examples"]:
        examples = examples[: settings["examples"]]
    kw = dict(max_length=settings["max_length"], batch_size=settings["batch_size"],
              n_bootstrap=settings["bootstrap"], seed=settings["seed"], progress=False)
    scores = {}
    for key, model in models.items():
        log.info("scoring %s on %s/%s (%d examples)", SYSTEMS[key][0], task.name, task.test_split, len(examples))
        scores[key] = evaluate_examples(model, tok, examples, task.num_labels, desc=key, **kw)
    preds = {k: np.asarray(s.pop("predictions")) for k, s in scores.items()}
    labels = np.asarray([e.label for e in examples])
    paired = paired_bootstrap_metric(preds["pruned_int8"], preds["pruned_torch"], labels, "accuracy",
                                     task.num_labels, n_bootstrap=settings["bootstrap"], seed=settings["seed"])
    agreement = {k: float(np.mean(preds[k] == preds["pruned_torch"])) for k in ("pruned_onnx", "pruned_int8")}
    return {"split": task.test_split, "n": len(examples), "scores": scores,
            "int8_minus_fp32": paired, "agreement_with_pruned_torch": agreement}


def latency_summary(timing: dict, seed: int = 0) -> dict:
    """Per shape, each system's median ms and its ratio to the dense PyTorch call with a 95% interval."""
    out = {}
    for run in timing["runs"]:
        times = run["times_ms"]
        cells = {}
        for key, (_, label) in SYSTEMS.items():
            med = run["timings"][label]["median_ms"]
            cells[key] = {"median_ms": med, "n": run["timings"][label]["n"],
                          "ratio_to_dense": med / run["timings"][DENSE]["median_ms"],
                          "ratio_to_dense_ci95": ratio_ci(times[label], times[DENSE], seed=seed)}
        out[f"{run['batch']}x{run['seq']}"] = {"batch": run["batch"], "seq": run["seq"], "kernel": run["kernel"],
                                               "interleaved": run.get("runtimes_interleaved", False),
                                               "systems": cells}
    return out


def _finite(ci) -> list | None:
    return ci if ci and all(c is not None and math.isfinite(c) for c in ci) else None


def goal(latency: dict, accuracy: dict) -> dict:
    """The goal's two parts and the whole, each met / missed / undecided from its 95% interval."""
    cell = latency.get(f"{GOAL_SHAPE[0]}x{GOAL_SHAPE[1]}", {}).get("systems", {}).get("pruned_int8")
    if cell is None:
        speed = "not measured"
    else:
        ci = _finite(cell["ratio_to_dense_ci95"]) or [cell["ratio_to_dense"]] * 2
        speed = "met" if ci[1] <= GOAL_RATIO else "missed" if ci[0] > GOAL_RATIO else "undecided"
    d = accuracy["int8_minus_fp32"]
    lo, hi = (100 * x for x in (_finite(d["ci95"]) or [d["diff"]] * 2))  # points
    if max(abs(lo), abs(hi)) <= GOAL_POINTS:
        acc = "met"  # the whole interval within the bound
    elif lo > GOAL_POINTS or hi < -GOAL_POINTS:
        acc = "missed"  # the whole interval beyond it
    else:
        acc = "undecided"
    parts = (speed, acc)
    whole = "missed" if "missed" in parts else "met" if parts == ("met", "met") else "undecided"
    return {"speed": speed, "accuracy": acc, "verdict": whole, "shape": list(GOAL_SHAPE), "max_ratio": GOAL_RATIO,
            "max_points": GOAL_POINTS}


def run(args) -> dict:
    meta = metadata()  # stamped at start: the code that runs
    cfg, settings = settings_of(args)
    task = get_task(args.task, data_dir=args.data_dir)
    task.validate()
    dense, _ = cahp.load_model(str(args.dense), num_labels=task.num_labels, attn_implementation="eager")
    pruned, tok = cahp.load_model(str(args.pruned), num_labels=task.num_labels, attn_implementation="eager")
    with tempfile.TemporaryDirectory(prefix="cahp-deploy-") as onnx_dir:
        # bench_models exports, checks (fp32 and int8) and times; the files it timed are the ones scored
        timing = to_jsonable(bench_models(dense, {"pruned": pruned}, cfg, onnx_dir=onnx_dir))
        onnx_files = {"pruned_onnx": Path(onnx_dir) / "pruned.onnx", "pruned_int8": Path(onnx_dir) / "pruned.int8.onnx"}
        models = {"dense_torch": dense, "pruned_torch": pruned,
                  **{k: OnnxClassifier(p, threads=cfg.threads) for k, p in onnx_files.items()}}
        sizes = {k: p.stat().st_size for k, p in onnx_files.items()}
        accuracy = score_systems(models, tok, task, settings)
    latency = latency_summary(timing, seed=cfg.seed)
    systems = {"dense_torch": timing["variants"][DENSE], "pruned_torch": timing["variants"]["pruned"]}
    result = {
        "settings": settings,
        "task": task.name,
        "systems": {k: {"label": v[0]} for k, v in SYSTEMS.items()},
        "models": systems,
        "onnx_bytes": sizes,
        "checks": {"onnx": timing["onnx"]["pruned"], "int8": timing["int8"]["pruned"]},
        "accuracy": accuracy,
        "latency": latency,
        "goal": goal(latency, accuracy),
        "timing": timing,
    }
    _write(args, meta, result)
    return {"meta": meta, **result}


def _write(args, meta: dict, result: dict) -> None:
    """``--out``, else results/<name>.json; a smoke run never touches results/ unless told to."""
    if args.out is not None:
        path = write_json(args.out, {"meta": meta, **result})
    elif args.quick:
        path = write_json(Path(tempfile.gettempdir()) / f"cahp-{args.name}-quick.json", {"meta": meta, **result})
    else:
        path = write_result(args.name, result, meta)
    log.info("wrote %s", path)


def _f(x, digits=2) -> str:
    return fmt_number(x, digits, missing="–")


def _ci(ci, scale=1.0, digits=2) -> str:
    ci = _finite(ci)
    return f" [{_f(scale * ci[0], digits)}, {_f(scale * ci[1], digits)}]" if ci else ""


def render(result: dict) -> str:
    """The RESULTS.md section of a deploy result: accuracy and latency of the four systems, and the goal."""
    s, acc, lat, g = result["settings"], result["accuracy"], result["latency"], result["goal"]
    reps = (f"{s['reps']} repetitions" if s.get("reps")
            else f"{s['min_reps']}+ repetitions ({s['budget']:.0f} s per shape)")
    shapes = list(lat)
    out = [
        meta_lines(result["meta"]),
        f"Dense: `{s['dense']}`; pruned: `{s['pruned']}`; task {result['task']}, {acc['split']} split "
        f"({acc['n']} examples{', a smoke run' if s.get('quick') else ''}). Accuracy with bootstrap 95% intervals "
        f"({s['bootstrap']} resamples), every system batched as the PyTorch model. Latency: {s['threads']} "
        f"thread(s), {reps}, {s['warmup']} warm-up call(s), random ids without padding, the models of both runtimes "
        "interleaved round-robin; ratio = median latency over the dense PyTorch model's, 95% bootstrap interval "
        "over repetitions in brackets.\n",
        "| system | heads | test accuracy | macro-F1 | " + " | ".join(
            f"{k} ms (median) | {k} / dense" for k in shapes) + " |",
        "|---|---|---|---|" + "---|---|" * len(shapes),
    ]
    heads = {k: result["models"][k]["heads_kept"] for k in ("dense_torch", "pruned_torch")}
    for key, meta in result["systems"].items():
        sc = acc["scores"][key]
        h = heads["dense_torch" if key == "dense_torch" else "pruned_torch"]
        cells = []
        for shape in shapes:
            c = lat[shape]["systems"][key]
            cells.append(f"{_f(c['median_ms'])} | {_f(c['ratio_to_dense'], 3)}{_ci(c['ratio_to_dense_ci95'], 1, 3)}")
        out.append(
            f"| {meta['label']} | {h} | {_f(100 * sc['accuracy'])}{_ci(sc.get('accuracy_ci95'), 100)} "
            f"| {_f(100 * sc['macro_f1'])}{_ci(sc.get('macro_f1_ci95'), 100)} | " + " | ".join(cells) + " |"
        )
    d, ch = acc["int8_minus_fp32"], result["checks"]
    agree = acc["agreement_with_pruned_torch"]
    out += [
        "",
        f"int8 − pruned fp32 accuracy (paired bootstrap on the same examples): {_f(100 * d['diff'])} points"
        f"{_ci(d['ci95'], 100)}. Same predicted class as pruned PyTorch fp32: ONNX fp32 "
        f"{100 * agree['pruned_onnx']:.1f}%, ONNX int8 {100 * agree['pruned_int8']:.1f}% of the examples. "
        f"Export checks on padded random batches: fp32 max |ONNX − PyTorch| {ch['onnx']['max_abs_diff']:.1e}; "
        f"int8 max |int8 − PyTorch fp32| {ch['int8']['relative_diff']:.3f} of the logit scale. ONNX files: fp32 "
        f"{result['onnx_bytes']['pruned_onnx'] / 1e6:.1f} MB, int8 {result['onnx_bytes']['pruned_int8'] / 1e6:.1f} MB.",
        "",
    ]
    cell = lat.get(f"{g['shape'][0]}x{g['shape'][1]}", {}).get("systems", {}).get("pruned_int8")
    speed = (f"int8 / dense latency {_f(cell['ratio_to_dense'], 3)}{_ci(cell['ratio_to_dense_ci95'], 1, 3)}, "
             f"{1 / cell['ratio_to_dense']:.2f}x faster" if cell else "not measured")
    out.append(
        f"**Goal** (issue 20): pruned int8 ONNX at least {1 / g['max_ratio']:.0f}x faster than dense PyTorch fp32 "
        f"at {g['shape'][0]}x{g['shape'][1]} (latency ratio at most {g['max_ratio']:.3f}) with accuracy within "
        f"{g['max_points']:.1f} point of pruned fp32: **{g['verdict']}** (speed: {speed}, {g['speed']}; accuracy: "
        f"{_f(100 * d['diff'])} points{_ci(d['ci95'], 100)}, {g['accuracy']}). A part is *undecided* when its 95% "
        "interval contains the bound."
    )
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The folders and task, `BenchConfig`'s timing options (with `DEFAULTS`), scoring options, output."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", type=Path, required=True, help="the fine-tuned dense model folder")
    p.add_argument("--pruned", type=Path, required=True, help="the pruned, fine-tuned folder (cahp prune's model/)")
    p.add_argument("--task", default="sst5", help="task name or folder (default sst5)")
    p.add_argument("--data-dir", default=None, help="folder with the task data (default: cahp's)")
    add_dataclass_args(p, DEFAULTS, skip=SKIPPED)
    p.add_argument("--max-length", type=int, default=128, help="maximum tokens per example when scoring")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the accuracy intervals")
    p.add_argument("--name", default=NAME, help=f"results file stem (default {NAME})")
    p.add_argument("--out", type=Path, default=None, help="write the result here instead of results/<name>.json")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: shapes 1x32,4x16, 3 repetitions, the first {QUICK_EXAMPLES} test examples")
    return p


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(render(result))
    return result


if __name__ == "__main__":
    main()
