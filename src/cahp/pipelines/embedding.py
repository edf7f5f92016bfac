"""`cahp prune --objective embedding`: CAHP for a sentence-transformers embedding model, without labels.

The dense model is the packaged encoder itself (it is already the embedding
model: no first fine-tuning), and every loss is the distance of the gated or
pruned model's sentence embedding from the dense model's (`cahp.train.objectives`;
``--objective embedding`` is the cosine distance, ``embedding-mse`` the squared error).
`run_embedding` reads top to bottom as the steps of docs/METHOD.md:

- text: unlabeled sentences from ``--text-file`` or the ``--task``'s training
  split (labels ignored, `cahp.data.text`), split seeded into held-out curve
  text, calibration text and the rest (`cahp.pipelines.prune.split_train`);
- `teacher`: the dense embeddings of every text, computed once, the targets of every later loss;
- 1-2. signatures and distances on the calibration text, as for a task;
- salience: |dL/dgate| of the embedding loss (step 5's ranking). At the dense
  model the loss is at its minimum (0) and so is its gradient, so the targets
  of this pass are the dense embeddings perturbed by seeded Gaussian noise
  (`SALIENCE_TARGET_NOISE` of each embedding's norm): the gradient then
  measures how strongly each head moves the embedding, and its mean square is
  the Fisher information of the gates under a Gaussian model of the
  embedding (targets drawn around the model's own output, the true Fisher
  rather than the empirical one, which needs labels);
- 3-5. CAHP's selection through the registry;
- 6. `embedding_curve`: every budget's held-out fidelity (mean cosine to the
  dense embeddings of the curve text) and, with a similarity task
  (``--similarity-task``, default ``stsb``), its dev-split Spearman (never the
  test split). The knee is the usual rule on the similarity task's dev
  Spearman when one is given, since it measures what embedding users rank by
  and fidelity can fall without changing rankings; on fidelity otherwise
  (``--similarity-task none``: nothing labelled is read at all);
- 7-8. `surgery_and_distill`: remove the other heads and fine-tune once by
  distillation (`cahp.train.distill`), early stopping on held-out fidelity;
- evaluation: the similarity task's test split (STS-B: the GLUE dev file),
  zero-shot, for the dense model, after pruning and after distillation
  (Spearman and Pearson with bootstrap intervals, the paired difference from
  the dense model), and held-out fidelity;
- `throughput`: measured sentences per second of the dense and the pruned
  encoder on the held-out sentences (by default 1 and 2 threads, batch 32 and 1;
  a caller passes its own `cahp.pipelines.embedding_eval.ThroughputConfig`, which
  is in the stage's cache key and the report's ``settings.throughput``).

With ``--ffn`` the same dense model, texts, targets and signatures feed the joint
(heads + FFN neurons) pipeline instead (`cahp.pipelines.embedding_joint`).

Outputs: ``OUTPUT/model`` (a sentence-transformers folder, `cahp.save_pruned`),
``report.json``, ``curve.png``, ``heads.png``, ``distances.png``; every stage is
cached under ``OUTPUT/stages`` (`cahp.pipelines.cache.StageCache`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cahp.budget.curve import default_grid
from cahp.budget.knee import KneeResult
from cahp.core import distributed
from cahp.core.io import environment, machine_label, read_json, write_json
from cahp.data.batching import EncodedDataset, make_batches
from cahp.data.tasks import get_task
from cahp.data.text import encode_texts, read_text_file, task_texts
from cahp.model.checkpoint import load_pruned, save_pruned
from cahp.model.gates import head_gates
from cahp.model.heads import kept_heads, kept_mask, mask_to_heads, mean_relative_depth, num_kept
from cahp.model.loading import load_model
from cahp.model.neuron_surgery import keep_neurons
from cahp.model.neurons import neuron_gates, neuron_shape
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines import plots
from cahp.pipelines.cache import StageCache, fingerprint
from cahp.pipelines.embedding_eval import (
    SimilaritySet,
    ThroughputConfig,
    encoding_throughput,
    load_similarity_task,
    throughput_config,
)
from cahp.pipelines.joint import kept_check
from cahp.pipelines.stages import (
    PruneConfig,
    PruneResult,
    cahp_selector,
    final_budget,
    find_k_star,
    signatures,
    split_train,
)
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext, check_mask
from cahp.stats.salience import gate_gradients
from cahp.train.distill import distill
from cahp.train.finetune import FinetuneConfig
from cahp.train.objectives import EmbeddingLoss, fidelity, sentence_settings, teacher_embeddings
from cahp.train.teacher import finetune_key

log = logging.getLogger(__name__)

__all__ = ["EMBEDDING_OBJECTIVES", "SALIENCE_TARGET_NOISE", "EmbeddingRun", "dense_scores", "embedding_curve",
           "prepare_embedding", "report_fields", "run_embedding", "salience_loss", "score_gates", "sentence_length",
           "summary", "surgery_and_distill", "throughput"]

#: ``--objective`` values of the embedding pipeline and the embedding distance each one uses.
EMBEDDING_OBJECTIVES = {"embedding": "cosine", "embedding-mse": "mse"}
#: Standard deviation of the salience pass's target noise, relative to each dense embedding's norm.
SALIENCE_TARGET_NOISE = 0.1
#: ``--similarity-task`` values that turn the labelled similarity task off.
NO_SIMILARITY = ("", "none")


class EmbeddingPipelineError(ValueError):
    """Settings the embedding pipeline cannot run with."""


@dataclass
class EmbeddingRun:
    """What every stage after the statistics shares: the dense encoder, the texts, their targets, the statistics."""

    cfg: PruneConfig
    ft_cfg: FinetuneConfig
    out: Path
    identity: dict
    stages: StageCache
    model: object
    tokenizer: object
    settings: dict
    distance: str
    source: str
    datasets: dict  # "curve", "calibration", "train" -> EncodedDataset (no labels)
    curve_texts: list  # the held-out texts themselves (real sentence lengths for the throughput)
    targets: dict  # the same names -> (n, D) dense embeddings
    curve_batches: list
    calibration_batches: list
    similarity: dict  # "dev", "test" -> SimilaritySet; empty without a similarity task
    signatures: object
    stats: HeadStats
    keys: dict

    @property
    def ks(self) -> list[int]:
        """The curve's grid of kept-head counts, from all heads down."""
        return default_grid(self.stats.n, self.cfg.grid_step, self.cfg.min_ratio)

    @property
    def knee_score(self) -> str:
        """The curve score the knee is read from: the similarity task's dev Spearman, else fidelity."""
        return "similarity_dev_spearman" if self.similarity else "fidelity"

    def context(self) -> SelectionContext:
        """What data-driven selectors may use: the dense model and the calibration batches."""
        return SelectionContext(model=self.model, batches=self.calibration_batches, seed=self.cfg.seed)


def _check_identity(out: Path, identity: dict, overwrite: bool) -> None:
    """``OUTPUT/run.json``: the settings that define the run; a folder holding another run is refused."""
    path = out / "run.json"
    if path.is_file():
        old = {k: v for k, v in read_json(path).items() if k != "fingerprints"}
        if old != json.loads(json.dumps(identity, default=str)):
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            if not overwrite:
                raise EmbeddingPipelineError(f"{out} holds a run with other settings ({', '.join(diff)} differ); "
                                             "choose another --output-dir or pass --overwrite")
            log.warning("overwriting %s: it held a run with other settings (%s)", out, ", ".join(diff))
            shutil.rmtree(out / "stages", ignore_errors=True)
    write_json(path, identity)


def _texts(cfg: PruneConfig) -> tuple[list[str], str]:
    """(unique texts, where they come from): ``cfg.text_file``, else the task's training split."""
    if cfg.text_file:
        return read_text_file(cfg.text_file), str(Path(cfg.text_file).resolve())
    task = get_task(cfg.task, data_dir=cfg.data_dir or None)
    return task_texts(task), f"task {task.name} ({task.train_split} split, labels ignored)"


def _subset(ds: EncodedDataset, idx: list[int]) -> EncodedDataset:
    return EncodedDataset(features=[ds.features[i] for i in idx], labels=[])


def prepare_embedding(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool = True) -> EmbeddingRun:
    """Text, dense targets, signatures and embedding salience of the dense encoder (each stage cached)."""
    if cfg.objective not in EMBEDDING_OBJECTIVES:
        raise EmbeddingPipelineError(f"objective {cfg.objective!r} is not one of {', '.join(EMBEDDING_OBJECTIVES)}")
    if ft_cfg.kd_alpha:
        raise EmbeddingPipelineError("--kd-alpha distils a classifier's outputs; the embedding objective's "
                                     "fine-tuning is a distillation already")
    distributed.on_main(out.mkdir, parents=True, exist_ok=True)
    distance = EMBEDDING_OBJECTIVES[cfg.objective]
    texts, source = _texts(cfg)
    sim_name = "" if cfg.similarity_task.lower() in NO_SIMILARITY else cfg.similarity_task
    sim_task = load_similarity_task(sim_name, cfg.data_dir or None) if sim_name else None
    identity = {
        "objective": cfg.objective, "model": cfg.model, "texts": source, "texts_fingerprint": fingerprint(texts),
        "curve_examples": cfg.curve_examples, "calibration_examples": cfg.calibration_examples,
        "max_length": ft_cfg.max_length, "seed": cfg.seed,
        "similarity_task": sim_task.name if sim_task else None,
        "similarity_data": str(sim_task.data_dir) if sim_task else None,
    }
    distributed.on_main(_check_identity, out, identity, cfg.overwrite)
    stages = StageCache(out / "stages")
    curve_idx, calib_idx, train_idx = split_train(len(texts), cfg.curve_examples, cfg.calibration_examples, cfg.seed)
    if ft_cfg.max_train_examples and ft_cfg.max_train_examples < len(train_idx):
        # the distillation's seeded subset (as `finetune` samples it), chosen here so only it needs targets
        keep = np.random.default_rng(ft_cfg.seed).permutation(len(train_idx))[: ft_cfg.max_train_examples]
        train_idx = [train_idx[i] for i in sorted(keep.tolist())]

    model, tok = load_model(cfg.model, kind="encoder", seed=cfg.seed)
    model.to(distributed.device())
    settings = sentence_settings(model)
    pad = tok.pad_token_id or 0
    needed = sorted(set(curve_idx) | set(calib_idx) | set(train_idx))
    used = encode_texts(tok, [texts[i] for i in needed], ft_cfg.max_length)
    # one pass of the dense model over every text used: the targets of salience, curve and distillation alike
    key = {**identity, "stage": "teacher", "max_train_examples": ft_cfg.max_train_examples, "ft_seed": ft_cfg.seed}
    teacher = stages.get_or_compute("teacher", key, tensors=True, compute=lambda: {
        "embeddings": teacher_embeddings(model, make_batches(used, ft_cfg.eval_batch_size, shuffle=False,
                                                             pad_token_id=pad), len(used), settings)})
    where = {t: j for j, t in enumerate(needed)}  # text position -> row of ``used`` and of the targets
    names = {"curve": curve_idx, "calibration": calib_idx, "train": train_idx}
    datasets = {k: _subset(used, [where[i] for i in idx]) for k, idx in names.items()}
    targets = {k: teacher["embeddings"][torch.as_tensor([where[i] for i in idx], dtype=torch.long)]
               for k, idx in names.items()}
    calib_batches = make_batches(datasets["calibration"], cfg.stats_batch_size, shuffle=False, pad_token_id=pad)
    curve_batches = make_batches(datasets["curve"], ft_cfg.eval_batch_size, shuffle=False, pad_token_id=pad)

    sig_key = {**identity, "stage": "signatures", "distance": cfg.distance, "batch": cfg.stats_batch_size}
    sig = signatures(model, calib_batches, cfg.distance, sig_key, stages, progress)
    sal_key = {**identity, "stage": "salience", "batch": cfg.stats_batch_size, "noise": SALIENCE_TARGET_NOISE}
    noisy = salience_loss(targets["calibration"], settings, distance, cfg.seed)
    sal = stages.get_or_compute("salience-embedding", sal_key, tensors=True, label="salience", compute=lambda: (
        gate_gradients(model, calib_batches, progress=progress, loss_fn=noisy)))

    similarity = {}
    if sim_task is not None:
        max_len = sentence_length(settings, ft_cfg)
        for split in ("dev", "test"):
            name = sim_task.dev_split if split == "dev" else sim_task.test_split
            similarity[split] = SimilaritySet(sim_task.load(name), tok, max_len, ft_cfg.eval_batch_size, pad)
    n_layers, n_heads = kept_mask(model).shape
    stats = HeadStats(head_ids=sig.head_ids, shape=(n_layers, n_heads), distances=sig.distances,
                      salience=sal["salience"], fisher=sal["fisher"], entropy=sig.entropy)
    return EmbeddingRun(
        cfg=cfg, ft_cfg=ft_cfg, out=out, identity=identity, stages=stages, model=model, tokenizer=tok,
        settings=settings, distance=distance, source=source, datasets=datasets,
        curve_texts=[texts[i] for i in curve_idx], targets=targets,
        curve_batches=curve_batches, calibration_batches=calib_batches, similarity=similarity, signatures=sig,
        stats=stats, keys={"signatures": sig_key, "salience": sal_key},
    )


def score_gates(run: EmbeddingRun, gates: torch.Tensor, neuron_gate_values: torch.Tensor | None = None) -> dict:
    """Held-out fidelity and (with a similarity task) dev Spearman of the dense model gated by ``gates`` (L, H)
    and, if given, FFN neuron gates ``neuron_gate_values`` (L, d_ff)."""
    with ExitStack() as stack:
        stack.enter_context(head_gates(run.model, init=gates.float()))
        if neuron_gate_values is not None:
            stack.enter_context(neuron_gates(run.model, init=neuron_gate_values.float()))
        point = {"fidelity": fidelity(run.model, run.curve_batches, run.targets["curve"], run.settings)}
        if run.similarity:
            point["similarity_dev_spearman"] = run.similarity["dev"].spearman(run.model, run.settings)
    return point


def salience_loss(targets: torch.Tensor, settings: dict, distance: str, seed: int) -> EmbeddingLoss:
    """The loss of the salience passes (heads, and with ``--ffn`` neurons): the embedding ``distance`` to the
    dense embeddings ``targets`` (N, D) moved by seeded noise (`SALIENCE_TARGET_NOISE`; see the module docstring)."""
    return EmbeddingLoss(targets, settings, distance, target_noise=SALIENCE_TARGET_NOISE, seed=seed)


def embedding_curve(run: EmbeddingRun, selector: HeadSelector, progress: bool = True) -> dict:
    """Step 6: ``selector``'s fidelity (and dev Spearman) for every k of the grid, through gates (cached).

    Returns ``{"points": [{"k", "score", "fidelity", ["similarity_dev_spearman"], "kept"}], "seconds"}``,
    ``score`` being the value the knee is read from (`EmbeddingRun.knee_score`).
    """
    ks = run.ks
    key = {**run.keys["signatures"], **run.keys["salience"], **run.identity, "stage": "curve",
           "method": selector.name, "selector": selector.settings(), "ks": ks}

    def compute() -> dict:
        t0, points = time.perf_counter(), []
        for k in ks:
            mask, gates = distributed.broadcast_object(selector.select_gates(int(k), run.stats, run.context()))
            check_mask(mask, int(k), run.stats)
            point = {"k": int(k), **score_gates(run, gates), "kept": mask_to_heads(mask)}
            point["score"] = point[run.knee_score]
            log.info("k=%d: fidelity %.4f%s", k, point["fidelity"],
                     f", dev Spearman {point['similarity_dev_spearman']:.4f}" if run.similarity else "")
            points.append(point)
        return {"points": points, "seconds": {"total": time.perf_counter() - t0}}

    return run.stages.get_or_compute(f"curve-embedding-{selector.tag}", key, compute, label="curve")


def _similarity_scores(run: EmbeddingRun, model) -> dict:
    """Test-split scores of ``model`` on the similarity task (with predictions), or {} without one."""
    if not run.similarity:
        return {}
    return {"similarity_test": run.similarity["test"].evaluate(model, run.settings, seed=run.cfg.seed)}


def dense_scores(run: EmbeddingRun) -> dict:
    """The dense model's similarity-task test scores (cached; fidelity is 1 by definition)."""
    key = {**run.identity, "stage": "dense_scores"}
    return run.stages.get_or_compute("dense_scores", key, lambda: {"heldout_fidelity": 1.0,
                                                                    **_similarity_scores(run, run.model)})


def surgery_and_distill(run: EmbeddingRun, kept: dict, progress: bool = True, neurons: dict | None = None):
    """Steps 7-8: (pruned encoder, scores, cache key): surgery, scores, one distillation (unless skipped), scores
    again; the pruned encoder saved as ``OUTPUT/model`` (a sentence-transformers folder).

    ``kept``: {layer: heads to keep}; ``neurons``: {layer: FFN neurons to keep} (``--ffn``; None: all).
    """
    cfg, ft_cfg = run.cfg, run.ft_cfg
    pruned = copy.deepcopy(run.model)
    keep_heads(pruned, kept)
    if neurons is not None:
        keep_neurons(pruned, neurons)
    model_dir = run.out / "model"
    loss = EmbeddingLoss(run.targets["train"], run.settings, run.distance)
    made = {}

    def scores_now() -> dict:
        return {"heldout_fidelity": fidelity(pruned, run.curve_batches, run.targets["curve"], run.settings),
                **_similarity_scores(run, pruned)}

    def compute() -> dict:
        result = {"after_pruning": scores_now()}
        if not cfg.skip_final_finetune:
            pad = run.tokenizer.pad_token_id or 0
            once = dataclasses.replace(ft_cfg, max_train_examples=0)  # the subset was taken before the targets
            result["distillation"] = distill(pruned, run.datasets["train"], run.targets["train"], run.curve_batches,
                                             run.targets["curve"], loss, once, pad, progress,
                                             checkpoint=run.stages.epoch_checkpoint(stage, key)).to_dict()
            result["after_distillation"] = scores_now()
        distributed.on_main(save_pruned, pruned, run.tokenizer, model_dir)
        made["model"] = pruned
        return result

    key = {**run.identity, "stage": "final", "kept": kept, "skip": cfg.skip_final_finetune,
           "distill": finetune_key(ft_cfg) if not cfg.skip_final_finetune else None}
    if neurons is not None:  # heads-only runs keep the key they always had
        key["kept_neurons"] = neurons
    # the folder must hold exactly these units: another run's model/ (heads only, or other neurons) is no hit
    check = kept_check(kept, neurons, neuron_shape(pruned.config)[1])
    stage = "final-embedding" if neurons is None else "final-embedding-ffn"
    scores = run.stages.get_or_compute(stage, key, compute,
                                       label="surgery_and_distill", artifact=model_dir, artifact_check=check)
    if "model" not in made:
        if distributed.is_main():
            pruned, _ = load_pruned(model_dir)
            pruned = getattr(pruned, pruned.base_model_prefix, pruned)
        distributed.sync_module(pruned.to(distributed.device()))
    return pruned, scores, key


def sentence_length(settings: dict, ft_cfg: FinetuneConfig) -> int:
    """Tokens per sentence at most when encoding: the sentence-transformers config's ``max_seq_length``, else
    the fine-tuning's ``max_length``."""
    return (settings.get("sentence_bert_config") or {}).get("max_seq_length") or ft_cfg.max_length


def throughput(run: EmbeddingRun, pruned, kept: dict, config: ThroughputConfig | None = None) -> dict:
    """Measured encoding throughput of the dense and the pruned encoder on the held-out texts (rank 0; cached
    per machine), measured as ``config`` says (None: `cahp.pipelines.embedding_eval.default_throughput`). See
    `cahp.pipelines.embedding_eval.encoding_throughput`."""
    config = throughput_config(config)
    max_len = sentence_length(run.settings, run.ft_cfg)
    # every measurement setting is in the key: a cached throughput is never one measured otherwise
    key = {**run.identity, "stage": "throughput", "kept": kept, "settings": config.key(), "machine": machine_label()}
    return run.stages.get_or_compute("throughput", key, lambda: distributed.on_main(
        encoding_throughput, {"dense": run.model, "pruned": pruned}, run.tokenizer, run.curve_texts, run.settings,
        max_len, run.cfg.seed, config))


def _strip(scores: dict | None) -> dict | None:
    """Scores without the per-pair predictions (kept in the stage cache, not in report.json)."""
    if scores is None:
        return None
    return {k: ({m: x for m, x in v.items() if m != "predictions"} if isinstance(v, dict) else v)
            for k, v in scores.items()}


def _versus_dense(run: EmbeddingRun, dense: dict, scores: dict | None) -> dict | None:
    """Paired bootstrap of the similarity test Spearman and Pearson, ``scores`` minus dense, over the test pairs."""
    if not run.similarity or not scores:
        return None
    a, b = scores["similarity_test"]["predictions"], dense["similarity_test"]["predictions"]
    return {m: run.similarity["test"].paired(a, b, m, seed=run.cfg.seed) for m in ("spearman", "pearson")}


def report_fields(run: EmbeddingRun, dense: dict, final: dict, speed: dict, speed_cfg: ThroughputConfig) -> dict:
    """The report's embedding part, heads-only or ``--ffn``: objective, texts, settings (the throughput's
    ``speed_cfg`` among them), data, the scores of the dense, pruned and distilled encoder (and the paired
    differences from dense), distillation, throughput."""
    cfg = run.cfg
    return {
        "objective": cfg.objective,
        "embedding_distance": run.distance,
        "model": cfg.model,
        "texts": run.source,
        "similarity_task": run.identity.get("similarity_task"),
        # "finetune": the settings of the distillation (the same dataclass; the key other reports use)
        "settings": {"prune": asdict(cfg), "finetune": asdict(run.ft_cfg),
                     "salience_target_noise": SALIENCE_TARGET_NOISE, "throughput": speed_cfg.key()},
        "data": {**{f"{k}_texts": len(ds) for k, ds in run.datasets.items()},
                 **{f"similarity_{k}_pairs": len(s) for k, s in run.similarity.items()},
                 "calibration_rows": run.signatures.rows},
        "knee_score": run.knee_score,
        "scores": {"dense": _strip(dense), "after_pruning": _strip(final["after_pruning"]),
                   "after_distillation": _strip(final.get("after_distillation"))},
        "versus_dense": {"after_pruning": _versus_dense(run, dense, final["after_pruning"]),
                         "after_distillation": _versus_dense(run, dense, final.get("after_distillation"))},
        "distillation": final.get("distillation"),
        "throughput": {k: v for k, v in speed.items() if not k.startswith("_")},
    }


def run_embedding(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool = True,
                  throughput_cfg: ThroughputConfig | None = None) -> PruneResult:
    """The whole embedding pipeline (see the module docstring); returns the report on every rank.

    ``throughput_cfg``: how the final throughput is measured (None: `cahp.pipelines.embedding_eval.default_throughput`).
    """
    throughput_cfg = throughput_config(throughput_cfg)
    if cfg.ffn:  # a heads-only result must never stand in for a joint one
        raise EmbeddingPipelineError("run_embedding prunes heads only; --ffn runs "
                                     "cahp.pipelines.embedding_joint.run_embedding_joint")
    t_total = time.perf_counter()
    run = prepare_embedding(cfg, ft_cfg, out, progress)  # text, targets, steps 1-2, salience
    params_before, heads_before = count_parameters(run.model), num_kept(run.model)
    selector = cahp_selector(cfg)  # steps 3-5
    points = embedding_curve(run, selector, progress)["points"]  # step 6
    knee = find_k_star(points, cfg)
    k_final, k_source = final_budget(cfg, knee, run.stats.n)
    mask = distributed.broadcast_object(selector.select(k_final, run.stats, run.context()))
    dense = dense_scores(run)
    pruned, final, _ = surgery_and_distill(run, mask_to_heads(mask), progress)  # steps 7-8
    head_mask = kept_mask(pruned)
    speed = throughput(run, pruned, mask_to_heads(mask), throughput_cfg)
    report = {
        **report_fields(run, dense, final, speed, throughput_cfg),
        "heads_before": heads_before,
        "k_star": knee.k,
        "heads_kept": int(head_mask.sum()),
        "k_source": k_source,
        "knee": knee.to_dict(),
        "curve": [{k: v for k, v in p.items() if k != "kept"} for p in points],
        "kept_heads": kept_heads(pruned),
        "heads_per_layer": head_mask.sum(1).tolist(),
        "mean_relative_depth": mean_relative_depth(head_mask),
        "parameters": {"before": params_before, "after": count_parameters(pruned)},
        "stage_seconds": run.stages.times,
        "total_seconds": round(time.perf_counter() - t_total, 1),
        "environment": environment(),
    }
    report = distributed.broadcast_object(report)
    distributed.on_main(_write_outputs, run, report, points, knee, head_mask)
    log.info("done: %s", summary(report))
    return PruneResult(output_dir=out, report=report)


def summary(report: dict) -> str:
    """One line: heads (and FFN neurons) kept, parameters, fidelity and similarity test Spearman, dense ->
    pruned -> distilled, throughput (and with ``--ffn`` the estimated and measured speedups)."""
    s = report["scores"]
    last = s["after_distillation"] or s["after_pruning"]
    if report.get("ffn"):
        measured = ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in (report["measured_speedup"] or {}).items())
        kept = (f"kept {report['heads_kept']} of {report['heads_before']} heads and {report['neurons_kept']} of "
                f"{report['neurons_before']} FFN neurons (estimated share {report['estimated_share']:.3f}, "
                f"{report['k_source']} on {report['knee_score']}; measured speedup {measured or '-'})")
    else:
        kept = (f"kept {report['heads_kept']} of {report['heads_before']} heads (k* = {report['k_star']} on "
                f"{report['knee_score']})")
    line = (f"{report['model']} ({report['objective']}): {kept}, parameters "
            f"{report['parameters']['before']:,} -> {report['parameters']['after']:,}; held-out fidelity "
            f"{s['after_pruning']['heldout_fidelity']:.4f} (pruned) -> {last['heldout_fidelity']:.4f}")
    if "similarity_test" in s["dense"]:
        line += (f"; {report['similarity_task']} test Spearman {s['dense']['similarity_test']['spearman']:.4f} "
                 f"(dense) -> {s['after_pruning']['similarity_test']['spearman']:.4f} (pruned) -> "
                 f"{last['similarity_test']['spearman']:.4f}")
    t = (report.get("throughput") or {}).get("t1_b32")
    if t:
        line += (f"; 1 thread, batch 32: {t['dense']['sentences_per_s']:.0f} -> {t['pruned']['sentences_per_s']:.0f} "
                 f"sentences/s ({t['speedup']['pruned']:.2f}x)")
    return line


def _write_outputs(run: EmbeddingRun, report: dict, points: list[dict], knee: KneeResult, head_mask) -> None:
    """report.json and the figures (rank 0)."""
    out, sig, cfg = run.out, run.signatures, run.cfg
    write_json(out / "report.json", report)
    title = f"{cfg.model} / {cfg.objective}"
    ylabel = "dev Spearman (similarity task)" if run.similarity else "held-out fidelity (mean cosine)"
    plots.plot_curve(points, knee.to_dict(), out / "curve.png", title=title, key="score", ylabel=ylabel)
    plots.plot_heads(head_mask.numpy(), out / "heads.png",
                     title=f"{title}: {int(head_mask.sum())} of {report['heads_before']} heads kept")
    per_layer = [sum(1 for layer, _ in sig.head_ids if layer == i) for i in range(run.stats.shape[0])]
    plots.plot_distances(sig.distances[cfg.distance].numpy(), per_layer, out / "distances.png",
                         title=f"{cfg.distance} distance between heads")
