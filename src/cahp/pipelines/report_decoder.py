"""Markdown of a decoder `cahp compare` report (`cahp.pipelines.compare_decoder`), from its JSON alone.

`render_markdown` writes ``compare.md``: the settings, a table per KV-head budget
(sizes, held-out perplexity without and after the fine-tuning, method - CAHP NLL
with its interval and CAHP's verdict), where each method's KV heads are per
layer, and the decode-speed table. `benchmarks/bench_decoder.py` renders its
RESULTS.md section with it. The encoders' counterpart is `cahp.pipelines.report`.
"""

from __future__ import annotations

__all__ = ["render_markdown"]


def _ppl(s: dict | None) -> str:
    """Mean held-out perplexity, with its standard deviation over seeds when there are several."""
    if s is None:
        return "-"
    return f"{s['perplexity']:.3f}" + (f" ± {s['perplexity_std']:.3f}" if len(s["seeds"]) > 1 else "")


def _diff(s: dict | None) -> str:
    if s is None or not s.get("vs_cahp"):
        return "-"
    c = s["vs_cahp"]["pooled"]
    lo, hi = c["ci95"]
    return f"{c['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] {c['verdict']}"


def _speed_cell(pair: dict, what: str) -> str:
    lo, hi = pair["speedup_ci95"]
    if what == "prefill":
        d, p = pair["dense"]["median_ms"], pair["pruned"]["median_ms"]
        return f"{d:.2f} / {p:.2f} ms, x{pair['speedup']:.3f} [{lo:.3f}, {hi:.3f}]"
    d, p = pair["dense"]["tokens_per_s"], pair["pruned"]["tokens_per_s"]
    return f"{d:.1f} / {p:.1f}, x{pair['speedup']:.3f} [{lo:.3f}, {hi:.3f}]"


def _layer_lines(results: dict) -> list[str]:
    """Where each method's KV heads are: one digit per layer (layer 0 first; '-' for 10 or more), so a
    selection that empties the first layers, which a decoder depends on, shows at a glance."""
    rows = [(m, a["kv_heads_per_layer"]) for m, a in results.items() if a.get("kv_heads_per_layer")]
    if not rows:
        return []
    out = ["", "KV heads kept per layer (layer 0 first), and the layers left without attention:", ""]
    for method, per_layer in rows:
        digits = "".join(str(c) if c < 10 else "-" for c in per_layer)
        empty = [i for i, c in enumerate(per_layer) if c == 0]
        out.append(f"- {method}: `{digits}` ({len(empty)} empty" + (f": {', '.join(map(str, empty[:8]))}"
                                                                    + (", ..." if len(empty) > 8 else "")
                                                                    if empty else "") + ")")
    return out


def render_markdown(report: dict) -> str:
    """compare.md from the JSON alone: settings, a table per budget (sizes, held-out perplexity without and
    after the fine-tuning, (method - CAHP) NLL with its 95% interval and CAHP's verdict), and the speed table."""
    st, dense, data = report["settings"], report["dense"], report["data"]
    fine = report["finetuned"]["results"] if report.get("finetuned") else None
    ft = st["finetune_after"]
    lines = [
        f"# CAHP against the baselines: {report['model']} / {report['task']} text (causal LM, KV-head budgets)\n",
        f"- text: {data['calibration_texts']} calibration sentences ({data['calibration_split']} split), "
        f"{data['heldout_sentences']} held-out sentences, {data['heldout_tokens']:,} predicted tokens "
        f"({data['heldout_split']} split)",
        f"- dense model: held-out perplexity {dense['perplexity']:.3f}, {report['kv_heads']} KV heads "
        f"({report['heads']} query heads), KV cache {dense['kv_cache_bytes_per_token']:,} bytes per token, "
        f"{dense['parameters']:,} parameters",
        "- budgets: " + ", ".join(f"{b['label']} = {b['k']} of {report['kv_heads']} KV heads"
                                  for b in report["budgets"]) + f" (CAHP's knee k* = {report['k_star']})",
        f"- seeds: {st['seeds']}; "
        + (f"one LM fine-tuning after surgery on the calibration text: {ft['epochs']} epochs, lr {ft['lr']}, "
           f"max length {ft['max_length']}" if fine is not None else "no fine-tuning (part (a) only)"),
        f"- statistics: {report['statistics']}",
        f"- {report['verdict_rule']}",
    ]
    if report.get("partial"):
        lines.append("- **partial**: the fine-tuned results are still being computed")
    for b in report["budgets"]:
        label, k = b["label"], b["k"]
        pre = report["no_finetune"]["results"][label]
        lines += [f"\n## {label}: {k} of {report['kv_heads']} KV heads\n",
                  "| method | query heads | KV cache bytes/token | parameters | perplexity, no fine-tuning | "
                  "NLL diff vs CAHP [95% CI], verdict | perplexity after fine-tuning | "
                  "NLL diff vs CAHP after fine-tuning [95% CI], verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, a in pre.items():
            f = fine[label][method] if fine is not None else None
            lines.append(f"| {method} | {a['heads']} | {a['kv_cache_bytes_per_token']:,} | {a['parameters']:,} | "
                         f"{_ppl(a)} | {_diff(a)} | {_ppl(f)} | {_diff(f)} |")
        control = report["finetuned"].get("dense_control") if fine is not None else None
        if control:
            c = control["vs_cahp"][label]["pooled"]
            lo, hi = c["ci95"]
            lines.append(f"| dense control (fine-tuned) | {report['heads']} | {dense['kv_cache_bytes_per_token']:,} "
                         f"| {dense['parameters']:,} | {dense['perplexity']:.3f} | - | {_ppl(control)} | "
                         f"{c['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] (dense - CAHP) |")
        lines += _layer_lines(pre)
    lines.append("\nNLL diff = method minus CAHP in nats per held-out token (> 0: the method's perplexity is "
                 "higher); verdicts are CAHP's (win: CAHP's perplexity lower).")
    speed = report.get("speed")
    if speed:
        s0 = next(iter(speed.values()))["settings"]
        sizes = [str(b) for b in s0["batch_sizes"]]
        lines += [f"\n## Speed: dense against CAHP's pruned model ({s0['device']}, {s0['threads']} thread"
                  f"{'s' if s0['threads'] > 1 else ''})\n",
                  f"Greedy generation with the KV cache, {s0['new_tokens']} new tokens after a "
                  f"{s0['prompt_tokens_used']}-token prompt: generated tokens/s, dense / pruned, and the speed ratio "
                  f"(dense time / pruned time, > 1: pruned faster) with its 95% bootstrap interval; prefill: one "
                  f"forward of 1 x {s0['prefill_tokens_used']} tokens, median ms. Interleaved, about "
                  f"{s0['seconds']:g} s per measurement.\n",
                  "| budget | KV heads | KV cache ratio | " + " | ".join(f"decode batch {b}" for b in sizes)
                  + " | prefill |",
                  "|---|---|---|" + "---|" * len(sizes) + "---|"]
        for b in report["budgets"]:
            sp = speed[b["label"]]
            kv = report["no_finetune"]["results"][b["label"]][st["methods_run"][0]]["kv_cache_bytes_per_token"]
            lines.append(f"| {b['label']} | {b['k']} | {kv / dense['kv_cache_bytes_per_token']:.3f} | "
                         + " | ".join(_speed_cell(sp["decode"][x], "decode") for x in sizes)
                         + f" | {_speed_cell(sp['prefill'], 'prefill')} |")
    return "\n".join(lines) + "\n"

