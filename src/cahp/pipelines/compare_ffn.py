"""`cahp compare --ffn`: CAHP's joint (heads + FFN neurons) selection against the baselines at equal speed.

Starts from `cahp.pipelines.joint.prepare_joint`, so it shares `cahp prune --ffn`'s
output folder, stage cache, neuron statistics, cost tables and curve (run in a
prune --ffn folder it reuses them). Targets: CAHP's knee (of its joint curve,
as `cahp prune --ffn` finds it) and estimated speedups (default 1.5x, 2x, 3x,
i.e. shares 1/x of dense latency under the run's cost table). Every method of
the joint registry (`cahp.selectors.registry.JOINT_METHODS`) selects for the
same target share; the pipeline never branches on which one it got.

For every (method, target) and selection seed (only seeded methods vary):

- the selection's estimated share and speedups per cost shape, its held-out
  accuracy and its test accuracy through gates (no fine-tuning);
- the pruned model (surgery, tuned gate values folded into the projections) is
  timed against the dense model, interleaved, one thread
  (`cahp.pipelines.joint_report.measure_speedup`): the measured speedup at
  each shape with its 95% interval, the x axis of the frontier;
- for each seed, one fine-tuning (the same `FinetuneConfig` for every method)
  and the test accuracy with predictions; beside it the dense control (the
  fine-tuned dense model fine-tuned again with the same budget) and the
  paper's heads-only CAHP at its own k* (`cahp prune`'s curve and knee), timed
  and fine-tuned the same way.

Verdicts follow `cahp compare`: per-example correctness pooled over seeds,
paired bootstrap of method minus CAHP over the test examples
(`cahp.pipelines.verdicts.compare_to_cahp`); "win" when the interval lies
below 0 (CAHP better). Methods reach the same estimated share, not exactly
the same measured speed (layer drop moves in whole layers; the estimate is
checked against the measurement in the report), so every row carries its
measured speedup beside its accuracy.

Outputs: ``compare_ffn.json``, ``compare_ffn.md``, ``frontier.png`` (test
accuracy after fine-tuning against measured speedup, one line per method,
heads-only CAHP and the dense control marked); each result is cached under
``OUTPUT/compare-ffn/`` (atomic files keyed by their settings): an interrupted
run resumes, a re-run with more methods, targets or seeds computes only what is new.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cahp.budget.cost import cost_summary
from cahp.budget.joint_curve import AIM_TRIES, aim_each, worst_share
from cahp.core import distributed
from cahp.core.io import environment, write_atomic, write_json
from cahp.model.gates import head_gates
from cahp.model.heads import kept_mask, mask_to_heads
from cahp.model.neuron_surgery import keep_neurons
from cahp.model.neurons import neuron_gates, neuron_shape
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines.cache import StageCache
from cahp.pipelines.compare_methods import MethodsBySeed
from cahp.pipelines.guard import check_run, output_folder
from cahp.pipelines.joint import JointRun, find_share_star, joint_curve, prepare_joint
from cahp.pipelines.joint_config import JointConfig, JointSetupError
from cahp.pipelines.joint_report import estimated_speedups, measure_speedup
from cahp.pipelines.report_ffn import render_ffn_markdown
from cahp.pipelines.stages import PruneConfig, cahp_selector, curve, find_k_star
from cahp.pipelines.verdicts import STATISTICS, VERDICT_RULE, compare_to_cahp
from cahp.selectors.fisher import fold_gates
from cahp.selectors.joint_base import HeldOut, JointSelection, check_selection
from cahp.selectors.registry import JOINT_METHODS, make_joint_method
from cahp.train.evaluate import evaluate_task
from cahp.train.finetune import FinetuneConfig, finetune
from cahp.train.teacher import finetune_key, kd_tag

log = logging.getLogger(__name__)

__all__ = ["CAHP_ONLY", "DEFAULT_JOINT_METHODS", "build_pruned", "built_from", "cache_base", "check_targets",
           "compare_targets", "make_method", "run_compare_ffn", "select_at", "select_target",
           "selection_row", "target_key"]

DEFAULT_JOINT_METHODS = ["cahp", "fisher", "p-pruning", "gradient", "random", "layer-drop"]

#: Curve settings that only CAHP's own results depend on (`CahpJoint.choose_by`, `.within`, `.collapsed`): they
#: change its curve and its selections, whose keys hold them (`JointMethod.settings`), and no baseline's, the
#: dense control's or a fine-tuning's (keyed by the selection), so the compares' cache base leaves them out.
CAHP_ONLY = ("choose_by", "within", "collapsed")


def built_from(selection: dict) -> dict:
    """What a pruned model is built from (`build_pruned`): a selection's dict without its ``info`` (held-out
    scores and candidates, which describe the choice), the key of its fine-tunings."""
    return {k: v for k, v in selection.items() if k != "info"}


def cache_base(jr: JointRun) -> dict:
    """The curve's key without `CAHP_ONLY`: what every cached result of a compare --ffn depends on.

    CAHP's head weights (``--head-weights``) are CAHP's alone too (no other method has the field), but the
    base held them before that was seen: it holds the default's weights whatever CAHP tries, so that the
    results cached then stay valid and another ``--head-weights`` recomputes CAHP's selection only (its own
    key holds its weights, `CahpJoint.settings`)."""
    base = {k: v for k, v in jr.key.items() if k not in CAHP_ONLY}
    if "head_weights" in base:
        base["head_weights"] = JointConfig().weights()
    return base


def build_pruned(model, sel: JointSelection):
    """A copy of ``model`` keeping the selection's heads and neurons, tuned gate values folded in."""
    pruned = copy.deepcopy(model)
    keep_heads(pruned, sel.heads)
    keep_neurons(pruned, sel.neurons)
    if sel.head_gates is not None:
        fold_gates(pruned, sel.head_gates)
    if sel.neuron_gates is not None:
        from cahp.selectors.joint_fisher import fold_neuron_gates

        fold_neuron_gates(pruned, sel.neuron_gates)
    return pruned


def check_targets(cfg: PruneConfig, ccfg) -> list[float]:
    """The compare's estimated speedups (``ccfg.speedups``), after one-line checks of the targets' settings."""
    speedups = [float(x) for x in ccfg.speedups]
    if any(not x > 1 for x in speedups):
        raise JointSetupError(f"--speedups must be above 1, got {ccfg.speedups}")
    if not speedups and not ccfg.knee:
        raise JointSetupError("no target: give --speedups or keep --knee")
    if cfg.keep or cfg.keep_ratio or cfg.target_speedup:
        raise JointSetupError("cahp compare --ffn sets its targets with --speedups (and --knee)")
    return speedups


def make_method(name: str, seed: int, joint: JointConfig):
    """A joint method by registry name with the run's shared ``--ffn`` settings (linkage, head weights)."""
    return make_joint_method(name, seed, shared={"linkage": joint.linkage, "head_weights": tuple(joint.weights()),
                                                      "choose_by": joint.choose_by, "within": joint.within,
                                                      "collapsed": joint.collapsed})


def compare_targets(jr: JointRun, cfg: PruneConfig, ccfg, speedups: list[float],
                    progress: bool = True) -> tuple[list[dict], dict]:
    """(targets, CAHP's knee): CAHP's knee share on its joint curve (with ``ccfg.knee``) and each estimated
    speedup x as the share 1 / x; a target is ``{"label", "share", "speedup"}``."""
    points = joint_curve(jr, progress)["points"]
    share_star, knee, _ = find_share_star(points, cfg)
    out = [{"label": "knee", "share": share_star, "speedup": 1 / share_star}] if ccfg.knee else []
    # a speedup target bounds what --speedup-at says (the knee's share is a point of the mean axis)
    at = {} if jr.joint.speedup_at == "mean" else {"at": jr.joint.speedup_at}
    out += [{"label": f"{x:g}x", "share": round(1 / x, 6), "speedup": x, **at} for x in speedups]
    return out, knee.to_dict()


def target_key(target: dict) -> dict:
    """What a selection's cache key adds for the target's meaning (nothing for the mean: older results match)."""
    return {"speedup_at": target["at"]} if target.get("at", "mean") != "mean" else {}


def select_target(jr: JointRun, method, target: dict) -> tuple[JointSelection, float]:
    """(selection, the averaged share it was aimed at) of ``method`` at ``target``.

    A target's share bounds the mean of the shapes' shares, or with ``"at": "each"`` every shape's share
    (`cahp.budget.joint_curve.aim_each`). Raises ValueError where the method cannot reach it.
    """
    share = target["share"]
    if target.get("at", "mean") == "mean":
        return method.select(share, jr.problem), share
    sel, aimed = aim_each(lambda s: method.select(s, jr.problem),
                          lambda x: worst_share(jr.tables, *x.counts(jr.table.n_layers)), share)
    if sel is None:
        raise ValueError(f"no selection within {AIM_TRIES} tries keeps every shape's estimated share at or "
                         f"below {share:.4f}")
    return sel, aimed


def selection_row(recs: list[dict]) -> dict:
    """The report fields every joint compare gives one (method, target): what was kept and how fast.

    ``recs`` are one method's selection records at one target, one per selection seed; the kept
    structure, the speedups and the parameter count are the first seed's (deterministic methods
    have one record), the estimated share is their mean.
    """
    r0 = recs[0]
    aimed = {"aimed_share": float(np.mean([r["aimed_share"] for r in recs]))} if "aimed_share" in r0 else {}
    return {
        **aimed,  # --speedup-at each: the averaged target that bounded every shape
        "heads": sum(r0["heads_per_layer"]), "neurons": sum(r0["neurons_per_layer"]),
        "heads_per_layer": r0["heads_per_layer"], "neurons_per_layer": r0["neurons_per_layer"],
        "estimated_share": float(np.mean([r["estimated_share"] for r in recs])),
        "estimated_speedup": r0["estimated_speedup"],
        "measured_speedup": r0.get("measured_speedup"), "parameters": r0.get("parameters"),
    }


def select_at(jr: JointRun, method, name: str, target: dict, joint: JointConfig, seed: int,
              evaluate: Callable[[JointSelection], dict]) -> dict:
    """One method's selection at one target, its estimates, scores and measured speedup (the record compared).

    ``evaluate(selection)``: the objective's scores of the dense model through the selection's gates, merged
    into the record. A method that cannot reach the target gives ``{"unreachable": reason}`` (logged).
    """
    t0 = time.perf_counter()
    try:
        sel, aimed = select_target(jr, method, target)
        share = check_selection(sel, jr.problem, aimed, who=name)
    except ValueError as e:
        log.warning("%s cannot reach %s: %s", name, target["label"], e)
        return {"unreachable": str(e)}
    t1 = time.perf_counter()
    scores = evaluate(sel)
    heads, neurons = sel.counts(jr.table.n_layers)
    rec = {"selection": sel.to_dict(), "estimated_share": share,
           "estimated_speedup": estimated_speedups(jr.tables, heads, neurons),
           "heads_per_layer": heads, "neurons_per_layer": neurons, **scores,
           "seconds": {"select": t1 - t0, "evaluate": time.perf_counter() - t1}}
    if aimed != target["share"]:  # --speedup-at each: the mean's target it took to bound every shape
        rec["aimed_share"] = aimed
    if joint.speedup_budget:
        model = jr.run.model
        pruned = build_pruned(model, sel)
        rec["measured_speedup"] = measure_speedup(model, pruned, joint.cost_shapes, joint.speedup_budget,
                                                  joint.speedup_threads, seed=seed)
        rec["parameters"] = count_parameters(pruned)
    return rec


def _methods(ccfg) -> list[str]:
    """The joint methods to compare: CAHP first; `cahp compare`'s heads-only default stands for the joint one."""
    from cahp.pipelines.compare import DEFAULT_METHODS

    methods = DEFAULT_JOINT_METHODS if list(ccfg.methods) == DEFAULT_METHODS else list(ccfg.methods)
    unknown = [m for m in methods if m not in JOINT_METHODS]
    if unknown:
        raise JointSetupError(f"method {', '.join(unknown)} has no joint (heads + neurons) version; with --ffn "
                              f"choose from {', '.join(JOINT_METHODS)}")
    return ["cahp", *dict.fromkeys(m for m in methods if m != "cahp")]


def run_compare_ffn(cfg: PruneConfig, ft_cfg: FinetuneConfig, ccfg, joint: JointConfig | None = None,
                    progress: bool = True, dense_ft: FinetuneConfig | None = None):
    """Compare the joint methods at equal estimated speed (see the module docstring); returns a `CompareResult`.

    Args:
        cfg, ft_cfg, dense_ft: as for `cahp.pipelines.compare.run_compare` (``cfg.ffn`` set).
        ccfg: a `cahp.pipelines.compare.CompareConfig` (methods, speedups, seeds, parts).
        joint: the joint pipeline's settings (cost source and shapes, curve grid, timing budget).
    """
    from cahp.pipelines.compare import CompareResult, _dense_finetune_config

    joint = joint or JointConfig()
    methods = _methods(ccfg)
    speedups = check_targets(cfg, ccfg)
    joint.weights()  # bad head weights: a one-line error before any work
    task, ft_cfg, _ = check_run(dataclasses.replace(cfg, target_speedup=0.0), ft_cfg)
    with output_folder(Path(cfg.output_dir)) as out:
        dense = _dense_finetune_config(out, ft_cfg, cfg, dense_ft)
        jr = prepare_joint(cfg, dense, out, progress, joint, task)
        report = _CompareFfn(cfg, ft_cfg, ccfg, joint, jr, methods, speedups, progress).run()
        return CompareResult(output_dir=out, report=report)


class _CompareFfn(MethodsBySeed):
    """One compare --ffn call: targets, per-method selections, timings, fine-tunings and the report."""

    registry = JOINT_METHODS

    def __init__(self, cfg, ft_cfg, ccfg, joint, jr: JointRun, methods, speedups, progress):
        self.cfg, self.ft_cfg, self.ccfg, self.joint, self.jr = cfg, ft_cfg, ccfg, joint, jr
        self.methods, self.speedups, self.progress = methods, speedups, progress
        run = jr.run
        self.run_, self.model, self.tok, self.task = run, run.model, run.tokenizer, run.task
        self.split = self.task.test_split
        self.labels = np.asarray([ex.label for ex in self.task.load(self.split)])
        self.seeds = [cfg.seed + i for i in range(ccfg.seeds)]
        self.shapes = (tuple(kept_mask(self.model).shape), tuple(neuron_shape(self.model.config)))
        self.cache = StageCache(run.out / "compare-ffn", log_level=logging.DEBUG,
                                base={"curve": cache_base(jr), "eval_data": run.keys["eval_data"]})

    # --- setup ------------------------------------------------------------------------------
    def build(self, name: str, seed: int):
        """A joint method by registry name with the run's shared ``--ffn`` settings (`make_method`)."""
        return make_method(name, seed, self.joint)

    def targets(self) -> list[dict]:
        out, self.knee = compare_targets(self.jr, self.cfg, self.ccfg, self.speedups, self.progress)
        return out

    # --- per (method, target, selection seed) --------------------------------------------------
    def gated_test(self, sel: JointSelection) -> dict:
        hg, ng = sel.gate_values(*self.shapes)
        with head_gates(self.model, init=hg), neuron_gates(self.model, init=ng):
            return evaluate_task(self.model, self.tok, self.task, max_length=self.ft_cfg.max_length,
                                 seed=self.cfg.seed, keep_predictions=True, progress=False)

    def selection(self, name: str, sseed: int | None, target: dict) -> dict:
        """Selection, estimates, held-out and gated test scores, measured speedup (one cached result)."""
        method = self.method(name, sseed)
        key = {"part": "select", "method": name, "settings": method.settings(), "share": target["share"],
               "speedup_budget": self.joint.speedup_budget, "threads": self.joint.speedup_threads,
               "max_length": self.ft_cfg.max_length, **target_key(target)}

        def compute() -> dict:
            rec = select_at(self.jr, method, name, target, self.joint, self.cfg.seed,
                            lambda sel: {"heldout_accuracy": HeldOut.of(self.jr.problem.score(sel)).score,
                                         "test": self.gated_test(sel)})
            if "unreachable" not in rec:
                log.info("%s at %s%s: %d heads, %d neurons, estimated share %.3f, no fine-tuning %s accuracy %.4f",
                         name, target["label"], "" if sseed is None else f" seed {sseed}",
                         sum(rec["heads_per_layer"]), sum(rec["neurons_per_layer"]), rec["estimated_share"],
                         self.split, rec["test"][self.split]["accuracy"])
            return rec

        tag = "all" if sseed is None else f"s{sseed}"
        return self.cache.get_or_compute(f"select-{name}-{target['label']}-{tag}", key, compute)

    def finetuned(self, what: str, rec: dict | None, ft: FinetuneConfig) -> dict:
        """One fine-tuning and the test evaluation of a selection (``rec``), or of the dense model (None)."""
        key = {"part": "finetune", "what": what, "finetune_after": finetune_key(ft), "split": self.split,
               "selection": None if rec is None else built_from(rec["selection"])}
        name = f"ft-{what}-s{ft.seed}{kd_tag(ft)}"

        def compute() -> dict:
            t0 = time.perf_counter()
            if rec is None:
                m = copy.deepcopy(self.model)
            else:
                m = build_pruned(self.model, JointSelection.from_dict(rec["selection"]))
            res = finetune(m, self.tok, self.task, ft, train_examples=self.run_.train_examples,
                           checkpoint=self.cache.epoch_checkpoint(name, key), teacher=self.model,
                           progress=self.progress)
            t1 = time.perf_counter()
            test = evaluate_task(m, self.tok, self.task, max_length=ft.max_length, seed=ft.seed,
                                 keep_predictions=True, progress=False)
            log.info("fine-tuned %s (seed %d): %s accuracy %.4f", what, ft.seed, self.split,
                     test[self.split]["accuracy"])
            return {"test": test, "finetune": {"best_epoch": res.best_epoch, "epochs_run": len(res.history),
                                               "best_dev": res.best_dev},
                    "parameters": count_parameters(m), "seconds": {"finetune": t1 - t0,
                                                                   "evaluate": time.perf_counter() - t1}}

        return self.cache.get_or_compute(name, key, compute)

    def heads_only(self) -> dict:
        """The paper's CAHP at its own k*: kept heads, measured speedup (one cached result)."""
        run = self.run_
        points = curve(run, cahp_selector(self.cfg), self.progress)["points"]
        knee = find_k_star(points, self.cfg)
        mask = cahp_selector(self.cfg).select(knee.k, run.stats, run.context())
        heads = mask_to_heads(mask)
        sel = JointSelection(heads={int(k): v for k, v in heads.items()},
                             neurons={i: list(range(self.shapes[1][1])) for i in range(self.shapes[1][0])})
        key = {"part": "heads-only", "k": knee.k, "kept": heads, "speedup_budget": self.joint.speedup_budget}

        def compute() -> dict:
            rec = {"selection": sel.to_dict(), "k": knee.k, "estimated_share": sel.share(self.jr.table),
                   "heads_per_layer": sel.counts(self.shapes[0][0])[0]}
            if self.joint.speedup_budget:
                rec["measured_speedup"] = measure_speedup(self.model, build_pruned(self.model, sel),
                                                          self.joint.cost_shapes, self.joint.speedup_budget,
                                                          self.joint.speedup_threads, seed=self.cfg.seed)
            return rec

        return self.cache.get_or_compute("heads-only", key, compute)

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        targets = self.targets()
        log.info("compare --ffn %s on %s: targets %s; methods %s; seeds %s", self.cfg.model, self.task.name,
                 ", ".join(f"{t['label']} (share {t['share']:.3f})" for t in targets), ", ".join(self.methods),
                 self.seeds)
        sels = {(m, s, t["label"]): self.selection(m, s, t) for m in self.methods for s in self.sel_seeds(m)
                for t in targets}
        heads_only = self.heads_only()
        self.write(self.report(targets, sels, heads_only, None, None, t0, partial=self.ccfg.finetune))
        fine, dense, heads_ft = {}, {}, {}
        if self.ccfg.finetune:
            for seed in self.seeds:
                ft = dataclasses.replace(self.ft_cfg, seed=seed)
                if self.ccfg.dense_control:
                    dense[seed] = self.finetuned("dense", None, ft)
                heads_ft[seed] = self.finetuned("cahp-heads", heads_only, ft)
                for t in targets:
                    for m in self.methods:
                        rec = sels[(m, seed if JOINT_METHODS[m][0].seeded else None, t["label"])]
                        if "unreachable" not in rec:
                            fine[(m, seed, t["label"])] = self.finetuned(f"{m}-{t['label']}", rec, ft)
        report = self.report(targets, sels, heads_only, fine if self.ccfg.finetune else None, dense, t0,
                             partial=False, heads_ft=heads_ft)
        self.write(report)
        return report

    # --- report -------------------------------------------------------------------------------
    def correct(self, rec: dict) -> np.ndarray:
        return np.asarray(rec["test"][self.split]["predictions"]) == self.labels

    def _acc(self, recs: list[dict]) -> dict:
        acc = np.array([r["test"][self.split]["accuracy"] for r in recs])
        return {"accuracy": float(acc.mean()), "accuracy_per_seed": acc.tolist(),
                "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0}

    def report(self, targets, sels, heads_only, fine, dense, t0, partial, heads_ft=None) -> dict:
        n_boot, seed0 = self.ccfg.n_bootstrap, self.cfg.seed
        results = {}
        for t in targets:
            label = t["label"]
            results[label] = {}
            have_cahp = bool(fine) and all(("cahp", s, label) in fine for s in self.seeds)
            cahp_ft = [fine[("cahp", s, label)] for s in self.seeds] if have_cahp else None
            for m in self.methods:
                recs = [sels[(m, s, label)] for s in self.sel_seeds(m)]
                if "unreachable" in recs[0]:
                    results[label][m] = {"unreachable": recs[0]["unreachable"]}
                    continue
                r0 = recs[0]
                row = {
                    **selection_row(recs),
                    "heldout_accuracy": float(np.mean([r["heldout_accuracy"] for r in recs])),
                    "no_finetune": self._acc(recs), "info": r0["selection"]["info"],
                }
                if m != "cahp":
                    row["no_finetune"]["vs_cahp"] = compare_to_cahp(
                        [self.correct(r) for r in recs], [self.correct(sels[("cahp", None, label)])], n_boot, seed0)
                if fine and all((m, s, label) in fine for s in self.seeds):
                    frecs = [fine[(m, s, label)] for s in self.seeds]
                    row["finetuned"] = self._acc(frecs)
                    row["finetuned"]["best_epochs"] = [r["finetune"]["best_epoch"] for r in frecs]
                    if m != "cahp" and cahp_ft:
                        row["finetuned"]["vs_cahp"] = compare_to_cahp([self.correct(r) for r in frecs],
                                                                      [self.correct(r) for r in cahp_ft],
                                                                      n_boot, seed0, self.seeds)
                results[label][m] = row
        dense_out = None
        if dense:
            recs = [dense[s] for s in self.seeds]
            dense_out = self._acc(recs)
            dense_out["vs_cahp"] = {}
            for t in targets:
                if fine and all(("cahp", s, t["label"]) in fine for s in self.seeds):
                    dense_out["vs_cahp"][t["label"]] = compare_to_cahp(
                        [self.correct(r) for r in recs], [self.correct(fine[("cahp", s, t["label"])])
                                                          for s in self.seeds], n_boot, seed0, self.seeds)
        ho = {k: v for k, v in heads_only.items() if k != "selection"}
        ho["kept"] = heads_only["selection"]["heads"]
        if heads_ft:
            ho["finetuned"] = self._acc([heads_ft[s] for s in self.seeds])
        run = self.run_
        dense_test = {s: {k: v for k, v in r.items() if k != "predictions"} for s, r in run.dense_info["test"].items()}
        return {
            "model": self.cfg.model, "task": self.task.name, "test_split": self.split, "ffn": True,
            "partial": partial,
            "settings": {"prune": asdict(self.cfg), "finetune_after": {k: v for k, v in asdict(self.ft_cfg).items()
                                                                       if k != "seed"},
                         "compare": asdict(self.ccfg), "joint": asdict(self.joint), "seeds": self.seeds,
                         "methods": {m: self.method(m, self.sel_seeds(m)[0]).settings() for m in self.methods}},
            "data": {"finetune_examples": len(run.train_examples), "curve_examples": len(run.curve_examples),
                     "calibration_examples": len(run.calibration_examples), "test_examples": len(self.labels)},
            "statistics": STATISTICS, "verdict_rule": VERDICT_RULE,
            "cost_table": cost_summary(self.jr.tables),
            "knee": self.knee, "targets": targets,
            "dense": {"test": dense_test, "control": dense_out},
            "heads_only": ho,
            "results": results,
            "timings": {"total_seconds": round(time.perf_counter() - t0, 1), "stages": run.stages.times,
                        "results_cached": self.cache.hits, "results_computed": self.cache.computed},
            "environment": environment(),
        }

    def write(self, report: dict) -> None:
        from cahp.pipelines.plots import plot_frontier

        out = self.run_.out
        distributed.on_main(write_json, out / "compare_ffn.json", report)
        distributed.on_main(write_atomic, out / "compare_ffn.md", render_ffn_markdown(report))
        distributed.on_main(plot_frontier, report, out / "frontier.png")
