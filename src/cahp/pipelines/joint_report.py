"""What `cahp prune --ffn` measures and writes after the surgery: measured speedup, report.json, figures.

`measure_speedup` times the dense model and the saved pruned folder
interleaved round-robin (`cahp.bench.timing.time_round_robin`: a slow stretch
of the machine hits both alike) at each shape, with one thread by default, and
gives the ratio of the median latencies, dense / pruned, with the 95%
bootstrap interval of repetitions resampled jointly (`cahp.bench.figures.ratio_ci`).
The attention kernel is the dense model's fastest at that shape, used by both.
"""

from __future__ import annotations

import copy
import logging
import statistics
from dataclasses import asdict

import torch
from torch import nn

from cahp.bench.config import BenchConfig, parse_shapes
from cahp.bench.figures import ratio_ci, summarize
from cahp.bench.timing import apply_allocator, choose_kernel, make_inputs, time_models, torch_runner
from cahp.bench.variants import prepare_for_inference
from cahp.budget.cost import CostTable, cost_summary, estimated_latency
from cahp.core import distributed
from cahp.core.io import environment, write_json
from cahp.core.threads import num_threads
from cahp.model.checkpoint import load_pruned
from cahp.model.heads import kept_heads, kept_mask, mean_relative_depth, model_shape
from cahp.model.neurons import encode_kept_neurons, kept_neurons, neuron_shape
from cahp.model.surgery import count_parameters
from cahp.pipelines import plots

log = logging.getLogger(__name__)

__all__ = ["build_report", "estimated_speedups", "joint_fields", "log_summary", "measure_speedup", "measured_speedup",
           "write_outputs"]


def estimated_speedups(tables: list[CostTable], heads_per_layer, neurons_per_layer) -> dict[str, float]:
    """``{"BxS": 1 / estimated share}`` of a selection, one entry per table."""
    return {f"{t.batch}x{t.seq}": 1 / estimated_latency(t, heads_per_layer, neurons_per_layer) for t in tables}


def measure_speedup(dense: nn.Module, pruned: nn.Module, shapes, budget: float, threads: int = 1,
                    seed: int = 0) -> dict:
    """``{"BxS": {"speedup", "ci95", "dense_ms", "pruned_ms", "reps", "kernel"}}``: dense / pruned latency.

    Neither model is changed (copies are timed on the CPU). ``budget``: seconds
    of timing per shape (at least 10 repetitions).
    """
    cfg = BenchConfig(shapes=",".join(f"{b}x{s}" for b, s in parse_shapes(shapes)), device="cpu", threads=threads,
                      budget=budget, seed=seed)
    with num_threads(threads):  # the caller's count is back afterwards, also on an error
        allocator = apply_allocator(cfg.hold_memory)
        d = prepare_for_inference(copy.deepcopy(dense).cpu())
        p = prepare_for_inference(copy.deepcopy(pruned).cpu())
        out = {}
        for batch, seq in cfg.shape_list:
            inputs = make_inputs(d, batch, seq, seed=seed)
            kernel, _ = choose_kernel([d, p], cfg.kernel, inputs, None, cfg.warmup, {}, cfg.clock)
            times = time_models({"dense": torch_runner(d, inputs), "pruned": torch_runner(p, inputs)}, cfg)
            med_d, med_p = statistics.median(times["dense"]), statistics.median(times["pruned"])
            out[f"{batch}x{seq}"] = {
                "speedup": med_d / med_p,
                "ci95": ratio_ci(times["dense"], times["pruned"], seed=seed),
                "dense_ms": summarize(times["dense"], batch, seq)["median_ms"],
                "pruned_ms": summarize(times["pruned"], batch, seq)["median_ms"],
                "reps": len(times["dense"]), "kernel": kernel, "threads": threads, "allocator": allocator,
            }
            log.info("measured speedup at %dx%d: %.2fx (95%% %.2f-%.2f, %d repetitions)", batch, seq,
                     med_d / med_p, *out[f"{batch}x{seq}"]["ci95"], len(times["dense"]))
        return out


def measured_speedup(run, final_key: dict, joint) -> dict | None:
    """`measure_speedup` of ``OUTPUT/model`` against the dense model, as a cached stage (None if not asked)."""
    if not joint.speedup_budget:
        return None
    shapes = parse_shapes(joint.cost_shapes)
    key = {**final_key, "stage": "speedup", "shapes": shapes, "budget": joint.speedup_budget,
           "threads": joint.speedup_threads}

    def compute() -> dict:
        def timed():
            pruned, _ = load_pruned(run.out / "model", with_tokenizer=False)
            return measure_speedup(run.model, pruned, shapes, joint.speedup_budget, joint.speedup_threads,
                                   seed=run.cfg.seed)

        return {"shapes": distributed.broadcast_object(distributed.on_main(timed))}

    return run.stages.get_or_compute("speedup-ffn", key, compute, label="speedup")["shapes"]


#: The entries of a joint curve point that the report lists first (the rest: the scorer's details).
_POINT_KEYS = ("target_share", "estimated_share", "accuracy", "head_weight", "heads_per_layer", "neurons_per_layer")


def _curve_entry(p: dict, score_name: str) -> dict:
    """A curve point for report.json, its held-out score (``accuracy`` in the curve) named ``score_name``."""
    entry = {(score_name if k == "accuracy" else k): p[k] for k in _POINT_KEYS}
    entry.update({k: v for k, v in p.items() if k not in _POINT_KEYS and k != "candidates"})
    entry["candidates"] = [{(score_name if k == "accuracy" else k): v for k, v in c.items()} for c in p["candidates"]]
    return entry


def joint_fields(choice, *, tables, pruned, speedup, before, target_speedup, score_name: str = "accuracy") -> dict:
    """The report's joint part, the same for every objective: units before and kept, the knee, the curve
    (its score named ``score_name``), the kept structure, estimated and measured speedups, parameters.

    ``choice``: the `cahp.pipelines.joint.JointChoice`; ``before``: `cahp.pipelines.joint.dense_counts`.
    """
    points, share_star = choice.points, choice.share_star
    head_mask = kept_mask(pruned)
    n_layers, d_ff = neuron_shape(pruned.config)
    kept_n = kept_neurons(pruned.config)
    neurons_per_layer = [len(kept_n[i]) for i in range(n_layers)]
    heads_per_layer = head_mask.sum(1).tolist()
    knee_point = next(p for p in points if p["estimated_share"] == share_star)
    return {
        "ffn": True,
        "heads_before": before["heads"],
        "neurons_before": before["neurons"],
        "k_star": sum(knee_point["heads_per_layer"]) + sum(knee_point["neurons_per_layer"]),
        "share_star": share_star,
        "k_source": choice.source,
        "target_speedup": target_speedup or None,
        "heads_kept": int(head_mask.sum()),
        "neurons_kept": sum(neurons_per_layer),
        "head_weight": choice.chosen["head_weight"],
        "knee": choice.knee.to_dict(),
        "curve": [_curve_entry(p, score_name) for p in points],
        "kept_heads": kept_heads(pruned),
        "heads_per_layer": heads_per_layer,
        "kept_neurons": encode_kept_neurons(kept_n, d_ff, n_layers),
        "neurons_per_layer": neurons_per_layer,
        "mean_relative_depth": mean_relative_depth(head_mask),
        "estimated_share": estimated_latency_mean(tables, heads_per_layer, neurons_per_layer),
        "estimated_speedup": estimated_speedups(tables, heads_per_layer, neurons_per_layer),
        "measured_speedup": speedup,
        "cost_tables": {shape: {"source": tables[0].source, **v}
                        for shape, v in cost_summary(tables)["per_shape"].items()},
        "parameters": {"before": before["parameters"], "after": count_parameters(pruned)},
    }


def build_report(run, joint, choice, *, tables, pruned, final, speedup, before, seconds) -> dict:
    """report.json of a joint run on a task: heads-only's keys, plus neurons, estimated and measured speedups."""
    cfg, ft_cfg = run.cfg, run.ft_cfg
    points = choice.points
    dense_point = points[0] if points and points[0]["target_share"] == 1.0 else None
    return {
        "model": cfg.model,
        "task": run.task.name,
        "task_type": run.task.task_type,
        "metric": run.metric,  # of the curve (its points keep it under "accuracy") and of the summary
        "settings": {"prune": asdict(cfg), "finetune": asdict(ft_cfg), "joint": asdict(joint)},
        "data": {"train": len(run.train_examples) + len(run.curve_examples),
                 "finetune_examples": len(run.train_examples) if not cfg.finetuned else None,
                 "curve_examples": len(run.curve_examples), "calibration_examples": len(run.calibration_examples),
                 "calibration_rows": run.signatures.rows, "test_split": run.task.test_split},
        **joint_fields(choice, tables=tables, pruned=pruned, speedup=speedup, before=before,
                       target_speedup=cfg.target_speedup),
        "scores": {
            "before_pruning": {k: {m: v for m, v in r.items() if m != "predictions"}
                               for k, r in run.dense_info["test"].items()},
            "after_pruning": final["test_after_pruning"],
            "after_finetune": final.get("test_after_finetune"),
            "heldout_accuracy_dense": dense_point["accuracy"] if dense_point else None,
            "heldout_accuracy_selected": choice.chosen["accuracy"],
        },
        "stage_seconds": run.stages.times,
        "total_seconds": round(seconds, 1),
        "environment": environment(),
    }


def estimated_latency_mean(tables: list[CostTable], heads_per_layer, neurons_per_layer) -> float:
    """Mean estimated share over ``tables`` (the budget axis of the curve)."""
    return sum(estimated_latency(t, heads_per_layer, neurons_per_layer) for t in tables) / len(tables)


def write_outputs(run, report: dict, points: list[dict], knee, title: str = "", ylabel: str = "accuracy") -> None:
    """report.json, curve.png, heads.png, structure.png, distances.png (rank 0).

    ``title``: what the figures are of (default: the model and the run's task);
    ``ylabel``: what the curve's held-out score is (its points keep it under "accuracy").
    """
    out, cfg = run.out, run.cfg
    write_json(out / "report.json", report)
    title = f"{title or f'{cfg.model} / {run.task.name}'} (heads + FFN neurons)"
    plots.plot_joint_curve(points, knee.to_dict(), report["share_star"], out / "curve.png", title=title,
                           ylabel=ylabel)
    n_layers, n_heads = model_shape(run.model.config)
    mask = torch.zeros(n_layers, n_heads)
    for layer, hs in report["kept_heads"].items():
        mask[int(layer), hs] = 1
    plots.plot_heads(mask.numpy(), out / "heads.png",
                     title=f"{title}: {report['heads_kept']} of {report['heads_before']} heads kept")
    d_ff = neuron_shape(run.model.config)[1]
    plots.plot_kept_structure(report["heads_per_layer"], [n_heads] * n_layers, report["neurons_per_layer"],
                              [d_ff] * n_layers, out / "structure.png",
                              title=f"{title}: kept structure per layer")
    sig = run.signatures
    per_layer = [sum(1 for layer, _ in sig.head_ids if layer == i) for i in range(n_layers)]
    plots.plot_distances(sig.distances[cfg.distance].numpy(), per_layer, out / "distances.png",
                         title=f"{cfg.distance} distance between heads")


def log_summary(report: dict) -> None:
    """One log line: kept units, estimated and measured speedups, the test metric before / after."""
    split, metric = report["data"]["test_split"], report.get("metric", "accuracy")
    b, a, f = (report["scores"][s] for s in ("before_pruning", "after_pruning", "after_finetune"))
    measured = report["measured_speedup"] or {}
    log.info(
        "done: %d -> %d heads, %d -> %d neurons (share %.3f, %s); estimated speedup %s; measured %s; "
        "%s %s %.4f -> %.4f (pruned) -> %s (fine-tuned)",
        report["heads_before"], report["heads_kept"], report["neurons_before"], report["neurons_kept"],
        report["estimated_share"], report["k_source"],
        ", ".join(f"{k} {v:.2f}x" for k, v in report["estimated_speedup"].items()),
        ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in measured.items()) or "-", split, metric,
        b[split][metric], a[split][metric], f"{f[split][metric]:.4f}" if f else "-",
    )
