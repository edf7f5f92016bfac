"""`cahp prune --objective embedding --ffn`: heads and FFN neurons pruned together on an embedding model, no labels.

The steps of `cahp prune --ffn` (`cahp.pipelines.joint`) on the dense model and
texts of `cahp prune --objective embedding` (`cahp.pipelines.embedding`); only
the objective differs, and it enters through three parameters of the shared steps:

- the loss of the neuron pass (`cahp.pipelines.joint.neuron_stats`: head and
  neuron salience, neuron correlations) is the embedding pipeline's salience loss,
  the embedding distance to the dense model's sentence embeddings moved by seeded
  noise (`cahp.pipelines.embedding.salience_loss`; at the unperturbed targets the
  loss and its gradient are 0 at the dense model);
- the joint curve's held-out score through head and neuron gates is the
  embedding curve's score (`cahp.pipelines.embedding.score_gates`): dev-split
  Spearman of the similarity task when one is given, held-out fidelity to the
  dense embeddings otherwise (`EmbeddingRun.knee_score`); each point records both;
- the one fine-tuning after surgery is the embedding pipeline's distillation with
  its early stopping (`cahp.pipelines.embedding.surgery_and_distill`), then its
  evaluation (the similarity task's test split zero-shot, held-out fidelity) and
  its throughput, beside the measured speedup of `cahp prune --ffn`.

Caches: the dense targets, signatures and run identity are the embedding
pipeline's (``OUTPUT/run.json``); the neuron statistics' key holds the loss, the
curve's key the neuron statistics, the cost tables, the ``--ffn`` settings
(linkage, head weights, grid) and the score; the final stage's key the kept heads
and neurons, and its ``model/`` counts only while it holds exactly those units.

Outputs: ``OUTPUT/model`` (a sentence-transformers folder), ``report.json`` (the
embedding report's scores and the joint report's structure and speedups),
``curve.png``, ``heads.png``, ``structure.png``, ``distances.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cahp.core import distributed
from cahp.core.io import environment
from cahp.pipelines import joint_report
from cahp.pipelines.embedding import (
    SALIENCE_TARGET_NOISE,
    EmbeddingRun,
    dense_scores,
    prepare_embedding,
    report_fields,
    salience_loss,
    score_gates,
    summary,
    surgery_and_distill,
    throughput,
)
from cahp.pipelines.embedding_eval import ThroughputConfig, throughput_config
from cahp.pipelines.joint import JointRun, build_joint, check_settings, choose_selection, dense_counts
from cahp.pipelines.joint_config import JointConfig
from cahp.pipelines.stages import PruneConfig, PruneResult
from cahp.train.finetune import FinetuneConfig

log = logging.getLogger(__name__)

__all__ = ["embedding_joint_run", "run_embedding_joint"]


def embedding_joint_run(run: EmbeddingRun, joint: JointConfig, progress: bool = True) -> JointRun:
    """The `JointRun` of an embedding model: neuron statistics from the salience loss, the curve scored by
    the embedding curve's score through head and neuron gates (see the module docstring)."""

    def gate_score(head_gates: torch.Tensor, neuron_gates: torch.Tensor) -> dict:
        point = score_gates(run, head_gates, neuron_gates)
        return {**point, "score": point[run.knee_score]}

    loss = salience_loss(run.targets["calibration"], run.settings, run.distance, run.cfg.seed)
    return build_joint(run, joint, progress, loss_fn=loss,
                       loss_key={"embedding_distance": run.distance, "noise": SALIENCE_TARGET_NOISE},
                       gate_score=gate_score, score_key={"embedding": run.knee_score})


def run_embedding_joint(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool = True,
                        joint: JointConfig | None = None,
                        throughput_cfg: ThroughputConfig | None = None) -> PruneResult:
    """`cahp prune --objective embedding --ffn` (see the module docstring); returns the report on every rank.

    ``throughput_cfg``: how the final throughput is measured (None: `cahp.pipelines.embedding_eval.default_throughput`).
    """
    joint = joint or JointConfig()
    throughput_cfg = throughput_config(throughput_cfg)
    check_settings(cfg, joint)  # bad --ffn settings fail before any work
    t_total = time.perf_counter()
    run = prepare_embedding(cfg, ft_cfg, out, progress)  # texts, dense targets, signatures, head salience
    jr = embedding_joint_run(run, joint, progress)
    before = dense_counts(run.model)
    choice = choose_selection(jr, cfg, progress)
    dense = dense_scores(run)
    pruned, final, final_key = surgery_and_distill(run, choice.heads, progress, neurons=choice.neurons)
    speedup = joint_report.measured_speedup(run, final_key, joint)
    speed = throughput(run, pruned, {"heads": choice.heads, "neurons": choice.neurons}, throughput_cfg)
    fields = report_fields(run, dense, final, speed, throughput_cfg)
    points = choice.points
    report = {
        **fields,
        "settings": {**fields["settings"], "joint": asdict(joint)},
        **joint_report.joint_fields(choice, tables=jr.tables, pruned=pruned, speedup=speedup, before=before,
                                    target_speedup=cfg.target_speedup, score_name="score"),
        "curve_score": {"dense": points[0]["accuracy"] if points[0]["target_share"] == 1.0 else None,
                        "selected": choice.chosen["accuracy"]},
        "stage_seconds": run.stages.times,
        "total_seconds": round(time.perf_counter() - t_total, 1),
        "environment": environment(),
    }
    report = distributed.broadcast_object(report)
    # the curve's score (under "accuracy" in its points) is the embedding curve's: dev Spearman or fidelity
    ylabel = "dev Spearman (similarity task)" if run.similarity else "held-out fidelity (mean cosine)"
    distributed.on_main(joint_report.write_outputs, run, report, points, choice.knee,
                        f"{cfg.model} / {cfg.objective}", ylabel=ylabel)
    log.info("done: %s", summary(report))
    return PruneResult(output_dir=out, report=report)
