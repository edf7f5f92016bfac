"""Where the line is lost: the cost of one attention block against its head count.

`head_count_sweep` times the model with ``h`` heads in every layer, for each
``h``, and the attention-free floor; `fit_block_cost` fits the cost one block
adds above the floor as ``fixed + per_head * h``. A fixed part, paid by any
block that keeps a head, keeps pruned models off the dense-to-floor line.
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from cahp.bench.config import DENSE, BenchConfig, BenchError
from cahp.bench.figures import bootstrap_medians_ci
from cahp.bench.timing import apply_allocator, choose_kernel, make_inputs, time_models, torch_runner
from cahp.bench.variants import make_variant, no_attention_model, prepare_for_inference, uniform_removal
from cahp.model.heads import describe, model_shape
from cahp.model.surgery import remove_heads

log = logging.getLogger(__name__)

#: A sweep times every head count and the floor: without a config it gets a longer budget than `BenchConfig`'s.
SWEEP_DEFAULTS = BenchConfig(budget=60.0)


def fit_block_cost(counts: Sequence[int], per_block_ms: Sequence[float], heads: int) -> dict:
    """Least-squares line ``cost(h) = fixed + per_head * h`` of one attention block over ``h >= 1`` heads.

    ``per_block_ms[i]`` is the time one block adds above the attention-free
    floor with ``counts[i]`` heads (``(model - floor) / layers``). If the cost
    were proportional to the heads (``fixed`` = 0) every pruned model would sit
    on the dense-to-floor line. A fixed part is paid by any block that keeps a
    head, so uniform pruning realises at most ``ceiling = heads * per_head /
    (fixed + heads * per_head)`` of the ideal saving, whatever the budget.
    """
    pts = [(h, c) for h, c in zip(counts, per_block_ms) if h >= 1 and math.isfinite(c)]
    if len({h for h, _ in pts}) < 2:
        nan = float("nan")
        return {"fixed_ms": nan, "per_head_ms": nan, "fixed_share": nan, "uniform_ceiling": nan}
    hs, cs = (np.asarray(x, dtype=np.float64) for x in zip(*pts))
    per_head, fixed = np.polyfit(hs, cs, 1)
    full = fixed + heads * per_head
    return {
        "fixed_ms": float(fixed),
        "per_head_ms": float(per_head),
        "fixed_share": float(fixed / full) if full > 0 else float("nan"),
        "uniform_ceiling": float(heads * per_head / full) if full > 0 else float("nan"),
    }


def _per_block(med: Mapping[int, float], n_layers: int) -> dict[int, float]:
    """Time one block with ``h`` heads adds above the floor (``med[0]``), from per-count medians."""
    return {h: (med[h] - med[0]) / n_layers for h in sorted(med, reverse=True) if h}


def _sweep_fit(med: Mapping[int, float], n_layers: int, heads: int) -> dict:
    per_block = _per_block(med, n_layers)
    return fit_block_cost(list(per_block), list(per_block.values()), heads)


def head_count_sweep(
    dense: nn.Module,
    batch: int = 1,
    seq: int = 32,
    cfg: BenchConfig | None = None,
    counts: Sequence[int] | None = None,
    n_boot: int = 2000,
) -> dict:
    """Time the model with ``h`` heads in every layer, for each ``h`` of ``counts``, and the floor.

    All interleaved round-robin (see `time_round_robin`), on the CPU. The
    per-block cost above the floor, ``(t_h - t_floor) / layers``, is fitted by
    `fit_block_cost`: its fixed part is what keeps pruned models off the line.
    The fit's ``uniform_ceiling`` gets a 95% bootstrap interval over
    repetitions (resampled together, as in `floor_relative_ci`).

    Args:
        cfg: threads, kernel, repetitions, clock, allocator and seed (its shapes,
            device and onnx do not apply); kernel "auto" takes the dense model's fastest.
            None: `SWEEP_DEFAULTS`.
        counts: heads per layer to time (default: every count from all heads down to 1).
        n_boot: bootstrap resamples of the ceiling's interval.

    Returns:
        A JSON-ready dict: settings, per-count medians and per-block costs, the
        fit, its interval, and the per-repetition times.
    """
    cfg = cfg if cfg is not None else SWEEP_DEFAULTS
    n_layers, n_heads = model_shape(dense.config)
    counts = sorted(set(counts if counts is not None else range(1, n_heads + 1)), reverse=True)
    if not counts or any(not 1 <= h <= n_heads for h in counts):
        raise BenchError(f"head counts must lie between 1 and {n_heads}, got {list(counts)}")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    allocator = apply_allocator(cfg.hold_memory)
    models = {
        h: copy.deepcopy(dense) if h == n_heads else remove_heads(copy.deepcopy(dense), uniform_removal(dense, h))
        for h in counts
    }
    models[0] = no_attention_model(dense)
    variants = [make_variant(DENSE if h == n_heads else f"{h} heads", m) for h, m in models.items()]
    if n_heads not in models:  # "auto" calibrates on the dense model
        variants.insert(0, make_variant(DENSE, copy.deepcopy(dense)))
    for v in variants:
        prepare_for_inference(v.model)
    inputs = make_inputs(dense, batch, seq, seed=cfg.seed)
    chosen, calib = choose_kernel([v.model for v in variants], cfg.kernel, inputs, None, cfg.warmup, {}, cfg.clock)
    times = time_models({h: torch_runner(m, inputs) for h, m in models.items()}, cfg)
    med = {h: statistics.median(t) * 1e3 for h, t in times.items()}
    fit = _sweep_fit(med, n_layers, n_heads)
    heads = list(times)

    def ceilings(*medians):  # per resample: the fit's ceiling from that resample's medians (ms)
        return [
            _sweep_fit({h: 1e3 * m[i] for h, m in zip(heads, medians)}, n_layers, n_heads)["uniform_ceiling"]
            for i in range(n_boot)
        ]

    ci = bootstrap_medians_ci([times[h] for h in heads], ceilings, n_boot, cfg.seed)
    log.info("sweep batch %d seq %d (%s): fixed %.3f ms + %.3f ms/head per block; uniform ceiling %.2f [%.2f, %.2f]",
             batch, seq, chosen, fit["fixed_ms"], fit["per_head_ms"], fit["uniform_ceiling"], *ci)
    return {
        **describe(dense),
        "batch": batch, "seq": seq, "threads": torch.get_num_threads(), "kernel": chosen,
        "kernel_calibration_ms": calib, "clock": cfg.clock, "allocator": allocator, "reps": len(times[0]),
        "inputs": "random token ids, no padding",
        "median_ms": {str(h): med[h] for h in sorted(med, reverse=True)},
        "per_block_ms": {str(h): c for h, c in _per_block(med, n_layers).items()},
        "fit": fit, "uniform_ceiling_ci95": ci,
        "times_ms": {str(h): [x * 1e3 for x in t] for h, t in times.items()},
    }
