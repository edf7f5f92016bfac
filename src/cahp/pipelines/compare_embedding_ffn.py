"""`cahp compare --objective embedding --ffn`: the joint (heads + FFN neurons) peers on an embedding model, no labels.

The combination of `cahp.pipelines.compare_ffn` (the joint peers at equal
estimated speed) and `cahp.pipelines.compare_embedding` (distillation after
surgery, zero-shot similarity scores, paired bootstrap over the test pairs),
built from their pieces:

- the run is `cahp prune --objective embedding --ffn`'s (`prepare_embedding`,
  then `cahp.pipelines.embedding_joint.embedding_joint_run`): the same texts,
  dense targets, signatures, neuron statistics of the noisy-target embedding
  loss, cost tables and CAHP's joint curve scored on the similarity task's dev
  split (never its test split), all from the same stage cache;
- targets (`compare_ffn.compare_targets`): CAHP's knee on that curve and the
  estimated speedups ``--speedups`` (default 1.5x, 2x, 3x), the same estimated
  share for every method (`compare_ffn.select_at`, which also times the pruned
  model against the dense one);
- peers (`compare_ffn.DEFAULT_JOINT_METHODS`: cahp, fisher, p-pruning,
  gradient, random, layer-drop). Their statistics are label-free already (the
  joint problem's salience and Fisher diagonals come from the embedding loss,
  CAHP's choice of split from the dev Spearman), except Kwon et al.'s
  rearrangement, whose per-batch gate gradients the registry takes of the
  labelled loss: it is swapped for `cahp.selectors.label_free.LabelFreeJointFisher`
  (the same noisy-target embedding loss as the neuron pass). A method not known
  to run without labels (`LABEL_FREE`) is left out with a logged reason, recorded
  in the report's ``excluded``;
- per (method, target, selection seed): scores through head and neuron gates
  (held-out fidelity, dev and test Spearman); per compare seed: surgery (tuned
  gates folded in), the same distillation as `compare_embedding`
  (`compare_embedding.distill_pruned`) and the test scores;
- statistics and verdicts as `compare_embedding` (`spearman_summary`,
  `dense_summary`): every system's Spearman on the same bootstrap resamples of
  the test pairs, pooled over seeds, CAHP's verdict. The dense model is a row of
  its own; it is the teacher, so there is no dense distillation control (as in
  `compare_embedding`).

Outputs, as `cahp compare --ffn` names them (a heads-only `cahp compare --objective
embedding` in the same folder keeps its compare.json): ``compare_ffn.json``,
``compare_ffn.md`` (`report_ffn.target_table` per target), ``frontier.png``
(test Spearman against measured speedup); every result cached under
``OUTPUT/compare-ffn/``, keyed by the joint curve's key (which holds the run's
identity and the loss) and its own settings.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cahp.budget.cost import cost_summary
from cahp.core import distributed
from cahp.core.io import environment, write_atomic, write_json
from cahp.deploy.sentence import pooling_modes
from cahp.model.gates import head_gates
from cahp.model.heads import kept_mask
from cahp.model.neurons import neuron_gates, neuron_shape
from cahp.model.surgery import count_parameters
from cahp.pipelines import plots
from cahp.pipelines.cache import StageCache
from cahp.pipelines.compare import CompareConfig, CompareResult, check_compare_run
from cahp.pipelines.compare_embedding import (
    SCORE_BOOTSTRAP,
    STATISTICS,
    dense_summary,
    distill_pruned,
    spearman_summary,
)
from cahp.pipelines.compare_ffn import (
    _methods,
    build_pruned,
    built_from,
    cache_base,
    check_targets,
    compare_targets,
    make_method,
    select_at,
    selection_row,
    target_key,
)
from cahp.pipelines.compare_methods import MethodsBySeed
from cahp.pipelines.embedding import (
    EMBEDDING_OBJECTIVES,
    NO_SIMILARITY,
    SALIENCE_TARGET_NOISE,
    EmbeddingRun,
    dense_scores,
    prepare_embedding,
    salience_loss,
    score_gates,
)
from cahp.pipelines.embedding_joint import embedding_joint_run
from cahp.pipelines.guard import output_folder
from cahp.pipelines.joint import JointRun, check_settings
from cahp.pipelines.joint_config import JointConfig
from cahp.pipelines.report_ffn import cost_lines, target_table
from cahp.pipelines.verdicts import VERDICT_RULE
from cahp.selectors.joint_base import JointSelection
from cahp.selectors.joint_fisher import KwonJointFisher
from cahp.selectors.joint_methods import CahpJoint, GradientJoint, LayerDropJoint, PPruningJoint, RandomJoint
from cahp.selectors.label_free import LabelFreeJointFisher
from cahp.selectors.registry import JOINT_METHODS
from cahp.train.finetune import FinetuneConfig
from cahp.train.metrics import PairedSpearman
from cahp.train.teacher import finetune_key

log = logging.getLogger(__name__)

__all__ = ["LABEL_FREE", "render_markdown", "run_compare_embedding_ffn"]

#: Joint method classes that run without labels here, and what each one's selection reads instead.
LABEL_FREE: dict[type, str] = {
    CahpJoint: "salience of the noisy-target embedding loss; head/neuron split chosen on the dev Spearman",
    GradientJoint: "salience of the noisy-target embedding loss",
    RandomJoint: "seeded uniform values (no data)",
    PPruningJoint: "neuron activation correlations, head distances, embedding-loss salience",
    LayerDropJoint: "layer order only (no data)",
    KwonJointFisher: "Fisher diagonals and per-batch gate gradients of the noisy-target embedding loss "
                     "(LabelFreeJointFisher)",
}


def _check(cfg, ccfg: CompareConfig, joint: JointConfig) -> list[float]:
    """Every setting that can fail, before any work (one-line errors); returns the speedups."""
    if cfg.objective not in EMBEDDING_OBJECTIVES:
        raise ValueError(f"objective {cfg.objective!r} is not one of {', '.join(EMBEDDING_OBJECTIVES)}")
    if cfg.similarity_task.lower() in NO_SIMILARITY:
        raise ValueError("cahp compare --objective embedding --ffn compares test Spearman on a similarity task; "
                         "give --similarity-task (e.g. stsb), not none")
    speedups = check_targets(cfg, ccfg)
    check_settings(cfg, joint)  # cost source, linkage, shapes, head weights, grid
    check_compare_run(cfg, ccfg)
    return speedups


def run_compare_embedding_ffn(cfg, ft_cfg: FinetuneConfig | None = None, ccfg: CompareConfig | None = None,
                              joint: JointConfig | None = None, progress: bool = True) -> CompareResult:
    """Compare the joint peers at equal estimated speed on the embedding objective (see the module docstring).

    Args:
        cfg: the settings shared with `cahp prune --objective embedding --ffn` (model, texts, similarity task,
            output folder, seed; ``--keep``, ``--keep-ratio`` and ``--target-speedup`` are refused: the targets
            are ``ccfg.speedups`` and the knee).
        ft_cfg: the distillation after pruning, the same for every method; its seed is replaced by each compare
            seed (the training texts are the prepared run's, sampled with ``cfg.seed``).
        ccfg: methods, speedups, knee, seeds, parts, bootstrap resamples (``budgets`` and ``dense_control`` do
            not apply: the targets are speedups, and the dense model is the teacher).
        joint: the joint pipeline's settings (cost source and shapes, curve grid, timing budget).

    Returns:
        A `CompareResult`; compare_ffn.json, compare_ffn.md and frontier.png are written.
    """
    ft_cfg = ft_cfg or FinetuneConfig(seed=cfg.seed)
    ccfg = ccfg or CompareConfig()
    joint = joint or JointConfig()
    asked = _methods(ccfg)  # unknown names: a one-line error
    speedups = _check(cfg, ccfg, joint)
    methods, excluded = [], {}
    for name in asked:
        cls = JOINT_METHODS[name][0]
        if cls in LABEL_FREE:
            methods.append(name)
        else:
            excluded[name] = f"{cls.__name__} is not known to select without labels"
            log.warning("left out of the comparison: %s (%s)", name, excluded[name])
    with output_folder(Path(cfg.output_dir)) as out:
        # the prepared run's distillation subset and targets are drawn with --seed, as `cahp prune` draws them
        ft_cfg = dataclasses.replace(ft_cfg, seed=cfg.seed)
        run = prepare_embedding(cfg, ft_cfg, out, progress)
        jr = embedding_joint_run(run, joint, progress)
        report = _EmbeddingFfnCompare(cfg, ft_cfg, ccfg, joint, run, jr, methods, excluded, speedups,
                                      progress).run()
        return CompareResult(output_dir=out, report=report)


class _EmbeddingFfnCompare(MethodsBySeed):
    """One call: targets, per-method selections through gates, distillations, and the report."""

    registry = JOINT_METHODS

    def __init__(self, cfg, ft_cfg: FinetuneConfig, ccfg: CompareConfig, joint: JointConfig, run: EmbeddingRun,
                 jr: JointRun, methods: list[str], excluded: dict, speedups: list[float], progress: bool):
        self.cfg, self.ft_cfg, self.ccfg, self.joint, self.run_, self.jr = cfg, ft_cfg, ccfg, joint, run, jr
        self.methods, self.excluded, self.speedups, self.progress = methods, excluded, speedups, progress
        self.seeds = [cfg.seed + i for i in range(ccfg.seeds)]
        self.shapes = (tuple(kept_mask(run.model).shape), tuple(neuron_shape(run.model.config)))
        self.test = run.similarity["test"]
        self.boot = PairedSpearman(self.test.labels, ccfg.n_bootstrap, cfg.seed)
        # the neuron pass's loss (the joint problem's Fisher diagonals): Kwon et al.'s rearrangement takes the
        # per-batch gradients of the same loss on the same calibration batches
        self.fisher_loss = salience_loss(run.targets["calibration"], run.settings, run.distance, cfg.seed)
        # jr.key holds the run's identity (texts, similarity data, seed), the loss and the cost tables
        self.cache = StageCache(run.out / "compare-ffn", base={"curve": cache_base(jr)}, log_level=logging.DEBUG)

    # --- methods ---------------------------------------------------------------------------------------
    def build(self, name: str, seed: int):
        """A joint method (`make_method`); Kwon et al.'s gets the embedding loss for its gradients."""
        m = make_method(name, seed, self.joint)
        if isinstance(m, KwonJointFisher):
            init = {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.init}
            # mask tuning fits the last FFN at the first token only where the embedding reads only that
            # token (CLS pooling); mean or max pooling reads every token
            init["cls_last"] = pooling_modes(self.run_.settings["pooling"]) == ["cls"]
            m = LabelFreeJointFisher(**init, loss_fn=self.fisher_loss)
        return m

    # --- per (method, target, selection seed) ----------------------------------------------------------
    def gated(self, sel: JointSelection) -> dict:
        """Held-out fidelity, dev Spearman and test scores (with predictions) of the dense model through the
        selection's head (L, H) and neuron (L, d_ff) gates."""
        run = self.run_
        hg, ng = sel.gate_values(*self.shapes)
        point = score_gates(run, hg, ng)
        with head_gates(run.model, init=hg), neuron_gates(run.model, init=ng):
            test = self.test.evaluate(run.model, run.settings, seed=self.cfg.seed, n_bootstrap=SCORE_BOOTSTRAP)
        return {"heldout_fidelity": point["fidelity"], "similarity_dev_spearman": point["similarity_dev_spearman"],
                "similarity_test": test}

    def selection(self, name: str, sseed: int | None, target: dict) -> dict:
        method = self.method(name, sseed)
        key = {"part": "select", "method": name, "settings": method.settings(), "share": target["share"],
               "speedup_budget": self.joint.speedup_budget, "threads": self.joint.speedup_threads,
               "score_bootstrap": SCORE_BOOTSTRAP, **target_key(target)}

        def compute() -> dict:
            rec = select_at(self.jr, method, name, target, self.joint, self.cfg.seed, self.gated)
            if "unreachable" not in rec:
                log.info("%s at %s%s: %d heads, %d neurons, estimated share %.3f, no distillation: fidelity %.4f, "
                         "test Spearman %.4f", name, target["label"], "" if sseed is None else f" seed {sseed}",
                         sum(rec["heads_per_layer"]), sum(rec["neurons_per_layer"]), rec["estimated_share"],
                         rec["heldout_fidelity"], rec["similarity_test"]["spearman"])
            return rec

        tag = "all" if sseed is None else f"s{sseed}"
        return self.cache.get_or_compute(f"embedding-select-{name}-{target['label']}-{tag}", key, compute)

    def distilled(self, name: str, label: str, rec: dict, ft: FinetuneConfig) -> dict:
        """Surgery to a selection (tuned gates folded in), one distillation, the scores (one cached result)."""
        key = {"part": "distilled", "method": name, "selection": built_from(rec["selection"]),
               "distill": finetune_key(ft), "score_bootstrap": SCORE_BOOTSTRAP}
        stage = f"embedding-ft-{name}-{label}-s{ft.seed}"

        def compute() -> dict:
            t0 = time.perf_counter()
            model = build_pruned(self.run_.model, JointSelection.from_dict(rec["selection"]))
            out = distill_pruned(self.run_, model, ft, f"{name} at {label}", self.progress,
                                 self.cache.epoch_checkpoint(stage, key))
            out["seconds"]["distill"] += time.perf_counter() - t0 - sum(out["seconds"].values())  # surgery too
            return out

        return self.cache.get_or_compute(stage, key, compute)

    # --- the run ---------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        targets, self.knee = compare_targets(self.jr, self.cfg, self.ccfg, self.speedups, self.progress)
        log.info("compare (%s) --ffn %s: targets %s; methods %s; seeds %s", self.cfg.objective, self.cfg.model,
                 ", ".join(f"{t['label']} (share {t['share']:.3f})" for t in targets), ", ".join(self.methods),
                 self.seeds)
        sels = {(m, s, t["label"]): self.selection(m, s, t) for m in self.methods for s in self.sel_seeds(m)
                for t in targets}
        self.dense = dense_scores(self.run_)
        self.write(self.report(targets, sels, None, t0, partial=self.ccfg.finetune))
        fine = None
        if self.ccfg.finetune:
            fine = {}
            for seed in self.seeds:
                ft = dataclasses.replace(self.ft_cfg, seed=seed)
                for t in targets:
                    for m in self.methods:
                        rec = sels[(m, self.selection_seed(m, seed), t["label"])]
                        if "unreachable" not in rec:
                            fine[(m, seed, t["label"])] = self.distilled(m, t["label"], rec, ft)
        report = self.report(targets, sels, fine, t0, partial=False)
        self.write(report)
        return report

    # --- report ----------------------------------------------------------------------------------------
    def report(self, targets: list[dict], sels: dict, fine: dict | None, t0: float, partial: bool) -> dict:
        cfg, run = self.cfg, self.run_
        results, cahp_best = {}, {}
        for t in targets:
            label = t["label"]
            results[label] = {}
            cahp_pre = sels[("cahp", None, label)]
            cahp_pre = None if "unreachable" in cahp_pre else [cahp_pre]
            have_ft = fine is not None and all(("cahp", s, label) in fine for s in self.seeds)
            cahp_ft = [fine[("cahp", s, label)] for s in self.seeds] if have_ft else None
            if cahp_pre:  # the dense row's comparison: CAHP after distillation where it ran
                cahp_best[label] = cahp_ft or cahp_pre
            for m in self.methods:
                sseeds = self.sel_seeds(m)
                recs = [sels[(m, s, label)] for s in sseeds]
                if "unreachable" in recs[0]:
                    results[label][m] = {"unreachable": recs[0]["unreachable"]}
                    continue
                r0 = recs[0]
                row = {
                    **selection_row(recs),
                    "similarity_dev_spearman": float(np.mean([r["similarity_dev_spearman"] for r in recs])),
                    "no_finetune": spearman_summary(self.boot, recs, [s for s in sseeds if s is not None],
                                                    None if m == "cahp" else cahp_pre),
                    "info": r0["selection"]["info"],
                }
                if fine is not None and all((m, s, label) in fine for s in self.seeds):
                    frecs = [fine[(m, s, label)] for s in self.seeds]
                    row["finetuned"] = spearman_summary(self.boot, frecs, self.seeds,
                                                        None if m == "cahp" else cahp_ft)
                    row["finetuned"]["best_epochs"] = [r["distillation"]["best_epoch"] for r in frecs]
                results[label][m] = row
        problem = self.jr.problem
        dense = dense_summary(self.dense, self.boot, cahp_best, heads=int(problem.heads_present.sum()),
                              neurons=int(problem.neurons_present.sum()), parameters=count_parameters(run.model))
        return {
            "model": cfg.model, "objective": cfg.objective, "embedding_distance": run.distance,
            "task": run.identity["similarity_task"],  # the task the methods are compared on (zero-shot)
            "similarity_task": run.identity["similarity_task"], "texts": run.source, "test_split": "test",
            "ffn": True, "score": "spearman", "partial": partial,
            "settings": {
                "prune": asdict(cfg), "distillation": {k: v for k, v in asdict(self.ft_cfg).items() if k != "seed"},
                "compare": asdict(self.ccfg), "joint": asdict(self.joint), "seeds": self.seeds,
                "methods": {m: self.method(m, self.sel_seeds(m)[0]).settings() for m in self.methods},
                "label_free": {m: LABEL_FREE[JOINT_METHODS[m][0]] for m in self.methods},
                "salience_target_noise": SALIENCE_TARGET_NOISE, "score_bootstrap": SCORE_BOOTSTRAP,
            },
            "excluded": self.excluded,
            "data": {**{f"{k}_texts": len(ds) for k, ds in run.datasets.items()},
                     **{f"similarity_{k}_pairs": len(s) for k, s in run.similarity.items()}},
            "statistics": STATISTICS, "verdict_rule": VERDICT_RULE,
            "cost_table": cost_summary(self.jr.tables),
            "knee_score": run.knee_score, "knee": self.knee, "targets": targets,
            "dense": dense,
            "results": results,
            "timings": {"total_seconds": round(time.perf_counter() - t0, 1), "stages": run.stages.times,
                        "results_cached": self.cache.hits, "results_computed": self.cache.computed},
            "environment": environment(),
        }

    def write(self, report: dict) -> None:
        out = self.run_.out
        distributed.on_main(write_json, out / "compare_ffn.json", report)
        distributed.on_main(write_atomic, out / "compare_ffn.md", render_markdown(report))
        # test Spearman (distilled where it ran) against measured speedup; the dense model is the teacher
        distributed.on_main(plots.plot_frontier, report, out / "frontier.png", key="spearman",
                            ylabel="similarity task: test Spearman x 100", untuned="distillation",
                            title=f"{report['model']} / {report['objective']}: heads + FFN neurons", teacher=True)


# --- outputs --------------------------------------------------------------------------------------------


def render_markdown(report: dict) -> str:
    """compare_ffn.md of the embedding objective: settings, then `report_ffn.target_table` per target with test
    Spearman x 100 before and after the distillation and CAHP's verdict, from the JSON alone."""
    st, dense = report["settings"], report["dense"]
    dist = st["distillation"]
    shapes = report["cost_table"]["shapes"]
    lines = [
        f"# cahp compare --ffn: {report['model']} / {report['objective']} (no labels)", "",
        f"- texts: {report['texts']}; similarity task `{report['similarity_task']}`, test split "
        f"({report['data'].get('similarity_test_pairs')} pairs), zero-shot; Spearman x 100",
        f"- dense model: test Spearman {dense['spearman'] * 100:.2f}, Pearson {dense['pearson'] * 100:.2f}; "
        f"{dense['heads']} heads, {dense['neurons']} FFN neurons (the teacher: no dense distillation control)",
        f"- targets: {', '.join(t['label'] for t in report['targets'])} (estimated speedups"
        + (f"; the knee: CAHP's, on {report['knee_score']}" if any(t["label"] == "knee" for t in report["targets"])
           else "") + f"); cost table {report['cost_table']['source']}; speedups dense / pruned latency, "
        "1 thread, median [95% interval]",
        f"- seeds: {st['seeds']}; distillation after pruning ({report['embedding_distance']} distance to the dense "
        f"embeddings): {dist['epochs']} epochs max, lr {dist['lr']}, batch {dist['batch_size']}, patience "
        f"{dist['patience']} (early stopping on held-out fidelity)",
        f"- statistics: {report['statistics']}; {report['verdict_rule']}",
    ]
    lines += [f"- {m}: {how}" for m, how in st["label_free"].items()]
    lines += [f"- left out: {m} ({why})" for m, why in report["excluded"].items()]
    lines += [f"- {line}" for line in cost_lines(report) if line]
    if report.get("partial"):
        lines.append("- **partial**: the distillation results are still being computed")
    lines.append("")
    for t in report["targets"]:
        lines += target_table(report, t, shapes, score="spearman", columns=("no distillation", "distilled"))
        dv = dense["vs_cahp"].get(t["label"])
        if dv:
            p = dv["pooled"]
            lines += [f"Dense minus CAHP: {p['diff'] * 100:+.2f} [{p['ci95'][0] * 100:+.2f}, "
                      f"{p['ci95'][1] * 100:+.2f}] ({p['verdict']})", ""]
    lines.append("Verdicts are CAHP's (win: CAHP better).")
    return "\n".join(lines) + "\n"

