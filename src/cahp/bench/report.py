"""Plain-text and markdown rendering of `bench_models` and `head_count_sweep` results."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from cahp.bench.config import INT8_PREFIX, ONNX_PREFIX


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
        base = next((label[len(p) :] for p in (ONNX_PREFIX, INT8_PREFIX) if label.startswith(p)), label)
        var = variants.get(base, {})
        macs = run["macs"].get(base)
        rows.append(
            f"{label:28s} {fmt_number(100 * var.get('share_removed', float('nan')), 0) + '%':>7s} "
            f"{t['median_ms']:10.2f} {t['iqr_ms']:8.2f} {t['sequences_per_s']:9.1f} "
            f"{fmt_number(macs / 1e9 if macs else None, 2):>8s} {fmt_number(run['floor_relative'].get(label)):>9s} "
            f"{fmt_number(paired.get(label)):>7s} {fmt_number(by_ratio.get(label)):>7s}"
        )
    apart = "" if run.get("runtimes_interleaved") else " (runtimes timed one after the other)"
    # the int8 and fp32 ONNX models are always interleaved with each other: their ratio needs no caveat
    for key, what in (("onnx_ratio", "onnx / pytorch latency" + apart),
                      ("int8_ratio", "int8 onnx / pytorch dense latency" + apart),
                      ("int8_fp32_ratio", "int8 / fp32 onnx latency")):
        if run.get(key):
            rows.append(f"{what}: " + _ratios(run[key], run.get(key + "_ci95")))
    return head + "\n" + "\n".join(rows)


def _ratios(ratios: Mapping[str, float], ci: Mapping[str, list] | None) -> str:
    """``label ratio [lo, hi]`` for each model, comma separated."""
    ci = ci or {}
    return ", ".join(
        f"{k} {fmt_number(r)}" + (f" [{fmt_number(ci[k][0])}, {fmt_number(ci[k][1])}]" if k in ci else "")
        for k, r in ratios.items()
    )


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
    if result.get("int8"):
        worst = max(o["relative_diff"] for o in result["int8"].values())
        same = min(o["argmax_agreement"] for o in result["int8"].values())
        lines.append(f"  int8 copies checked against PyTorch fp32: max |diff| {worst:.3f} of the logit scale, "
                     f"same predicted class on at least {same:.0%} of rows")
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
