"""The stages every prune pipeline shares: settings, data split, fine-tuned dense model, statistics, curve, knee.

`cahp.pipelines.prune` (heads only, the paper's method) calls them in the order
of docs/METHOD.md's step table; the joint (``--ffn``), embedding and decoder
pipelines reuse them. Every stage is cached by `cahp.pipelines.cache.StageCache`
(see `cahp.pipelines.prune` for the cache rules). Nothing here imports a pipeline,
so every pipeline can import this module.
"""


from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cahp.budget.curve import curve_score, default_grid, selection_curve
from cahp.budget.knee import KNEE_METHODS, KneeResult, find_knee
from cahp.core import distributed
from cahp.core.configs import field as cfg_field
from cahp.data.batching import encode, make_batches
from cahp.data.tasks import TASK_TYPES, available_tasks
from cahp.model.checkpoint import is_pruned_folder, load_pruned, save_pruned
from cahp.model.heads import kept_mask, mask_to_heads
from cahp.model.loading import load_model
from cahp.model.surgery import keep_heads
from cahp.pipelines.cache import StageCache
from cahp.pipelines.fingerprints import data_fingerprints, model_fingerprint
from cahp.pipelines.guard import (
    RunConflictError,
    check_identity,
    check_run,
    split_train,
)
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext
from cahp.selectors.gqa import KV_ALLOCATION_CHOICES, kv_allocation_rule
from cahp.selectors.graph import CLUSTERING_METHODS
from cahp.selectors.registry import make_selector
from cahp.stats.distances import DISTANCES
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import Signatures, collect_signatures
from cahp.train.evaluate import evaluate_task
from cahp.train.finetune import FinetuneConfig, finetune
from cahp.train.metrics import resolve_metric
from cahp.train.teacher import finetune_key, labels_only, teacher_key

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    """Settings of `cahp prune` (fine-tuning settings live in `FinetuneConfig`)."""

    model: str = cfg_field("minilm-l6", "model to prune: short name, folder or Hub id")
    task: str = cfg_field("sst5", f"built-in task ({', '.join(available_tasks())}) or folder of a user task")
    output_dir: str = cfg_field("", "output folder (default: runs/prune-MODEL-TASK)")
    data_dir: str = cfg_field("", "task data folder (default: $CAHP_DATA_DIR or ../shared/data)")
    text_column: str = cfg_field("text", "user tasks: the text column")
    text_pair_column: str = cfg_field("", "user tasks: the second text column of sentence pairs (empty: none)")
    label_column: str = cfg_field("label", "user tasks: the label column")
    task_type: str = cfg_field("auto", "user tasks: classification or regression (auto: from the labels)",
                               choices=["auto", *TASK_TYPES])
    finetuned: bool = cfg_field(False, "the model is already fine-tuned on the task: skip the first fine-tuning")
    allow_new_head: bool = cfg_field(False, "with --finetuned: accept a model whose classification head is new "
                                            "(untrained); without it that is an error")
    calibration_examples: int = cfg_field(1024, "training examples for signatures and salience")
    curve_examples: int = cfg_field(1000, "training examples held out to score the curve (not fine-tuned on)")
    distance: str = cfg_field("js", "head distance", choices=list(DISTANCES))
    clustering: str = cfg_field("spectral", "graph clustering", choices=list(CLUSTERING_METHODS))
    kernel: str = cfg_field("gaussian", "affinity kernel of the spectral graph", choices=["gaussian", "knn"])
    grid_step: int = cfg_field(0, "step of the k grid (0: about 18 points)")
    min_ratio: float = cfg_field(0.05, "smallest k on the grid, as a share of the heads")
    knee_method: str = cfg_field("chord", "knee rule on the fitted curve", choices=list(KNEE_METHODS))
    degree: int = cfg_field(0, "polynomial degree of the fit (0: automatic, smallest adequate degree 2..5)")
    keep: int = cfg_field(0, "keep exactly this many heads, 1..heads (overrides the knee; 0: unset)")
    keep_ratio: float = cfg_field(0.0, "keep this share of the heads, in (0, 1] (overrides the knee; 0: unset)")
    stats_batch_size: int = cfg_field(32, "batch size of the statistics passes")
    seed: int = cfg_field(0, "seed of data sampling, clustering and fine-tuning")
    overwrite: bool = cfg_field(False, "replace model/, report.json and the figures of a run with other settings "
                                       "(and a folder that holds another run)")
    skip_final_finetune: bool = cfg_field(False, "stop after surgery (no final fine-tuning)")
    ffn: bool = cfg_field(False, "prune FFN neurons together with heads (joint, CAHP-style)")
    target_speedup: float = cfg_field(0.0, "with --ffn: reach this estimated speedup instead of the knee (0: knee)")
    objective: str = cfg_field("task", "what pruning keeps: the task (labels), or without labels the dense model's "
                               "sentence embeddings (embedding: cosine distance, embedding-mse: squared error)",
                               choices=["task", "embedding", "embedding-mse"])
    text_file: str = cfg_field("", "--objective embedding: sentences to use instead of the task's training texts "
                                   "(a text file, one a line, or .jsonl)")
    similarity_task: str = cfg_field("stsb", "--objective embedding: sentence-pair regression task scored zero-shot "
                                             "(dev drives the knee, test is reported; none: fidelity only)")
    decoder_head: str = cfg_field("lm", "decoders (Llama family) only: lm prunes the causal LM by KV groups scored "
                                  "by held-out perplexity; classifier prunes it as a sequence classifier on the "
                                  "task's labels (LlamaForSequenceClassification: a new seeded score head on the "
                                  "last non-pad token, the pad token the tokenizer's, else eos), as encoders are "
                                  "pruned: query heads scored by accuracy, one fine-tuning, test accuracy (a KV "
                                  "head goes when all its query heads go); cahp compare likewise",
                                  choices=["lm", "classifier"])
    kv_allocation: str = cfg_field("auto", "decoders pruned by KV groups (--decoder-head lm) only: how CAHP "
                                   "spreads the KV-head budget over layers: salience gives each layer as many "
                                   "groups as the summed-salience ranking (gqa-gradient) keeps there and clusters "
                                   "within each layer (keeps layers whose groups look alike from being emptied); "
                                   "greedy takes the same counts and, within each layer, the most salient groups "
                                   "discounted by nearness to the groups taken; global clusters all groups of all "
                                   "layers into k (as encoders' heads); auto: "
                                   "greedy on such a decoder, nothing elsewhere",
                                   choices=list(KV_ALLOCATION_CHOICES))


@dataclass
class PruneResult:
    """Where `run_prune` wrote its outputs, and its report (the content of report.json)."""

    output_dir: Path
    report: dict = field(default_factory=dict)


@dataclass
class PreparedRun:
    """The stages every selection shares: data split, fine-tuned dense model, statistics.

    `cahp prune` and `cahp compare` both start from it, so they share the cache.
    """

    cfg: PruneConfig
    ft_cfg: FinetuneConfig
    out: Path
    task: object
    identity: dict
    stages: StageCache
    model: object
    tokenizer: object
    train_examples: list
    curve_examples: list
    calibration_examples: list
    calibration_batches: list
    curve_batches: list
    curve_labels: np.ndarray
    signatures: Signatures
    gate_stats: dict
    dense_info: dict
    stats: HeadStats
    keys: dict
    metric: str = "accuracy"

    @property
    def ks(self) -> list[int]:
        """The curve's grid of kept-head counts, from all heads down."""
        return default_grid(self.stats.n, self.cfg.grid_step, self.cfg.min_ratio)

    def context(self) -> SelectionContext:
        """What data-driven selectors may use: the dense model and the calibration batches."""
        return SelectionContext(model=self.model, batches=self.calibration_batches, seed=self.cfg.seed)


def prepare_run(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool = True,
                task=None) -> PreparedRun:
    """Steps 0-2 and the salience: fine-tuned dense model, signatures, distances, salience (cached).

    ``task``: the checked task of `cahp.pipelines.guard.check_run` (checked here when None). Collective
    under torchrun (joins the process group if needed); rank 0 creates ``out``.
    """
    distributed.init()
    if task is None:
        task, ft_cfg, _ = check_run(cfg, ft_cfg)
    metric = resolve_metric(ft_cfg.metric, task.task_type, task.num_labels)
    distributed.on_main(out.mkdir, parents=True, exist_ok=True)
    identity = {
        "model": cfg.model, "task": task.name, "data_dir": str(task.data_dir), "finetuned": cfg.finetuned,
        "curve_examples": cfg.curve_examples, "calibration_examples": cfg.calibration_examples,
        "seed": cfg.seed, "finetune": finetune_key(labels_only(ft_cfg)),
    }
    if cfg.decoder_head != "lm":  # a decoder pruned as a classifier (encoders keep the identity they always had)
        identity["kind"] = f"{cfg.decoder_head}-decoder"
    if task.name.startswith("csv:") or cfg.task_type != "auto":  # how a user task's files are read
        identity["columns"] = {"text": cfg.text_column, "text_pair": cfg.text_pair_column or None,
                               "label": cfg.label_column, "task_type": task.task_type}
    # what the stages read: the starting model's files and each split's data (rank 0's digests)
    data_fp = data_fingerprints(task)
    fps = distributed.broadcast_object({"model": model_fingerprint(cfg.model), **data_fp})
    distributed.on_main(check_identity, out, identity, cfg.overwrite, fps)
    eval_splits = [task.test_split, *task.extra_eval_splits]
    trained = {**identity, "model_files": fps["model"], "train_data": fps[task.train_split],
               "dev_data": fps[task.dev_split]}
    eval_data = {s: fps[s] for s in eval_splits}
    stages = StageCache(out / "stages")
    train_all = task.load(task.train_split)
    curve_idx, calib_idx, train_idx = split_train(len(train_all), cfg.curve_examples, cfg.calibration_examples,
                                                  cfg.seed)
    curve_ex = [train_all[i] for i in curve_idx]
    calib_ex = [train_all[i] for i in calib_idx]
    train_ex = [train_all[i] for i in train_idx]

    model, tok, dense_info = finetuned_dense_model(cfg, ft_cfg, task, trained, stages, train_ex, progress)
    dense_info["test"] = stages.get_or_compute(
        "evaluate_dense", {**trained, "stage": "evaluate_dense", "eval_data": eval_data},
        lambda: evaluate_task(model, tok, task, max_length=ft_cfg.max_length, seed=cfg.seed, keep_predictions=True,
                              progress=progress))
    dense_info["test"] = {s: r for s, r in dense_info["test"].items() if not s.startswith("_")}
    pad = tok.pad_token_id or 0
    calib_batches = make_batches(encode(tok, calib_ex, ft_cfg.max_length), cfg.stats_batch_size, shuffle=False,
                                 pad_token_id=pad)
    sig_key = {**trained, "stage": "signatures", "distance": cfg.distance, "batch": cfg.stats_batch_size}
    sig = signatures(model, calib_batches, cfg.distance, sig_key, stages, progress)
    sal_key = {**trained, "stage": "salience", "batch": cfg.stats_batch_size}
    sal = salience(model, calib_batches, sal_key, stages, progress)

    curve_ds = encode(tok, curve_ex, ft_cfg.max_length)
    curve_batches = make_batches(curve_ds, ft_cfg.eval_batch_size, shuffle=False, pad_token_id=pad)
    n_layers, n_heads = kept_mask(model).shape
    stats = HeadStats(
        head_ids=sig.head_ids, shape=(n_layers, n_heads), distances=sig.distances,
        salience=sal["salience"], fisher=sal["fisher"], entropy=sig.entropy,
    )
    return PreparedRun(
        cfg=cfg, ft_cfg=ft_cfg, out=out, task=task, identity=identity, stages=stages, model=model,
        tokenizer=tok, train_examples=train_ex, curve_examples=curve_ex, calibration_examples=calib_ex,
        calibration_batches=calib_batches, curve_batches=curve_batches, curve_labels=np.asarray(curve_ds.labels),
        signatures=sig, gate_stats=sal, dense_info=dense_info, stats=stats,
        keys={"signatures": sig_key, "salience": sal_key, "eval_data": eval_data, "fingerprints": fps},
        metric=metric,
    )


def finetuned_dense_model(cfg: PruneConfig, ft_cfg: FinetuneConfig, task, identity: dict, stages: StageCache,
                          train_examples: list, progress: bool):
    """Step 0: (model, tokenizer, info) of the dense model fine-tuned on ``train_examples`` (unless
    ``cfg.finetuned``); saved under ``stages/finetuned`` and reloaded from there (``prepare_run`` adds its
    test scores, a stage of their own keyed by the test files)."""
    dense_dir = stages.root / "finetuned"
    device = distributed.device()
    made = {}

    def compute() -> dict:
        model, tok = load_model(cfg.model, num_labels=task.num_labels, seed=cfg.seed)
        distributed.sync_module(model.to(device))  # e.g. a new classifier: rank 0's on every rank
        info = {"finetuned_by_cahp": not cfg.finetuned}
        if not cfg.finetuned:
            # epochs done survive an interruption (a dense mpnet-base fine-tuning on a CPU takes hours)
            epochs = stages.epoch_checkpoint("finetune_dense", {"stage": "finetune_dense", **identity})
            # the dense model is the teacher of any distillation after pruning: it learns from the labels only
            info["finetune"] = finetune(model, tok, task, labels_only(ft_cfg), train_examples=train_examples,
                                        checkpoint=epochs, progress=progress).to_dict()
        distributed.on_main(save_pruned, model, tok, dense_dir)
        made["model"] = model, tok
        return info

    info = stages.get_or_compute("finetune_dense", identity, compute, artifact=dense_dir / "config.json")
    if "model" in made:
        return (*made["model"], info)
    if distributed.is_main():
        model, tok = load_pruned(dense_dir)
    else:  # same architecture; rank 0's cached weights are broadcast below
        model, tok = load_model(cfg.model, num_labels=task.num_labels, seed=cfg.seed)
    distributed.sync_module(model.to(device))
    return model, tok, info


def signatures(model, batches: list, distance: str, key: dict, stages: StageCache, progress: bool) -> Signatures:
    """Steps 1-2: every head's attention signatures on the calibration batches and their ``distance``."""
    state = stages.get_or_compute(
        f"signatures-{distance}", key, tensors=True, label="signatures",
        compute=lambda: collect_signatures(model, batches, kinds=(distance,), progress=progress).state_dict())
    return Signatures.from_state_dict(state)


def salience(model, batches: list, key: dict, stages: StageCache, progress: bool) -> dict:
    """Salience (mean |dL/dgate|, step 5's ranking) and Fisher (mean (dL/dgate)^2) of every head, (L, H) each."""
    return stages.get_or_compute("salience", key, lambda: gate_gradients(model, batches, progress=progress),
                                 tensors=True)


def selector_settings(cfg: PruneConfig) -> dict:
    """The run's settings that selectors may take (CAHP's distance, clustering and graph kernel; the KV-group
    CAHP's ``kv_allocation``, a field no other selector has; ``"auto"`` is its default, ``"salience"``)."""
    return {"distance": cfg.distance, "clustering": cfg.clustering, "kernel": cfg.kernel,
            "kv_allocation": kv_allocation_rule(cfg.kv_allocation)}


def cahp_selector(cfg: PruneConfig) -> HeadSelector:
    """Steps 3-5 as one selector: affinity graph, clustering into k groups, each group's most salient head."""
    return make_selector("cahp", cfg.seed, shared=selector_settings(cfg))


def curve_name(selector: HeadSelector) -> str:
    """The stage name of ``selector``'s curve (one per selector of a run)."""
    return f"curve-{selector.tag}"


def curve(run: PreparedRun, selector: HeadSelector, progress: bool = True) -> dict:
    """Step 6: ``selector``'s S(k) over the run's grid on the held-out curve data (stage `curve_name`).

    Returns the `cahp.budget.curve.selection_curve` record: ``{"points", "seconds"}`` (and the cache's fields).
    """
    ks = run.ks
    key = {**run.keys["signatures"], **run.keys["salience"], "stage": "curve", "method": selector.name,
           "selector": selector.settings(), "ks": ks}
    if run.metric != "accuracy":  # accuracy curves keep the key they always had
        key["metric"] = run.metric
    return run.stages.get_or_compute(
        curve_name(selector), key, label="curve",
        compute=lambda: selection_curve(run.model, selector, run.stats, ks, run.curve_batches, run.curve_labels,
                                        run.context(), progress=progress, metric=run.metric))


def find_k_star(points: list[dict], cfg: PruneConfig) -> KneeResult:
    """Step 6, knee: k* of the polynomial fit to a curve's points, with ``cfg``'s degree and knee rule."""
    knee = find_knee([p["k"] for p in points], [curve_score(p) for p in points],
                     degree=cfg.degree or None, method=cfg.knee_method)
    if knee.warning:
        log.warning("knee: %s", knee.warning)
    return knee


def final_budget(cfg: PruneConfig, knee: KneeResult, n: int) -> tuple[int, str]:
    """(heads to keep, where that number comes from): ``--keep``, ``--keep-ratio`` or the knee."""
    if cfg.keep:
        k, source = cfg.keep, "--keep"
    elif cfg.keep_ratio:
        k, source = max(1, round(cfg.keep_ratio * n)), "--keep-ratio"
    else:
        k, source = knee.k, "knee"
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep {k} heads: the model has {n}; choose 1..{n}")
    log.info("k* = %d (knee), keeping %d heads (%s)", knee.k, k, source)
    return k, source


def surgery_and_finetune(run: PreparedRun, mask: torch.Tensor, progress: bool):
    """Steps 7-8: (pruned model, scores) of a copy of the dense model keeping the heads of ``mask``,
    evaluated, fine-tuned once (unless ``skip_final_finetune``) and evaluated again; saved as ``OUTPUT/model``."""
    cfg, ft_cfg, task, tok = run.cfg, run.ft_cfg, run.task, run.tokenizer
    kept = mask_to_heads(mask)
    pruned = copy.deepcopy(run.model)
    keep_heads(pruned, kept)
    model_dir = run.out / "model"
    made = {}

    def compute() -> dict:
        scores = {"test_after_pruning": evaluate_task(pruned, tok, task, max_length=ft_cfg.max_length, seed=cfg.seed,
                                                      progress=progress)}
        if not cfg.skip_final_finetune:
            scores["finetune"] = finetune(pruned, tok, task, ft_cfg, train_examples=run.train_examples,
                                          checkpoint=run.stages.epoch_checkpoint("final", key),
                                          teacher=run.model, progress=progress).to_dict()
            scores["test_after_finetune"] = evaluate_task(pruned, tok, task, max_length=ft_cfg.max_length,
                                                          seed=cfg.seed, progress=progress)
        distributed.on_main(save_pruned, pruned, tok, model_dir)
        made["model"] = pruned
        return scores

    key = {**run.keys["salience"], "stage": "final", "eval_data": run.keys["eval_data"], "kept": kept,
           "skip_final_finetune": cfg.skip_final_finetune, **teacher_key(ft_cfg)}
    scores = run.stages.get_or_compute("final", key, compute, label="surgery_and_finetune", artifact=model_dir,
                                       artifact_check=is_pruned_folder)
    if "model" in made:
        return pruned, scores
    if distributed.is_main():
        pruned, _ = load_pruned(model_dir)
    # the other ranks keep their surgery of the same heads and get rank 0's weights
    distributed.sync_module(pruned.to(distributed.device()))
    return pruned, scores


__all__ = ["PreparedRun", "PruneConfig", "PruneResult", "RunConflictError", "cahp_selector", "curve", "curve_name",
           "final_budget", "find_k_star", "finetuned_dense_model", "prepare_run", "salience", "selector_settings",
           "signatures", "split_train", "surgery_and_finetune"]
