"""Latency of pruned models (issue 6): are they really faster?

    python benchmarks/bench_latency.py            # full run, on a quiet machine (about 25-30 min on 2 cores)
    python benchmarks/bench_latency.py --quick    # smoke run: tiny shapes, few repetitions, seconds
    python benchmarks/bench_latency.py --sweep --threads 1 --shapes 1x32   # where the line is lost

Timing options are `cahp bench`'s own (`cahp.bench.config.BenchConfig`), with
other defaults: ``--budget 30 --min-reps 15`` and ONNX on (``--no-onnx``).

For each model (minilm-l6, mpnet-base) it times, interleaved round-robin, the
dense model, three pruned copies and the attention-free floor, in PyTorch and
in onnxruntime (same thread count):

- ``50%`` and ``75%``: seeded random selections of half / three quarters of
  all heads, drawn globally, so layers keep uneven head counts;
- ``50% (empty layers)``: every head of every other layer removed.

Every model runs the attention kernel that is fastest for the dense model at
that shape (`cahp.bench.timing.choose_kernel`, kernel "auto"). The
floor-relative figure is (dense - pruned) / ((dense - no attention) x share of
heads removed): 1.0 means the pruned model sits on the straight line from dense
to the floor. Results go to results/latency.json (``--quick`` writes to the
temporary folder instead).

``--sweep`` times instead each model with h heads in every layer (h = all
heads down to 1) and the floor, and fits the cost one attention block adds
above the floor as ``fixed + per_head * h`` (`cahp.bench.sweep.head_count_sweep`):
the fixed part, paid by any block that keeps a head, is what keeps pruned
models below the line (uniform pruning realises at most ``heads * per_head /
(fixed + heads * per_head)`` of the ideal saving). Results go to
results/latency_sweep.json.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: the repository root makes `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cahp  # noqa: E402
from benchmarks._common import meta_lines, metadata, write_result  # noqa: E402
from cahp.bench.config import DENSE, NO_ATTENTION, ONNX_PREFIX, BenchConfig  # noqa: E402
from cahp.bench.figures import floor_relative_ci, ratio_ci, ratio_floor_relative  # noqa: E402
from cahp.bench.latency import bench_models  # noqa: E402
from cahp.bench.report import SWEEP_EXPLAINED, fmt_number, format_sweep  # noqa: E402
from cahp.bench.sweep import head_count_sweep  # noqa: E402
from cahp.bench.variants import emptied_layers_removal, random_removal  # noqa: E402
from cahp.core.configs import add_dataclass_args, from_args  # noqa: E402
from cahp.core.io import to_jsonable, write_json  # noqa: E402

log = logging.getLogger("bench_latency")
NAME = "latency"
SWEEP_NAME = "latency_sweep"
# Goals of issue 6: floor-relative figure at least this, per (batch, seq).
GOALS = {(32, 128): 0.95, (1, 32): 0.85}
# `cahp bench`'s timing settings with this benchmark's defaults: longer timing, ONNX on.
DEFAULTS = BenchConfig(budget=30.0, min_reps=15, onnx=True)
# smoke run (--quick): these settings replace the given ones
QUICK = {"shapes": "1x8,2x16", "reps": 3, "min_reps": 1, "warmup": 1}


VARIANTS = {"50": "50%", "75": "75%", "empty": "50% (empty layers)"}


def pruned_variants(dense, seed: int, only=tuple(VARIANTS)) -> dict:
    """The pruned copies timed for each model (labels are the result keys); ``only``: keys of `VARIANTS`."""
    plans = {
        "50": lambda: random_removal(dense, 0.5, seed=seed),
        "75": lambda: random_removal(dense, 0.75, seed=seed),
        "empty": lambda: emptied_layers_removal(dense, every=2),
    }
    return {VARIANTS[k]: cahp.remove_heads(copy.deepcopy(dense), plans[k]()) for k in VARIANTS if k in only}


def settings_of(args: argparse.Namespace) -> tuple[BenchConfig, dict]:
    """The timing config of parsed options (``--quick`` applied) and the settings a result records."""
    cfg = from_args(BenchConfig, argparse.Namespace(**{**vars(args), **(QUICK if args.quick else {})}))
    settings = {
        "threads": cfg.threads,
        "shapes": [list(s) for s in cfg.shape_list],
        "kernel": cfg.kernel,
        "reps": cfg.reps,
        "min_reps": cfg.min_reps,
        "max_reps": cfg.max_reps,
        "budget_s": cfg.budget,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "onnx": cfg.onnx,
        "clock": cfg.clock,
        "hold_memory": cfg.hold_memory,
        "quick": args.quick,
        "sweep": args.sweep,
        "variants": [VARIANTS[k] for k in args.variants],
    }
    return cfg, settings


def run(args) -> dict:
    meta = metadata()  # stamped at start: the code that runs
    cfg, settings = settings_of(args)
    result = {"settings": settings, "models": {}}
    name = args.name or (SWEEP_NAME if args.sweep else NAME)
    for model_name in args.models:
        log.info("loading %s", model_name)
        dense, _ = cahp.load_model(model_name, attn_implementation="eager", with_tokenizer=False)
        if args.sweep:
            result["models"][model_name] = [to_jsonable(head_count_sweep(dense, b, q, cfg)) for b, q in cfg.shape_list]
            _write(args, name, meta, result)
            continue
        pruned = pruned_variants(dense, args.seed, only=args.variants)
        res = bench_models(dense, pruned, cfg)
        res["selection_seed"] = args.seed
        result["models"][model_name] = to_jsonable(res)
        _write(args, name, meta, result)
        del dense, pruned
    return result


def _write(args, name: str, meta: dict, result: dict) -> None:
    """After every model: a crash keeps what was done. A smoke run never touches results/."""
    if args.quick:
        path = write_json(Path(tempfile.gettempdir()) / f"cahp-{name}-quick.json", {"meta": meta, **result})
    else:
        path = write_result(name, result, meta)
    log.info("wrote %s", path)


def _f(x, digits=2) -> str:
    return fmt_number(x, digits, missing="–")


def _interval(ci: list | None) -> list | None:
    """A 95% interval with two finite bounds, else None (undefined bounds are NaN, or null once in JSON)."""
    if not ci or any(c is None or not math.isfinite(c) for c in ci):
        return None
    return ci


def _goal_verdict(x: float, ci: list | None, goal: float) -> str:
    """met / missed, or undecided when the 95% interval of the figure contains the goal."""
    ci = _interval(ci)
    if ci:
        return "met" if ci[0] >= goal else "missed" if ci[1] < goal else "undecided"
    return "met" if x >= goal else "missed"


def _ratio_verdict(ratio: float, ci: list | None) -> str:
    """ONNX at least as fast (ratio at most 1): met / missed, or undecided when the 95% interval contains 1."""
    ci = _interval(ci)
    if ci:
        return "met" if ci[1] <= 1.0 else "missed" if ci[0] > 1.0 else "undecided"
    return "met" if ratio <= 1.0 else "missed"


def _onnx_ratio(run: dict, label: str) -> tuple[float, list | None] | None:
    """ONNX / PyTorch median latency of one model in one run, and its 95% interval where times were kept."""
    onnx = ONNX_PREFIX + label
    if onnx not in run["timings"]:
        return None
    ratio = run.get("onnx_ratio", {}).get(label)
    if ratio is None:  # results written before the ratio was stored
        ratio = run["timings"][onnx]["median_ms"] / run["timings"][label]["median_ms"]
    ci = run.get("onnx_ratio_ci95", {}).get(label)
    times = run.get("times_ms", {})
    if ci is None and onnx in times and label in times:
        ci = ratio_ci(times[onnx], times[label])
    return ratio, _interval(ci)


def _ratio_figure(run: dict, label: str, share: float) -> tuple[float, list | None] | None:
    """The floor-relative figure from per-repetition ratios and its 95% interval (None without per-repetition
    times); derived from ``times_ms`` for results written before it was stored."""
    x = (run.get("floor_relative_ratio") or {}).get(label)
    ci = (run.get("floor_relative_ratio_ci95") or {}).get(label)
    times = run.get("times_ms") or {}
    if x is None and all(k in times for k in (DENSE, label, NO_ATTENTION)):
        series = (times[DENSE], times[label], times[NO_ATTENTION])
        x, ci = ratio_floor_relative(*series, share), floor_relative_ci(*series, share, from_ratios=True)
    return None if x is None else (x, _interval(ci))


def goal_cell(run: dict, label: str, share: float) -> dict:
    """The goal figures of one pruned model in one timed run (one device and shape), each as
    ``(value, 95% interval or None, verdict)``: ``figure`` (floor-relative, from the medians), ``ratios``
    (the same from per-repetition ratios), ``onnx`` (ONNX / PyTorch latency). A figure the run lacks is
    absent; a verdict is None where the shape has no goal."""
    goal = GOALS.get((run["batch"], run["seq"]))
    out = {}
    x = run["floor_relative"].get(label)
    if x is not None:
        ci = _interval((run.get("floor_relative_ci95") or {}).get(label))
        out["figure"] = (x, ci, None if goal is None else _goal_verdict(x, ci, goal))
    r = _ratio_figure(run, label, share)
    if r is not None:
        out["ratios"] = (*r, None if goal is None else _goal_verdict(*r, goal))
    o = _onnx_ratio(run, label)
    if o is not None:
        out["onnx"] = (*o, _ratio_verdict(*o))
    return out


def _fmt_figure(x: float | None, ci: list | None, goal: float | None = None) -> str:
    """``x [lo, hi]``; a bound that two digits would round onto ``goal`` gets more (up to four), so that the
    verdict can be read from it."""

    def bound(b):
        digits = 2
        while digits < 4 and goal is not None and b is not None and b != goal and round(b, digits) == goal:
            digits += 1
        return _f(b, digits)

    return _f(x) + (f" [{bound(ci[0])}, {bound(ci[1])}]" if ci else "")


def render_overview(results: dict[str, dict]) -> str:
    """Every measurement of each goal of issue 6, from every latency result: one row per pruned model, shape
    with a goal, and run, runs in date order. Sweeps (no pruned models) are left out."""
    rows, models, labels = [], {}, list(VARIANTS.values())
    for stem, result in results.items():
        if result["settings"].get("sweep"):
            continue
        meta, threads = result["meta"], result["settings"]["threads"]
        for model_name, res in result["models"].items():
            for run in res["runs"]:
                shape = (run["batch"], run["seq"])
                if shape not in GOALS:
                    continue
                for label, v in res["variants"].items():
                    if label in (DENSE, NO_ATTENTION):
                        continue
                    c = goal_cell(run, label, v["share_removed"])
                    order = (models.setdefault(model_name, len(models)),  # models in order of appearance
                             labels.index(label) if label in labels else len(labels), shape, meta["date"])
                    rows.append((order, model_name, label, run, stem, meta, threads, c))
    lines = [
        "Each goal cell of issue 6 (a pruned model at a shape), with every run that measured it, oldest first: "
        "the floor-relative figure from the medians and from per-repetition ratios (goal: at least "
        + ", ".join(f"{g} at {b}x{q}" for (b, q), g in GOALS.items())
        + "), and ONNX / PyTorch latency (goal: at most 1). A verdict is *undecided* when the 95% bootstrap "
        "interval in brackets contains the goal. Runs differ in code revision, repetitions and threads (runs "
        "with 2 threads on this 2-vCPU machine are too noisy to judge); the sections below give each run's "
        "settings and provenance.\n",
        "| model | pruned | shape | run (benchmarks/results/) | date, revision | threads | reps | kernel "
        "| floor-rel, medians | floor-rel, ratios | ONNX / PyTorch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows.sort(key=lambda r: r[0])

    def cell(value, goal) -> str:
        return "–" if value is None else _fmt_figure(*value[:2], goal) + (f" {value[2]}" if value[2] else "")

    for _, model_name, label, run, stem, meta, threads, c in rows:
        goal = GOALS[(run["batch"], run["seq"])]
        device = "" if run["device"] == "cpu" else " " + run["device"]
        lines.append(
            f"| {model_name} | {label} | {run['batch']}x{run['seq']}{device} | `{stem}` "
            f"| {meta['date'][:10]}, {meta['git_revision']} | {threads} | {run['timings'][label]['n']} "
            f"| {run['kernel']} | {cell(c.get('figure'), goal)} | {cell(c.get('ratios'), goal)} "
            f"| {cell(c.get('onnx'), 1.0)} |"
        )
    return "\n".join(lines) + "\n"


def _allocator_line(result: dict) -> str:
    """What the C allocator did with freed memory (results before the setting existed: glibc's default)."""
    runs = result["models"].values()
    first = next(iter(runs), None)
    first = first[0] if isinstance(first, list) and first else first
    return "Allocator: " + ((first or {}).get("allocator") or "C library default (run before cahp held freed memory)")


def render_sweep(result: dict) -> str:
    s = result["settings"]
    return "\n".join([
        meta_lines(result["meta"]),
        f"Settings: {s['threads']} threads, {s.get('clock', 'wall')}-clock time per call, models interleaved "
        "round-robin, inputs random ids without padding, the dense model's fastest attention kernel for all. "
        + _allocator_line(result) + ".\n",
        SWEEP_EXPLAINED.replace("per block =", "**Per block** =").replace("ceiling =", "**ceiling** =") + "\n",
        format_sweep(result["models"]),
    ]) + "\n"


def render(result: dict) -> str:
    s = result["settings"]
    if s.get("sweep"):
        return render_sweep(result)
    reps = (
        f"{s['reps']} repetitions"
        if s.get("reps")
        else f"{s['min_reps']}+ repetitions ({s['budget_s']:.0f} s per shape)"
    )
    done = sorted({t["n"] for res in result["models"].values() for run in res["runs"] for t in run["timings"].values()})
    if done and not s.get("reps"):
        reps += f": {done[0]}" + (f" to {done[-1]}" if len(done) > 1 else "") + " done"
    out = [
        meta_lines(result["meta"]),
        f"Settings: {s['threads']} threads (torch and onnxruntime), {reps}, {s['warmup']} warm-up calls, "
        f"{s.get('clock', 'wall')}-clock time per call, models interleaved round-robin; inputs random ids, "
        "no padding; every model runs the attention kernel fastest for the dense model at that shape "
        f"(kernel policy `{s['kernel']}`). Pruned selections: seeded random (seed {s['seed']}) over all heads, "
        'so layers keep uneven head counts; "empty layers": every head of every other layer removed. '
        + _allocator_line(result) + ".\n",
        "**floor-rel** = (dense − pruned) / ((dense − no attention) × share of heads removed), from the medians: "
        "1.00 = on the straight line from the dense model to the same model without attention. **(paired)**: the "
        "same figure from per-repetition differences (models interleaved), less sensitive to a drifting machine.\n",
    ]
    summary = [
        "| model | pruned | "
        + " | ".join(f"{b}x{q}" for b, q in s["shapes"])
        + " | goal per shape | ONNX / PyTorch latency per shape | ONNX at least as fast |",
        "|---|---|" + "---|" * len(s["shapes"]) + "---|---|---|",
    ]
    for model_name, res in result["models"].items():
        out.append(f"\n### {model_name} ({res['layers']} layers x {res['heads_per_layer']} heads)\n")
        out.append("| model | heads removed | heads per layer | parameters |")
        out.append("|---|---|---|---|")
        for label, v in res["variants"].items():
            out.append(
                f"| {label} | {100 * v['share_removed']:.0f}% | {' '.join(map(str, v['heads_per_layer']))} "
                f"| {v['parameters'] / 1e6:.1f} M |"
            )
        if res.get("onnx"):
            worst = max(o["max_abs_diff"] for o in res["onnx"].values())
            out.append(f"\nONNX exports checked against PyTorch (padded inputs, two shapes): max |diff| {worst:.1e}.\n")
        out.append(
            "\n| device | batch x seq | kernel | model | PyTorch ms (median) | IQR | seq/s | GMAC | floor-rel "
            "| (paired) | ONNX ms (median) | IQR | floor-rel | (paired) |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for run in res["runs"]:
            t, fr, frp = run["timings"], run["floor_relative"], run.get("floor_relative_paired", {})
            for label in res["variants"]:
                pt = t[label]
                ox = t.get(ONNX_PREFIX + label)
                out.append(
                    f"| {run['device']} | {run['batch']}x{run['seq']} | {run['kernel']} | {label} "
                    f"| {pt['median_ms']:.2f} | {pt['iqr_ms']:.2f} | {pt['sequences_per_s']:.1f} "
                    f"| {run['macs'][label] / 1e9:.2f} | {_f(fr.get(label))} | {_f(frp.get(label))} "
                    f"| {_f(ox['median_ms'] if ox else None)} | {_f(ox['iqr_ms'] if ox else None)} "
                    f"| {_f(fr.get(ONNX_PREFIX + label))} | {_f(frp.get(ONNX_PREFIX + label))} |"
                )
        cpu_runs = [r for r in res["runs"] if r["device"] == "cpu"]
        for label in res["variants"]:
            if label in (DENSE, NO_ATTENTION):
                continue
            cells, met, ratios, faster = [], [], [], []
            for b, q in s["shapes"]:
                run = next((r for r in cpu_runs if (r["batch"], r["seq"]) == (b, q)), None)
                c = goal_cell(run, label, res["variants"][label]["share_removed"]) if run else {}
                cell, verdict = "–", None
                if c.get("figure"):
                    x, ci, verdict = c["figure"]
                    cell = _fmt_figure(x, ci, GOALS.get((b, q)))
                if c.get("ratios"):
                    rx, rci, rverdict = c["ratios"]
                    cell += "; ratios " + _fmt_figure(rx, rci, GOALS.get((b, q)))
                    if verdict is not None:
                        verdict += f" (ratios: {rverdict})"
                cells.append(cell)
                if verdict is not None:
                    met.append(verdict)
                if c.get("onnx"):
                    ratio, ci, v = c["onnx"]
                    ratios.append(_fmt_figure(ratio, ci, 1.0))
                    faster.append(v)
            summary.append(
                f"| {model_name} | {label} | " + " | ".join(cells) + f" | {', '.join(met) or '–'} "
                f"| {', '.join(ratios) or '–'} | {', '.join(faster) or '–'} |"
            )
    out.append("\n### Floor-relative figure, PyTorch, CPU\n")
    out.append(
        "Goals: at least "
        + ", ".join(f"{g} at {b}x{q}" for (b, q), g in GOALS.items())
        + ", and the ONNX model at least as fast as the PyTorch one (ONNX / PyTorch latency at most 1, "
        "from the medians) at every shape. Brackets: 95% bootstrap interval over repetitions (runs that kept "
        "per-repetition times); a goal is *undecided* when that interval contains it: these runs cannot tell. "
        "**ratios**: the same figure from per-repetition ratios to the dense call, (1 − median(pruned / dense)) / "
        "((1 − median(no attention / dense)) × share). On this machine the noise is mostly a slowdown of "
        "whatever runs in the same seconds (at one thread, CPU time moved with wall time: not preemption); it "
        "cancels in those ratios, so their interval is usually the narrower. The verdict in parentheses is "
        "this estimate's. "
        "The ONNX / PyTorch ratio is paired only where both runtimes were interleaved (1 thread, runs from "
        "this version on); before, the ONNX models were timed after the PyTorch ones.\n"
    )
    out.extend(summary)
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's options: `BenchConfig`'s (with `DEFAULTS`), then what is timed and where it goes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["minilm-l6", "mpnet-base"])
    add_dataclass_args(p, DEFAULTS)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="pruned copies to time: 50 and 75 (%% of heads removed at random), empty (every other "
                   "layer emptied); default all three")
    p.add_argument("--sweep", action="store_true",
                   help="time h heads in every layer (all..1) and fit one block's cost: results/latency_sweep.json")
    p.add_argument("--name", default=None, help="results file stem (default latency, or latency_sweep with --sweep)")
    p.add_argument("--quick", action="store_true", help="smoke run: shapes 1x8,2x16, 3 repetitions, minilm-l6 only")
    return p


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = build_parser()
    args = p.parse_args()
    if args.quick and args.models == p.get_default("models"):
        args.models = ["minilm-l6"]
    torch.set_num_threads(args.threads)
    result = run(args)
    print(render({"meta": metadata(), **result}))


if __name__ == "__main__":
    main()
