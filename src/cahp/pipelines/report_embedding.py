"""Markdown of a label-free `cahp compare --objective embedding` report (`cahp.pipelines.compare_embedding`).

`render_markdown` writes ``compare.md`` from the report's JSON alone: the
settings, then a table per budget (heads kept, held-out fidelity, test
Spearman before and after the distillation, the difference from CAHP with its
95% interval and CAHP's verdict) and the dense model's row.
`benchmarks/bench_embedding.py` renders its RESULTS.md sections with it. The
labelled counterpart is `cahp.pipelines.report`, the decoders'
`cahp.pipelines.report_decoder`.
"""

from __future__ import annotations

__all__ = ["render_markdown"]


def _pts(x: float) -> str:
    return f"{x * 100:.2f}"


def _mean_std(s: dict) -> str:
    """Mean test Spearman x 100, with its standard deviation over seeds when there are several."""
    return _pts(s["spearman"]) + (f" ± {_pts(s['spearman_std'])}" if len(s["seeds"]) > 1 else "")


def _ci(cmp: dict) -> str:
    lo, hi = cmp["ci95"]
    return f"{cmp['diff'] * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def render_markdown(report: dict) -> str:
    """compare.md: settings, then a table per budget (heads, fidelity, test Spearman before and after the
    distillation, the difference from CAHP with its 95% interval and CAHP's verdict), from the JSON alone."""
    st, dense = report["settings"], report["dense"]
    fine = report["finetuned"]["results"] if report.get("finetuned") else None
    dist = st["distillation"]
    lines = [
        f"# CAHP against the baselines: {report['model']} / {report['objective']} (no labels)\n",
        f"- texts: {report['texts']}; similarity task `{report['similarity_task']}`, test split "
        f"({report['data'].get('similarity_test_pairs')} pairs), zero-shot; Spearman and Pearson x 100",
        f"- dense model: test Spearman {_pts(dense['spearman'])}, Pearson {_pts(dense['pearson'])}; "
        f"{report['heads']} heads",
        "- budgets: " + ", ".join(f"{b['label']} = {b['k']} of {report['heads']} heads" for b in report["budgets"])
        + f" (CAHP's knee k* = {report['k_star']}, on {report['knee_score']})",
        f"- seeds: {st['seeds']}; "
        + (f"distillation after pruning ({report['embedding_distance']} distance to the dense embeddings): "
           f"{dist['epochs']} epochs max, lr {dist['lr']}, batch {dist['batch_size']}, patience {dist['patience']} "
           "(early stopping on held-out fidelity)" if fine is not None else "no distillation (part (a) only)"),
        f"- statistics: {report['statistics']}; {report['verdict_rule']}",
        "- fidelity: mean cosine to the dense embeddings of the held-out texts (gated / distilled)",
    ]
    if report.get("partial"):
        lines.append("- **partial**: the distillation results are still being computed")
    which = "after distillation" if fine is not None else "without distillation"
    for b in report["budgets"]:
        label, k = b["label"], b["k"]
        pre = report["no_finetune"]["results"][label]
        lines += [f"\n## {label}: {k} of {report['heads']} heads\n",
                  f"| method | heads kept | fidelity | Spearman before distillation | Spearman after distillation "
                  f"| diff vs CAHP {which} [95% CI] | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for method, a in pre.items():
            f = fine[label][method] if fine is not None else None
            s = f or a
            fid = _pts(a["heldout_fidelity"]) + (f" / {_pts(f['heldout_fidelity'])}" if f else "")
            before, after = _mean_std(a), "-" if f is None else _mean_std(f)
            v = s.get("vs_cahp")
            lines.append(f"| {method} | {a['heads_kept']} | {fid} | {before} | {after} | "
                         f"{_ci(v['pooled']) if v else '-'} | {v['pooled']['verdict'] if v else '-'} |")
        dv = dense["vs_cahp"][label]["pooled"]
        lines.append(f"| dense | {dense['heads_kept']} | {_pts(dense['heldout_fidelity'])} | "
                     f"{_pts(dense['spearman'])} | {_pts(dense['spearman'])} | {_ci(dv)} | {dv['verdict']} |")
    lines.append("\nVerdicts are CAHP's (win: CAHP better). The dense row's difference is dense minus CAHP.")
    return "\n".join(lines) + "\n"

