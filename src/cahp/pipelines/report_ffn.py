"""Markdown of a labelled `cahp compare --ffn` report (`cahp.pipelines.compare_ffn`), from its JSON alone.

`render_ffn_markdown` writes ``compare_ffn.md``: the settings, the dense model
and heads-only CAHP, then per target a table (`target_table`: method, kept
units, estimated and measured speedups, accuracy without and after
fine-tuning, the difference from CAHP with its verdict) and the issue's goals
in words (`goal_lines`: speed at accuracy against `SPEED_GOAL`, CAHP against
the field). `summary_lines` is the command's console summary.
`benchmarks/bench_frontier.py` renders its RESULTS.md sections with it; the
label-free counterpart (`cahp.pipelines.compare_embedding_ffn`) reuses
`target_table`.
"""

from __future__ import annotations

from cahp.pipelines.report import trained_on

__all__ = ["SPEED_GOAL", "collapsed", "decide", "fidelity_fallback", "goal_lines", "heads_fallback", "neutral_fallback",
           "render_ffn_markdown", "split_by", "split_rule", "summary_lines", "target_table", "units_rule", "within"]


#: Issue 19's speed goal (measured speedup at each shape); it judges targets at least this fast, and the knee.
SPEED_GOAL = 2.0


def _fmt_speed(ms: dict | None, shape: str) -> str:
    if not ms or shape not in ms:
        return "-"
    v = ms[shape]
    return f"{v['speedup']:.2f}x [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"


def _fmt_vs(v: dict | None) -> str:
    if not v:
        return "-"
    p = v["pooled"]
    return f"{p['diff'] * 100:+.2f} [{p['ci95'][0] * 100:+.2f}, {p['ci95'][1] * 100:+.2f}] {p['verdict']}"


def summary_lines(report: dict) -> list[str]:
    """One line per target: each method's score (fine-tuned where run) and measured speedup, CAHP's verdict.

    The score is the report's ``"score"`` entry of each part (default ``"accuracy"``; the embedding objective's
    compare, `cahp.pipelines.compare_embedding_ffn`, has ``"spearman"``)."""
    shape = report["cost_table"]["shapes"][0]
    score = report.get("score", "accuracy")
    out = []
    for t in report["targets"]:
        parts = []
        for m, r in report["results"][t["label"]].items():
            if "unreachable" in r:
                parts.append(f"{m} unreachable")
                continue
            part = r.get("finetuned") or r["no_finetune"]
            v = (part.get("vs_cahp") or {}).get("pooled")
            parts.append(f"{m} {part[score] * 100:.2f} ({_fmt_speed(r.get('measured_speedup'), shape)})"
                         + (f" CAHP {v['verdict']}" if v else ""))
        out.append(f"{t['label']}: " + "; ".join(parts))
    return out


def split_by(report: dict) -> str:
    """What chose the report's CAHP split (``choose_by``): "loss" or "score" (reports from before ``choose_by``
    chose by the held-out score)."""
    return (report["settings"].get("joint") or {}).get("choose_by", "score")


def collapsed(report: dict) -> str:
    """The report's rule for collapsed splits (``collapsed``): "fidelity", "neutral" or "lowest" (reports from
    before ``collapsed`` kept the lowest loss)."""
    return (report["settings"].get("joint") or {}).get("collapsed", "lowest")


def neutral_fallback(report: dict) -> bool:
    """Whether the report's split rule keeps the neutral weight 1 where every loss is at chance (loss rule,
    ``collapsed="neutral"``)."""
    return split_by(report) == "loss" and collapsed(report) == "neutral"


def fidelity_fallback(report: dict) -> bool:
    """Whether the report's split rule keeps the split of highest hidden-state fidelity where every loss is at
    chance (loss rule, ``collapsed="fidelity"``)."""
    return split_by(report) == "loss" and collapsed(report) == "fidelity"


def heads_fallback(report: dict) -> bool:
    """Whether the report's split rule keeps the split with the most heads where every loss is at chance (loss
    rule, ``collapsed="heads"``)."""
    return split_by(report) == "loss" and collapsed(report) == "heads"


def fixed_weight(report: dict) -> str | None:
    """The report's CAHP head weight when ``--head-weights`` gave only one (nothing to choose), else None."""
    weights = [w for w in str((report["settings"].get("joint") or {}).get("head_weights", "")).split(",") if w.strip()]
    return weights[0].strip() if len(weights) == 1 else None


def split_rule(report: dict) -> str:
    """How the report's CAHP chose its head weight at each share, in words (`split_by`)."""
    joint = report["settings"].get("joint") or {}
    if fixed_weight(report):
        return f"the head weight fixed at {fixed_weight(report)} (--head-weights: no choice)"
    what = ("loss (cross-entropy; squared error for regression)" if split_by(report) == "loss"
            else "score (the curve's metric)")
    rule = f"the head weight of {joint.get('head_weights', '-')} with the best held-out {what}"
    if neutral_fallback(report):
        rule += (", the neutral weight 1 where no loss is below the best constant predictor's (collapsed outputs: "
                 "the data cannot choose)")
    elif fidelity_fallback(report):
        rule += (", the last hidden states closest to the dense model's (mean cosine over real tokens) where no "
                 "loss is below the best constant predictor's (collapsed outputs: the labels cannot choose)")
    elif heads_fallback(report):
        rule += (", the split keeping the most heads where no loss is below the best constant predictor's "
                 "(collapsed outputs: the labels cannot choose)")
    return rule


def within(report: dict) -> str:
    """How the report's CAHP kept a layer's units (``within``): "greedy" or "clusters" (reports from before
    ``within`` kept cluster representatives)."""
    return (report["settings"].get("joint") or {}).get("within", "clusters")


def units_rule(report: dict) -> str:
    """`within` in words."""
    if within(report) == "greedy":
        return "by salience discounted by nearness to the units kept before (greedy)"
    return "one most salient member of each of the layer's clusters"


def cost_lines(report: dict) -> list[str]:
    """What the run's cost tables priced one head and one neuron at (`cost.cost_summary`); none in older reports.

    Selections at an estimated share follow these prices, so two runs whose tables
    were measured apart can keep different units at the same target.
    """
    per_shape = (report.get("cost_table") or {}).get("per_shape")
    if not per_shape:
        return []
    parts = [f"at {s} one head {v['head_share'] * 100:.3f}% and one neuron {v['neuron_share'] * 100:.4f}% of the "
             f"dense model's cost" for s, v in per_shape.items()]
    machines = sorted({v["machine"] for v in per_shape.values() if v["machine"]})
    where = f" (measured on {', '.join(machines)})" if machines else ""
    return [f"Cost tables, {report['cost_table']['source']}{where}: " + "; ".join(parts) + ".", ""]


def render_ffn_markdown(report: dict) -> str:
    """compare_ffn.md: one table per target (method, kept units, speedups, accuracies, verdict against CAHP)."""
    split = report["test_split"]
    shapes = report["cost_table"]["shapes"]
    lines = [f"# cahp compare --ffn: {report['model']} / {report['task']}", "",
             f"Seeds {report['settings']['seeds']}; test split {split}; accuracies in %; speedups dense / pruned "
             f"latency, 1 thread, median [95% interval]; verdict: {report['verdict_rule']}", ""]
    dense = report["dense"]
    lines.append(f"Dense model before the comparison: {dense['test'][split]['accuracy'] * 100:.2f}"
                 + (f"; dense control (fine-tuned again): {dense['control']['accuracy'] * 100:.2f}"
                    if dense.get("control") else ""))
    lines += [f"CAHP's split of the budget between heads and neurons: {split_rule(report)}; units kept in a layer: "
              f"{units_rule(report)}; every fine-tuning trained {trained_on(report['settings']['finetune_after'])}.",
              ""]
    lines += cost_lines(report)
    ho = report["heads_only"]
    ho_ft = f", fine-tuned {ho['finetuned']['accuracy'] * 100:.2f}" if ho.get("finetuned") else ""
    lines += [f"Heads-only CAHP (the paper) at k* = {ho['k']}: measured "
              + ", ".join(f"{s} {_fmt_speed(ho.get('measured_speedup'), s)}" for s in shapes) + ho_ft, ""]
    for t in report["targets"]:
        lines += target_table(report, t, shapes)
        lines += goal_lines(report, t, shapes)
    return "\n".join(lines) + "\n"


def target_table(report: dict, target: dict, shapes: list[str], score: str = "accuracy",
                 columns: tuple[str, str] = ("no FT", "fine-tuned")) -> list[str]:
    """The markdown lines of one target's table: method, kept units, estimated and measured speedups, the
    ``score`` entry x 100 without and after fine-tuning (``columns`` name them) and CAHP's verdict."""
    where = ("at most at every shape; est. speedup: of the shapes' mean" if target.get("at") == "each"
             else "the shapes' mean")
    lines = [f"## {target['label']} (estimated share {target['share']:.3f}, {where})", "",
             "| method | heads | neurons | est. speedup | " + " | ".join(f"measured {s}" for s in shapes)
             + f" | {columns[0]} | {columns[1]} | vs CAHP ({columns[1]}) |",
             "|---|---|---|---|" + "---|" * len(shapes) + "---|---|---|"]
    for m, r in report["results"][target["label"]].items():
        if "unreachable" in r:
            lines.append(f"| {m} | unreachable: {r['unreachable']} |")
            continue
        ft = r.get("finetuned")
        lines.append(
            f"| {m} | {r['heads']} | {r['neurons']} | {1 / r['estimated_share']:.2f}x | "
            + " | ".join(_fmt_speed(r.get("measured_speedup"), s) for s in shapes)
            + f" | {r['no_finetune'][score] * 100:.2f} | "
            + (f"{ft[score] * 100:.2f}" if ft else "-") + f" | {_fmt_vs(ft.get('vs_cahp') if ft else None)} |")
    lines.append("")
    return lines


def decide(lo: float, hi: float, goal: float) -> str:
    """A "at least ``goal``" verdict from a 95% interval: met above it, not met below it, else undecided."""
    return "met" if lo >= goal else "not met" if hi < goal else "undecided"


def candidate_lines(cahp: dict) -> list[str]:
    """CAHP's split candidates at one target (`CahpJoint.best`): each head weight's held-out score and loss,
    through gates before fine-tuning, and the one chosen; [] for results that do not record them."""
    info = cahp.get("info") or {}
    cands = info.get("candidates") or []
    if len(cands) < 2:
        return []
    by = info.get("choose_by", "score")  # results made before the loss rule chose by the held-out score
    losses = [c["heldout_loss"] for c in cands if c.get("heldout_loss") is not None]
    spread = f"; the losses span {max(losses) - min(losses):.4f}" if len(losses) > 1 else ""
    if info.get("neutral_fallback"):
        by = f"the neutral rule (no loss below the constant predictor's {info['chance_loss']:.4f})"
    elif info.get("decided_by") == "fidelity":
        by = (f"hidden-state fidelity to the dense model (no loss below the constant predictor's "
              f"{info['chance_loss']:.4f})")
    elif info.get("decided_by") == "heads":
        by = f"the most heads kept (no loss below the constant predictor's {info['chance_loss']:.4f})"
    else:
        by = f"held-out {by}"
        if info.get("collapsed"):
            by += f" (none below the constant predictor's {info['chance_loss']:.4f})"
    def held(c: dict) -> str:
        out = f"score {c['heldout_score']:.3f}, loss " + (f"{c['heldout_loss']:.4f}" if c.get("heldout_loss")
                                                          is not None else "-")
        return out + (f", fidelity {c['heldout_fidelity']:.4f}" if c.get("heldout_fidelity") is not None else "")

    return [f"- CAHP's split: head weight {info['head_weight']:g}, chosen by {by} among "
            + ", ".join(f"{c['head_weight']:g} ({held(c)})" for c in cands) + spread + "."]


def goal_lines(report: dict, target: dict, shapes: list[str]) -> list[str]:
    """Issue 19's goals at one target, in words: CAHP's speed and accuracy, and its verdict against each method."""
    rows = report["results"][target["label"]]
    cahp = rows.get("cahp", {})
    if "unreachable" in cahp or not cahp:
        return []
    n_seeds = len(report["settings"]["seeds"])
    out = []
    speed = []
    judged = target["label"] == "knee" or target["speedup"] >= SPEED_GOAL  # a slower target aims lower
    for s in shapes:
        m = (cahp.get("measured_speedup") or {}).get(s)
        if m:
            speed.append(f"{s} {m['speedup']:.2f}x [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"
                         + (f" ({decide(m['ci95'][0], m['ci95'][1], SPEED_GOAL)})" if judged else ""))
    control = (report["dense"].get("control") or {}).get("vs_cahp", {}).get(target["label"])
    if speed or control:
        goal = (f"at least {SPEED_GOAL:.1f}x at each shape, and " if judged
                else f"the {SPEED_GOAL:.1f}x speed goal does not apply below {SPEED_GOAL:g}x; ")
        text = f"- Speed at accuracy (goal: {goal}CAHP at most 1.0 point below the dense " \
               f"control): measured {', '.join(speed) or '-'}"
        if control:
            p = control["pooled"]  # dense minus CAHP: flip it to CAHP minus dense
            d, lo, hi = -p["diff"] * 100, -p["ci95"][1] * 100, -p["ci95"][0] * 100
            text += f"; CAHP minus dense control {d:+.2f} [{lo:+.2f}, {hi:+.2f}] points ({decide(lo, hi, -1.0)})"
        out.append(text + f"; {n_seeds} seed{'s' if n_seeds > 1 else ''}.")
    out += candidate_lines(cahp)
    verdicts: dict[str, list[str]] = {"win": [], "tie": [], "loss": []}
    for m, r in rows.items():
        v = ((r.get("finetuned") or {}).get("vs_cahp") or {}).get("pooled")
        if v:
            verdicts[v["verdict"]].append(m)
    if any(verdicts.values()):
        out.append(f"- Against the field after the same fine-tuning ({n_seeds} seed{'s' if n_seeds > 1 else ''}): "
                   + "; ".join(f"CAHP {k}s against {', '.join(v) if v else 'none'}"
                               .replace("CAHP ties against", "CAHP ties with")
                               .replace("CAHP losss against", "CAHP loses against") for k, v in verdicts.items())
                   + ("." if n_seeds > 1 else " (with one seed the intervals cover the test-set sampling, not the "
                      "spread between fine-tuning runs)."))
    return out + [""] if out else []

