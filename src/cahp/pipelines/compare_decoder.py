"""`cahp compare` on a generative decoder: CAHP over KV groups against the KV-group baselines, by perplexity.

What `cahp.pipelines.compare.run_compare` runs when the model is a causal LM
(`cahp.pipelines.decoder.is_causal`); issue 23, items 4-5. It starts from
`prepare_decoder`, so it shares the output folder, run.json and stage cache of
`cahp prune` on the same decoder (calibration and held-out text, signatures,
salience, the dense perplexity and CAHP's curve are read, not recomputed).

- Methods: the KV-group selectors of `cahp.selectors.registry.KV_SELECTORS`
  (CAHP over KV groups, random, weight magnitude, gradient, Fisher), every one
  by default (the heads-only compare's default list stands for them). A
  heads-only name with a KV-group peer means that peer (``random`` is
  ``gqa-random``); the others (entropy, layer drop, ...) are refused.
- Budgets, in KV heads (a kept KV head keeps its whole group of query heads):
  CAHP's knee k* (its held-out perplexity curve and `find_k_star`, as `cahp
  prune` finds it) and shares of the KV heads kept: by default 2/3 and 1/3
  (1/3 and 2/3 of the KV heads removed); ``--budgets`` other than the heads
  default (0.5, 0.25, 0.125) are taken as shares of KV heads kept.
- For each method, budget and seed: (a) held-out perplexity of the dense model
  through gates (no fine-tuning); (b) surgery of the kept KV groups, the same
  `finetune_lm` as `cahp prune` (on the calibration batches, its seed the
  compare seed) and the held-out perplexity after it; beside them the KV cache
  bytes per token and the parameters after surgery; and a dense control (the
  dense model fine-tuned the same way) per seed. Seeds: ``--seeds N`` runs
  ``seed .. seed+N-1``; only seeded selections (random) vary with the seed
  without fine-tuning.
- Speed of the dense model against CAHP's pruned model at each budget
  (`cahp.bench.decode.time_decode`; its `DecodeTimingConfig` is set by the
  ``--timing-*`` options of `cahp compare`; on the CPU with one thread by
  default): greedy `generate` with the KV cache (batch 1 and 8, 32 new tokens,
  a 16-token random prompt), the two models interleaved call by call, generated
  tokens per second from the median call, and the median ratio with a 95%
  bootstrap interval over the aligned repetitions; prefill latency is one
  forward of batch 1 x 128 tokens. ``seconds = 0`` skips it.

Statistics (`cahp.pipelines.verdicts.paired_nll`), paired on the same held-out
sentences: every model's per-sentence NLL sums and token counts
(`cahp.budget.perplexity.sentence_nll`); a resample draws sentences with
replacement and recomputes each model's token-weighted mean NLL (nats per
token) on it. ``diff`` = method's mean NLL minus CAHP's = the log of the ratio
of their perplexities: **positive means the method's perplexity is higher
(worse) than CAHP's**. Pooled (the verdict): per-sentence NLL averaged over
each side's seeds (every seed scores the same tokens); per seed: method seed s
against CAHP seed s. CAHP's verdict (`cahp.pipelines.verdicts.nll_verdict`:
`cahp.pipelines.verdicts.verdict` on CAHP minus method): "win" when the 95%
interval of (method - CAHP) lies above 0, "loss" when below 0, else "tie".

Every result is cached in ``OUTPUT/compare/`` (`StageCache`, keyed by every
setting it depends on, and by the identity, text and statistics keys of the
prepared run), so a re-run reads what it has and computes only what is new.
Outputs: ``compare.json`` (every number and setting), ``compare.md`` (`cahp.pipelines.report_decoder`: a
table per budget, the speed table), ``compare.png`` (held-out perplexity
against KV heads kept, per method) and ``compare_layers.png`` (query heads
kept per layer, per method and budget).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from torch import nn

from cahp.bench.decode import DecodeTimingConfig, check_timing, time_decode
from cahp.budget.perplexity import sentence_nll
from cahp.core.io import environment
from cahp.model.heads import kept_kv_heads, kv_cache_bytes_per_token, mask_to_heads, mean_relative_depth
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines.cache import StageCache
from cahp.pipelines.compare import DEFAULT_METHODS, CompareConfig, CompareResult, check_compare_run
from cahp.pipelines.compare_methods import MethodsBySeed
from cahp.pipelines.decoder import (
    DECODER_SELECTOR,
    DecoderRun,
    check_decoder_run,
    decoder_curve,
    lm_finetune_settings,
    prepare_decoder,
    text_summary,
)
from cahp.pipelines.decoder_finetune import finetune_lm
from cahp.pipelines.guard import output_folder
from cahp.pipelines.plots import plot_perplexity
from cahp.pipelines.report import pooled_verdict_texts, write_compare_outputs
from cahp.pipelines.report_decoder import render_markdown
from cahp.pipelines.stages import PruneConfig, find_k_star
from cahp.pipelines.verdicts import paired_nll
from cahp.selectors.gqa import check_kv_mask
from cahp.selectors.registry import KV_SELECTORS
from cahp.train.finetune import FinetuneConfig

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_KV_SHARES", "STATISTICS", "VERDICT_RULE", "kv_budgets", "kv_methods",
           "run_compare_decoder"]

#: Shares of the KV heads kept by default: 1/3 and 2/3 of them removed (issue 23's budgets).
DEFAULT_KV_SHARES = (2 / 3, 1 / 3)
#: `CompareConfig`'s heads-only default budgets; given as they are, they stand for `DEFAULT_KV_SHARES`.
HEADS_DEFAULT_BUDGETS = tuple(CompareConfig().budgets)

STATISTICS = (
    "paired bootstrap over held-out sentences: each resample draws sentences with replacement and recomputes "
    "every model's token-weighted mean NLL on them; diff = method NLL - CAHP NLL (nats per token, the log of the "
    "perplexity ratio method / CAHP); pooled = per-sentence NLL averaged over seeds (per-seed bootstraps beside it)"
)
VERDICT_RULE = (
    "verdicts are CAHP's, on diff = method - CAHP in held-out NLL (lower is better): win = the 95% interval of "
    "diff lies above 0 (CAHP's perplexity lower), loss = it lies below 0, tie = it contains 0"
)


# --- checks ---------------------------------------------------------------------------------------------


def kv_methods(methods: Sequence[str]) -> list[str]:
    """``methods`` as `KV_SELECTORS` names, CAHP first; the heads-only default list means all of them.

    A heads-only name with a KV-group peer (``random`` -> ``gqa-random``) means that peer; one without is a
    ValueError naming the choices.
    """
    asked = list(KV_SELECTORS) if list(methods) == list(DEFAULT_METHODS) else list(methods)
    names = [m if m in KV_SELECTORS else f"gqa-{m}" for m in asked]
    unknown = [m for m, n in zip(asked, names) if n not in KV_SELECTORS]
    if unknown:
        raise ValueError(f"no KV-group method {', '.join(unknown)} for a decoder; choose from "
                         f"{', '.join(KV_SELECTORS)} (or the same names without gqa-)")
    return [DECODER_SELECTOR, *dict.fromkeys(n for n in names if n != DECODER_SELECTOR)]


def _shares(budgets: Sequence[float]) -> list[float]:
    """Shares of the KV heads kept: `DEFAULT_KV_SHARES` for the heads-only default, else ``budgets``."""
    return list(DEFAULT_KV_SHARES) if tuple(budgets) == HEADS_DEFAULT_BUDGETS else list(budgets)


def kv_budgets(budgets: Sequence[float], knee_k: int | None, n_kv: int) -> list[dict]:
    """``[{"label", "k", "ratio"}]``: CAHP's knee (unless ``knee_k`` is None), then each share of ``n_kv`` kept.

    ``budgets``: `CompareConfig.budgets` (see `_shares`); k = round(share x n_kv), at least 1.
    """
    out = [{"label": "k*", "k": int(knee_k), "ratio": knee_k / n_kv}] if knee_k is not None else []
    for r in _shares(budgets):
        if math.isclose(r, 2 / 3) or math.isclose(r, 1 / 3):
            label = f"{round(3 * (1 - r))}/3 removed"
        else:
            label = f"{r * 100:g}% kept"
        out.append({"label": label, "k": max(1, round(r * n_kv)), "ratio": r})
    return out


def _check(cfg: PruneConfig, ccfg: CompareConfig, timing: DecodeTimingConfig) -> list[str]:
    """Every compare setting that can fail without weights (one-line ValueErrors); returns the methods."""
    methods = kv_methods(ccfg.methods)
    if any(not 0 < r <= 1 for r in ccfg.budgets):
        raise ValueError(f"budgets are shares of the KV heads kept, in (0, 1], got {ccfg.budgets}")
    if not ccfg.budgets and not ccfg.knee:
        raise ValueError("no budget: give --budgets or keep --knee")
    if cfg.keep or cfg.keep_ratio:
        raise ValueError("--keep and --keep-ratio set cahp prune's budget; cahp compare on a decoder compares at "
                         "CAHP's knee and --budgets (shares of the KV heads kept)")
    check_compare_run(cfg, ccfg)
    check_timing(timing)
    return methods


# --- the verdict in words ------------------------------------------------------------------------------


def verdict_text(method: str, label: str, k: int, cmp: dict) -> str:
    """One plain-language sentence for a pooled NLL comparison."""
    lo, hi = cmp["ci95"]
    stats = (f"{method} minus CAHP = {cmp['diff']:+.4f} nats/token (perplexity x{cmp['perplexity_ratio']:.3f}), "
             f"95% CI [{lo:+.4f}, {hi:+.4f}], p = {cmp['p_value']:.3g}")
    where = f"at {label} ({k} KV heads)"
    if cmp["verdict"] == "win":
        return f"{where}: CAHP beats {method} ({stats})."
    if cmp["verdict"] == "loss":
        return f"{where}: {method} beats CAHP ({stats})."
    return f"{where}: tie, the difference is inside the confidence interval ({stats})."


# --- the comparison -------------------------------------------------------------------------------------


def run_compare_decoder(cfg: PruneConfig, ft_cfg: FinetuneConfig | None = None, ccfg: CompareConfig | None = None,
                        progress: bool = True, timing: DecodeTimingConfig | None = None) -> CompareResult:
    """Compare CAHP over KV groups with the KV-group baselines on a causal LM (see the module docstring).

    Args:
        cfg: the settings shared with `cahp prune` on a decoder (model, task, output folder, calibration /
            held-out sentences, CAHP's distance / clustering / grid / knee rule, seed).
        ft_cfg: the single LM fine-tuning after surgery, the same for every method (and the dense control);
            its seed is replaced by each compare seed.
        ccfg: methods, budgets (shares of the KV heads kept; the heads default means 2/3 and 1/3), seeds,
            parts, bootstrap resamples.
        timing: the speed measurement (`DecodeTimingConfig`; ``seconds = 0`` skips it).

    Returns:
        A `CompareResult`; compare.json and compare.md are written into ``cfg.output_dir``.
    """
    ft_cfg = ft_cfg or FinetuneConfig(seed=cfg.seed)
    ccfg = ccfg or CompareConfig()
    timing = timing or DecodeTimingConfig()
    methods = _check(cfg, ccfg, timing)
    task, ft_cfg = check_decoder_run(cfg, ft_cfg)  # every option and split, before any work
    with output_folder(Path(cfg.output_dir)) as out:  # log.txt, the lock, no new folder left by an early error
        return _DecoderCompare(cfg, ft_cfg, ccfg, timing, methods, out, progress, task).run()


def _kept(kept: dict) -> dict[int, list[int]]:
    """``{layer: heads}`` with int layers (JSON gives strings)."""
    return {int(layer): list(hs) for layer, hs in kept.items()}


class _DecoderCompare(MethodsBySeed):
    """One compare call on a decoder: the prepared run, the budgets, parts (a) and (b), speed, the report."""

    registry = KV_SELECTORS

    def __init__(self, cfg, ft_cfg, ccfg, timing, methods, out: Path, progress: bool, task):
        self.cfg, self.ft_cfg, self.ccfg, self.timing = cfg, ft_cfg, ccfg, timing
        self.methods, self.out, self.progress, self.checked_task = methods, out, progress, task
        self.seeds = [cfg.seed + i for i in range(ccfg.seeds)]
        self.seconds: dict[str, float] = {}

    def run(self) -> CompareResult:
        t_total = time.perf_counter()
        run: DecoderRun = prepare_decoder(self.cfg, self.ft_cfg, self.out, self.progress, self.checked_task)
        self.prep, self.stats = run, run.stats
        self.cache = StageCache(self.out / "compare", base={"signatures": run.keys["signatures"],
                                                            "salience": run.keys["salience"],
                                                            "held": run.keys["held"]},
                                log_level=logging.DEBUG)
        t = time.perf_counter()
        self.knee_curve = decoder_curve(run, self.method(DECODER_SELECTOR, None), self.progress)
        self.knee = find_k_star(self.knee_curve["points"], self.cfg)
        self.seconds["cahp_curve_and_knee"] = time.perf_counter() - t
        self.budgets = kv_budgets(self.ccfg.budgets, self.knee.k if self.ccfg.knee else None, self.stats.n_kv)
        self.budget_ks = sorted({b["k"] for b in self.budgets}, reverse=True)
        log.info("compare %s on %s text: k* = %d of %d KV heads; budgets %s; methods %s; seeds %s", self.cfg.model,
                 run.task.name, self.knee.k, self.stats.n_kv, ", ".join(f"{b['label']}={b['k']}" for b in self.budgets),
                 ", ".join(self.methods), self.seeds)
        self.dense = self.cache.get_or_compute("lm-dense", {"part": "dense"}, self.score_dense)
        pre = self.part_a()
        speed = self.speed(pre)
        self.write(self.report(pre, None, None, speed, t_total, partial=self.ccfg.finetune))
        fine, control = self.part_b(pre) if self.ccfg.finetune else (None, None)
        report = self.report(pre, fine, control, speed, t_total, partial=False)
        self.write(report)
        return CompareResult(output_dir=self.out, report=report)

    # --- selectors ------------------------------------------------------------------------------------
    def sizes(self, model: nn.Module) -> dict:
        """KV cache bytes per token, KV heads and parameters of a (pruned) model."""
        kv = kept_kv_heads(model)
        return {"kv_cache_bytes_per_token": kv_cache_bytes_per_token(model), "parameters": count_parameters(model),
                "kv_heads": sum(len(v) for v in kv.values()), "kv_heads_per_layer": [len(kv[i]) for i in sorted(kv)]}

    # --- (a) no fine-tuning ---------------------------------------------------------------------------
    def score_dense(self) -> dict:
        t0 = time.perf_counter()
        return {**sentence_nll(self.prep.model, self.prep.held), **self.sizes(self.prep.model),
                "heads": self.stats.n, "seconds": {"evaluate": time.perf_counter() - t0}}

    def part_a(self) -> dict:
        pre: dict[tuple[str, int | None, int], dict] = {}
        for method in self.methods:
            for sseed in self.sel_seeds(method):
                for k in self.budget_ks:
                    pre[(method, sseed, k)] = self.cache.get_or_compute(
                        f"lm-pre-{method}-k{k}-{self.tag(sseed)}",
                        {"part": "no_finetune", **self.method_key(method, sseed), "k": k},
                        lambda method=method, sseed=sseed, k=k: self.score_selection(method, sseed, k))
        return pre

    def score_selection(self, method: str, sseed: int | None, k: int) -> dict:
        """Select k KV groups, score the dense model gated to them, and measure the pruned model's sizes."""
        run, sel = self.prep, self.method(method, sseed)
        t = time.perf_counter()
        mask = check_kv_mask(sel.select(k, self.stats, run.ctx), k, self.stats)
        t0 = time.perf_counter()
        scores = sentence_nll(run.model, run.held, mask)
        kept = mask_to_heads(mask)
        sizes = self.sizes(keep_heads(copy.deepcopy(run.model), kept))
        log.info("no fine-tuning: %s k=%d%s: held-out perplexity %.3f", method, k,
                 "" if sseed is None else f" seed {sseed}", scores["perplexity"])
        return {"k": k, "kept": kept, "heads": int(mask.sum()), **scores, **sizes,
                "selection": sel.selection_info(), "seconds": {"select": t0 - t, "evaluate": time.perf_counter() - t0}}

    # --- (b) the same fine-tuning ---------------------------------------------------------------------
    def part_b(self, pre: dict) -> tuple[dict, dict]:
        fine: dict[tuple[str, int, int], dict] = {}
        control: dict[int, dict] = {}
        for seed in self.seeds:
            ft = dataclasses.replace(self.ft_cfg, seed=seed)
            ft_key = {"finetune": lm_finetune_settings(ft)}
            if self.ccfg.dense_control:
                control[seed] = self.cache.get_or_compute(
                    f"lm-ft-dense-s{seed}", {"part": "dense_control", **ft_key},
                    lambda ft=ft: self.finetune_score(None, ft, "dense control"))
            for k in self.budget_ks:
                for method in self.methods:
                    sseed = self.selection_seed(method, seed)
                    p = pre[(method, sseed, k)]
                    fine[(method, seed, k)] = self.cache.get_or_compute(
                        f"lm-ft-{method}-k{k}-s{seed}",
                        {"part": "finetune", **self.method_key(method, sseed), "k": k, "kept": p["kept"], **ft_key},
                        lambda p=p, ft=ft, method=method: self.finetune_score(p["kept"], ft, method))
        return fine, control

    def finetune_score(self, kept: dict | None, ft: FinetuneConfig, what: str) -> dict:
        """Surgery to ``kept`` (None: the dense model), one `finetune_lm` on the calibration batches, the
        held-out per-sentence NLL after it."""
        run = self.prep
        t0 = time.perf_counter()
        model = copy.deepcopy(run.model)
        if kept is not None:
            keep_heads(model, _kept(kept))
        info = finetune_lm(model, run.calib, ft, progress=self.progress)
        t1 = time.perf_counter()
        scores = sentence_nll(model, run.held)
        log.info("fine-tuned %s (%s KV heads, seed %d): held-out perplexity %.3f", what,
                 sum(len(v) for v in kept_kv_heads(model).values()), ft.seed, scores["perplexity"])
        return {**scores, **self.sizes(model), "finetune": {k: v for k, v in info.items() if k != "config"},
                "seconds": {"finetune": t1 - t0, "evaluate": time.perf_counter() - t1}}

    # --- speed ----------------------------------------------------------------------------------------
    def speed(self, pre: dict) -> dict | None:
        """`time_decode` of the dense model against CAHP's pruned model at each budget (None: no timing)."""
        if not self.timing.seconds:
            return None
        run, out = self.prep, {}
        tok = run.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        for k in self.budget_ks:
            kept = pre[(DECODER_SELECTOR, None, k)]["kept"]

            def compute(kept=kept):
                t0 = time.perf_counter()
                pruned = keep_heads(copy.deepcopy(run.model), _kept(kept))
                res = time_decode(run.model, pruned, self.timing, pad, self.cfg.seed)
                return {**res, "seconds": {"timing": time.perf_counter() - t0}}

            out[k] = self.cache.get_or_compute(f"lm-speed-k{k}", {"part": "speed", "kept": kept,
                                                                  "timing": asdict(self.timing)}, compute)
        return out

    # --- report ---------------------------------------------------------------------------------------
    def summary(self, recs: list[dict], seeds: list, cahp_recs: list[dict] | None) -> dict:
        """Mean held-out perplexity and NLL of one method at one budget over its records, its sizes, and its
        paired comparison with CAHP."""
        ppl = np.array([r["perplexity"] for r in recs])
        out = {"seeds": seeds, "perplexity": float(ppl.mean()),
               "perplexity_std": float(ppl.std(ddof=1)) if len(ppl) > 1 else 0.0,
               "perplexity_per_seed": ppl.tolist(), "mean_nll": float(np.mean([r["mean_nll"] for r in recs])),
               **{k: recs[0][k] for k in ("kv_cache_bytes_per_token", "parameters", "kv_heads",
                                          "kv_heads_per_layer")}}
        if cahp_recs is not None:
            out["vs_cahp"] = paired_nll(recs, cahp_recs, self.ccfg.n_bootstrap, self.cfg.seed,
                                        seeds if len(recs) >= len(cahp_recs) and seeds else None)
        return out

    def layers(self, kept: list[dict]) -> dict:
        """Query heads kept per layer (of the first selection, and the mean over selections) and the mean
        relative depth of the kept heads (0: first layer, 1: last), as `plot_compare_layers` reads them."""
        masks = [self.stats.mask_from_heads(m) for m in kept]
        per_layer = [m.sum(1).tolist() for m in masks]
        return {"heads_per_layer": per_layer[0], "heads_per_layer_mean": np.mean(per_layer, 0).tolist(),
                "mean_relative_depth": float(np.mean([mean_relative_depth(m) for m in masks]))}

    def results(self, pre: dict, fine: dict | None) -> tuple[dict, dict]:
        no_ft, ft_out = {}, {}
        for b in self.budgets:
            k, label = b["k"], b["label"]
            no_ft[label] = {}
            cahp_pre = [pre[(DECODER_SELECTOR, None, k)]]
            for method in self.methods:
                sseeds = self.sel_seeds(method)
                recs = [pre[(method, s, k)] for s in sseeds]
                s = self.summary(recs, [x for x in sseeds if x is not None],
                                 None if method == DECODER_SELECTOR else cahp_pre)
                s.update(k=k, heads=recs[0]["heads"], kept=recs[0]["kept"], selection=recs[0].get("selection"),
                         **self.layers([r["kept"] for r in recs]))
                no_ft[label][method] = s
            if fine is None:
                continue
            ft_out[label] = {}
            cahp_ft = [fine[(DECODER_SELECTOR, seed, k)] for seed in self.seeds]
            for method in self.methods:
                recs = [fine[(method, seed, k)] for seed in self.seeds]
                s = self.summary(recs, self.seeds, None if method == DECODER_SELECTOR else cahp_ft)
                s.update(k=k, train_loss=[r["finetune"]["train_loss"][-1] for r in recs],
                         finetune_seconds=float(np.mean([r["seconds"]["finetune"] for r in recs])))
                ft_out[label][method] = s
        for part in (no_ft, ft_out):
            for b in self.budgets:
                for method, s in part.get(b["label"], {}).items():
                    if "vs_cahp" in s:
                        s["vs_cahp"]["pooled"]["text"] = verdict_text(method, b["label"], b["k"],
                                                                      s["vs_cahp"]["pooled"])
        return no_ft, ft_out

    def report(self, pre: dict, fine: dict | None, control: dict | None, speed: dict | None, t_total: float,
               partial: bool) -> dict:
        cfg, run = self.cfg, self.prep
        no_ft, ft_out = self.results(pre, fine)
        dense = {k: self.dense[k] for k in ("perplexity", "mean_nll", "kv_cache_bytes_per_token", "parameters",
                                            "kv_heads", "kv_heads_per_layer", "heads")}
        control_out = None
        if control:
            recs = [control[s] for s in self.seeds]
            control_out = self.summary(recs, self.seeds, None)
            control_out["vs_cahp"] = {b["label"]: paired_nll(recs, [fine[(DECODER_SELECTOR, s, b["k"])]
                                                                    for s in self.seeds],
                                                             self.ccfg.n_bootstrap, cfg.seed, self.seeds)
                                      for b in self.budgets}
        records = [self.dense, *pre.values(), *(fine or {}).values(), *(control or {}).values(),
                   *(speed or {}).values()]
        timings = {"total_seconds": round(time.perf_counter() - t_total, 1), "stages": run.stages.times,
                   **{k: round(v, 2) for k, v in self.seconds.items()},
                   "results_cached": self.cache.hits, "results_computed": self.cache.computed,
                   "compute_seconds": round(sum(sum(r["seconds"].values()) for r in records), 1)}
        return {
            "model": cfg.model,
            "kind": "causal-lm",
            "task": run.task.name,
            "metric": "perplexity",
            "budget_unit": "kv_heads",
            "heads": self.stats.n,
            "kv_heads": self.stats.n_kv,
            "partial": partial,
            "settings": {
                "prune": asdict(cfg), "finetune_after": {k: v for k, v in asdict(self.ft_cfg).items() if k != "seed"},
                "compare": asdict(self.ccfg), "timing": asdict(self.timing), "seeds": self.seeds,
                "methods_run": self.methods,
                "methods": {m: self.method(m, self.sel_seeds(m)[0]).settings() for m in self.methods},
            },
            "data": {**text_summary(run), "heldout_sentences": len(self.dense["tokens"])},
            "statistics": STATISTICS,
            "verdict_rule": VERDICT_RULE,
            "k_star": self.knee.k,
            "knee": self.knee.to_dict(),
            "budgets": self.budgets,
            "dense": dense,
            "no_finetune": {"results": no_ft},
            "finetuned": {"results": ft_out, "dense_control": control_out} if fine is not None else None,
            "speed": ({b["label"]: {"k": b["k"], **{x: speed[b["k"]][x] for x in ("decode", "prefill", "settings")}}
                       for b in self.budgets} if speed is not None else None),
            "timings": timings,
            "environment": environment(),
        }

    def write(self, report: dict) -> None:
        write_compare_outputs(self.out, report, render_markdown(report),
                              functools.partial(plot_perplexity, cahp=DECODER_SELECTOR),
                              pooled_verdict_texts(report) if not report["partial"] else [])


# --- outputs --------------------------------------------------------------------------------------------
