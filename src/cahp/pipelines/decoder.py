"""`cahp prune` on a generative decoder (grouped-query attention): CAHP over KV groups, scored by perplexity.

`run_decoder` is what `cahp.pipelines.prune.run_prune` runs when the model is a
causal LM (`is_causal`). Its body reads as the steps:

- text: calibration sentences from the training split, held-out sentences from
  the dev split, never the test split (`cahp.data.lm`);
- 1-2. `signatures`: causal attention signatures of every query head on the
  calibration text and their distances;
- salience: |dL/dgate| with L the language-modelling loss on the same text;
- 3-5. the KV-group CAHP selector (`cahp.selectors.gqa`): budget k in KV heads,
  spread over layers by ``--kv-allocation`` (`PruneConfig.kv_allocation`:
  greedy, the default, takes the per-layer counts of the summed-salience
  ranking and the redundancy-discounted salience order within each layer;
  salience clusters within each layer instead; global clusters all groups at once);
- 6. the curve: held-out perplexity through gates over a grid of kept KV
  heads, its knee (`find_knee` on -log perplexity); ``--keep`` /
  ``--keep-ratio`` count KV heads and override it;
- 7-8. surgery of whole KV groups, one LM fine-tuning on the calibration text
  (unless ``skip_final_finetune``), held-out perplexity before pruning, after
  pruning and after the fine-tuning; the KV cache per token, parameters and
  kept heads per layer go into ``report.json``, with ``curve.png`` and
  ``heads.png``.

`prepare_decoder` (text, signatures, salience, dense perplexity) and
`decoder_curve` are the stages `cahp compare` on a decoder
(`cahp.pipelines.compare_decoder`) starts from, with the same cache keys.
Every stage is cached under ``OUTPUT/stages`` by `StageCache` with the
fingerprints of the model's files and of the splits it read, so a re-run with
the same settings computes nothing and one with another ``--keep`` reuses the
statistics and the curve. One process (no torchrun sharding here), on the GPU when there is one.

Decoders as classifiers (``--decoder-head classifier``, `PruneConfig.decoder_head`):
`prunes_as_lm` sends such a run to the encoders' task pipeline instead
(`cahp.pipelines.prune` and `cahp.pipelines.compare`, unchanged): the model is
loaded as ``LlamaForSequenceClassification`` (`cahp.model.loading`: a new
seeded score head on the last non-pad token, the pad token chosen by
`decoder_pad_token`), fine-tuned on the task, its causal signatures, distances
and salience (from the classification loss) computed on calibration examples,
the curve scored by accuracy on held-out training examples, the knee, surgery,
one fine-tuning and the test accuracy, as for an encoder. Selection there is
over query heads, with the heads-only selectors (CAHP and its baselines), and
``--keep`` counts query heads: a classifier keeps no KV cache, so the KV
groups that drive the LM budget matter only through the parameters and
compute they carry, and selecting query heads lets CAHP keep one query head of
a group where the group budget would keep all of them. Surgery keeps a
key/value head as long as one of its query heads stays and removes it with the
last one (`cahp.arch.llama`: uneven groups read their key/value heads through
an index map), so the parameters of a KV head go only with its whole group.
The heads-only ``magnitude`` baseline counts each query head's own query rows
and output columns and the key/value rows of its group (the adapter's
``kv_head_of``); CAHP, random, gradient, entropy and Fisher read gates and
signatures only.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cahp.arch import get_adapter
from cahp.budget.curve import default_grid
from cahp.budget.knee import KneeResult
from cahp.budget.perplexity import kv_curve, lm_loss, perplexity
from cahp.core import distributed
from cahp.core.io import environment, write_json
from cahp.data.lm import lm_batches, lm_texts
from cahp.model.checkpoint import is_pruned_folder, load_pruned, save_pruned
from cahp.model.heads import kept_heads, kept_kv_heads, kept_mask, kv_cache_bytes_per_token, mask_to_heads
from cahp.model.loading import load_model
from cahp.model.surgery import count_parameters, keep_heads
from cahp.pipelines import plots
from cahp.pipelines.cache import StageCache
from cahp.pipelines.decoder_finetune import finetune_lm
from cahp.pipelines.fingerprints import data_fingerprints, model_fingerprint
from cahp.pipelines.guard import _check_counts, build_task, check_identity, clip_max_length, model_config
from cahp.pipelines.stages import PruneResult, find_k_star, selector_settings
from cahp.selectors.base import HeadStats, SelectionContext
from cahp.selectors.gqa import KV_ALLOCATION_CHOICES, GQAStats, KVBudgetError, gqa_stats
from cahp.selectors.registry import make_selector
from cahp.stats.salience import gate_gradients
from cahp.stats.signatures import Signatures, collect_signatures
from cahp.train.finetune import check_config
from cahp.train.teacher import finetune_key

log = logging.getLogger(__name__)

__all__ = ["DECODER_SELECTOR", "DecoderRun", "check_decoder_options", "check_decoder_run", "check_kv_allocation",
           "decoder_curve",
           "decoder_curve_key", "is_causal", "kv_budget", "lm_finetune_settings", "prepare_decoder", "prunes_as_lm",
           "run_decoder", "summary", "text_summary"]

#: The registry name of CAHP over KV groups.
DECODER_SELECTOR = "gqa-cahp"


def is_causal(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is a generative decoder cahp knows (its config read without weights)."""
    config = model_config(name_or_path)
    if config is None:
        return False
    try:
        return bool(get_adapter(config).causal)
    except ValueError:  # an architecture cahp does not know: the encoder path's loading names it
        return False


def prunes_as_lm(cfg) -> bool:
    """Whether `cahp prune` / `cahp compare` take the causal-LM pipeline (`run_decoder`) for ``cfg``.

    True for a decoder with ``decoder_head`` "lm" (the default); False for an encoder and for a decoder with
    ``decoder_head`` "classifier" (the encoders' task pipeline, see the module docstring). Raises a one-line
    ValueError, before any work, for ``--decoder-head classifier`` on an encoder or with ``--ffn``,
    ``--objective`` or ``--kv-allocation salience``, for ``--kv-allocation salience`` on an encoder (its heads
    have no KV groups; auto and global mean what an encoder does anyway), and for a decoder folder holding a
    sequence classifier without it.
    """
    head = getattr(cfg, "decoder_head", "lm")
    if head not in ("lm", "classifier"):
        raise ValueError(f"--decoder-head must be lm or classifier, got {head!r}")
    allocation = check_kv_allocation(cfg)
    causal = is_causal(cfg.model)
    if head == "lm":
        if not causal and allocation not in ("auto", "global"):
            raise ValueError(f"--kv-allocation {allocation} applies to decoders pruned by KV groups; {cfg.model} is "
                             "not a causal LM (an encoder's heads are clustered over all layers at once)")
        archs = (getattr(model_config(cfg.model), "architectures", None) or []) if causal else []
        held = next((a for a in archs if "ForSequenceClassification" in a), None)
        if held:  # loading it as a causal LM would fail after the checks, with a message about kinds
            raise ValueError(f"{cfg.model} holds a {held}: prune it with --decoder-head classifier")
        return causal
    if not causal:
        raise ValueError(f"--decoder-head classifier applies to decoders (Llama family); {cfg.model} is not one "
                         "(encoders are pruned as classifiers already)")
    given = [opt for opt, on in (("--ffn", cfg.ffn), ("--objective", getattr(cfg, "objective", "task") != "task"),
                                 ("--kv-allocation", allocation not in ("auto", "global"))) if on]
    if given:
        raise ValueError(f"{', '.join(given)} cannot go with --decoder-head classifier (heads only, on the "
                         "task's labels)")
    return False


def check_kv_allocation(cfg) -> str:
    """``cfg.kv_allocation`` (auto when the config has none), or a one-line ValueError naming the choices."""
    allocation = getattr(cfg, "kv_allocation", "auto")
    if allocation not in KV_ALLOCATION_CHOICES:
        raise ValueError(f"--kv-allocation must be one of {', '.join(KV_ALLOCATION_CHOICES)}, "
                         f"got {allocation!r}")
    return allocation


def check_decoder_options(cfg) -> None:
    """Refuse the encoder-only options of `cahp prune` on a decoder (one-line ValueError naming them), and a
    ``--kv-allocation`` that is not one of `KV_ALLOCATIONS`.

    ``--finetuned`` is accepted and changes nothing: a decoder is pruned as it is, with no first fine-tuning.
    """
    check_kv_allocation(cfg)  # here too: `run_compare_decoder` may be called without `prunes_as_lm`
    given = [opt for opt, on in (("--ffn", cfg.ffn), ("--target-speedup", bool(cfg.target_speedup)),
                                 ("--objective", getattr(cfg, "objective", "task") != "task")) if on]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to encoders; {cfg.model} is a "
                         "causal LM (pruned by KV groups on language-modelling text)")
    if distributed.world_size() > 1:
        raise ValueError(f"cahp prune on a causal LM runs in one process, not {distributed.world_size()} "
                         "(start it without torchrun)")


def check_decoder_run(cfg, ft_cfg, task=None):
    """Every check of a decoder run that needs no weights: ``(task, ft_cfg)`` with ``max_length`` clipped.

    The options (`check_decoder_options`, counts, fine-tuning settings) and every split of the task
    (parsed and validated; the test split is read for that only, never used).
    """
    check_decoder_options(cfg)
    _check_counts(cfg)
    check_config(ft_cfg)
    if ft_cfg.kd_alpha:
        raise ValueError("--kd-alpha distils a classifier's outputs; a causal LM's fine-tuning takes none")
    if task is None:
        task = build_task(cfg.task, cfg.data_dir, cfg.text_column, cfg.text_pair_column, cfg.label_column,
                          cfg.task_type)
        task.validate()
    return task, dataclasses.replace(ft_cfg, max_length=clip_max_length(ft_cfg.max_length, model_config(cfg.model)))


def kv_budget(cfg, knee: KneeResult, n_kv: int) -> tuple[int, str]:
    """(KV heads to keep, where that number comes from): ``--keep``, ``--keep-ratio`` (of the KV heads) or the knee."""
    if cfg.keep:
        k, source = cfg.keep, "--keep"
    elif cfg.keep_ratio:
        k, source = max(1, round(cfg.keep_ratio * n_kv)), "--keep-ratio"
    else:
        k, source = knee.k, "knee"
    if not 1 <= k <= n_kv:
        raise KVBudgetError(f"cannot keep {k} KV heads: the model has {n_kv}; choose 1..{n_kv} (on a decoder "
                            "--keep counts key/value heads)")
    log.info("k* = %d KV heads (knee), keeping %d (%s)", knee.k, k, source)
    return k, source


def lm_finetune_settings(ft_cfg) -> dict:
    """The fine-tuning settings the LM stages read (the classification-only ones left out)."""
    return {k: v for k, v in finetune_key(ft_cfg).items()
            if k not in ("metric", "patience", "eval_batch_size", "max_train_examples")}


@dataclass
class DecoderRun:
    """The prepared stages of a decoder run, shared by `run_decoder` and `cahp compare` on a decoder.

    Attributes:
        cfg, ft_cfg, task: the checked settings (``ft_cfg.max_length`` clipped to the model) and task.
        model, tokenizer: the dense causal LM (on the run's device) and its tokenizer.
        stages: the stage cache under ``OUTPUT/stages``; ``keys``: the keys of its stages ("identity",
            "base" (model and training text), "held" (model and dev text), "signatures", "salience").
        fingerprints: what run.json records (model files, the training and dev splits).
        calib_text, held_text: the calibration (train) and held-out (dev) sentences.
        calib, held: their `lm_batches` (right-padded, ``cfg.stats_batch_size`` rows each).
        signatures, salience: the signature and salience stages; dense_ppl: the dense held-out perplexity.
        stats: the `GQAStats` of the dense model; ctx: the selection context (model, calibration batches, seed);
        ks: the grid of kept KV heads of the curve.
    """

    cfg: object
    ft_cfg: object
    task: object
    model: torch.nn.Module
    tokenizer: object
    stages: StageCache
    keys: dict
    fingerprints: dict
    calib_text: list
    held_text: list
    calib: list
    held: list
    signatures: Signatures
    salience: dict
    dense_ppl: dict
    stats: GQAStats
    ctx: SelectionContext
    ks: list


def prepare_decoder(cfg, ft_cfg, out: Path, progress: bool = True, task=None) -> DecoderRun:
    """Steps 1-2 and the salience of a decoder run, every stage cached under ``out/stages`` (a `DecoderRun`).

    Checks every option first (`check_decoder_run`), writes run.json (`check_identity`: a folder of a run with
    other settings is refused), loads the model and computes or reads the signatures, the salience and the
    dense held-out perplexity with the keys `run_decoder` has always used, so a prune folder is reused.
    """
    task, ft_cfg = check_decoder_run(cfg, ft_cfg, task)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(cfg.model, kind="causal-lm", seed=cfg.seed)
    n_kv = sum(len(v) for v in kept_kv_heads(model).values())
    if cfg.keep > n_kv:  # before any pass over data
        raise KVBudgetError(f"cannot keep {cfg.keep} KV heads: the model has {n_kv}; choose 1..{n_kv} (on a "
                            "decoder --keep counts key/value heads)")
    model.to(distributed.device())  # the GPU when there is one; every pass reads the device from the weights
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    identity = {"model": cfg.model, "kind": "causal-lm", "task": task.name, "data_dir": str(task.data_dir),
                "calibration_examples": cfg.calibration_examples, "curve_examples": cfg.curve_examples,
                "seed": cfg.seed, "max_length": ft_cfg.max_length}
    data_fp = data_fingerprints(task)
    fps = {"model": model_fingerprint(cfg.model), task.train_split: data_fp[task.train_split],
           task.dev_split: data_fp[task.dev_split]}
    check_identity(out, identity, cfg.overwrite, fps)
    stages = StageCache(out / "stages")
    base = {**identity, "model_files": fps["model"], "train_data": fps[task.train_split]}
    held_key = {**identity, "model_files": fps["model"], "dev_data": fps[task.dev_split]}

    calib_text, held_text = lm_texts(task, cfg.calibration_examples, cfg.curve_examples, cfg.seed)
    calib = lm_batches(tok, calib_text, ft_cfg.max_length, cfg.stats_batch_size, pad)
    held = lm_batches(tok, held_text, ft_cfg.max_length, cfg.stats_batch_size, pad)
    sig_key = {**base, "stage": "signatures", "distance": cfg.distance, "batch": cfg.stats_batch_size}
    sig = Signatures.from_state_dict(stages.get_or_compute(
        f"signatures-{cfg.distance}", sig_key, tensors=True, label="signatures",
        compute=lambda: collect_signatures(model, calib, kinds=(cfg.distance,), progress=progress).state_dict()))
    sal_key = {**base, "stage": "salience", "loss": "lm", "batch": cfg.stats_batch_size}
    sal = stages.get_or_compute("salience", sal_key, tensors=True,
                                compute=lambda: gate_gradients(model, calib, progress=progress, loss_fn=lm_loss))
    dense_ppl = stages.get_or_compute("perplexity_dense", {**held_key, "stage": "perplexity_dense",
                                                           "batch": cfg.stats_batch_size},
                                      lambda: perplexity(model, held, progress=progress))
    stats = gqa_stats(HeadStats(head_ids=sig.head_ids, shape=tuple(kept_mask(model).shape), distances=sig.distances,
                                salience=sal["salience"], fisher=sal["fisher"], entropy=sig.entropy), model)
    return DecoderRun(cfg=cfg, ft_cfg=ft_cfg, task=task, model=model, tokenizer=tok, stages=stages,
                      keys={"identity": identity, "base": base, "held": held_key, "signatures": sig_key,
                            "salience": sal_key},
                      fingerprints=fps, calib_text=calib_text, held_text=held_text, calib=calib, held=held,
                      signatures=sig, salience=sal, dense_ppl=dense_ppl, stats=stats,
                      ctx=SelectionContext(model=model, batches=calib, seed=cfg.seed),
                      ks=default_grid(stats.n_kv, cfg.grid_step, cfg.min_ratio))


def decoder_curve_key(run: DecoderRun, selector) -> dict:
    """The key of ``selector``'s perplexity curve: signatures, salience, held-out text, selector, grid."""
    return {**run.keys["signatures"], **run.keys["salience"], **run.keys["held"], "stage": "curve",
            "method": selector.name, "selector": selector.settings(), "ks": run.ks}


def decoder_curve(run: DecoderRun, selector, progress: bool = True) -> dict:
    """Step 6: ``selector``'s held-out perplexity over the run's grid (`kv_curve`; stage ``curve-TAG``, cached).

    Returns ``{"points", "seconds"}`` (and the cache's fields); see `cahp.budget.perplexity.kv_curve`.
    """
    return run.stages.get_or_compute(
        f"curve-{selector.tag}", decoder_curve_key(run, selector), label="curve",
        compute=lambda: kv_curve(run.model, selector, run.stats, run.ks, run.held, run.ctx, progress))


def text_summary(run: DecoderRun) -> dict:
    """How much text the run read, and from which splits (the ``data`` of its reports)."""
    return {"calibration_texts": len(run.calib_text), "heldout_texts": len(run.held_text),
            "calibration_tokens": int(sum(int(b["attention_mask"].sum()) for b in run.calib)),
            "heldout_tokens": run.dense_ppl["tokens"], "calibration_split": run.task.train_split,
            "heldout_split": run.task.dev_split, "calibration_rows": run.signatures.rows}


def run_decoder(cfg, ft_cfg, out: Path, progress: bool = True, task=None):
    """CAHP over KV groups on a causal LM; see the module docstring. Returns a `PruneResult`.

    ``cfg``: `cahp.pipelines.prune.PruneConfig` (``calibration_examples`` / ``curve_examples`` count
    sentences of calibration / held-out text; ``keep`` counts KV heads); ``task``: the checked task.
    """
    t_total = time.perf_counter()
    run = prepare_decoder(cfg, ft_cfg, out, progress, task)
    task, ft_cfg, model, tok, stats = run.task, run.ft_cfg, run.model, run.tokenizer, run.stats
    calib, held, stages, dense_ppl = run.calib, run.held, run.stages, run.dense_ppl
    selector = make_selector(DECODER_SELECTOR, cfg.seed, shared=selector_settings(cfg))
    points = decoder_curve(run, selector, progress)["points"]
    knee = find_k_star(points, cfg)
    k_final, k_source = kv_budget(cfg, knee, stats.n_kv)
    mask = selector.select(k_final, stats, run.ctx)

    pruned, final = _surgery_and_finetune(cfg, ft_cfg, model, tok, mask, calib, held, stages,
                                          decoder_curve_key(run, selector), out / "model", progress)
    report = _report(cfg, ft_cfg, task, model, pruned, stats, points, knee, k_final, k_source, dense_ppl, final,
                     text_summary(run), selector, run.fingerprints)
    report["stage_seconds"] = stages.times
    report["total_seconds"] = round(time.perf_counter() - t_total, 1)
    write_json(out / "report.json", report)
    _plots(cfg, task, points, knee, kept_mask(pruned), report, out)
    ppl = report["perplexity"]
    log.info("done: %d -> %d KV heads, KV cache %d -> %d bytes/token; held-out perplexity %.3f -> %.3f (pruned) "
             "-> %s (fine-tuned)", report["kv_heads_before"], report["kv_heads_kept"],
             report["kv_cache_bytes_per_token"]["dense"], report["kv_cache_bytes_per_token"]["pruned"],
             ppl["before_pruning"], ppl["after_pruning"],
             f"{ppl['after_finetune']:.3f}" if ppl["after_finetune"] is not None else "-")
    return PruneResult(output_dir=out, report=report)


def summary(report: dict) -> str:
    """The lines `cahp prune` prints for a decoder run's report."""
    ppl, kv = report["perplexity"], report["kv_cache_bytes_per_token"]
    after = f"{ppl['after_finetune']:.3f}" if ppl["after_finetune"] is not None else "-"
    return (f"{report['model']} / {report['task']}: kept {report['kv_heads_kept']} of {report['kv_heads_before']} KV "
            f"heads ({report['heads_kept']} of {report['heads_before']} query heads; k* = {report['k_star']}, "
            f"{report['k_source']}), KV cache {kv['dense']:,} -> {kv['pruned']:,} bytes per token, parameters "
            f"{report['parameters']['before']:,} -> {report['parameters']['after']:,}; held-out perplexity "
            f"{ppl['before_pruning']:.3f} -> {ppl['after_pruning']:.3f} (pruned) -> {after} (fine-tuned)")


def _surgery_and_finetune(cfg, ft_cfg, model, tok, mask: torch.Tensor, calib: list, held: list, stages: StageCache,
                          key: dict, model_dir: Path, progress: bool):
    """Steps 7-8: (pruned model, perplexities) of a copy keeping ``mask``'s KV groups, fine-tuned once unless
    ``skip_final_finetune``; saved as ``model_dir`` (cached: a re-run reloads it)."""
    kept = mask_to_heads(mask)
    made = {}

    def compute() -> dict:
        scores = {"after_pruning_gated": perplexity(model, held, mask)}
        pruned = keep_heads(copy.deepcopy(model), kept)
        scores["after_pruning"] = perplexity(pruned, held)
        if not cfg.skip_final_finetune:
            scores["finetune"] = finetune_lm(pruned, calib, ft_cfg, progress=progress)
            scores["after_finetune"] = perplexity(pruned, held)
        save_pruned(pruned, tok, model_dir)
        made["model"] = pruned
        return scores

    final_key = {**key, "stage": "final", "kept": kept, "skip_final_finetune": cfg.skip_final_finetune,
                 "finetune": lm_finetune_settings(ft_cfg)}
    scores = stages.get_or_compute("final", final_key, compute, label="surgery_and_finetune", artifact=model_dir,
                                   artifact_check=is_pruned_folder)
    if "model" in made:
        return made["model"], scores
    pruned, _ = load_pruned(model_dir)
    return pruned.to(distributed.device()), scores


def _report(cfg, ft_cfg, task, model, pruned, stats: GQAStats, points, knee, k_final, k_source, dense_ppl, final,
            data, selector, fps) -> dict:
    """The content of report.json."""
    head_mask = kept_mask(pruned)
    kv = kept_kv_heads(pruned)
    dense_kv, pruned_kv = kv_cache_bytes_per_token(model), kv_cache_bytes_per_token(pruned)
    return {
        "model": cfg.model,
        "kind": "causal-lm",
        "task": task.name,
        "metric": "perplexity",
        "budget_unit": "kv_heads",
        "fingerprints": fps,
        "settings": {"prune": asdict(cfg), "finetune": asdict(ft_cfg)},
        "selector": {"name": selector.name, **selector.settings()},
        "data": data,
        "heads_before": stats.n,
        "kv_heads_before": stats.n_kv,
        "k_star": knee.k,
        "kv_heads_kept": k_final,
        "heads_kept": int(head_mask.sum()),
        "k_source": k_source,
        "knee": knee.to_dict(),
        "curve": [{k: p[k] for k in ("k", "heads", "perplexity", "nll", "score", "metric")} for p in points],
        "kept_heads": kept_heads(pruned),
        "kept_kv_heads": kv,
        "heads_per_layer": head_mask.sum(1).tolist(),
        "kv_heads_per_layer": [len(kv[layer]) for layer in sorted(kv)],
        "perplexity": {
            "before_pruning": dense_ppl["perplexity"],
            "after_pruning": final["after_pruning"]["perplexity"],
            "after_pruning_gated": final["after_pruning_gated"]["perplexity"],
            "after_finetune": final["after_finetune"]["perplexity"] if "after_finetune" in final else None,
            "heldout_tokens": dense_ppl["tokens"],
        },
        "finetune": final.get("finetune"),
        "kv_cache_bytes_per_token": {"dense": dense_kv, "pruned": pruned_kv, "ratio": pruned_kv / dense_kv},
        "parameters": {"before": count_parameters(model), "after": count_parameters(pruned)},
        "environment": environment(),
    }


def _plots(cfg, task, points: list[dict], knee: KneeResult, head_mask: torch.Tensor, report: dict, out: Path) -> None:
    """curve.png (-log perplexity vs kept KV heads, the fit and k*) and heads.png (kept query heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["k"] for p in points], [p["score"] for p in points], "o", label="held-out -log perplexity")
    kd = knee.to_dict()
    ax.plot(kd["grid"], kd["fitted"], "-", label=f"polynomial fit (degree {kd['degree']})")
    ax.axvline(knee.k, color="C3", ls="--", label=f"k* = {knee.k}" + (f" ({knee.fallback})" if knee.fallback else ""))
    ax.set_xlabel("KV heads kept")
    ax.set_ylabel("-log perplexity (higher is better)")
    ax.set_title(f"{cfg.model} / {task.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    plots.plot_heads(head_mask.numpy(), out / "heads.png",
                     title=f"{cfg.model}: {report['kv_heads_kept']} of {report['kv_heads_before']} KV heads kept")
