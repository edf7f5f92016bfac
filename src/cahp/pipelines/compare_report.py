"""The report of the heads-only `cahp compare`: every result summarised into ``compare.json``'s dict.

`CompareReport` is the report half of `cahp.pipelines.compare`'s run object,
apart from the half that computes: it reads the results (``curves``, ``pre``,
``fine``, ``dense``, keyed as part (a) and (b) key them) and the run's
attributes that `_Compare.run` sets (``cfg``, ``ccfg``, ``ft_cfg``,
``dense_ft``, ``prep``, ``task``, ``stats``, ``split``, ``labels``,
``methods``, ``seeds``, ``budgets``, ``ks``, ``knee``, ``knee_curve``,
``seconds``, ``cache``, ``out``) and its ``sel_seeds``, ``seeded`` and
``method``, and computes nothing of its own but statistics over the test
predictions (`cahp.pipelines.verdicts`). Rendering (markdown, verdict lines,
files) is `cahp.pipelines.report`'s.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from cahp.core.io import environment
from cahp.model.heads import mean_relative_depth
from cahp.pipelines.plots import plot_compare_curves
from cahp.pipelines.report import (
    compute_seconds,
    render_markdown,
    seconds_by_machine,
    verdict_lines,
    verdict_text,
    write_compare_outputs,
)
from cahp.pipelines.stages import curve_name
from cahp.pipelines.verdicts import STATISTICS, VERDICT_RULE, compare_to_cahp

__all__ = ["CompareReport"]


class CompareReport:
    """The report of one heads-only compare call (mixed into `cahp.pipelines.compare._Compare`)."""

    def correct(self, rec: dict) -> np.ndarray:
        return np.asarray(rec["test"][self.split]["predictions"]) == self.labels

    def summary(self, recs: list[dict], seeds: list, cahp_recs: list[dict] | None, masks: list[dict]) -> dict:
        split = self.split
        acc = np.array([r["test"][split]["accuracy"] for r in recs])
        out = {
            "seeds": seeds,
            "accuracy": float(acc.mean()),
            "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "accuracy_per_seed": acc.tolist(),
            "macro_f1": float(np.mean([r["test"][split]["macro_f1"] for r in recs])),
            "other_splits": {s: float(np.mean([r["test"][s]["accuracy"] for r in recs]))
                             for s in recs[0]["test"] if s != split},
        }
        if masks:
            per_layer = [[len(m.get(str(i), m.get(i, []))) for i in range(self.stats.shape[0])] for m in masks]
            bool_masks = [self.stats.mask_from_heads(m) for m in masks]
            out["heads_per_layer"] = per_layer[0]
            out["heads_per_layer_mean"] = np.mean(per_layer, 0).tolist()
            out["mean_relative_depth"] = float(np.mean([mean_relative_depth(b) for b in bool_masks]))
            out["kept"] = masks[0]
        if cahp_recs is not None:
            out["vs_cahp"] = compare_to_cahp([self.correct(r) for r in recs], [self.correct(r) for r in cahp_recs],
                                             self.ccfg.n_bootstrap, self.cfg.seed,
                                             seeds if len(seeds) >= len(cahp_recs) else None)
        return out

    def result_counts(self) -> dict:
        """How many results this call read from the caches and how many it computed (each curve counted once)."""
        curves = [self.prep.stages.first[curve_name(self.method(m, s))] for m in self.methods
                  for s in self.sel_seeds(m)]
        return {"results_cached": self.cache.hits + sum(curves),
                "results_computed": self.cache.computed + len(curves) - sum(curves)}

    def report(self, curves, pre, fine, dense, t_total: float, partial: bool) -> dict:
        cfg, run = self.cfg, self.prep
        n = self.stats.n
        curve_out = {}
        for method in self.methods:
            sseeds = self.sel_seeds(method)
            accs = np.array([[p["accuracy"] for p in curves[(method, s)]["points"]] for s in sseeds])
            curve_out[method] = {
                "ks": self.ks, "accuracy": accs.mean(0).tolist(),
                "accuracy_std": (accs.std(0, ddof=1) if len(accs) > 1 else np.zeros(len(self.ks))).tolist(),
                "per_seed": {str(s): a.tolist() for s, a in zip(sseeds, accs)} if sseeds != [None] else None,
                "select_seconds": float(sum(curves[(method, s)]["seconds"]["select"] for s in sseeds)),
            }
        no_ft, ft_out = {}, {}
        for b in self.budgets:
            k, label = b["k"], b["label"]
            cahp_pre = [pre[("cahp", None, k)]]
            no_ft[label] = {}
            for method in self.methods:
                sseeds = self.sel_seeds(method)
                recs = [pre[(method, s, k)] for s in sseeds]
                s = self.summary(recs, [s for s in sseeds if s is not None], None if method == "cahp" else cahp_pre,
                                 [r["kept"] for r in recs])
                s["k"] = k
                s["heldout_accuracy"] = float(np.mean([r["heldout_accuracy"] for r in recs]))
                s["selection"] = recs[0].get("selection") or None
                if "gates" in recs[0]:
                    s["gates"] = recs[0]["gates"]
                if "vs_cahp" in s:
                    s["vs_cahp"]["pooled"]["text"] = verdict_text(method, label, k, s["vs_cahp"]["pooled"])
                no_ft[label][method] = s
            if fine is not None:
                ft_out[label] = {}
                cahp_ft = [fine[("cahp", seed, k)] for seed in self.seeds]
                for method in self.methods:
                    recs = [fine[(method, seed, k)] for seed in self.seeds]
                    masks = [pre[(method, self.selection_seed(method, seed), k)]["kept"] for seed in self.seeds]
                    s = self.summary(recs, self.seeds, None if method == "cahp" else cahp_ft, masks)
                    s["k"] = k
                    s["best_epochs"] = [r["finetune"]["best_epoch"] for r in recs]
                    s["parameters"] = recs[0]["parameters"]
                    s["finetune_seconds"] = float(np.mean([r["seconds"]["finetune"] for r in recs]))
                    if "vs_cahp" in s:
                        s["vs_cahp"]["pooled"]["text"] = verdict_text(method, label, k, s["vs_cahp"]["pooled"])
                    ft_out[label][method] = s
        dense_out = None
        if dense:
            recs = [dense[s] for s in self.seeds]
            dense_out = self.summary(recs, self.seeds, None, [])
            dense_out["best_epochs"] = [r["finetune"]["best_epoch"] for r in recs]
            dense_out["parameters"] = recs[0]["parameters"]
            dense_out["vs_cahp"] = {
                b["label"]: compare_to_cahp([self.correct(r) for r in recs],
                                            [self.correct(fine[("cahp", s, b["k"])]) for s in self.seeds],
                                            self.ccfg.n_bootstrap, cfg.seed, self.seeds)
                for b in self.budgets
            }
        dense_test = {s: {m: v for m, v in r.items() if m != "predictions"}
                      for s, r in run.dense_info["test"].items()}
        timings = {"total_seconds": round(time.perf_counter() - t_total, 1), "stages": run.stages.times,
                   **{k: round(v, 2) for k, v in self.seconds.items()},
                   **self.result_counts()}
        # compute time of every result, whether computed in this call or read from the cache
        timings["no_finetune_seconds"] = round(sum(map(compute_seconds, [*curves.values(), *pre.values()])), 1)
        if fine is not None:
            timings["finetune_seconds"] = round(sum(map(compute_seconds, [*fine.values(), *dense.values()])), 1)
        timings["seconds_by_machine"] = seconds_by_machine(
            [*curves.values(), *pre.values(), *(fine or {}).values(), *(dense or {}).values()])
        return {
            "model": cfg.model,
            "task": self.task.name,
            "test_split": self.split,
            "heads": n,
            "partial": partial,
            "settings": {
                "prune": asdict(cfg), "finetune_dense": asdict(self.dense_ft),
                "finetune_after": {k: v for k, v in asdict(self.ft_cfg).items() if k != "seed"},
                "compare": asdict(self.ccfg), "seeds": self.seeds,
                "methods": {m: self.method(m, self.sel_seeds(m)[0]).settings() for m in self.methods},
            },
            "data": {"finetune_examples": len(run.train_examples), "curve_examples": len(run.curve_examples),
                     "calibration_examples": len(run.calibration_examples), "test_examples": len(self.labels),
                     # accuracy of always predicting the most frequent test label (a model that predicts one
                     # class for everything scores that class's share, at most this)
                     "test_majority_share": float(np.bincount(self.labels).max() / len(self.labels))},
            "statistics": STATISTICS,
            "verdict_rule": VERDICT_RULE,
            "k_star": self.knee.k,
            "knee": self.knee.to_dict(),
            "budgets": self.budgets,
            "dense": {"test": dense_test, "heldout_accuracy": next(
                (p["accuracy"] for p in self.knee_curve["points"] if p["k"] == n), None)},
            "no_finetune": {"curves": curve_out, "results": no_ft},
            "finetuned": {"results": ft_out, "dense_control": dense_out} if fine is not None else None,
            "timings": timings,
            "environment": environment(),
        }

    def write(self, report: dict) -> None:
        write_compare_outputs(self.out, report, render_markdown(report), plot_compare_curves,
                              verdict_lines(report) if not report["partial"] else [])
