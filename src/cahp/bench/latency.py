"""Latency of pruned models against two honest yardsticks.

Removing heads only shrinks the attention part of a model; the feed-forward
blocks stay. So a pruned model is measured between two references built from
the same weights:

- **dense**: the original model, every head kept;
- **no attention**: the same model with every attention block replaced by its
  residual path (`ResidualOnlyAttention` in every layer), the latency floor
  that head pruning can approach but never pass.

A pruned model that removes a share ``s`` of the heads should sit on the
straight line between them: ``dense - s * (dense - no_attention)``. The
*floor-relative* figure `floor_relative` says how much of that ideal saving is
realised: 1.0 on the line, below 1 when per-call overhead eats the saving.

Timing: fixed thread count (``torch.set_num_threads``), warm-up, then models
interleaved round-robin within every repetition (the starting model rotates),
median and inter-quartile range of the per-call latencies, under
``torch.inference_mode``; onnxruntime models (``onnx=True``, and their int8
copies with ``int8=True``) are interleaved among themselves after the PyTorch ones, so two thread pools never take turns
inside one repetition, except with one thread (no pools), where every model of
both runtimes is interleaved and the ONNX / PyTorch latency ratio of each model
(`ratio_ci`) is paired, as is each int8 model's latency relative to the dense
PyTorch model (``int8_ratio``). Inputs are random token ids with every token real (no
padding). Every model runs with the same attention kernel; ``kernel="auto"``
times the dense model with each kernel first (eager, sdpa, compact: see
`ArchAdapter.set_attention_kernel`) and keeps its fastest for all. The
multiply-add counts (`count_macs`) are analytic.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.bench.config import (
    DENSE,
    INT8_PREFIX,
    NO_ATTENTION,
    ONNX_PREFIX,
    BenchConfig,
    BenchError,
    resolve_devices,
)
from cahp.bench.figures import (
    floor_relative,
    floor_relative_ci,
    paired_floor_relative,
    ratio_ci,
    ratio_floor_relative,
    summarize,
)
from cahp.bench.macs import count_macs
from cahp.bench.timing import apply_allocator, choose_kernel, make_inputs, onnx_runner, time_models, torch_runner
from cahp.bench.variants import Variant, make_variant, no_attention_model, prepare_for_inference, random_removal
from cahp.model.heads import describe, model_shape

log = logging.getLogger(__name__)


def bench_models(
    dense: nn.Module,
    pruned: Mapping[str, nn.Module],
    cfg: BenchConfig | None = None,
    onnx_dir: str | os.PathLike | None = None,
) -> dict:
    """Time ``dense``, each model of ``pruned`` and the attention-free floor, at every shape of ``cfg``.

    Args:
        dense: the original model.
        pruned: label -> pruned model of the same architecture.
            Neither is changed: copies are prepared and timed.
        cfg: how to time (default `BenchConfig()`): shapes, devices ("auto":
            cpu, plus cuda when present), threads (``torch.set_num_threads``;
            None keeps torch's), kernel ("eager", "sdpa", "compact", see
            `ArchAdapter.set_attention_kernel`, or "auto": per device and shape
            the dense model's fastest, then used by every model), repetitions
            (``reps``, or as many as ``budget`` seconds allow per shape), clock
            (see `time_round_robin`), allocator (unless ``malloc_default``,
            freed memory is held, process-wide, so no model page-faults its
            activations in again on every call), ``onnx`` (also export every
            model and time it with onnxruntime, CPU, same thread count; the
            export is checked against PyTorch) and ``int8`` (with ``onnx``: also
            time each export's int8 copy, `cahp.deploy.quantize`, checked against
            PyTorch fp32 within its tolerance, beside the fp32 ones).
        onnx_dir: where the ONNX files go (default: a temporary folder).

    Returns:
        A JSON-ready dict (see `format_table` for what it holds).
    """
    cfg = cfg if cfg is not None else BenchConfig()
    if not pruned:
        raise BenchError("no pruned model to time")
    shapes = cfg.shape_list
    devices = resolve_devices(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    threads = torch.get_num_threads()
    _check_models(dense, pruned, shapes)

    allocator = apply_allocator(cfg.hold_memory)
    dense = copy.deepcopy(dense)
    variants = [make_variant(DENSE, dense), *(make_variant(k, copy.deepcopy(v)) for k, v in pruned.items())]
    variants.append(make_variant(NO_ATTENTION, no_attention_model(dense)))
    for v in variants:
        if v.label != DENSE and v.label != NO_ATTENTION and v.share_removed <= 0:
            raise BenchError(f"pruned model {v.label!r} has every head: nothing was removed")
        prepare_for_inference(v.model)
    n_layers = model_shape(dense.config)[0]
    result = {
        **describe(dense),
        "threads": threads,
        "kernel_policy": cfg.kernel,
        "devices": devices,
        "reps": cfg.reps,
        "warmup": cfg.warmup,
        "budget_s": None if cfg.reps is not None else cfg.budget,
        "clock": cfg.clock,
        "allocator": allocator,
        "inputs": "random token ids, no padding",
        "variants": {v.label: _describe(v, n_layers) for v in variants},
        "runs": [],
    }
    sessions = {}
    if cfg.onnx:
        result["onnx"], result["int8"], sessions = _export_all(variants, threads, onnx_dir, cfg.int8)
        if not cfg.int8:
            del result["int8"]

    candidates: dict = {}  # the dense model in every kernel, for "auto"; rebuilt per device
    for device in devices:
        for v in variants:
            v.model.to(device)
        for batch, seq in shapes:
            result["runs"].append(_time_shape(variants, sessions, cfg, device, batch, seq, threads, candidates))
        candidates.clear()
    for v in variants:
        v.model.to("cpu")
    return result


def _check_models(dense: nn.Module, pruned: Mapping[str, nn.Module], shapes: Sequence[tuple[int, int]]) -> None:
    """Refuse shapes longer than the model allows, pruned models of another architecture, reserved labels."""
    longest = get_adapter(dense).max_positions(dense.config)
    too_long = [s for _, s in shapes if s > longest]
    if too_long:
        raise BenchError(f"sequence length {max(too_long)} is longer than the model allows ({longest})")
    shape_dense = model_shape(dense.config)
    for label, m in pruned.items():
        if type(m) is not type(dense) or model_shape(m.config) != shape_dense:
            raise BenchError(f"pruned model {label!r} does not have the architecture of the dense model")
        if label in (DENSE, NO_ATTENTION) or label.startswith((ONNX_PREFIX, INT8_PREFIX)):
            raise BenchError(f"label {label!r} is reserved")


def _describe(v: Variant, n_layers: int) -> dict:
    """What the result says of one model: its share of heads removed, heads per layer, parameters."""
    return {
        "share_removed": v.share_removed,
        "heads_kept": sum(len(h) for h in v.kept.values()),
        "heads_per_layer": [len(v.kept[i]) for i in range(n_layers)],
        "parameters": sum(p.numel() for p in v.model.parameters()),
    }


def _export_all(variants: Sequence[Variant], threads: int, onnx_dir, int8: bool = False) -> tuple[dict, dict, dict]:
    """Export every model to ONNX (and with ``int8`` its int8 copy), check them against PyTorch, open sessions.

    Returns ``({label: fp32 check}, {label: int8 check}, {runner label: session})``; runner labels carry
    `ONNX_PREFIX` or `INT8_PREFIX`.
    """
    from cahp.deploy.onnx import export_onnx, onnx_session, verify_onnx
    from cahp.deploy.quantize import quantize_int8, verify_int8

    checks, int8_checks, sessions = {}, {}, {}
    tmp = tempfile.TemporaryDirectory(prefix="cahp-bench-onnx-") if onnx_dir is None else None
    out_dir = Path(onnx_dir if onnx_dir is not None else tmp.name)
    for v in variants:
        path = out_dir / f"{v.label.replace('/', '_').replace('%', 'pct')}.onnx"
        export_onnx(v.model, path)
        check = verify_onnx(v.model, path, threads=threads)
        sessions[ONNX_PREFIX + v.label] = onnx_session(path, threads=threads)
        checks[v.label] = {"max_abs_diff": check["max_abs_diff"], "shapes": check["shapes"]}
        log.info("onnx %s: max |onnx - torch| = %.2e", v.label, check["max_abs_diff"])
        if int8:
            q = quantize_int8(path)
            # Timing records the deviation rather than refusing: a trained model's logits on random ids can move
            # past `cahp export --int8`'s tolerance; whether int8 is good enough is the task score's call.
            int8_checks[v.label] = verify_int8(v.model, q, threads=threads, rtol=math.inf)
            sessions[INT8_PREFIX + v.label] = onnx_session(q, threads=threads)
            log.info("onnx int8 %s: max |int8 - torch| = %.2e (%.3f of the logit scale)", v.label,
                     int8_checks[v.label]["max_abs_diff"], int8_checks[v.label]["relative_diff"])
    return checks, int8_checks, sessions


def _time_shape(
    variants: Sequence[Variant], sessions: Mapping, cfg: BenchConfig, device: str, batch: int, seq: int,
    threads: int, candidates: dict,
) -> dict:
    """One run: every model (and its ONNX session on the CPU) timed at one device and shape, with its figures."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    inputs = make_inputs(variants[0].model, batch, seq, device=device, seed=cfg.seed)
    run = {"device": device, "batch": batch, "seq": seq}
    run["kernel"], run["kernel_calibration_ms"] = choose_kernel(
        [v.model for v in variants], cfg.kernel, inputs, sync, cfg.warmup, candidates, cfg.clock
    )
    # With several threads: PyTorch models interleaved with each other, then the ONNX models
    # with each other (two runtimes' thread pools taking turns would disturb each other's
    # timings). With one thread there is no pool: all interleaved, so ONNX / PyTorch is paired.
    groups = [{v.label: torch_runner(v.model, inputs) for v in variants}]
    if device == "cpu" and sessions:
        onnx_runners = {k: onnx_runner(sess, inputs) for k, sess in sessions.items()}
        if threads == 1:
            groups[0].update(onnx_runners)
        else:
            groups.append(onnx_runners)
        run["runtimes_interleaved"] = threads == 1
    times = {}
    for runners in groups:
        log.info("timing %s batch %d seq %d (%s attention): %s", device, batch, seq, run["kernel"], ", ".join(runners))
        times.update(time_models(runners, cfg, sync))
    run["timings"] = {k: summarize(t, batch, seq) for k, t in times.items()}
    # every repetition, aligned by round (kept so the figures can be re-derived)
    run["times_ms"] = {k: [x * 1e3 for x in t] for k, t in times.items()}
    run["macs"] = {v.label: count_macs(v.model, batch, seq)["total"] for v in variants}
    run.update(_floor_figures(variants, times, {k: s["median_ms"] for k, s in run["timings"].items()}, cfg.seed))
    log.info(
        "%s batch %d seq %d: %s", device, batch, seq,
        ", ".join(
            f"{k} {t['median_ms']:.2f} ms"
            + (f" (floor-rel {run['floor_relative'][k]:.2f})" if k in run["floor_relative"] else "")
            for k, t in run["timings"].items()
        ),
    )
    return run


def _floor_figures(variants: Sequence[Variant], times: Mapping[str, list], med: Mapping[str, float], seed: int):
    """Each pruned model's floor-relative figures (both runtimes) and every model's ONNX / PyTorch ratio."""
    keys = ("floor_relative", "floor_relative_paired", "floor_relative_ci95", "floor_relative_ratio",
            "floor_relative_ratio_ci95")
    out = {key: {} for key in keys}
    for v in variants:
        if v.label in (DENSE, NO_ATTENTION):
            continue
        for prefix in ("", ONNX_PREFIX, INT8_PREFIX):
            if prefix + v.label not in med:
                continue
            d, p, n = (prefix + x for x in (DENSE, v.label, NO_ATTENTION))
            series, share = (times[d], times[p], times[n]), v.share_removed
            out["floor_relative"][p] = floor_relative(med[d], med[p], med[n], share)
            out["floor_relative_paired"][p] = paired_floor_relative(*series, share)
            out["floor_relative_ci95"][p] = floor_relative_ci(*series, share, seed=seed)
            out["floor_relative_ratio"][p] = ratio_floor_relative(*series, share)
            out["floor_relative_ratio_ci95"][p] = floor_relative_ci(*series, share, seed=seed, from_ratios=True)
    # ONNX latency relative to PyTorch, per model: below 1 = onnxruntime takes less time.
    out["onnx_ratio"], out["onnx_ratio_ci95"] = {}, {}
    for v in variants:
        if ONNX_PREFIX + v.label in med:
            out["onnx_ratio"][v.label] = med[ONNX_PREFIX + v.label] / med[v.label]
            out["onnx_ratio_ci95"][v.label] = ratio_ci(times[ONNX_PREFIX + v.label], times[v.label], seed=seed)
    # int8 ONNX latency relative to the dense PyTorch model (what deployment gains in all) and to its own
    # fp32 export (what quantisation adds); below 1 = the int8 model takes less time.
    if any(INT8_PREFIX + v.label in med for v in variants):
        for key in ("int8_ratio", "int8_ratio_ci95", "int8_fp32_ratio", "int8_fp32_ratio_ci95"):
            out[key] = {}
    for v in variants:
        q = INT8_PREFIX + v.label
        if q not in med:
            continue
        out["int8_ratio"][v.label] = med[q] / med[DENSE]
        out["int8_ratio_ci95"][v.label] = ratio_ci(times[q], times[DENSE], seed=seed)
        out["int8_fp32_ratio"][v.label] = med[q] / med[ONNX_PREFIX + v.label]
        out["int8_fp32_ratio_ci95"][v.label] = ratio_ci(times[q], times[ONNX_PREFIX + v.label], seed=seed)
    return out


def run_bench(model: str, cfg: BenchConfig | None = None, pruned: str | None = None, remove_ratio: float = 0.5) -> dict:
    """`bench_models` for a model name: the pruned model from a folder, or a random selection.

    Args:
        model: short name, folder or Hub id of the dense model.
        cfg: how to time (default `BenchConfig()`); its seed also draws the random selection.
        pruned: folder of a model pruned by cahp from ``model``; without it, a
            seeded random uneven selection removes ``remove_ratio`` of the heads.
    """
    from cahp.model.checkpoint import is_pruned_folder
    from cahp.model.loading import load_model
    from cahp.model.surgery import remove_heads

    cfg = cfg if cfg is not None else BenchConfig()
    if pruned is None and (not isinstance(remove_ratio, (int, float)) or not 0 < remove_ratio < 1):
        # validate before loading anything
        raise BenchError(f"remove ratio must be a number strictly between 0 and 1, got {remove_ratio!r}")
    attn = "eager"
    if pruned is not None:
        if not is_pruned_folder(pruned):
            raise BenchError(f"{pruned} is not a folder written by cahp (no config.json with cahp_kept_heads)")
        p_model, _ = load_model(pruned, attn_implementation=attn, with_tokenizer=False)
        d_model, _ = load_model(
            model, num_labels=p_model.config.num_labels, attn_implementation=attn, with_tokenizer=False
        )
        label = "pruned"
    else:
        d_model, _ = load_model(model, attn_implementation=attn, with_tokenizer=False)
        p_model = remove_heads(copy.deepcopy(d_model), random_removal(d_model, remove_ratio, seed=cfg.seed))
        label = f"pruned-{round(100 * remove_ratio)}%"
    result = bench_models(d_model, {label: p_model}, cfg)
    result["model"] = model
    result["pruned_source"] = (
        str(pruned) if pruned is not None else f"random selection, ratio {remove_ratio}, seed {cfg.seed}"
    )
    return result
