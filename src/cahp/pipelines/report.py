"""Markdown of a `cahp compare` report, from its JSON alone (also used by benchmarks/bench_compare.py).

`render_markdown` writes the tables and verdicts of ``compare.md``; `verdict_lines`
and `verdict_text` give the plain-language verdicts; `seconds_by_machine` sums the
compute time of cached results per machine.
"""

from __future__ import annotations

import logging

log = logging.getLogger("cahp.pipelines.compare")  # the comparisons' verdict lines

__all__ = ["compute_seconds", "pooled_verdict_texts", "render_markdown", "seconds_by_machine", "verdict_lines",
           "verdict_text"]


def compute_seconds(record: dict) -> float:
    """Compute time of one cached result: its "total" (curves, whose parts overlap), else the sum of its parts."""
    secs = record["seconds"]
    return float(secs["total"] if "total" in secs else sum(secs.values()))


def seconds_by_machine(records: list[dict]) -> dict[str, float]:
    """Compute seconds of cached results summed per machine that computed them ("unrecorded" for old caches)."""
    out: dict[str, float] = {}
    for r in records:
        where = r.get("_machine", "unrecorded")
        out[where] = round(out.get(where, 0.0) + compute_seconds(r), 1)
    return out


def verdict_text(method: str, label: str, k: int, cmp: dict) -> str:
    """One plain-language sentence for a pooled comparison."""
    d, (lo, hi), p = cmp["diff"] * 100, (x * 100 for x in cmp["ci95"]), cmp["p_value"]
    where = f"at {label} ({_heads(k)})"
    stats = f"{method} minus CAHP = {d:+.2f} points, 95% CI [{lo:+.2f}, {hi:+.2f}], p = {_p(p)}"
    if cmp["verdict"] == "win":
        return f"{where}: CAHP beats {method} ({stats})."
    if cmp["verdict"] == "loss":
        return f"{where}: {method} beats CAHP ({stats})."
    return f"{where}: tie, the difference is inside the confidence interval ({stats})."


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}"


def _cell(s: dict) -> str:
    acc = f"{s['accuracy'] * 100:.2f}"
    if len(s.get("seeds") or []) > 1:
        acc += f" ± {s['accuracy_std'] * 100:.2f}"
    v = s.get("vs_cahp")
    if v:
        acc += f" ({v['pooled']['diff'] * 100:+.2f}, {v['pooled']['verdict']})"
    return acc


def _heads(k: int) -> str:
    return f"{k} head" + ("" if k == 1 else "s")


def _budget_head(report: dict) -> list[str]:
    return [f"{b['label']} ({_heads(b['k'])})" for b in report["budgets"]]


def _detail_table(report: dict, results: dict, finetuned: bool) -> list[str]:
    lines = []
    for b in report["budgets"]:
        label, k = b["label"], b["k"]
        lines.append(f"\n**{label}: {k} of {report['heads']} heads**\n")
        head = ("| method | accuracy (mean ± std) | per seed | diff vs CAHP | 95% CI | p | verdict "
                "| per-seed verdicts (win/tie/loss) |")
        if not finetuned:
            head += " held-out (curve data) |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for method, s in results[label].items():
            v = s.get("vs_cahp")
            std = f" ± {s['accuracy_std'] * 100:.2f}" if len(s.get("seeds") or []) > 1 else ""
            per_seed = ", ".join(f"{a * 100:.2f}" for a in s["accuracy_per_seed"])
            if v:
                p = v["pooled"]
                cmp = (f"{p['diff'] * 100:+.2f} | [{p['ci95'][0] * 100:+.2f}, {p['ci95'][1] * 100:+.2f}] | "
                       f"{_p(p['p_value'])} | {p['verdict']} | "
                       f"{v['per_seed_verdicts']['win']}/{v['per_seed_verdicts']['tie']}/{v['per_seed_verdicts']['loss']}")
            else:
                cmp = "(reference) | | | | "
            row = f"| {method} | {s['accuracy'] * 100:.2f}{std} | {per_seed} | {cmp} |"
            if not finetuned:
                row += f" {_pct(s.get('heldout_accuracy'))} |"
            lines.append(row)
    return lines


def verdict_lines(report: dict) -> list[str]:
    """Plain-language verdicts, one per method and budget (after fine-tuning when it ran, else without)."""
    part = report["finetuned"]["results"] if report.get("finetuned") else report["no_finetune"]["results"]
    when = "after fine-tuning" if report.get("finetuned") else "without fine-tuning"
    out = []
    for b in report["budgets"]:
        for method, s in part[b["label"]].items():
            if s.get("vs_cahp"):
                out.append(f"{method}, {when}, {s['vs_cahp']['pooled']['text']}")
    return out


def trained_on(finetune: dict) -> str:
    """What a fine-tuning's recorded settings (a `FinetuneConfig` as a dict) trained on, in a report's words:
    the labels, or the labels and the dense model's outputs (`cahp.train.teacher`)."""
    if not finetune.get("kd_alpha"):
        return "on the labels"
    return (f"on the labels and the dense model's outputs (distillation weight {finetune['kd_alpha']:g}, "
            f"temperature {finetune['kd_temperature']:g})")


def render_markdown(report: dict) -> str:
    """Markdown tables and verdicts of a compare report."""
    split = report["test_split"]
    st = report["settings"]
    fa = st["finetune_after"]
    dense_acc = report["dense"]["test"].get(split, {}).get("accuracy")
    lines = [
        f"# CAHP against the baselines: {report['model']} / {report['task']}\n",
        f"- test split `{split}` ({report['data']['test_examples']} examples); dense fine-tuned model: "
        f"{_pct(dense_acc)}% accuracy"
        + (f"; always predicting the most frequent test label scores {_pct(report['data']['test_majority_share'])}%"
           if "test_majority_share" in report["data"] else ""),
        "- budgets: " + ", ".join(f"{b['label']} = {b['k']} of {report['heads']} heads" for b in report["budgets"])
        + f" (CAHP's knee k* = {report['k_star']})",
        f"- seeds: {st['seeds']}; "
        + (f"fine-tuning after pruning: {fa['epochs']} epochs max, lr {fa['lr']}, batch {fa['batch_size']}, "
           f"patience {fa['patience']} (early stopping on dev {fa['metric']}), trained {trained_on(fa)}"
           if report.get("finetuned") else "no fine-tuning after pruning (part (a) only)"),
        f"- statistics: {report['statistics']}; {report['verdict_rule']}",
    ]
    if report.get("finetuned") and len(st["seeds"]) == 1:
        lines.append("- **one seed**: after fine-tuning, the intervals cover the sampling of test examples only, "
                     "not the spread between fine-tuning runs; a verdict from one seed is weaker than it reads")
    if report.get("partial"):
        lines.append("- **partial**: the fine-tuning part has not finished yet")
    if report.get("finetuned"):
        res = report["finetuned"]["results"]
        lines += ["\n## After one fine-tuning (test accuracy, %; cell: mean ± std over seeds (diff vs CAHP, "
                  "CAHP's verdict))\n",
                  "| method | " + " | ".join(_budget_head(report)) + " |",
                  "|---|" + "---|" * len(report["budgets"])]
        for method in res[report["budgets"][0]["label"]]:
            lines.append(f"| {method} | " + " | ".join(_cell(res[b["label"]][method]) for b in report["budgets"])
                         + " |")
        dc = report["finetuned"].get("dense_control")
        if dc:
            std = f" ± {dc['accuracy_std'] * 100:.2f}" if len(dc["seeds"]) > 1 else ""
            cells = []
            for b in report["budgets"]:
                p = dc["vs_cahp"][b["label"]]["pooled"]
                cells.append(f"{dc['accuracy'] * 100:.2f}{std} ({p['diff'] * 100:+.2f}, {p['verdict']})")
            lines.append(f"| dense control ({report['heads']} heads, same extra fine-tuning) | "
                         + " | ".join(cells) + " |")
        lines += _detail_table(report, res, True)
    nf = report["no_finetune"]["results"]
    lines += ["\n## Right after pruning, no fine-tuning (test accuracy through gates, %)\n",
              "| method | " + " | ".join(_budget_head(report)) + " |",
              "|---|" + "---|" * len(report["budgets"])]
    for method in nf[report["budgets"][0]["label"]]:
        lines.append(f"| {method} | " + " | ".join(_cell(nf[b["label"]][method]) for b in report["budgets"]) + " |")
    lines.append(f"| dense ({_heads(report['heads'])}, for reference) | "
                 + " | ".join(_pct(dense_acc) for _ in report["budgets"]) + " |")
    lines += _detail_table(report, nf, False)
    lines += ["\n## Kept heads per layer (layer 0 first) and mean relative depth (0 = first layer, 1 = last; "
              "the proximity-bias measure)\n",
              "| method | " + " | ".join(_budget_head(report)) + " |",
              "|---|" + "---|" * len(report["budgets"])]
    for method in nf[report["budgets"][0]["label"]]:
        cells = []
        for b in report["budgets"]:
            s = nf[b["label"]][method]
            per_layer = s["heads_per_layer_mean"] if len(s.get("seeds") or []) > 1 else s["heads_per_layer"]
            # a mean over seeds is shown to one decimal (2.3, not 2.33333)
            cells.append(" ".join(f"{round(x, 1):g}" for x in per_layer) + f" (depth {s['mean_relative_depth']:.2f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    curves = report["no_finetune"]["curves"]
    lines += ["\n## Curves without fine-tuning (held-out accuracy on the curve data, %)\n",
              "| heads | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    ks = next(iter(curves.values()))["ks"]
    for i, k in enumerate(ks):
        lines.append(f"| {k} | " + " | ".join(f"{c['accuracy'][i] * 100:.2f}" for c in curves.values()) + " |")
    verdicts = verdict_lines(report)
    if verdicts:
        lines += ["\n## Verdicts\n", *[f"- {v}" for v in verdicts]]
    t = report["timings"]
    spent = f"{t['no_finetune_seconds']:.0f} s without fine-tuning"
    if t.get("finetune_seconds") is not None:
        spent += f", {t['finetune_seconds']:.0f} s fine-tuning and evaluating"
    lines.append(f"\nCompute time of the results (cached ones included): {spent}; this call took "
                 f"{t['total_seconds']:.0f} s ({t['results_computed']} results computed, {t['results_cached']} "
                 f"from the cache).")
    by_machine = t.get("seconds_by_machine")
    if by_machine and list(by_machine) != ["unrecorded"]:
        lines.append("Computed on: " + "; ".join(f"{m}: {v:.0f} s" for m, v in by_machine.items()) + ".")
    return "\n".join(lines) + "\n"


def pooled_verdict_texts(report: dict) -> list[str]:
    """"method: text" of every pooled verdict of a compare report (after fine-tuning where it ran), budget by budget."""
    part = report["finetuned"] or report["no_finetune"]
    return [f"{method}: {s['vs_cahp']['pooled']['text']}" for b in report["budgets"]
            for method, s in part["results"][b["label"]].items() if s.get("vs_cahp")]


def write_compare_outputs(out, report: dict, markdown: str, plot_scores, verdicts: list[str]) -> None:
    """A compare run's files: compare.json, compare.md, compare.png (``plot_scores(report, path)``) and
    compare_layers.png; once the report is final, ``verdicts`` go to the log, a line each."""
    from pathlib import Path

    from cahp.core.io import write_atomic, write_json
    from cahp.pipelines.plots import plot_compare_layers

    out = Path(out)
    write_json(out / "compare.json", report)
    write_atomic(out / "compare.md", markdown)
    plot_scores(report, out / "compare.png")
    plot_compare_layers(report, out / "compare_layers.png")
    if not report["partial"]:
        for line in verdicts:
            log.info("%s", line)
