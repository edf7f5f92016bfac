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

import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cahp.budget.curve import curve_score, default_grid, score_mask, selection_curve
from cahp.budget.knee import KNEE_METHODS, KneeResult, find_knee
from cahp.core import distributed
from cahp.core.configs import field as cfg_field
from cahp.core.io import environment, write_json
from cahp.data.batching import encode, make_batches
from cahp.data.tasks import TASK_TYPES, available_tasks
from cahp.model.checkpoint import is_pruned_folder, load_pruned, save_pruned
from cahp.model.heads import kept_heads, kept_mask, mask_to_heads, mean_relative_depth, num_kept
from cahp.model.loading import load_model
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines import plots
from cahp.pipelines.cache import StageCache
from cahp.pipelines.fingerprints import data_fingerprints, model_fingerprint
from cahp.pipelines.guard import (
    RunConflictError,
    check_final_settings,
    check_identity,
    check_run,
    output_folder,
    split_train,
)
from cahp.selectors.base import HeadSelector, HeadStats, SelectionContext
from cahp.selectors.graph import CLUSTERING_METHODS
from cahp.selectors.registry import make_selector
from cahp.stats.distances import DISTANCES
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import Signatures, collect_signatures
from cahp.train.evaluate import evaluate_task
from cahp.train.finetune import FinetuneConfig, finetune
from cahp.train.metrics import resolve_metric

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


@dataclass
class PruneResult:
    """Where `run_prune` wrote its outputs, and its report (the content of report.json)."""

    output_dir: Path
    report: dict = field(default_factory=dict)


def run_prune(cfg: PruneConfig, ft_cfg: FinetuneConfig | None = None, progress: bool = True) -> PruneResult:
    """Run the whole CAHP pipeline; see the module docstring. Returns the report (on every rank)."""
    distributed.init()
    ft_cfg = ft_cfg or FinetuneConfig(seed=cfg.seed)
    from cahp.pipelines import decoder  # (it imports this module)

    task = None
    if cfg.objective == "task" and not decoder.is_causal(cfg.model):  # the other pipelines check their own inputs
        task, ft_cfg, _ = check_run(cfg, ft_cfg)  # everything that can fail before work fails here
    out = Path(cfg.output_dir)
    distributed.on_main(check_final_settings, out, cfg, ft_cfg)
    with output_folder(out, distributed.is_main()):  # log.txt, the lock, no new folder left by an early error
        result = _run(cfg, ft_cfg, out, progress, task)
        distributed.barrier()
        return result


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
        "seed": cfg.seed, "finetune": asdict(ft_cfg),
    }
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
            info["finetune"] = finetune(model, tok, task, ft_cfg, train_examples=train_examples,
                                        progress=progress).to_dict()
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
    """The run's settings that selectors may take (CAHP's distance, clustering and graph kernel)."""
    return {"distance": cfg.distance, "clustering": cfg.clustering, "kernel": cfg.kernel}


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
                                          progress=progress).to_dict()
            scores["test_after_finetune"] = evaluate_task(pruned, tok, task, max_length=ft_cfg.max_length,
                                                          seed=cfg.seed, progress=progress)
        distributed.on_main(save_pruned, pruned, tok, model_dir)
        made["model"] = pruned
        return scores

    key = {**run.keys["salience"], "stage": "final", "eval_data": run.keys["eval_data"], "kept": kept,
           "skip_final_finetune": cfg.skip_final_finetune}
    scores = run.stages.get_or_compute("final", key, compute, label="surgery_and_finetune", artifact=model_dir,
                                       artifact_check=is_pruned_folder)
    if "model" in made:
        return pruned, scores
    if distributed.is_main():
        pruned, _ = load_pruned(model_dir)
    # the other ranks keep their surgery of the same heads and get rank 0's weights
    distributed.sync_module(pruned.to(distributed.device()))
    return pruned, scores


def _run(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool, task=None) -> PruneResult:
    from cahp.pipelines import decoder  # causal LMs: KV-group CAHP scored by perplexity (it imports this module)

    if decoder.is_causal(cfg.model):
        return decoder.run_decoder(cfg, ft_cfg, out, progress)
    if cfg.objective != "task":  # label-free, on sentence embeddings: cahp.pipelines.embedding (imports this module)
        from cahp.pipelines.embedding import run_embedding

        return run_embedding(cfg, ft_cfg, out, progress)
    if cfg.ffn:  # heads and FFN neurons together: cahp.pipelines.joint (imported here: it imports this module)
        from cahp.pipelines.joint import run_joint

        return run_joint(cfg, ft_cfg, out, progress)
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
