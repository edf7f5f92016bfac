"""Measuring a cost table in seconds: every block at several widths, interleaved, a line per block.

See `cahp.budget.cost` for what the table means. Per layer the attention block
(the layer's real module after head surgery, replayed on the inputs it got in
one forward pass, and its residual-only stand-in for 0 heads) and the FFN's
neuron work ``out(act(inter(x)))`` are timed at `measurement_widths`, together
with the whole model, all round-robin within every repetition
(`cahp.bench.timing.time_round_robin`), so a slowdown of the machine hits
every block alike. A line through each block's medians gives its fixed and
per-unit cost (`fit_linear`).
"""

from __future__ import annotations

import copy
import logging
import statistics
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cahp.arch import get_adapter
from cahp.bench.timing import make_inputs, time_round_robin
from cahp.budget.cost import BlockCost, CostModelError, CostTable, attention_block, check_shape, unit_counts
from cahp.core.threads import num_threads
from cahp.model.heads import kept_heads, model_shape
from cahp.model.surgery import remove_heads

log = logging.getLogger(__name__)


def fit_linear(widths: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``fixed + per_unit * width`` through (width, seconds) points -> (fixed, per_unit).

    Neither may be negative (noise can tilt a nearly flat block's line): a
    falling line becomes the flat one through the mean; a negative intercept
    becomes 0 with the slope refitted through the origin.
    """
    w = np.asarray(widths, dtype=np.float64)
    s = np.asarray(seconds, dtype=np.float64)
    if w.shape != s.shape or w.ndim != 1 or len(np.unique(w)) < 2:
        raise CostModelError(f"a line needs at least 2 distinct widths, got {w.tolist()}")
    per_unit, fixed = np.polyfit(w, s, 1)
    if per_unit < 0:
        return max(float(s.mean()), 0.0), 0.0
    if fixed < 0:
        return 0.0, max(float(w @ s / (w @ w)), 0.0)
    return float(fixed), float(per_unit)


def measurement_widths(current: int, n: int) -> list[int]:
    """``n`` evenly spaced widths up to ``current`` (``current/n, 2*current/n, ..., current``), distinct."""
    return sorted({max(1, round(current * (i + 1) / n)) for i in range(n)})


def _capture_inputs(model: nn.Module, inputs: dict) -> tuple[list, list]:
    """Per layer, the (args, kwargs) its attention block and the input (B, T, D) its FFN got in one pass."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    att: list = [None] * len(layers)
    ffn: list = [None] * len(layers)
    handles = []

    def store_att(i):
        def hook(module, args, kwargs):
            att[i] = (args, dict(kwargs))

        return hook

    def store_ffn(i):
        def hook(module, args):
            ffn[i] = args[0]

        return hook

    try:
        for i, layer in enumerate(layers):
            handles.append(attention_block(layer).register_forward_pre_hook(store_att(i), with_kwargs=True))
            handles.append(adapter.ffn(layer).inter.register_forward_pre_hook(store_ffn(i)))
        with torch.inference_mode():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return att, ffn


def _slice_ffn(inter: nn.Linear, out: nn.Linear, width: int) -> tuple[nn.Linear, nn.Linear]:
    """Copies keeping the first ``width`` neurons: rows of ``inter``, columns of ``out``."""
    a = nn.Linear(inter.in_features, width, bias=inter.bias is not None, device=inter.weight.device,
                  dtype=inter.weight.dtype)
    b = nn.Linear(width, out.out_features, bias=out.bias is not None, device=out.weight.device,
                  dtype=out.weight.dtype)
    with torch.no_grad():
        a.weight.copy_(inter.weight[:width])
        b.weight.copy_(out.weight[:, :width])
        if a.bias is not None:
            a.bias.copy_(inter.bias[:width])
        if b.bias is not None:
            b.bias.copy_(out.bias)
    return a.eval().requires_grad_(False), b.eval().requires_grad_(False)


def _runners(model: nn.Module, inputs: dict, att_widths: list[list[int]], ffn_widths: list[list[int]]) -> dict:
    """Callables keyed ("model",), ("attention", layer, width) and ("ffn", layer, width)."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    att_in, ffn_in = _capture_inputs(model, inputs)
    kept = kept_heads(model.config)
    blocks: dict[tuple[int, int], nn.Module] = {}
    for w in sorted({w for ws in att_widths for w in ws}):
        if all(w == len(kept[i]) for i in range(len(layers))):
            copy_layers = layers
        else:  # every layer keeps its first w heads; only the attention blocks are kept afterwards
            pruned = remove_heads(copy.deepcopy(model), {i: kept[i][w:] for i in range(len(layers))})
            copy_layers = adapter.layers(pruned)
        for i, ws in enumerate(att_widths):
            if w in ws:
                blocks[(i, w)] = attention_block(copy_layers[i])
    for i, layer in enumerate(layers):
        empty = copy.deepcopy(layer)
        adapter.make_residual_only(empty, model.config)
        blocks[(i, 0)] = attention_block(empty).eval()

    def call_block(block, args, kwargs):
        return lambda: block(*args, **kwargs)

    def call_ffn(inter, act, out, x):
        return lambda: out(act(inter(x)))

    runners = {("model",): lambda: model(**inputs)}
    for (i, w), block in sorted(blocks.items()):
        runners[("attention", i, w)] = call_block(block, *att_in[i])
    for i, layer in enumerate(layers):
        f = adapter.ffn(layer)
        for w in ffn_widths[i]:
            inter, out = (f.inter, f.out) if w == f.inter.out_features else _slice_ffn(f.inter, f.out, w)
            runners[("ffn", i, w)] = call_ffn(inter, f.act, out, ffn_in[i])
    return runners


def measure_table(
    model: nn.Module,
    batch: int,
    seq: int,
    widths: int = 3,
    reps: int = 20,
    warmup: int = 2,
    threads: int | None = None,
    seed: int = 0,
) -> CostTable:
    """Measure a cost table in seconds on this machine (``source="measured"``), see the module docstring.

    Args:
        model: a supported model, dense or pruned; every layer must still hold at
            least 2 heads and 2 neurons (two widths per block to fit a line).
            Widths are measured up to the model's own; costs at the original
            widths follow the fitted line.
        batch, seq: the target shape; inputs are random ids, every token real.
        widths: widths per block (``measurement_widths``), at least 2.
        reps, warmup: interleaved repetitions (each runs every block once) and untimed ones.
        threads: torch threads for the measurement (None: as set now).
        seed: seed of the random input ids.
    """
    check_shape(batch, seq)
    if isinstance(widths, bool) or not isinstance(widths, int) or widths < 2:
        raise CostModelError(f"widths must be an integer >= 2 (a line needs two points), got {widths!r}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise CostModelError(f"reps must be a positive integer, got {reps!r}")
    adapter = get_adapter(model)
    config = model.config
    n_layers, n_heads = model_shape(config)
    heads, neurons = unit_counts(model)
    for i, (h, f) in enumerate(zip(heads, neurons)):
        if h < 2 or f < 2:
            raise CostModelError(
                f"layer {i} holds {h} heads and {f} neurons: measuring needs at least 2 of each in every layer "
                "(measure on the dense model, or use source='macs')"
            )
    att_widths = [measurement_widths(h, widths) for h in heads]
    ffn_widths = [measurement_widths(f, widths) for f in neurons]
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    was_training = model.training
    model.eval()
    try:
        with num_threads(threads, error=CostModelError):
            inputs = make_inputs(model, batch, seq, device=device, seed=seed)
            with torch.no_grad():  # copies and slices stay ordinary tensors (not inference tensors)
                runners = _runners(model, inputs, att_widths, ffn_widths)
            log.info("cost model: timing %d blocks and the model, %d repetitions", len(runners) - 1, reps)
            with torch.inference_mode():
                times = time_round_robin(runners, reps=reps, warmup=warmup, sync=sync)
    finally:
        model.train(was_training)
    med = {k: statistics.median(v) for k, v in times.items()}
    attention, ffn, details = [], [], {"attention": [], "ffn": [], "model_s": med[("model",)]}
    d_ff = adapter.intermediate_size(config)
    for i in range(n_layers):
        a_med = [med[("attention", i, w)] for w in att_widths[i]]
        fixed, per_unit = fit_linear(att_widths[i], a_med)
        empty = min(med[("attention", i, 0)], fixed + per_unit)  # keeps the estimate monotone
        attention.append(BlockCost(n_heads, fixed, per_unit, empty))
        f_med = [med[("ffn", i, w)] for w in ffn_widths[i]]
        fixed, per_unit = fit_linear(ffn_widths[i], f_med)
        ffn.append(BlockCost(d_ff, fixed, per_unit, 0.0))
        details["attention"].append({"widths": att_widths[i], "median_s": a_med, "empty_s": med[("attention", i, 0)]})
        details["ffn"].append({"widths": ffn_widths[i], "median_s": f_med})
    blocks = sum(attention[i].cost(heads[i]) + ffn[i].cost(neurons[i]) for i in range(n_layers))
    rest = med[("model",)] - blocks
    if rest < 0:
        log.warning("cost model: the blocks timed alone (%.3g s) exceed the whole model (%.3g s); rest set to 0",
                    blocks, med[("model",)])
        rest = 0.0
    return CostTable("measured", "s", batch, seq, attention, ffn, float(rest), details=details)
