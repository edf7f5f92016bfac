"""`cahp compare`: CAHP against the baselines at the same budgets, with the same single fine-tuning.

Starts from `prepare_run`, so it uses the output folder layout and stage cache of
`cahp prune` (run in a prune folder, it reuses the fine-tuned dense model,
signatures, salience and CAHP's curve). Budgets: CAHP's own k* (the knee of
its curve, found as `cahp prune` finds it) and a grid of shares of the heads
(default 50%, 25%, 12.5%).

(a) No fine-tuning. Each method's curve over the whole k grid on the held-out
    curve data (training examples never fine-tuned on), through gates; and at
    each budget, its test score (through gates as well).
(b) One fine-tuning after surgery, the same `FinetuneConfig` for every method
    (early stopping on dev), for each seed; beside a dense control: the
    fine-tuned dense model fine-tuned again with the same budget.

Seeds: ``--seeds N`` runs seeds ``seed, seed+1, ..., seed+N-1``; a seed sets
the fine-tuning and the random selector. Deterministic selectors (CAHP with its
clustering seed fixed to ``--seed``, as in `cahp prune`) pick the same heads for
every seed. Without fine-tuning only the random selector varies with the seed.

Statistics (on the test split, paired on the same test examples):

- pooled (the verdict): per-example correctness averaged over the seeds of
  each method, then a paired bootstrap of method minus CAHP over the test
  examples (`cahp.pipelines.verdicts`). Its ``diff`` equals the
  difference of the mean accuracies over seeds; the interval covers the
  test-set sampling of that difference (seed-to-seed variation enters through
  the averaging, not as a separate variance term).
- per seed: the same paired bootstrap for each seed (method seed s against CAHP
  seed s), with a verdict each, and the count of wins, ties and losses.
- verdict, CAHP's: "win" when the 95% interval of (method - CAHP) lies below 0
  (CAHP better), "loss" when it lies above 0, else "tie" (the difference is
  inside the confidence interval: no evidence either way).

Every (method, budget, seed) result is cached in ``OUTPUT/compare/``, and every
method's curve in ``OUTPUT/stages/`` beside CAHP's (the one cache of both
pipelines, `cahp.pipelines.cache.StageCache`: atomic files keyed by their
settings), so an interrupted compare resumes and a re-run with more methods,
budgets or seeds only computes what is new. CAHP is one of the methods, built
and scored as the others; only the budget k* comes from its curve, through
`cahp prune`'s own `curve` and `find_k_star`.

Outputs: ``compare.json`` (all numbers, settings, timings), ``compare.md``
(tables and verdicts), ``compare.png`` (score against heads kept without
fine-tuning, one line per method), ``compare_layers.png`` (kept heads per
layer per method at each budget, with the mean relative depth). The report's
dict is assembled by `cahp.pipelines.compare_report` and rendered by
`cahp.pipelines.report`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cahp.budget.curve import score_mask
from cahp.core import distributed
from cahp.core.configs import field as cfg_field
from cahp.core.io import read_json
from cahp.model.gates import head_gates
from cahp.model.heads import mask_to_heads
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines.cache import StageCache
from cahp.pipelines.compare_methods import MethodsBySeed
from cahp.pipelines.compare_report import CompareReport
from cahp.pipelines.guard import check_run, clip_max_length, model_config, output_folder
from cahp.pipelines.report import (
    render_markdown,
    seconds_by_machine,
    verdict_lines,
    verdict_text,
)
from cahp.pipelines.stages import (
    PruneConfig,
    cahp_selector,
    curve,
    find_k_star,
    prepare_run,
)
from cahp.pipelines.verdicts import STATISTICS, VERDICT_RULE, compare_to_cahp, verdict
from cahp.selectors.base import check_mask
from cahp.selectors.fisher import fold_gates
from cahp.selectors.registry import JOINT_METHODS, KV_SELECTORS, SELECTORS
from cahp.train.evaluate import evaluate_task
from cahp.train.finetune import FinetuneConfig, finetune
from cahp.train.teacher import finetune_key, kd_tag

log = logging.getLogger(__name__)

DEFAULT_METHODS = ["cahp", "random", "magnitude", "gradient", "gradient-layernorm", "gradient-iterative",
                   "entropy", "fisher"]


@dataclass
class CompareConfig:
    """Settings of `cahp compare` beyond those of `cahp prune` and the fine-tuning."""

    methods: list[str] = cfg_field(DEFAULT_METHODS, "methods to compare (cahp is always included; --ffn and decoders "
                                   "take their own peers)", choices=list(dict.fromkeys([*SELECTORS, *JOINT_METHODS,
                                                                                      *KV_SELECTORS])),
                                   metavar="METHOD")
    budgets: list[float] = cfg_field([0.5, 0.25, 0.125], "budgets besides CAHP's k*, as shares of the heads kept",
                                     metavar="RATIO")
    seeds: int = cfg_field(3, "number of seeds (seed, seed+1, ...): fine-tuning and the random selector")
    knee: bool = cfg_field(True, "also compare at CAHP's own k* (knee of its curve)")
    finetune: bool = cfg_field(True, "fine-tune after pruning (part b); --no-finetune: only the comparison "
                                     "without fine-tuning")
    dense_control: bool = cfg_field(True, "fine-tune the dense model again with the same budget, as a control")
    n_bootstrap: int = cfg_field(10000, "paired bootstrap resamples")
    speedups: list[float] = cfg_field([1.5, 2.0, 3.0], "with --ffn: estimated speedups to compare at, besides CAHP's "
                                      "knee (the methods default to cahp, fisher, p-pruning, gradient, random, "
                                      "layer-drop)", metavar="X")


@dataclass
class CompareResult:
    """Where `run_compare` wrote its outputs, and its report (the content of compare.json)."""

    output_dir: Path
    report: dict = field(default_factory=dict)


def check_compare_run(cfg: PruneConfig, ccfg: CompareConfig) -> None:
    """The settings every label-free and decoder comparison checks alike (one-line ValueErrors): seeds,
    bootstrap resamples, an output folder, and a single process."""
    if ccfg.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    if ccfg.n_bootstrap < 1:
        raise ValueError("--n-bootstrap must be at least 1")
    if not cfg.output_dir:
        raise ValueError("an output folder is needed")
    if distributed.world_size() > 1:
        raise ValueError("cahp compare runs in a single process: start it without torchrun")


def _dense_finetune_config(out: Path, ft_cfg: FinetuneConfig, cfg: PruneConfig,
                           dense_ft: FinetuneConfig | None = None) -> FinetuneConfig:
    """The dense model's fine-tuning settings: those in OUTPUT/run.json, else ``dense_ft``, else ``ft_cfg``."""
    path = out / "run.json"
    base = dataclasses.replace(dense_ft or ft_cfg, seed=cfg.seed)
    if not path.is_file():
        return base
    stored = read_json(path).get("finetune")
    if not isinstance(stored, dict):
        return base
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    dense = FinetuneConfig(**{k: v for k, v in stored.items() if k in names})
    if asdict(dataclasses.replace(dense, seed=0)) != asdict(dataclasses.replace(ft_cfg, seed=0)):
        log.info("the dense model's fine-tuning settings come from %s; the fine-tuning options given apply "
                 "to the fine-tuning after pruning and to the dense control", path)
    return dense


def run_compare(cfg: PruneConfig, ft_cfg: FinetuneConfig | None = None, ccfg: CompareConfig | None = None,
                progress: bool = True, dense_ft: FinetuneConfig | None = None, joint=None,
                timing=None) -> CompareResult:
    """Compare CAHP with the baselines (see the module docstring); writes the outputs and returns the report.

    Args:
        cfg: the settings shared with `cahp prune` (model, task, output folder, data split, CAHP's
            distance / clustering / grid / knee rule, seed).
        ft_cfg: the single fine-tuning after pruning (and the dense control's extra fine-tuning);
            its seed is replaced by each compare seed.
        ccfg: methods, budgets, seeds, parts.
        dense_ft: the dense model's fine-tuning when the output folder holds no run yet (default:
            ``ft_cfg``); a folder that holds a run keeps the settings in its run.json.
        joint: with ``cfg.ffn``, the `cahp.pipelines.joint_config.JointConfig` (`cahp.pipelines.compare_ffn`).
        timing: on a generative decoder, the `cahp.bench.decode.DecodeTimingConfig` of its decode speed
            (default: that config's defaults).
    """
    from cahp.pipelines import decoder
    if decoder.prunes_as_lm(cfg):  # a generative decoder: KV-head budgets scored by held-out perplexity
        # (--decoder-head classifier: the heads-only comparison below, by task accuracy)
        from cahp.pipelines.compare_decoder import run_compare_decoder
        return run_compare_decoder(cfg, ft_cfg or FinetuneConfig(seed=cfg.seed), ccfg or CompareConfig(), progress,
                                   timing=timing)
    if cfg.ffn and cfg.objective == "task":  # heads and FFN neurons: every method at the same estimated speed
        from cahp.pipelines.compare_ffn import run_compare_ffn

        if distributed.world_size() > 1:
            raise ValueError("cahp compare runs in a single process: start it without torchrun")
        return run_compare_ffn(cfg, ft_cfg or FinetuneConfig(seed=cfg.seed), ccfg or CompareConfig(), joint,
                               progress, dense_ft)
    if cfg.ffn and cfg.objective != "task":  # label-free heads + FFN neurons: the joint peers, distilled
        from cahp.pipelines.compare_embedding_ffn import run_compare_embedding_ffn
        return run_compare_embedding_ffn(cfg, ft_cfg, ccfg, joint, progress)
    if cfg.objective != "task":  # label-free: the embedding objective's comparison, by distillation
        from cahp.pipelines.compare_embedding import run_compare_embedding
        return run_compare_embedding(cfg, ft_cfg, ccfg, progress)
    ft_cfg = ft_cfg or FinetuneConfig(seed=cfg.seed)
    ccfg = ccfg or CompareConfig()
    unknown = [m for m in ccfg.methods if m not in SELECTORS]
    if unknown:
        raise ValueError(f"unknown method {unknown}; choose from {', '.join(SELECTORS)}")
    if any(not 0 < r <= 1 for r in ccfg.budgets):
        raise ValueError(f"budgets are shares of the heads in (0, 1], got {ccfg.budgets}")
    if ccfg.seeds < 1:
        raise ValueError("--seeds must be at least 1")
    if not ccfg.budgets and not ccfg.knee:
        raise ValueError("no budget: give --budgets or keep --knee")
    if not cfg.output_dir:
        raise ValueError("an output folder is needed")
    if distributed.world_size() > 1:
        raise ValueError("cahp compare runs in a single process: start it without torchrun")
    task, ft_cfg, _ = check_run(cfg, ft_cfg)  # every split and option, before any work
    if task.is_regression:
        raise ValueError(f"cahp compare pairs per-example correctness, which a regression task ({task.name}) "
                         "does not have; use cahp prune for it")
    if dense_ft is not None:
        dense_ft = dataclasses.replace(dense_ft, max_length=clip_max_length(dense_ft.max_length,
                                                                           model_config(cfg.model)))
    with output_folder(Path(cfg.output_dir)) as out:  # log.txt, the lock, no new folder left by an early error
        return _Compare(cfg, ft_cfg, ccfg, out, progress, dense_ft, task).run()


class _Compare(CompareReport, MethodsBySeed):
    """One compare call: the prepared run, the budgets, part (a), part (b); its report from `CompareReport`."""

    registry = SELECTORS

    def __init__(self, cfg: PruneConfig, ft_cfg: FinetuneConfig, ccfg: CompareConfig, out: Path, progress: bool,
                 dense_ft: FinetuneConfig | None = None, task=None):
        self.cfg, self.ft_cfg, self.ccfg, self.out, self.progress = cfg, ft_cfg, ccfg, out, progress
        self.checked_task = task
        self.dense_ft_given = dense_ft
        self.seconds: dict[str, float] = {}

    # --- setup --------------------------------------------------------------------------------
    def run(self) -> CompareResult:
        t_total = time.perf_counter()
        cfg, ccfg = self.cfg, self.ccfg
        self.dense_ft = _dense_finetune_config(self.out, self.ft_cfg, cfg, self.dense_ft_given)
        run = self.prep = prepare_run(cfg, self.dense_ft, self.out, self.progress, self.checked_task)
        self.model, self.tok, self.task, self.stats = run.model, run.tokenizer, run.task, run.stats
        self.split = self.task.test_split
        self.labels = np.asarray([ex.label for ex in self.task.load(self.split)])
        self.ctx = run.context()
        n = self.stats.n
        self.methods = ["cahp", *dict.fromkeys(m for m in ccfg.methods if m != "cahp")]
        self.seeds = [cfg.seed + i for i in range(ccfg.seeds)]
        # every result evaluates on the test split: its files' digests are part of every key
        self.cache = StageCache(self.out / "compare", base={"signatures": run.keys["signatures"],
                                                            "salience": run.keys["salience"],
                                                            "eval_data": run.keys["eval_data"]},
                                log_level=logging.DEBUG)

        # the budget k*: the knee of CAHP's curve, by `cahp prune`'s own functions and stage cache
        t = time.perf_counter()
        self.ks = run.ks
        self.knee_curve = curve(run, cahp_selector(cfg), self.progress)
        self.knee = find_k_star(self.knee_curve["points"], cfg)
        self.seconds["cahp_curve_and_knee"] = time.perf_counter() - t
        budgets = [{"label": "k*", "k": self.knee.k, "ratio": self.knee.k / n}] if ccfg.knee else []
        budgets += [{"label": f"{r * 100:g}%", "k": max(1, round(r * n)), "ratio": r} for r in ccfg.budgets]
        self.budgets = budgets
        self.budget_ks = sorted({b["k"] for b in budgets}, reverse=True)
        log.info("compare %s on %s: k* = %d; budgets %s; methods %s; seeds %s", cfg.model, self.task.name,
                 self.knee.k, ", ".join(f"{b['label']}={b['k']}" for b in budgets), ", ".join(self.methods),
                 self.seeds)

        curves, pre = self.part_a()
        self.write(self.report(curves, pre, None, None, t_total, partial=ccfg.finetune))
        fine, dense = self.part_b(pre) if ccfg.finetune else (None, None)
        report = self.report(curves, pre, fine, dense, t_total, partial=False)
        self.write(report)
        return CompareResult(output_dir=self.out, report=report)

    def select(self, method: str, seed: int | None, k: int):
        sel = self.method(method, seed)
        t = time.perf_counter()
        mask, gates = sel.select_gates(k, self.stats, self.ctx)
        check_mask(mask, k, self.stats)
        info = sel.selection_info()
        return mask, gates, info, time.perf_counter() - t

    # --- (a) no fine-tuning -------------------------------------------------------------------
    def part_a(self):
        run = self.prep
        curves: dict[str, dict] = {}
        pre: dict[tuple[str, int | None, int], dict] = {}
        eval_key = {"max_length": self.dense_ft.max_length, "split": self.split}
        for method in self.methods:
            for sseed in self.sel_seeds(method):
                mk = self.method_key(method, sseed)
                curves[(method, sseed)] = curve(run, self.method(method, sseed), self.progress)
                for k in self.budget_ks:

                    def compute_pre(method=method, sseed=sseed, k=k):
                        mask, gates, info, s = self.select(method, sseed, k)
                        t0 = time.perf_counter()
                        heldout = score_mask(self.model, gates, run.curve_batches, run.curve_labels)
                        with head_gates(self.model, init=gates):
                            test = evaluate_task(self.model, self.tok, self.task, max_length=self.dense_ft.max_length,
                                                 seed=self.cfg.seed, keep_predictions=True, progress=self.progress)
                        rec = {"k": k, "kept": mask_to_heads(mask), "heldout_accuracy": heldout, "test": test,
                               "selection": info, "seconds": {"select": s, "evaluate": time.perf_counter() - t0}}
                        if not torch.equal(gates, mask.float()):
                            rec["gates"] = gates.tolist()
                        log.info("no fine-tuning: %s k=%d%s: %s accuracy %.4f", method, k,
                                 "" if sseed is None else f" seed {sseed}", self.split,
                                 test[self.split]["accuracy"])
                        return rec

                    pre[(method, sseed, k)] = self.cache.get_or_compute(
                        f"pre-{method}-k{k}-{self.tag(sseed)}", {"part": "no_finetune", **mk, "k": k, **eval_key},
                        compute_pre)
        return curves, pre

    # --- (b) one fine-tuning ------------------------------------------------------------------
    def part_b(self, pre):
        fine: dict[tuple[str, int, int], dict] = {}
        dense: dict[int, dict] = {}
        epochs = self.cache.epoch_checkpoint  # where each fine-tuning keeps its epochs (resumable)
        for seed in self.seeds:
            ft = dataclasses.replace(self.ft_cfg, seed=seed)
            ft_key = {"finetune_after": finetune_key(ft), "split": self.split}
            if self.ccfg.dense_control:
                name, key = f"ft-dense-s{seed}{kd_tag(ft)}", {"part": "dense_control", **ft_key}
                dense[seed] = self.cache.get_or_compute(
                    name, key, lambda ft=ft, name=name, key=key:
                    self.finetune_eval(None, None, ft, "dense control", epochs(name, key)))
            for k in self.budget_ks:
                for method in self.methods:
                    sseed = self.selection_seed(method, seed)
                    p = pre[(method, sseed, k)]
                    key = {"part": "finetune", **self.method_key(method, sseed), "k": k, "kept": p["kept"],
                           "gates": p.get("gates"), **ft_key}
                    name = f"ft-{method}-k{k}-s{seed}{kd_tag(ft)}"
                    fine[(method, seed, k)] = self.cache.get_or_compute(
                        name, key, lambda p=p, ft=ft, method=method, name=name, key=key:
                        self.finetune_eval(p["kept"], p.get("gates"), ft, method, epochs(name, key)))
        return fine, dense

    def finetune_eval(self, kept, gates, ft: FinetuneConfig, what: str, checkpoint=None) -> dict:
        t0 = time.perf_counter()
        model = copy.deepcopy(self.model)
        if kept is not None:
            keep_heads(model, {int(layer): hs for layer, hs in kept.items()})
            if gates is not None:
                fold_gates(model, torch.tensor(gates))
        res = finetune(model, self.tok, self.task, ft, train_examples=self.prep.train_examples,
                       checkpoint=checkpoint, teacher=self.model, progress=self.progress)
        t1 = time.perf_counter()
        test = evaluate_task(model, self.tok, self.task, max_length=ft.max_length, seed=ft.seed,
                             keep_predictions=True, progress=self.progress)
        log.info("fine-tuned %s (%s heads, seed %d): %s accuracy %.4f", what,
                 "all" if kept is None else sum(len(v) for v in kept.values()), ft.seed, self.split,
                 test[self.split]["accuracy"])
        return {"test": test, "finetune": {"best_epoch": res.best_epoch, "epochs_run": len(res.history),
                                           "best_dev": res.best_dev},
                "parameters": count_parameters(model),
                "seconds": {"finetune": t1 - t0, "evaluate": time.perf_counter() - t1}}


__all__ = ["CompareConfig", "CompareResult", "DEFAULT_METHODS", "STATISTICS", "VERDICT_RULE", "check_compare_run",
           "compare_to_cahp", "render_markdown", "run_compare", "seconds_by_machine", "verdict", "verdict_lines",
           "verdict_text"]
