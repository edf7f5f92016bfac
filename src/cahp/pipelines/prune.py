"""`cahp prune`: CAHP end to end, in the order of the paper's steps (docs/METHOD.md's step table).

`run_prune` (its body, `_run`) reads top to bottom as those steps:

- 0. `finetuned_dense_model`: fine-tune the dense model (unless it already is);
- 1-2. `signatures`: attention signatures of every head and their distances;
- `salience`: |dL/dgate| of every head (used by step 5);
- 3-5. `cahp_selector`: graph, clustering and representatives, one selection per budget;
- 6. `curve` and `find_k_star`: S(k) on held-out training data, and the knee k*;
- 7-8. `surgery_and_finetune`: remove the other heads, fine-tune once, evaluate.

Each stage reads its cached result from ``OUTPUT/stages/`` when the settings it
depends on are unchanged, and writes it atomically when it computes it
(`cahp.pipelines.cache.StageCache`). So an interrupted run resumes at the first
unfinished stage, and a re-run with another knee rule, clustering or ``--keep``
reuses the fine-tuned model, signatures and salience. ``OUTPUT/run.json``
records the settings that define the run (model, task, columns, data split,
fine-tuning); an output folder holding another run is refused unless
``overwrite`` is set.

Cache rules: every stage's key holds, beside its settings, the SHA-256 of the
task's data files it read (`cahp.pipelines.fingerprints`: the train file for
fine-tuning, statistics and the curve, the test files for evaluations) and of
the starting model's files, so an edited file re-runs exactly the stages that
depend on it. ``model/``, ``report.json`` and the figures of a run made with
other final settings (``--keep``, ``--knee-method``, clustering, ...) are only
replaced with ``overwrite`` (`cahp.pipelines.guard.check_final_settings`);
cached statistics stay reusable either way. ``OUTPUT/.cahp.lock`` (pid, host,
start time) refuses a second run in the same folder; a lock left by a killed
run is taken over with a warning. Everything is checked before work
(`cahp.pipelines.guard.check_run`: every split parsed, every option against the
task and the model's config), and a run that fails before producing anything
leaves no new folder behind.

Data: a fixed, seeded sample of the training split is held out for the curve
(``curve_examples``, never used to fine-tune when cahp does the fine-tuning) and
another for calibration (``calibration_examples``). The dev split selects the
best fine-tuning epoch; the test split is only scored, never used for a choice.

Under ``torchrun`` (see `cahp.core.distributed`) every rank runs this same code on its
share of the batches; rank 0 alone reads and writes ``OUTPUT`` (caches, models,
report, figures, log) and broadcasts what it read, models included (its weights
are broadcast into the other ranks' copies), so the other ranks never touch the
output folder and no shared file system is needed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cahp.budget.curve import curve_score, score_mask
from cahp.budget.knee import KneeResult
from cahp.core import distributed
from cahp.core.io import environment, write_json
from cahp.model.heads import kept_heads, kept_mask, mean_relative_depth, num_kept
from cahp.model.surgery import count_parameters
from cahp.pipelines import decoder, plots
from cahp.pipelines.embedding import run_embedding
from cahp.pipelines.embedding_joint import run_embedding_joint
from cahp.pipelines.guard import (
    RunConflictError,
    check_final_settings,
    check_run,
    output_folder,
    split_train,
)
from cahp.pipelines.joint import run_joint
from cahp.pipelines.stages import (
    PreparedRun,
    PruneConfig,
    PruneResult,
    cahp_selector,
    curve,
    curve_name,
    final_budget,
    find_k_star,
    prepare_run,
    selector_settings,
    surgery_and_finetune,
)
from cahp.train.finetune import FinetuneConfig

log = logging.getLogger(__name__)


def run_prune(cfg: PruneConfig, ft_cfg: FinetuneConfig | None = None, progress: bool = True,
              joint=None, throughput_cfg=None) -> PruneResult:
    """Run the whole CAHP pipeline; see the module docstring. Returns the report (on every rank).

    ``joint``: the `cahp.pipelines.joint_config.JointConfig` of ``--ffn`` (default: its defaults).
    ``throughput_cfg``: the `cahp.pipelines.embedding_eval.ThroughputConfig` of ``--objective embedding``'s
    final throughput (default: `cahp.pipelines.embedding_eval.default_throughput`).
    """
    distributed.init()
    ft_cfg = ft_cfg or FinetuneConfig(seed=cfg.seed)
    task = None
    if not decoder.prunes_as_lm(cfg) and cfg.objective == "task":  # the other pipelines check their own inputs
        task, ft_cfg, _ = check_run(cfg, ft_cfg)  # everything that can fail before work fails here
    out = Path(cfg.output_dir)
    distributed.on_main(check_final_settings, out, cfg, ft_cfg)
    with output_folder(out, distributed.is_main()):  # log.txt, the lock, no new folder left by an early error
        result = _run(cfg, ft_cfg, out, progress, task, joint, throughput_cfg)
        distributed.barrier()
        return result


def _run(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool, task=None,
         joint=None, throughput_cfg=None) -> PruneResult:
    if decoder.prunes_as_lm(cfg):  # causal LMs: KV-group CAHP by perplexity (--decoder-head classifier: below)
        return decoder.run_decoder(cfg, ft_cfg, out, progress)
    if cfg.objective != "task":  # label-free, on sentence embeddings (heads only, or with --ffn neurons too)
        if cfg.ffn:
            return run_embedding_joint(cfg, ft_cfg, out, progress, joint, throughput_cfg)
        return run_embedding(cfg, ft_cfg, out, progress, throughput_cfg)
    if cfg.ffn:  # heads and FFN neurons together
        return run_joint(cfg, ft_cfg, out, progress, joint)
    t_total = time.perf_counter()
    run = prepare_run(cfg, ft_cfg, out, progress, task)  # steps 0-2 and the salience
    params_before, heads_before = count_parameters(run.model), num_kept(run.model)
    selector = cahp_selector(cfg)  # steps 3-5
    points = curve(run, selector, progress)["points"]  # step 6
    knee = find_k_star(points, cfg)
    k_final, k_source = final_budget(cfg, knee, run.stats.n)
    mask = distributed.broadcast_object(selector.select(k_final, run.stats, run.context()))
    held_pre = score_mask(run.model, mask, run.curve_batches, run.curve_labels, metric=run.metric)
    pruned, final = surgery_and_finetune(run, mask, progress)  # steps 7-8

    head_mask = kept_mask(pruned)
    test_split = run.task.test_split
    report = {
        "model": cfg.model,
        "task": run.task.name,
        "task_type": run.task.task_type,
        "metric": run.metric,
        "columns": run.identity.get("columns"),
        "fingerprints": run.keys["fingerprints"],
        "settings": {"prune": asdict(cfg), "finetune": asdict(ft_cfg)},
        "data": {"train": len(run.train_examples) + len(run.curve_examples),
                 "finetune_examples": len(run.train_examples) if not cfg.finetuned else None,
                 "curve_examples": len(run.curve_examples), "calibration_examples": len(run.calibration_examples),
                 "calibration_rows": run.signatures.rows, "test_split": test_split},
        "heads_before": heads_before,
        "k_star": knee.k,
        "heads_kept": int(head_mask.sum()),
        "k_source": k_source,
        "knee": knee.to_dict(),
        "curve": [{"k": p["k"], **({"accuracy": p["accuracy"]} if "accuracy" in p else {}),
                   "score": curve_score(p), "metric": p.get("metric", "accuracy")} for p in points],
        "kept_heads": kept_heads(pruned),
        "heads_per_layer": head_mask.sum(1).tolist(),
        "mean_relative_depth": mean_relative_depth(head_mask),
        "scores": {
            "before_pruning": {k: {m: v for m, v in r.items() if m != "predictions"}
                               for k, r in run.dense_info["test"].items()},
            "after_pruning": final["test_after_pruning"],
            "after_finetune": final.get("test_after_finetune"),
            "heldout_accuracy_dense": points[0].get("accuracy") if points[0]["k"] == run.stats.n else None,
            "heldout_accuracy_selected": held_pre if run.metric == "accuracy" else None,
            "heldout_score_dense": curve_score(points[0]) if points[0]["k"] == run.stats.n else None,
            "heldout_score_selected": held_pre,
        },
        "parameters": {"before": params_before, "after": count_parameters(pruned)},
        "stage_seconds": run.stages.times,
        "total_seconds": round(time.perf_counter() - t_total, 1),
        "environment": environment(),
    }
    report = distributed.broadcast_object(report)
    distributed.on_main(_write_outputs, run, report, points, knee, head_mask)
    b, a, f = (report["scores"][s] for s in ("before_pruning", "after_pruning", "after_finetune"))
    m = run.metric
    log.info(
        "done: %d -> %d heads, %d -> %d parameters; %s %s %.4f -> %.4f (pruned) -> %s (fine-tuned)",
        heads_before, report["heads_kept"], params_before, report["parameters"]["after"], test_split, m,
        b[test_split][m], a[test_split][m], f"{f[test_split][m]:.4f}" if f else "-",
    )
    return PruneResult(output_dir=out, report=report)


def _write_outputs(run: PreparedRun, report: dict, points: list[dict], knee: KneeResult,
                   head_mask: torch.Tensor) -> None:
    """report.json and the figures (rank 0)."""
    cfg, out, sig = run.cfg, run.out, run.signatures
    write_json(out / "report.json", report)
    title = f"{cfg.model} / {run.task.name}"
    per_layer = [sum(1 for layer, _ in sig.head_ids if layer == i) for i in range(run.stats.shape[0])]
    key = "score" if all("score" in p for p in points) else "accuracy"  # curves cached before scores had a metric
    plots.plot_curve(points, knee.to_dict(), out / "curve.png", title=title, key=key,
                     ylabel=f"held-out {report.get('metric', 'accuracy')}")
    plots.plot_heads(head_mask.numpy(), out / "heads.png",
                     title=f"{title}: {int(head_mask.sum())} of {report['heads_before']} heads kept")
    plots.plot_distances(sig.distances[cfg.distance].numpy(), per_layer, out / "distances.png",
                         title=f"{cfg.distance} distance between heads")


__all__ = ["PreparedRun", "PruneConfig", "PruneResult", "RunConflictError", "cahp_selector", "curve", "curve_name",
           "final_budget", "find_k_star", "prepare_run", "run_prune", "selector_settings", "split_train"]
