"""`cahp compare --objective embedding`: CAHP against the baselines on a sentence-embedding model, without labels.

The label-free counterpart of `cahp.pipelines.compare` (issue 22, item 6). It
starts from `prepare_embedding`, so it shares the output folder and stage cache
of `cahp prune --objective embedding` (texts, dense targets, signatures,
embedding salience, CAHP's curve). Methods: the registry's selectors
(`cahp.selectors.registry.make_selector`), by default `EMBEDDING_METHODS`
(CAHP, random, weight magnitude, gradient, Fisher, attention entropy and layer
drop, `cahp.selectors.layer_drop`); the labelled compare's default list stands
for this default. Selectors whose statistics need a loss get the embedding
loss: salience and the Fisher diagonal are the embedding pipeline's; the Fisher
rearrangement's per-batch gate gradients are taken of the same noisy-target
embedding loss as the salience pass (`cahp.selectors.label_free.LabelFreeFisher`).
``gradient-iterative`` re-scores with the labelled loss and is refused.

Budgets: CAHP's knee k* (its embedding curve and `find_k_star`, as `cahp prune`
finds it) and ``--budgets`` shares of the heads. For each method, budget and
seed:

(a) without fine-tuning, through gates on the dense model: held-out fidelity
    (mean cosine to the dense embeddings of the curve texts), the similarity
    task's dev Spearman and its test Spearman and Pearson;
(b) after surgery and the same distillation (`cahp.train.distill`, the
    ``FinetuneConfig`` given, its seed replaced by each compare seed, early
    stopping on held-out fidelity, the training texts of the prepared run): the
    same scores (no dev: the test split is what is compared).

The dense model is a row of its own (it needs no distillation: it is the
teacher). Seeds: ``--seeds N`` runs seeds ``seed .. seed+N-1``; a seed sets the
distillation and the random selector; deterministic selectors pick the same
heads for every seed.

Statistics, on the similarity task's test pairs (STS-B: the GLUE dev file):
every system's Spearman is recomputed on the same bootstrap resamples of the
pairs (`cahp.train.metrics.PairedSpearman`), so differences are paired.

- pooled (the verdict): the mean over seeds of the method's Spearman minus the
  mean over seeds of CAHP's, its 95% percentile interval over the resamples;
- per seed: method seed s against CAHP seed s, with a verdict each;
- verdict, CAHP's (`cahp.pipelines.verdicts.verdict`): "win" when the interval
  of (method - CAHP) lies below 0, "loss" when above, else "tie".

Every (method, budget, seed) result is cached in ``OUTPUT/compare/``
(`StageCache`, keyed by every setting it depends on), so a re-run reads what it
has and computes only what is new. Outputs: ``compare.json`` (every number and
setting), ``compare.md`` (a table per budget, `cahp.pipelines.report_embedding`), ``compare.png`` (test Spearman
against heads kept, per method) and ``compare_layers.png`` (kept heads per
layer).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cahp.core.io import environment
from cahp.model.gates import head_gates
from cahp.model.heads import mask_to_heads, mean_relative_depth
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines.cache import StageCache
from cahp.pipelines.compare import DEFAULT_METHODS, CompareConfig, CompareResult, check_compare_run
from cahp.pipelines.compare_methods import MethodsBySeed
from cahp.pipelines.embedding import (
    EMBEDDING_OBJECTIVES,
    NO_SIMILARITY,
    SALIENCE_TARGET_NOISE,
    dense_scores,
    embedding_curve,
    prepare_embedding,
)
from cahp.pipelines.guard import output_folder
from cahp.pipelines.plots import plot_spearman
from cahp.pipelines.report import pooled_verdict_texts, verdict_text, write_compare_outputs
from cahp.pipelines.report_embedding import render_markdown
from cahp.pipelines.stages import PruneConfig, cahp_selector, find_k_star
from cahp.pipelines.verdicts import VERDICT_RULE, verdict
from cahp.selectors.base import HeadSelector, check_mask
from cahp.selectors.fisher import FisherSearchSelector, fold_gates
from cahp.selectors.label_free import LabelFreeFisher
from cahp.selectors.registry import SELECTORS
from cahp.train.distill import distill
from cahp.train.finetune import FinetuneConfig
from cahp.train.metrics import PairedSpearman
from cahp.train.objectives import EmbeddingLoss, fidelity
from cahp.train.teacher import finetune_key

log = logging.getLogger(__name__)

__all__ = ["EMBEDDING_METHODS", "LABELLED_ONLY", "SCORE_BOOTSTRAP", "STATISTICS", "dense_summary", "distill_pruned",
           "run_compare_embedding", "spearman_summary", "versus_cahp"]

#: The default methods of the embedding comparison (CAHP first).
EMBEDDING_METHODS = ["cahp", "random", "magnitude", "gradient", "fisher", "entropy", "layer-drop"]
#: Registered selectors that differentiate the labelled loss during selection: no labels here.
LABELLED_ONLY = ("gradient-iterative",)
STATISTICS = (
    "paired bootstrap over the similarity task's test pairs: every system's Spearman recomputed on the same "
    "resamples; pooled = mean over seeds of the method's Spearman minus the mean over seeds of CAHP's "
    "(per-seed paired bootstraps beside it)"
)
#: Bootstrap resamples of each system's own Spearman and Pearson intervals (as `cahp prune` reports them).
SCORE_BOOTSTRAP = 1000


# --- statistics -----------------------------------------------------------------------------------------


def _summary(diff: float, boots: np.ndarray) -> dict:
    """``{"diff", "ci95", "p_value", "verdict"}``: percentile interval, and two-sided p as twice the share of
    resamples on the other side of 0 from the observed difference (`cahp.train.metrics`' rule)."""
    p = 2 * float((boots <= 0).mean()) if diff >= 0 else 2 * float((boots >= 0).mean())
    ci = [float(x) for x in np.percentile(boots, [2.5, 97.5])]
    return {"diff": float(diff), "ci95": ci, "p_value": min(1.0, p), "verdict": verdict(ci)}


def versus_cahp(boot: PairedSpearman, method: list, cahp: list, seeds: list | None = None) -> dict:
    """Pooled and per-seed paired bootstraps of a method's test Spearman minus CAHP's.

    Args:
        boot: the resamples every system is scored on.
        method, cahp: per-seed (pairs,) predictions (cosine of each pair). A single array on one side is
            paired with every seed of the other (a deterministic selection without fine-tuning).
        seeds: the seed of each per-seed comparison, recorded beside it.

    Returns:
        ``{"pooled": {"diff", "ci95", "p_value", "verdict"}, "per_seed": [...], "per_seed_verdicts": counts}``,
        as `cahp.pipelines.verdicts.compare_to_cahp` returns for accuracy.
    """
    if not method or not cahp:
        raise ValueError("versus_cahp needs predictions of at least one seed on each side")
    obs_m, obs_c = [boot.observed(p) for p in method], [boot.observed(p) for p in cahp]
    res_m, res_c = [boot.resampled(p) for p in method], [boot.resampled(p) for p in cahp]
    pooled = _summary(np.mean(obs_m) - np.mean(obs_c), np.mean(res_m, 0) - np.mean(res_c, 0))
    per_seed = []
    for i in range(max(len(method), len(cahp))):
        m, c = min(i, len(method) - 1), min(i, len(cahp) - 1)
        r = _summary(obs_m[m] - obs_c[c], res_m[m] - res_c[c])
        if seeds is not None:
            r["seed"] = seeds[i]
        per_seed.append(r)
    counts = {v: sum(r["verdict"] == v for r in per_seed) for v in ("win", "tie", "loss")}
    return {"pooled": pooled, "per_seed": per_seed, "per_seed_verdicts": counts}


def spearman_summary(boot: PairedSpearman, recs: list[dict], seeds: list, cahp_recs: list[dict] | None) -> dict:
    """Mean test scores of one system over its records (one per seed) and, given CAHP's records, its paired
    bootstrap against CAHP (`versus_cahp`, per-seed seeds recorded when the system has at least CAHP's count).

    A record holds ``"similarity_test"`` (the similarity set's evaluation with ``"predictions"``) and
    ``"heldout_fidelity"``."""
    rho = np.array([r["similarity_test"]["spearman"] for r in recs])
    out = {
        "seeds": seeds,
        "spearman": float(rho.mean()),
        "spearman_std": float(rho.std(ddof=1)) if len(rho) > 1 else 0.0,
        "spearman_per_seed": rho.tolist(),
        "pearson": float(np.mean([r["similarity_test"]["pearson"] for r in recs])),
        "heldout_fidelity": float(np.mean([r["heldout_fidelity"] for r in recs])),
    }
    if cahp_recs is not None:
        out["vs_cahp"] = versus_cahp(boot, [r["similarity_test"]["predictions"] for r in recs],
                                     [r["similarity_test"]["predictions"] for r in cahp_recs],
                                     seeds if len(recs) >= len(cahp_recs) and seeds else None)
    return out


def dense_summary(dense: dict, boot: PairedSpearman, cahp_by_target: dict[str, list[dict]], **extra) -> dict:
    """The dense model's row (`cahp.pipelines.embedding.dense_scores` ``dense``): its scores and, for each
    target (budget or speedup label), its Spearman minus CAHP's records there (``cahp_by_target``); ``extra``
    entries go first (heads kept, parameters)."""
    test = dense["similarity_test"]
    vs = {label: versus_cahp(boot, [test["predictions"]], [r["similarity_test"]["predictions"] for r in recs])
          for label, recs in cahp_by_target.items()}
    return {**extra, "heldout_fidelity": dense["heldout_fidelity"], "spearman": test["spearman"],
            "spearman_ci95": test["spearman_ci95"], "pearson": test["pearson"], "pearson_ci95": test["pearson_ci95"],
            "vs_cahp": vs}


def distill_pruned(run, model, ft: FinetuneConfig, what: str, progress: bool = True, checkpoint=None) -> dict:
    """One distillation of an already pruned ``model`` (in place) on the prepared run's training texts, then
    its scores: held-out fidelity, the similarity task's test split (zero-shot), parameters, the distillation's
    epochs and the seconds spent. ``run``: an `cahp.pipelines.embedding.EmbeddingRun`; ``what`` names the model
    in the log."""
    t0 = time.perf_counter()
    loss = EmbeddingLoss(run.targets["train"], run.settings, run.distance)
    once = dataclasses.replace(ft, max_train_examples=0)  # the subset was taken before the targets
    res = distill(model, run.datasets["train"], run.targets["train"], run.curve_batches, run.targets["curve"],
                  loss, once, run.tokenizer.pad_token_id or 0, progress, checkpoint=checkpoint)
    t1 = time.perf_counter()
    held = fidelity(model, run.curve_batches, run.targets["curve"], run.settings)
    test = run.similarity["test"].evaluate(model, run.settings, seed=run.cfg.seed, n_bootstrap=SCORE_BOOTSTRAP)
    log.info("distilled %s (seed %d): fidelity %.4f, test Spearman %.4f", what, ft.seed, held, test["spearman"])
    return {"heldout_fidelity": held, "similarity_test": test, "parameters": count_parameters(model),
            "distillation": {"best_epoch": res.best_epoch, "epochs_run": len(res.history),
                             "best_fidelity": res.best_fidelity, "initial_fidelity": res.initial_fidelity},
            "seconds": {"distill": t1 - t0, "evaluate": time.perf_counter() - t1}}


# --- the comparison -------------------------------------------------------------------------------------


def _methods(ccfg: CompareConfig) -> list[str]:
    """The methods to compare, CAHP first; the labelled compare's default list stands for `EMBEDDING_METHODS`."""
    asked = EMBEDDING_METHODS if list(ccfg.methods) == list(DEFAULT_METHODS) else list(ccfg.methods)
    unknown = [m for m in asked if m not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown method {unknown}; choose from {', '.join(SELECTORS)}")
    labelled = [m for m in asked if m in LABELLED_ONLY]
    if labelled:
        raise ValueError(f"{', '.join(labelled)} re-scores heads with the labelled loss; "
                         "--objective embedding has no labels: drop it from --methods")
    return ["cahp", *dict.fromkeys(m for m in asked if m != "cahp")]


def _check(cfg: PruneConfig, ccfg: CompareConfig) -> None:
    """Every setting that can fail, before any work (one-line ValueErrors)."""
    if cfg.objective not in EMBEDDING_OBJECTIVES:
        raise ValueError(f"objective {cfg.objective!r} is not one of {', '.join(EMBEDDING_OBJECTIVES)}")
    if getattr(cfg, "ffn", False):
        raise ValueError("run_compare_embedding compares heads only; --ffn runs "
                         "cahp.pipelines.compare_embedding_ffn.run_compare_embedding_ffn")
    if cfg.similarity_task.lower() in NO_SIMILARITY:
        raise ValueError("cahp compare --objective embedding compares test Spearman on a similarity task; "
                         "give --similarity-task (e.g. stsb), not none")
    if any(not 0 < r <= 1 for r in ccfg.budgets):
        raise ValueError(f"budgets are shares of the heads in (0, 1], got {ccfg.budgets}")
    if not ccfg.budgets and not ccfg.knee:
        raise ValueError("no budget: give --budgets or keep --knee")
    check_compare_run(cfg, ccfg)


def run_compare_embedding(cfg: PruneConfig, ft_cfg: FinetuneConfig | None = None,
                          ccfg: CompareConfig | None = None, progress: bool = True) -> CompareResult:
    """Compare CAHP with the baselines on the embedding objective (see the module docstring).

    Args:
        cfg: the settings shared with `cahp prune --objective embedding` (model, texts, similarity task,
            output folder, CAHP's distance / clustering / grid / knee rule, seed).
        ft_cfg: the distillation after pruning, the same for every method; its seed is replaced by each
            compare seed (the training texts are the prepared run's, sampled with ``cfg.seed``).
        ccfg: methods, budgets, seeds, parts, bootstrap resamples (``dense_control`` does not apply: the
            dense model is the teacher).

    Returns:
        A `CompareResult`; compare.json, compare.md, compare.png and compare_layers.png are written.
    """
    ft_cfg = ft_cfg or FinetuneConfig(seed=cfg.seed)
    ccfg = ccfg or CompareConfig()
    methods = _methods(ccfg)
    _check(cfg, ccfg)
    with output_folder(Path(cfg.output_dir)) as out:  # log.txt, the lock, no new folder left by an early error
        return _EmbeddingCompare(cfg, ft_cfg, ccfg, methods, out, progress).run()


def _heads_per_layer(kept: dict, n_layers: int) -> list[int]:
    """Kept heads per layer of a ``{layer: [heads]}`` mapping (layer keys may be JSON strings)."""
    return [len(kept.get(str(i), kept.get(i, []))) for i in range(n_layers)]


class _EmbeddingCompare(MethodsBySeed):
    """One compare call: the prepared run, the budgets, part (a), part (b) and the report."""

    registry = SELECTORS

    def __init__(self, cfg: PruneConfig, ft_cfg: FinetuneConfig, ccfg: CompareConfig, methods: list[str],
                 out: Path, progress: bool):
        self.cfg, self.ccfg, self.methods, self.out, self.progress = cfg, ccfg, methods, out, progress
        # the prepared run's distillation subset and targets are drawn with --seed, as `cahp prune` draws them
        self.ft_cfg = dataclasses.replace(ft_cfg, seed=cfg.seed)
        self.seeds = [cfg.seed + i for i in range(ccfg.seeds)]
        self.seconds: dict[str, float] = {}

    # --- setup ----------------------------------------------------------------------------------------
    def run(self) -> CompareResult:
        t_total = time.perf_counter()
        cfg, ccfg = self.cfg, self.ccfg
        run = self.prep = prepare_embedding(cfg, self.ft_cfg, self.out, self.progress)
        self.test = run.similarity["test"]
        self.fisher_loss = EmbeddingLoss(run.targets["calibration"], run.settings, run.distance,
                                         target_noise=SALIENCE_TARGET_NOISE, seed=cfg.seed)
        self.cache = StageCache(self.out / "compare", base={"identity": run.identity,
                                                            "signatures": run.keys["signatures"],
                                                            "salience": run.keys["salience"]},
                                log_level=logging.DEBUG)
        t = time.perf_counter()
        self.knee_curve = embedding_curve(run, cahp_selector(cfg), self.progress)
        self.knee = find_k_star(self.knee_curve["points"], cfg)
        self.seconds["cahp_curve_and_knee"] = time.perf_counter() - t
        n = run.stats.n
        budgets = [{"label": "k*", "k": self.knee.k, "ratio": self.knee.k / n}] if ccfg.knee else []
        budgets += [{"label": f"{r * 100:g}%", "k": max(1, round(r * n)), "ratio": r} for r in ccfg.budgets]
        self.budgets = budgets
        self.budget_ks = sorted({b["k"] for b in budgets}, reverse=True)
        log.info("compare (%s) %s: k* = %d; budgets %s; methods %s; seeds %s", cfg.objective, cfg.model,
                 self.knee.k, ", ".join(f"{b['label']}={b['k']}" for b in budgets), ", ".join(self.methods),
                 self.seeds)
        self.dense = dense_scores(run)
        self.boot = PairedSpearman(self.test.labels, ccfg.n_bootstrap, cfg.seed)

        pre = self.part_a()
        self.write(self.report(pre, None, t_total, partial=ccfg.finetune))
        fine = self.part_b(pre) if ccfg.finetune else None
        report = self.report(pre, fine, t_total, partial=False)
        self.write(report)
        return CompareResult(output_dir=self.out, report=report)

    def build(self, name: str, seed: int) -> HeadSelector:
        """A head selector as `cahp prune` builds CAHP (the registry with the run's shared settings); a Fisher
        selector gets the embedding loss for its gate gradients."""
        sel = super().build(name, seed)
        if isinstance(sel, FisherSearchSelector):
            init = {f.name: getattr(sel, f.name) for f in dataclasses.fields(sel) if f.init}
            sel = LabelFreeFisher(**init, loss_fn=self.fisher_loss)
        return sel

    # --- (a) no fine-tuning ---------------------------------------------------------------------------
    def part_a(self) -> dict:
        pre: dict[tuple[str, int | None, int], dict] = {}
        for method in self.methods:
            for sseed in self.sel_seeds(method):
                for k in self.budget_ks:
                    pre[(method, sseed, k)] = self.cache.get_or_compute(
                        f"embedding-pre-{method}-k{k}-{self.tag(sseed)}",
                        {"part": "no_finetune", **self.method_key(method, sseed), "k": k,
                         "score_bootstrap": SCORE_BOOTSTRAP},
                        lambda method=method, sseed=sseed, k=k: self.score_selection(method, sseed, k))
        return pre

    def score_selection(self, method: str, sseed: int | None, k: int) -> dict:
        """Select k heads and score the dense model gated to them: fidelity, dev Spearman, test scores."""
        run, sel = self.prep, self.method(method, sseed)
        t = time.perf_counter()
        mask, gates = sel.select_gates(k, run.stats, run.context())
        check_mask(mask, k, run.stats)
        t0 = time.perf_counter()
        with head_gates(run.model, init=gates.float()):
            held = fidelity(run.model, run.curve_batches, run.targets["curve"], run.settings)
            dev = run.similarity["dev"].spearman(run.model, run.settings)
            test = self.test.evaluate(run.model, run.settings, seed=self.cfg.seed, n_bootstrap=SCORE_BOOTSTRAP)
        rec = {"k": k, "kept": mask_to_heads(mask), "heldout_fidelity": held, "similarity_dev_spearman": dev,
               "similarity_test": test, "selection": sel.selection_info(),
               "seconds": {"select": t0 - t, "evaluate": time.perf_counter() - t0}}
        if not torch.equal(gates, mask.float()):
            rec["gates"] = gates.tolist()
        log.info("no fine-tuning: %s k=%d%s: fidelity %.4f, test Spearman %.4f", method, k,
                 "" if sseed is None else f" seed {sseed}", held, test["spearman"])
        return rec

    # --- (b) the same distillation --------------------------------------------------------------------
    def part_b(self, pre: dict) -> dict:
        fine: dict[tuple[str, int, int], dict] = {}
        for seed in self.seeds:
            ft = dataclasses.replace(self.ft_cfg, seed=seed)
            for k in self.budget_ks:
                for method in self.methods:
                    sseed = self.selection_seed(method, seed)
                    p = pre[(method, sseed, k)]
                    key = {"part": "distilled", **self.method_key(method, sseed),
                           "k": k, "kept": p["kept"], "gates": p.get("gates"), "distill": finetune_key(ft),
                           "score_bootstrap": SCORE_BOOTSTRAP}
                    name = f"embedding-ft-{method}-k{k}-s{seed}"
                    fine[(method, seed, k)] = self.cache.get_or_compute(
                        name, key, lambda p=p, ft=ft, method=method, name=name, key=key:
                        self.distill_and_score(p, ft, method, self.cache.epoch_checkpoint(name, key)))
        return fine

    def distill_and_score(self, pre: dict, ft: FinetuneConfig, method: str, checkpoint=None) -> dict:
        """Surgery to the selection's heads (its tuned gates folded in), one distillation, the scores."""
        run = self.prep
        t0 = time.perf_counter()
        model = copy.deepcopy(run.model)
        keep_heads(model, {int(layer): hs for layer, hs in pre["kept"].items()})
        if pre.get("gates") is not None:
            fold_gates(model, torch.tensor(pre["gates"]))
        rec = distill_pruned(run, model, ft, f"{method} ({pre['k']} heads)", self.progress, checkpoint)
        rec["seconds"]["distill"] += time.perf_counter() - t0 - sum(rec["seconds"].values())  # the surgery too
        return rec

    # --- report ---------------------------------------------------------------------------------------
    def summary(self, recs: list[dict], seeds: list, cahp_recs: list[dict] | None, masks: list[dict]) -> dict:
        """Mean scores of one method at one budget over its records, its heads, and its verdict against CAHP."""
        out = spearman_summary(self.boot, recs, seeds, None)
        n_layers = self.prep.stats.shape[0]
        per_layer = [_heads_per_layer(m, n_layers) for m in masks]
        bool_masks = [self.prep.stats.mask_from_heads(m) for m in masks]
        out.update(kept=masks[0], heads_kept=sum(per_layer[0]), heads_per_layer=per_layer[0],
                   heads_per_layer_mean=np.mean(per_layer, 0).tolist(),
                   mean_relative_depth=float(np.mean([mean_relative_depth(b) for b in bool_masks])))
        if cahp_recs is not None:
            out["vs_cahp"] = spearman_summary(self.boot, recs, seeds, cahp_recs)["vs_cahp"]
        return out

    def results(self, pre: dict, fine: dict | None) -> tuple[dict, dict]:
        """(no fine-tuning, distilled): budget label -> method -> `summary`, with the verdict sentences."""
        no_ft, ft_out = {}, {}
        for b in self.budgets:
            k, label = b["k"], b["label"]
            no_ft[label] = {}
            for method in self.methods:
                sseeds = self.sel_seeds(method)
                recs = [pre[(method, s, k)] for s in sseeds]
                s = self.summary(recs, [x for x in sseeds if x is not None],
                                 None if method == "cahp" else [pre[("cahp", None, k)]], [r["kept"] for r in recs])
                s.update(k=k, similarity_dev_spearman=float(np.mean([r["similarity_dev_spearman"] for r in recs])),
                         selection=recs[0].get("selection") or None)
                no_ft[label][method] = s
            if fine is None:
                continue
            ft_out[label] = {}
            for method in self.methods:
                recs = [fine[(method, seed, k)] for seed in self.seeds]
                masks = [pre[(method, self.selection_seed(method, seed), k)]["kept"] for seed in self.seeds]
                s = self.summary(recs, self.seeds,
                                 None if method == "cahp" else [fine[("cahp", seed, k)] for seed in self.seeds], masks)
                s.update(k=k, best_epochs=[r["distillation"]["best_epoch"] for r in recs],
                         parameters=recs[0]["parameters"],
                         distill_seconds=float(np.mean([r["seconds"]["distill"] for r in recs])))
                ft_out[label][method] = s
        for part in (no_ft, ft_out):
            for b in self.budgets:
                for method, s in part.get(b["label"], {}).items():
                    if "vs_cahp" in s:
                        s["vs_cahp"]["pooled"]["text"] = verdict_text(method, b["label"], b["k"],
                                                                      s["vs_cahp"]["pooled"])
        return no_ft, ft_out

    def dense_row(self, pre: dict, fine: dict | None) -> dict:
        """The dense model's scores, and its Spearman minus CAHP's at every budget (after distillation when
        it ran): how far each budget's CAHP model is from the teacher."""
        cahp = {b["label"]: ([fine[("cahp", s, b["k"])] for s in self.seeds] if fine is not None
                             else [pre[("cahp", None, b["k"])]]) for b in self.budgets}
        row = dense_summary(self.dense, self.boot, cahp, heads_kept=self.prep.stats.n)
        # the key order compare.json always had: parameters after the scores, before the verdicts
        vs = row.pop("vs_cahp")
        return {**row, "parameters": count_parameters(self.prep.model), "vs_cahp": vs}

    def report(self, pre: dict, fine: dict | None, t_total: float, partial: bool) -> dict:
        cfg, run = self.cfg, self.prep
        no_ft, ft_out = self.results(pre, fine)
        records = [*pre.values(), *(fine or {}).values()]
        timings = {"total_seconds": round(time.perf_counter() - t_total, 1), "stages": run.stages.times,
                   **{k: round(v, 2) for k, v in self.seconds.items()},
                   "results_cached": self.cache.hits, "results_computed": self.cache.computed,
                   "compute_seconds": round(sum(sum(r["seconds"].values()) for r in records), 1)}
        return {
            "model": cfg.model,
            "objective": cfg.objective,
            "embedding_distance": run.distance,
            "task": run.identity["similarity_task"],  # the task the methods are compared on (zero-shot)
            "similarity_task": run.identity["similarity_task"],
            "texts": run.source,
            "test_split": "test",
            "heads": run.stats.n,
            "partial": partial,
            "settings": {
                "prune": asdict(cfg), "distillation": {k: v for k, v in asdict(self.ft_cfg).items() if k != "seed"},
                "compare": asdict(self.ccfg), "methods_run": self.methods, "seeds": self.seeds,
                "methods": {m: self.method(m, self.sel_seeds(m)[0]).settings() for m in self.methods},
                "salience_target_noise": SALIENCE_TARGET_NOISE, "score_bootstrap": SCORE_BOOTSTRAP,
            },
            "data": {**{f"{k}_texts": len(ds) for k, ds in run.datasets.items()},
                     **{f"similarity_{k}_pairs": len(s) for k, s in run.similarity.items()}},
            "statistics": STATISTICS,
            "verdict_rule": VERDICT_RULE,
            "knee_score": run.knee_score,
            "k_star": self.knee.k,
            "knee": self.knee.to_dict(),
            "budgets": self.budgets,
            "dense": self.dense_row(pre, fine),
            "no_finetune": {"results": no_ft},
            "finetuned": {"results": ft_out} if fine is not None else None,
            "timings": timings,
            "environment": environment(),
        }

    def write(self, report: dict) -> None:
        write_compare_outputs(self.out, report, render_markdown(report), plot_spearman,
                              pooled_verdict_texts(report) if not report["partial"] else [])
