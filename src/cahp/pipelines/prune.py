"""`cahp prune` end to end: fine-tune, signatures, salience, curve, knee, surgery, fine-tune once.

Each stage reads its cached result from ``OUTPUT/stages/`` when the settings it
depends on are unchanged, and writes it atomically when it computes it. So an
interrupted run resumes at the first unfinished stage, and a re-run with another
knee rule, clustering or ``--keep`` reuses the fine-tuned model, signatures and
salience. ``OUTPUT/run.json`` records the settings that define the run (model,
task, data split, fine-tuning); an output folder holding another run is refused
unless ``overwrite`` is set.

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
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cahp.budget.curve import default_grid, score_mask, selection_curve
from cahp.budget.knee import KNEE_METHODS, find_knee
from cahp.core import distributed
from cahp.core.configs import field as cfg_field
from cahp.core.io import add_log_file, environment, read_json, save_tensors, write_json
from cahp.data.batching import encode, make_batches
from cahp.data.tasks import get_task
from cahp.model.checkpoint import is_pruned_folder, load_pruned, save_pruned
from cahp.model.heads import kept_heads, kept_mask, mean_relative_depth, num_kept
from cahp.model.loading import load_model
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines import plots
from cahp.selectors.base import HeadStats
from cahp.selectors.graph import CLUSTERING_METHODS
from cahp.selectors.registry import make_selector
from cahp.stats.distances import DISTANCES
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import Signatures, collect_signatures
from cahp.train.evaluate import evaluate_task
from cahp.train.finetune import FinetuneConfig, finetune

log = logging.getLogger(__name__)


class RunConflictError(ValueError):
    """The output folder holds a run made with other settings."""


@dataclass
class PruneConfig:
    """Settings of `cahp prune` (fine-tuning settings live in `FinetuneConfig`)."""

    model: str = cfg_field("minilm-l6", "model to prune: short name, folder or Hub id")
    task: str = cfg_field("sst5", "task name or folder of a user task")
    output_dir: str = cfg_field("", "output folder (default: runs/prune-MODEL-TASK)")
    data_dir: str = cfg_field("", "task data folder (default: $CAHP_DATA_DIR or ../shared/data)")
    finetuned: bool = cfg_field(False, "the model is already fine-tuned on the task: skip the first fine-tuning")
    calibration_examples: int = cfg_field(1024, "training examples for signatures and salience")
    curve_examples: int = cfg_field(1000, "training examples held out to score the curve (not fine-tuned on)")
    distance: str = cfg_field("js", "head distance", choices=list(DISTANCES))
    clustering: str = cfg_field("spectral", "graph clustering", choices=list(CLUSTERING_METHODS))
    kernel: str = cfg_field("gaussian", "affinity kernel of the spectral graph", choices=["gaussian", "knn"])
    grid_step: int = cfg_field(0, "step of the k grid (0: about 18 points)")
    min_ratio: float = cfg_field(0.05, "smallest k on the grid, as a share of the heads")
    knee_method: str = cfg_field("chord", "knee rule on the fitted curve", choices=list(KNEE_METHODS))
    degree: int = cfg_field(0, "polynomial degree of the fit (0: automatic, smallest adequate degree 2..5)")
    keep: int = cfg_field(0, "keep exactly this many heads (overrides the knee)")
    keep_ratio: float = cfg_field(0.0, "keep this share of the heads (overrides the knee)")
    stats_batch_size: int = cfg_field(32, "batch size of the statistics passes")
    seed: int = cfg_field(0, "seed of data sampling, clustering and fine-tuning")
    overwrite: bool = cfg_field(False, "replace an output folder that holds a run with other settings")
    skip_final_finetune: bool = cfg_field(False, "stop after surgery (no final fine-tuning)")


@dataclass
class PruneResult:
    output_dir: Path
    report: dict = field(default_factory=dict)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """Cache of stage results under ``OUTPUT/stages`` keyed by a settings fingerprint.

    Under torchrun rank 0 alone reads and writes; every read and every put returns
    rank 0's data on all ranks, so all ranks take the same branch with the same values.
    """

    def __init__(self, root: Path):
        self.root = root / "stages"
        distributed.on_main(self.root.mkdir, parents=True, exist_ok=True)
        self.times: dict[str, dict] = {}

    def _read_json(self, name: str, key: dict):
        path = self.root / f"{name}.json"
        if path.is_file():
            data = read_json(path)
            if data.get("_key") == _fingerprint(key):
                return data
        return None

    def json(self, name: str, key: dict):
        return distributed.on_main(self._read_json, name, key)

    def put_json(self, name: str, key: dict, data: dict) -> dict:
        data = distributed.broadcast_object({**data, "_key": _fingerprint(key)})
        distributed.on_main(write_json, self.root / f"{name}.json", data)
        return data

    def _read_tensors(self, name: str, key: dict):
        path = self.root / f"{name}.pt"
        if path.is_file():
            data = torch.load(path, weights_only=False)
            if data.get("_key") == _fingerprint(key):
                return data
        return None

    def tensors(self, name: str, key: dict):
        return distributed.on_main(self._read_tensors, name, key)

    def put_tensors(self, name: str, key: dict, data: dict) -> dict:
        data = distributed.broadcast_object({**data, "_key": _fingerprint(key)})
        distributed.on_main(save_tensors, self.root / f"{name}.pt", data)
        return data

    def exists(self, path: Path, check=Path.is_file) -> bool:
        """Whether rank 0 sees ``path`` (``check(path)`` on rank 0, broadcast)."""
        return bool(distributed.on_main(check, path))

    def timed(self, name: str, seconds: float, cached: bool) -> None:
        self.times[name] = {"seconds": round(seconds, 2), "cached": cached}
        log.info("stage %s: %s", name, "cached" if cached else f"{seconds:.1f} s")


def split_train(n: int, curve_examples: int, calibration_examples: int, seed: int):
    """Seeded, disjoint (curve, calibration, finetune) index lists of the training split."""
    if curve_examples + min(calibration_examples, 1) >= n:
        raise ValueError(
            f"the training split has {n} examples, too few to hold out {curve_examples} for the curve "
            f"and still train; lower --curve-examples"
        )
    perm = np.random.default_rng(seed).permutation(n)
    curve = sorted(perm[:curve_examples].tolist())
    rest = perm[curve_examples:]
    calib = sorted(rest[: min(calibration_examples, len(rest))].tolist())
    train = sorted(rest.tolist())
    return curve, calib, train


def run_prune(cfg: PruneConfig, ft_cfg: FinetuneConfig | None = None, progress: bool = True) -> PruneResult:
    """Run the whole CAHP pipeline; see the module docstring. Returns the report (on every rank)."""
    distributed.init()
    ft_cfg = ft_cfg or FinetuneConfig(seed=cfg.seed)
    if cfg.keep and cfg.keep_ratio:
        raise ValueError("give --keep or --keep-ratio, not both")
    if cfg.keep_ratio and not 0 < cfg.keep_ratio <= 1:
        raise ValueError(f"--keep-ratio must be in (0, 1], got {cfg.keep_ratio}")
    out = Path(cfg.output_dir)
    distributed.on_main(out.mkdir, parents=True, exist_ok=True)
    handler = add_log_file(out / "log.txt") if distributed.is_main() else None
    try:
        result = _run(cfg, ft_cfg, out, progress)
        distributed.barrier()
        return result
    finally:
        if handler is not None:
            logging.getLogger("cahp").removeHandler(handler)
            handler.close()


def _check_identity(out: Path, identity: dict, overwrite: bool) -> None:
    path = out / "run.json"
    if path.is_file():
        old = read_json(path)
        if old != json.loads(json.dumps(identity, default=str)):
            if not overwrite:
                diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
                raise RunConflictError(
                    f"{out} holds a run with other settings ({', '.join(diff)} differ); "
                    f"choose another --output-dir or pass --overwrite"
                )
            log.warning("overwriting %s: it held a run with other settings", out)
            shutil.rmtree(out / "stages", ignore_errors=True)
    write_json(path, identity)


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
    stages: _Stages
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


def prepare_run(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool = True) -> PreparedRun:
    """Stages 0-4: fine-tuned dense model, signatures, salience (cached under ``out/stages``).

    Collective under torchrun (joins the process group if needed); rank 0 creates ``out``.
    """
    distributed.init()
    distributed.on_main(out.mkdir, parents=True, exist_ok=True)
    task = get_task(cfg.task, data_dir=cfg.data_dir or None)
    identity = {
        "model": cfg.model, "task": task.name, "data_dir": str(task.data_dir), "finetuned": cfg.finetuned,
        "curve_examples": cfg.curve_examples, "calibration_examples": cfg.calibration_examples,
        "seed": cfg.seed, "finetune": asdict(ft_cfg),
    }
    distributed.on_main(_check_identity, out, identity, cfg.overwrite)
    stages = _Stages(out)
    train_all = task.load(task.train_split)
    curve_idx, calib_idx, train_idx = split_train(len(train_all), cfg.curve_examples, cfg.calibration_examples,
                                                  cfg.seed)
    curve_ex = [train_all[i] for i in curve_idx]
    calib_ex = [train_all[i] for i in calib_idx]
    train_ex = [train_all[i] for i in train_idx]

    # --- 0. the fine-tuned dense model ------------------------------------------------------
    t = time.perf_counter()
    dense_dir = out / "stages" / "finetuned"
    cached = stages.json("finetune_dense", identity)
    device = distributed.device()
    if cached is not None and stages.exists(dense_dir / "config.json"):
        if distributed.is_main():
            model, tok = load_pruned(dense_dir)
        else:  # same architecture; rank 0's cached weights are broadcast below
            model, tok = load_model(cfg.model, num_labels=task.num_labels, seed=cfg.seed)
        distributed.sync_module(model.to(device))
        stages.timed("finetune_dense", time.perf_counter() - t, True)
    else:
        model, tok = load_model(cfg.model, num_labels=task.num_labels, seed=cfg.seed)
        distributed.sync_module(model.to(device))  # e.g. a new classifier: rank 0's on every rank
        info = {"finetuned_by_cahp": not cfg.finetuned}
        if not cfg.finetuned:
            ft = finetune(model, tok, task, ft_cfg, train_examples=train_ex, progress=progress)
            info["finetune"] = ft.to_dict()
        info["test"] = evaluate_task(model, tok, task, max_length=ft_cfg.max_length, seed=cfg.seed,
                                     keep_predictions=True, progress=progress)
        distributed.on_main(save_pruned, model, tok, dense_dir)
        cached = stages.put_json("finetune_dense", identity, info)
        stages.timed("finetune_dense", time.perf_counter() - t, False)
    pad = tok.pad_token_id or 0

    # --- 1-2. signatures and distances (calibration sample) ----------------------------------
    t = time.perf_counter()
    calib_ds = encode(tok, calib_ex, ft_cfg.max_length)
    calib_batches = make_batches(calib_ds, cfg.stats_batch_size, shuffle=False, pad_token_id=pad)
    key1 = {**identity, "stage": "signatures", "distance": cfg.distance, "batch": cfg.stats_batch_size}
    sig_state = stages.tensors(f"signatures-{cfg.distance}", key1)
    if sig_state is None:
        sig = collect_signatures(model, calib_batches, kinds=(cfg.distance,), progress=progress)
        sig = Signatures.from_state_dict(stages.put_tensors(f"signatures-{cfg.distance}", key1, sig.state_dict()))
        stages.timed("signatures", time.perf_counter() - t, False)
    else:
        sig = Signatures.from_state_dict(sig_state)
        stages.timed("signatures", time.perf_counter() - t, True)

    # --- 4. salience ------------------------------------------------------------------------
    t = time.perf_counter()
    key2 = {**identity, "stage": "salience", "batch": cfg.stats_batch_size}
    sal = stages.tensors("salience", key2)
    if sal is None:
        sal = stages.put_tensors("salience", key2, gate_gradients(model, calib_batches, progress=progress))
        stages.timed("salience", time.perf_counter() - t, False)
    else:
        stages.timed("salience", time.perf_counter() - t, True)

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
        signatures=sig, gate_stats=sal, dense_info=cached, stats=stats, keys={"signatures": key1, "salience": key2},
    )


def _run(cfg: PruneConfig, ft_cfg: FinetuneConfig, out: Path, progress: bool) -> PruneResult:
    t_total = time.perf_counter()
    run = prepare_run(cfg, ft_cfg, out, progress)
    task, stages, model, tok, stats, sig = run.task, run.stages, run.model, run.tokenizer, run.stats, run.signatures
    identity, key1, key2 = run.identity, run.keys["signatures"], run.keys["salience"]
    curve_batches, curve_labels, train_ex = run.curve_batches, run.curve_labels, run.train_examples
    dense_info = run.dense_info
    params_before = count_parameters(model)
    heads_before = num_kept(model)
    n_layers = stats.shape[0]
    selector = make_selector("cahp", cfg.seed, distance=cfg.distance, clustering=cfg.clustering, kernel=cfg.kernel)

    # --- 5-6. curve on held-out training data ---------------------------------------------------
    t = time.perf_counter()
    ks = default_grid(stats.n, cfg.grid_step, cfg.min_ratio)
    key3 = {**key1, **key2, "stage": "curve", "selector": selector.settings(), "ks": ks}
    curve = stages.json("curve", key3)
    if curve is None:
        points = selection_curve(model, selector, stats, ks, curve_batches, curve_labels, progress=progress)
        curve = stages.put_json("curve", key3, {"points": points})
        stages.timed("curve", time.perf_counter() - t, False)
    else:
        stages.timed("curve", time.perf_counter() - t, True)
    points = curve["points"]

    knee = find_knee([p["k"] for p in points], [p["accuracy"] for p in points],
                     degree=cfg.degree or None, method=cfg.knee_method)
    if knee.warning:
        log.warning("knee: %s", knee.warning)
    if cfg.keep:
        k_final, k_source = cfg.keep, "--keep"
    elif cfg.keep_ratio:
        k_final, k_source = max(1, round(cfg.keep_ratio * stats.n)), "--keep-ratio"
    else:
        k_final, k_source = knee.k, "knee"
    if not 1 <= k_final <= stats.n:
        raise ValueError(f"cannot keep {k_final} heads: the model has {stats.n}; choose 1..{stats.n}")
    log.info("k* = %d (knee), keeping %d heads (%s)", knee.k, k_final, k_source)

    # --- 7-8. surgery and the single fine-tuning ------------------------------------------------
    t = time.perf_counter()
    mask = distributed.broadcast_object(selector.select(k_final, stats))
    kept = {i: torch.nonzero(mask[i]).flatten().tolist() for i in range(n_layers)}
    held_pre = score_mask(model, mask, curve_batches, curve_labels)
    pruned = copy.deepcopy(model)
    keep_heads(pruned, kept)
    key4 = {**identity, "stage": "final", "kept": kept, "skip_final_finetune": cfg.skip_final_finetune}
    final = stages.json("final", key4)
    model_dir = out / "model"
    if final is not None and stages.exists(model_dir, is_pruned_folder):
        if distributed.is_main():
            pruned, tok = load_pruned(model_dir)
        # the other ranks keep their surgery of the same heads and get rank 0's weights
        distributed.sync_module(pruned.to(distributed.device()))
        stages.timed("surgery_and_finetune", time.perf_counter() - t, True)
    else:
        final = {"test_after_pruning": evaluate_task(pruned, tok, task, max_length=ft_cfg.max_length, seed=cfg.seed,
                                                     progress=progress)}
        if not cfg.skip_final_finetune:
            ft2 = finetune(pruned, tok, task, ft_cfg, train_examples=train_ex, progress=progress)
            final["finetune"] = ft2.to_dict()
            final["test_after_finetune"] = evaluate_task(pruned, tok, task, max_length=ft_cfg.max_length,
                                                         seed=cfg.seed, progress=progress)
        distributed.on_main(save_pruned, pruned, tok, model_dir)
        final = stages.put_json("final", key4, final)
        stages.timed("surgery_and_finetune", time.perf_counter() - t, False)

    # --- report and figures ----------------------------------------------------------------------
    head_mask = kept_mask(pruned)
    test_split = task.test_split
    report = {
        "model": cfg.model,
        "task": task.name,
        "settings": {"prune": asdict(cfg), "finetune": asdict(ft_cfg)},
        "data": {"train": len(train_ex) + len(run.curve_examples),
                 "finetune_examples": len(train_ex) if not cfg.finetuned else None,
                 "curve_examples": len(run.curve_examples), "calibration_examples": len(run.calibration_examples),
                 "calibration_rows": sig.rows, "test_split": test_split},
        "heads_before": heads_before,
        "k_star": knee.k,
        "heads_kept": int(head_mask.sum()),
        "k_source": k_source,
        "knee": knee.to_dict(),
        "curve": [{"k": p["k"], "accuracy": p["accuracy"]} for p in points],
        "kept_heads": kept_heads(pruned),
        "heads_per_layer": head_mask.sum(1).tolist(),
        "mean_relative_depth": mean_relative_depth(head_mask),
        "scores": {
            "before_pruning": {k: {m: v for m, v in r.items() if m != "predictions"}
                               for k, r in dense_info["test"].items()},
            "after_pruning": final["test_after_pruning"],
            "after_finetune": final.get("test_after_finetune"),
            "heldout_accuracy_dense": points[0]["accuracy"] if points[0]["k"] == stats.n else None,
            "heldout_accuracy_selected": held_pre,
        },
        "parameters": {"before": params_before, "after": count_parameters(pruned)},
        "stage_seconds": stages.times,
        "total_seconds": round(time.perf_counter() - t_total, 1),
        "environment": environment(),
    }
    report = distributed.broadcast_object(report)
    title = f"{cfg.model} / {task.name}"
    per_layer = [sum(1 for layer, _ in sig.head_ids if layer == i) for i in range(n_layers)]

    def write_outputs():
        write_json(out / "report.json", report)
        plots.plot_curve(points, knee.to_dict(), out / "curve.png", title=title)
        plots.plot_heads(head_mask.numpy(), out / "heads.png",
                         title=f"{title}: {int(head_mask.sum())} of {heads_before} heads kept")
        plots.plot_distances(sig.distances[cfg.distance].numpy(), per_layer, out / "distances.png",
                             title=f"{cfg.distance} distance between heads")

    distributed.on_main(write_outputs)
    b, a, f = (report["scores"][s] for s in ("before_pruning", "after_pruning", "after_finetune"))
    log.info(
        "done: %d -> %d heads, %d -> %d parameters; %s accuracy %.4f -> %.4f (pruned) -> %s (fine-tuned)",
        heads_before, report["heads_kept"], params_before, report["parameters"]["after"], test_split,
        b[test_split]["accuracy"], a[test_split]["accuracy"],
        f"{f[test_split]['accuracy']:.4f}" if f else "-",
    )
    return PruneResult(output_dir=out, report=report)


__all__ = ["PreparedRun", "PruneConfig", "PruneResult", "RunConflictError", "prepare_run", "run_prune", "split_train"]
