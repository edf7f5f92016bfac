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
``torch.inference_mode``; onnxruntime models (``onnx=True``) are interleaved
among themselves after the PyTorch ones, so two thread pools never take turns
inside one repetition, except with one thread (no pools), where every model of
both runtimes is interleaved and the ONNX / PyTorch latency ratio of each model
(`ratio_ci`) is paired. Inputs are random token ids with every token real (no
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
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cahp.arch import get_adapter
from cahp.arch.base import ATTENTION_KERNELS
from cahp.core.allocator import hold_freed_memory, memory_held
from cahp.model.heads import KEPT_HEADS_KEY, kept_heads, model_shape
from cahp.model.surgery import remove_heads

log = logging.getLogger(__name__)

DENSE, NO_ATTENTION = "dense", "no_attention"
ONNX_PREFIX = "onnx:"
DEFAULT_SHAPES = ((1, 32), (1, 128), (32, 32), (32, 128))
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class BenchError(ValueError):
    """A benchmark request that cannot be run (bad ratio, mismatched models...)."""


# ---------------------------------------------------------------------------
# Models: random selections, the attention-free floor, inference preparation
# ---------------------------------------------------------------------------


def random_removal(model_or_config, ratio: float, seed: int = 0) -> dict[int, list[int]]:
    """A seeded random selection of ``ratio`` of the heads still present, drawn globally.

    Drawing across all layers at once leaves uneven layers, as a real global
    selection does. Returns ``{layer: [heads to remove]}`` (original numbering).
    """
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise BenchError(f"remove ratio must be a number strictly between 0 and 1, got {ratio!r}")
    present = [(layer, h) for layer, hs in kept_heads(model_or_config).items() for h in hs]
    n = round(ratio * len(present))
    if n < 1 or n >= len(present):
        raise BenchError(
            f"remove ratio {ratio} of {len(present)} heads removes {n}: keep at least one head and remove at least one"
        )
    chosen = random.Random(seed).sample(present, n)
    out: dict[int, list[int]] = {}
    for layer, h in sorted(chosen):
        out.setdefault(layer, []).append(h)
    return out


def emptied_layers_removal(model_or_config, every: int = 2) -> dict[int, list[int]]:
    """Every head of every ``every``-th layer (1, 3, 5, ... for ``every=2``): empty layers."""
    kept = kept_heads(model_or_config)
    return {layer: list(hs) for layer, hs in kept.items() if layer % every == every - 1 and hs}


def no_attention_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the attention block of every layer replaced by its residual path.

    `remove_heads` refuses to remove every head (such a model cannot use its
    context); this builds that model anyway, as the latency floor, by calling
    the adapter below the refusal. ``model`` itself is not changed.
    """
    adapter = get_adapter(model)
    floor = copy.deepcopy(model)
    for layer in adapter.layers(floor):
        if adapter.heads(layer).attention is not None:
            adapter.make_residual_only(layer, floor.config)
    setattr(floor.config, KEPT_HEADS_KEY, {str(i): [] for i in range(len(adapter.layers(floor)))})
    return floor


def count_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(getattr(m, "_backward_hooks", {}))
        for m in model.modules()
    )


def prepare_for_inference(model: nn.Module, kernel: str | None = None, device: str | torch.device = "cpu"):
    """Eval mode, no gradients, contiguous weights on ``device``, the given attention kernel.

    Refuses a model that still carries hooks (open head gates or an attention
    capture): a pruned model must run without them.
    """
    hooks = count_hooks(model)
    if hooks:
        raise BenchError(
            f"the model carries {hooks} forward hooks (open head gates or attention capture?); close them before timing"
        )
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
        if not p.is_contiguous():
            p.data = p.data.contiguous()
    if kernel is not None:
        get_adapter(model).set_attention_kernel(model, kernel)
    return model


# ---------------------------------------------------------------------------
# Multiply-adds
# ---------------------------------------------------------------------------


def _linear_macs(modules: Iterable[nn.Module]) -> int:
    return sum(m.in_features * m.out_features for m in modules if isinstance(m, nn.Linear))


def count_macs(model: nn.Module, batch: int, seq: int) -> dict:
    """Analytic multiply-add count of one forward pass on ``batch`` x ``seq`` tokens.

    Per layer with ``h`` heads of size ``d`` (hidden size ``D``, ``N = batch*seq``):
    projections q, k, v, o ``4*N*D*h*d``; scores q k^T and probabilities x v
    ``2*batch*h*seq^2*d``; feed-forward ``N`` x (the layer's other Linear
    weights, ``2*D*F``). Outside the layers: Linear layers of the embeddings
    (per token, e.g. ELECTRA's projection) and of the pooler/classifier (per
    sequence, on the first token). Softmax, LayerNorm, biases and lookups are
    not multiply-adds.
    """
    adapter = get_adapter(model)
    d = adapter.head_dim(model.config)
    n_tok = batch * seq
    layers_out = []
    in_layers: set[int] = set()
    for layer in adapter.layers(model):
        lh = adapter.heads(layer)
        projections = [m for m in (lh.q, lh.k, lh.v, lh.o) if m is not None]
        heads = lh.q.out_features // d if lh.q is not None else 0
        proj_ids = {id(m) for m in projections}
        others = [m for m in layer.modules() if isinstance(m, nn.Linear) and id(m) not in proj_ids]
        in_layers.update(id(m) for m in layer.modules())
        layers_out.append(
            {
                "heads": heads,
                "attention_projections": n_tok * _linear_macs(projections),
                "attention_scores": 2 * batch * heads * seq * seq * d,
                "ffn": n_tok * _linear_macs(others),
            }
        )
    embed_macs = head_macs = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and id(m) not in in_layers:
            if "embeddings" in name.split("."):
                embed_macs += n_tok * m.in_features * m.out_features
            else:
                head_macs += batch * m.in_features * m.out_features
    attention = sum(x["attention_projections"] + x["attention_scores"] for x in layers_out)
    ffn = sum(x["ffn"] for x in layers_out)
    total = attention + ffn + embed_macs + head_macs
    return {
        "total": total,
        "attention": attention,
        "ffn": ffn,
        "embeddings": embed_macs,
        "head": head_macs,
        "attention_share": attention / total if total else 0.0,
        "layers": layers_out,
    }


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def floor_relative(dense: float, pruned: float, no_attention: float, share_removed: float) -> float:
    """Share of the ideal saving realised: ``(dense - pruned) / ((dense - no_attention) * share_removed)``.

    1.0 means the pruned model sits on the line from dense (nothing removed) to
    the attention-free floor (everything removed); NaN when undefined (no head
    removed, or no measurable attention cost).
    """
    span = (dense - no_attention) * share_removed
    if not share_removed or span <= 0 or not all(map(math.isfinite, (dense, pruned, no_attention))):
        return float("nan")
    return (dense - pruned) / span


def paired_floor_relative(
    dense: Sequence[float], pruned: Sequence[float], no_attention: Sequence[float], share_removed: float
) -> float:
    """`floor_relative` from per-repetition differences: median(dense - pruned) / median(dense - floor) / share.

    The three lists are aligned by repetition (round-robin), so slow drifts of
    the machine cancel in each difference; a check on the figure from medians.
    """
    n = min(len(dense), len(pruned), len(no_attention))
    if n == 0:
        return float("nan")
    saved = statistics.median(d - p for d, p in zip(dense[:n], pruned[:n]))
    span = statistics.median(d - f for d, f in zip(dense[:n], no_attention[:n]))
    return floor_relative(span, span - saved, 0.0, share_removed)


def _ratio_series(
    dense: Sequence[float], pruned: Sequence[float], no_attention: Sequence[float]
) -> tuple[list[float], list[float]]:
    """Per-repetition ``pruned / dense`` and ``no_attention / dense``, still aligned by repetition.

    A repetition whose dense time is not positive (a coarse CPU clock can read 0) is left out of both.
    """
    kept = [(p / d, f / d) for d, p, f in zip(dense, pruned, no_attention) if d > 0]
    return [p for p, _ in kept], [f for _, f in kept]


def ratio_floor_relative(
    dense: Sequence[float], pruned: Sequence[float], no_attention: Sequence[float], share_removed: float
) -> float:
    """`floor_relative` from per-repetition ratios to the dense call: (1 - median(p/d)) / ((1 - median(f/d)) * share).

    On this kind of machine the noise is a slowdown of everything running for
    a while (process CPU time moves with wall time: not preemption), so it
    multiplies the calls of one repetition alike and cancels in their ratios.
    The same quantity as the figure from medians (the algebra is identical),
    estimated with less of the machine's drift in it.
    """
    rp, rf = _ratio_series(dense, pruned, no_attention)
    if not rp:
        return float("nan")
    return floor_relative(1.0, statistics.median(rp), statistics.median(rf), share_removed)


def _bootstrap_medians_ci(series: Sequence[Sequence[float]], statistic, n_boot: int = 2000, seed: int = 0):
    """95% percentile interval of ``statistic(*medians)`` over bootstrap resamples of aligned repetitions.

    Every list of ``series`` is cut to the shortest and resampled with the same
    indices (they are aligned by round-robin repetition); ``statistic`` gets one
    array of ``n_boot`` resampled medians per list and returns ``n_boot`` values.
    Non-finite values are dropped; fewer than 2 repetitions, or a statistic
    undefined in most resamples, give ``[nan, nan]``.
    """
    n = min(len(x) for x in series)
    if n < 2:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    medians = [np.median(np.asarray(x[:n], dtype=np.float64)[idx], axis=1) for x in series]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*medians), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < n_boot // 2:  # undefined in most resamples: no usable interval
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def floor_relative_ci(
    dense: Sequence[float],
    pruned: Sequence[float],
    no_attention: Sequence[float],
    share_removed: float,
    n_boot: int = 2000,
    seed: int = 0,
    from_ratios: bool = False,
) -> list[float]:
    """95% bootstrap interval of the median-based `floor_relative` figure (``from_ratios``: of `ratio_floor_relative`).

    Repetitions are resampled with replacement, the same indices for the three
    lists (they are aligned by round-robin repetition), and the figure is
    recomputed from the resampled medians. On a noisy machine the interval says
    whether a goal is met, missed, or cannot be told from these runs.
    """
    if from_ratios:
        series = _ratio_series(dense, pruned, no_attention)

        def figure(mp, mf):
            return [floor_relative(1.0, a, b, share_removed) for a, b in zip(mp, mf)]

    else:
        series = (dense, pruned, no_attention)

        def figure(md, mp, mf):
            return [floor_relative(a, b, c, share_removed) for a, b, c in zip(md, mp, mf)]

    return _bootstrap_medians_ci(series, figure, n_boot, seed)


def ratio_ci(
    numer: Sequence[float], denom: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> list[float]:
    """95% bootstrap interval of ``median(numer) / median(denom)``, repetitions resampled jointly.

    The two lists are aligned by round-robin repetition (the same indices are
    drawn for both). Used for the ONNX / PyTorch latency ratio of one model.
    """
    return _bootstrap_medians_ci((numer, denom), lambda a, b: a / b, n_boot, seed)


def summarize(times_s: Sequence[float], batch: int, seq: int) -> dict:
    """Median, quartiles and IQR in ms; throughput from the median."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    med = statistics.median(ms)
    return {
        "median_ms": med,
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": ms[0],
        "n": len(ms),
        "sequences_per_s": batch / (med / 1e3),
        "tokens_per_s": batch * seq / (med / 1e3),
    }


def time_round_robin(
    runners: Mapping[str, Callable[[], object]],
    reps: int | None = None,
    warmup: int = 2,
    budget_s: float = 20.0,
    min_reps: int = 10,
    max_reps: int = 200,
    sync: Callable[[], None] | None = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Per-call latencies (s) of each runner, interleaved round-robin.

    Each repetition runs every runner once; the starting runner rotates so no
    model always follows the same one. ``reps=None`` repeats until
    ``budget_s`` has passed (at least ``min_reps``, at most ``max_reps``).
    ``clock="cpu"`` measures the process's CPU time instead of wall time: work
    rather than latency (summed over threads), but much less disturbed by
    other jobs on a busy machine.
    """
    if clock not in CLOCKS:
        raise BenchError(f"unknown clock {clock!r}; choose {' or '.join(CLOCKS)}")
    timer = CLOCKS[clock]
    names = list(runners)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    # Outside the timed calls. Without reps the budget usually ends the loop long before max_reps,
    # so the bar counts the budget's seconds (its estimate of the end is then right).
    by_time = reps is None
    bar = tqdm(total=round(budget_s) if by_time else reps, desc="timing", unit="s" if by_time else "rep",
               mininterval=10, leave=False)
    start = time.perf_counter()
    r = 0
    while True:
        if reps is not None and r >= reps:
            break
        if reps is None and r >= min_reps and (r >= max_reps or time.perf_counter() - start > budget_s):
            break
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            sync()
            t0 = timer()
            runners[name]()
            sync()
            times[name].append(timer() - t0)
        r += 1
        if by_time:
            bar.update(min(round(time.perf_counter() - start), bar.total) - bar.n)
            bar.set_postfix_str(f"{r} repetitions", refresh=False)
        else:
            bar.update()
    bar.close()
    return times


def make_inputs(model: nn.Module, batch: int, seq: int, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids (no special tokens), every token real; token_type_ids when the model takes them."""
    import inspect

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    low = min(5, vocab - 1)
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return {k: v.to(device) for k, v in inputs.items()}


def _torch_runner(model: nn.Module, inputs: dict):
    def run():
        with torch.inference_mode():
            return model(**inputs)

    return run


def _onnx_runner(session, inputs: dict):
    feed = {k: v.cpu().numpy() for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}}

    def run():
        return session.run(None, feed)

    return run


# ---------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------


@dataclass
class Variant:
    """One model in a comparison: its label, module and the share of original heads it removed."""

    label: str
    model: nn.Module
    share_removed: float
    kept: dict[int, list[int]]


def _variant(label: str, model: nn.Module) -> Variant:
    kept = kept_heads(model.config)
    n_layers, n_heads = model_shape(model.config)
    total = n_layers * n_heads
    return Variant(label, model, 1 - sum(len(v) for v in kept.values()) / total, kept)


def resolve_devices(devices: str | Sequence[str]) -> list[str]:
    if isinstance(devices, str):
        devices = [devices]
    out = []
    for d in devices:
        if d == "auto":
            out.append("cpu")
            if torch.cuda.is_available():
                out.append("cuda")
        elif d == "cpu" or d.startswith("cuda"):
            if d.startswith("cuda") and not torch.cuda.is_available():
                raise BenchError(f"device {d!r} asked for, but torch sees no GPU")
            out.append(d)
        else:
            raise BenchError(f"unknown device {d!r}; use cpu, cuda or auto")
    return list(dict.fromkeys(out))


def max_sequence_length(config) -> int:
    """Longest input the position embeddings cover (RoBERTa-style ids start after the padding id)."""
    n = getattr(config, "max_position_embeddings", 512)
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        n -= (config.pad_token_id or 0) + 1
    return n


def parse_shapes(text: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``"1x32,32x128"`` -> [(1, 32), (32, 128)] (batch x sequence)."""
    if not isinstance(text, str):
        return [(int(b), int(s)) for b, s in text]
    shapes = []
    for part in text.split(","):
        try:
            b, s = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise BenchError(f"bad shape {part!r}: write BATCHxSEQUENCE, e.g. 32x128") from None
        if b < 1 or s < 1:
            raise BenchError(f"bad shape {part!r}: batch and sequence must be positive")
        shapes.append((b, s))
    return shapes


def bench_models(
    dense: nn.Module,
    pruned: Mapping[str, nn.Module],
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    threads: int | None = None,
    kernel: str = "auto",
    devices: str | Sequence[str] = "cpu",
    reps: int | None = None,
    warmup: int = 2,
    budget_s: float = 20.0,
    min_reps: int = 10,
    max_reps: int = 200,
    onnx: bool = False,
    onnx_dir: str | os.PathLike | None = None,
    seed: int = 0,
    clock: str = "wall",
    hold_memory: bool = True,
) -> dict:
    """Time ``dense``, each model of ``pruned`` and the attention-free floor.

    Args:
        dense: the original model.
        pruned: label -> pruned model of the same architecture.
            Neither is changed: copies are prepared and timed.
        shapes: (batch, sequence) pairs.
        threads: CPU threads (``torch.set_num_threads``); None keeps torch's.
        kernel: "eager", "sdpa", "compact" (see
            `ArchAdapter.set_attention_kernel`) or "auto": per device and shape
            the dense model's fastest, then used by every model.
        devices: "cpu", "cuda", or "auto" (cpu, plus cuda when present).
        reps: timed repetitions; None: as many as ``budget_s`` allows per
            shape (at least ``min_reps``, at most ``max_reps``).
        onnx: also export every model to ONNX and time it with onnxruntime
            (CPU, same thread count); the export is checked against PyTorch.
        clock: "wall" (latency) or "cpu" (process CPU time; see `time_round_robin`).
        hold_memory: keep freed memory in the process first (`cahp.core.allocator.hold_freed_memory`),
            so no model page-faults its activations in again on every call. Process-wide.

    Returns:
        A JSON-ready dict (see `format_table` for what it holds).
    """
    if kernel not in (*ATTENTION_KERNELS, "auto"):
        raise BenchError(f"unknown kernel {kernel!r}; choose auto or one of {', '.join(ATTENTION_KERNELS)}")
    if not pruned:
        raise BenchError("no pruned model to time")
    if clock not in CLOCKS:
        raise BenchError(f"unknown clock {clock!r}; choose {' or '.join(CLOCKS)}")
    shapes = parse_shapes(shapes)
    devices = resolve_devices(devices)
    if threads is not None:
        if threads < 1:
            raise BenchError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    longest = max_sequence_length(dense.config)
    too_long = [s for _, s in shapes if s > longest]
    if too_long:
        raise BenchError(f"sequence length {max(too_long)} is longer than the model allows ({longest})")
    shape_dense = model_shape(dense.config)
    for label, m in pruned.items():
        if type(m) is not type(dense) or model_shape(m.config) != shape_dense:
            raise BenchError(f"pruned model {label!r} does not have the architecture of the dense model")
        if label in (DENSE, NO_ATTENTION) or label.startswith(ONNX_PREFIX):
            raise BenchError(f"label {label!r} is reserved")

    allocator = _allocator(hold_memory)
    dense = copy.deepcopy(dense)
    variants = [_variant(DENSE, dense), *(_variant(k, copy.deepcopy(v)) for k, v in pruned.items())]
    variants.append(_variant(NO_ATTENTION, no_attention_model(dense)))
    for v in variants:
        if v.label != DENSE and v.label != NO_ATTENTION and v.share_removed <= 0:
            raise BenchError(f"pruned model {v.label!r} has every head: nothing was removed")
        prepare_for_inference(v.model)
    n_layers, n_heads = shape_dense
    result = {
        "model_type": dense.config.model_type,
        "layers": n_layers,
        "heads_per_layer": n_heads,
        "threads": threads,
        "kernel_policy": kernel,
        "devices": devices,
        "reps": reps,
        "warmup": warmup,
        "budget_s": None if reps is not None else budget_s,
        "clock": clock,
        "allocator": allocator,
        "inputs": "random token ids, no padding",
        "variants": {
            v.label: {
                "share_removed": v.share_removed,
                "heads_kept": sum(len(h) for h in v.kept.values()),
                "heads_per_layer": [len(v.kept[i]) for i in range(n_layers)],
                "parameters": sum(p.numel() for p in v.model.parameters()),
            }
            for v in variants
        },
        "runs": [],
    }

    candidates: dict = {}
    sessions = {}
    if onnx:
        from cahp.deploy.onnx import export_onnx, onnx_session, verify_onnx

        result["onnx"] = {}
        tmp = tempfile.TemporaryDirectory(prefix="cahp-bench-onnx-") if onnx_dir is None else None
        out_dir = Path(onnx_dir if onnx_dir is not None else tmp.name)
        for v in variants:
            path = out_dir / f"{v.label.replace('/', '_').replace('%', 'pct')}.onnx"
            export_onnx(v.model, path)
            check = verify_onnx(v.model, path, threads=threads)
            sessions[v.label] = onnx_session(path, threads=threads)
            result["onnx"][v.label] = {"max_abs_diff": check["max_abs_diff"], "shapes": check["shapes"]}
            log.info("onnx %s: max |onnx - torch| = %.2e", v.label, check["max_abs_diff"])

    for device in devices:
        for v in variants:
            v.model.to(device)
        sync = torch.cuda.synchronize if device.startswith("cuda") else None
        for batch, seq in shapes:
            inputs = make_inputs(dense, batch, seq, device=device, seed=seed)
            run = {"device": device, "batch": batch, "seq": seq}
            run["kernel"], run["kernel_calibration_ms"] = _choose_kernel(
                variants, kernel, inputs, sync, warmup, candidates, clock
            )
            # With several threads: PyTorch models interleaved with each other, then the ONNX models
            # with each other (two runtimes' thread pools taking turns would disturb each other's
            # timings). With one thread there is no pool: all interleaved, so ONNX / PyTorch is paired.
            groups = [{v.label: _torch_runner(v.model, inputs) for v in variants}]
            if device == "cpu" and sessions:
                onnx_runners = {ONNX_PREFIX + k: _onnx_runner(sess, inputs) for k, sess in sessions.items()}
                if threads == 1:
                    groups[0].update(onnx_runners)
                else:
                    groups.append(onnx_runners)
                run["runtimes_interleaved"] = threads == 1
            times = {}
            for runners in groups:
                log.info(
                    "timing %s batch %d seq %d (%s attention): %s",
                    device,
                    batch,
                    seq,
                    run["kernel"],
                    ", ".join(runners),
                )
                times.update(
                    time_round_robin(
                        runners,
                        reps=reps,
                        warmup=warmup,
                        budget_s=budget_s,
                        min_reps=min_reps,
                        max_reps=max_reps,
                        sync=sync,
                        clock=clock,
                    )
                )
            run["timings"] = {k: summarize(t, batch, seq) for k, t in times.items()}
            # every repetition, aligned by round (kept so the figures can be re-derived)
            run["times_ms"] = {k: [x * 1e3 for x in t] for k, t in times.items()}
            run["macs"] = {v.label: count_macs(v.model, batch, seq)["total"] for v in variants}
            for key in ("floor_relative", "floor_relative_paired", "floor_relative_ci95", "floor_relative_ratio",
                        "floor_relative_ratio_ci95"):
                run[key] = {}
            med = {k: s["median_ms"] for k, s in run["timings"].items()}
            for v in variants:
                if v.label in (DENSE, NO_ATTENTION):
                    continue
                for prefix in ("", ONNX_PREFIX):
                    if prefix + v.label not in med:
                        continue
                    d, p, n = (prefix + x for x in (DENSE, v.label, NO_ATTENTION))
                    run["floor_relative"][p] = floor_relative(med[d], med[p], med[n], v.share_removed)
                    run["floor_relative_paired"][p] = paired_floor_relative(
                        times[d], times[p], times[n], v.share_removed
                    )
                    run["floor_relative_ci95"][p] = floor_relative_ci(
                        times[d], times[p], times[n], v.share_removed, seed=seed
                    )
                    run["floor_relative_ratio"][p] = ratio_floor_relative(
                        times[d], times[p], times[n], v.share_removed
                    )
                    run["floor_relative_ratio_ci95"][p] = floor_relative_ci(
                        times[d], times[p], times[n], v.share_removed, seed=seed, from_ratios=True
                    )
            # ONNX latency relative to PyTorch, per model: below 1 = onnxruntime faster.
            run["onnx_ratio"], run["onnx_ratio_ci95"] = {}, {}
            for v in variants:
                if ONNX_PREFIX + v.label in med:
                    run["onnx_ratio"][v.label] = med[ONNX_PREFIX + v.label] / med[v.label]
                    run["onnx_ratio_ci95"][v.label] = ratio_ci(times[ONNX_PREFIX + v.label], times[v.label], seed=seed)
            result["runs"].append(run)
            log.info(
                "%s batch %d seq %d: %s",
                device,
                batch,
                seq,
                ", ".join(
                    f"{k} {t['median_ms']:.2f} ms"
                    + (f" (floor-rel {run['floor_relative'][k]:.2f})" if k in run["floor_relative"] else "")
                    for k, t in run["timings"].items()
                ),
            )
        candidates.clear()
    for v in variants:
        v.model.to("cpu")
    return result


def _allocator(hold_memory: bool) -> str:
    """Apply the allocator policy; say what holds in this process (for the result)."""
    if hold_memory:
        hold_freed_memory()
    if memory_held():  # process-wide and permanent, whatever this call asked
        return "glibc, freed memory held (cahp.core.allocator.hold_freed_memory)"
    return "C library default" + (" (holding freed memory is glibc-only)" if hold_memory else "")


def _choose_kernel(variants, kernel, inputs, sync, warmup, candidates, clock="wall") -> tuple[str, dict | None]:
    """The kernel every model runs with; for "auto", the dense model's fastest one at this shape.

    ``candidates`` caches one copy of the dense model per kernel (filled on first use).
    """
    if kernel == "auto":
        if not candidates:
            for k in ATTENTION_KERNELS:
                m = copy.deepcopy(variants[0].model)
                get_adapter(m).set_attention_kernel(m, k)
                candidates[k] = m
        runners = {k: _torch_runner(m.to(inputs["input_ids"].device), inputs) for k, m in candidates.items()}
        times = time_round_robin(runners, reps=7, warmup=warmup, sync=sync, clock=clock)
        calib = {k: statistics.median(t) * 1e3 for k, t in times.items()}
        chosen = min(calib, key=calib.get)
    else:
        chosen, calib = kernel, None
    for v in variants:
        get_adapter(v.model).set_attention_kernel(v.model, chosen)
    return chosen, calib


# ---------------------------------------------------------------------------
# Where the line is lost: the cost of one attention block against its head count
# ---------------------------------------------------------------------------


def uniform_removal(model_or_config, keep: int) -> dict[int, list[int]]:
    """Every layer keeps its first ``keep`` heads: ``{layer: [heads to remove]}`` (original numbering)."""
    kept = kept_heads(model_or_config)
    if not 0 < keep <= min(len(hs) for hs in kept.values()):
        raise BenchError(f"cannot keep {keep} heads in every layer: layers hold {[len(h) for h in kept.values()]}")
    return {layer: list(hs[keep:]) for layer, hs in kept.items() if hs[keep:]}


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
    counts: Sequence[int] | None = None,
    threads: int | None = None,
    kernel: str = "auto",
    reps: int | None = None,
    warmup: int = 2,
    budget_s: float = 60.0,
    min_reps: int = 10,
    max_reps: int = 200,
    seed: int = 0,
    clock: str = "wall",
    n_boot: int = 2000,
    hold_memory: bool = True,
) -> dict:
    """Time the model with ``h`` heads in every layer, for each ``h`` of ``counts``, and the floor.

    All interleaved round-robin (see `time_round_robin`). The per-block cost
    above the floor, ``(t_h - t_floor) / layers``, is fitted by
    `fit_block_cost`: its fixed part is what keeps pruned models off the line.
    The fit's ``uniform_ceiling`` gets a 95% bootstrap interval over
    repetitions (resampled together, as in `floor_relative_ci`).

    Args:
        counts: heads per layer to time (default: every count from all heads down to 1).
        kernel, hold_memory: as in `bench_models`; kernel "auto" takes the dense model's fastest.

    Returns:
        A JSON-ready dict: settings, per-count medians and per-block costs, the
        fit, its interval, and the per-repetition times.
    """
    if kernel not in (*ATTENTION_KERNELS, "auto"):
        raise BenchError(f"unknown kernel {kernel!r}; choose auto or one of {', '.join(ATTENTION_KERNELS)}")
    n_layers, n_heads = model_shape(dense.config)
    counts = sorted(set(counts if counts is not None else range(1, n_heads + 1)), reverse=True)
    if not counts or any(not 1 <= h <= n_heads for h in counts):
        raise BenchError(f"head counts must lie between 1 and {n_heads}, got {list(counts)}")
    if threads is not None:
        torch.set_num_threads(threads)
    allocator = _allocator(hold_memory)
    models = {
        h: copy.deepcopy(dense) if h == n_heads else remove_heads(copy.deepcopy(dense), uniform_removal(dense, h))
        for h in counts
    }
    models[0] = no_attention_model(dense)
    variants = [_variant(DENSE if h == n_heads else f"{h} heads", m) for h, m in models.items()]
    if n_heads not in models:  # "auto" calibrates on the dense model
        variants.insert(0, _variant(DENSE, copy.deepcopy(dense)))
    for v in variants:
        prepare_for_inference(v.model)
    inputs = make_inputs(dense, batch, seq, seed=seed)
    chosen, calib = _choose_kernel(variants, kernel, inputs, None, warmup, {}, clock)
    times = time_round_robin(
        {h: _torch_runner(m, inputs) for h, m in models.items()},
        reps=reps, warmup=warmup, budget_s=budget_s, min_reps=min_reps, max_reps=max_reps, clock=clock,
    )
    med = {h: statistics.median(t) * 1e3 for h, t in times.items()}
    fit = _sweep_fit(med, n_layers, n_heads)
    heads = list(times)

    def ceilings(*medians):  # per resample: the fit's ceiling from that resample's medians (ms)
        return [
            _sweep_fit({h: 1e3 * m[i] for h, m in zip(heads, medians)}, n_layers, n_heads)["uniform_ceiling"]
            for i in range(n_boot)
        ]

    ci = _bootstrap_medians_ci([times[h] for h in heads], ceilings, n_boot, seed)
    log.info("sweep batch %d seq %d (%s): fixed %.3f ms + %.3f ms/head per block; uniform ceiling %.2f [%.2f, %.2f]",
             batch, seq, chosen, fit["fixed_ms"], fit["per_head_ms"], fit["uniform_ceiling"], *ci)
    return {
        "model_type": dense.config.model_type, "layers": n_layers, "heads_per_layer": n_heads,
        "batch": batch, "seq": seq, "threads": torch.get_num_threads(), "kernel": chosen,
        "kernel_calibration_ms": calib, "clock": clock, "allocator": allocator, "reps": len(times[0]),
        "inputs": "random token ids, no padding",
        "median_ms": {str(h): med[h] for h in sorted(med, reverse=True)},
        "per_block_ms": {str(h): c for h, c in _per_block(med, n_layers).items()},
        "fit": fit, "uniform_ceiling_ci95": ci,
        "times_ms": {str(h): [x * 1e3 for x in t] for h, t in times.items()},
    }


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------


def fmt_number(x: float | None, digits: int = 2, missing: str = "-") -> str:
    """``x`` with ``digits`` decimals, or ``missing`` for None/NaN (an undefined figure, e.g. no floor gap)."""
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_run(run: dict, variants: Mapping[str, dict]) -> str:
    """Plain-text table of one (device, batch, seq) run."""
    head = f"{run['device']} batch {run['batch']} seq {run['seq']}, {run['kernel']} attention" + (
        " (calibration: " + ", ".join(f"{k} {v:.2f} ms" for k, v in run["kernel_calibration_ms"].items()) + ")"
        if run.get("kernel_calibration_ms")
        else ""
    )
    rows = [
        f"{'model':28s} {'removed':>7s} {'median ms':>10s} {'IQR ms':>8s} {'seq/s':>9s} {'GMAC':>8s} "
        f"{'floor-rel':>9s} {'paired':>7s} {'ratios':>7s}"
    ]
    paired = run.get("floor_relative_paired", {})
    by_ratio = run.get("floor_relative_ratio", {})
    for label, t in run["timings"].items():
        base = label[len(ONNX_PREFIX) :] if label.startswith(ONNX_PREFIX) else label
        var = variants.get(base, {})
        macs = run["macs"].get(base)
        rows.append(
            f"{label:28s} {fmt_number(100 * var.get('share_removed', float('nan')), 0) + '%':>7s} "
            f"{t['median_ms']:10.2f} {t['iqr_ms']:8.2f} {t['sequences_per_s']:9.1f} "
            f"{fmt_number(macs / 1e9 if macs else None, 2):>8s} {fmt_number(run['floor_relative'].get(label)):>9s} "
            f"{fmt_number(paired.get(label)):>7s} {fmt_number(by_ratio.get(label)):>7s}"
        )
    ratios = run.get("onnx_ratio") or {}
    if ratios:
        ci = run.get("onnx_ratio_ci95") or {}
        rows.append(
            "onnx / pytorch latency"
            + ("" if run.get("runtimes_interleaved") else " (runtimes timed one after the other)")
            + ": "
            + ", ".join(
                f"{k} {fmt_number(r)}" + (f" [{fmt_number(ci[k][0])}, {fmt_number(ci[k][1])}]" if k in ci else "")
                for k, r in ratios.items()
            )
        )
    return head + "\n" + "\n".join(rows)


def format_table(result: dict) -> str:
    """Every run of a `bench_models` result as plain-text tables."""
    lines = [
        f"{result.get('model', result['model_type'])}: {result['layers']} layers x {result['heads_per_layer']} heads, "
        f"{result['threads']} threads, kernel policy {result['kernel_policy']}"
    ]
    for label, v in result["variants"].items():
        lines.append(f"  {label}: heads per layer {v['heads_per_layer']}")
    if result.get("onnx"):
        worst = max(o["max_abs_diff"] for o in result["onnx"].values())
        lines.append(f"  onnx export checked against PyTorch: max |diff| {worst:.1e}")
    for run in result["runs"]:
        lines.append("")
        lines.append(format_run(run, result["variants"]))
    lines.append("")
    lines.append(
        "floor-rel = (dense - pruned) / ((dense - no_attention) x share of heads removed), from medians; "
        "1.0 = on the line from dense to the attention-free floor. paired: the same from per-repetition "
        "differences; ratios: from per-repetition ratios to the dense call (both less sensitive to a drifting "
        "machine)"
    )
    return "\n".join(lines)


SWEEP_EXPLAINED = (
    "per block = (model - no attention) / layers: the time one attention block with h heads (h in every layer) "
    "adds above the attention-free floor. fixed + per_head x h: least-squares line over h >= 1; with fixed > 0, "
    "uniform pruning realises at most ceiling = heads x per_head / (fixed + heads x per_head) of the ideal "
    "saving at any budget (95% bootstrap interval over repetitions in brackets)."
)


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def format_sweep(runs: Mapping[str, Sequence[dict]]) -> str:
    """Markdown tables of `head_count_sweep` results, ``{model name: [one result per shape]}``."""
    out = [
        "| model | batch x seq | kernel | reps | fixed (ms per block) | per head (ms) | fixed share of a dense block "
        "| ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    detail = []
    for name, results in runs.items():
        for r in results:
            f, ci = r["fit"], r["uniform_ceiling_ci95"]
            out.append(
                f"| {name} | {r['batch']}x{r['seq']} | {r['kernel']} | {r['reps']} | {fmt_number(f['fixed_ms'], 3)} "
                f"| {fmt_number(f['per_head_ms'], 3)} | {fmt_number(_pct(f['fixed_share']), 1)}% "
                f"| {fmt_number(f['uniform_ceiling'])} "
                f"[{fmt_number(ci[0])}, {fmt_number(ci[1])}] |"
            )
            counts = list(r["per_block_ms"])
            detail += [
                f"\n{name}, {r['batch']}x{r['seq']}: ms per call (median) and per block above the floor\n",
                "| heads per layer | " + " | ".join(counts) + " | 0 (floor) |",
                "|---|" + "---|" * (len(counts) + 1),
                "| ms per call | " + " | ".join(fmt_number(r["median_ms"][h]) for h in [*counts, "0"]) + " |",
                "| ms per block | " + " | ".join(fmt_number(r["per_block_ms"][h], 3) for h in counts) + " | 0 |",
            ]
    return "\n".join(out + detail)


def run_bench(
    model: str,
    pruned: str | None = None,
    remove_ratio: float = 0.5,
    seed: int = 0,
    **kwargs,
) -> dict:
    """`bench_models` for a model name: the pruned model from a folder, or a random selection.

    Args:
        model: short name, folder or Hub id of the dense model.
        pruned: folder of a model pruned by cahp from ``model``; without it, a
            seeded random uneven selection removes ``remove_ratio`` of the heads.
        kwargs: passed to `bench_models`.
    """
    from cahp.model.loading import load_model

    if pruned is None and (not isinstance(remove_ratio, (int, float)) or not 0 < remove_ratio < 1):
        # validate before loading anything
        raise BenchError(f"remove ratio must be a number strictly between 0 and 1, got {remove_ratio!r}")
    attn = "eager"
    if pruned is not None:
        from cahp.model.checkpoint import is_pruned_folder

        if not is_pruned_folder(pruned):
            raise BenchError(f"{pruned} is not a folder written by cahp (no config.json with cahp_kept_heads)")
        p_model, _ = load_model(pruned, attn_implementation=attn, with_tokenizer=False)
        d_model, _ = load_model(
            model, num_labels=p_model.config.num_labels, attn_implementation=attn, with_tokenizer=False
        )
        label = "pruned"
    else:
        d_model, _ = load_model(model, attn_implementation=attn, with_tokenizer=False)
        removal = random_removal(d_model, remove_ratio, seed=seed)
        from cahp.model.surgery import remove_heads

        p_model = remove_heads(copy.deepcopy(d_model), removal)
        label = f"pruned-{round(100 * remove_ratio)}%"
    result = bench_models(d_model, {label: p_model}, seed=seed, **kwargs)
    result["model"] = model
    result["pruned_source"] = (
        str(pruned) if pruned is not None else f"random selection, ratio {remove_ratio}, seed {seed}"
    )
    return result
